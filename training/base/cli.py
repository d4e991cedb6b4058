"""Command line and YAML for ``FitConfig``: defaults < ``--config`` file < flags.

Every dataclass field is a flag (``max_steps`` -> ``--max-steps``), typed from its annotation;
booleans take ``--lora`` / ``--no-lora``; lists take several values (``--loss-type sigmoid sft``).
A YAML file may be nested by group (``dpo: {beta: 0.2}``) or flat (``beta: 0.2``); unknown keys
are an error, never ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from training.base.config import GROUPS, FitConfig, field_names, flag


def _base_type(annotation: Any) -> tuple[type, bool, bool]:
    """(element type, is_list, is_optional) of a field annotation such as ``list[str] | None``."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


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
        kind, is_list, optional = _base_type(f.type)
        name = flag(f.name)
        help_text = f.metadata.get("help", "")
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


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Coerce a YAML value to the field's type, with an error that names the field."""
    kind, is_list, optional = _base_type(annotation)
    if value is None and optional:
        return None
    try:
        if is_list:
            values = value if isinstance(value, list) else [value]
            return [kind(v) for v in values]
        if kind is bool and not isinstance(value, bool):
            raise TypeError(f"expected true/false, got {value!r}")
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config field {name}: {err}") from None


def resolve_config(argv: list[str] | None = None) -> tuple[FitConfig, argparse.Namespace]:
    """Parse ``argv`` (and the YAML file it names) into a checked ``FitConfig``."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(_flatten_yaml(yaml.safe_load(Path(args.config).read_text()), args.config))
    names = field_names()
    values.update({k: v for k, v in vars(args).items() if k in names})
    groups: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for name, value in values.items():
        group = names[name]
        annotation = next(f.type for f in dataclasses.fields(GROUPS[group]) if f.name == name)
        groups[group][name] = _check_type(name, value, annotation)
    cfg = FitConfig(**{g: GROUPS[g](**kw) for g, kw in groups.items()})
    args.explicit = set(values)  # the fields the user set (YAML or flags), for recipe defaults
    return cfg, args


def config_to_yaml(cfg: FitConfig) -> str:
    """The full resolved config as nested YAML (what ``--print-config`` prints and runs save)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
