"""The bad-input catalogue (docs/reliability.md), through the real command line.

Each case damages one file of a copy of the toy dataset (or the artifact) and runs a real `wsss`
process: the user sees exactly one line on stderr and a non-zero exit code, or, for inputs the reader
converts (grayscale, CMYK, 16-bit), a normal run.
"""

from __future__ import annotations

import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from stages.common.artifacts import Provenance, begin
from stages.common.datasets import open_dataset

ID = "val_00000"


@pytest.fixture
def setup(tmp_path: Path, toy_root: Path) -> tuple[Path, Path, Path]:
    """(working dir, dataset copy, labels artifact of its val split made before any damage)."""
    data = tmp_path / "toy"
    shutil.copytree(toy_root, data)
    dataset = open_dataset(f"voc:{data}")
    prov = Provenance(kind="labels", stage="crf", config={"x": 1}, dataset=dataset.describe("val"))
    status = begin(tmp_path / "run" / "pseudo.h5", prov)
    with status.writer as writer:
        for image_id in dataset.ids("val"):
            writer.write_image(image_id, labels=dataset.mask(image_id))
        path = writer.finish()
    return tmp_path, data, path


def png_header_claiming(width: int, height: int) -> bytes:
    """A small, valid PNG whose header claims ``width`` x ``height`` RGB pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(bytes(64)))
        + chunk(b"IEND", b"")
    )


def _image(data: Path) -> Path:
    return data / "JPEGImages" / f"{ID}.jpg"


def _mask(data: Path) -> Path:
    return data / "SegmentationClass" / f"{ID}.png"


def _resave(path: Path, convert: Callable[[Image.Image], Image.Image], **save: object) -> None:
    with Image.open(path) as img:
        img.load()
        converted = convert(img)
    converted.save(path, **save)


def corrupt_image(data: Path) -> None:
    _image(data).write_bytes(b"this is not a JPEG at all" * 20)


def truncated_image(data: Path) -> None:
    raw = _image(data).read_bytes()
    _image(data).write_bytes(raw[: len(raw) // 2])


def grayscale_image(data: Path) -> None:
    _resave(_image(data), lambda img: img.convert("L"), format="JPEG")


def cmyk_image(data: Path) -> None:
    _resave(_image(data), lambda img: img.convert("CMYK"), format="JPEG")


def sixteen_bit_image(data: Path) -> None:
    def wide(img: Image.Image) -> Image.Image:
        gray = np.asarray(img.convert("L")).astype(np.uint16) * 257
        return Image.fromarray(gray)

    _resave(_image(data), wide, format="PNG")  # a 16-bit PNG behind a .jpg name, as copied datasets have


def huge_image(data: Path) -> None:
    _image(data).write_bytes(png_header_claiming(100_000, 100_000))


def mask_wrong_size(data: Path) -> None:
    _resave(_mask(data), lambda img: img.resize((img.width + 3, img.height)), format="PNG")


def mask_class_out_of_range(data: Path) -> None:
    def add_class_9(img: Image.Image) -> Image.Image:
        values = np.asarray(img).copy()
        values[0, 0] = 9
        out = Image.fromarray(values, mode="P")
        out.putpalette(img.getpalette())
        return out

    _resave(_mask(data), add_class_9, format="PNG")


def xml_not_xml(data: Path) -> None:
    (data / "Annotations" / f"{ID}.xml").write_text("<annotation><object><name>dog</name>")


def empty_image_list(data: Path) -> None:
    (data / "ImageSets" / "Segmentation" / "val.txt").write_text("")


def class_list_differs(data: Path) -> None:
    classes = data / "classes.txt"
    classes.write_text(classes.read_text() + "horse\n")


# case -> (damage, command, expected line with {data}, {run}, {artifact} filled in; None = runs fine)
CASES: dict[str, tuple[Callable[[Path], None], str, str | None]] = {
    "corrupt image": (
        corrupt_image,
        "show",
        "error: {data}/JPEGImages/val_00000.jpg: cannot decode image (cannot identify image file "
        "'{data}/JPEGImages/val_00000.jpg'); re-copy the file or remove its id from the split",
    ),
    "truncated image": (
        truncated_image,
        "show",
        "error: {data}/JPEGImages/val_00000.jpg: cannot decode image (image file is truncated ({nbytes} bytes not "
        "processed)); re-copy the file or remove its id from the split",
    ),
    "grayscale image": (grayscale_image, "show", None),
    "CMYK image": (cmyk_image, "show", None),
    "16-bit image": (sixteen_bit_image, "show", None),
    "huge image (PNG header claiming 100000x100000)": (
        huge_image,
        "eval",
        "error: {data}/JPEGImages/val_00000.jpg: image too large to decode safely (Image size (10000000000 "
        "pixels) exceeds limit of 178956970 pixels, could be decompression bomb DOS attack.); shrink it or "
        "remove its id from the split",
    ),
    "mask of the wrong size": (
        mask_wrong_size,
        "eval",
        "error: {data}/SegmentationClass/val_00000.png: mask is {h}x{w3} but its image is {h}x{w} (HxW); "
        "redraw the mask at the image's size",
    ),
    "mask with a class id out of range": (
        mask_class_out_of_range,
        "eval",
        "error: {data}/SegmentationClass/val_00000.png: mask holds values [9] outside 0..5 and 255 (void); "
        "fix the mask or the class list",
    ),
    "XML that is not XML": (
        xml_not_xml,
        "eval",
        "error: {data}/Annotations/val_00000.xml: not a readable XML annotation (no element found: line 1, "
        "column 36); re-copy it from the devkit",
    ),
    "empty image list": (
        empty_image_list,
        "eval",
        "error: {data}: split 'val' lists no images; add ids or pick a split",
    ),
    "dataset whose class list differs": (
        class_list_differs,
        "show",
        "error: {artifact}: made for classes ['background', 'boat', 'plane', 'car', 'dog', 'bird'] but this "
        "dataset has ['background', 'boat', 'plane', 'car', 'dog', 'bird', 'horse']; rerun its stage on "
        "this dataset or pass the right --run",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_dataset_input(case: str, setup: tuple[Path, Path, Path], run_wsss) -> None:
    cwd, data, artifact = setup
    with Image.open(_image(data)) as img:
        w, h = img.size
    damage, command, expected = CASES[case]
    damage(data)
    args = [command, str(artifact), "--run", str(cwd / "run"), "--data", f"voc:{data}"]
    if command == "show":
        args += ["--images", "8"]
    done = run_wsss(*args, cwd=cwd)
    if expected is None:
        assert done.returncode == 0, done.stderr
        return
    line = expected.format(data=data, run=cwd / "run", artifact=artifact, h=h, w=w, w3=w + 3, nbytes="NBYTES")
    # PIL's count of unprocessed bytes depends on the image's content: any count is the same message.
    assert re.fullmatch(re.escape(line).replace("NBYTES", r"\d+"), done.stderr.strip()), done.stderr
    assert done.returncode == 2


def _scores_artifact(path: Path, toy_root: Path) -> Path:
    dataset = open_dataset(f"voc:{toy_root}").describe("val")
    status = begin(path, Provenance(kind="scores", stage="mine-ae", config={}, dataset=dataset))
    with status.writer as writer:
        writer.write_image("val_00000", scores=np.ones((1, 4, 4)), classes=(1,), stride=4)
        return writer.finish()


def zero_byte(path: Path) -> None:
    path.write_bytes(b"")


def truncated_h5(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:3000])


def older_format(path: Path) -> None:
    with h5py.File(path, "a") as h5:
        h5.attrs["wsss_format"] = 0


def nan_scores(path: Path) -> None:
    """NaN written behind the writer's back, checksum updated, as a buggy third-party tool might."""
    with h5py.File(path, "a") as h5:
        dset = h5["images/val_00000/scores"]
        values = dset[()]
        values[0, 0, 0] = np.nan
        dset[...] = values
        dset.attrs["crc32"] = zlib.crc32(np.ascontiguousarray(values).tobytes())


