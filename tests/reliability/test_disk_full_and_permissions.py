"""A full disk and a read-only run directory: one line for the user, and nothing complete is lost.

A full disk is simulated by making the write that would hit it raise ``OSError(ENOSPC)`` (the HDF5
dataset write, the flush, the final rename), and for real on a 256 KiB tmpfs when the tests run as root.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import typer

from stages.common import artifacts
from stages.common.artifacts import (
    Provenance,
    begin,
    load_checkpoint,
    open_artifact,
    partial_path,
    save_checkpoint,
)
from stages.common.errors import ArtifactError, WsssError
from stages.common.lock import RunLock
from wsss_cli.common import execute

IDS = ["img0", "img1", "img2"]


def disk_full(*_args: object, **_kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def fail_after(count: int, original):
    """``original`` working ``count`` times, then failing as a full disk would."""
    calls = {"n": 0}

    def wrapper(*args: object, **kwargs: object):
        calls["n"] += 1
        if calls["n"] > count:
            disk_full()
        return original(*args, **kwargs)

    return wrapper


def rewrite(path: Path, config: dict, make_scores) -> None:
    """A stage run writing ``path`` with ``config`` (``--force``), as the stages do."""
    prov = Provenance(kind="scores", stage="test", config=config, dataset=_dataset())
    status = begin(path, prov, force=True)
    assert status.writer is not None
    with status.writer as writer:
        for i, image_id in enumerate(IDS):
            if not writer.done(image_id):
                writer.write_image(image_id, scores=make_scores(i) + 1, classes=(1, 2), stride=4)
        writer.finish()


def _dataset() -> dict:
    return {
        "name": "toy",
        "root": "/data/toy",
        "split": "train",
        "class_names": ["background", "a", "b"],
        "num_images": 3,
        "fingerprint": "d1",
    }


def snapshot(path: Path) -> list[np.ndarray]:
    with open_artifact(path) as art:
        return [art.scores(i)[0] for i in IDS]


@pytest.mark.parametrize(
    "target",
    ["create_dataset", "flush", "replace"],
)
def test_full_disk_keeps_the_previous_artifact(target: str, artifact: Path, monkeypatch, capsys) -> None:
    before = snapshot(artifact)
    scores_of = lambda i: np.random.default_rng(i).random((2, 12, 12)).astype(np.float32)  # noqa: E731
    if target == "create_dataset":
        monkeypatch.setattr(h5py.Group, "create_dataset", fail_after(2, h5py.Group.create_dataset))
    elif target == "flush":
        monkeypatch.setattr(artifacts.ArtifactWriter, "flush", lambda self: disk_full())
        monkeypatch.setattr(h5py.File, "flush", disk_full)
    else:
        monkeypatch.setattr(artifacts.os, "replace", disk_full)
    with pytest.raises(typer.Exit) as exit_info:
        execute(lambda: rewrite(artifact, {"lr": 0.5}, scores_of))
    assert exit_info.value.exit_code == 2
    err = capsys.readouterr().err
    written = artifact if target == "replace" else partial_path(artifact)
    assert err.strip() == f"error: disk full while writing {written}; free space and rerun to resume"
    monkeypatch.undo()
    # The complete artifact is the previous one, whole and readable.
    for old, now in zip(before, snapshot(artifact), strict=True):
        np.testing.assert_array_equal(old, now)
    # Rerunning once space is free resumes (or restarts) and finishes the new artifact.
    rewrite(artifact, {"lr": 0.5}, scores_of)
    for i, now in enumerate(snapshot(artifact)):
        np.testing.assert_allclose(now, scores_of(i) + 1, atol=2e-3)
    assert not partial_path(artifact).exists()


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    path = tmp_path / "cls.h5"
    prov = Provenance(kind="model", stage="train-cls", config={"lr": 0.1}, dataset=_dataset())
    net = torch.nn.Linear(4, 3)
    save_checkpoint(path, prov, net.state_dict(), {"arch": "linear"}, {"epoch": 1, "step": 10})
    with torch.no_grad():
        net.weight.add_(1.0)
    monkeypatch.setattr(h5py.Group, "create_dataset", fail_after(1, h5py.Group.create_dataset))
    with pytest.raises(typer.Exit) as exit_info:
        execute(
            lambda: save_checkpoint(
                path, prov, net.state_dict(), {"arch": "linear"}, {"epoch": 2, "step": 20}
            )
        )
    monkeypatch.undo()
    assert exit_info.value.exit_code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: disk full while writing {partial_path(path)}; free space and rerun to resume"
    )
    kept = load_checkpoint(path, prov)
    assert kept is not None and kept.train_state["epoch"] == 1
    assert not torch.equal(kept.state_dict["weight"], net.weight)  # epoch 1's weights, not the new ones
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls.h5.partial"]  # no half-written .tmp left


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    return done.returncode == 0


FILL_DISK = """
import sys
from pathlib import Path
import numpy as np
from stages.common.artifacts import Provenance, begin
from stages.common.errors import ArtifactError
prov = Provenance(kind="scores", stage="test", config={}, dataset={"fingerprint": "d1"})
rng = np.random.default_rng(0)
try:
    status = begin(Path(sys.argv[1]) / "cams.h5", prov)
    with status.writer as writer:
        for i in range(1000):  # incompressible noise: ~4 KB per image, far beyond 256 KiB
            writer.write_image(f"i{i}", scores=rng.random((2, 32, 32)), classes=(1, 2), stride=4)
            writer.flush()
