"""The checks every config field gets, from its annotation and its declared range.

A field declares what it accepts in its metadata (``training.base.config._f``): bounds ``ge``,
``gt``, ``le``, ``lt``, values ``also`` allowed outside them (``max_steps``: -1) and
``choices``. ``check_fields`` checks a config group's values against their types (a float is not
an integer, true/false is not a number) and those declarations, in one place, with an error
naming the flag: ``--max-steps must be -1 or >= 1, got 0``. ``--help`` shows the same words
(``allowed_text``).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import Field, fields
from typing import Any


def flag(field_name: str) -> str:
    """The command-line flag of a config field: ``max_steps`` -> ``--max-steps``."""
    return "--" + field_name.replace("_", "-")


def base_type(annotation: Any) -> tuple[type, bool, bool]:
    """(element type, is_list, is_optional) of a field annotation such as ``list[str] | None``."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def allowed_text(meta: typing.Mapping[str, Any]) -> str:
    """What a field accepts, in words: ``>= 1``, ``in [0, 1)``, ``-1 or >= 1``, ``one of a, b``."""
    if "choices" in meta:
        return "one of " + ", ".join(meta["choices"])
    low = next(((k, meta[k]) for k in ("ge", "gt") if k in meta), None)
    high = next(((k, meta[k]) for k in ("le", "lt") if k in meta), None)
    if low and high:
        opening, closing = "[" if low[0] == "ge" else "(", "]" if high[0] == "le" else ")"
        text = f"in {opening}{low[1]}, {high[1]}{closing}"
    elif low or high:
        op, bound = low or high
        text = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op] + f" {bound}"
    else:
        return ""
    also = meta.get("also", ())
    return " or ".join([*map(str, also), text])


def _within(value: Any, meta: typing.Mapping[str, Any]) -> bool:
    if value in meta.get("also", ()):
        return True
    if "choices" in meta:
        return value in meta["choices"]
    if isinstance(value, float) and math.isnan(value):
        return not any(k in meta for k in ("ge", "gt", "le", "lt"))
    return (
        ("ge" not in meta or value >= meta["ge"])
        and ("gt" not in meta or value > meta["gt"])
        and ("le" not in meta or value <= meta["le"])
        and ("lt" not in meta or value < meta["lt"])
    )


def _type_error(value: Any, kind: type) -> str | None:
    """Why ``value`` is not a ``kind`` (a bool is not a number, a float not an integer)."""
    if kind is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if isinstance(value, bool):
        return f"expected {'an integer' if kind is int else 'a number'}, not true/false"
    if kind is int and not isinstance(value, int):
        return "expected an integer"
    if kind is float and not isinstance(value, int | float):
        return "expected a number"
    if kind is str and not isinstance(value, str):
        return "expected a string"
    return None


def check_field(f: Field, value: Any) -> None:
    """``value`` has ``f``'s type and lies in its declared range or choices; else a
    ``ValueError`` naming the flag: ``--max-steps must be -1 or >= 1, got 0``."""
    kind, is_list, optional = base_type(f.type)
    if value is None and optional:
        return
    for item in value if is_list and isinstance(value, list) else [value]:
        problem = _type_error(item, kind)
        if problem:
            raise ValueError(f"{flag(f.name)}: {problem}, got {item!r}")
        if not _within(item, f.metadata):
            none = " (or none)" if optional else ""
            allowed = allowed_text(f.metadata)
            raise ValueError(f"{flag(f.name)} must be {allowed}{none}, got {item!r}")


def check_fields(group: Any) -> None:
    """Every field of a config group against its type and declared range (``_f``)."""
    for f in fields(group):
        check_field(f, getattr(group, f.name))
