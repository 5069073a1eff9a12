import os

import numpy as np
import pytest
import torch

from stages.refine.random_walk import (
    AffinityHead,
    AffinityTargets,
    affinity_loss,
    affinity_targets,
    confident_labels,
    neighbour_offsets,
    pair_affinity,
    random_walk,
    seeds_with_background,
    transition_matrix,
)

DEVICE = torch.device(os.environ.get("WSSS_TEST_DEVICE", "cpu"))


def test_neighbour_offsets():
    # radius 2: dy=0 -> dx=1; dy=1 -> dx in {-1, 0, 1} (dx²+1 < 4).
    assert neighbour_offsets(2) == [(0, 1), (1, -1), (1, 0), (1, 1)]
    offsets = neighbour_offsets(5)
    assert len(offsets) == 34 and len(set(offsets)) == 34  # IRN's radius-5 path count
    assert all(dy > 0 or (dy == 0 and dx > 0) for dy, dx in offsets)
    assert all(dy * dy + dx * dx < 25 for dy, dx in offsets)
    with pytest.raises(ValueError):
        neighbour_offsets(1)


def test_affinity_targets_on_a_constructed_map():
    # One row: background, background, class 3, class 3, unsure.
    labels = torch.tensor([[0, 0, 3, 3, 255]])
    targets = affinity_targets(labels, radius=2)
    right = neighbour_offsets(2).index((0, 1))
    assert targets.bg_pos[right, 0].tolist() == [True, False, False, False, False]
    assert targets.fg_pos[right, 0].tolist() == [False, False, True, False, False]
    # 0-3 differ; 3-255 is ignored; the last pixel's partner is outside the grid.
    assert targets.neg[right, 0].tolist() == [False, True, False, False, False]
    # Rows below are outside a 1-row grid: no other offset has any pair.
    assert not any(m[[i for i in range(4) if i != right]].any() for m in targets)


def test_affinity_targets_batch_shape():
    targets = affinity_targets(torch.zeros(2, 7, 9, dtype=torch.long), radius=5)
    assert all(m.shape == (2, 34, 7, 9) for m in targets)


def test_affinity_loss_values():
    # bg pair at affinity 1 and a neg pair at 0 cost ~0; fg pair at affinity e^-1 costs 1, weighted 1/4.
    aff = torch.tensor([1.0, float(np.exp(-1.0)), 0.0])
    targets = AffinityTargets(
        bg_pos=torch.tensor([True, False, False]),
        fg_pos=torch.tensor([False, True, False]),
        neg=torch.tensor([False, False, True]),
    )
    assert affinity_loss(aff, targets).item() == pytest.approx(0.25, abs=1e-4)
    with pytest.raises(ValueError, match="match"):
        affinity_loss(aff[:2], targets)


