"""`wsss eval`: score scores and labels artifacts against the dataset's masks (METHODS.md §6).

Any per-image artifact of the pipeline can be scored: CAMs (`cams.h5`, no background channel), seeds
(`seeds.h5`, labels with 255 = unsure), refined maps (`refined.h5`, background channel), pseudo labels
(`pseudo.h5`) and predictions (`pred_<split>.h5`, labels preferred over scores, with a `labels_crf`
record reported beside the labels). Every figure is a percentage; conventions:

- ``miou``, ``pixel_accuracy``, per-class figures: predicted 255 (unsure) counted as background;
- ``miou_labelled_only``, ``labelled_precision``: only the pixels the prediction labelled, and
  ``coverage`` says how many those are;
- score maps without background: the headline figures use the fixed ``bg_threshold`` (never chosen on
  ground truth); ``threshold`` / ``best_miou`` / ``curve`` pick the threshold on ground truth and are a
  diagnostic only.

Images stream one at a time: memory holds a few confusion matrices, never the dataset.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from stages.common.artifacts import (
    PARTIAL_SUFFIX,
    Artifact,
    ArtifactWriter,
    Provenance,
    begin,
    check_dataset,
    fingerprint_of,
    open_artifact,
    read_provenance,
)
from stages.common.context import RunOptions, config_record
from stages.common.datasets.base import Dataset, class_indices
from stages.common.distributed import rank_and_world
from stages.common.errors import ArtifactError, ConfigError, StaleArtifact
from stages.common.metrics import ConfusionAccumulator, ThresholdCurve
from stages.common.progress import track
from stages.common.summary import Summary

EVAL_NAME = "eval.h5"

# The background score of IRN's semantic segmentation from CAM-derived maps (`sem_seg_bg_thres`, Ahn et
# al. CVPR 2019); the pipeline's fixed cut for maps without a background channel.
DEFAULT_BG_THRESHOLD = 0.25

DIAGNOSTIC = "threshold and best_miou were picked on ground truth: a diagnostic, not a pipeline setting"
CONVENTIONS = {
    "miou": "predicted 255 (unsure) counted as background",
    "per_class": "predicted 255 counted as background; fp = FP/union, fn = FN/union, iou + fp + fn = 100",
    "precision_recall": "foreground classes pooled; predicted 255 is not foreground",
    "miou_labelled_only": "only pixels the prediction labelled (not 255)",
    "labelled_precision": "correct share of the pixels the prediction labelled (not 255)",
    "coverage": "share of ground-truth pixels (not void) the prediction labelled",
}


@dataclass
class EvalConfig:
    """Options of `wsss eval`."""

    artifacts: tuple[Path, ...] = ()  # empty = every artifact in the run directory with ground truth
    split: str | None = None  # ground truth split; None = each artifact's own (its `dataset` attribute)
    max_images: int | None = None  # score only the first N images of each artifact (quick looks)
    bg_threshold: float = DEFAULT_BG_THRESHOLD  # for score maps without a background channel (IRN)
    out: Path | None = None  # None = RUN/eval.h5

    def __post_init__(self) -> None:
        self.artifacts = tuple(Path(p) for p in self.artifacts)
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(f"--max-images {self.max_images}: give at least 1")
        if not 0.0 < self.bg_threshold < 1.0:
            raise ConfigError(f"--bg-threshold {self.bg_threshold}: must lie in (0, 1)")


@dataclass
class EvalSummary(Summary):
    """A `Summary` that also carries the full result objects (`--json` prints them)."""

    results: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "results": self.results, "skipped": self.skipped}


# ---------------------------------------------------------------------------------------------------------
# Algorithms: predictions from score maps, and the figures of an accumulator


def labels_from_scores(scores: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """uint8 (H, W): the class of the highest of the (K, H, W) scores; `classes` includes background 0.

    Channels not stored are absent classes: they can never win.
    """
    if 0 not in classes:
        raise ValueError(f"classes {list(classes)} have no background channel; use labels_from_cam")
    return np.asarray(classes, dtype=np.uint8)[scores.argmax(0)]


def labels_from_cam(scores: np.ndarray, classes: tuple[int, ...], threshold: float) -> np.ndarray:
    """uint8 (H, W) from (K, H, W) foreground maps: the top class where its score ≥ threshold, else 0.

    The same rule as `threshold_curve_update` (a pixel is foreground at t when its max score ≥ t).
    """
    if len(classes) == 0:
        return np.zeros(scores.shape[1:], dtype=np.uint8)
    top = np.asarray(classes, dtype=np.uint8)[scores.argmax(0)]
    return np.where(scores.max(0) >= threshold, top, 0).astype(np.uint8)


def figures(acc: ConfusionAccumulator, class_names: tuple[str, ...]) -> dict[str, Any]:
    """The JSON figures of one accumulator (percent): metrics.summary plus the means the table shows.

    fp / fn = mean over classes with a union of FP/union, FN/union, so miou + fp + fn = 100.
    """
    out = acc.summary(class_names)
    for key in ("fp", "fn"):
        values = [v for v in out[f"per_class_{key}"].values() if v is not None]
        out[key] = float(np.mean(values)) if values else 0.0
    labelled = acc.labelled
    out["labelled_precision"] = float(100.0 * np.trace(labelled) / labelled.sum()) if labelled.sum() else 0.0
    del out["unsure_convention"]  # CONVENTIONS says it for every figure
    return out


# ---------------------------------------------------------------------------------------------------------
# Scoring one artifact


@dataclass
class _Scorer:
    """Accumulates one artifact's evaluation image by image; `mode` is labels, argmax or threshold."""

    class_names: tuple[str, ...]
    mode: str
    crf: bool
    bg_threshold: float
    main: ConfusionAccumulator = field(init=False)
    with_crf: ConfusionAccumulator | None = field(init=False)
    curve: ThresholdCurve | None = field(init=False)
    mismatched: int = 0

    def __post_init__(self) -> None:
        n = len(self.class_names)
        self.main = ConfusionAccumulator(n)
        self.with_crf = ConfusionAccumulator(n) if self.crf else None
        self.curve = ThresholdCurve(n) if self.mode == "threshold" else None

    def add(self, art: Artifact, image_id: str, gt: np.ndarray, annotated: tuple[int, ...]) -> None:
        if class_indices(gt) != tuple(annotated):
            self.mismatched += 1
        if self.mode == "labels":
            self.main.update(_labels(art, image_id, "labels", gt.shape), gt)
        else:
            scores, classes = art.scores_full(image_id, gt.shape)
            has_background = 0 in classes
            if has_background != (self.mode == "argmax"):
                raise ArtifactError(
                    f"{art.path}: image {image_id!r} {'has' if has_background else 'lacks'} a background "
                    "channel unlike the artifact's first image; rerun its stage with --force"
                )
            if self.curve is not None:
                self.curve.update(scores, classes, gt)
                self.main.update(labels_from_cam(scores, classes, self.bg_threshold), gt)
            else:
                self.main.update(labels_from_scores(scores, classes), gt)
        if self.with_crf is not None:
            self.with_crf.update(_labels(art, image_id, "labels_crf", gt.shape), gt)

    def result(self) -> dict[str, Any]:
        out = figures(self.main, self.class_names)
        out["threshold"] = out["best_miou"] = out["curve"] = out["default_threshold"] = None
        if self.curve is not None:
            out["threshold"], out["best_miou"] = self.curve.best()
            out["curve"] = [[t, m] for t, m in self.curve.curve()]
            out["default_threshold"] = self.bg_threshold
            out["threshold_diagnostic"] = DIAGNOSTIC
        out["with_crf"] = figures(self.with_crf, self.class_names) if self.with_crf is not None else None
        out["label_mismatch_images"] = self.mismatched
        return out

    def matrices(self) -> dict[str, np.ndarray]:
        found = {"confusion": self.main.matrix(), "confusion_labelled": self.main.labelled}
        if self.with_crf is not None:
            found["confusion_crf"] = self.with_crf.matrix()
        if self.curve is not None:
            found["curve_confusion"] = self.curve.matrices
            found["curve_thresholds"] = np.asarray(self.curve.thresholds)
        return found


