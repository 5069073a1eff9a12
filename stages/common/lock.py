"""One writer at a time per run directory.

An advisory ``flock`` on ``RUN/.wsss.lock``: the kernel drops it when the holder dies, so a killed run
never leaves a stale lock behind, and a second writer is refused at once instead of racing the first.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from stages.common.errors import WsssError

LOCK_NAME = ".wsss.lock"


class RunLock:
    """Hold the run directory's lock for the duration of a ``with`` block."""

    def __init__(self, run_dir: Path, what: str = "wsss") -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as exc:
            raise WsssError(
                f"{self.path.parent}: run directory is not writable; fix its permissions or use another --run"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WsssError(
                f"{self.path.parent}: another wsss process is writing here ({holder}); wait for it to "
                "finish or use another --run"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {self.what}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
