"""Dataclasses to and from JSON with their types checked: the one schema check for every
configuration file mlsae reads back (cfg.json, train_cfg.json, lens.json, ...).

`from_dict(Cls, obj, where)` builds `Cls` from a JSON object, field by field, checking each value
against the field's annotation (int, float, str, bool, Path, Literal choices, X | None, list[X],
tuple[X, ...], nested dataclasses) and raising one `MlsaeError` that names the file and field
("train_cfg.json: train.lr: expected a number, got '1e-3'"). Unknown keys are ignored (newer
files), missing keys take the field's default (older files), a missing key without a default is
an error. The dataclass's own `__post_init__` then validates values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin

from mlsae.core.errors import MlsaeError

T = TypeVar("T")


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations of a dataclass (strings under `from __future__`)."""
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        item = get_args(tp)[0] if get_args(tp) else Any
        plural = {
            int: "integers",
            float: "numbers",
            str: "strings",
            bool: "booleans",
            Path: "path strings",
        }.get(item)
        if plural is None and dataclasses.is_dataclass(item):
            plural = "objects"
        return f"a list of {plural}" if plural else f"a list, each {_describe(item)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        Path: "a path string",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def convert(tp: Any, value: Any, where: str) -> Any:
    """`value` (from JSON) as type `tp`, or MlsaeError naming `where`."""
    origin = get_origin(tp)
    bad = MlsaeError(f"{where}: expected {_describe(tp)}, got {value!r:.60}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, where)
            except MlsaeError:
                continue
        raise bad
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad
            return tuple(
                convert(a, v, f"{where}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        out = [convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise MlsaeError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if tp is Path:
        if isinstance(value, str):
            return Path(value)
        raise bad
    raise MlsaeError(f"{where}: unsupported field type {tp!r}")  # pragma: no cover


def from_dict(cls: type[T], obj: Any, where: str) -> T:
    """Build dataclass `cls` from the JSON object `obj` with every field type-checked."""
    if not isinstance(obj, dict):
        raise MlsaeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    kw = {}
    for f in dataclasses.fields(cast(Any, cls)):
        if not f.init:
            continue
        if f.name in obj:
            kw[f.name] = convert(hints(cls)[f.name], obj[f.name], f"{where}: {f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise MlsaeError(f"{where}: missing field {f.name!r}")
    try:
        return cls(**kw)
    except MlsaeError as e:
        raise MlsaeError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise MlsaeError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """JSON-ready dict of a dataclass (Paths as strings, tuples as lists), recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj
