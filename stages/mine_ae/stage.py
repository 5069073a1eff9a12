"""`wsss mine-ae`: CAM extraction and adversarial erasing (AE-PSL, Wei et al. CVPR 2017).

Round 1 computes the CAMs of train-cls's classifier (``cls.h5``) on the training images. Round t ≥ 2
erases from every image the regions mined so far (filled with the dataset mean pixel, on the fly),
trains a fresh classifier on the erased images with train-cls's recipe (``cls_r{t}.h5``) and computes
its CAMs on them. Each round is its own resumable artifact (``cams_r{t}.h5``, see `rounds.py`); the
kept rounds are fused into ``cams.h5`` (round 1's CAM, raised to each later round's CAM where that round
mined) and turned into ``seeds.h5`` (METHODS.md §2). Erasing stops early when a round's classifier no longer recognises its
erased images (micro F1 below ``stop_f1`` x round 1's F1): that round mines background, so it is
left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common.artifacts import Provenance, open_artifact
from stages.common.cam import CAM_SCALES
from stages.common.context import RunOptions, config_record, default_train_split
from stages.common.distributed import barrier, is_main, local_device, shard
from stages.common.errors import ArtifactError, ConfigError
from stages.common.shards import begin_sharded, stage_lock
from stages.common.summary import Summary
from stages.mine_ae import seeds as seeds_mod
from stages.mine_ae.erasing import DEFAULT_LOW_CAM_THR, DEFAULT_SALIENCY_BG_THR, DEFAULT_TOP_FRACTION
from stages.mine_ae.extract import CamRecipe, extract_cams, prepare_model
from stages.mine_ae.rounds import MaskEraser, RoundReader, classifier_quality, round_path, round_records

STAGE = "mine-ae"
ROUND_INITS = ("auto", "recipe", "cls")
# Options that change only the seeds, not the rounds' CAMs or masks.
SEED_FIELDS = ("saliency", "saliency_merge", "saliency_bg_thr")


@dataclass
class MineAeConfig:
    """Options of `wsss mine-ae`; defaults are AE-PSL's (METHODS.md §2) and IRN's CAM (§1).

    No default depends on the image size: CAM inference is fully convolutional and the round
    classifiers take train-cls's resolved recipe (toy or VOC) from ``cls.h5``.
    """

    rounds: int = 3  # AE-PSL: three rounds were best, a fourth mined background
    classifier: Path | None = None  # round 1's classifier; None = RUN/cls.h5
    split: str | None = None  # None = the dataset's training split (train_aug when present)
    top_fraction: float = DEFAULT_TOP_FRACTION  # AE-PSL: mine the top 20% of each class's CAM
    erase_thr: float | None = None  # a fixed cut on the normalised CAM instead of the top fraction
    # Stop when a round's classifier F1 on its erased images falls below this share of round 1's F1 on the
    # whole images: relative, so a weak (e.g. from-scratch) classifier is not stopped at round 2 by a bound
    # its own first round would fail. AE-PSL states the criterion, not a number.
    stop_f1: float = 0.5
    # Where round t >= 2's classifier starts. AE-PSL starts every round from ImageNet weights ("recipe": what
    # train-cls started from). Without ImageNet weights that is random init, and a fresh network trained on
    # head-erased images from scratch does not learn the weaker cues left (round 2 fitted its own training
    # images at F1 0.5 on the toy data); "cls" starts it from cls.h5's backbone instead, the nearest thing to
    # a pretrained network such a run has. auto = recipe with ImageNet weights, cls without.
    round_init: str = "auto"
    cam: str = "cam"  # cam | gradcam
    gradcam_layer: str = "layer4"
    scales: tuple[float, ...] = CAM_SCALES  # IRN
    low_cam_thr: float = DEFAULT_LOW_CAM_THR  # AE-PSL: background where every round's CAM < 5% of max
    saliency: Path | None = None  # a folder of grayscale PNGs, one per image id
    saliency_merge: str = "none"  # none | components (Oh et al. CVPR 2017)
    saliency_bg_thr: float = DEFAULT_SALIENCY_BG_THR  # AE-PSL: saliency below 0.06 is background

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if self.rounds < 1:
            raise ConfigError(f"--rounds {self.rounds}: need at least 1 (1 = plain CAM extraction)")
        if not 0.0 <= self.stop_f1 <= 1.0:
            raise ConfigError(f"--stop-f1 {self.stop_f1}: a share of round 1's F1 in [0, 1], e.g. 0.5")
        if self.round_init not in ROUND_INITS:
            raise ConfigError(f"--round-init {self.round_init}: use {', '.join(ROUND_INITS)}")
        if self.saliency_merge not in ("none", "components"):
            raise ConfigError(f"--saliency-merge {self.saliency_merge}: use none or components")
        if self.saliency_merge == "components" and self.saliency is None:
            raise ConfigError(
                "--saliency-merge components needs --saliency DIR (one grayscale PNG per image)"
            )
        CamRecipe(self.cam, self.scales, gradcam_layer=self.gradcam_layer)  # validates the CAM options


@dataclass(frozen=True)
class ClassifierBackend:
    """How mine-ae trains and loads its classifiers: train-cls's functions, or a fake in tests.

    ``train(opts, recipe, out, *, ids, erase, extra_inputs) -> Summary`` trains a fresh classifier with
    the resolved train-cls config ``recipe`` (as recorded in ``cls.h5``); ``load(path, dataset
    description, device)`` returns it in eval mode.
    """

    train: Callable[..., Summary]
    load: Callable[[Path, dict, torch.device], torch.nn.Module]


def train_cls_backend() -> ClassifierBackend:
    """The real backend: `stages.train_cls` (imported here so tests can run without it)."""
    import dataclasses

    from stages import train_cls

    def train(opts: RunOptions, recipe: dict[str, Any], out: Path, **kwargs: Any) -> Summary:
        known = {f.name for f in dataclasses.fields(train_cls.TrainClsConfig)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items() if k in known}
        cfg = train_cls.resolve_config(train_cls.TrainClsConfig(**values), opts.dataset)
        return train_cls.train_classifier(opts, cfg, out, stage=STAGE, **kwargs)

    return ClassifierBackend(train=train, load=train_cls.load_classifier)


@dataclass
class RoundOutcome:
    """One round as the summary reports it."""

    round: int
    path: Path
    classifier: Path
    train_seconds: float
    extract_seconds: float
    quality: dict[str, float] = field(default_factory=dict)


def run(opts: RunOptions, cfg: MineAeConfig, *, backend: ClassifierBackend | None = None) -> Summary:
    """Erase, retrain and mine for up to ``cfg.rounds`` rounds, then write cams.h5 and seeds.h5."""
    if opts.shard is not None and cfg.rounds > 1:
        raise ConfigError(
            "--shard splits round 1 only (round t+1 trains on all of round t): use --rounds 1 per machine, "
            "`wsss merge`, then torchrun for more rounds"
        )
    started = time.time()
    dataset = opts.dataset
    split = cfg.split or default_train_split(dataset)
    described = dataset.describe(split)
    ids = dataset.ids(split)
    first = Path(cfg.classifier or opts.path("cls.h5"))
    if not first.exists():
        raise ArtifactError(f"{first}: no classifier to mine from; run `wsss train-cls` first")
    with open_artifact(first, kind="model", dataset=described) as cls_art:
        recipe = _round_recipe(cls_art.config, cls_art.provenance.inputs)
    if cfg.round_init == "auto":
        cfg = replace(cfg, round_init="recipe" if recipe.get("weights") else "cls")
    # Held through the round trainings too: train_classifier expects its caller to hold the lock.
    with stage_lock(opts, STAGE):
        return _run_locked(opts, cfg, backend, first, recipe, described, ids, started)


def _round_recipe(config: dict[str, Any], inputs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """train-cls's resolved config as recorded in cls.h5, for the round classifiers.

    The record keeps only the weights file's name; its path is among the inputs. Validation is
    dropped: the round classifiers are judged on the erased images they learn from, not on val.
    """
    recipe = dict(config)
    if "weights" in inputs:
        recipe["weights"] = inputs["weights"]["path"]
    recipe["val_split"] = "none"
    return recipe


def _run_locked(
    opts: RunOptions,
    cfg: MineAeConfig,
    backend: ClassifierBackend | None,
    first: Path,
    recipe: dict[str, Any],
    described: dict[str, Any],
    ids: list[str],
    started: float,
) -> Summary:
    dataset = opts.dataset
    record = config_record(cfg, opts)
    mean_pixel = dataset.mean_pixel(described["split"]) if cfg.rounds > 1 else np.zeros(3, np.float32)
    outcomes: list[RoundOutcome] = []
    notes: list[str] = []
    resumed = False
    for t in range(1, cfg.rounds + 1):
        previous = outcomes[-1].path if outcomes else None
        classifier, train_seconds = first, 0.0
        if previous is not None:
            backend = backend or train_cls_backend()
            classifier = opts.path(f"cls_r{t}.h5")
            with open_artifact(previous, kind="scores", dataset=described) as prev_art:
                prev_ref = prev_art.ref()
            trained = backend.train(
                opts,
                recipe,
                classifier,
                ids=ids,
                erase=MaskEraser(previous, mean_pixel),
                extra_inputs={"mined": prev_ref},
                init_backbone=first if cfg.round_init == "cls" else None,
            )
            train_seconds = trained.seconds
        outcome, was_resumed = _mine_round(
            opts, cfg, record, t, classifier, previous, backend, described, ids, mean_pixel, train_seconds
        )
        resumed |= was_resumed
        outcomes.append(outcome)
        f1, bound = outcome.quality["f1"], cfg.stop_f1 * outcomes[0].quality["f1"]
        if t >= 2 and f1 < bound:
            notes.append(
                f"stopped after round {t}: its classifier's F1 on the erased images is {f1:.2f} < --stop-f1 "
                f"{cfg.stop_f1} x round 1's {outcomes[0].quality['f1']:.2f} (it no longer recognises them, "
                f"so its CAM mines background); seeds use rounds 1..{t - 1}"
            )
            break
    if opts.shard is not None:
        note = "join the shards with `wsss merge`, then rerun mine-ae --rounds 1 for cams.h5 and seeds.h5"
        status = "resumed" if resumed else "made"
        images = len(shard(ids, *opts.shard))
        return Summary(STAGE, status, [outcomes[0].path], time.time() - started, images=images, notes=[note])
    bound = cfg.stop_f1 * outcomes[0].quality["f1"]
    kept = [o for o in outcomes if o.round == 1 or o.quality["f1"] >= bound]
    # The fused CAM and seeds are one cheap pass: rank 0 writes them while the others wait.
    summary = Summary(STAGE, "made")
    if is_main():
        summary = seeds_mod.write_outputs(opts, cfg, record, described, ids, outcomes, kept, SEED_FIELDS)
    barrier()
    summary.notes = notes + summary.notes
    if resumed and summary.status == "made":
        summary.status = "resumed"
    summary.seconds = time.time() - started
    return summary


def _mine_round(
    opts: RunOptions,
    cfg: MineAeConfig,
    record: dict[str, Any],
    t: int,
    classifier: Path,
    previous: Path | None,
    backend: ClassifierBackend | None,
    described: dict[str, Any],
    ids: list[str],
    mean_pixel: np.ndarray,
    train_seconds: float,
) -> tuple[RoundOutcome, bool]:
    """Round t's CAMs and masks on I_t, resumable image by image; its outcome and whether it resumed."""
    dataset = opts.dataset
    with open_artifact(classifier, kind="model", dataset=described) as cls_art:
        inputs = {"classifier": cls_art.ref()}
    if previous is not None:
        with open_artifact(previous, kind="scores", dataset=described) as prev_art:
            inputs["previous"] = prev_art.ref()
    round_config = {
        k: v
        for k, v in record.items()
        if k not in SEED_FIELDS + ("rounds", "stop_f1", "classifier", "round_init")
    }
    provenance = Provenance(
        kind="scores", stage=STAGE, config={**round_config, "round": t}, inputs=inputs, dataset=described
    )
    path = round_path(opts.run_dir, t)
    started = time.time()
    status = begin_sharded(path, provenance, ids, opts)
    path = status.path
    if status.writer is not None:
        with status.writer as writer:
            if writer.get_meta("train_seconds") is None:
                writer.set_meta("train_seconds", train_seconds)
            _extract_round(opts, cfg, t, classifier, previous, backend, mean_pixel, status.ids, writer)
            writer.set_meta(
                "extract_seconds", float(writer.get_meta("extract_seconds", 0.0)) + time.time() - started
            )
            writer.finish()
        status.complete()
    quality = _round_quality(path, status.all_ids, dataset)
    with open_artifact(path, kind="scores", dataset=described) as art:
        outcome = RoundOutcome(
            t,
            path,
            classifier,
            float(art.meta("train_seconds", 0.0)),
            float(art.meta("extract_seconds", 0.0)),
            quality,
        )
    return outcome, status.resumed > 0