except ArtifactError as exc:
    print(exc, flush=True)
    sys.exit(2)
"""


@pytest.fixture(scope="module")
def really_full_disk(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    """A child process filling a 256 KiB tmpfs (HDF5 can crash at exit after ENOSPC: keep it outside)."""
    disk = tmp_path_factory.mktemp("full") / "disk"
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("needs root to mount a tiny tmpfs")
    try:
        return subprocess.run(
            [sys.executable, "-c", FILL_DISK, str(disk)], capture_output=True, text=True, timeout=120
        )
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_really_full_disk_says_so(really_full_disk: subprocess.CompletedProcess) -> None:
    """HDF5 reports ENOSPC only inside its message (errno unset), then fails to close: one line still."""
    assert really_full_disk.stdout.strip().startswith("disk full while writing ")
    assert really_full_disk.stdout.strip().endswith("cams.h5.partial; free space and rerun to resume")


@pytest.mark.xfail(strict=True, reason="HDF5 segfaults at interpreter exit after a failed close on ENOSPC")
def test_a_really_full_disk_exits_cleanly(really_full_disk: subprocess.CompletedProcess) -> None:
    assert really_full_disk.returncode == 2


def test_read_only_run_directory_is_refused_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """chmod 0o555 for ordinary users; as root (which ignores permissions) the refusal is simulated."""
    run = tmp_path / "run"
    run.mkdir()
    prov = Provenance(kind="scores", stage="test", config={}, dataset=_dataset())
    if os.geteuid() != 0:
        run.chmod(0o555)
    else:

        def refuse(*_args: object, **_kwargs: object) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr("stages.common.lock.os.open", refuse)
        real_file = h5py.File
        monkeypatch.setattr(
            artifacts.h5py,
            "File",
            lambda p, mode="r", **kw: refuse() if mode != "r" else real_file(p, mode, **kw),
        )
    try:
        with pytest.raises(WsssError) as lock_error:
            RunLock(run).__enter__()
        assert str(lock_error.value) == (
            f"{run}: run directory is not writable; fix its permissions or use another --run"
        )
        with pytest.raises(ArtifactError) as write_error:
            begin(run / "cams.h5", prov)
        assert str(write_error.value) == (
            f"{run / 'cams.h5.partial'}: permission denied; check the run directory's permissions"
        )
    finally:
        run.chmod(0o755)
