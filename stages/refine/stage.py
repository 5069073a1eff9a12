"""`wsss refine`: class score maps (cams.h5) -> probabilities with a background channel (refined.h5).

Methods (METHODS.md §3):
- ``pamr``: PAMR (Araslanov & Roth, CVPR 2020) on the CAMs plus a background channel, on the image
  resized to the maps' grid;
- ``scg``: SCG (Pan et al., CVPR 2021) from the classifier's last two stages at stride 16;
- ``rs`` (default): SCG then PAMR, the refinement RecurSeed (Jo et al.) recurses during training. Its
  joint classifier/decoder training was never published, so this is the inference-time refinement only;
- ``rw``: AffinityNet/IRN random walk on an affinity head trained on confident CAM labels (aff.h5).

Every output pixel holds probabilities over (background, *the image's classes*): channels are
non-negative and sum to 1. The background of CAM-only inputs is a constant (``bg``, IRN's 0.25) or
``(1 - max CAM)^bg_power`` (PSA), never anything learnt from ground truth.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stages.common.artifacts import Artifact, Provenance, open_artifact, read_provenance
from stages.common.cam import cam_grid, normalise_image
from stages.common.context import RunOptions, config_record, default_train_split
from stages.common.errors import ArtifactError, ConfigError
from stages.common.progress import track
from stages.common.shards import begin_sharded, stage_lock
from stages.common.summary import Summary
from stages.refine.pamr import PAMR_DILATIONS, PAMR_ITERATIONS, pamr
from stages.refine.random_walk import (
    CONF_BG_THR,
    CONF_FG_THR,
    WALK_BETA,
    WALK_BG_SCORE,
    WALK_RADIUS,
    WALK_STEPS,
    neighbour_offsets,
    pair_affinity,
    random_walk,
    seeds_with_background,
    transition_matrix,
)
from stages.refine.scg import SCG_BG_THR, SCG_FG_THR, high_order_self_correlation, scg_refine

METHODS = ("rs", "pamr", "scg", "rw")
SMALL_WALK_STEPS = 16  # see RefineConfig.walk_steps
SCG_STRIDE = 16  # RecurSeed: SCG on the last two backbone stages at stride 16; (hw)² forbids stride 4
_EPS = 1e-5

# Options that shape each method's output; the others are left out of the stored config so that,
# e.g., a walk parameter does not make a PAMR artifact look out of date.
_METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "pamr": ("bg", "bg_power", "pamr_stride", "pamr_iterations", "pamr_dilations"),
    "scg": ("scg_fg", "scg_bg", "scg_scale"),
    "rs": ("scg_fg", "scg_bg", "scg_scale", "pamr_stride", "pamr_iterations", "pamr_dilations"),
    "rw": (
        "bg",
        "walk_radius",
        "walk_beta",
        "walk_steps",
        "conf_fg",
        "conf_bg",
        "aff_stride",
        "aff_embed_dim",
        "aff_epochs",
        "aff_batch_size",
        "aff_crop",
        "aff_lr",
    ),
}


@dataclass
class RefineConfig:
    """Options of `wsss refine`; defaults are the papers' (METHODS.md §3), `None` = resolved at run time."""

    method: str = "rs"
    cams: Path | None = None  # None = RUN/cams.h5
    classifier: Path | None = None  # None = RUN/cls.h5 (scg, rs, rw)
    affinity: Path | None = None  # None = RUN/aff.h5 (rw; trained when missing)
    out: Path | None = None  # None = RUN/refined.h5
    split: str | None = None  # None = the dataset's training split
    bg: float | None = None  # constant background score; None = 0.25 (IRN) unless bg_power is set
    bg_power: float | None = None  # background (1 - max CAM)^bg_power (PSA's alpha), pamr only
    pamr_stride: int | None = None  # None = the CAMs' stride (4)
    pamr_iterations: int = PAMR_ITERATIONS
    pamr_dilations: tuple[int, ...] = PAMR_DILATIONS
    scg_fg: float = SCG_FG_THR
    scg_bg: float = SCG_BG_THR
    scg_scale: float | None = None  # image scale before the features; None = 1 (VOC) or 2 (small images)
    walk_radius: int = WALK_RADIUS
    walk_beta: float = WALK_BETA
    # None = 256 (IRN) on VOC-size images, 16 on small ones. A walk spreads about sqrt(steps) pixels, and
    # IRN's 256 steps are sized for a ~128-cell grid; a toy image's grid is ~28 cells, where 256 steps
    # spread every class over the whole image: (28/128)^2 x 256 = 12, so 16. Measured on the toy data
    # (rw mIoU, CAM 45.2): 16 -> 46.2, 64 -> 43.8, 256 -> 37.3.
    walk_steps: int | None = None
    conf_fg: float = CONF_FG_THR
    conf_bg: float = CONF_BG_THR
    aff_stride: int | None = None  # None = 8 (PSA) on VOC-size images, 4 (IRN's grid) on small images
    aff_embed_dim: int | None = None  # None = 448 (PSA), 64 on small images
    aff_epochs: int | None = None  # None = 8 (PSA), 3 on small images
    aff_batch_size: int | None = None  # None = 8 (PSA)
    aff_crop: int | None = None  # None = 448 (PSA), 64 on small images
    aff_lr: float = 0.1  # PSA and IRN


