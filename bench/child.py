"""One measurement of `make bench`, in its own process so its peak memory is its own.

Usage: ``python bench/child.py '{"mode": ..., ...}'``; prints one JSON line: the mode's figures plus
``seconds`` (the measured work only, imports and setup excluded), ``peak_mb`` (the process's
``ru_maxrss``, including worker processes it waited for) and ``base_mb`` (``ru_maxrss`` before the work,
so ``peak_mb - base_mb`` is what the work itself added on top of torch and the interpreter).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages.common.context import RunOptions  # noqa: E402


def _maxrss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0  # Linux reports kilobytes


def _opts(job: dict[str, Any]) -> RunOptions:
    return RunOptions(
        run_dir=Path(job["run"]),
        data=f"toy:{job['data']}",
        device="cpu",
        workers=job.get("workers", 1),
        quiet=True,
        seed=0,
        force=job.get("force", True),
    )


# ---------------------------------------------------------------------------------------------------------
# Setup (not measured): the models the measured stages read


def setup(job: dict[str, Any]) -> dict[str, Any]:
    from stages import train_cls
    from stages.train_seg import stage as train_seg

    opts = _opts(job)
    train_cls.run(opts, train_cls.TrainClsConfig(epochs=1, batch_size=4, val_split="none"))
    train_seg.run(opts, train_seg.TrainSegConfig(labels="gt", epochs=1, batch_size=4, predict=False))
    return {}


# ---------------------------------------------------------------------------------------------------------
# Stages


def stage(job: dict[str, Any]) -> Callable[[], int]:
    """The measured call of one stage; returns the number of images it processed."""
    from stages import crf, evaluate
    from stages.mine_ae import stage as mine_ae
    from stages.refine import stage as refine
    from stages.train_seg.predict import PredictConfig, predict

    opts = _opts(job)
    run = Path(job["run"])
    name = job["stage"]
    if name == "cam":
        return lambda: mine_ae.run(opts, mine_ae.MineAeConfig(rounds=1)).images or _count(run / "cams.h5")
    if name in ("pamr", "rs"):
        out = run / f"refined_{name}.h5"
        return lambda: refine.run(opts, refine.RefineConfig(method=name, out=out)).images
    if name == "crf":
        out = run / f"pseudo_w{opts.workers}.h5"
        scores = run / job.get("scores", "refined_rs.h5")
        return lambda: crf.run(opts, crf.CrfConfig(scores=scores, out=out)).images
    if name == "predict":
        cfg = PredictConfig(model=run / "seg_gt.h5", split="val", scales=(1.0, 1.5))
        return lambda: _count(predict(opts, cfg).artifacts[0])
    if name == "eval":
        cfg = evaluate.EvalConfig(artifacts=(run / "pseudo_w1.h5",), out=run / "eval_bench.h5")
        return lambda: _count(run / "pseudo_w1.h5") if evaluate.run(opts, cfg) else 0
    raise SystemExit(f"unknown stage {name!r}")


def _count(path: Path) -> int:
    from stages.common.artifacts import open_artifact

    with open_artifact(path) as art:
        return len(art)


def cam_part(job: dict[str, Any]) -> Callable[[], int]:
    """CAM extraction of one classifier on the k-th of n slices of the images (IRN's 4 scales + flips)."""
    from stages.common.artifacts import Provenance, begin
    from stages.common.distributed import shard
    from stages.mine_ae.extract import CamRecipe, extract_cams, prepare_model
    from stages.train_cls import load_classifier

    opts = _opts(job)
    dataset = opts.dataset
    described = dataset.describe("train")
    model = prepare_model(load_classifier(Path(job["run"]) / "cls.h5", described, "cpu"), torch.device("cpu"))
    ids = shard(dataset.ids("train"), job["k"], job["n"])
    out = Path(job["run"]) / f"cams_part{job['k']}of{job['n']}.h5"
    status = begin(
        out, Provenance("scores", "bench", {"k": job["k"], "n": job["n"]}, {}, described), force=True
    )

    def work() -> int:
        assert status.writer is not None
        with status.writer as writer:
            extract_cams(
                model, dataset.image, [(i, dataset.labels(i)) for i in ids], CamRecipe(), writer=writer
            )
            writer.finish()
        return len(ids)

    return work


# ---------------------------------------------------------------------------------------------------------
# Algorithms


def micro(job: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """PAMR and random-walk seconds per megapixel at two sizes (linear: equal figures)."""
    from stages.refine.pamr import pamr
    from stages.refine.random_walk import neighbour_offsets, pair_affinity, random_walk, transition_matrix

    def pamr_rate(side: int) -> float:
        generator = torch.Generator().manual_seed(0)
        image = torch.rand(1, 3, side, side, generator=generator) * 255
        masks = torch.rand(1, 3, side, side, generator=generator)
        tick = time.perf_counter()
        pamr(image, masks)
        return (time.perf_counter() - tick) / (side * side / 1e6)

    def walk_rate(side: int) -> float:
        generator = torch.Generator().manual_seed(0)
        embedding = torch.rand(1, 64, side, side, generator=generator)
        seeds = torch.rand(3, side, side, generator=generator)
        tick = time.perf_counter()
        affinity = pair_affinity(embedding, 5)[0]
        random_walk(transition_matrix(affinity, neighbour_offsets(5)), seeds)
        return (time.perf_counter() - tick) / (side * side / 1e6)

    def work() -> dict[str, Any]:
        return {
            "pamr_s_per_mp": {str(s): pamr_rate(s) for s in (128, 256)},
            "walk_s_per_mp": {str(s): walk_rate(s) for s in (32, 64)},
        }

    return work


def walk_memory(job: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """The random walk's peak memory on one side×side grid against a dense N×N float32 matrix."""
    from stages.refine.random_walk import neighbour_offsets, pair_affinity, random_walk, transition_matrix

    side = int(job["side"])
    generator = torch.Generator().manual_seed(0)
    embedding = torch.rand(1, 64, side, side, generator=generator)
    seeds = torch.rand(3, side, side, generator=generator)

    def work() -> dict[str, Any]:
        affinity = pair_affinity(embedding, 5)[0]
        transition = transition_matrix(affinity, neighbour_offsets(5))
        random_walk(transition, seeds, steps=32)
        pixels = side * side
        return {"pixels": pixels, "nnz": int(transition._nnz()), "dense_mb": pixels * pixels * 4 / 2**20}

    return work


def compare(job: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """Each vectorised algorithm against its per-pixel loop (bench/loops.py): seconds and max |diff|."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import loops

    from stages.common.metrics import confusion_matrix
    from stages.refine.pamr import pamr
    from stages.refine.random_walk import neighbour_offsets, random_walk, transition_matrix
    from stages.train_seg.losses import region_grow

    rng = np.random.default_rng(0)

    def timed(fn: Callable[[], Any], repeat: int = 1) -> tuple[Any, float]:
        tick = time.perf_counter()
        for _ in range(repeat):
            out = fn()
        return out, (time.perf_counter() - tick) / repeat

    def row(name: str, size: str, vec: Callable[[], Any], loop: Callable[[], Any]) -> dict[str, Any]:
        fast, fast_s = timed(vec, repeat=5)
        slow, slow_s = timed(loop)
        diff = float(np.abs(np.asarray(fast, dtype=np.float64) - np.asarray(slow, dtype=np.float64)).max())
        return {
            "algorithm": name,
            "input": size,
            "vectorised_s": fast_s,
            "loop_s": slow_s,
            "speedup": slow_s / fast_s,
            "max_abs_diff": diff,
        }

    image = rng.uniform(0, 255, (3, 16, 16))
    masks = rng.uniform(0, 1, (3, 16, 16))
    dil, its = (1, 2, 4), 3

    def pamr_vec() -> np.ndarray:
        return pamr(torch.from_numpy(image)[None], torch.from_numpy(masks)[None], dil, its)[0].numpy()

    probs = rng.dirichlet(np.ones(4) * 0.3, size=(32, 32)).transpose(2, 0, 1)
    seeds = np.full((32, 32), 255, dtype=np.uint8)
    seeds[rng.uniform(size=(32, 32)) < 0.05] = 0
    seeds[rng.uniform(size=(32, 32)) < 0.03] = 1
    seeds[rng.uniform(size=(32, 32)) < 0.03] = 3

    gt = rng.integers(0, 21, (128, 128)).astype(np.uint8)
    gt[rng.uniform(size=gt.shape) < 0.05] = 255
    pred = rng.integers(0, 21, (128, 128)).astype(np.uint8)

    offsets = neighbour_offsets(3)
    aff = rng.uniform(0.5, 1.0, (len(offsets), 12, 12))
    walk_seeds = rng.uniform(0, 1, (3, 12, 12))

    def walk_vec() -> np.ndarray:
        transition = transition_matrix(torch.from_numpy(aff), offsets, beta=10)
        return random_walk(transition, torch.from_numpy(walk_seeds), steps=16).numpy()

    def work() -> dict[str, Any]:
        return {
            "rows": [
                row(
                    "pamr",
                    "16x16, 3 masks, dilations 1,2,4, 3 iterations",
                    pamr_vec,
                    lambda: loops.pamr_loop(image, masks, dil, its),
                ),
                row(
                    "region_grow",
                    "32x32, 3 classes",
                    lambda: region_grow(probs, seeds, (1, 3), 0.5, 0.6),
                    lambda: loops.region_grow_loop(probs, seeds, (1, 3), 0.5, 0.6),
                ),
                row(
                    "confusion matrix",
                    "128x128, 21 classes",
                    lambda: confusion_matrix(pred, gt, 21),
                    lambda: loops.confusion_loop(pred, gt, 21),
                ),
                row(
                    "random walk",
                    "12x12 grid, radius 3, 16 steps",
                    walk_vec,
                    lambda: loops.random_walk_loop(aff, offsets, walk_seeds, 10, 16),
                ),
            ]
        }

    return work


MODES: dict[str, Callable[[dict[str, Any]], Callable[[], Any]]] = {
    "stage": stage,
    "cam_part": cam_part,
    "micro": micro,
    "walk_memory": walk_memory,
    "compare": compare,
}


def main() -> None:
    job = json.loads(sys.argv[1])
    torch.set_num_threads(1)  # one core per process, so 1 -> 2 processes measures the processes
    if job["mode"] == "setup":
        print(json.dumps(setup(job)))
        return
    work = MODES[job["mode"]](job)
    base = _maxrss_mb()
    started = time.time()
    tick = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - tick
    figures = result if isinstance(result, dict) else {"images": int(result)}
    print(
        json.dumps(
            {
                **figures,
                "seconds": seconds,
                "start": started,
                "end": started + seconds,
                "peak_mb": _maxrss_mb(),
                "base_mb": base,
            }
        )
    )


if __name__ == "__main__":
    main()
