"""Per-image stages split over processes (torchrun ranks) and machines (``--shard k/n``), and the merge.

Each process takes ``ids[rank::world]`` of its slice (never padded with repeats) and writes its own
file; nothing is shared while images are computed, so the result is the same image for image as one
process's:

- under ``torchrun`` rank r writes ``NAME.h5.rank{r}.partial`` (resumable like any partial artifact);
  when every rank is done, rank 0 copies the records group by group into ``NAME.h5`` (h5py's ``copy``:
  bytes, checksums and compression as written, one image in memory at a time) and deletes the pieces;
- with ``--shard k/n`` (no process group; other machines run the other slices) the process writes a
  complete ``NAME.shard{k}of{n}.h5``; ``wsss merge`` (`merge_shards`) joins the n shards into ``NAME.h5``.

A piece's provenance is the stage's with a ``shard`` entry in its config (so a shard is never mistaken
for the whole artifact, and resumes only with the same split); the merged file gets the stage's own
provenance back, so its fingerprint is the one a single process would have written. Merging refuses
shards of other settings, a missing or repeated shard, and a missing or repeated image.

A stage uses it in place of ``artifacts.begin``::

    with stage_lock(opts, "crf"):
        status = begin_sharded(out, provenance, ids, opts)
        if status.up_to_date: ...
        with status.writer as writer:
            for image_id in status.ids: ...write_image...
            writer.finish()
        status.complete()              # rank 0 merges the ranks' pieces; every rank returns the path
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from stages.common.artifacts import (
    ArtifactWriter,
    Provenance,
    begin,
    describe_difference,
    open_artifact,
    partial_path,
    read_provenance,
)
from stages.common.context import RunOptions
from stages.common.distributed import barrier, init_if_launched, local_device, rank_and_world, shard
from stages.common.errors import ArtifactError, ConfigError, StaleArtifact
from stages.common.lock import RunLock

SHARD_KEY = "shard"  # the config entry that marks a piece: {"k", "n", "rank", "world"}
_SHARD_NAME = re.compile(r"^(?P<stem>.+)\.shard(?P<k>\d+)of(?P<n>\d+)(?P<suffix>\.h5)$")


def shard_path(path: Path, k: int, n: int) -> Path:
    """``RUN/pseudo.h5`` -> ``RUN/pseudo.shard{k}of{n}.h5``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.shard{k}of{n}{path.suffix}")


def unsharded_path(path: Path) -> Path:
    """``RUN/pseudo.shard0of2.h5`` -> ``RUN/pseudo.h5`` (the default output of `wsss merge`)."""
    match = _SHARD_NAME.match(Path(path).name)
    if match is None:
        raise ConfigError(f"{path}: not named NAME.shardKofN.h5; give the merged file's name with --out")
    return Path(path).with_name(match["stem"] + match["suffix"])


def rank_path(path: Path, rank: int) -> Path:
    """Where rank r's piece goes: ``NAME.h5.rank{r}`` (it only ever exists as ``.partial``)."""
    return Path(path).with_name(f"{Path(path).name}.rank{rank}")


def with_shard(provenance: Provenance, **entry: int) -> Provenance:
    """The provenance of a piece: the stage's, its config marked with ``shard: entry``."""
    marked = {**provenance.config, SHARD_KEY: {**provenance.config.get(SHARD_KEY, {}), **entry}}
    return dataclasses.replace(provenance, config=marked)


def without_shard(provenance: Provenance) -> Provenance:
    """The stage's own provenance back from a piece's."""
    return dataclasses.replace(
        provenance, config={k: v for k, v in provenance.config.items() if k != SHARD_KEY}
    )


def stage_lock(opts: RunOptions, what: str) -> AbstractContextManager[Any]:
    """The run directory's lock, held by one process per job.

    Under torchrun rank 0 holds it for the whole job (the other ranks would be refused by their own
    rank 0); a ``--shard k/n`` process locks only its slice, so the n machines may share one run
    directory on a network filesystem while two runs of the same slice are still refused.
    """
    if rank_and_world()[0] != 0:
        return contextlib.nullcontext()
    if opts.shard is not None:
        k, n = opts.shard
        return RunLock(opts.run_dir / f".shard{k}of{n}", what)
    return opts.lock(what)


class _PieceWriter:
    """A rank's writer: ``finish()`` closes the piece without marking it complete (rank 0 merges it)."""

    def __init__(self, writer: ArtifactWriter) -> None:
        self._writer = writer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def __enter__(self) -> _PieceWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._writer.__exit__(*exc)

    def finish(self) -> Path:
        self._writer.flush()
        self._writer.close()
        return self._writer.partial