ARTIFACT_CASES = {
    "zero-byte HDF5": (
        zero_byte,
        "error: {a}: not a readable HDF5 file (truncated or corrupt); delete it and rerun the stage "
        "that makes it",
    ),
    "truncated HDF5": (
        truncated_h5,
        "error: {a}: not a readable HDF5 file (truncated or corrupt); delete it and rerun the stage "
        "that makes it",
    ),
    "artifact of an older format version": (
        older_format,
        "error: {a}: artifact format 0, this wsss reads format 1; rerun its stage with --force to rewrite it",
    ),
    "NaN in stored scores": (
        nan_scores,
        "error: {a}: scores of image 'val_00000' hold NaN or Inf; rerun the stage with --force",
    ),
}


@pytest.mark.parametrize("case", list(ARTIFACT_CASES))
def test_bad_artifact(case: str, tmp_path: Path, toy_root: Path, run_wsss) -> None:
    """Read through `wsss show`, which opens the artifact and reads its records."""
    path = _scores_artifact(tmp_path / "run" / "cams.h5", toy_root)
    damage, expected = ARTIFACT_CASES[case]
    damage(path)
    done = run_wsss(
        "show", str(path), "--run", str(tmp_path / "run"), "--data", f"voc:{toy_root}", cwd=tmp_path
    )
    assert done.stderr.strip() == expected.format(a=path)
    assert done.returncode == 2
