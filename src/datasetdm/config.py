"""Configs read from files are validated, not trusted: unknown keys and ill-typed values are a
DatasetdmError naming the file and the key (pydantic validates the dataclasses)."""

from __future__ import annotations

from typing import TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

from datasetdm.errors import DatasetdmError

# set as ``__pydantic_config__`` on a config dataclass: a key the class does not have is an error
STRICT = ConfigDict(extra="forbid")

T = TypeVar("T")


def load_config(cls: type[T], data, where: str) -> T:
    """``cls`` (a dataclass) from ``data`` (a dict read from the file ``where``)."""
    if not isinstance(data, dict):
        raise DatasetdmError(f"{where}: expected a JSON object of {cls.__name__} fields, got {type(data).__name__}")
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or cls.__name__}: {err['msg']}" for err in e.errors())
        raise DatasetdmError(f"{where}: {problems}") from None


def read_json(path) -> object:
    """The JSON in the file ``path``; a missing, unreadable or malformed file is a DatasetdmError naming it."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetdmError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise DatasetdmError(f"{path}: not valid JSON ({e})") from None


def read_config(cls: type[T], path) -> T:
    """``cls`` from the JSON file ``path``, validated (``load_config``)."""
    return load_config(cls, read_json(path), str(path))