def is_small(opts: RunOptions, ids: list[str], probe: int = 16) -> bool:
    """True when the images are toy-sized (median longer side < 256 px over the first `probe` ids)."""
    sides = [max(opts.dataset.image_size(i)) for i in ids[:probe]]
    return float(np.median(sides)) < 256


def resolve(cfg: RefineConfig, small: bool) -> RefineConfig:
    """Fill the `None` defaults (toy recipe for small images) and check options fit the method."""
    if cfg.method not in METHODS:
        raise ConfigError(f"--method {cfg.method}: unknown; choose one of {', '.join(METHODS)}")
    if cfg.bg is not None and cfg.bg_power is not None:
        raise ConfigError("--bg and --bg-power both set: give a constant background or a power, not both")
    if cfg.method in ("scg", "rs") and (cfg.bg is not None or cfg.bg_power is not None):
        raise ConfigError(
            f"--bg/--bg-power do not apply to --method {cfg.method}: SCG makes its own background"
        )
    if cfg.method == "rw" and cfg.bg_power is not None:
        raise ConfigError(
            "--bg-power does not apply to --method rw: the walk's background is a constant (--bg)"
        )
    bg = cfg.bg
    if cfg.method in ("pamr", "rw") and bg is None and cfg.bg_power is None:
        bg = WALK_BG_SCORE
    return replace(
        cfg,
        bg=bg,
        scg_scale=cfg.scg_scale if cfg.scg_scale is not None else (2.0 if small else 1.0),
        walk_steps=cfg.walk_steps or (SMALL_WALK_STEPS if small else WALK_STEPS),
        aff_stride=cfg.aff_stride or (4 if small else 8),
        aff_embed_dim=cfg.aff_embed_dim or (64 if small else 448),
        aff_epochs=cfg.aff_epochs or (3 if small else 8),
        aff_batch_size=cfg.aff_batch_size or 8,
        aff_crop=cfg.aff_crop or (64 if small else 448),
        pamr_dilations=tuple(cfg.pamr_dilations),
    )


def method_record(cfg: RefineConfig, opts: RunOptions) -> dict[str, Any]:
    """The stored (and fingerprinted) config: the method, the split and the options it uses."""
    full = config_record(cfg, opts)
    keep = ("method", "split", "seed", *_METHOD_FIELDS[cfg.method])
    return {key: full[key] for key in keep}


# ---------------------------------------------------------------------------------------------------------
# Per-image refinement: arrays in, probabilities out


def to_probabilities(scores: Tensor) -> Tensor:
    """(K+1, h, w) non-negative scores -> probabilities over channels; an all-zero pixel -> background."""
    scores = scores.clamp(min=0.0)
    scores = torch.cat([scores[:1] + _EPS, scores[1:]])
    return scores / scores.sum(dim=0, keepdim=True)


def cam_background(cams: Tensor, bg: float | None, bg_power: float | None) -> Tensor:
    """(K, h, w) CAMs in [0, 1] -> (K+1, h, w) with a background channel first.

    Constant `bg` (IRN's 0.25) or (1 - max_k CAM_k)^`bg_power` (PSA's alpha).
    """
    if bg_power is not None:
        strongest = cams.amax(dim=0, keepdim=True) if cams.shape[0] else torch.zeros_like(cams[:1, :, :])
        return torch.cat([(1.0 - strongest).clamp(min=0.0) ** bg_power, cams])
    if bg is None:
        raise ValueError("cam_background needs a constant bg or a bg_power")
    return seeds_with_background(cams, bg)


def _image_tensor(image: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().to(device)


def _resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]


