"""Child process of the artifact-reader fuzz test (tests/reliability/test_fuzz_artifacts.py).

Runs mutation cases ``START..END`` of one seed against a valid artifact and prints, per case, a ``start``
line before reading and a ``done`` line with the outcome after, so the parent can tell a crash (the
process died after ``start``) or a hang (no ``done`` in time) from an outcome. Mutations are derived from
``(seed, case)`` alone, so any failing case replays on its own.

A case that reads must read exactly what the unmutated file holds: HDF5 checks nothing by default, so
without the writer's checksums a flipped bit would read as a wrong score, which is worse than an error.

Usage: python fuzz_worker.py BASE.h5 WORKDIR SEED START END
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from stages.common.artifacts import iter_records, load_model, open_artifact, read_provenance
from stages.common.errors import WsssError

EXPECTED_IDS = ("img0", "img1", "img2")  # tests/reliability/conftest.py IDS


def mutate(data: bytes, seed: int, case: int) -> bytes:
    """One corruption of ``data``: a truncation, flipped bits, or a run of random bytes."""
    rng = np.random.default_rng([seed, case])
    buf = bytearray(data)
    how = case % 4
    if how == 0:  # truncate anywhere, header included
        return bytes(buf[: int(rng.integers(0, len(buf)))])
    if how == 1:  # flip 1..8 single bits
        for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 9))):
            buf[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(buf)
    if how == 2:  # overwrite a run of 1..64 bytes with random bytes
        start = int(rng.integers(0, len(buf)))
        run = rng.integers(0, 256, size=int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
        buf[start : start + len(run)] = run[: len(buf) - start]
        return bytes(buf)
    # replace 1..4 random bytes in the first 4 KiB, where the superblock and root metadata live
    head = min(len(buf), 4096)
    for pos in rng.integers(0, head, size=int(rng.integers(1, 5))):
        buf[pos] = int(rng.integers(0, 256))
    return bytes(buf)


def read_everything(path: Path) -> list[np.ndarray]:
    """Every read a stage makes of an artifact, as a flat list of arrays to compare with the original.

    Per-image records are asked for by the ids the stage expects (as stages do, from the dataset), not by
    the ids the file lists, so a garbled id is a missing record, not a silently different image.
    """
    read_provenance(path)
    with open_artifact(path, kind=("scores", "model")) as art:
        kind = art.kind
        out = [np.asarray(art.fingerprint.encode()), np.asarray(json.dumps(art.metas()).encode())]
        if kind == "scores":
            for image_id in EXPECTED_IDS:
                values, classes, stride = art.scores(image_id)
                out += [values, np.asarray(classes), np.asarray(stride), art.labels(image_id)]
            for _key, _group in iter_records(art):
                pass
            _ = (len(art), art.ids())
    if kind == "model":
        model = load_model(path)
        out += [model.state_dict[k].numpy() for k in sorted(model.state_dict)]
        out.append(np.asarray(json.dumps(model.arch, sort_keys=True).encode()))
    return out


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    if len(a) != len(b):
        return False
    return all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def main() -> None:
    base, workdir, seed, start, end = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:6])
    data = base.read_bytes()
    expected = read_everything(base)
    for case in range(start, end):
        path = workdir / f"case{case}.h5"
        path.write_bytes(mutate(data, seed, case))
        print(f"start {case}", flush=True)
        try:
            outcome = "ok" if same(read_everything(path), expected) else "silently wrong values"
        except WsssError as exc:
            outcome = "wsss " + str(exc).replace("\n", " ")
        except Exception as exc:  # noqa: BLE001 - reporting any other exception is the point
            outcome = f"other {type(exc).__name__}: {exc}".replace("\n", " ")
        path.unlink()
        print(f"done {case} {outcome}", flush=True)


if __name__ == "__main__":
    main()
