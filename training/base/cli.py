"""Command line and YAML for ``FitConfig``: defaults < ``--config`` file < flags.

Every dataclass field is a flag (``max_steps`` -> ``--max-steps``), typed from its annotation;
booleans take ``--lora`` / ``--no-lora``; lists take several values (``--loss-type sigmoid sft``).
A YAML file may be nested by group (``dpo: {beta: 0.2}``) or flat (``beta: 0.2``); unknown keys
are an error, never ignored. Each value is checked against its field's type and range
(``training.base.field_checks``); flags are never abbreviated (``--lr`` is not
``--lr-scheduler-type``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from training.base.config import GROUPS, FitConfig, field_names, flag
from training.base.field_checks import allowed_text, base_type


def _none_or(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field; defaults are left to the dataclasses."""
    parser = argparse.ArgumentParser(
        prog="python -m training.fit",
        description="Train a causal LM with DPO (Lightning). No arguments: the embedded default.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("--config", type=Path, help="YAML file with any of the fields below.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="On a failure, show the full traceback instead of one error line (or DPO_DEBUG=1).",
    )
    for group in GROUPS:
        add_group_flags(parser, group)
    return parser


def add_group_flags(parser: argparse.ArgumentParser, group: str) -> None:
    """One flag per field of config group ``group``, in a section of ``parser``'s help."""
    cls = GROUPS[group]
    section = parser.add_argument_group(group, cls.__doc__)
    for f in dataclasses.fields(cls):
        kind, is_list, optional = base_type(f.type)
        name = flag(f.name)
        allowed = allowed_text(f.metadata)
        help_text = f.metadata.get("help", "") + (f" [{allowed}]" if allowed else "")
        if kind is bool:
            section.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
        elif is_list:
            section.add_argument(name, nargs="+", type=kind, help=help_text)
        else:
            section.add_argument(name, type=_none_or(kind) if optional else kind, help=help_text)


def _flatten_yaml(data: dict, source: Path) -> dict[str, Any]:
    """Accept nested ``group: {field: value}`` or flat ``field: value`` YAML; reject unknown keys."""
    names = field_names()
    flat: dict[str, Any] = {}
    for key, value in (data or {}).items():
        if key in GROUPS and isinstance(value, dict):
            for sub, subvalue in value.items():
                if names.get(sub) != key:
                    raise ValueError(f"{source}: unknown key {key}.{sub}")
                flat[sub] = subvalue
        elif key in names:
            flat[key] = value
        else:
            raise ValueError(f"{source}: unknown key {key!r}")
    return flat


def _check_type(name: str, value: Any, annotation: Any, source: Path) -> Any:
    """A YAML value as the field's type (YAML 1.1 reads ``1e-3`` as text: it becomes a float),
    with an error naming the file and the field; a float is never truncated to an integer and
    true/false is not a number. Ranges are checked with the config (``check_fields``)."""
    kind, is_list, optional = base_type(annotation)
    if value is None and optional:
        return None
    values = value if is_list and isinstance(value, list) else [value]
    try:
        out = [_coerce(v, kind) for v in values]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: config field {name}: {err}") from None
    return out if is_list else out[0]


_KIND_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _coerce(value: Any, kind: type) -> Any:
    want = f"expected {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}"
    if isinstance(value, bool) != (kind is bool):
        raise TypeError(want)
    if kind is int and isinstance(value, float):
        raise TypeError(want)
    if isinstance(value, list | dict) or (kind is str and not isinstance(value, str)):
        raise TypeError(want)
    return kind(value)


def read_config_file(path: Path) -> dict[str, Any]:
    """The fields a ``--config`` YAML file sets; a ``ValueError`` naming the file (and the line of
    a syntax error) when it cannot be read or is not a mapping."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path}: a directory, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as err:
        cause = err.strerror.lower() if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"--config {path}: cannot be read ({cause})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"--config {path}{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"--config {path}: expected a mapping of fields (field: value), got a YAML "
            f"{type(data).__name__}"
        )
    return _flatten_yaml(data, path)


def resolve_config(argv: list[str] | None = None) -> tuple[FitConfig, argparse.Namespace]:
    """Parse ``argv`` (and the YAML file it names) into a checked ``FitConfig``."""
    args = build_parser().parse_args(argv)
    names = field_names()
    annotations = {f.name: f.type for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        for name, value in read_config_file(args.config).items():
            values[name] = _check_type(name, value, annotations[name], args.config)
    values.update({k: v for k, v in vars(args).items() if k in names})  # flags: typed by argparse
    groups: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for name, value in values.items():
        groups[names[name]][name] = value
    cfg = FitConfig(**{g: GROUPS[g](**kw) for g, kw in groups.items()})
    args.explicit = set(values)  # the fields the user set (YAML or flags), for recipe defaults
    return cfg, args


def config_to_yaml(cfg: FitConfig) -> str:
    """The full resolved config as nested YAML (what ``--print-config`` prints and runs save)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
