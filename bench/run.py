"""`make bench`: speed and memory of the per-image stages and their algorithms on the toy dataset.

Every figure comes from its own child process (`bench/child.py`), one CPU thread each, so a stage's peak
memory is its own and 1 -> 2 processes measures processes, not threads. Printed as tables and written
as JSON to ``bench/results/``. What the figures mean, and the committed results, are in
docs/benchmarks.md.

    .venv/bin/python bench/run.py [--n 20] [--out bench/results/NAME.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

STAGES = ("cam", "pamr", "rs", "crf", "predict", "eval")
STAGE_TITLES = {
    "cam": "CAM extraction (mine-ae --rounds 1)",
    "pamr": "refine --method pamr",
    "rs": "refine --method rs",
    "crf": "crf",
    "predict": "predict (val, 2 scales + flip, CRF)",
    "eval": "eval",
}
WALK_MEMORY_SIDE = 128  # a 128x128 walk grid: a dense N×N float32 matrix would take 1 GiB


def child(job: dict[str, Any]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(HERE / "child.py"), json.dumps(job)], env=env, stdout=subprocess.PIPE, text=True
    )


def measure(job: dict[str, Any]) -> dict[str, Any]:
    return collect(child(job), job)


def collect(process: subprocess.Popen[str], job: dict[str, Any]) -> dict[str, Any]:
    out, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"bench: {job} failed (exit {process.returncode}); its error is above")
    return json.loads(out.strip().splitlines()[-1])


def prepare(work: Path, n: int) -> dict[int, dict[str, str]]:
    """Toy datasets of n and 4n images (train and val each) and the models the stages read."""
    from stages.common.datasets.toy import make_toy

    sizes: dict[int, dict[str, str]] = {}
    for count in (n, 4 * n):
        data = make_toy(work / f"data_{count}", seed=0, n_train=count, n_val=count)
        run = work / f"run_{count}"
        run.mkdir(parents=True, exist_ok=True)
        sizes[count] = {"data": str(data), "run": str(run)}
    # One classifier and one segmenter (1 epoch: speed does not depend on how well they learnt),
    # trained on the small set and read by both sizes (same toy classes, so the artifacts are accepted).
    first = sizes[n]
    measure({"mode": "setup", **first})
    for name in ("cls.h5", "seg_gt.h5"):
        shutil.copy(Path(first["run"]) / name, Path(sizes[4 * n]["run"]) / name)
    return sizes


def stage_rows(sizes: dict[int, dict[str, str]]) -> list[dict[str, Any]]:
    rows = []
    for stage in STAGES:
        for count, where in sizes.items():
            result = measure({"mode": "stage", "stage": stage, **where})
            rows.append(
                {
                    "stage": stage,
                    "images": count,
                    "seconds": result["seconds"],
                    "images_per_s": result["images"] / result["seconds"],
                    "peak_mb": result["peak_mb"],
                    "work_mb": result["peak_mb"] - result["base_mb"],
                    "written": result["images"],
                }
            )
    return rows


def growth(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Time and memory at 4n over n: linear time gives 4, flat memory gives 1."""
    out = []
    for stage in STAGES:
        small = next(r for r in rows if r["stage"] == stage and r["images"] == n)
        large = next(r for r in rows if r["stage"] == stage and r["images"] == 4 * n)
        out.append(
            {
                "stage": stage,
                "time_ratio": large["seconds"] / small["seconds"],
                "peak_ratio": large["peak_mb"] / small["peak_mb"],
            }
        )
    return out


def speedups(sizes: dict[int, dict[str, str]], n: int) -> list[dict[str, Any]]:
    """CAM extraction and crf on the 4n set with one process and with two."""
    where = sizes[4 * n]
    one = measure({"mode": "cam_part", "k": 0, "n": 1, **where})
    jobs = [{"mode": "cam_part", "k": k, "n": 2, **where} for k in range(2)]
    procs = [child(job) for job in jobs]  # launched together: both halves run at once
    halves = [collect(p, job) for p, job in zip(procs, jobs, strict=True)]
    two_seconds = max(h["end"] for h in halves) - min(h["start"] for h in halves)
    crf_one = measure({"mode": "stage", "stage": "crf", "workers": 1, **where})
    crf_two = measure({"mode": "stage", "stage": "crf", "workers": 2, **where})
    # The pool's gain on toy images (~15 ms of CRF each) is bounded by handing out work; on VOC-sized
    # images the CRF dominates, which is where a user runs it.
    large = voc_sized(Path(where["data"]).parent, n, sizes[n])
    measure({"mode": "stage", "stage": "cam", **large})  # setup: the scores the CRF reads
    measure({"mode": "stage", "stage": "pamr", **large})
    on_pamr = {"mode": "stage", "stage": "crf", "scores": "refined_pamr.h5", **large}
    large_one = measure({**on_pamr, "workers": 1})
    large_two = measure({**on_pamr, "workers": 2})
    return [
        {
            "stage": "cam",
            "images": 4 * n,
            "one_s": one["seconds"],
            "two_s": two_seconds,
            "speedup": one["seconds"] / two_seconds,
            "how": "2 processes, one half of the ids each",
        },
        {
            "stage": "crf",
            "images": 4 * n,
            "one_s": crf_one["seconds"],
            "two_s": crf_two["seconds"],
            "speedup": crf_one["seconds"] / crf_two["seconds"],
            "how": "crf --workers 2 (process pool)",
        },
        {
            "stage": "crf, 320-500 px images",
            "images": n,
            "one_s": large_one["seconds"],
            "two_s": large_two["seconds"],
            "speedup": large_one["seconds"] / large_two["seconds"],
            "how": "crf --workers 2 (process pool)",
        },
    ]