def _labels(art: Artifact, image_id: str, name: str, size: tuple[int, ...]) -> np.ndarray:
    labels = art.labels(image_id) if name == "labels" else np.asarray(art.extra(image_id, name), np.uint8)
    if labels.shape != size:
        raise ArtifactError(
            f"{art.path}: {name} of image {image_id!r} are {labels.shape[0]}x{labels.shape[1]} but its mask "
            f"is {size[0]}x{size[1]}; labels must be at full image size (rerun its stage with --force)"
        )
    return labels


def _mode(art: Artifact, image_id: str) -> tuple[str, bool]:
    """How to read an artifact, from its first record: labels (preferred), argmax or threshold."""
    group = art.h5[f"images/{image_id}"]
    crf = "labels_crf" in group
    if "labels" in group:
        return "labels", crf
    if "scores" in group:
        classes = [int(c) for c in group["scores"].attrs["classes"]]
        return ("argmax" if 0 in classes else "threshold"), crf
    raise ArtifactError(f"{art.path}: image {image_id!r} holds neither labels nor scores; nothing to score")


def _identity(dataset: Dataset) -> dict[str, Any]:
    """What `check_dataset` compares: the dataset's name and class list."""
    return {"name": dataset.name, "root": str(dataset.root), "class_names": list(dataset.class_names)}


