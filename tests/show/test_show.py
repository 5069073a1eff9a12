"""`wsss show`: sheets with a column per artifact, palette colours, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.common.artifacts import Provenance, begin
from stages.common.context import RunOptions
from stages.common.errors import ArtifactError
from stages.show import ShowConfig, colourise, heat_map, run


def write(path: Path, opts: RunOptions, kind: str, split: str = "train") -> None:
    dataset = opts.dataset
    described = dataset.describe(split)
    status = begin(path, Provenance(kind=kind, stage="test", config={}, dataset=described))
    with status.writer as writer:
        for image_id in dataset.ids(split)[:3]:
            h, w = dataset.image_size(image_id)
            classes = dataset.labels(image_id)
            if kind == "labels":
                writer.write_image(image_id, labels=dataset.mask(image_id))
            else:
                scores = np.random.default_rng(0).random((len(classes), (h + 3) // 4, (w + 3) // 4))
                writer.write_image(image_id, scores=scores, classes=classes, stride=4)
        writer.finish()


def test_sheet_has_a_column_per_view(tmp_path: Path, toy_root: Path) -> None:
    opts = RunOptions(run_dir=tmp_path, data=f"toy:{toy_root}", quiet=True)
    write(tmp_path / "cams.h5", opts, "scores")
    write(tmp_path / "pseudo.h5", opts, "labels")
    summary = run(opts, ShowConfig(images=2))
    (sheet,) = summary.artifacts
    picture = Image.open(sheet)
    # image | ground truth | CAM | pseudo = 4 columns of 128 px
    assert picture.width == 4 * 128
    assert picture.height > 2 * 128


def test_colours_and_heat_map() -> None:
    labels = np.array([[0, 1], [255, 2]], np.uint8)
    rgb = colourise(labels)
    assert tuple(rgb[0, 0]) == (0, 0, 0) and tuple(rgb[0, 1]) == (128, 0, 0)
    assert tuple(rgb[1, 0]) == (224, 224, 192)  # VOC's void colour
    hot = heat_map(np.zeros((1, 2, 3), np.uint8), np.array([[0.0, 1.0]]), weight=1.0)
    assert hot[0, 0, 2] > hot[0, 0, 0] and hot[0, 1, 0] > hot[0, 1, 2]  # cold blue, hot red


def test_nothing_to_show_is_one_line(tmp_path: Path, toy_root: Path) -> None:
    opts = RunOptions(run_dir=tmp_path, data=f"toy:{toy_root}", quiet=True)
    with pytest.raises(ArtifactError, match="no artifacts to show yet; run `wsss demo`"):
        run(opts, ShowConfig())
