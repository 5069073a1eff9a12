"""mine-ae with the real train-cls classifiers: two rounds on the toy data, tiny epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages import train_cls
from stages.common.artifacts import open_artifact
from stages.common.context import RunOptions
from stages.mine_ae.stage import MineAeConfig, run


@pytest.mark.slow
def test_two_rounds_with_real_classifiers(toy_root: Path, tmp_path: Path) -> None:
    opts = RunOptions(run_dir=tmp_path / "run", data=f"voc:{toy_root}", device="cpu", quiet=True)
    train_cls.run(opts, train_cls.TrainClsConfig(epochs=1, batch_size=8, crop_size=64, resize_long=(48, 96)))
    summary = run(opts, MineAeConfig(rounds=2, stop_f1=0.0, scales=(1.0,)))
    rows = next(iter(summary.tables.values()))
    assert [r["round"] for r in rows] == [1, 2]
    assert opts.path("cls_r2.h5").exists() and not opts.path("cls_r2.h5.partial").exists()
    with open_artifact(opts.path("cls_r2.h5"), kind="model") as model:
        assert model.stage == "mine-ae" and "mined" in model.provenance.inputs
        # No ImageNet weights: round 2 started from cls.h5's backbone, and says so.
        assert model.provenance.inputs["init_backbone"]["path"] == str(opts.path("cls.h5"))
    with open_artifact(opts.path("seeds.h5"), kind="labels") as seeds:
        image_id = seeds.ids()[0]
        labels = seeds.labels(image_id)
        assert labels.shape == opts.dataset.image_size(image_id)
        assert set(np.unique(labels)) <= {0, 255, *opts.dataset.labels(image_id)}
    assert rows[1]["erased %"] >= rows[0]["erased %"] > 0
    assert run(opts, MineAeConfig(rounds=2, stop_f1=0.0, scales=(1.0,))).status == "up to date"
