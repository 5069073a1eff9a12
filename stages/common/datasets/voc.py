"""PASCAL VOC 2012 devkit layout, with the SBD extension (``train_aug``) when it is present.

Layout read (``root`` is the folder holding JPEGImages, as in ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    Annotations/<id>.xml                 image labels: the <name> of every <object>
    SegmentationClass/<id>.png           palette PNG, index array = class ids, 255 void
    ImageSets/Segmentation/<split>.txt   one id per line (train, val, trainval, ...)
    classes.txt                          optional: one name per line, background first
    SegmentationClassAug/<id>.png        optional SBD masks (palette or grayscale)
    ImageSets/SegmentationAug/train_aug.txt          optional explicit train_aug list
    benchmark_RELEASE/dataset/{train,val}.txt, cls/<id>.mat   optional raw SBD release

``train_aug`` (Hariharan et al., "Semantic contours from inverse detectors", ICCV 2011, the 10,582-image
set of most WSSS papers) = (SBD train ∪ SBD val ∪ VOC train) − VOC val. A mask is looked up in
SegmentationClass first, then SegmentationClassAug, then the SBD .mat files.

Labels come from the XML annotations. The one exception: an SBD image with no XML takes its labels from
its SBD mask, since SBD ships no other annotation (the VOC 2012 devkit has an XML for every SBD image, so
this only matters for trimmed copies).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import scipy.io

from stages.common.datasets.base import (
    Dataset,
    class_indices,
    read_class_names,
    read_id_list,
)
from stages.common.errors import DatasetError

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

TRAIN_AUG = "train_aug"


class VocDataset(Dataset):
    """A VOC 2012 devkit folder (see the module docstring for the layout)."""

    name = "voc"

    def __init__(self, root: Path) -> None:
        root = Path(root)
        if not (root / "JPEGImages").is_dir():
            hint = ""
            if (root / "VOC2012" / "JPEGImages").is_dir() or (root / "VOCdevkit").is_dir():
                hint = " (the devkit is inside: point at its VOC2012 folder)"
            raise DatasetError(
                f"{root}: not a VOC devkit folder, no JPEGImages/ inside{hint}; give the folder holding "
                "JPEGImages, Annotations and ImageSets"
            )
        classes_file = root / "classes.txt"
        names = read_class_names(classes_file) if classes_file.is_file() else VOC_CLASSES
        super().__init__(root, names)
        self._image_ids = {p.stem for p in (root / "JPEGImages").glob("*.jpg")}
        self._labels_cache: dict[str, tuple[int, ...]] = {}
        aug_dir = root / "SegmentationClassAug"
        self._aug_dir = aug_dir if aug_dir.is_dir() else None
        sbd = root / "benchmark_RELEASE" / "dataset"
        has_sbd = all((sbd / f).is_file() for f in ("train.txt", "val.txt")) and (sbd / "cls").is_dir()
        self._sbd_dir = sbd if has_sbd else None

    @property
    def _split_dir(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"

    def split_names(self) -> list[str]:
        names = {p.stem for p in self._split_dir.glob("*.txt")} if self._split_dir.is_dir() else set()
        if self._aug_dir is not None or self._sbd_dir is not None:
            names.add(TRAIN_AUG)
        return sorted(names)

    def _split_ids(self, split: str) -> list[str]:
        split_file = self._split_dir / f"{split}.txt"
        if split == TRAIN_AUG and not split_file.is_file():
            return self._train_aug_ids()
        return self._checked(read_id_list(split_file), split_file)

    def _train_aug_ids(self) -> list[str]:
        explicit = self.root / "ImageSets" / "SegmentationAug" / f"{TRAIN_AUG}.txt"
        if self._aug_dir is not None and explicit.is_file():
            return self._checked(read_id_list(explicit), explicit)
        voc_train = self._voc_list("train")
        voc_val = set(self._voc_list("val"))
        sources: list[tuple[Path, list[str]]] = []
        if self._aug_dir is not None:
            sources.append((self._aug_dir, sorted(p.stem for p in self._aug_dir.glob("*.png"))))
        elif self._sbd_dir is not None:
            for part in ("train", "val"):
                part_file = self._sbd_dir / f"{part}.txt"
                sources.append((part_file, read_id_list(part_file)))
        sources.append((self._split_dir / "train.txt", voc_train))
        chosen: dict[str, None] = {}
        for source, ids in sources:
            kept = [i for i in ids if i not in voc_val]
            self._checked(kept, source)
            chosen.update(dict.fromkeys(kept))
        return sorted(chosen)

    def _voc_list(self, split: str) -> list[str]:
        path = self._split_dir / f"{split}.txt"
        return read_id_list(path) if path.is_file() else []

    def _checked(self, ids: list[str], source: Path) -> list[str]:
        """The ids, deduplicated in order, after checking each has a JPEG."""
        for image_id in ids:
            if image_id not in self._image_ids:
                raise DatasetError(
                    f"{source}: lists {image_id!r} but {self._image_path(image_id)} does not exist; copy "
                    "the image or remove the id"
                )
        return list(dict.fromkeys(ids))

    def _image_path(self, image_id: str) -> Path:
        return self.root / "JPEGImages" / f"{image_id}.jpg"

    def labels(self, image_id: str) -> tuple[int, ...]:
        if image_id not in self._labels_cache:
            xml = self.root / "Annotations" / f"{image_id}.xml"
            if xml.is_file():
                found = self._labels_from_xml(xml)
            elif self._sbd_mask(image_id) is not None:
                found = class_indices(self.mask(image_id))
            else:
                raise DatasetError(
                    f"{xml}: annotation not found; copy it back or remove {image_id!r} from the split"
                )
            self._labels_cache[image_id] = found
        return self._labels_cache[image_id]

    def _labels_from_xml(self, xml: Path) -> tuple[int, ...]:
        try:
            tree = ET.parse(xml)
        except (ET.ParseError, OSError, UnicodeDecodeError) as exc:
            raise DatasetError(
                f"{xml}: not a readable XML annotation ({exc}); re-copy it from the devkit"
            ) from exc
        found: set[int] = set()
        for obj in tree.getroot().findall("object"):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise DatasetError(
                    f"{xml}: an <object> has no <name>; add the class name or delete the object"
                )
            index = self._class_index(name)
            if index is None or index == 0:
                raise DatasetError(
                    f"{xml}: unknown class {name!r}; add it to {self.root / 'classes.txt'} (one name per "
                    "line, background first) or fix the annotation"
                )
            found.add(index)
        return tuple(sorted(found))

    def _sbd_mask(self, image_id: str) -> Path | None:
        if self._aug_dir is not None and (self._aug_dir / f"{image_id}.png").is_file():
            return self._aug_dir / f"{image_id}.png"
        if self._sbd_dir is not None and (self._sbd_dir / "cls" / f"{image_id}.mat").is_file():
            return self._sbd_dir / "cls" / f"{image_id}.mat"
        return None

    def _mask_source(self, image_id: str) -> Path | None:
        official = self._expected_mask_path(image_id)
        return official if official.is_file() else self._sbd_mask(image_id)

    def _expected_mask_path(self, image_id: str) -> Path:
        return self.root / "SegmentationClass" / f"{image_id}.png"

    def _read_mask(self, path: Path, image_id: str) -> np.ndarray:
        if path.suffix != ".mat":
            return super()._read_mask(path, image_id)
        return read_sbd_mat(path)


def read_sbd_mat(path: Path) -> np.ndarray:
    """The class map of an SBD ``cls/<id>.mat``: field ``Segmentation`` of the ``GTcls`` struct."""
    try:
        content = scipy.io.loadmat(path)
    except (OSError, ValueError, TypeError) as exc:
        raise DatasetError(
            f"{path}: cannot read .mat file ({exc}); re-copy it from benchmark_RELEASE"
        ) from exc
    try:
        return np.asarray(content["GTcls"]["Segmentation"][0, 0])
    except (KeyError, ValueError, IndexError) as exc:
        raise DatasetError(
            f"{path}: no GTcls.Segmentation in this .mat; is it from SBD's cls/ folder?"
        ) from exc


def voc_palette() -> list[int]:
    """The VOC colour map as PIL's flat [r0, g0, b0, r1, ...] list (256 entries; 255 = cream void).

    Index bits are spread over the three channels, three at a time, from the channel's top bit down,
    which is how the devkit colours its SegmentationClass PNGs.
    """
    palette: list[int] = []
    for index in range(256):
        rgb = [0, 0, 0]
        bits = index
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette.extend(rgb)
    return palette
