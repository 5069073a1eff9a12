"""train-seg end to end on the tiny toy data: every loss, the supervised bound, resume, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from stages.common.artifacts import Provenance, begin, load_model, open_artifact
from stages.common.context import RunOptions
from stages.common.errors import ArtifactError, DatasetError
from stages.train_seg.stage import TrainSegConfig, run

pytestmark = pytest.mark.slow

# Tiny but complete: 24 train images, 3 steps of 8 crops of 64 px, one test scale.
TINY = {"epochs": 1, "crop_size": 64, "batch_size": 8, "scales": (1.0,)}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, more threads on tiny inputs only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def degraded_labels(mask: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """CAM-like weak labels from a ground-truth mask.

    ``pseudo``: objects eroded by 3 px (the rim becomes background) and shifted by up to 3 px, as
    CAM-derived labels under-cover and misalign objects. ``seeds``: object cores (eroded 6 px) and
    background farther than 8 px from any object; 255 elsewhere.
    """
    fg = (mask != 0) & (mask != 255)
    if kind == "pseudo":
        out = np.where(mask == 255, 0, mask).astype(np.uint8)
        out[fg & ~ndimage.binary_erosion(fg, iterations=3)] = 0
        return np.roll(out, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
    core = ndimage.binary_erosion(fg, iterations=6)
    seeds = np.full(mask.shape, 255, np.uint8)
    seeds[core] = mask[core]
    seeds[~ndimage.binary_dilation(fg, iterations=8)] = 0
    return seeds


def write_weak_labels(opts: RunOptions, kind: str, split: str = "train", kind_attr: str = "labels") -> Path:
    """RUN/<kind>.h5: a complete artifact of degraded masks for every image of ``split``."""
    dataset = opts.dataset
    provenance = Provenance(
        kind=kind_attr, stage="crf", config={"synthetic": kind}, dataset=dataset.describe(split)
    )
    status = begin(opts.path(f"{kind}.h5"), provenance, force=True)
    rng = np.random.default_rng(0)
    assert status.writer is not None
    with status.writer as writer:
        for image_id in dataset.ids(split):
            labels = degraded_labels(dataset.mask(image_id), kind, rng)
            if kind_attr == "labels":
                writer.write_image(image_id, labels=labels)
            else:
                writer.write_image(image_id, scores=np.ones((1, 4, 4), np.float32), classes=[0], stride=32)
        return writer.finish()


def make_opts(tmp_path: Path, toy_root: Path, name: str = "run") -> RunOptions:
    return RunOptions(run_dir=tmp_path / name, data=f"toy:{toy_root}", device="cpu", quiet=True)


def test_ce_end_to_end_writes_model_and_scored_predictions(tmp_path: Path, toy_root: Path) -> None:
    opts = make_opts(tmp_path, toy_root)
    write_weak_labels(opts, "pseudo")
    summary = run(opts, TrainSegConfig(**TINY))
    assert summary.status == "made"
    assert [p.name for p in summary.artifacts] == ["seg.h5", "pred_val.h5"]
    model = load_model(opts.path("seg.h5"))
    assert model.arch["name"] == "deeplabv2_resnet10" and model.provenance.config["epochs"] == 1
    assert model.provenance.inputs["labels"]["path"].endswith("pseudo.h5")
    with open_artifact(opts.path("pred_val.h5"), kind="labels") as pred:
        assert len(pred) == 8
        first = pred.ids()[0]
        assert pred.labels(first).shape == opts.dataset.image_size(first)
        assert pred.extra(first, "labels_crf").shape == opts.dataset.image_size(first)
    rows = summary.tables["val mIoU"]
    assert [r["labels"] for r in rows] == ["no CRF", "CRF"]
    assert all(0.0 <= r["mIoU"] <= 100.0 for r in rows)
    assert 0.0 < summary.figures["labels train mIoU"] < 100.0  # the synthetic labels are degraded
    # An identical rerun trains nothing; another setting is refused, naming it.
    again = run(opts, TrainSegConfig(**TINY))
    assert "seg.h5 is up to date" in again.notes
    with pytest.raises(ArtifactError, match="--lr"):
        run(opts, TrainSegConfig(**{**TINY, "lr": 0.5}))


@pytest.mark.parametrize(
    ("loss", "labels", "extra"),
    [("psl", "pseudo", {}), ("dsrg", "seeds", {}), ("dsrg", "seeds", {"expand": True})],
)
def test_weak_losses_train(tmp_path: Path, toy_root: Path, loss: str, labels: str, extra: dict) -> None:
    opts = make_opts(tmp_path, toy_root)
    write_weak_labels(opts, labels)
    summary = run(opts, TrainSegConfig(loss=loss, predict=False, **{**TINY, **extra}))
    history = summary.tables["training"]
    assert len(history) == 1 and np.isfinite(history[0]["loss"]) and history[0]["loss"] > 0
    model = load_model(opts.path("seg.h5"))
    assert model.arch["psl_branch"] == (loss == "psl")
    assert any(k.startswith("classifier.") for k in model.state_dict) == (loss == "psl")


def test_gt_labels_give_the_supervised_bound_beside_the_weak_run(tmp_path: Path, toy_root: Path) -> None:
    opts = make_opts(tmp_path, toy_root)
    summary = run(opts, TrainSegConfig(labels="gt", crf=False, **TINY))
    assert [p.name for p in summary.artifacts] == ["seg_gt.h5", "pred_val_gt.h5"]
    assert "labels train mIoU" not in summary.figures
    assert [r["labels"] for r in summary.tables["val mIoU"]] == ["no CRF"]


def test_refuses_unusable_labels(tmp_path: Path, toy_root: Path) -> None:
    opts = make_opts(tmp_path, toy_root)
    with pytest.raises(ArtifactError, match="pseudo.h5: not found"):
        run(opts, TrainSegConfig(**TINY))
    write_weak_labels(opts, "pseudo", kind_attr="scores")
    with pytest.raises(ArtifactError, match="a labels artifact is needed"):
        run(opts, TrainSegConfig(**TINY))
    write_weak_labels(opts, "pseudo", split="val")  # labels for other images than the training split
    with pytest.raises(ArtifactError, match="has no labels for 24 of the 24"):
        run(opts, TrainSegConfig(**TINY))
    with pytest.raises(DatasetError):
        run(opts, TrainSegConfig(split="nope", **TINY))
