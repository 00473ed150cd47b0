"""Typed command results: every command returns a dataclass that the CLI prints for people (`describe`) or
serialises for pipelines (`to_json`, behind `--json`), and that recipes and library users read by attribute."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import PurePath
from typing import Any


def jsonable(value: Any) -> Any:
    """Plain JSON types for dataclasses, paths, enums, tuples and sets, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, Report):
            return value.to_json()
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


class Report:
    """Mixin for result dataclasses."""

    def to_json(self) -> dict:
        return {f.name: jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.repr}

    def describe(self) -> str:
        raise NotImplementedError(type(self).__name__)
