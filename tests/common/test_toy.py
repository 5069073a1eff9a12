"""The toy generator: deterministic, readable as VOC, and hard in the intended ways."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from stages.common.datasets import TOY_CLASSES, VocDataset, make_toy, open_dataset
from stages.common.datasets.base import class_indices
from stages.common.datasets.toy import render_scene


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_files(tmp_path: Path) -> None:
    first = folder_bytes(make_toy(tmp_path / "a", seed=3, n_train=3, n_val=1, max_size=64))
    again = folder_bytes(make_toy(tmp_path / "b", seed=3, n_train=3, n_val=1, max_size=64))
    other = folder_bytes(make_toy(tmp_path / "c", seed=4, n_train=3, n_val=1, max_size=64))
    assert first == again
    assert first.keys() == other.keys() and first != other


def test_readable_as_voc_with_variable_sizes(toy_root: Path) -> None:
    ds = open_dataset(f"voc:{toy_root}")
    assert ds.class_names == TOY_CLASSES
    assert len(ds.ids("train")) == 24 and len(ds.ids("val")) == 8
    assert open_dataset(f"toy:{toy_root}").fingerprint("val") == ds.fingerprint("val")
    sizes = {ds.image_size(i) for i in ds.ids("train")}
    assert len({h for h, _ in sizes}) > 3 and len({w for _, w in sizes}) > 3
    assert all(64 <= h <= 96 and 64 <= w <= 96 for h, w in sizes)
    assert ds.has_masks("train") and ds.has_masks("val")


def test_labels_match_masks_and_masks_have_void_borders(toy_root: Path) -> None:
    ds = VocDataset(toy_root)
    objects_per_image = Counter()
    for image_id in ds.ids("train") + ds.ids("val"):
        mask = ds.mask(image_id)
        assert ds.labels(image_id) == class_indices(mask)
        assert 1 <= len(ds.labels(image_id)) <= 3
        objects = mask[(mask != 0) & (mask != 255)]
        assert objects.size > 0
        # Every object/background edge passes through void: no object pixel touches background directly.
        horizontal = {tuple(p) for p in zip(mask[:, :-1].ravel(), mask[:, 1:].ravel(), strict=True)}
        assert not any((a == 0) != (b == 0) and 255 not in (a, b) for a, b in horizontal)
        objects_per_image[len(ds.labels(image_id))] += 1
    assert len(objects_per_image) >= 2


def test_head_is_small_and_only_heads_tell_classes_apart() -> None:
    rng = np.random.default_rng(0)
    head_share: list[float] = []
    head_colour: dict[int, list[np.ndarray]] = {}
    body_colour: dict[int, list[np.ndarray]] = {}
    for _ in range(40):
        scene = render_scene(rng, 96, 96)
        for obj in scene.objects:
            if obj.head.sum() == obj.full_head_area:  # unoccluded heads only
                head_share.append(obj.full_head_area / obj.full_area)
            body = obj.region & ~obj.head
            head_colour.setdefault(obj.class_index, []).append(scene.image[obj.head].mean(axis=0))
            body_colour.setdefault(obj.class_index, []).append(scene.image[body].mean(axis=0))
    assert 0.08 < np.median(head_share) < 0.16 and max(head_share) < 0.2
    assert sorted(head_colour) == [1, 2, 3, 4, 5]
    heads = np.array([np.mean(head_colour[c], axis=0) for c in sorted(head_colour)])
    bodies = np.array([np.mean(body_colour[c], axis=0) for c in sorted(body_colour)])

    def closest_pair(means: np.ndarray) -> float:
        gaps = np.linalg.norm(means[:, None] - means[None], axis=2)
        return float(gaps[~np.eye(len(means), dtype=bool)].min())

    def farthest_pair(means: np.ndarray) -> float:
        return float(np.linalg.norm(means[:, None] - means[None], axis=2).max())

    assert closest_pair(heads) > 50  # every pair of classes differs clearly in head colour
    assert farthest_pair(bodies) < 20  # and no pair in body colour


def test_boats_sit_mostly_on_water() -> None:
    rng = np.random.default_rng(1)
    textures = Counter()
    for _ in range(60):
        scene = render_scene(rng, 64, 64)
        if scene.objects and scene.objects[0].class_index == TOY_CLASSES.index("boat"):
            textures[scene.texture] += 1
    assert textures["water"] > 0.6 * sum(textures.values())
