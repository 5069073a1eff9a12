"""The options every stage shares (run directory, dataset, device, seed ...) as one typed value."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.common.errors import ConfigError
from stages.common.lock import RunLock

if TYPE_CHECKING:
    import torch

    from stages.common.datasets.base import Dataset


@dataclass
class RunOptions:
    """Where a stage reads and writes, on what data and hardware.

    ``data`` is a dataset spec (``voc:PATH``, ``coco:PATH``, ``folder:PATH``, ``toy``); ``workers`` 0 means
    all cores. None of these options changes an artifact's numbers except ``seed`` and ``data``, so only
    those enter fingerprints.
    """

    run_dir: Path = Path("runs/toy")
    data: str = "toy"
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    force: bool = False
    quiet: bool = False
    amp: bool = True
    shard: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    @cached_property
    def dataset(self) -> Dataset:
        from stages.common.datasets import open_dataset

        return open_dataset(self.data, cache_dir=self.run_dir)

    def path(self, name: str) -> Path:
        """An artifact's default path in the run directory."""
        return self.run_dir / name

    def lock(self, what: str) -> RunLock:
        return RunLock(self.run_dir, what)

    @property
    def num_workers(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def seed_everything(self, offset: int = 0) -> None:
        seed_everything(self.seed + offset)


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU; ``cuda[:N]`` checked to exist."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA device is visible here; use --device cpu or auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA devices are visible; pick one below that"
            )
        return device
    raise ConfigError(f"--device {spec}: unknown device; use auto, cpu, cuda or cuda:N")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so CPU runs repeat bit for bit."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def jsonable(value: Any) -> Any:
    """Paths and tuples as JSON-friendly values, for configs stored in artifacts."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def default_train_split(dataset: Dataset) -> str:
    """``train_aug`` (VOC + SBD, 10,582 images) when the dataset offers it, else ``train``."""
    return "train_aug" if "train_aug" in dataset.split_names() else "train"


def config_record(config: Any, opts: RunOptions) -> dict[str, Any]:
    """A stage config as stored in artifacts and fingerprinted: its fields plus the seed."""
    import dataclasses

    record = {f.name: jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}
    record["seed"] = opts.seed
    return record
