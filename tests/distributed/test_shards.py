"""Sharded writing and merging (stages.common.shards) on hand-made artifacts: the merge equals one
process's file, and every way shards can be wrong is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from stages.common.artifacts import Provenance, open_artifact
from stages.common.context import RunOptions
from stages.common.errors import ArtifactError, ConfigError, StaleArtifact
from stages.common.shards import begin_sharded, merge_shards, shard_path, unsharded_path

IDS = [f"img{i:02d}" for i in range(7)]


def _labels(image_id: str) -> np.ndarray:
    """A per-image label map that tells images apart: (5, 6) uint8 filled from the id's number."""
    return np.full((5, 6), int(image_id[3:]), dtype=np.uint8)


def _provenance(setting: int = 1) -> Provenance:
    dataset = {"name": "toy", "class_names": ["background", "a"], "fingerprint": "d"}
    return Provenance("labels", "test", {"setting": setting}, {}, dataset)


def _write(tmp_path: Path, shard: tuple[int, int] | None, setting: int = 1, ids: list[str] = IDS) -> Path:
    opts = RunOptions(run_dir=tmp_path, shard=shard, quiet=True, device="cpu")
    status = begin_sharded(tmp_path / "out.h5", _provenance(setting), ids, opts)
    with status.writer as writer:
        for image_id in status.ids:
            writer.write_image(image_id, labels=_labels(image_id))
        writer.finish()
    return status.complete()


def _records(path: Path) -> dict[str, np.ndarray]:
    with open_artifact(path, kind="labels") as art:
        return {i: art.labels(i) for i in art.ids()}


def test_names() -> None:
    assert shard_path(Path("r/pseudo.h5"), 1, 4) == Path("r/pseudo.shard1of4.h5")
    assert unsharded_path(Path("r/pseudo.shard1of4.h5")) == Path("r/pseudo.h5")
    with pytest.raises(ConfigError):
        unsharded_path(Path("r/pseudo.h5"))


def test_shards_take_every_nth_id_and_merge_to_the_single_process_file(tmp_path: Path) -> None:
    single = _write(tmp_path / "one", None)
    paths = [_write(tmp_path / "many", (k, 3)) for k in range(3)]
    # ids[k::3]: shard 0 holds img00, img03, img06 — never padded with repeats.
    assert sorted(_records(paths[0])) == ["img00", "img03", "img06"]
    result = merge_shards(list(reversed(paths)))  # any order
    assert result.out == tmp_path / "many" / "out.h5" and result.images == 7
    with open_artifact(single) as a, open_artifact(result.out) as b:
        assert a.fingerprint == b.fingerprint  # the same identity downstream stages record
    merged, expected = _records(result.out), _records(single)
    assert merged.keys() == expected.keys()
    assert all(np.array_equal(merged[i], expected[i]) for i in expected)
    assert merge_shards(paths).images == 7  # up to date: nothing copied twice


def test_a_shard_is_not_the_whole_artifact(tmp_path: Path) -> None:
    path = _write(tmp_path, (0, 2))
    with open_artifact(path) as art:
        assert art.config["shard"] == {"k": 0, "n": 2, "total": 7}
        assert art.fingerprint != _provenance().fingerprint


def test_merge_refuses_missing_repeated_and_foreign_shards(tmp_path: Path) -> None:
    paths = [_write(tmp_path / "a", (k, 3)) for k in range(3)]
    with pytest.raises(ArtifactError, match="shard 1/3 is missing"):
        merge_shards([paths[0], paths[2]])
    with pytest.raises(ConfigError, match="given twice"):
        merge_shards([paths[0], paths[0], paths[1], paths[2]])
    other = _write(tmp_path / "b", (1, 3), setting=2)
    with pytest.raises(StaleArtifact, match="other settings"):
        merge_shards([paths[0], other, paths[2]], tmp_path / "x.h5")
    whole = _write(tmp_path / "c", None)
    with pytest.raises(ArtifactError, match="not a shard"):
        merge_shards([whole])
    with pytest.raises(ArtifactError, match="not found"):
        merge_shards([tmp_path / "none.shard0of1.h5"])


def test_merge_refuses_missing_and_repeated_images(tmp_path: Path) -> None:
    # Shard 1 of 2 made on an id list missing img03: one image is in no shard.
    full = [_write(tmp_path / "a", (0, 2))]
    short = _write(tmp_path / "a2", (1, 2), ids=[i for i in IDS if i != "img03"])
    with pytest.raises((ArtifactError, StaleArtifact)):
        merge_shards([*full, short], tmp_path / "m.h5")
    # A shard that holds an image of another shard: refused as repeated, nothing complete is written.
    path = _write(tmp_path / "d", (0, 2))
    other = _write(tmp_path / "d", (1, 2))
    import h5py

    with h5py.File(path, "r") as src, h5py.File(other, "a") as dst:
        src.copy(src["images/img00"], dst["images"], name="img00")
    with pytest.raises(ArtifactError):
        merge_shards([path, other])
    assert not (tmp_path / "d" / "out.h5").exists()


def test_one_process_without_shard_is_plain_begin(tmp_path: Path) -> None:
    path = _write(tmp_path, None)
    assert path == tmp_path / "out.h5" and len(_records(path)) == 7
    opts = RunOptions(run_dir=tmp_path, quiet=True, device="cpu")
    status = begin_sharded(path, _provenance(), IDS, opts)
    assert status.up_to_date
    with pytest.raises(StaleArtifact):
        begin_sharded(path, _provenance(2), IDS, opts)
    forced = begin_sharded(path, _provenance(2), IDS, dataclasses.replace(opts, force=True))
    assert forced.writer is not None
    forced.writer.close()
