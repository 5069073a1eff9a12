"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.common.datasets.toy import make_toy


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny toy dataset in the VOC layout (24 train / 8 val images, 64-96 px), made once per session.

    Read it with ``open_dataset(f"toy:{toy_root}")`` or ``VocDataset(toy_root)``; treat it as read-only.
    """
    return make_toy(tmp_path_factory.mktemp("toy") / "toy_data", seed=0, n_train=24, n_val=8, max_size=96)
