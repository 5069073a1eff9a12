"""``wsss.toml``: the dataset, run directory and per-stage defaults that flags override."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TypeVar

from stages.common.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_NAME = "wsss.toml"
T = TypeVar("T")


def load_toml(path: Path = Path(CONFIG_NAME)) -> dict[str, Any] | None:
    """The parsed ``wsss.toml``, or None when there is none."""
    if not path.exists():
        return None
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix it or delete it and run `wsss init`") from exc


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def dump_toml(data: dict[str, dict[str, Any]]) -> str:
    """Tables of scalars and lists, which is all ``wsss.toml`` holds."""
    lines: list[str] = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None)
        lines.append("")
    return "\n".join(lines)


def merge_options(config_cls: type[T], section: dict[str, Any] | None, flags: dict[str, Any]) -> T:
    """Build a stage config: dataclass defaults < ``wsss.toml`` section < flags given on the command line."""
    known = {f.name: f for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in (section or {}).items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(
                f"{CONFIG_NAME}: unknown option {key!r} for this stage; known: {', '.join(sorted(known))}"
            )
        values[name] = value
    values.update({k: v for k, v in flags.items() if v is not None})
    for name, value in values.items():
        if isinstance(value, list):
            values[name] = tuple(value)
    return config_cls(**values)
