"""Command line and YAML for ``FitConfig``: defaults < ``--config`` file < flags.

Every dataclass field is a flag (``max_steps`` -> ``--max-steps``, also ``--max_steps``), typed
from its annotation; booleans take ``--lora`` / ``--no-lora`` (or ``--lora false``); lists take
several values (``--loss-type sigmoid sft``). trl's and transformers' names work too, as flags
and YAML keys (``--per_device_train_batch_size``, ``--bf16``, ``--use_peft``:
``training.base.trl_names``). A YAML file may be nested by group (``dpo: {beta: 0.2}``) or flat
(``beta: 0.2``); unknown keys are an error, never ignored. Each value is checked against its
field's type and range (``training.base.field_checks``); flags are never abbreviated (``--lr``
is not ``--lr-scheduler-type``).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from training.base.config import GROUPS, FitConfig, field_names, flag
from training.base.field_checks import allowed_text, base_type
from training.base.trl_names import (
    CONVERTED,
    NO_COUNTERPART,
    aliases_of,
    no_counterpart_message,
    trl_fields,
)

# The namespace attribute a trl-spelled converted flag is stored under (``--bf16``: "trl:bf16").
TRL_DEST = "trl:"
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _none_or(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off, any case), as trl's parser reads a switch."""
    value = text.strip().lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class BoolFlag(argparse.Action):
    """A switch: ``--lora`` or ``--lora true`` sets it, ``--no-lora`` or ``--lora false`` clears
    it (trl's parser takes ``--bf16 True``). Each spelling gets its ``--no-`` form."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        self.negatives = ["--no-" + s[2:] for s in option_strings]
        kwargs.setdefault("metavar", "BOOL")
        super().__init__([*option_strings, *self.negatives], dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string in self.negatives:
            if values is not None:
                raise argparse.ArgumentError(self, f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
            return
        setattr(namespace, self.dest, True if values is None else parse_bool(values))


class CompactHelp(argparse.HelpFormatter):
    """Shows each option once, under our hyphen spelling (and its ``--no-`` form); the other
    spellings are named in its help text."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        first = action.option_strings[0]
        if isinstance(action, BoolFlag):
            return f"{first}, {action.negatives[0]}"
        if action.nargs == 0:
            return ", ".join(action.option_strings)
        return (
            f"{first} {self._format_args(action, self._get_default_metavar_for_optional(action))}"
        )


class FitArgumentParser(argparse.ArgumentParser):
    """argparse, naming an option in an error by its first spelling (``--max-steps``), not by
    all of them (``--max-steps/--max_steps``)."""

    def error(self, message: str):
        message = re.sub(r"argument (--[\w-]+)(?:/--[\w-]+)+", r"argument \1", message)
        super().error(message)


