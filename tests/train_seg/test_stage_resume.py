"""train-seg's multi-round and interrupted runs: PSL++, a killed training, a killed prediction.

Labels here are the masks themselves (``--labels gt`` or a labels artifact copied from them): what is
tested is the bookkeeping, which does not depend on how good the labels are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.common.artifacts import Provenance, begin, load_model, open_artifact, partial_path
from stages.common.context import RunOptions
from stages.common.datasets import open_dataset
from stages.common.training import CheckpointedTraining
from stages.train_seg import predict as predict_module
from stages.train_seg.predict import PredictConfig, predict
from stages.train_seg.stage import TrainSegConfig, run

pytestmark = pytest.mark.slow

TINY = {"epochs": 1, "crop_size": 64, "batch_size": 8, "scales": (1.0,)}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, more threads on tiny inputs only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_opts(tmp_path: Path, toy_root: Path, name: str = "run") -> RunOptions:
    return RunOptions(run_dir=tmp_path / name, data=f"toy:{toy_root}", device="cpu", quiet=True)


def masks_as_seeds(opts: RunOptions) -> Path:
    """RUN/seeds.h5 holding the train masks (void kept as 255)."""
    dataset = opts.dataset
    provenance = Provenance(kind="labels", stage="mine-ae", config={}, dataset=dataset.describe("train"))
    status = begin(opts.path("seeds.h5"), provenance)
    assert status.writer is not None
    with status.writer as writer:
        for image_id in dataset.ids("train"):
            writer.write_image(image_id, labels=dataset.mask(image_id))
        return writer.finish()


def test_psl_plus_plus_retrains_on_its_own_predictions(tmp_path: Path, toy_root: Path) -> None:
    opts = make_opts(tmp_path, toy_root)
    masks_as_seeds(opts)
    summary = run(opts, TrainSegConfig(loss="psl", labels="seeds", psl_rounds=2, crf=False, **TINY))
    names = [p.name for p in summary.artifacts]
    assert names == ["seg_psl_r1.h5", "pred_train_r1.h5", "seg.h5", "pred_val.h5"]
    final = load_model(opts.path("seg.h5"))
    assert final.provenance.inputs["labels"]["path"].endswith("pred_train_r1.h5")
    with open_artifact(opts.path("pred_train_r1.h5")) as round_one:
        dataset = opts.dataset
        for image_id in round_one.ids():  # restricted to each training image's own classes
            present = set(np.unique(round_one.labels(image_id)).tolist()) - {0}
            assert present <= set(dataset.labels(image_id))


def test_killed_training_resumes_to_the_same_weights(
    tmp_path: Path, toy_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = TrainSegConfig(**{**TINY, "epochs": 2, "predict": False, "labels": "gt"})
    straight = make_opts(tmp_path, toy_root, "straight")
    run(straight, cfg)

    opts = make_opts(tmp_path, toy_root, "killed")
    original = CheckpointedTraining.end_epoch

    def die_after_first_checkpoint(self: CheckpointedTraining, metrics: dict) -> None:
        original(self, metrics)
        raise KeyboardInterrupt  # as if killed right after epoch 1 was saved

    monkeypatch.setattr(CheckpointedTraining, "end_epoch", die_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(opts, cfg)
    assert partial_path(opts.path("seg_gt.h5")).exists() and not opts.path("seg_gt.h5").exists()
    monkeypatch.setattr(CheckpointedTraining, "end_epoch", original)
    summary = run(opts, cfg)
    assert "resumed seg_gt.h5 after epoch 1" in summary.notes
    assert [row["epoch"] for row in summary.tables["training"]] == [2]
    resumed, reference = load_model(opts.path("seg_gt.h5")), load_model(straight.path("seg_gt.h5"))
    for key, value in reference.state_dict.items():
        assert torch.allclose(resumed.state_dict[key].float(), value.float(), atol=1e-6), key


def test_killed_prediction_resumes_image_by_image(
    tmp_path: Path, toy_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = make_opts(tmp_path, toy_root)
    run(opts, TrainSegConfig(**{**TINY, "predict": False, "labels": "gt"}))
    cfg = PredictConfig(model=opts.path("seg_gt.h5"), scales=(1.0,), crf=False)
    original = predict_module._predict_one
    calls = {"n": 0}

    def die_on_fourth(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(predict_module, "_predict_one", die_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        predict(opts, cfg)
    monkeypatch.setattr(predict_module, "_predict_one", original)
    summary = predict(opts, cfg)
    assert summary.status == "resumed" and "3 images already done" in summary.notes[0]
    with open_artifact(opts.path("pred_val.h5")) as pred:
        assert len(pred) == len(open_dataset(f"toy:{toy_root}").ids("val"))
    assert predict(opts, cfg).status == "up to date"