def voc_sized(work: Path, n: int, small: dict[str, str]) -> dict[str, str]:
    """n toy images at VOC's sizes (sides 320-500 px), with the small set's classifier."""
    from stages.common.datasets.toy import make_toy

    data = make_toy(work / "data_voc_sized", seed=1, n_train=n, n_val=1, min_size=320, max_size=500)
    run = work / "run_voc_sized"
    run.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(small["run"]) / "cls.h5", run / "cls.h5")
    return {"data": str(data), "run": str(run)}


def table(title: str, rows: list[dict[str, Any]], columns: dict[str, str]) -> Table:
    grid = Table(title=title, title_justify="left")
    for header in columns.values():
        grid.add_column(
            header, justify="right" if header not in ("stage", "algorithm", "input", "how") else "left"
        )
    for row in rows:
        grid.add_row(*[_cell(row[key]) for key in columns])
    return grid


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def render(results: dict[str, Any], console: Console) -> None:
    n = results["n"]
    console.print(
        table(
            f"Per-image stages on the toy dataset ({n} and {4 * n} images; 1 thread)",
            results["stages"],
            {
                "stage": "stage",
                "images": "images",
                "seconds": "s",
                "images_per_s": "images/s",
                "peak_mb": "peak MB",
                "work_mb": "MB above imports",
            },
        )
    )
    console.print(
        table(
            f"Growth from {n} to {4 * n} images (linear time: 4; flat memory: 1)",
            results["growth"],
            {"stage": "stage", "time_ratio": "time x", "peak_ratio": "peak memory x"},
        )
    )
    console.print(
        table(
            "1 -> 2 processes",
            results["speedups"],
            {
                "stage": "stage",
                "images": "images",
                "one_s": "1 process s",
                "two_s": "2 processes s",
                "speedup": "speed-up",
                "how": "how",
            },
        )
    )
    rates = results["rates"]
    console.print(_rates_table(rates))
    walk = results["walk_memory"]
    console.print(
        table(
            "Random walk memory",
            [walk],
            {
                "grid": "grid",
                "nnz": "stored entries",
                "work_mb": "measured peak MB",
                "dense_mb": "dense N×N MB",
            },
        )
    )
    console.print(
        table(
            "Vectorised against a per-pixel loop of the same maths",
            results["compare"],
            {
                "algorithm": "algorithm",
                "input": "input",
                "vectorised_s": "vectorised s",
                "loop_s": "loop s",
                "speedup": "x faster",
                "max_abs_diff": "max |diff|",
            },
        )
    )


def _rates_table(rates: dict[str, dict[str, float]]) -> Table:
    grid = Table(title="Seconds per megapixel of the grid they run on (1 thread)", title_justify="left")
    grid.add_column("algorithm")
    grid.add_column("grid")
    grid.add_column("s / MP", justify="right")
    for name, key in (
        ("pamr (6 dilations, 10 iterations, 3 maps)", "pamr_s_per_mp"),
        ("random walk (radius 5, 256 steps, 3 maps, D=64)", "walk_s_per_mp"),
    ):
        for side, value in rates[key].items():
            grid.add_row(name, f"{side}x{side}", _cell(value))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="the small size N (the large one is 4N)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path; default bench/results/DATE-HOST.json"
    )
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    console = Console(width=120)
    started = time.perf_counter()
    work = args.keep or Path(tempfile.mkdtemp(prefix="wsss-bench-"))
    try:
        console.print(f"bench: toy datasets of {args.n} and {4 * args.n} images in {work}")
        sizes = prepare(work, args.n)
        rows = stage_rows(sizes)
        walk = measure({"mode": "walk_memory", "side": WALK_MEMORY_SIDE})
        results: dict[str, Any] = {
            "n": args.n,
            "machine": {
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_average_at_start": os.getloadavg()[0],
            },
            "stages": rows,
            "growth": growth(rows, args.n),
            "speedups": speedups(sizes, args.n),
            "rates": {k: v for k, v in measure({"mode": "micro"}).items() if k.endswith("per_mp")},
            "walk_memory": {
                "grid": f"{WALK_MEMORY_SIDE}x{WALK_MEMORY_SIDE}",
                "nnz": walk["nnz"],
                "work_mb": walk["peak_mb"] - walk["base_mb"],
                "dense_mb": walk["dense_mb"],
            },
            "compare": measure({"mode": "compare"})["rows"],
        }
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    render(results, console)
    out = args.out or HERE / "results" / f"{datetime.date.today():%Y-%m-%d}-{platform.node()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    console.print(f"bench: {results['seconds']:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