def spellings(name: str) -> list[str]:
    """``max_steps`` -> ``["--max-steps", "--max_steps"]`` (one entry when they coincide)."""
    return list(dict.fromkeys([flag(name), "--" + name]))


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field (and trl's names for it); defaults are
    left to the dataclasses, and shown in each help line."""
    parser = FitArgumentParser(
        prog="python -m training.fit",
        usage="%(prog)s [--config FILE] [options]",
        description=(
            "Train a causal LM with DPO (Lightning). No arguments: the embedded default. Every "
            "option also takes underscores (--batch_size) and, where trl or transformers has "
            "one, trl's name (--per_device_train_batch_size); the same names work in --config."
        ),
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
        formatter_class=CompactHelp,
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
    add_trl_flags(parser)
    return parser


def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = f.default
    if isinstance(default, list):
        return " ".join(map(str, default))
    return (
        "none"
        if default is None
        else str(default).lower()
        if isinstance(default, bool)
        else str(default)
    )


def add_group_flags(parser: argparse.ArgumentParser, group: str) -> None:
    """One flag per field of config group ``group``, in a section of ``parser``'s help, under
    every spelling: ours and trl's, with hyphens and with underscores."""
    cls = GROUPS[group]
    section = parser.add_argument_group(group, cls.__doc__)
    for f in dataclasses.fields(cls):
        kind, is_list, optional = base_type(f.type)
        aliases = aliases_of(f.name)
        names = [s for n in [f.name, *aliases] for s in spellings(n)]
        allowed = allowed_text(f.metadata)
        help_text = f.metadata.get("help", "") + (f" [{allowed}]" if allowed else "")
        if aliases:
            help_text += " trl: " + ", ".join("--" + a for a in aliases) + "."
        help_text += f" (default: {_default_text(f)})".replace("%", "%%")
        if kind is bool:
            section.add_argument(*names, dest=f.name, action=BoolFlag, help=help_text)
        elif is_list:
            section.add_argument(*names, dest=f.name, nargs="+", type=kind, help=help_text)
        else:
            kind = _none_or(kind) if optional else kind
            section.add_argument(*names, dest=f.name, type=kind, help=help_text)


def add_trl_flags(parser: argparse.ArgumentParser) -> None:
    """trl's options that set one of ours by another value (``--bf16``), in their own section."""
    section = parser.add_argument_group(
        "trl's names", "trl / transformers options whose value maps onto the options above."
    )
    for name, option in CONVERTED.items():
        dest = TRL_DEST + name
        if option.kind is bool:
            section.add_argument(*spellings(name), dest=dest, action=BoolFlag, help=option.help)
        else:
            section.add_argument(*spellings(name), dest=dest, type=str, help=option.help)


def answer_help(argv: list[str]) -> None:
    """Print the help and exit when ``argv`` asks for it: called before the heavy imports of
    ``training.fit``, so ``--help`` answers in about a second."""
    if "-h" in argv or "--help" in argv:
        build_parser().parse_args(["--help"])


def refuse_extras(parser: argparse.ArgumentParser, extras: list[str]) -> None:
    """What argparse did not take: a trl name with no counterpart here is one line saying so
    (a ``ValueError``); anything else is argparse's own "unrecognized arguments" (exit 2)."""
    for arg in extras:
        name = arg[2:].split("=")[0].replace("-", "_") if arg.startswith("--") else ""
        if name in NO_COUNTERPART:
            raise ValueError(f"--{name}: {no_counterpart_message(name)}")
    parser.error(f"unrecognized arguments: {' '.join(extras)}")


def _flatten_yaml(data: dict, source: Path) -> dict[str, Any]:
    """Accept nested ``group: {field: value}`` or flat ``field: value`` YAML, keys with
    underscores or hyphens, ours or trl's (``training.base.trl_names``: converted to our fields;
    ours win over trl's for the same field); reject unknown keys."""
    names = field_names()
    flat: dict[str, Any] = {}
    from_trl: dict[str, Any] = {}
    for raw_key, value in (data or {}).items():
        key = str(raw_key).replace("-", "_")
        if key in GROUPS and isinstance(value, dict):
            for raw_sub, subvalue in value.items():
                sub = str(raw_sub).replace("-", "_")
                if names.get(sub) != key:
                    raise ValueError(f"{source}: unknown key {key}.{raw_sub}")
                flat[sub] = subvalue
        elif key in names:
            flat[key] = value
        else:
            from_trl.update(_trl_key(raw_key, value, source))
    return {**from_trl, **flat}


def _trl_key(key: str, value: Any, source: Path) -> dict[str, Any]:
    """Our fields that trl's YAML key ``key`` sets; a ``ValueError`` naming the file and the key
    when it has no counterpart here or is not an option at all."""
    name = str(key).replace("-", "_")
    option = CONVERTED.get(name)
    if option is not None and option.kind is str:
        value = str(value)  # YAML 1.1 reads an unquoted no / true as a boolean
    elif option is not None:
        value = _check_type(name, value, option.kind, source)
    try:
        return trl_fields(name, value)
    except KeyError:
        raise ValueError(f"{source}: unknown key {key!r}") from None
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


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
    """Parse ``argv`` (and the YAML file it names) into a checked ``FitConfig``.
    ``args.explicit``: the fields the user set (by YAML or flag, under any name)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        refuse_extras(parser, extras)
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(checked_values(read_config_file(args.config), args.config))
    values.update(flag_values(args))
    cfg = config_from_values(values)
    args.explicit = set(values)  # for the embedded recipe: it never overrides these
    return cfg, args


def checked_values(values: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """Each of our fields' raw ``values`` (YAML, Python) as its type, or a ``ValueError``
    naming ``source`` and the field."""
    annotations = {f.name: f.type for cls in GROUPS.values() for f in dataclasses.fields(cls)}
    return {k: _check_type(k, v, annotations[k], source) for k, v in values.items()}


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The fields set on the command line (typed by argparse): trl's converted flags first,
    our own names over them."""
    names = field_names()
    values: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(TRL_DEST):
            try:
                values.update(trl_fields(dest[len(TRL_DEST) :], value))
            except ValueError as err:
                raise ValueError(f"--{err}") from None
    values.update({k: v for k, v in vars(args).items() if k in names})
    return values


def config_from_values(values: dict[str, Any]) -> FitConfig:
    """A checked ``FitConfig`` from ``{field: value}`` (any group), defaults elsewhere."""
    names = field_names()
    groups: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for name, value in values.items():
        groups[names[name]][name] = value
    return FitConfig(**{g: GROUPS[g](**kw) for g, kw in groups.items()})


def config_to_yaml(cfg: FitConfig) -> str:
    """The full resolved config as nested YAML (what ``--print-config`` prints and runs save)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
