"""Dataset readers on tiny hand-made folders: every format, and every bad input naming its file."""

from __future__ import annotations

import json
import re
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from stages.common.datasets import (
    VOC_CLASSES,
    CocoDataset,
    FolderDataset,
    VocDataset,
    open_dataset,
    voc_palette,
)
from stages.common.datasets import toy as toy_module
from stages.common.datasets.coco import decode_rle_string, instance_mask, paint_instances
from stages.common.errors import DatasetError

# --- writers for made-up datasets ------------------------------------------------------------------


def write_jpg(path: Path, height: int, width: int, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (value, value // 2, 200)).save(path, quality=95)


def write_palette_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(mask.astype(np.uint8))
    img.putpalette(voc_palette())
    img.save(path)


def write_xml(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    objects = "".join(f"<object><name>{n}</name><part><name>head</name></part></object>" for n in names)
    path.write_text(f"<annotation><size><width>1</width><height>1</height></size>{objects}</annotation>")


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def mask_with_void(height: int, width: int, cls: int) -> np.ndarray:
    """A block of class ``cls`` in the top-left quarter, ringed by a 1 px void line."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2, : width // 2] = 255
    mask[: height // 2 - 1, : width // 2 - 1] = cls
    return mask


# Three images of different sizes: (id, (H, W), classes in its XML).
VOC_IMAGES = [("a", (40, 30), ["cat"]), ("b", (32, 48), ["dog", "cat", "cat"]), ("c", (24, 24), ["dog"])]


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """A VOC devkit of three images: train = a, b; val = c; classes background, cat, dog."""
    root = tmp_path / "VOC2012"
    write_lines(root / "classes.txt", ["background", "cat", "dog"])
    for image_id, (h, w), names in VOC_IMAGES:
        write_jpg(root / "JPEGImages" / f"{image_id}.jpg", h, w)
        write_xml(root / "Annotations" / f"{image_id}.xml", names)
        write_palette_png(root / "SegmentationClass" / f"{image_id}.png", mask_with_void(h, w, 1))
    write_lines(root / "ImageSets" / "Segmentation" / "train.txt", ["a", "b"])
    write_lines(root / "ImageSets" / "Segmentation" / "val.txt", ["c"])
    return root


def raises_naming(path: Path, *patterns: str) -> AbstractContextManager:
    """pytest.raises for a DatasetError whose one-line message names ``path`` and matches ``patterns``."""
    lookaheads = "".join(f"(?=.*{p})" for p in (re.escape(str(path)), *patterns))
    return pytest.raises(DatasetError, match=lookaheads)


# --- VOC ---------------------------------------------------------------------------------------------


def test_voc_reads_labels_images_masks(voc_root: Path) -> None:
    ds = open_dataset(f"voc:{voc_root}")
    assert ds.name == "voc" and ds.class_names == ("background", "cat", "dog")
    assert ds.split_names() == ["train", "val"]
    assert ds.ids("train") == ["a", "b"]
    assert ds.labels("b") == (1, 2)  # from the XML: duplicates merged, <part> names ignored, sorted
    image = ds.image("b")
    assert image.dtype == np.uint8 and image.shape == (32, 48, 3)
    assert ds.image_size("a") == (40, 30)
    mask = ds.mask("a")
    assert mask.dtype == np.uint8 and mask.shape == (40, 30)
    assert set(np.unique(mask)) == {0, 1, 255}
    assert ds.has_masks("train") and ds.has_masks("val")
    assert np.allclose(ds.mean_pixel("train"), [100, 50, 200], atol=2)


def test_voc_describe_and_fingerprint(voc_root: Path) -> None:
    ds = VocDataset(voc_root)
    described = ds.describe("train")
    assert json.loads(json.dumps(described)) == described
    assert described["num_images"] == 2 and described["class_names"][0] == "background"
    assert described["fingerprint"] == ds.fingerprint("train") and len(ds.fingerprint("train")) == 16
    assert ds.fingerprint("train") != ds.fingerprint("val")
    write_xml(voc_root / "Annotations" / "a.xml", ["dog"])
    assert VocDataset(voc_root).fingerprint("train") != ds.fingerprint("train")


def test_voc_default_classes(voc_root: Path) -> None:
    (voc_root / "classes.txt").unlink()
    write_xml(voc_root / "Annotations" / "a.xml", ["tvmonitor", "aeroplane"])
    ds = VocDataset(voc_root)
    assert ds.class_names == VOC_CLASSES and len(ds.class_names) == 21
    assert ds.labels("a") == (1, 20)


def test_voc_train_aug_from_segmentation_class_aug(voc_root: Path) -> None:
    aug = voc_root / "SegmentationClassAug"
    aug.mkdir()
    for image_id in ("c", "s1", "s2"):  # c is VOC val: must stay out of train_aug
        write_jpg(voc_root / "JPEGImages" / f"{image_id}.jpg", 20, 20)
        Image.fromarray(np.full((20, 20), 2, np.uint8)).save(aug / f"{image_id}.png")
    ds = VocDataset(voc_root)
    assert ds.split_names() == ["train", "train_aug", "val"]
    # (SegmentationClassAug ∪ VOC train) − VOC val = {s1, s2} ∪ {a, b}
    assert ds.ids("train_aug") == ["a", "b", "s1", "s2"]
    assert ds.has_masks("train_aug")
    assert set(np.unique(ds.mask("s1"))) == {2}  # grayscale Aug PNG
    assert ds.labels("s1") == (2,)  # no XML: an SBD-only image takes labels from its SBD mask

    write_lines(voc_root / "ImageSets" / "SegmentationAug" / "train_aug.txt", ["s2", "a"])
    assert VocDataset(voc_root).ids("train_aug") == ["s2", "a"]


def test_voc_train_aug_from_sbd_release_mat(voc_root: Path) -> None:
    sbd = voc_root / "benchmark_RELEASE" / "dataset"
    write_lines(sbd / "train.txt", ["s1", "a"])
    write_lines(sbd / "val.txt", ["s2", "c"])
    (sbd / "cls").mkdir()
    segmentation = np.zeros((20, 22), dtype=np.uint8)
    segmentation[5:10, 3:8] = 2
    for image_id in ("s1", "s2"):
        write_jpg(voc_root / "JPEGImages" / f"{image_id}.jpg", 20, 22)
        scipy.io.savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": segmentation}})
    write_xml(voc_root / "Annotations" / "s2.xml", ["cat"])
    ds = VocDataset(voc_root)
    # (SBD train ∪ SBD val ∪ VOC train) − VOC val = {s1, a, s2, c} ∪ {a, b} − {c}
    assert ds.ids("train_aug") == ["a", "b", "s1", "s2"]
    assert np.array_equal(ds.mask("s1"), segmentation)
    assert ds.labels("s1") == (2,)  # from the .mat: no XML
    assert ds.labels("s2") == (1,)  # the XML wins over the mask when there is one


# --- COCO --------------------------------------------------------------------------------------------


def test_decode_rle_string_by_hand() -> None:
    # One character per 5-bit group, value + 48. "1231": runs 1, 2, 3, and the 4th run is stored as
    # the difference to the 2nd: 1 + 2 = 3.
    assert decode_rle_string("1231") == [1, 2, 3, 3]
    # "X1": 'X' = 88 - 48 = 40 = 0b101000 -> low bits 8 with the continuation bit 0x20; '1' adds
    # 1 << 5 = 32: one run of 40. Then '0': a run of 0.
    assert decode_rle_string("X10") == [40, 0]
    # 'N' = 30 = 0b11110 ends a number with the sign bit 0x10: 30 - 32 = -2, plus the 2nd run 5 -> 3.
    assert decode_rle_string("254N") == [2, 5, 4, 3]


def test_coco_polygon_and_both_rles(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    write_jpg(root / "val2014" / "COCO_val2014_000000000042.jpg", 3, 4)
    write_jpg(root / "val2014" / "COCO_val2014_000000000043.jpg", 6, 6)
    # Image 42 is 3x4; runs go down the columns. Compressed "1261" = runs 1, 2, 6 and 1 + 2 = 3:
    # col0 = 0,1,1; col1 and col2 = 0; col3 = 1,1,1.
    compressed = {"size": [3, 4], "counts": "1261"}
    # Uncompressed crowd runs [6, 6]: col2 and col3, overlapping the instance on col3.
    crowd = {"size": [3, 4], "counts": [6, 6]}
    content = {
        "images": [
            {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 3, "width": 4},
            {"id": 43, "file_name": "COCO_val2014_000000000043.jpg", "height": 6, "width": 6},
        ],
        "categories": [{"id": 7, "name": "train"}, {"id": 1, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 7, "segmentation": compressed, "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 1, "segmentation": crowd, "iscrowd": 1},
            {
                "id": 3,
                "image_id": 43,
                "category_id": 1,
                "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]],
                "iscrowd": 0,
            },
        ],
    }
    write_lines(root / "annotations" / "instances_val2014.json", [json.dumps(content)])
    ds = open_dataset(f"coco:{root}")
    assert isinstance(ds, CocoDataset)
    assert ds.class_names == ("background", "person", "train")  # sorted by COCO id
    assert ds.split_names() == ["val"]
    assert ds.ids("val") == ["COCO_val2014_000000000042", "COCO_val2014_000000000043"]
    assert ds.labels("COCO_val2014_000000000042") == (1, 2)
    # col2 is the crowd's and free -> 255; col3 is the instance's, the crowd does not overwrite it.
    expected = np.array([[0, 0, 255, 2], [2, 0, 255, 2], [2, 0, 255, 2]], dtype=np.uint8)
    assert np.array_equal(ds.mask("COCO_val2014_000000000042"), expected)
    square = ds.mask("COCO_val2014_000000000043")
    assert square[1:5, 1:5].tolist() == [[1] * 4] * 4 and square.sum() == 16
    assert ds.has_masks("val")


def test_coco_smaller_instance_painted_over_larger() -> None:
    big = {"size": [2, 2], "counts": [0, 4]}
    small = {"size": [2, 2], "counts": [0, 1, 3]}
    anns = [
        {"category_id": 5, "segmentation": small, "iscrowd": 0},
        {"category_id": 9, "segmentation": big, "iscrowd": 0},
    ]
    assert paint_instances(2, 2, anns, {5: 1, 9: 2}).tolist() == [[1, 2], [2, 2]]
    assert instance_mask([[0, 0, 1, 0]], 2, 2).sum() == 0  # degenerate polygon: nothing


# --- folder ------------------------------------------------------------------------------------------


def test_folder_with_masks_and_splits(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    write_jpg(root / "images" / "x.jpg", 10, 12)
    (root / "images").mkdir(exist_ok=True)
    Image.new("RGB", (8, 9), (1, 2, 3)).save(root / "images" / "y.png")
    write_lines(root / "labels.csv", ["image_id,classes", "x,cat;dog", "y,dog cat", "z,"])
    ds = FolderDataset(root)
    assert ds.class_names == ("background", "cat", "dog")
    assert ds.split_names() == ["train"]
    with raises_naming(root / "labels.csv", "'z'"):
        ds.ids("train")  # z has a row but no image
    write_lines(root / "splits" / "train.txt", ["x"])
    write_lines(root / "splits" / "val.txt", ["y"])
    ds = open_dataset(f"folder:{root}")
    assert ds.split_names() == ["train", "val"]
    assert ds.labels("x") == (1, 2) and ds.labels("y") == (1, 2)
    assert ds.image("y").shape == (9, 8, 3)
    assert not ds.has_masks("train")
    write_palette_png(root / "masks" / "x.png", mask_with_void(10, 12, 2))
    assert ds.has_masks("train") and ds.mask("x").max() == 255


# --- open_dataset and the toy cache ------------------------------------------------------------------


def test_open_dataset_refuses_unknown_specs(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="voc:PATH.*toy:PATH"):
        open_dataset("pascal:/data")
    with raises_naming(tmp_path / "nope", "no such folder"):
        open_dataset(f"voc:{tmp_path / 'nope'}")
    with raises_naming(tmp_path, "JPEGImages"):
        open_dataset(f"voc:{tmp_path}")


def test_toy_spec_generates_once_and_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real_make_toy = toy_module.make_toy

    def small_toy(out: Path) -> Path:
        calls.append(out)
        return real_make_toy(out, n_train=2, n_val=1, max_size=64)

    def killed_toy(out: Path) -> Path:
        real_make_toy(out, n_train=1, n_val=0, max_size=64)
        raise KeyboardInterrupt

    monkeypatch.setattr(toy_module, "make_toy", killed_toy)
    with pytest.raises(KeyboardInterrupt):
        open_dataset("toy", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half dataset, no staging folder left behind

    monkeypatch.setattr(toy_module, "make_toy", small_toy)
    ds = open_dataset("toy", cache_dir=tmp_path)
    assert ds.name == "toy" and ds.root == tmp_path / "toy_data" and len(ds.ids("train")) == 2
    open_dataset("toy", cache_dir=tmp_path)
    assert len(calls) == 1 and calls[0].parent == tmp_path
    with pytest.raises(DatasetError, match="toy:PATH"):
        open_dataset("toy")


# --- bad input: each names its file ------------------------------------------------------------------


def test_corrupt_and_truncated_images(voc_root: Path) -> None:
    path = voc_root / "JPEGImages" / "a.jpg"
    path.write_bytes(b"this is not a jpeg")
    ds = VocDataset(voc_root)
    with raises_naming(path, "cannot decode"):
        ds.image("a")
    with raises_naming(path):
        ds.image_size("a")
    big = voc_root / "JPEGImages" / "b.jpg"
    noisy = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(big, quality=95)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    with raises_naming(big, "cannot decode"):
        ds.image("b")


def test_missing_mask(voc_root: Path) -> None:
    (voc_root / "SegmentationClass" / "c.png").unlink()
    ds = VocDataset(voc_root)
    assert not ds.has_masks("val") and ds.has_masks("train")
    with raises_naming(voc_root / "SegmentationClass" / "c.png", "not found"):
        ds.mask("c")


def test_unknown_class_in_xml(voc_root: Path) -> None:
    xml = voc_root / "Annotations" / "a.xml"
    write_xml(xml, ["cat", "unicorn"])
    with raises_naming(xml, "'unicorn'", "classes.txt"):
        VocDataset(voc_root).labels("a")


def test_xml_that_is_not_xml(voc_root: Path) -> None:
    xml = voc_root / "Annotations" / "a.xml"
    xml.write_bytes(b"\x89PNG not xml at all")
    with raises_naming(xml, "XML"):
        VocDataset(voc_root).labels("a")


def test_id_with_no_image(voc_root: Path) -> None:
    split_file = voc_root / "ImageSets" / "Segmentation" / "train.txt"
    write_lines(split_file, ["a", "ghost"])
    with raises_naming(split_file, "'ghost'"):
        VocDataset(voc_root).ids("train")


def test_empty_and_unknown_split(voc_root: Path) -> None:
    write_lines(voc_root / "ImageSets" / "Segmentation" / "test.txt", [])
    ds = VocDataset(voc_root)
    with pytest.raises(DatasetError, match="'test' lists no images"):
        ds.ids("test")
    with pytest.raises(DatasetError, match="known splits: test, train, val"):
        ds.ids("trainval")


def test_mask_of_wrong_size(voc_root: Path) -> None:
    path = voc_root / "SegmentationClass" / "a.png"
    write_palette_png(path, np.zeros((30, 40), np.uint8))  # transposed: the image is 40x30
    with raises_naming(path, "30x40", "40x30"):
        VocDataset(voc_root).mask("a")


def test_mask_with_ids_out_of_range(voc_root: Path) -> None:
    path = voc_root / "SegmentationClass" / "a.png"
    mask = mask_with_void(40, 30, 1)
    mask[0, 0] = 7
    write_palette_png(path, mask)
    with raises_naming(path, r"\[7\]", "0..2"):
        VocDataset(voc_root).mask("a")


def test_rgb_mask_refused(voc_root: Path) -> None:
    path = voc_root / "SegmentationClass" / "a.png"
    Image.new("RGB", (30, 40)).save(path)
    with raises_naming(path, "palette"):
        VocDataset(voc_root).mask("a")


# --- image modes -------------------------------------------------------------------------------------


def test_grayscale_cmyk_rgba_and_16bit_become_rgb(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    (root / "images").mkdir(parents=True)
    Image.new("L", (5, 4), 90).save(root / "images" / "gray.jpg", quality=100)
    Image.new("CMYK", (5, 4), (0, 255, 255, 0)).save(root / "images" / "cmyk.jpg", quality=100)
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(root / "images" / "rgba.png")
    Image.fromarray(np.full((4, 5), 65535 // 2, np.uint16)).save(root / "images" / "deep.png")
    write_lines(root / "labels.csv", ["image_id,classes", "gray,a", "cmyk,a", "rgba,a", "deep,a"])
    ds = FolderDataset(root)
    pixels = {i: ds.image(i) for i in ds.ids("train")}
    for image in pixels.values():
        assert image.dtype == np.uint8 and image.shape == (4, 5, 3)
    assert np.allclose(pixels["gray"], 90, atol=2)
    assert np.allclose(pixels["cmyk"][0, 0], [255, 0, 0], atol=3)  # no magenta or yellow ink = red
    assert pixels["rgba"][0, 0].tolist() == [10, 20, 30]
    assert np.allclose(pixels["deep"], 127, atol=1)  # scaled down, not clipped to white


def test_coco_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "annotations" / "instances_val2014.json"
    write_lines(path, ["{not json"])
    with raises_naming(path, "not a COCO instances file"):
        CocoDataset(tmp_path)
    image = {"id": 1, "file_name": "x.jpg", "height": 2, "width": 2}
    stray = {"id": 9, "image_id": 1, "category_id": 99, "segmentation": [], "iscrowd": 0}
    content = {"images": [image], "categories": [{"id": 1, "name": "a"}], "annotations": [stray]}
    write_lines(path, [json.dumps(content)])
    with raises_naming(path, "category 99"):
        CocoDataset(tmp_path)


def test_a_cached_toy_of_an_older_generator_is_remade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_make_toy = toy_module.make_toy
    cached = real_make_toy(tmp_path / "toy_data", n_train=2, n_val=1, max_size=64)
    assert toy_module.is_current_toy(cached) and toy_module.is_current_toy(cached, n_train=2)
    assert not toy_module.is_current_toy(cached, n_train=200)
    record = cached / toy_module.TOY_SETTINGS
    settings = json.loads(record.read_text())
    record.write_text(json.dumps({**settings, "generator": settings["generator"] - 1}))
    assert not toy_module.is_current_toy(cached)
    monkeypatch.setattr(
        toy_module, "make_toy", lambda out: real_make_toy(out, n_train=3, n_val=1, max_size=64)
    )
    remade = open_dataset("toy", cache_dir=tmp_path)
    assert remade.root == cached and len(remade.ids("train")) == 3 and toy_module.is_current_toy(cached)
    assert [p.name for p in tmp_path.iterdir()] == ["toy_data"]  # nothing left aside
    record.unlink()  # a folder written before the record existed is remade too
    assert not toy_module.is_current_toy(cached)
