"""`torchrun --nproc_per_node 2` on CPU (gloo) against one process: mine-ae's CAM extraction is bit for
bit the same and writes every image exactly once; DDP training of train-cls matches to a stated
tolerance.

Both runs use one CPU thread per process (torchrun's default, set explicitly for the single run too),
so per-image results cannot differ by how a thread pool splits a reduction.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import train_cls
from stages.common.artifacts import load_model, open_artifact
from stages.common.context import RunOptions, seed_everything

pytestmark = pytest.mark.slow

TOLERANCE = 1e-2  # measured: ~8e-4 on this machine; a broken DDP (e.g. per-rank BatchNorm) gave ~1
TRAIN = ["train-cls", "--arch", "resnet18", "--epochs", "1", "--batch-size", "8", "--val-split", "none"]
MINE = ["mine-ae", "--rounds", "1", "--scales", "1.0", "--quiet", "--device", "cpu"]


def _wsss(args: list[str], processes: int, run: Path, data: str) -> None:
    """`wsss ARGS` in ``run`` (its wsss.toml names the run and data: torchrun's own parser would take
    ``--run`` for an abbreviation of its ``--run-path``)."""
    (run / "wsss.toml").write_text(f'[run]\ndir = "."\n\n[data]\nspec = "{data}"\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    command = (
        [*launcher, "-m", "wsss_cli", *args] if processes > 1 else [sys.executable, "-m", "wsss_cli", *args]
    )
    done = subprocess.run(command, env=env, cwd=run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, RunOptions]:
    """train-cls in one process and under torchrun; then mine-ae --rounds 1 in both from one cls.h5."""
    base = tmp_path_factory.mktemp("torchrun")
    single, ddp = base / "single", base / "ddp"
    ddp.mkdir()
    opts = RunOptions(run_dir=single, data=f"toy:{toy_root}", quiet=True, device="cpu")
    # Backbone "weights" (random, torchvision format) so BatchNorm is frozen, as IRN trains it: then a
    # rank's half batch normalises exactly as the whole batch does (see the training test).
    import torchvision

    torch.manual_seed(0)
    weights = base / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    seed_everything(0)
    train_cls.run(
        opts,
        train_cls.TrainClsConfig(arch="resnet18", epochs=1, batch_size=8, val_split="none", weights=weights),
    )
    _wsss([*TRAIN, "--weights", str(weights), "--quiet"], 2, ddp, f"toy:{toy_root}")
    shutil.copy(ddp / "cls.h5", base / "cls_ddp.h5")
    shutil.copy(single / "cls.h5", ddp / "cls.h5")  # the CAM comparison needs one classifier
    for run, processes in ((single, 1), (ddp, 2)):
        _wsss(MINE, processes, run, f"toy:{toy_root}")
    return single, base / "cls_ddp.h5", opts


def test_cam_extraction_is_bit_identical_and_each_image_written_once(
    runs: tuple[Path, Path, RunOptions],
) -> None:
    single, _, opts = runs
    ddp = single.parent / "ddp"
    ids = opts.dataset.ids("train")
    assert not list(ddp.glob("*.rank*"))  # the ranks' pieces were merged and removed
    with open_artifact(single / "cams_r1.h5") as a, open_artifact(ddp / "cams_r1.h5") as b:
        assert a.fingerprint == b.fingerprint
        assert a.ids() == b.ids() == sorted(ids)  # every image once: the merge refuses repeats
        for image_id in ids:
            assert np.array_equal(a.scores(image_id)[0], b.scores(image_id)[0])
            for name in ("mined", "union", "low", "logits"):
                assert np.array_equal(a.extra(image_id, name), b.extra(image_id, name))
    for name in ("cams.h5", "seeds.h5"):
        with open_artifact(ddp / name) as art:
            assert art.ids() == sorted(ids)


def test_ddp_train_cls_matches_one_process(runs: tuple[Path, Path, RunOptions]) -> None:
    """Each rank takes order[rank::2] of the same shuffled order, so step i of the two ranks together sees
    exactly the single process's batch i (the same augmented crops: each is seeded by its index), and
    DDP averages the ranks' gradients of their half-batch mean losses: the mean over the whole batch.
    BatchNorm is frozen (IRN's recipe with --weights), so nothing couples the images of a batch. What
    remains is float summation order (gradients summed by gloo's all-reduce, not by one batched
    backward, and 2 threads against 1), amplified by 3 SGD steps at lr 0.1 / 1.0: TOLERANCE of the
    update's size. A rank that trained alone on its half, or on other images, or without averaging,
    moves by another update."""
    single, ddp_model, opts = runs
    a, b = load_model(single / "cls.h5"), load_model(ddp_model)
    assert a.provenance.fingerprint == b.provenance.fingerprint  # the same settings, whatever the world
    known = {f.name for f in dataclasses.fields(train_cls.TrainClsConfig)}
    record = {k: tuple(v) if isinstance(v, list) else v for k, v in a.provenance.config.items() if k in known}
    record["weights"] = Path(a.provenance.inputs["weights"]["path"])
    seed_everything(opts.seed)  # as train_classifier does before building the network
    init = train_cls.build_network(train_cls.TrainClsConfig(**record), opts.dataset.num_classes).state_dict()
    keys = [k for k, v in init.items() if v.is_floating_point()]

    def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[k].flatten().float() for k in keys])

    update = (flat(a.state_dict) - flat(init)).norm()
    apart = (flat(a.state_dict) - flat(b.state_dict)).norm()
    assert update > 0
    assert apart / update < TOLERANCE, f"updates differ by {apart / update:.3g} of their size"
    # The recorded loss is the mean over both ranks' steps, i.e. over the same crops as one process's.
    loss_a, loss_b = a.meta["history"][-1]["loss"], b.meta["history"][-1]["loss"]
    assert abs(loss_a - loss_b) <= TOLERANCE * abs(loss_a)
