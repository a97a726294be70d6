"""Typed, validated settings: pydantic models filled from defaults < YAML file < command-line overrides.

Every method keeps its own settings class next to its code (e.g. ``SeekingConfig``); this module only
provides the loading rule so that all of them report bad settings the same way: one line naming the
file and the offending key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pkt.errors import PktError

T = TypeVar("T", bound=BaseModel)


class Settings(BaseModel):
    """Base for settings classes: unknown keys are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PktError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PktError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PktError(f"{path}: expected a mapping of settings at the top level")
    return data


def validate(cls: type[T], data: dict, source: str = "settings") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise PktError(f"{source}: {loc}: {err['msg']}") from None


def load_config(cls: type[T], path: str | Path | None = None, section: str | None = None, **overrides) -> T:
    """Defaults of ``cls``, updated by the YAML file (optionally one top-level ``section`` of it), then by
    the non-None ``overrides`` (command-line flags)."""
    data: dict = {}
    source = "settings"
    if path is not None:
        data = read_yaml(path)
        source = str(path)
        if section is not None:
            data = data.get(section, {}) or {}
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return validate(cls, data, source)
