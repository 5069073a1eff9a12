"""The artifact contract: atomic writing, resume after SIGKILL, and every refusal with its message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from stages.common.artifacts import (
    Provenance,
    begin,
    load_checkpoint,
    load_model,
    model_status,
    open_artifact,
    partial_path,
    save_checkpoint,
    save_model,
)
from stages.common.errors import ArtifactError, WsssError
from stages.common.lock import RunLock

DATASET = {
    "name": "toy",
    "root": "/x",
    "split": "train",
    "class_names": ["background", "a", "b"],
    "num_images": 3,
    "fingerprint": "d1",
}


def provenance(**config: object) -> Provenance:
    return Provenance(kind="scores", stage="test", config={"lr": 0.1, **config}, dataset=dict(DATASET))


def fake_scores(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return rng.random((2, 5, 7)).astype(np.float32)


def write_all(path: Path, prov: Provenance, ids: list[str]) -> None:
    status = begin(path, prov)
    assert status.writer is not None
    with status.writer as writer:
        for i, image_id in enumerate(ids):
            if not writer.done(image_id):
                writer.write_image(
                    image_id,
                    scores=fake_scores(i),
                    classes=(1, 2),
                    stride=4,
                    labels=np.full((20, 28), i, np.uint8),
                )
        writer.finish()


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cams.h5"
    write_all(path, provenance(), ["a", "b", "c"])
    assert path.exists() and not partial_path(path).exists()
    with open_artifact(path, kind="scores", dataset=DATASET) as art:
        assert art.ids() == ["a", "b", "c"]
        scores, classes, stride = art.scores("b")
        assert classes == (1, 2) and stride == 4
        np.testing.assert_allclose(scores, fake_scores(1), atol=1e-3)  # float16 storage
        full, _ = art.scores_full("b", (20, 28))
        assert full.shape == (2, 20, 28)
        assert (art.labels("c") == 2).all()
        assert art.h5["images/a/scores"].compression == "lzf"


def test_up_to_date_is_skipped_and_force_recomputes(tmp_path: Path) -> None:
    path = tmp_path / "cams.h5"
    write_all(path, provenance(), ["a"])
    assert begin(path, provenance()).up_to_date
    status = begin(path, provenance(), force=True)
    assert status.writer is not None
    status.writer.close()
    # Forcing never removed the old complete file before the new one is finished.
    assert open_artifact(path).ids() == ["a"]


def test_other_fingerprint_is_refused_naming_the_difference(tmp_path: Path) -> None:
    path = tmp_path / "cams.h5"
    write_all(path, provenance(), ["a"])
    with pytest.raises(
        ArtifactError, match=r"cams.h5: made with other settings \(--lr 0.1 -> 0.5\).*--force"
    ):
        begin(path, provenance(lr=0.5))


def test_reader_refusals(tmp_path: Path) -> None:
    path = tmp_path / "cams.h5"
    write_all(path, provenance(), ["a"])
    with pytest.raises(ArtifactError, match="a scores artifact from test, but a labels artifact is needed"):
        open_artifact(path, kind="labels")
    other = dict(DATASET, class_names=["background", "cat"])
    with pytest.raises(ArtifactError, match="made for classes"):
        open_artifact(path, dataset=other)
    with pytest.raises(ArtifactError, match="made for dataset 'toy'"):
        open_artifact(path, dataset=dict(DATASET, name="voc"))
    with pytest.raises(ArtifactError, match="a partial artifact"):
        open_artifact(partial_path(path))
    with pytest.raises(ArtifactError, match="not found"):
        open_artifact(tmp_path / "missing.h5")


def test_incomplete_partial_is_never_read(tmp_path: Path) -> None:
    path = tmp_path / "cams.h5"
    status = begin(path, provenance())
    status.writer.write_image("a", scores=fake_scores(0), classes=(1, 2), stride=4)
    status.writer.close()
    with pytest.raises(ArtifactError, match=r"not finished \(only cams.h5.partial exists\)"):
        open_artifact(path)
    # Even renamed by hand, the missing `complete` flag is caught.
    os.replace(partial_path(path), path)
    with pytest.raises(ArtifactError, match="incomplete artifact"):
        open_artifact(path)


@pytest.mark.parametrize("damage", ["truncate", "zero", "garbage"])
def test_corrupt_files_are_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "cams.h5"
    write_all(path, provenance(), ["a", "b"])
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "zero": b"", "garbage": b"x" * 4096}[damage])
    with pytest.raises(ArtifactError, match="not a readable HDF5 file") as info:
        open_artifact(path)
    assert "\n" not in str(info.value)


def test_not_a_wsss_file_and_old_format(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as h5:
        h5["a"] = 1
    with pytest.raises(ArtifactError, match="not a wsss artifact"):
        open_artifact(path)
    with pytest.raises(ArtifactError, match="exists but is not a readable wsss artifact"):
        begin(path, provenance())
    old = tmp_path / "old.h5"
    write_all(old, provenance(), ["a"])
    with h5py.File(old, "a") as h5:
        h5.attrs["wsss_format"] = 0
    with pytest.raises(ArtifactError, match="artifact format 0"):
        open_artifact(old)


def test_nan_scores_are_refused_at_write(tmp_path: Path) -> None:
    status = begin(tmp_path / "cams.h5", provenance())
    bad = fake_scores(0)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        status.writer.write_image("a", scores=bad, classes=(1, 2), stride=4)
    status.writer.close()


def test_unreadable_partial_is_discarded_and_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "cams.h5"
    partial_path(path).write_bytes(b"\x89HDF\r\n" + b"\0" * 100)
    status = begin(path, provenance())
    assert "discarded unreadable" in status.note
    status.writer.close()


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_artifacts import provenance, fake_scores
    from stages.common.artifacts import begin
    from pathlib import Path
    status = begin(Path({path!r}), provenance())
    with status.writer as writer:
        for i in range(12):
            image_id = f"img{{i:02d}}"
            if writer.done(image_id):
                continue
            writer.write_image(image_id, scores=fake_scores(i), classes=(1, 2), stride=4,
                               labels=np.full((20, 28), i, np.uint8))
            writer.flush()
            print(image_id, flush=True)
            time.sleep(0.05)
        writer.finish()
    """
)


