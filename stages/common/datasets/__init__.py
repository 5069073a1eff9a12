"""Dataset readers: one class per on-disk format behind the `Dataset` contract, and `open_dataset`.

Specs accepted by `open_dataset`: ``voc:PATH``, ``coco:PATH``, ``folder:PATH``, ``toy`` (generated on
first use into ``cache_dir/toy_data``) and ``toy:PATH`` (an existing toy folder).
"""

from __future__ import annotations

from pathlib import Path

from stages.common.datasets.base import VOID, Dataset
from stages.common.datasets.coco import CocoDataset
from stages.common.datasets.folder import FolderDataset
from stages.common.datasets.toy import TOY_CLASSES, ToyDataset, ensure_toy, make_toy
from stages.common.datasets.voc import VOC_CLASSES, VocDataset, voc_palette
from stages.common.errors import DatasetError

__all__ = [
    "TOY_CLASSES",
    "VOC_CLASSES",
    "VOID",
    "CocoDataset",
    "Dataset",
    "FolderDataset",
    "ToyDataset",
    "VocDataset",
    "make_toy",
    "open_dataset",
    "voc_palette",
]

_READERS: dict[str, type[Dataset]] = {
    "voc": VocDataset,
    "coco": CocoDataset,
    "folder": FolderDataset,
    "toy": ToyDataset,
}

_ACCEPTED = "voc:PATH, coco:PATH, folder:PATH, toy, or toy:PATH"


def open_dataset(spec: str, cache_dir: Path | None = None) -> Dataset:
    """The dataset a spec names; ``toy`` needs ``cache_dir`` (the run directory) to cache its files in."""
    if spec == "toy":
        if cache_dir is None:
            raise DatasetError("dataset spec 'toy' needs a run directory to generate into; or use toy:PATH")
        return ToyDataset(ensure_toy(cache_dir))
    kind, _, path = spec.partition(":")
    if kind not in _READERS or not path:
        raise DatasetError(f"unknown dataset spec {spec!r}; use one of {_ACCEPTED}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (from dataset spec {spec!r}); check the path")
    return _READERS[kind](root)