@dataclass
class ShardedStatus:
    """What `begin_sharded` found: like ``artifacts.WriteStatus``, plus this process's ids.

    ``path`` is what the job produces (``NAME.h5``, or ``NAME.shardKofN.h5`` with ``--shard``); ``ids``
    the images this process computes; ``all_ids`` the images ``path`` will hold.
    """

    path: Path
    provenance: Provenance
    ids: list[str]
    all_ids: list[str]
    writer: Any = None
    up_to_date: bool = False
    resumed: int = 0
    note: str = ""
    pieces: list[Path] = field(default_factory=list)

    def complete(self) -> Path:
        """Under torchrun: wait for every rank, rank 0 merges the pieces into ``path``, wait again."""
        if self.pieces:
            barrier()
            if rank_and_world()[0] == 0:
                merge_pieces(self.pieces, self.path, self.provenance, self.all_ids)
            barrier()
        return self.path


def begin_sharded(path: Path, provenance: Provenance, ids: Sequence[str], opts: RunOptions) -> ShardedStatus:
    """Open this process's share of the artifact ``path`` (see the module docstring).

    One process without ``--shard``: exactly ``artifacts.begin``. An up-to-date ``path`` is up to date
    for every rank; a stale one is refused (``--force`` recomputes), as ``begin`` does.
    """
    target, target_prov, target_ids = Path(path), provenance, list(ids)
    if opts.shard is not None:
        k, n = opts.shard
        target, target_ids = shard_path(target, k, n), shard(target_ids, k, n)
        target_prov = with_shard(provenance, k=k, n=n, total=len(ids))
    init_if_launched(local_device(opts.torch_device()))
    rank, world = rank_and_world()
    if world == 1:
        status = begin(target, target_prov, force=opts.force)
        return ShardedStatus(
            target,
            target_prov,
            target_ids,
            target_ids,
            status.writer,
            status.up_to_date,
            status.resumed,
            status.note,
        )
    if _up_to_date(target, target_prov, opts.force):
        return ShardedStatus(
            target, target_prov, [], target_ids, None, True, 0, f"{target.name} is up to date"
        )
    barrier()  # no rank starts before every rank has looked at the finished file
    piece = rank_path(target, rank)
    status = begin(piece, with_shard(target_prov, rank=rank, world=world), force=opts.force)
    if status.writer is None:  # a complete piece never exists; force recomputes a stale one
        raise ArtifactError(f"{piece}: a complete rank piece; delete it and rerun")
    pieces = [partial_path(rank_path(target, r)) for r in range(world)]
    return ShardedStatus(
        target,
        target_prov,
        shard(target_ids, rank, world),
        target_ids,
        _PieceWriter(status.writer),
        False,
        status.resumed,
        status.note,
        pieces,
    )


def _up_to_date(path: Path, provenance: Provenance, force: bool) -> bool:
    """``begin``'s first check, read-only: complete with this fingerprint, or refused as stale."""
    if force or not path.exists():
        return False
    old, complete = read_provenance(path)
    if old.fingerprint != provenance.fingerprint:
        raise StaleArtifact(
            f"{path}: made with other settings ({describe_difference(old, provenance)}); rerun with --force "
            "to replace it, or use another --run"
        )
    return complete


# ---------------------------------------------------------------------------------------------------------
# Merging


def _done_ids(h5: h5py.File) -> Iterator[str]:
    images = h5.get("images")
    for key in sorted(images) if images is not None else []:
        if bool(images[key].attrs.get("done", False)):
            yield key