def refine_pamr(image: np.ndarray, scores: Tensor, cfg: RefineConfig, stride: int) -> Tensor:
    """PAMR of (K+1, h, w) scores on the image resized to the grid of `stride` (K+1, H/stride, W/stride)."""
    grid = cam_grid(image.shape[0], image.shape[1], stride)
    masks = _resize(scores, grid)[None]
    return pamr(_image_tensor(image, scores.device), masks, cfg.pamr_dilations, cfg.pamr_iterations)[0]


def scg_features(
    classifier: torch.nn.Module, image: np.ndarray, scale: float, device: torch.device
) -> list[Tensor]:
    """The classifier's last two stages for one image: two (C_i, h, w) maps on one stride-16 grid."""
    x = normalise_image(image)[None].to(device)
    if scale != 1.0:
        size = (max(16, round(image.shape[0] * scale)), max(16, round(image.shape[1] * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        features = classifier.forward_features(x)[-2:]
    grid = features[-1].shape[-2:]
    return [f[0] if f.shape[-2:] == grid else F.adaptive_avg_pool2d(f, grid)[0] for f in features]


def refine_scg(features: list[Tensor], cams: Tensor, cfg: RefineConfig) -> Tensor:
    """SCG of (K, h4, w4) CAMs: downsampled to the features' grid, refined, upsampled back (K+1, h4, w4)."""
    grid = tuple(features[0].shape[-2:])
    small = F.interpolate(cams[None], size=grid, mode="bilinear", align_corners=False, antialias=True)[0]
    hsc = high_order_self_correlation(features)
    refined = scg_refine(small, hsc, fg_thr=cfg.scg_fg, bg_thr=cfg.scg_bg)
    return _resize(refined, tuple(cams.shape[-2:]))


def refine_walk(embedding: Tensor, cams: Tensor, cfg: RefineConfig) -> tuple[Tensor, dict[str, int]]:
    """Random walk of (K, h, w) CAMs on a (1, D, h', w') affinity embedding -> (K+1, h', w') scores.

    Also returns the walk's memory: the sparse matrix's stored entries against a dense N×N.
    """
    grid = tuple(embedding.shape[-2:])
    affinity = pair_affinity(embedding, cfg.walk_radius)[0]
    offsets = neighbour_offsets(cfg.walk_radius)
    transition = transition_matrix(affinity, offsets, beta=cfg.walk_beta)
    seeds = seeds_with_background(_resize(cams, grid), cfg.bg if cfg.bg is not None else WALK_BG_SCORE)
    assert cfg.walk_steps is not None, "resolve() fills walk_steps"
    walked = random_walk(transition, seeds, steps=cfg.walk_steps)
    n_pixels = grid[0] * grid[1]
    # COO entry: two int64 indices and one float32 value; a dense matrix: one float32 per pixel pair.
    memory = {"sparse_bytes": int(transition._nnz()) * 20, "dense_bytes": n_pixels * n_pixels * 4}
    return walked, memory


# ---------------------------------------------------------------------------------------------------------
# The stage


def check_cams(cams: Artifact, ids: list[str]) -> None:
    """Refuse score maps with a background channel or missing images."""
    missing = [i for i in ids if i not in cams]
    if missing:
        raise ArtifactError(
            f"{cams.path}: no record for {len(missing)} of the {len(ids)} images (e.g. {missing[0]!r}); "
            "rerun mine-ae on this split or pass --split"
        )
    _, classes, _ = cams.scores(ids[0])
    if 0 in classes:
        raise ArtifactError(
            f"{cams.path}: holds a background channel; refine takes class maps without one "
            "(cams.h5 from mine-ae); pass them with --cams"
        )


def load_classifier(path: Path, described: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The trained classifier in eval mode (stages.train_cls.load_classifier once it exists)."""
    try:
        from stages.train_cls import load_classifier as load
    except ModuleNotFoundError as error:
        if error.name != "stages.train_cls":
            raise
        from stages.common.artifacts import load_model
        from stages.common.networks import CamNet

        model = load_model(path, dataset=described)
        net = CamNet(**model.arch)
        net.load_state_dict(model.state_dict)
        return net.to(device).eval()
    return load(path, described, device)


def run(opts: RunOptions, cfg: RefineConfig) -> Summary:
    """Refine every image's CAMs with `cfg.method` into RUN/refined.h5 (resumable image by image)."""
    with torch_threads(opts.num_workers):
        return _run(opts, cfg)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads = --workers for the stage; small per-image ops on a busy machine run
    far faster on 1 thread (PAMR on a 96 px toy image: 18 ms on 1 thread, 800 ms on 2 contended ones)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run(opts: RunOptions, cfg: RefineConfig) -> Summary:
    started = time.perf_counter()
    dataset = opts.dataset
    split = cfg.split or default_train_split(dataset)
    ids = dataset.ids(split)
    cfg = resolve(replace(cfg, split=split), is_small(opts, ids))
    described = dataset.describe(split)
    device = opts.torch_device()
    out = cfg.out or opts.path("refined.h5")
    cams_path = cfg.cams or opts.path("cams.h5")
    with stage_lock(opts, "refine"), open_artifact(cams_path, "scores", described) as cams:
        check_cams(cams, ids)
        inputs = {"cams": cams.ref()}
        classifier = affinity = None
        if cfg.method != "pamr":
            cls_path = Path(cfg.classifier or opts.path("cls.h5"))
            classifier = load_classifier(cls_path, described, device)
            inputs["classifier"] = read_provenance(cls_path)[0].ref(cls_path)
        notes: list[str] = []
        if cfg.method == "rw":
            from stages.refine.affinity_training import affinity_config, load_affinity, train_affinity

            aff_cfg = affinity_config(cfg, split)
            aff_path = Path(cfg.affinity or opts.path("aff.h5"))
            notes += train_affinity(opts, aff_cfg, aff_path, cams, classifier, cls_path, described, ids)
            affinity = load_affinity(aff_path, described, device)
            inputs["affinity"] = read_provenance(aff_path)[0].ref(aff_path)
        provenance = Provenance("scores", "refine", method_record(cfg, opts), inputs, described)
        status = begin_sharded(out, provenance, ids, opts)
        if status.up_to_date:
            seconds = time.perf_counter() - started
            return Summary("refine", "up to date", [status.path], seconds, notes=[status.note])
        assert status.writer is not None
        timing, memory = _refine_all(opts, cfg, status.ids, cams, classifier, affinity, status.writer)
        status.complete()
    notes += [status.note] if status.note else []
    if memory:
        notes.append(
            f"walk memory, largest image: {memory['sparse_bytes'] / 1e6:.2f} MB sparse against "
            f"{memory['dense_bytes'] / 1e6:.1f} MB for a dense N×N transition matrix"
        )
    return Summary(
        "refine",
        "resumed" if status.resumed else "made",
        [status.path],
        time.perf_counter() - started,
        images=timing["images"],
        notes=notes,
        figures={"method": cfg.method, "ms/image": 1000 * timing["seconds"] / max(timing["images"], 1)},
    )


def _refine_all(
    opts: RunOptions,
    cfg: RefineConfig,
    ids: list[str],
    cams: Artifact,
    classifier: torch.nn.Module | None,
    affinity: torch.nn.Module | None,
    writer: Any,
) -> tuple[dict[str, float], dict[str, int]]:
    """The image loop: read CAMs, refine, write probabilities; skip images already written."""
    device = opts.torch_device()
    done = 0
    seconds = 0.0
    largest: dict[str, int] = {}
    with writer:
        for image_id in track(ids, total=len(ids), description=f"refine {cfg.method}", quiet=opts.quiet):
            if writer.done(image_id):
                continue
            tick = time.perf_counter()
            values, classes, stride = cams.scores(image_id)
            image = opts.dataset.image(image_id)
            maps = torch.from_numpy(values).to(device)
            out_stride = stride
            if cfg.method == "pamr":
                out_stride = cfg.pamr_stride or stride
                refined = refine_pamr(image, cam_background(maps, cfg.bg, cfg.bg_power), cfg, out_stride)
            elif cfg.method in ("scg", "rs"):
                assert classifier is not None and cfg.scg_scale is not None
                refined = refine_scg(scg_features(classifier, image, cfg.scg_scale, device), maps, cfg)
                if cfg.method == "rs":
                    out_stride = cfg.pamr_stride or stride
                    refined = refine_pamr(image, to_probabilities(refined), cfg, out_stride)
            else:
                assert classifier is not None and affinity is not None and cfg.aff_stride is not None
                from stages.refine.affinity_training import embed

                embedding = embed(classifier, affinity, image, device)
                refined, memory = refine_walk(embedding, maps, cfg)
                out_stride = cfg.aff_stride
                refined = _resize(refined, cam_grid(image.shape[0], image.shape[1], out_stride))
                if memory["dense_bytes"] > largest.get("dense_bytes", 0):
                    largest = memory
            probs = to_probabilities(refined).cpu().numpy()
            writer.write_image(image_id, scores=probs, classes=(0, *classes), stride=out_stride)
            seconds += time.perf_counter() - tick
            done += 1
        writer.finish()
    return {"images": done, "seconds": seconds}, largest
