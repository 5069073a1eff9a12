"""Fuzzing the artifact reader: a mutated or truncated file reads whole or raises the tool's own error.

Never another exception, a crash or a hang. Each case runs in a child process (h5py's C library can
abort on some corruptions) with a deadline; a crash or a hang is reported with its case number, which
replays alone with ``python tests/reliability/fuzz_worker.py BASE WORKDIR SEED CASE CASE+1``.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("fuzz_worker.py")
SEED = 20240
CASES = 400
# Per case; generous because 8 engineers share two cores. A clean read of this file takes milliseconds.
DEADLINE_S = 30.0


def _pump(proc: subprocess.Popen, lines: queue.Queue[str]) -> None:
    """Forward the worker's lines to a queue (so the parent can wait with a deadline); "" at its end."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)
    lines.put("")


def run_cases(base: Path, workdir: Path, seed: int, cases: int) -> dict[int, str]:
    """Outcome of every case: ``ok``, ``wsss <message>``, ``other ...``, ``crash ...`` or ``hang``."""
    results: dict[int, str] = {}
    next_case = 0
    while next_case < cases:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(base), str(workdir), str(seed), str(next_case), str(cases)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(proc, lines))
        reader.start()
        current: int | None = None
        while True:
            try:
                line = lines.get(timeout=DEADLINE_S)
            except queue.Empty:
                proc.kill()
                results[current if current is not None else next_case] = "hang"
                break
            if not line:  # the worker exited
                code = proc.wait()
                if current is not None and current not in results:
                    results[current] = f"crash (exit code {code})"
                elif code != 0:
                    results[next_case] = f"crash before the first case (exit code {code})"
                break
            word, number, *rest = line.rstrip("\n").split(" ", 2)
            current = int(number)
            if word == "done":
                results[current] = rest[0] if rest else ""
        proc.wait()
        reader.join()
        next_case = max(results) + 1 if results else cases
    return results


@pytest.mark.parametrize("kind", ["scores", "model"])
def test_every_mutation_reads_exactly_or_raises_the_tools_error(kind: str, tmp_path: Path, request) -> None:
    """Each case reads back exactly the original values, or raises a WsssError; nothing else."""
    make = request.getfixturevalue("make_" + kind)
    base = make(tmp_path / f"{kind}.h5")
    workdir = tmp_path / "cases"
    workdir.mkdir()
    cases = CASES if kind == "scores" else CASES // 2
    results = run_cases(base, workdir, SEED, cases)
    assert sorted(results) == list(range(cases))
    bad = {case: outcome for case, outcome in results.items() if not outcome.startswith(("ok", "wsss "))}
    assert not bad, f"{len(bad)} of {cases} mutations escaped the reader: " + "; ".join(
        f"case {c}: {o}" for c, o in sorted(bad.items())[:10]
    )
    refused = [o for o in results.values() if o.startswith("wsss ")]
    # A fuzz that never reaches the reader's checks would prove nothing: many mutations must be caught.
    assert len(refused) > cases // 4


def test_worker_detects_a_crash(tmp_path: Path) -> None:
    """The harness itself: a worker that dies mid-case is reported as a crash, not as a pass."""
    base = tmp_path / "not-there.h5"  # read_bytes fails before any case: a crash before the first case
    results = run_cases(base, tmp_path, SEED, 3)
    assert results and all(o.startswith("crash") for o in results.values())


@pytest.mark.parametrize("case", [0, 1, 2, 3])
def test_unmutated_kinds_of_corruption_are_deterministic(case: int) -> None:
    """The same (seed, case) always gives the same corruption, so a failing case can be replayed."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from fuzz_worker import mutate
    finally:
        sys.path.remove(str(WORKER.parent))
    data = bytes(range(256)) * 40
    assert mutate(data, SEED, case) == mutate(data, SEED, case)
    assert mutate(data, SEED, case) != data
