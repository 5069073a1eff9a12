import os

import pytest
import torch

from stages.refine.pamr import neighbour_shifts, pamr

DEVICE = torch.device(os.environ.get("WSSS_TEST_DEVICE", "cpu"))


def pamr_loop(image: torch.Tensor, masks: torch.Tensor, dilations, iterations: int) -> torch.Tensor:
    """Per-pixel PAMR written from the paper's formulas, one image (3, H, W), masks (K, H, W)."""
    _, height, width = image.shape
    shifts = neighbour_shifts(dilations)

    def at(x: torch.Tensor, y: int, xx: int, dy: int, dx: int) -> torch.Tensor:
        return x[:, min(max(y + dy, 0), height - 1), min(max(xx + dx, 0), width - 1)]

    alpha = torch.zeros(len(shifts), height, width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            neighbours = torch.stack([at(image, y, x, dy, dx) for dy, dx in shifts])  # (S, 3)
            sample = torch.cat([image[:, y, x][None], neighbours])
            sigma = sample.std(dim=0, correction=0)
            kappa = (-(image[:, y, x] - neighbours).abs() / (0.1 * sigma + 1e-8)).mean(dim=1)
            alpha[:, y, x] = torch.softmax(kappa, dim=0)
    for _ in range(iterations):
        new = torch.zeros_like(masks)
        for y in range(height):
            for x in range(width):
                for s, (dy, dx) in enumerate(shifts):
                    new[:, y, x] += alpha[s, y, x] * at(masks, y, x, dy, dx)
        masks = new
    return masks


def test_neighbour_shifts_are_48_by_default():
    shifts = neighbour_shifts((1, 2, 4, 8, 12, 24))
    assert len(shifts) == 48 and len(set(shifts)) == 48
    assert (24, -24) in shifts and (0, 0) not in shifts


def test_output_shape_and_range():
    image = torch.rand(2, 3, 12, 10, device=DEVICE)
    masks = torch.rand(2, 4, 12, 10, device=DEVICE)
    out = pamr(image, masks)
    assert out.shape == (2, 4, 12, 10)
    # Each step is a convex combination of the input values.
    assert out.min() >= masks.min() - 1e-6 and out.max() <= masks.max() + 1e-6


def test_image_is_resized_to_the_masks():
    out = pamr(torch.rand(1, 3, 32, 40), torch.rand(1, 2, 8, 10))
    assert out.shape == (1, 2, 8, 10)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="image must be"):
        pamr(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match="batch size"):
        pamr(torch.rand(2, 3, 8, 8), torch.rand(1, 2, 8, 8))


def test_seed_spreads_over_a_uniform_region_and_stops_at_an_edge():
    image = torch.zeros(1, 3, 16, 16, device=DEVICE)
    image[..., 8:] = 1.0  # left half black, right half white
    masks = torch.zeros(1, 1, 16, 16, device=DEVICE)
    masks[0, 0, 4, 2] = 1.0
    out = pamr(image, masks)[0, 0]
    left, right = out[:, :8], out[:, 8:]
    # The seed has spread to the whole left half (no pixel left at 0) ...
    assert left.min() > 1e-3
    # ... while the right half, across the edge, gets nothing measurable.
    assert right.max() < 1e-6 * left.min()


def test_vectorised_equals_the_per_pixel_loop():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 5, 6, generator=generator, dtype=torch.float64)
    masks = torch.rand(1, 2, 5, 6, generator=generator, dtype=torch.float64)
    dilations, iterations = (1, 2, 4), 3
    expected = pamr_loop(image[0], masks[0], dilations, iterations)
    assert torch.allclose(pamr(image, masks, dilations, iterations)[0], expected, atol=1e-10)
