"""The tool's own errors: each carries one line that names the file and the fix."""

from __future__ import annotations


class WsssError(Exception):
    """An error the user can act on; the CLI prints its message as one line, no traceback."""

    def __init__(self, message: str) -> None:
        # One line by contract: a multi-line message would be cut by the CLI anyway.
        super().__init__(" ".join(message.split()))


class ArtifactError(WsssError):
    """An artifact that cannot be used: missing, incomplete, of another kind, run or dataset."""


class StaleArtifact(ArtifactError):
    """An artifact (or interrupted one) made with other settings or inputs than asked now.

    ``wsss run`` catches it to recompute the stage and everything downstream; a single stage refuses.
    """


class DatasetError(WsssError):
    """A dataset that cannot be read as asked: missing files, corrupt images, unknown classes."""


class ConfigError(WsssError):
    """Options that contradict each other or name what does not exist."""