def _ids_to_score(
    art: Artifact, dataset: Dataset, split: str, max_images: int | None
) -> tuple[list[str], str]:
    """Ids of the ground-truth split the artifact holds (first `max_images`), and a note when partial."""
    split_ids = dataset.ids(split)
    held = set(art.ids())
    ids = [i for i in split_ids if i in held]
    if not ids:
        raise ArtifactError(
            f"{art.path}: holds none of the {len(split_ids)} images of split {split!r}; evaluate it on its "
            f"own split ({art.dataset.get('split')}) or pass the --split its images belong to"
        )
    note = f"holds {len(ids)} of the {len(split_ids)} images of {split}" if len(ids) < len(split_ids) else ""
    return (ids[:max_images] if max_images else ids), note


def score_artifact(
    path: Path,
    dataset: Dataset,
    *,
    split: str | None = None,
    max_images: int | None = None,
    bg_threshold: float = DEFAULT_BG_THRESHOLD,
    quiet: bool = True,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The result object of one artifact and its confusion matrices (name -> (N, N) or (T, N, N) int64)."""
    with open_artifact(path, kind=("scores", "labels")) as art:
        check_dataset(art.path, art.dataset, _identity(dataset))
        gt_split = split or str(art.dataset.get("split"))
        ids, partial_note = _ids_to_score(art, dataset, gt_split, max_images)
        mode, crf = _mode(art, ids[0])
        scorer = _Scorer(tuple(dataset.class_names), mode, crf, bg_threshold)
        for image_id in track(ids, total=len(ids), description=f"eval {art.path.name}", quiet=quiet):
            try:
                scorer.add(art, image_id, dataset.mask(image_id), dataset.labels(image_id))
            except ValueError as exc:  # label values outside the class list
                raise ArtifactError(
                    f"{art.path}: image {image_id!r}: {exc}; rerun its stage with --force"
                ) from exc
        result = {
            "artifact": str(art.path),
            "stage": art.stage,
            "kind": art.kind,
            "split": gt_split,
            "artifact_split": art.dataset.get("split"),
            "scored": {
                "labels": "labels",
                "argmax": "scores (argmax, background channel)",
                "threshold": "scores (no background: fixed background threshold)",
            }[mode],
            **scorer.result(),
            "partial_split": partial_note or None,
            "conventions": CONVENTIONS,
        }
        return result, scorer.matrices()


def evaluate_artifact(
    path: Path,
    dataset: Dataset,
    max_images: int | None = None,
    *,
    split: str | None = None,
    bg_threshold: float = DEFAULT_BG_THRESHOLD,
) -> dict[str, Any]:
    """The result object (see `wsss eval --json`) of one scores or labels artifact; writes nothing.

    For other stages' summaries (mine-ae seeds, train-seg predictions, the demo report).
    """
    result, _ = score_artifact(
        Path(path), dataset, split=split, max_images=max_images, bg_threshold=bg_threshold
    )
    return result


def evaluate_labels(pred_by_id: Iterable[tuple[str, np.ndarray]], dataset: Dataset) -> dict[str, Any]:
    """The result object of in-memory label maps: (image id, uint8 (H, W) with 255 = unsure) pairs.

    Consumed one pair at a time, so a generator keeps memory flat.
    """
    scorer = _Scorer(tuple(dataset.class_names), "labels", False, DEFAULT_BG_THRESHOLD)
    for image_id, pred in pred_by_id:
        gt = dataset.mask(image_id)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction of {image_id!r} is {pred.shape}, its mask {gt.shape}")
        if class_indices(gt) != tuple(dataset.labels(image_id)):
            scorer.mismatched += 1
        scorer.main.update(np.asarray(pred), gt)
    if scorer.main.images == 0:
        raise ValueError("evaluate_labels got no images")
    return {
        "artifact": None,
        "stage": None,
        "split": None,
        "scored": "labels",
        **scorer.result(),
        "conventions": CONVENTIONS,
    }


# ---------------------------------------------------------------------------------------------------------
# Finding artifacts, and the stage


def find_artifacts(
    run_dir: Path, dataset: Dataset, split: str | None = None, exclude: Iterable[Path] = ()
) -> tuple[list[Path], list[dict[str, str]]]:
    """Artifacts of `run_dir` that can be scored, and the others with why they are skipped."""
    found: list[Path] = []
    skipped: list[dict[str, str]] = []
    excluded = {Path(p).resolve() for p in exclude}
    for path in sorted(Path(run_dir).glob("*.h5*")):
        if path.resolve() in excluded or path.is_dir():
            continue
        reason = _skip_reason(path, dataset, split)
        if reason is None:
            found.append(path)
        elif reason:
            skipped.append({"path": str(path), "reason": reason})
    return found, skipped


def _skip_reason(path: Path, dataset: Dataset, split: str | None) -> str | None:
    """None when `path` can be scored, "" to ignore it silently, else why it is skipped."""
    if path.name.endswith(".h5" + PARTIAL_SUFFIX):
        return "partial: its stage has not finished"
    if not path.name.endswith(".h5"):
        return ""
    try:
        provenance, complete = read_provenance(path)
    except ArtifactError:
        return "not a wsss artifact"
    if provenance.kind in ("model", "metrics"):
        return f"a {provenance.kind} artifact (no per-image maps)"
    if not complete:
        return "incomplete"
    try:
        check_dataset(path, provenance.dataset, _identity(dataset))
    except ArtifactError:
        return f"made for another dataset or class list ({provenance.dataset.get('name')})"
    gt_split = split or str(provenance.dataset.get("split"))
    if gt_split not in dataset.split_names() or not dataset.has_masks(gt_split):
        return f"no ground truth: split {gt_split!r} has no masks"
    return None


def _roles(paths: list[Path]) -> dict[str, Path]:
    """Input roles of eval.h5: file names, or paths where two names collide."""
    names = [p.name for p in paths]
    return {(p.name if names.count(p.name) == 1 else str(p)): p for p in paths}


def _resolve(path: Path, run_dir: Path) -> Path:
    """A named artifact as given, or inside the run directory when only there (`wsss eval cams.h5`)."""
    return path if path.exists() or not (run_dir / path).exists() else run_dir / path


def run(opts: RunOptions, cfg: EvalConfig) -> EvalSummary:
    """Score the named artifacts (default: all in the run directory) and write RUN/eval.h5."""
    if rank_and_world()[1] > 1:  # its accumulators are not reduced over ranks; it is fast in one process
        raise ConfigError("wsss eval runs in one process (hundreds of images/s); launch it without torchrun")
    start = time.perf_counter()
    dataset = opts.dataset
    out = Path(cfg.out) if cfg.out else opts.path(EVAL_NAME)
    skipped: list[dict[str, str]] = []
    if cfg.artifacts:
        targets = [_resolve(p, opts.run_dir) for p in cfg.artifacts]
    else:
        targets, skipped = find_artifacts(opts.run_dir, dataset, cfg.split, exclude=[out])
        if not targets:
            why = "; ".join(f"{Path(s['path']).name}: {s['reason']}" for s in skipped) or "it holds none"
            raise ArtifactError(
                f"{opts.run_dir}: no artifact to evaluate ({why}); run a stage first or name one"
            )
    roles = _roles(targets)
    provenance = _provenance(opts, cfg, dataset, roles)
    with opts.lock("eval"):
        replaced = None
        try:
            status = begin(out, provenance, force=opts.force)
        except StaleArtifact:
            # eval.h5 is a cheap summary of artifacts that stay on disk: scoring other artifacts or with
            # other options replaces it, where a costly stage's artifact would be refused.
            status = begin(out, provenance, force=True)
            replaced = f"replaced {out.name}, which held an evaluation of other artifacts or options"
        if status.writer is None:
            with open_artifact(out, kind="metrics") as done:
                results = done.meta("results", [])
            return _summary("up to date", out, results, skipped, time.perf_counter() - start)
        with status.writer as writer:
            stored = writer.h5.get("results", {})
            resumed = any(bool(record.attrs.get("done", False)) for record in stored.values())
            results = list(_score_all(writer, roles, dataset, cfg, opts.quiet))
            writer.set_meta("results", results)
            writer.finish()
    status_word = "resumed" if resumed else "made"
    summary = _summary(status_word, out, results, skipped, time.perf_counter() - start)
    if replaced:
        summary.notes.insert(0, replaced)
    return summary


def _provenance(opts: RunOptions, cfg: EvalConfig, dataset: Dataset, roles: dict[str, Path]) -> Provenance:
    """eval.h5's identity: options, the scored artifacts' fingerprints, the ground-truth splits."""
    refs: dict[str, dict[str, str]] = {}
    splits: set[str] = set()
    for role, path in roles.items():
        with open_artifact(path, kind=("scores", "labels")) as art:
            check_dataset(art.path, art.dataset, _identity(dataset))
            refs[role] = art.ref()
            splits.add(cfg.split or str(art.dataset.get("split")))
    record = config_record(cfg, opts)
    record.pop("seed")  # nothing random here: another --seed must not invalidate eval.h5
    record.pop("artifacts")  # the inputs name them, with their fingerprints
    described = {
        **_identity(dataset),
        "split": ",".join(sorted(splits)),
        "fingerprint": fingerprint_of({s: dataset.fingerprint(s) for s in sorted(splits)}),
    }
    return Provenance(kind="metrics", stage="eval", config=record, inputs=refs, dataset=described)


def _score_all(
    writer: ArtifactWriter, roles: dict[str, Path], dataset: Dataset, cfg: EvalConfig, quiet: bool
) -> Iterator[dict[str, Any]]:
    """Each artifact's result, stored in `/results/<role>/` as it is made; done ones come from the file."""
    group = writer.h5.require_group("results")
    for role, path in roles.items():
        key = quote(role, safe="")
        if key in group and group[key].attrs.get("done", False):
            yield json.loads(group[key].attrs["result"])
            continue
        result, matrices = score_artifact(
            path,
            dataset,
            split=cfg.split,
            max_images=cfg.max_images,
            bg_threshold=cfg.bg_threshold,
            quiet=quiet,
        )
        if key in group:
            del group[key]
        record = group.create_group(key)
        for name, matrix in matrices.items():
            record.create_dataset(name, data=matrix)
        record.attrs["result"] = json.dumps(result, default=str)
        record.attrs["done"] = True
        writer.flush()
        yield result


# Table rows: (label, result key); one column per scored artifact keeps the table narrow.
_TABLE_ROWS = (
    ("stage", "stage"),
    ("split", "split"),
    ("images", "images"),
    ("mIoU", "miou"),
    ("pixel accuracy", "pixel_accuracy"),
    ("precision (fg)", "precision"),
    ("recall (fg)", "recall"),
    ("FP / union", "fp"),
    ("FN / union", "fn"),
    ("coverage", "coverage"),
    ("mIoU labelled only", "miou_labelled_only"),
    ("precision labelled", "labelled_precision"),
    ("best bg thr (GT)", "threshold"),
    ("mIoU at best (GT)", "best_miou"),
)


def _columns(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Column name -> figures: each artifact, and its +crf variant beside it."""
    columns: dict[str, dict[str, Any]] = {}
    for res in results:
        name = Path(res["artifact"]).name
        columns[name] = res
        if res.get("with_crf"):
            columns[name + " +crf"] = {**res, **res["with_crf"], "threshold": None, "best_miou": None}
    return columns


def _summary(
    status: str, out: Path, results: list[dict[str, Any]], skipped: list[dict[str, str]], seconds: float
) -> EvalSummary:
    notes = [f"skipped {Path(s['path']).name}: {s['reason']}" for s in skipped]
    notes.append("mIoU and per-class figures count predicted 255 as background; 'labelled' rows do not")
    for res in results:
        name = Path(res["artifact"]).name
        if res.get("threshold") is not None:
            notes.append(
                f"{name}: mIoU at the fixed background threshold {res['default_threshold']}; the best one, "
                f"{res['threshold']} ({res['best_miou']:.2f}), is a diagnostic chosen on ground truth"
            )
        if res.get("label_mismatch_images"):
            notes.append(
                f"{name}: in {res['label_mismatch_images']} of {res['images']} images the mask's classes "
                "disagree with the annotation labels"
            )
        if res.get("partial_split"):
            notes.append(f"{name}: {res['partial_split']}")
    columns = _columns(results)

    def cell(value: Any) -> Any:
        return "-" if value is None else value

    metrics = [
        {"name": label, **{c: cell(r.get(key)) for c, r in columns.items()}} for label, key in _TABLE_ROWS
    ]
    names = list(results[0]["per_class_iou"]) if results else []
    per_class = [{"class": n, **{c: cell(r["per_class_iou"][n]) for c, r in columns.items()}} for n in names]
    return EvalSummary(
        "eval",
        status=status,
        artifacts=[out],
        seconds=seconds,
        images=sum(r["images"] for r in results),
        tables={"eval (percent)": metrics, "IoU per class (percent)": per_class},
        notes=notes,
        results=results,
        skipped=skipped,
    )
