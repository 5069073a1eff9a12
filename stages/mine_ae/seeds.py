"""mine-ae's outputs: the fused CAM (``cams.h5``), the seeds (``seeds.h5``) and the per-round report.

One pass over the images reads every round's records, writes the kept rounds' fused CAM and seeds
(resumable image by image), and scores each round's seeds-so-far against the ground truth when the
split has masks: that is how a user sees what each erasing round added.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from stages.common.artifacts import Provenance, begin, open_artifact
from stages.common.cam import CAM_STRIDE
from stages.common.context import RunOptions
from stages.common.errors import DatasetError
from stages.common.metrics import ConfusionAccumulator
from stages.common.progress import track
from stages.common.summary import Summary
from stages.mine_ae.erasing import merge_saliency_components, seeds_from_mined, seeds_with_saliency
from stages.mine_ae.rounds import RoundReader, class_dict, fuse_scores

if TYPE_CHECKING:
    from stages.mine_ae.stage import MineAeConfig, RoundOutcome

STAGE = "mine-ae"


def read_saliency(folder: Path, image_id: str, size: tuple[int, int]) -> np.ndarray:
    """float32 (H, W) in [0, 1] from ``folder/<image_id>.png`` (8-bit grayscale, 255 = salient)."""
    path = Path(folder) / f"{image_id}.png"
    try:
        with Image.open(path) as img:
            values = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DatasetError(f"{path}: saliency map not found; --saliency needs one PNG per image id") from None
    except OSError as exc:
        raise DatasetError(
            f"{path}: cannot decode saliency map ({exc}); re-save it as a grayscale PNG"
        ) from exc
    if values.shape != tuple(size):
        raise DatasetError(
            f"{path}: saliency map is {values.shape[0]}x{values.shape[1]} but the image is "
            f"{size[0]}x{size[1]}; "
            "save it at the image's size"
        )
    return values


def make_seeds(
    classes: Sequence[int],
    union: np.ndarray,
    low: np.ndarray,
    saliency: np.ndarray | None,
    merge: str,
    saliency_bg_thr: float,
) -> np.ndarray:
    """Seeds (H, W) uint8 of METHODS.md §2 from F_c (K, H, W) and the low-CAM mask, optionally saliency."""
    mined = class_dict(tuple(classes), union)
    if saliency is None:
        return seeds_from_mined(mined, low)
    seeds = seeds_with_saliency(mined, saliency, bg_thr=saliency_bg_thr)
    if merge == "components":
        seeds = merge_saliency_components(seeds, saliency, bg_thr=saliency_bg_thr)
    return seeds


class RoundStats:
    """Mined and erased area of a round, and its seeds-so-far against the ground truth."""

    def __init__(self, num_classes: int) -> None:
        self.mined = 0
        self.erased = 0
        self.pixels = 0
        self.confusion = ConfusionAccumulator(num_classes)

    def update(
        self, mined: np.ndarray, union: np.ndarray, seeds: np.ndarray | None, gt: np.ndarray | None
    ) -> None:
        self.pixels += union.shape[1] * union.shape[2]
        if union.shape[0]:
            self.mined += int(mined.any(axis=0).sum())
            self.erased += int(union.any(axis=0).sum())
        if seeds is not None and gt is not None:
            self.confusion.update(seeds, gt)


def write_outputs(
    opts: RunOptions,
    cfg: MineAeConfig,
    record: dict[str, Any],
    described: dict[str, Any],
    ids: list[str],
    outcomes: list[RoundOutcome],
    kept: list[RoundOutcome],
    seed_fields: Sequence[str],
) -> Summary:
    """Write cams.h5 and seeds.h5 from the kept rounds; the report covers every round computed."""
    dataset = opts.dataset
    inputs = {}
    for outcome in kept:
        with open_artifact(outcome.path, kind="scores", dataset=described) as art:
            inputs[f"round{outcome.round}"] = art.ref()
    cams_config = {k: v for k, v in record.items() if k not in seed_fields}
    cams_config["fusion"] = (
        "round 1 + later rounds where mined"  # a cams.h5 of the old whole-map max is stale
    )
    cams_path, seeds_path = opts.path("cams.h5"), opts.path("seeds.h5")
    cams_status = begin(
        cams_path, Provenance("scores", STAGE, cams_config, inputs, described), force=opts.force
    )
    seeds_status = begin(seeds_path, Provenance("labels", STAGE, record, inputs, described), force=opts.force)
    if cams_status.up_to_date and seeds_status.up_to_date:
        with open_artifact(cams_path, kind="scores") as art:
            rows = art.meta("rounds", [])
        return _summary("up to date", cams_path, seeds_path, ids, rows, [cams_status.note])
    writers = [w for w in (cams_status.writer, seeds_status.writer) if w is not None]
    try:
        stats = _write_images(opts, cfg, ids, outcomes, kept, cams_status.writer, seeds_status.writer)
        rows = _rows(outcomes, kept, stats, dataset.class_names, has_gt=dataset.has_masks(described["split"]))
        for writer in writers:
            writer.set_meta("rounds", rows)
            writer.finish()
    finally:
        for writer in writers:
            writer.close()
    notes = [s.note for s in (cams_status, seeds_status) if s.note]
    return _summary("made", cams_path, seeds_path, ids, rows, notes)


def _write_images(
    opts: RunOptions,
    cfg: MineAeConfig,
    ids: list[str],
    outcomes: list[RoundOutcome],
    kept: list[RoundOutcome],
    cams_writer: Any,
    seeds_writer: Any,
) -> list[RoundStats]:
    dataset = opts.dataset
    split_has_gt = dataset.has_masks((cams_writer or seeds_writer).provenance.dataset["split"])
    readers = [RoundReader(o.path) for o in outcomes]
    last_kept = len(kept) - 1
    stats = [RoundStats(dataset.num_classes + 1) for _ in outcomes]
    try:
        for image_id in track(ids, total=len(ids), description="mine-ae seeds", quiet=opts.quiet):
            classes = dataset.labels(image_id)
            gt = dataset.mask(image_id) if split_has_gt else None
            saliency = None
            if cfg.saliency is not None:
                saliency = read_saliency(cfg.saliency, image_id, dataset.image_size(image_id))
            final_seeds = None
            mined = [reader.mined(image_id) for reader in readers]
            for index, reader in enumerate(readers):
                union = reader.union(image_id)
                need = gt is not None or index == last_kept
                seeds = (
                    make_seeds(
                        classes,
                        union,
                        reader.low(image_id),
                        saliency,
                        cfg.saliency_merge,
                        cfg.saliency_bg_thr,
                    )
                    if need
                    else None
                )
                stats[index].update(mined[index], union, seeds, gt)
                if index == last_kept:
                    final_seeds = seeds
            if cams_writer is not None and not cams_writer.done(image_id):
                fused = fuse_scores(
                    [readers[i].scores(image_id) for i in range(len(kept))],
                    mined[: len(kept)],
                )
                cams_writer.write_image(image_id, scores=fused, classes=tuple(classes), stride=CAM_STRIDE)
            if seeds_writer is not None and not seeds_writer.done(image_id):
                seeds_writer.write_image(image_id, labels=final_seeds)
    finally:
        for reader in readers:
            reader.close()
    return stats


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _rows(
    outcomes: list[RoundOutcome],
    kept: list[RoundOutcome],
    stats: list[RoundStats],
    class_names: Sequence[str],
    *,
    has_gt: bool,
) -> list[dict[str, Any]]:
    kept_rounds = {o.round for o in kept}
    rows = []
    for outcome, stat in zip(outcomes, stats, strict=True):
        row: dict[str, Any] = {
            "round": outcome.round,
            "classifier": outcome.classifier.name,
            "loss": outcome.quality["loss"],
            "F1": outcome.quality["f1"],
            "mined %": _percent(stat.mined, stat.pixels),
            "erased %": _percent(stat.erased, stat.pixels),
        }
        if has_gt:
            figures = stat.confusion.summary(class_names)
            row.update(
                {
                    "seed precision": figures["precision"],
                    "seed recall": figures["recall"],
                    "seed mIoU": figures["miou"],
                    "coverage %": figures["coverage"],
                }
            )
        row.update(
            {
                "train s": outcome.train_seconds,
                "CAM s": outcome.extract_seconds,
                "kept": "yes" if outcome.round in kept_rounds else "no (F1 < --stop-f1)",
            }
        )
        rows.append(row)
    return rows


def _summary(
    status: str,
    cams_path: Path,
    seeds_path: Path,
    ids: list[str],
    rows: list[dict[str, Any]],
    notes: list[str],
) -> Summary:
    kept = [r for r in rows if r.get("kept") == "yes"]
    figures: dict[str, Any] = {"rounds": len(rows), "kept": len(kept)}
    if kept and "seed mIoU" in kept[-1]:
        figures["seed mIoU"] = kept[-1]["seed mIoU"]
        figures["seed coverage %"] = kept[-1]["coverage %"]
    return Summary(
        STAGE,
        status=status,
        artifacts=[cams_path, seeds_path],
        images=len(ids),
        figures=figures,
        tables={"adversarial erasing rounds (seeds = union so far)": rows},
        notes=[n for n in notes if n],
    )