def test_affinity_head_and_pairs():
    features = [torch.rand(2, c, 32 // s, 32 // s) for c, s in [(8, 4), (16, 8), (32, 16), (32, 16)]]
    for stride in (4, 8):
        head = AffinityHead([8, 16, 32, 32], embed_dim=16, stride=stride)
        embedding = head(features)
        assert embedding.shape == (2, 16, 32 // stride, 32 // stride)
        aff = pair_affinity(embedding, radius=3)
        assert aff.shape == (2, len(neighbour_offsets(3)), 32 // stride, 32 // stride)
        assert aff.min() >= 0 and aff.max() <= 1
        loss = affinity_loss(aff, affinity_targets(torch.zeros(2, *aff.shape[-2:], dtype=torch.long), 3))
        loss.backward()
        assert head.embed.weight.grad is not None
    with pytest.raises(ValueError, match="stride"):
        AffinityHead([8, 16, 32, 32], stride=16)


def test_pair_affinity_of_equal_embeddings_is_one_inside_and_zero_outside():
    aff = pair_affinity(torch.ones(1, 4, 3, 3), radius=2)
    right = neighbour_offsets(2).index((0, 1))
    assert aff[0, right, :, :2].eq(1).all() and aff[0, right, :, 2].eq(0).all()


def two_region_affinity(height: int, width: int, radius: int, edge: int) -> torch.Tensor:
    """Pair affinities 1 within the columns left of `edge` and within those right of it, 0.01 across."""
    offsets = neighbour_offsets(radius)
    aff = torch.ones(len(offsets), height, width, dtype=torch.float64)
    columns = torch.arange(width)
    for p, (_, dx) in enumerate(offsets):
        crossing = (columns < edge) != (columns + dx < edge)
        aff[p, :, crossing] = 0.01
    return aff


def test_transition_matrix_is_sparse_and_row_stochastic():
    offsets = neighbour_offsets(5)
    aff = torch.rand(len(offsets), 6, 7, dtype=torch.float64)
    matrix = transition_matrix(aff, offsets)
    assert matrix.is_sparse and matrix.shape == (42, 42)
    assert torch.allclose(torch.sparse.sum(matrix, dim=1).to_dense(), torch.ones(42, dtype=torch.float64))
    # A^β is symmetric, so T = D⁻¹A satisfies D T = (D T)ᵀ.
    dense = matrix.to_dense()
    degree_times_t = dense / dense.diagonal()[:, None]  # the self-loop A_ii = 1 gives T_ii = 1/D_i
    assert torch.allclose(degree_times_t, degree_times_t.T)


def test_sparse_walk_equals_a_dense_matrix_power():
    offsets = neighbour_offsets(5)
    generator = torch.Generator().manual_seed(0)
    aff = torch.rand(len(offsets), 6, 6, generator=generator, dtype=torch.float64)
    matrix = transition_matrix(aff, offsets, beta=2)
    seeds = torch.rand(3, 6, 6, generator=generator, dtype=torch.float64)
    walked = random_walk(matrix, seeds, steps=256)
    expected = (torch.linalg.matrix_power(matrix.to_dense(), 256) @ seeds.reshape(3, 36).T).T
    expected[1:] /= expected[1:].max() + 1e-5
    assert torch.allclose(walked, expected.reshape(3, 6, 6), atol=1e-8)


def test_walk_fills_a_region_and_stops_at_a_low_affinity_edge():
    offsets = neighbour_offsets(5)
    aff = two_region_affinity(8, 12, radius=5, edge=6)
    matrix = transition_matrix(aff, offsets, beta=10)
    cams = torch.zeros(1, 8, 12, dtype=torch.float64)
    cams[0, 3, 1] = 1.0  # one seed in the left region
    walked = random_walk(matrix, seeds_with_background(cams), steps=256)
    assert torch.allclose(walked[0], torch.full((8, 12), 0.25, dtype=torch.float64))
    labels = walked.argmax(dim=0)
    assert labels[:, :6].eq(1).all() and labels[:, 6:].eq(0).all()


def test_walk_rejects_mismatched_seeds():
    offsets = neighbour_offsets(2)
    matrix = transition_matrix(torch.rand(len(offsets), 4, 4), offsets)
    with pytest.raises(ValueError, match="pixels"):
        random_walk(matrix, torch.rand(2, 4, 5))


def test_confident_labels_scheme():
    # Image: a white square (rows/cols 8..15) inside a grey ring (5..18) on black; the CAM of class 7 is
    # high on the square, middling on the ring, zero far away. The ring's colour is its own, so neither
    # CRF moves it: the foreground map calls it background, the background map calls it class 7.
    image = np.zeros((24, 24, 3), dtype=np.uint8)
    image[5:19, 5:19] = 128
    image[8:16, 8:16] = 255
    cam = np.zeros((1, 24, 24), dtype=np.float32)
    cam[0, 5:19, 5:19] = 0.15  # neither ≥ 0.30 nor ≤ 0.05: unsure
    cam[0, 8:16, 8:16] = 0.9
    labels = confident_labels(cam, [7], image)
    assert labels.dtype == np.uint8 and labels.shape == (24, 24)
    assert (labels[9:15, 9:15] == 7).all()
    assert (labels[0:3, :] == 0).all()
    assert (labels[5:7, 5:19] == 255).all()
    assert set(np.unique(labels)) == {0, 7, 255}
    with pytest.raises(ValueError, match="class ids"):
        confident_labels(cam, [0], image)
