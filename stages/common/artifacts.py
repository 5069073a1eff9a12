"""The HDF5 artifact contract (docs/artifacts.md): provenance, atomic writing, resume and refusals.

Every artifact is one ``.h5`` file whose root attributes say what it is (``wsss_kind``), who made it
(``wsss_stage``, ``wsss_version``), from what (``config``, ``inputs``, ``dataset``) and under which identity
(``fingerprint``). A stage writes ``NAME.h5.partial``, marks it ``complete`` last and renames it, so a file
named ``NAME.h5`` is either whole or absent. Per-image records carry a ``done`` attribute set after their
datasets, so a partial file killed mid-image resumes from the last whole image.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from stages import __version__
from stages.common.errors import ArtifactError, StaleArtifact, WsssError

KINDS = ("model", "scores", "labels", "metrics")
# Bumped when the layout changes in a way old readers cannot follow.
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_COMPRESSION = "lzf"  # fast enough to write at CAM speed; gzip saves ~20% more but costs ~5x the time


def fingerprint_of(value: Any) -> str:
    """A short, stable hash of any JSON-able value (dict keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)


# Test fault injection (tests/reliability/test_kill_resume.py): WSSS_FAULT="POINT" or "POINT:K" makes the
# process SIGKILL itself the K-th time (default 1st) it passes POINT. Unset, as always outside those tests,
# it does nothing.
FAULT_ENV = "WSSS_FAULT"
_fault_passes: dict[str, int] = {}


def _maybe_fault(point: str) -> None:
    """TEST FAULT INJECTION ONLY: die by SIGKILL here when ``WSSS_FAULT`` names this point.

    Points: ``after-images`` (a record written and marked done, ArtifactWriter.write_image),
    ``after-flush`` (ArtifactWriter.flush), ``before-rename`` (a finished file fsynced, just before its
    ``os.replace``: ArtifactWriter.finish and every model file, checkpoints included) and
    ``after-checkpoint`` (CheckpointedTraining.end_epoch, the epoch's checkpoint saved). Passes are counted
    per process, so a resumed run counts from 1 again. Read at call time, so tests need no reload.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or spec.partition(":")[0] != point:
        return
    _fault_passes[point] = _fault_passes.get(point, 0) + 1
    if _fault_passes[point] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# What h5py raises when a file's bytes are damaged below the point HDF5 can open it: a broken heap or
# B-tree surfaces as OSError or RuntimeError, a lost attribute as KeyError, a garbled one as ValueError or
# TypeError. Found by fuzzing (tests/reliability/test_fuzz_artifacts.py).
_CORRUPTION = (OSError, RuntimeError, KeyError, ValueError, TypeError)


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn h5py's errors on a damaged file into one ArtifactError naming the file and the fix."""
    try:
        yield
    except WsssError:
        raise
    except _CORRUPTION as exc:
        detail = " ".join(str(exc).split())[:120]
        raise ArtifactError(
            f"{path}: cannot read {what} ({type(exc).__name__}: {detail}); the file is damaged: delete it "
            "and rerun the stage that makes it"
        ) from exc