def _extract_round(
    opts: RunOptions,
    cfg: MineAeConfig,
    t: int,
    classifier: Path,
    previous: Path | None,
    backend: ClassifierBackend | None,
    mean_pixel: np.ndarray,
    ids: list[str],
    writer: Any,
) -> None:
    dataset = opts.dataset
    device = local_device(opts.torch_device())
    load = (backend or train_cls_backend()).load
    model = prepare_model(load(classifier, writer.provenance.dataset, device), device)
    recipe = CamRecipe(
        cfg.cam, cfg.scales, gradcam_layer=cfg.gradcam_layer, amp=opts.amp and device.type == "cuda"
    )
    reader = RoundReader(previous) if previous is not None else None

    def extras(
        image_id: str, image: np.ndarray, cams: np.ndarray, logits: np.ndarray
    ) -> dict[str, np.ndarray]:
        before = (reader.union(image_id), reader.low(image_id)) if reader is not None else None
        masks = round_records(
            cams,
            image.shape[:2],
            before,
            top_fraction=cfg.top_fraction,
            erase_thr=cfg.erase_thr,
            low_cam_thr=cfg.low_cam_thr,
        )
        return {**masks, "logits": logits.astype(np.float32)}

    try:
        extract_cams(
            model,
            dataset.image,
            [(i, dataset.labels(i)) for i in ids],
            recipe,
            erase=MaskEraser(previous, mean_pixel) if previous is not None else None,
            extras=extras,
            writer=writer,
            description=f"mine-ae round {t}",
            quiet=opts.quiet,
        )
    finally:
        if reader is not None:
            reader.close()


def _round_quality(path: Path, ids: list[str], dataset: Any) -> dict[str, float]:
    """Loss and micro F1 of a round's classifier on the images it saw (I_t), from the stored logits."""
    reader = RoundReader(path)
    try:
        logits = np.stack([reader.logits(i) for i in ids]) if ids else np.zeros((0, dataset.num_classes))
    finally:
        reader.close()
    targets = np.zeros_like(logits)
    for row, image_id in enumerate(ids):
        for c in dataset.labels(image_id):
            targets[row, c - 1] = 1.0
    return classifier_quality(logits, targets)
