"""`wsss refine` end to end on toy data with a synthetic cams.h5 and a random resnet18 cls.h5, and its
pure pieces on constructed inputs."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from stages.common.artifacts import Provenance, begin, open_artifact, partial_path, save_model
from stages.common.cam import cam_grid
from stages.common.context import RunOptions, default_train_split
from stages.common.errors import ArtifactError, ConfigError
from stages.common.networks import CamNet
from stages.refine.stage import (
    RefineConfig,
    cam_background,
    method_record,
    refine_scg,
    refine_walk,
    resolve,
    run,
    to_probabilities,
)


def synthetic_cams(opts: RunOptions, path: Path | None = None, described: dict | None = None) -> Path:
    """cams.h5 of the training split: each labelled class's blurred mask, noisy, at stride 4, in [0, 1].

    Derived from the masks only to get plausible test inputs; no stage under test sees a mask.
    """
    dataset = opts.dataset
    split = default_train_split(dataset)
    path = path or opts.path("cams.h5")
    described = described or dataset.describe(split)
    status = begin(path, Provenance("scores", "mine-ae", {"synthetic": True}, {}, described), force=True)
    assert status.writer is not None
    rng = np.random.default_rng(0)
    with status.writer as writer:
        for image_id in dataset.ids(split):
            mask = dataset.mask(image_id)
            classes = dataset.labels(image_id)
            grid = cam_grid(*mask.shape, 4)
            maps = []
            for c in classes:
                onehot = torch.from_numpy((mask == c).astype(np.float32))[None, None]
                small = torch.nn.functional.interpolate(onehot, size=grid, mode="area")[0, 0].numpy()
                noisy = np.clip(small * 0.8 + rng.random(grid) * 0.3, 0, None)
                maps.append(noisy / noisy.max())
            scores = np.stack(maps) if maps else np.zeros((0, *grid), np.float32)
            writer.write_image(image_id, scores=scores, classes=classes, stride=4)
        writer.finish()
    return path


def tiny_classifier(opts: RunOptions) -> Path:
    """cls.h5: a resnet18 CamNet with random weights (plumbing only)."""
    dataset = opts.dataset
    described = dataset.describe(default_train_split(dataset))
    torch.manual_seed(0)
    net = CamNet(dataset.num_classes, arch="resnet18", output_stride=16)
    provenance = Provenance("model", "train-cls", {"synthetic": True}, {}, described)
    return save_model(opts.path("cls.h5"), provenance, net.state_dict(), net.arch_spec())


# ---------------------------------------------------------------------------------------------------------
# Pure pieces


def test_to_probabilities_sums_to_one_and_empty_pixels_are_background() -> None:
    scores = torch.tensor([[[0.25, 0.0]], [[0.75, 0.0]], [[-1.0, 0.0]]])  # (3, 1, 2)
    probs = to_probabilities(scores)
    assert torch.allclose(probs.sum(0), torch.ones(1, 2))
    # pixel 0: 0.25 : 0.75 : 0 (negative clamped); pixel 1: all zero -> background.
    assert probs[:, 0, 0].tolist() == pytest.approx([0.25, 0.75, 0.0], abs=1e-4)
    assert probs[:, 0, 1].tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_cam_background_constant_and_power() -> None:
    cams = torch.tensor([[[0.5, 1.0]], [[0.2, 0.0]]])
    assert cam_background(cams, 0.25, None)[0].flatten().tolist() == [0.25, 0.25]
    # (1 - max)^2: (1 - 0.5)^2 = 0.25, (1 - 1)^2 = 0.
    assert cam_background(cams, None, 2.0)[0].flatten().tolist() == pytest.approx([0.25, 0.0])


def test_resolve_scales_with_the_dataset_and_refuses_contradictions() -> None:
    small, large = resolve(RefineConfig(method="rw"), True), resolve(RefineConfig(method="rw"), False)
    assert (small.aff_stride, small.aff_crop, small.scg_scale, small.bg) == (4, 64, 2.0, 0.25)
    assert (large.aff_stride, large.aff_crop, large.aff_embed_dim, large.aff_epochs) == (8, 448, 448, 8)
    with pytest.raises(ConfigError, match="--bg and --bg-power"):
        resolve(RefineConfig(method="pamr", bg=0.3, bg_power=2), True)
    with pytest.raises(ConfigError, match="SCG makes its own"):
        resolve(RefineConfig(method="rs", bg=0.3), True)
    with pytest.raises(ConfigError, match="unknown"):
        resolve(RefineConfig(method="crf"), True)


def test_method_record_keeps_only_the_method_s_options() -> None:
    opts = RunOptions()
    record = method_record(resolve(RefineConfig(method="pamr", split="train"), True), opts)
    assert "walk_beta" not in record and "pamr_iterations" in record and record["bg"] == 0.25


def test_refine_scg_keeps_the_cam_grid_and_puts_background_first() -> None:
    torch.manual_seed(0)
    features = [torch.rand(8, 4, 5), torch.rand(16, 4, 5)]
    cams = torch.zeros(1, 16, 20)
    cams[0, :8, :10] = 1.0
    out = refine_scg(features, cams, resolve(RefineConfig(method="scg"), True))
    assert out.shape == (2, 16, 20) and float(out.min()) >= 0 and float(out.max()) <= 1 + 1e-5


def test_refine_walk_memory_is_sparse() -> None:
    torch.manual_seed(0)
    embedding = torch.rand(1, 4, 30, 30)
    cams = torch.rand(2, 30, 30)
    cfg = resolve(RefineConfig(method="rw", walk_steps=4), True)
    walked, memory = refine_walk(embedding, cams, cfg)
    assert walked.shape == (3, 30, 30)
    # 900 pixels x (2 x 34 + 1) entries at most, against 900² dense.
    assert memory["sparse_bytes"] <= 900 * 69 * 20 and memory["dense_bytes"] == 900 * 900 * 4


# ---------------------------------------------------------------------------------------------------------
# The stage end to end on the toy data


@pytest.fixture(scope="module")
def refine_run(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> RunOptions:
    opts = RunOptions(
        run_dir=tmp_path_factory.mktemp("refine"), data=f"toy:{toy_root}", device="cpu", quiet=True, workers=1
    )
    synthetic_cams(opts)
    tiny_classifier(opts)
    return opts


def _check_complete(opts: RunOptions, path: Path) -> None:
    dataset = opts.dataset
    split = default_train_split(dataset)
    with open_artifact(path, kind="scores", dataset=dataset.describe(split)) as art:
        assert art.ids() == sorted(dataset.ids(split))
        for image_id in art.ids()[:5]:
            probs, classes, stride = art.scores(image_id)
            assert classes == (0, *dataset.labels(image_id))
            height, width = dataset.image_size(image_id)
            assert probs.shape[1:] == cam_grid(height, width, stride)
            assert np.allclose(probs.sum(0), 1.0, atol=2e-3)  # float16 storage


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pamr", "scg", "rs", "rw"])
def test_every_method_writes_a_complete_artifact(refine_run: RunOptions, method: str) -> None:
    cfg = RefineConfig(
        method=method, out=refine_run.path(f"refined_{method}.h5"), aff_epochs=1, walk_steps=16
    )
    summary = run(refine_run, cfg)
    assert summary.status == "made" and summary.images == len(refine_run.dataset.ids("train"))
    _check_complete(refine_run, cfg.out)
    with open_artifact(cfg.out) as art:
        assert art.config["method"] == method
    again = run(refine_run, cfg)
    assert again.status == "up to date"
    if method == "rw":
        assert refine_run.path("aff.h5").exists() and "up to date" in again.notes[0]


def test_refine_resumes_image_by_image(refine_run: RunOptions) -> None:
    out = refine_run.path("refined_resume.h5")
    whole = refine_run.path("refined_whole.h5")
    run(refine_run, RefineConfig(method="pamr", out=whole))
    run(refine_run, RefineConfig(method="pamr", out=out))
    # Make a partial file holding the first half of the records, as a killed run leaves it.
    partial = partial_path(out)
    out.rename(partial)
    with h5py.File(partial, "a") as h5:
        h5.attrs["complete"] = False
        for image_id in sorted(h5["images"])[len(h5["images"]) // 2 :]:
            del h5["images"][image_id]
    summary = run(refine_run, RefineConfig(method="pamr", out=out))
    assert (
        summary.status == "resumed"
        and summary.images == len(refine_run.dataset.ids("train")) - len(refine_run.dataset.ids("train")) // 2
    )
    with open_artifact(out) as a, open_artifact(whole) as b:
        for image_id in a.ids():
            assert np.array_equal(a.scores(image_id)[0], b.scores(image_id)[0])


def test_refine_refuses_cams_of_another_class_list(refine_run: RunOptions, tmp_path: Path) -> None:
    described = refine_run.dataset.describe("train")
    described["class_names"] = [*described["class_names"][:-1], "zebra"]
    foreign = synthetic_cams(refine_run, tmp_path / "cams.h5", described)
    with pytest.raises(ArtifactError, match="made for classes"):
        run(refine_run, RefineConfig(method="pamr", cams=foreign, out=tmp_path / "refined.h5"))


def test_refine_refuses_a_changed_option(refine_run: RunOptions) -> None:
    out = refine_run.path("refined_changed.h5")
    run(refine_run, RefineConfig(method="pamr", out=out))
    with pytest.raises(ArtifactError, match="pamr-iterations"):
        run(refine_run, RefineConfig(method="pamr", out=out, pamr_iterations=3))