@dataclass
class Provenance:
    """What an artifact is and where it came from; its fingerprint is its identity for resuming."""

    kind: str
    stage: str
    config: dict[str, Any]
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown artifact kind {self.kind!r}; one of {KINDS}")

    @property
    def fingerprint(self) -> str:
        inputs = {role: ref.get("fingerprint") for role, ref in self.inputs.items()}
        return fingerprint_of(
            {
                "kind": self.kind,
                "stage": self.stage,
                "config": self.config,
                "inputs": inputs,
                "dataset": self.dataset.get("fingerprint"),
                "format": FORMAT_VERSION,
            }
        )

    def write_attrs(self, attrs: h5py.AttributeManager) -> None:
        attrs["wsss_kind"] = self.kind
        attrs["wsss_stage"] = self.stage
        attrs["wsss_version"] = __version__
        attrs["wsss_format"] = FORMAT_VERSION
        attrs["config"] = json.dumps(self.config, sort_keys=True, default=str)
        attrs["inputs"] = json.dumps(self.inputs, sort_keys=True)
        attrs["dataset"] = json.dumps(self.dataset, sort_keys=True, default=str)
        attrs["fingerprint"] = self.fingerprint

    @classmethod
    def read_attrs(cls, attrs: h5py.AttributeManager, path: Path) -> Provenance:
        try:
            return cls(
                kind=str(attrs["wsss_kind"]),
                stage=str(attrs["wsss_stage"]),
                config=json.loads(attrs["config"]),
                inputs=json.loads(attrs["inputs"]),
                dataset=json.loads(attrs["dataset"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactError(
                f"{path}: not a wsss artifact (missing or unreadable attribute: {exc}); "
                "make it with a wsss stage"
            ) from exc
        except (OSError, RuntimeError) as exc:
            raise ArtifactError(
                f"{path}: cannot read its provenance attributes (damaged file: {exc}); delete it and rerun "
                "the stage that makes it"
            ) from exc

    def ref(self, path: Path) -> dict[str, str]:
        """How another artifact records this one among its inputs."""
        return {"path": str(path), "fingerprint": self.fingerprint}


def describe_difference(old: Provenance, new: Provenance) -> str:
    """Name what changed between two provenances, in the user's words (first few differences)."""
    diffs: list[str] = []
    for key in sorted(set(old.config) | set(new.config)):
        if old.config.get(key) != new.config.get(key):
            diffs.append(f"--{key.replace('_', '-')} {old.config.get(key)!r} -> {new.config.get(key)!r}")
    for role in sorted(set(old.inputs) | set(new.inputs)):
        a, b = old.inputs.get(role, {}), new.inputs.get(role, {})
        if a.get("fingerprint") != b.get("fingerprint"):
            diffs.append(f"input {role} changed ({b.get('path', a.get('path'))})")
    if old.dataset.get("fingerprint") != new.dataset.get("fingerprint"):
        diffs.append(
            f"dataset {old.dataset.get('name')}:{old.dataset.get('split')} -> "
            f"{new.dataset.get('name')}:{new.dataset.get('split')}"
        )
    if old.kind != new.kind or old.stage != new.stage:
        diffs.append(f"made by {old.stage} ({old.kind}), not {new.stage} ({new.kind})")
    if not diffs:
        diffs.append("format version")
    more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    return ", ".join(diffs[:4]) + more


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: not found; run the stage that makes it first") from exc
    except PermissionError as exc:
        raise ArtifactError(f"{path}: permission denied; check the run directory's permissions") from exc
    except OSError as exc:
        raise ArtifactError(
            f"{path}: not a readable HDF5 file (truncated or corrupt); delete it and rerun the stage "
            "that makes it"
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# Reading


class Artifact:
    """A complete artifact opened for reading. Use as a context manager.

    Scores are returned as float32 ``(K, h, w)`` at ``stride`` with the ``classes`` of their channels
    (0 = background when present); labels as uint8 ``(H, W)`` (255 = ignore).
    """

    def __init__(self, path: Path, h5: h5py.File, provenance: Provenance) -> None:
        self.path = path
        self.h5 = h5
        self.provenance = provenance

    # provenance shortcuts
    @property
    def kind(self) -> str:
        return self.provenance.kind

    @property
    def stage(self) -> str:
        return self.provenance.stage

    @property
    def config(self) -> dict[str, Any]:
        return self.provenance.config

    @property
    def dataset(self) -> dict[str, Any]:
        return self.provenance.dataset

    @property
    def fingerprint(self) -> str:
        return self.provenance.fingerprint

    def ref(self) -> dict[str, str]:
        return self.provenance.ref(self.path)

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.h5.id.valid:
            self.h5.close()

    def ids(self) -> list[str]:
        with _reading(self.path, "its image index"):
            images = self.h5.get("images")
            return sorted(images.keys()) if images is not None else []

    def __contains__(self, image_id: str) -> bool:
        with _reading(self.path, "its image index"):
            return f"images/{image_id}" in self.h5

    def __len__(self) -> int:
        with _reading(self.path, "its image index"):
            images = self.h5.get("images")
            return len(images) if images is not None else 0

    def _group(self, image_id: str) -> h5py.Group:
        with _reading(self.path, f"the record of image {image_id!r}"):
            group = self.h5.get(f"images/{image_id}")
        if group is None:
            raise ArtifactError(
                f"{self.path}: has no record for image {image_id!r}; it was made for other images "
                "(rerun its stage on this split)"
            )
        return group

    def _record(self, image_id: str, name: str) -> h5py.Dataset:
        dset = self._group(image_id).get(name)
        if dset is None:
            raise ArtifactError(
                f"{self.path}: image {image_id!r} has no {name}; this is a {self.kind} artifact"
            )
        return dset

    def scores(self, image_id: str) -> tuple[np.ndarray, tuple[int, ...], int]:
        """``(scores float32 (K, h, w), classes, stride)`` of one image."""
        with _reading(self.path, f"the scores of image {image_id!r}"):
            dset = self._record(image_id, "scores")
            values = _verified(self.path, dset, f"the scores of image {image_id!r}").astype(np.float32)
            classes = tuple(int(c) for c in np.atleast_1d(dset.attrs["classes"]))
            stride = int(dset.attrs["stride"])
        known = len(self.dataset.get("class_names") or []) or None
        if not np.all(np.isfinite(values)):
            raise ArtifactError(
                f"{self.path}: scores of image {image_id!r} hold NaN or Inf; rerun the stage with --force"
            )
        if (
            values.ndim != 3
            or values.shape[0] != len(classes)
            or stride < 1
            or any(c < 0 or (known is not None and c >= known) for c in classes)
        ):
            raise ArtifactError(
                f"{self.path}: scores of image {image_id!r} are {values.shape} for classes {list(classes)} "
                f"at stride {stride}; the file is damaged: rerun its stage with --force"
            )
        return values, classes, stride

    def scores_full(self, image_id: str, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, ...]]:
        """Scores upsampled (bilinear) to the image size ``(H, W)``: float32 ``(K, H, W)``."""
        values, classes, stride = self.scores(image_id)
        return upsample_scores(values, size), classes

    def labels(self, image_id: str) -> np.ndarray:
        with _reading(self.path, f"the labels of image {image_id!r}"):
            dset = self._record(image_id, "labels")
            labels = _verified(self.path, dset, f"the labels of image {image_id!r}").astype(np.uint8)
        if labels.ndim != 2:
            raise ArtifactError(
                f"{self.path}: labels of image {image_id!r} are {labels.shape}, not (H, W); the file is "
                "damaged: rerun its stage with --force"
            )
        return labels

    def extra(self, image_id: str, name: str) -> np.ndarray:
        with _reading(self.path, f"the {name!r} record of image {image_id!r}"):
            dset = self._group(image_id).get(name)
            if dset is None:
                raise ArtifactError(f"{self.path}: image {image_id!r} has no {name!r} record")
            return _verified(self.path, dset, f"the {name!r} record of image {image_id!r}")

    def meta(self, name: str, default: Any = None) -> Any:
        """A JSON root attribute a stage added (e.g. mine-ae's per-round table)."""
        with _reading(self.path, f"its {name!r} record"):
            raw = self.h5.attrs.get(f"meta_{name}")
            return default if raw is None else json.loads(raw)

    def metas(self) -> dict[str, Any]:
        with _reading(self.path, "its records"):
            return {k[5:]: json.loads(v) for k, v in self.h5.attrs.items() if str(k).startswith("meta_")}


def upsample_scores(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(K, h, w)`` score maps to ``size`` (align_corners=False, as CAM was made)."""
    import torch
    import torch.nn.functional as F

    if values.shape[1:] == tuple(size):
        return values.astype(np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0].numpy()


def check_dataset(path: Path, recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Refuse an artifact made for another dataset or class list."""
    if list(recorded.get("class_names", [])) != list(expected.get("class_names", [])):
        raise ArtifactError(
            f"{path}: made for classes {recorded.get('class_names')} but this dataset has "
            f"{expected.get('class_names')}; rerun its stage on this dataset or pass the right --run"
        )
    if recorded.get("name") != expected.get("name"):
        raise ArtifactError(
            f"{path}: made for dataset {recorded.get('name')!r} ({recorded.get('root')}), not "
            f"{expected.get('name')!r} ({expected.get('root')}); use the run directory of this dataset"
        )


def open_artifact(
    path: Path | str,
    kind: str | tuple[str, ...] | None = None,
    dataset: Mapping[str, Any] | None = None,
) -> Artifact:
    """Open a complete artifact, refusing partial, corrupt, foreign or wrongly-kinded files.

    ``dataset`` is a dataset description (``Dataset.describe(split)``); when given, the artifact must have
    been made for the same dataset and class list.
    """
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise ArtifactError(
            f"{path}: a partial artifact (its stage was interrupted); rerun that stage to finish it"
        )
    if not path.exists():
        if partial_path(path).exists():
            raise ArtifactError(
                f"{path}: not finished (only {partial_path(path).name} exists); rerun its stage to resume it"
            )
        raise ArtifactError(f"{path}: not found; run the stage that makes it first")
    h5 = _open_h5(path)
    try:
        with _reading(path, "its provenance attributes"):
            return _checked_artifact(path, h5, kind, dataset)
    except BaseException:
        h5.close()
        raise


def _checked_artifact(
    path: Path, h5: h5py.File, kind: str | tuple[str, ...] | None, dataset: Mapping[str, Any] | None
) -> Artifact:
    """The refusals of ``open_artifact`` on an open file (which the caller closes on error)."""
    if "wsss_kind" not in h5.attrs:
        raise ArtifactError(f"{path}: not a wsss artifact (no wsss_kind attribute)")
    fmt = int(h5.attrs.get("wsss_format", 0))
    if fmt != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format {fmt}, this wsss reads format {FORMAT_VERSION}; "
            "rerun its stage with --force to rewrite it"
        )
    provenance = Provenance.read_attrs(h5.attrs, path)
    stored = h5.attrs.get("fingerprint")
    if stored is not None and str(stored) != provenance.fingerprint:
        raise ArtifactError(
            f"{path}: its provenance attributes do not match their fingerprint (damaged or edited); "
            "rerun the stage that makes it with --force"
        )
    if not bool(h5.attrs.get("complete", False)):
        raise ArtifactError(f"{path}: incomplete artifact (its stage did not finish); rerun that stage")
    seal = h5.attrs.get(_SEAL)
    if seal is not None and int(seal) != _attrs_checksum(h5.attrs):
        raise ArtifactError(
            f"{path}: its attributes fail their checksum (damaged or edited); rerun the stage that makes "
            "it with --force"
        )
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds is not None and provenance.kind not in kinds:
        raise ArtifactError(
            f"{path}: a {provenance.kind} artifact from {provenance.stage}, but a "
            f"{' or '.join(kinds)} artifact is needed here; pass the right file"
        )
    if dataset is not None:
        check_dataset(path, provenance.dataset, dataset)
    return Artifact(path, h5, provenance)


def read_provenance(path: Path) -> tuple[Provenance, bool]:
    """Provenance and completeness of any artifact file, partial ones included (for ``wsss info``)."""
    with _open_h5(path) as h5, _reading(path, "its provenance attributes"):
        provenance = Provenance.read_attrs(h5.attrs, path)
        return provenance, bool(h5.attrs.get("complete", False))


def describe_file(path: Path) -> dict[str, Any]:
    """What ``wsss info`` prints: provenance, completeness, format, record count, arch and record names."""
    path = Path(path)
    with _open_h5(path) as h5, _reading(path, "its attributes"):
        if "wsss_kind" not in h5.attrs:
            raise ArtifactError(f"{path}: not a wsss artifact (no wsss_kind attribute)")
        fmt = int(h5.attrs.get("wsss_format", 0))
        return {
            "provenance": Provenance.read_attrs(h5.attrs, path),
            "complete": bool(h5.attrs.get("complete", False)),
            "format": fmt,
            "format_ok": fmt == FORMAT_VERSION,
            "images": len(h5["images"]) if "images" in h5 else 0,
            "arch": json.loads(h5.attrs["arch"]) if "arch" in h5.attrs else None,
            "records": sorted(k[5:] for k in h5.attrs if k.startswith("meta_")),
            "size_mb": path.stat().st_size / 1e6,
        }


# ---------------------------------------------------------------------------------------------------------
# Writing per-image artifacts


class ArtifactWriter:
    """Writes per-image records into ``NAME.h5.partial``; ``finish()`` marks it complete and renames it.

    Records already in the partial file (from a killed run with the same fingerprint) are kept:
    ``done(image_id)`` tells the stage to skip them.
    """

    def __init__(self, path: Path, provenance: Provenance, h5: h5py.File, resumed: int) -> None:
        self.path = path
        self.partial = partial_path(path)
        self.provenance = provenance
        self.h5 = h5
        self.resumed = resumed
        self._since_flush = 0

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # On error the partial file stays on disk, closed as well as it can be, ready to resume.
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except (OSError, RuntimeError, WsssError):
            # After a failed write (a full disk) HDF5's close fails too, with a message about its
            # internals; the error already on its way is the one that says what happened.
            pass

    def close(self) -> None:
        if self.h5.id.valid:
            with _writing(self.partial):
                self.h5.close()

    def done(self, image_id: str) -> bool:
        group = self.h5.get(f"images/{image_id}")
        return group is not None and bool(group.attrs.get("done", False))

    def done_ids(self) -> list[str]:
        images = self.h5.get("images")
        if images is None:
            return []
        return [k for k in images if bool(images[k].attrs.get("done", False))]

    def write_image(
        self,
        image_id: str,
        *,
        scores: np.ndarray | None = None,
        classes: tuple[int, ...] | list[int] | None = None,
        stride: int | None = None,
        labels: np.ndarray | None = None,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write one image's record (replacing an unfinished one) and mark it done."""
        with _writing(self.partial):
            self._write_image(image_id, scores, classes, stride, labels, extra)
        _maybe_fault("after-images")

    def _write_image(
        self,
        image_id: str,
        scores: np.ndarray | None,
        classes: tuple[int, ...] | list[int] | None,
        stride: int | None,
        labels: np.ndarray | None,
        extra: Mapping[str, np.ndarray] | None,
    ) -> None:
        if "/" in image_id:
            raise ArtifactError(f"{self.partial}: image id {image_id!r} contains '/', which HDF5 cannot name")
        images = self.h5.require_group("images")
        if image_id in images:
            del images[image_id]
        group = images.create_group(image_id)
        if scores is not None:
            if classes is None or stride is None:
                raise ValueError("scores need their classes and stride")
            scores = np.asarray(scores)
            if scores.ndim != 3 or scores.shape[0] != len(classes):
                raise ValueError(
                    f"scores of {image_id} have shape {scores.shape} for classes {list(classes)}"
                )
            if not np.all(np.isfinite(scores)):
                raise ArtifactError(
                    f"{self.partial}: the scores computed for image {image_id!r} hold NaN or Inf; "
                    "the model diverged: retrain it (lower --lr) and rerun with --force"
                )
            dset = self._dataset(group, "scores", scores.astype(np.float16))
            dset.attrs["classes"] = np.asarray(list(classes), dtype=np.int32)
            dset.attrs["stride"] = int(stride)
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim != 2:
                raise ValueError(f"labels of {image_id} must be (H, W), got {labels.shape}")
            self._dataset(group, "labels", labels.astype(np.uint8))
        for name, value in (extra or {}).items():
            self._dataset(group, name, np.asarray(value))
        group.attrs["done"] = True
        self._since_flush += 1
        if self._since_flush >= 8:
            self.flush()

    @staticmethod
    def _dataset(group: h5py.Group, name: str, value: np.ndarray) -> h5py.Dataset:
        return _checksummed(group, name, value, compress=value.size >= 64)

    def set_meta(self, name: str, value: Any) -> None:
        """A JSON root attribute readers get back with ``Artifact.meta(name)``."""
        with _writing(self.partial):
            self.h5.attrs[f"meta_{name}"] = json.dumps(value, sort_keys=True, default=str)

    def get_meta(self, name: str, default: Any = None) -> Any:
        raw = self.h5.attrs.get(f"meta_{name}")
        return default if raw is None else json.loads(raw)

    def flush(self) -> None:
        with _writing(self.partial):
            self.h5.flush()
        self._since_flush = 0
        _maybe_fault("after-flush")

    def finish(self) -> Path:
        """Mark complete, close, fsync and atomically rename the partial file to its final name."""
        with _writing(self.path):
            self.h5.attrs["complete"] = True
            _seal(self.h5)
            self.h5.close()
            _fsync(self.partial)
            _maybe_fault("before-rename")
            os.replace(self.partial, self.path)
        _fsync_dir(self.path.parent)
        return self.path


def _checksummed(group: h5py.Group, name: str, value: np.ndarray, *, compress: bool) -> h5py.Dataset:
    """A dataset with a Fletcher-32 checksum per chunk, so damaged bytes fail to read instead of reading
    as wrong numbers (HDF5 checks nothing by default). Scalars cannot be chunked and stay plain."""
    if value.ndim == 0 or value.size == 0:
        dset = group.create_dataset(name, data=value)
    else:
        dset = group.create_dataset(
            name, data=value, chunks=True, fletcher32=True, compression=_COMPRESSION if compress else None
        )
    # Chunk checksums miss a damaged chunk index that points a record at another record's intact chunk;
    # a checksum of the whole value, kept beside it, catches that too.
    dset.attrs["crc32"] = zlib.crc32(np.ascontiguousarray(value).tobytes())
    return dset


_SEAL = "attrs_crc32"


def _attrs_checksum(attrs: h5py.AttributeManager) -> int:
    """CRC-32 of every root attribute but the seal, as read back (so writer and reader agree on types)."""
    items = []
    for name in sorted(str(k) for k in attrs.keys() if str(k) != _SEAL):
        value = attrs[name]
        value = value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
        items.append([name, value.decode(errors="replace") if isinstance(value, bytes) else value])
    return zlib.crc32(json.dumps(items, default=str).encode())


def _seal(h5: h5py.File) -> None:
    """Checksum the root attributes last, so a damaged config, arch or record reads as damaged."""
    h5.flush()
    h5.attrs[_SEAL] = _attrs_checksum(h5.attrs)


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, from Python (errno set) or from HDF5 (errno only in h5py's message)."""
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a full disk into one line; the last complete artifact and the partial's records stay."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not _is_disk_full(exc):
            raise
        raise ArtifactError(f"disk full while writing {path}; free space and rerun to resume") from exc


def _verified(path: Path, dset: h5py.Dataset, what: str) -> np.ndarray:
    """A dataset's value, checked against the checksum written with it (when there is one)."""
    value = dset[()]
    expected = dset.attrs.get("crc32")
    if expected is not None and zlib.crc32(np.ascontiguousarray(value).tobytes()) != int(expected):
        raise ArtifactError(
            f"{path}: {what} fails its checksum; the file is damaged: delete it and rerun the stage that "
            "makes it"
        )
    return value


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic


@dataclass
class WriteStatus:
    """What ``begin`` found: an up-to-date artifact (``writer`` is None) or a writer to fill."""

    writer: ArtifactWriter | None
    up_to_date: bool
    resumed: int = 0
    note: str = ""


def _existing_fingerprint(path: Path) -> tuple[Provenance, bool] | None:
    try:
        return read_provenance(path)
    except ArtifactError:
        return None


def begin(path: Path, provenance: Provenance, *, force: bool = False) -> WriteStatus:
    """Decide what to do about ``path`` and open a writer when there is work.

    - ``path`` complete with the same fingerprint: up to date, nothing to write (``force`` recomputes);
    - ``path.partial`` with the same fingerprint: resume it;
    - a different fingerprint: refuse, naming what differs, unless ``force``.
    A previous complete artifact is never deleted before the new one is finished: the final rename
    replaces it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    if path.exists() and not force:
        found = _existing_fingerprint(path)
        if found is None:
            raise ArtifactError(
                f"{path}: exists but is not a readable wsss artifact; delete it or rerun with --force"
            )
        old, complete = found
        if old.fingerprint != provenance.fingerprint:
            raise StaleArtifact(
                f"{path}: made with other settings ({describe_difference(old, provenance)}); rerun with "
                "--force to replace it, or use another --run"
            )
        if complete:
            return WriteStatus(None, up_to_date=True, note=f"{path.name} is up to date")
    note = ""
    if partial.exists():
        found = _existing_fingerprint(partial)
        if found is not None and found[0].fingerprint == provenance.fingerprint:
            h5 = _open_h5(partial, "a")
            writer = ArtifactWriter(path, provenance, h5, resumed=0)
            _drop_unfinished(h5)
            writer.resumed = len(writer.done_ids())
            return WriteStatus(
                writer,
                up_to_date=False,
                resumed=writer.resumed,
                note=f"resuming {partial.name}: {writer.resumed} images already done",
            )
        if found is not None and not force:
            raise StaleArtifact(
                f"{partial}: an interrupted run with other settings "
                f"({describe_difference(found[0], provenance)}); rerun with --force to discard it"
            )
        note = f"discarded unreadable {partial.name}" if found is None else f"discarded {partial.name}"
        partial.unlink()
    h5 = _open_h5(partial, "w")
    with _writing(partial):
        provenance.write_attrs(h5.attrs)
        h5.attrs["complete"] = False
        h5.create_group("images")
        h5.flush()
    return WriteStatus(ArtifactWriter(path, provenance, h5, resumed=0), up_to_date=False, note=note)


def _drop_unfinished(h5: h5py.File) -> None:
    images = h5.require_group("images")
    for key in [k for k in images if not bool(images[k].attrs.get("done", False))]:
        del images[key]


# ---------------------------------------------------------------------------------------------------------
# Model artifacts: weights, architecture, and training state while training


@dataclass
class ModelArtifact:
    """A network's weights with what rebuilds it (``arch``) and, for checkpoints, its training state."""

    state_dict: dict[str, Any]
    arch: dict[str, Any]
    provenance: Provenance
    train_state: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _write_model_file(
    target: Path,
    provenance: Provenance,
    state_dict: Mapping[str, Any],
    arch: Mapping[str, Any],
    train_state: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None,
    complete: bool,
) -> None:
    """Write a whole model file beside ``target`` and rename it over ``target`` (atomic)."""
    tmp = target.with_name(target.name + ".tmp")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _writing(target):
            _write_model_tmp(tmp, provenance, state_dict, arch, train_state, meta, complete)
            _fsync(tmp)
            _maybe_fault("before-rename")
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written copy would only eat the space the user must free
        raise
    _fsync_dir(target.parent)


def _write_model_tmp(
    tmp: Path,
    provenance: Provenance,
    state_dict: Mapping[str, Any],
    arch: Mapping[str, Any],
    train_state: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None,
    complete: bool,
) -> None:
    import torch

    with h5py.File(tmp, "w") as h5:
        provenance.write_attrs(h5.attrs)
        h5.attrs["arch"] = json.dumps(dict(arch), sort_keys=True)
        for name, value in (meta or {}).items():
            h5.attrs[f"meta_{name}"] = json.dumps(value, sort_keys=True, default=str)
        weights = h5.create_group("weights")
        for key, tensor in state_dict.items():
            _checksummed(weights, key, tensor.detach().cpu().numpy(), compress=False)
        if train_state is not None:
            train = h5.create_group("train")
            for key, value in train_state.items():
                if isinstance(value, (int, float, str, bool)) or value is None:
                    train.attrs[key] = json.dumps(value)
                else:
                    buffer = io.BytesIO()
                    torch.save(value, buffer)
                    _checksummed(train, key, np.frombuffer(buffer.getvalue(), dtype=np.uint8), compress=False)
        h5.attrs["complete"] = complete
        _seal(h5)


def save_checkpoint(
    path: Path,
    provenance: Provenance,
    state_dict: Mapping[str, Any],
    arch: Mapping[str, Any],
    train_state: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Save a training checkpoint as ``NAME.h5.partial`` (replaced whole, atomically, each time).

    ``train_state`` holds the epoch, step and anything torch can save (optimizer state, RNG states).
    """
    _write_model_file(partial_path(Path(path)), provenance, state_dict, arch, train_state, meta, False)


def save_model(
    path: Path,
    provenance: Provenance,
    state_dict: Mapping[str, Any],
    arch: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the finished model ``NAME.h5`` (complete) and remove its checkpoint."""
    path = Path(path)
    _write_model_file(path, provenance, state_dict, arch, None, meta, True)
    partial_path(path).unlink(missing_ok=True)
    return path


def _read_model(h5: h5py.File, path: Path, provenance: Provenance) -> ModelArtifact:
    import torch

    with _reading(path, "its weights"):
        if "weights" not in h5 or "arch" not in h5.attrs:
            raise ArtifactError(
                f"{path}: a model artifact without weights or arch; rerun its stage with --force"
            )
        state = {
            key: torch.from_numpy(np.array(_verified(path, ds, f"weight {key!r}")))
            for key, ds in h5["weights"].items()
        }
        train_state = None
        if "train" in h5:
            train_state = {k: json.loads(v) for k, v in h5["train"].attrs.items()}
            for key, ds in h5["train"].items():
                raw = _verified(path, ds, f"training state {key!r}")
                train_state[key] = torch.load(io.BytesIO(raw.tobytes()), weights_only=False)
        meta = {k[5:]: json.loads(v) for k, v in h5.attrs.items() if str(k).startswith("meta_")}
        return ModelArtifact(state, json.loads(h5.attrs["arch"]), provenance, train_state, meta)


def load_model(path: Path | str, dataset: Mapping[str, Any] | None = None) -> ModelArtifact:
    """Load a complete model artifact (refusals as ``open_artifact``)."""
    with open_artifact(path, kind="model", dataset=dataset) as art:
        return _read_model(art.h5, art.path, art.provenance)


def load_checkpoint(path: Path, provenance: Provenance, *, force: bool = False) -> ModelArtifact | None:
    """The checkpoint of an interrupted training with the same fingerprint, or None to start afresh.

    A checkpoint of other settings is refused (naming what differs) unless ``force``; an unreadable one
    (killed mid-write before the atomic rename cannot happen, but a disk error can) is discarded.
    """
    partial = partial_path(Path(path))
    if not partial.exists():
        return None
    try:
        h5 = _open_h5(partial)
    except ArtifactError:
        partial.unlink()
        return None
    with h5:
        found = Provenance.read_attrs(h5.attrs, partial)
        if found.fingerprint != provenance.fingerprint:
            if force:
                return None
            raise StaleArtifact(
                f"{partial}: an interrupted training with other settings "
                f"({describe_difference(found, provenance)}); rerun with --force to discard it"
            )
        return _read_model(h5, partial, found)


def model_status(path: Path, provenance: Provenance, *, force: bool = False) -> bool:
    """True when ``path`` is a complete model with this fingerprint (nothing to train).

    Refuses a complete model made with other settings unless ``force``.
    """
    path = Path(path)
    if not path.exists() or force:
        return False
    found = _existing_fingerprint(path)
    if found is None:
        raise ArtifactError(
            f"{path}: exists but is not a readable wsss artifact; delete it or rerun with --force"
        )
    old, complete = found
    if old.fingerprint != provenance.fingerprint:
        raise StaleArtifact(
            f"{path}: made with other settings ({describe_difference(old, provenance)}); rerun with --force "
            "to replace it, or use another --run"
        )
    return complete


def iter_records(art: Artifact) -> Iterator[tuple[str, h5py.Group]]:
    """Every per-image group of an artifact, in id order."""
    with _reading(art.path, "its image index"):
        images = art.h5.get("images")
        keys = sorted(images) if images is not None else []
    for key in keys:
        with _reading(art.path, f"the record of image {key!r}"):
            group = images[key]
        yield key, group