def merge_pieces(
    sources: Sequence[Path], out: Path, provenance: Provenance, expected: Sequence[str], *, keep: bool = False
) -> Path:
    """Copy every done image record of ``sources`` into the complete artifact ``out`` (``provenance``).

    Records are copied group by group with h5py (datasets, filters and checksums as written); the root
    ``meta_*`` records come from the first source. Refuses an image in two sources, and ``expected``
    images that no source holds. The sources are deleted once ``out`` is complete, unless ``keep``.
    """
    status = begin(out, provenance, force=True)
    assert status.writer is not None
    wanted = set(expected)
    seen: dict[str, Path] = {}
    with status.writer as writer:
        images = writer.h5.require_group("images")
        for index, source in enumerate(sources):
            with _open_source(source) as h5:
                if index == 0:
                    for name, value in h5.attrs.items():
                        if str(name).startswith("meta_") and str(name) != f"meta_{SHARD_KEY}":
                            writer.h5.attrs[name] = value
                for image_id in _done_ids(h5):
                    if image_id in seen:
                        raise ArtifactError(
                            f"{source}: image {image_id!r} is also in {seen[image_id]}; the shards overlap "
                            "(made with different --shard splits?): rerun the shards with one k/n"
                        )
                    if image_id not in wanted:
                        raise ArtifactError(
                            f"{source}: holds image {image_id!r}, which is not in the split it was made for"
                        )
                    seen[image_id] = source
                    if not writer.done(image_id):  # a resumed merge keeps what it already copied
                        h5.copy(h5["images"][image_id], images, name=image_id)
        missing = [i for i in expected if i not in seen]
        if missing:
            raise ArtifactError(
                f"{out}: {len(missing)} of {len(expected)} images are in no shard (e.g. {missing[0]!r}); "
                "rerun the shard that should hold them, then merge again"
            )
        writer.finish()
    if not keep:
        for source in sources:
            Path(source).unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def _open_source(path: Path) -> Iterator[h5py.File]:
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise ArtifactError(
            f"{path}: missing or unreadable shard ({exc}); rerun the stage that makes it"
        ) from exc
    with h5:
        yield h5


@dataclass
class MergeResult:
    out: Path
    shards: int
    images: int
    fingerprint: str


def merge_shards(paths: Sequence[Path], out: Path | None = None, *, force: bool = False) -> MergeResult:
    """`wsss merge`: join the n complete ``--shard k/n`` artifacts of one stage into one artifact.

    Refuses files that are not shards, shards of other settings or inputs (their provenances without
    the shard entry differ), a shard given twice or missing, and missing or repeated images. Each
    shard is kept; ``out`` (default: the name without ``.shardKofN``) is up to date when it already
    holds this merge (``force`` remakes it).
    """
    if not paths:
        raise ConfigError("wsss merge: give the shard files, e.g. RUN/pseudo.shard*of*.h5")
    entries: dict[int, Path] = {}
    base: Provenance | None = None
    count = total = 0
    for path in paths:
        with open_artifact(path) as art:
            entry = art.config.get(SHARD_KEY)
            if not isinstance(entry, dict) or "k" not in entry:
                raise ArtifactError(f"{path}: not a shard (made without --shard k/n); merge only shard files")
            own = without_shard(art.provenance)
        if base is None:
            base, count, total = own, int(entry["n"]), int(entry["total"])
        elif own.fingerprint != base.fingerprint:
            raise StaleArtifact(
                f"{path}: made with other settings than {paths[0]} ({describe_difference(base, own)}); "
                "rerun that shard with the same options"
            )
        elif int(entry["n"]) != count:
            raise ConfigError(f"{path}: a shard of {entry['n']}, not of {count}; merge shards of one split")
        if int(entry["k"]) in entries:
            raise ConfigError(
                f"{path}: shard {entry['k']}/{count} given twice (also {entries[int(entry['k'])]})"
            )
        entries[int(entry["k"])] = Path(path)
    assert base is not None
    absent = [k for k in range(count) if k not in entries]
    if absent:
        raise ArtifactError(
            f"shard {absent[0]}/{count} is missing ({len(entries)} of {count} given); run the stage with "
            f"--shard {absent[0]}/{count} and merge again"
        )
    out = Path(out) if out is not None else unsharded_path(paths[0])
    if _up_to_date(out, base, force):
        return MergeResult(out, count, _count(out), base.fingerprint)
    expected = _expected_ids(entries, total)
    merge_pieces([entries[k] for k in range(count)], out, base, expected, keep=True)
    return MergeResult(out, count, len(expected), base.fingerprint)


def _expected_ids(entries: dict[int, Path], total: int) -> list[str]:
    """The ids the merged file must hold: every shard's, checked to add up to the split's ``total``."""
    ids: list[str] = []
    for k in sorted(entries):
        with open_artifact(entries[k]) as art:
            ids.extend(art.ids())
    if len(ids) != total:
        unique = len(set(ids))
        what = "repeated" if unique < len(ids) else "missing"
        raise ArtifactError(
            f"the {len(entries)} shards hold {len(ids)} image records ({unique} distinct) for a split of "
            f"{total} images: some are {what}; rerun the shards with one k/n and merge again"
        )
    return ids


def _count(path: Path) -> int:
    with open_artifact(path) as art:
        return len(art)
