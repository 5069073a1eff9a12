import os

import pytest
import torch

from stages.refine.scg import high_order_self_correlation, scg_refine

DEVICE = torch.device(os.environ.get("WSSS_TEST_DEVICE", "cpu"))


def two_clusters(channels: int = 8, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """(C, 6, 6) features: columns 0-2 along one direction, columns 3-5 along an orthogonal one."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.zeros(channels, 6, 6)
    features[0, :, :3] = 1.0
    features[1, :, 3:] = 1.0
    features += noise * torch.rand(channels, 6, 6, generator=generator)
    return features.to(DEVICE)


def test_clean_clusters_give_one_block_per_cluster():
    # Hand-derived: first order is 1 inside a cluster, 0 across (cosine 0 < 0.5). Second order with
    # n = 18 pixels per cluster: off-diagonal (n-2)/(n-1)^2, diagonal 1/(n-1), i.e. after max-normalising
    # at most 1, so max(first, second) = first. Two stages sum to 2 inside a cluster, 0 across.
    hsc = high_order_self_correlation([two_clusters(), two_clusters(channels=4)])
    left = torch.zeros(6, 6, dtype=torch.bool)
    left[:, :3] = True
    left = left.flatten().to(DEVICE)
    same = left[:, None] == left[None, :]
    assert hsc.shape == (36, 36)
    assert torch.allclose(hsc, 2.0 * same.float(), atol=1e-3)


def test_object_map_covers_the_seed_cluster_only():
    hsc = high_order_self_correlation([two_clusters(noise=0.2), two_clusters(noise=0.2, seed=1)])
    cams = torch.zeros(1, 6, 6, device=DEVICE)
    cams[0, 2:4, 0:2] = 1.0  # a small CAM peak inside the left cluster; the right half is background
    out = scg_refine(cams, hsc)
    assert out.shape == (2, 6, 6)
    background, obj = out[0], out[1]
    assert obj[:, :3].min() > 0.5 and obj[:, 3:].max() < 0.05
    assert background[:, 3:].min() > 0.5 and background[:, :3].max() < 0.05
    assert out.min() >= 0 and out.max() <= 1


def test_class_without_seeds_gets_a_zero_map():
    hsc = high_order_self_correlation([two_clusters()])
    cams = torch.zeros(2, 6, 6, device=DEVICE)
    cams[0, :, :3] = 0.9
    cams[1] = 0.2  # never ≥ 0.30
    out = scg_refine(cams, hsc)
    assert torch.all(out[2] == 0)
    assert out[1][:, :3].min() > 0.5


def test_bad_input_raises():
    with pytest.raises(ValueError, match="one grid"):
        high_order_self_correlation([torch.rand(4, 6, 6), torch.rand(4, 5, 6)])
    with pytest.raises(ValueError, match="hsc must be"):
        scg_refine(torch.rand(2, 6, 6), torch.rand(35, 35))