def test_sigkill_mid_write_resumes_to_the_same_artifact(tmp_path: Path) -> None:
    path = tmp_path / "killed" / "cams.h5"
    script = CHILD.format(tests=str(Path(__file__).parent), path=str(path))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    for _ in range(5):
        child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not path.exists() and partial_path(path).exists()
    status = begin(path, provenance())
    assert status.resumed >= 5
    status.writer.close()
    subprocess.run([sys.executable, "-c", script], check=True, env=env, stdout=subprocess.DEVNULL)
    one_go = tmp_path / "one" / "cams.h5"
    write_all(one_go, provenance(), [f"img{i:02d}" for i in range(12)])
    with open_artifact(path) as a, open_artifact(one_go) as b:
        assert a.ids() == b.ids()
        assert a.fingerprint == b.fingerprint
        for image_id in a.ids():
            np.testing.assert_array_equal(a.scores(image_id)[0], b.scores(image_id)[0])
            np.testing.assert_array_equal(a.labels(image_id), b.labels(image_id))


def model_provenance(epochs: int = 2) -> Provenance:
    return Provenance(kind="model", stage="train-cls", config={"epochs": epochs}, dataset=dict(DATASET))


def test_model_checkpoint_and_final(tmp_path: Path) -> None:
    path = tmp_path / "cls.h5"
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert load_checkpoint(path, model_provenance()) is None
    save_checkpoint(
        path,
        model_provenance(),
        net.state_dict(),
        {"name": "linear"},
        {"epoch": 1, "step": 7, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()},
    )
    ckpt = load_checkpoint(path, model_provenance())
    assert ckpt.train_state["epoch"] == 1 and ckpt.train_state["step"] == 7
    assert torch.equal(ckpt.train_state["rng"], torch.get_rng_state())
    opt2 = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt.train_state["optimizer"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )
    with pytest.raises(ArtifactError, match="interrupted training with other settings"):
        load_checkpoint(path, model_provenance(epochs=3))
    with pytest.raises(ArtifactError, match=r"not finished \(only cls.h5.partial exists\)"):
        load_model(path)
    save_model(path, model_provenance(), net.state_dict(), {"name": "linear"})
    assert not partial_path(path).exists()
    model = load_model(path, dataset=DATASET)
    assert torch.equal(model.state_dict["weight"], net.weight.detach())
    assert model.arch == {"name": "linear"}
    assert model_status(path, model_provenance())
    with pytest.raises(ArtifactError, match="--epochs 2 -> 3"):
        model_status(path, model_provenance(epochs=3))


def test_second_writer_is_refused_by_the_lock(tmp_path: Path) -> None:
    with RunLock(tmp_path, "train-cls"):
        with pytest.raises(WsssError, match="another wsss process is writing here"):
            with RunLock(tmp_path, "crf"):
                pass
    with RunLock(tmp_path, "crf"):  # released: a new writer is fine
        pass
