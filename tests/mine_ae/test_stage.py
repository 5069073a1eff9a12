"""mine-ae end to end on the toy data with a hand-built classifier and a fake trainer (fast)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.common.artifacts import open_artifact
from stages.common.cam import multiscale_cam, normalise_image
from stages.common.context import RunOptions
from stages.common.errors import ArtifactError, ConfigError, DatasetError
from stages.mine_ae import extract
from stages.mine_ae.erasing import (
    erase,
    merge_saliency_components,
    seeds_from_mined,
    seeds_with_saliency,
)
from stages.mine_ae.rounds import RoundReader, fuse_scores, round_path
from stages.mine_ae.stage import MineAeConfig, run

FAST = {"scales": (1.0,)}


def _ids(opts: RunOptions) -> list[str]:
    return opts.dataset.ids("train")


def test_rounds_1_equals_plain_cam_of_cls(toy_opts: RunOptions, fake) -> None:
    trainer, backend = fake
    summary = run(toy_opts, MineAeConfig(rounds=1), backend=backend)
    assert trainer.calls == []  # round 1 trains nothing
    model = backend.load(toy_opts.path("cls.h5"), toy_opts.dataset.describe("train"), "cpu")
    with open_artifact(toy_opts.path("cams.h5"), kind="scores") as cams:
        assert cams.ids() == sorted(_ids(toy_opts))
        for image_id in _ids(toy_opts):
            classes = toy_opts.dataset.labels(image_id)
            expected = (
                multiscale_cam(
                    model, normalise_image(toy_opts.dataset.image(image_id)), [c - 1 for c in classes]
                )
                .numpy()
                .astype(np.float16)
            )
            scores, stored_classes, stride = cams.scores(image_id)
            assert stored_classes == classes and stride == 4
            np.testing.assert_array_equal(scores.astype(np.float16), expected)
    assert summary.figures["rounds"] == 1 and "seed mIoU" in summary.figures


def test_erasing_on_the_fly_equals_erase_of_stored_masks(toy_opts: RunOptions, fake) -> None:
    trainer, backend = fake
    run(toy_opts, MineAeConfig(rounds=2, stop_f1=0.0, **FAST), backend=backend)
    mean = toy_opts.dataset.mean_pixel("train")
    reader = RoundReader(round_path(toy_opts.run_dir, 1))
    seen = trainer.erased["cls_r2.h5"]
    assert sorted(seen) == sorted(_ids(toy_opts))
    erased_any = 0
    for image_id, image in seen.items():
        mask = reader.union(image_id).any(axis=0)
        erased_any += mask.any()
        np.testing.assert_array_equal(image, erase(toy_opts.dataset.image(image_id), mask, mean))
    reader.close()
    assert erased_any > len(seen) // 2  # a random tiny net can have an all-zero CAM on a few images
    # The round classifier's fingerprint depends on round 1's masks.
    assert trainer.calls[0]["inputs"]["mined"]["path"].endswith("cams_r1.h5")
    assert trainer.calls[0]["recipe"]["val_split"] == "none"


def test_round_bookkeeping_union_seeds_and_fusion(toy_opts: RunOptions, fake) -> None:
    _, backend = fake
    summary = run(toy_opts, MineAeConfig(rounds=3, stop_f1=0.0, **FAST), backend=backend)
    readers = [RoundReader(round_path(toy_opts.run_dir, t)) for t in (1, 2, 3)]
    rows = summary.tables[next(iter(summary.tables))]
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["kept"] == "yes" for r in rows)
    assert [r["classifier"] for r in rows] == ["cls.h5", "cls_r2.h5", "cls_r3.h5"]
    # The cumulative erased area never shrinks.
    assert rows[0]["erased %"] <= rows[1]["erased %"] <= rows[2]["erased %"]
    with open_artifact(toy_opts.path("cams.h5")) as cams, open_artifact(toy_opts.path("seeds.h5")) as seeds:
        assert cams.meta("rounds") == seeds.meta("rounds")
        assert len(cams.meta("rounds")) == 3
        for image_id in _ids(toy_opts):
            unions = [r.union(image_id) for r in readers]
            lows = [r.low(image_id) for r in readers]
            assert np.array_equal(unions[0], readers[0].mined(image_id))
            for t in (1, 2):
                assert np.array_equal(unions[t], unions[t - 1] | readers[t].mined(image_id))
                assert not (lows[t] & ~lows[t - 1]).any()
            classes = toy_opts.dataset.labels(image_id)
            expected = seeds_from_mined({c: unions[2][k] for k, c in enumerate(classes)}, lows[2])
            np.testing.assert_array_equal(seeds.labels(image_id), expected)
            fused = fuse_scores([r.scores(image_id) for r in readers], [r.mined(image_id) for r in readers])
            fused = fused.astype(np.float16)
            np.testing.assert_array_equal(cams.scores(image_id)[0].astype(np.float16), fused)
    for r in readers:
        r.close()


def test_round_classifiers_start_from_cls_without_imagenet_weights(toy_opts: RunOptions, fake) -> None:
    trainer, backend = fake
    run(toy_opts, MineAeConfig(rounds=3, stop_f1=0.0, **FAST), backend=backend)
    assert [c["init"] for c in trainer.calls] == [toy_opts.path("cls.h5")] * 2
    trainer.calls.clear()
    run(
        dataclasses.replace(toy_opts, force=True),
        MineAeConfig(rounds=2, round_init="recipe", **FAST),
        backend=backend,
    )
    assert [c["init"] for c in trainer.calls] == [None]
    with pytest.raises(ConfigError, match="--round-init"):
        MineAeConfig(round_init="imagenet")


def test_stops_when_the_round_classifier_no_longer_recognises(toy_opts: RunOptions, fake) -> None:
    trainer, backend = fake
    summary = run(toy_opts, MineAeConfig(rounds=3, stop_f1=1.0, **FAST), backend=backend)
    assert len(trainer.calls) == 1  # round 3 never trained
    rows = summary.tables[next(iter(summary.tables))]
    assert [r["kept"] for r in rows] == ["yes", "no (F1 < --stop-f1)"]
    assert any("stopped after round 2" in n for n in summary.notes)
    with open_artifact(toy_opts.path("cams.h5")) as cams, open_artifact(toy_opts.path("seeds.h5")) as seeds:
        assert list(cams.provenance.inputs) == ["round1"]
        reader = RoundReader(round_path(toy_opts.run_dir, 1))
        image_id = _ids(toy_opts)[0]
        classes = toy_opts.dataset.labels(image_id)
        union = reader.union(image_id)
        expected = seeds_from_mined({c: union[k] for k, c in enumerate(classes)}, reader.low(image_id))
        np.testing.assert_array_equal(seeds.labels(image_id), expected)
        reader.close()


def test_killed_mid_round_2_resumes_to_the_one_go_result(
    toy_opts: RunOptions, fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, backend = fake
    cfg = MineAeConfig(rounds=2, stop_f1=0.0, **FAST)
    one_go = RunOptions(run_dir=tmp_path / "one_go", data=toy_opts.data, device="cpu", quiet=True)
    one_go.run_dir.mkdir()
    (one_go.run_dir / "cls.h5").write_bytes(toy_opts.path("cls.h5").read_bytes())
    run(one_go, cfg, backend=backend)

    real = extract.image_cam
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == len(_ids(toy_opts)) + 4:  # all of round 1, then 3 images of round 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "image_cam", counting)
    with pytest.raises(KeyboardInterrupt):
        run(toy_opts, cfg, backend=backend)
    assert round_path(toy_opts.run_dir, 1).exists()
    assert Path(str(round_path(toy_opts.run_dir, 2)) + ".partial").exists()
    calls["n"] = 0
    summary = run(toy_opts, cfg, backend=backend)
    assert summary.status == "resumed"
    assert calls["n"] == len(_ids(toy_opts)) - 3  # neither round 1 nor round 2's first 3 images again
    for name in ("cams.h5", "seeds.h5", "cams_r2.h5"):
        with open_artifact(toy_opts.path(name)) as a, open_artifact(one_go.path(name)) as b:
            assert a.fingerprint == b.fingerprint
            for image_id in _ids(toy_opts):
                for key in a.h5[f"images/{image_id}"]:
                    np.testing.assert_array_equal(a.extra(image_id, key), b.extra(image_id, key))
    assert run(toy_opts, cfg, backend=backend).status == "up to date"


def test_saliency_components_seeds(toy_opts: RunOptions, fake, tmp_path: Path) -> None:
    _, backend = fake
    folder = tmp_path / "saliency"
    folder.mkdir()
    for image_id in _ids(toy_opts):
        mask = toy_opts.dataset.mask(image_id)
        Image.fromarray(np.where((mask > 0) & (mask < 255), 255, 0).astype(np.uint8)).save(
            folder / f"{image_id}.png"
        )
    cfg = MineAeConfig(rounds=1, saliency=folder, saliency_merge="components", **FAST)
    run(toy_opts, cfg, backend=backend)
    reader = RoundReader(round_path(toy_opts.run_dir, 1))
    with open_artifact(toy_opts.path("seeds.h5"), kind="labels") as seeds:
        for image_id in _ids(toy_opts):
            classes = toy_opts.dataset.labels(image_id)
            union = reader.union(image_id)
            saliency = np.asarray(Image.open(folder / f"{image_id}.png"), dtype=np.float32) / 255
            mined = {c: union[k] for k, c in enumerate(classes)}
            expected = merge_saliency_components(seeds_with_saliency(mined, saliency), saliency)
            np.testing.assert_array_equal(seeds.labels(image_id), expected)
    reader.close()
    (folder / f"{_ids(toy_opts)[0]}.png").unlink()
    toy_opts.force = True
    with pytest.raises(DatasetError, match="saliency map not found"):
        run(toy_opts, cfg, backend=backend)


def test_gradcam_rounds_run(toy_opts: RunOptions, fake) -> None:
    _, backend = fake
    summary = run(
        toy_opts, MineAeConfig(rounds=2, stop_f1=0.0, cam="gradcam", gradcam_layer="layer1"), backend=backend
    )
    assert summary.figures["kept"] == 2


def test_refusals(toy_opts: RunOptions, fake, tmp_path: Path) -> None:
    _, backend = fake
    empty = RunOptions(run_dir=tmp_path / "empty", data=toy_opts.data, device="cpu", quiet=True)
    with pytest.raises(ArtifactError, match="wsss train-cls"):
        run(empty, MineAeConfig(), backend=backend)
    with pytest.raises(ConfigError, match="--saliency"):
        MineAeConfig(saliency_merge="components")
    with pytest.raises(ConfigError, match="--cam"):
        MineAeConfig(cam="scorecam")
    with pytest.raises(ConfigError, match="--rounds"):
        MineAeConfig(rounds=0)
    run(toy_opts, MineAeConfig(rounds=1, **FAST), backend=backend)
    with pytest.raises(ArtifactError, match="other settings"):
        run(toy_opts, MineAeConfig(rounds=1, top_fraction=0.3, **FAST), backend=backend)
