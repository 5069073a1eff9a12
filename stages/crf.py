"""`wsss crf`: refined probabilities (refined.h5) -> pseudo labels at full image size (pseudo.h5).

A dense CRF (Krähenbühl & Koltun, NeurIPS 2011) with PSA's kernels (Ahn & Kwak, CVPR 2018) runs on each
image's probabilities, upsampled to the image size, background included (METHODS.md §4). pydensecrf is
single-threaded, so images go to a process pool; the parent writes results in id order as they come,
so a killed run resumes image by image and any number of workers gives the same artifact.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from stages.common.artifacts import Artifact, Provenance, open_artifact
from stages.common.context import RunOptions, config_record, default_train_split
from stages.common.datasets import Dataset, open_dataset
from stages.common.densecrf import CrfParams, crf_labels, dense_crf
from stages.common.errors import ArtifactError, ConfigError
from stages.common.progress import track
from stages.common.shards import begin_sharded, stage_lock
from stages.common.summary import Summary

_PSA = CrfParams()


@dataclass
class CrfConfig:
    """Options of `wsss crf`; kernel defaults are PSA's (METHODS.md §4), `CrfParams.deeplab()` for outputs."""

    scores: Path | None = None  # any scores artifact with a background channel; None = RUN/refined.h5
    out: Path | None = None  # None = RUN/pseudo.h5
    split: str | None = None  # None = the dataset's training split
    # Kernel widths are in pixels of ~500 px VOC images (PSA); None = PSA's value scaled by the dataset's
    # median long side / 500 (capped at 1), so an 80 px bilateral kernel does not span a whole toy image.
    gaussian_sxy: float | None = None
    gaussian_compat: float = _PSA.gaussian_compat
    bilateral_sxy: float | None = None
    bilateral_srgb: float = _PSA.bilateral_srgb
    bilateral_compat: float = _PSA.bilateral_compat
    iterations: int = _PSA.iterations
    min_conf: float | None = None  # pixels whose CRF posterior max is below this become 255

    def params(self) -> CrfParams:
        """The kernel parameters; fields still at None (not resolved against a dataset) are PSA's."""
        values = {f.name: getattr(self, f.name) for f in fields(CrfParams)}
        return CrfParams(**{k: getattr(_PSA, k) if v is None else v for k, v in values.items()})


VOC_LONG_SIDE = 500  # the image size PSA's kernel widths were chosen for


