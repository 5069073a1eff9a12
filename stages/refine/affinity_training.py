"""Training the affinity head of `wsss refine --method rw` (AffinityNet, Ahn & Kwak CVPR 2018; IRN grids).

Confident labels come from the CAMs (two thresholds + label CRF, `confident_labels`); pairs of pixels
within the training radius learn affinity 1 when their labels agree and 0 when they differ, unsure
pixels being ignored. The classifier's backbone is frozen: only the `AffinityHead` learns. The head is
saved as the model artifact aff.h5, checkpointed after every epoch so a killed training resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stages.common.artifacts import Artifact, Provenance, load_model, model_status, read_provenance
from stages.common.cam import normalise_image
from stages.common.context import RunOptions, jsonable
from stages.common.distributed import init_if_launched, rank_and_world, wrap_ddp
from stages.common.errors import ConfigError
from stages.common.progress import track
from stages.common.training import CheckpointedTraining, check_finite, loader_generator, set_poly_lr
from stages.refine.random_walk import (
    TRAIN_RADIUS_STRIDE4,
    TRAIN_RADIUS_STRIDE8,
    AffinityHead,
    affinity_loss,
    affinity_targets,
    confident_labels,
    pair_affinity,
)

if TYPE_CHECKING:
    from stages.refine.stage import RefineConfig

AFFINITY_NAME = "refine-affinity"
_WEIGHT_DECAY = 1e-4  # IRN
_MOMENTUM = 0.9


@dataclass(frozen=True)
class AffinityConfig:
    """The affinity head's recipe; VOC defaults PSA's (stride 8, 448-d, 448 crops, batch 8, 8 epochs)."""

    split: str
    stride: int
    embed_dim: int
    epochs: int
    batch_size: int
    crop: int
    lr: float
    conf_fg: float
    conf_bg: float

    @property
    def radius(self) -> int:
        """Training pairs within radius 10 on the stride-4 grid, 5 on the stride-8 grid (IRN)."""
        return TRAIN_RADIUS_STRIDE4 if self.stride == 4 else TRAIN_RADIUS_STRIDE8


def affinity_config(cfg: RefineConfig, split: str) -> AffinityConfig:
    """The affinity recipe of a resolved refine config."""
    assert cfg.aff_stride and cfg.aff_embed_dim and cfg.aff_epochs and cfg.aff_batch_size and cfg.aff_crop
    if cfg.aff_stride not in (4, 8):
        raise ConfigError(f"--aff-stride {cfg.aff_stride}: the affinity grid is layer1's (4) or layer2's (8)")
    if cfg.aff_crop % 16:
        raise ConfigError(f"--aff-crop {cfg.aff_crop}: must be a multiple of 16 so the grids align")
    return AffinityConfig(
        split,
        cfg.aff_stride,
        cfg.aff_embed_dim,
        cfg.aff_epochs,
        cfg.aff_batch_size,
        cfg.aff_crop,
        cfg.aff_lr,
        cfg.conf_fg,
        cfg.conf_bg,
    )


def grid_labels(labels: np.ndarray, stride: int) -> np.ndarray:
    """(H, W) labels -> (ceil(H/s), ceil(W/s)): the label at each cell's centre (clamped), nearest."""
    rows = np.minimum(np.arange(0, labels.shape[0], stride) + stride // 2, labels.shape[0] - 1)
    cols = np.minimum(np.arange(0, labels.shape[1], stride) + stride // 2, labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def random_crop(
    image: np.ndarray, labels: np.ndarray, crop: int, stride: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `crop`² window (and random mirror) of a normalised image and its grid labels.

    Windows start on multiples of `stride` so the labels' cells stay aligned; images smaller than the
    crop are padded (image 0 = the mean after normalisation, labels 255 = ignored).
    Returns ((3, crop, crop) float, (crop/stride, crop/stride) long).
    """
    x = normalise_image(image)
    cells = crop // stride
    height, width = labels.shape
    padded_x = torch.zeros(3, max(crop, height * stride), max(crop, width * stride))
    padded_x[:, : x.shape[1], : x.shape[2]] = x
    padded_y = torch.full((max(cells, height), max(cells, width)), 255, dtype=torch.long)
    padded_y[:height, :width] = torch.from_numpy(labels.astype(np.int64))
    top = int(torch.randint(0, padded_y.shape[0] - cells + 1, (1,), generator=generator))
    left = int(torch.randint(0, padded_y.shape[1] - cells + 1, (1,), generator=generator))
    x = padded_x[:, top * stride : top * stride + crop, left * stride : left * stride + crop]
    y = padded_y[top : top + cells, left : left + cells]
    if bool(torch.rand(1, generator=generator) < 0.5):
        x, y = x.flip(-1), y.flip(-1)
    return x, y


def stage_channels(classifier: torch.nn.Module) -> list[int]:
    """Channels of the classifier's four backbone stages (probed with one tiny forward pass)."""
    device = next(classifier.parameters()).device
    with torch.no_grad():
        return [f.shape[1] for f in classifier.forward_features(torch.zeros(1, 3, 32, 32, device=device))]


def embed(
    classifier: torch.nn.Module, head: torch.nn.Module, image: np.ndarray, device: torch.device
) -> torch.Tensor:
    """Affinity embedding (1, D, ceil(H/s), ceil(W/s)) of a whole uint8 image at the head's stride."""
    with torch.no_grad():
        return head(classifier.forward_features(normalise_image(image)[None].to(device)))


def collect_labels(
    opts: RunOptions, cfg: AffinityConfig, cams: Artifact, ids: list[str]
) -> dict[str, np.ndarray]:
    """Confident labels of every image on the affinity grid (uint8, ~H·W/s² bytes per image)."""
    labels: dict[str, np.ndarray] = {}
    for image_id in track(ids, total=len(ids), description="confident labels", quiet=opts.quiet):
        image = opts.dataset.image(image_id)
        full, classes = cams.scores_full(image_id, image.shape[:2])
        conf = confident_labels(full, classes, image, fg_thr=cfg.conf_fg, bg_thr=cfg.conf_bg)
        labels[image_id] = grid_labels(conf, cfg.stride)
    return labels


def train_affinity(
    opts: RunOptions,
    cfg: AffinityConfig,
    path: Path,
    cams: Artifact,
    classifier: torch.nn.Module,
    classifier_path: Path,
    described: dict[str, Any],
    ids: list[str],
) -> list[str]:
    """Train the affinity head into `path` unless it is up to date; resumes a killed training.

    Returns notes for the stage summary.
    """
    record = {**{k: jsonable(v) for k, v in cfg.__dict__.items()}, "seed": opts.seed}
    inputs = {"cams": cams.ref(), "classifier": read_provenance(classifier_path)[0].ref(classifier_path)}
    provenance = Provenance("model", AFFINITY_NAME, record, inputs, described)
    if model_status(path, provenance, force=opts.force):
        return [f"{path.name} is up to date"]
    device = next(classifier.parameters()).device
    opts.seed_everything(1)
    head = AffinityHead(stage_channels(classifier), embed_dim=cfg.embed_dim, stride=cfg.stride).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=_MOMENTUM, weight_decay=_WEIGHT_DECAY)
    arch = {"in_channels": stage_channels(classifier), "embed_dim": cfg.embed_dim, "stride": cfg.stride}
    training = CheckpointedTraining(path, provenance, head, optimizer, arch, force=opts.force)
    init_if_launched(device)  # under torchrun each rank trains on its slice of every batch (DDP)
    rank, world = rank_and_world()
    if cfg.batch_size < world:
        raise ConfigError(f"--aff-batch-size {cfg.batch_size} is smaller than the {world} processes")
    model = wrap_ddp(head, device)
    labels = collect_labels(opts, cfg, cams, ids)
    steps_per_epoch = max(1, len(ids) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    for epoch in training.epochs(cfg.epochs):
        generator = loader_generator(opts.seed, epoch)
        order = torch.randperm(len(ids), generator=generator).tolist()
        head.train()
        losses = []
        for step in range(steps_per_epoch):
            batch = [ids[i] for i in order[step * cfg.batch_size : (step + 1) * cfg.batch_size]][rank::world]
            crops = [
                random_crop(opts.dataset.image(i), labels[i], cfg.crop, cfg.stride, generator) for i in batch
            ]
            x = torch.stack([c[0] for c in crops]).to(device)
            y = torch.stack([c[1] for c in crops]).to(device)
            with torch.no_grad():
                features = classifier.forward_features(x)
            loss = affinity_loss(pair_affinity(model(features), cfg.radius), affinity_targets(y, cfg.radius))
            check_finite(loss, path, epoch, training.step)
            set_poly_lr(optimizer, training.step, total)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            training.step += 1
            losses.append(loss.item())
        training.end_epoch({"loss": float(np.mean(losses))})
    head.eval()
    training.finish()
    resumed = f" (resumed after epoch {training.resumed_from})" if training.resumed_from else ""
    return [
        f"trained {path.name}: {cfg.epochs} epochs, final loss {training.history[-1]['loss']:.3f}{resumed}"
    ]


def load_affinity(path: Path, described: dict[str, Any], device: torch.device) -> AffinityHead:
    """The trained affinity head of aff.h5, in eval mode."""
    model = load_model(path, dataset=described)
    head = AffinityHead(
        model.arch["in_channels"], embed_dim=model.arch["embed_dim"], stride=model.arch["stride"]
    )
    head.load_state_dict(model.state_dict)
    return head.to(device).eval()
