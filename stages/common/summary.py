"""What a stage returns: figures and tables for the CLI to render, and for tests and `wsss run` to read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Summary:
    """One stage's outcome. ``status`` is ``made``, ``resumed`` or ``up to date``."""

    stage: str
    status: str = "made"
    artifacts: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 and self.images else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "status": self.status,
            "artifacts": [str(p) for p in self.artifacts],
            "seconds": round(self.seconds, 3),
            "images": self.images,
            "figures": self.figures,
            "tables": self.tables,
            "notes": self.notes,
        }