def scaled_kernels(cfg: CrfConfig, dataset: Dataset, ids: Sequence[str], probe: int = 32) -> dict[str, float]:
    """PSA's spatial kernel widths scaled to the dataset's images, for the fields left at None (auto)."""
    picks = ids[:: max(1, len(ids) // probe)][:probe]
    scale = min(1.0, float(np.median([max(dataset.image_size(i)) for i in picks])) / VOC_LONG_SIDE)
    return {
        "gaussian_sxy": cfg.gaussian_sxy
        if cfg.gaussian_sxy is not None
        else max(1.0, _PSA.gaussian_sxy * scale),
        "bilateral_sxy": cfg.bilateral_sxy if cfg.bilateral_sxy is not None else _PSA.bilateral_sxy * scale,
    }


def crf_image(
    image: np.ndarray, probs: np.ndarray, classes: Sequence[int], params: CrfParams, min_conf: float | None
) -> np.ndarray:
    """Class-id labels (H, W) uint8 of one image: CRF on (K, H, W) probabilities whose channels are `classes`.

    Channel indices are mapped back to class ids; 255 (low confidence) stays 255.
    """
    keys = np.full(256, 255, dtype=np.uint8)
    keys[: len(classes)] = np.asarray(classes, dtype=np.uint8)
    return keys[crf_labels(dense_crf(image, probs, params), min_conf)]


# Per-worker state: each worker opens the dataset and the scores artifact itself, once.
_WORKER: dict[str, Any] = {}


def _init_worker(
    data: str, run_dir: str, scores_path: str, params: CrfParams, min_conf: float | None
) -> None:
    import torch

    torch.set_num_threads(1)  # upsampling only; the pool already uses every core
    _WORKER.update(
        dataset=open_dataset(data, cache_dir=Path(run_dir)),
        params=params,
        min_conf=min_conf,
        scores=open_artifact(scores_path),
    )


def _work(image_id: str) -> tuple[str, np.ndarray]:
    image = _WORKER["dataset"].image(image_id)
    probs, classes = _WORKER["scores"].scores_full(image_id, image.shape[:2])
    return image_id, crf_image(image, probs, classes, _WORKER["params"], _WORKER["min_conf"])


def _results(ids: list[str], workers: int, init_args: tuple[Any, ...]) -> Iterator[tuple[str, np.ndarray]]:
    """(id, labels) in id order; in-process for one worker, else an ordered pool fed in bounded chunks."""
    if workers <= 1:
        _init_worker(*init_args)
        try:
            yield from map(_work, ids)
        finally:
            _WORKER["scores"].close()
        return
    chunk = 4 * workers  # bounds the labels held in flight to a few per worker
    with pool_context().Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        for start in range(0, len(ids), chunk):
            yield from pool.imap(_work, ids[start : start + chunk])


def pool_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe, else spawn.

    A spawned worker imports torch and the CLI again, about 2 s each: on toy-sized images that start-up
    is longer than the whole CRF pass, and the pool ran slower than one process. Forked workers start at
    once. They open their own dataset and HDF5 handles in `_init_worker` and never touch the parent's,
    and they run torch with one thread, as DataLoader workers do. CUDA cannot survive a fork, so a parent
    that has initialised it (or a platform without fork) spawns.
    """
    import torch

    if "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def check_scores(scores: Artifact, ids: list[str]) -> None:
    """Refuse scores without a background channel or without some of the images."""
    missing = [i for i in ids if i not in scores]
    if missing:
        raise ArtifactError(
            f"{scores.path}: no record for {len(missing)} of the {len(ids)} images (e.g. {missing[0]!r}); "
            "rerun the stage that made it on this split or pass --split"
        )
    _, classes, _ = scores.scores(ids[0])
    if not classes or classes[0] != 0:
        raise ArtifactError(
            f"{scores.path}: its channels {list(classes)} have no background channel first; the CRF needs "
            "probabilities with background: run `wsss refine` and pass refined.h5 with --scores"
        )


def run(opts: RunOptions, cfg: CrfConfig) -> Summary:
    """Dense CRF of every image's probabilities into RUN/pseudo.h5 (resumable image by image)."""
    started = time.perf_counter()
    if cfg.min_conf is not None and not 0.0 < cfg.min_conf <= 1.0:
        raise ConfigError(f"--min-conf {cfg.min_conf}: must be in (0, 1]")
    dataset = opts.dataset
    split = cfg.split or default_train_split(dataset)
    ids = dataset.ids(split)
    cfg = CrfConfig(**{**cfg.__dict__, "split": split, **scaled_kernels(cfg, dataset, ids)})
    described = dataset.describe(split)
    scores_path = Path(cfg.scores or opts.path("refined.h5"))
    out = Path(cfg.out or opts.path("pseudo.h5"))
    with stage_lock(opts, "crf"):
        with open_artifact(scores_path, kind="scores", dataset=described) as scores:
            check_scores(scores, ids)
            record = {k: v for k, v in config_record(cfg, opts).items() if k not in ("scores", "out")}
            provenance = Provenance("labels", "crf", record, {"scores": scores.ref()}, described)
        status = begin_sharded(out, provenance, ids, opts)
        if status.up_to_date:
            seconds = time.perf_counter() - started
            return Summary("crf", "up to date", [status.path], seconds, notes=[status.note])
        assert status.writer is not None
        with status.writer as writer:
            todo = [i for i in status.ids if not writer.done(i)]
            init_args = (opts.data, str(opts.run_dir), str(scores_path), cfg.params(), cfg.min_conf)
            unsure = pixels = 0
            results = _results(todo, opts.num_workers, init_args)
            for image_id, labels in track(results, total=len(todo), description="crf", quiet=opts.quiet):
                writer.write_image(image_id, labels=labels)
                unsure += int((labels == 255).sum())
                pixels += labels.size
            writer.finish()
        status.complete()
    seconds = time.perf_counter() - started
    figures = {"unsure %": 100.0 * unsure / max(pixels, 1)} if cfg.min_conf is not None else {}
    notes = [status.note] if status.note else []
    return Summary(
        "crf",
        "resumed" if status.resumed else "made",
        [status.path],
        seconds,
        images=len(todo),
        figures=figures,
        notes=notes + [f"{min(opts.num_workers, max(len(todo), 1))} worker processes"],
    )
