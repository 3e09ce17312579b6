"""Each setting is declared once, as a dataclass field with its default, type, help and check;
command-line flags are derived from those fields.

    @dataclass
    class OptimConfig:
        lr: float = setting(2e-3, "peak learning rate", check=positive)

    add_arguments(parser, OptimConfig)            # --lr, type float, help with its default
    config = build(OptimConfig, vars(args))       # the flag's value when given, else the default
    check_settings(config)                        # "--lr must be > 0, got -1.0"

The flag is `--` + the field name with dashes (or the declared `flag`), and its argparse
`dest` is the key of `build`'s values, so a layer of overrides (a preset) is a plain dict
keyed by the same names. Flags default to None ("not given"), so that a given value, an
override and the declared default are told apart.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any

Check = Callable[[Any], "str | None"]  # returns why the value is wrong, or None


def positive(value) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value) -> str | None:
    return None if value >= 0 else "must be >= 0"


def setting(default: Any = None, help: str = "", *, flag: str | None = None, choices=None, check: Check | None = None):
    """A dataclass field that is also a command-line flag."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "check": check})


def is_setting(f) -> bool:
    return "help" in f.metadata


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest_of(f) -> str:
    return flag_of(f)[2:].replace("-", "_")


def _value_type(annotation):
    """`int | None` -> int; `list[str]` stays a list type."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def setting_fields(cls) -> list[tuple[Any, Any]]:
    """(field, value type) of each setting of a config class, nested config classes flattened."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in fields(cls):
        kind = _value_type(hints[f.name])
        if is_dataclass(kind):
            found += setting_fields(kind)
        elif is_setting(f):
            found.append((f, kind))
    return found


def add_arguments(group, cls, defaults: dict | None = None, note: Callable[[str], str] | None = None) -> None:
    """Add a flag for every setting of `cls` (nested config classes included). `defaults`
    (keyed by flag dest, e.g. `values_of` a built config) replaces declared defaults in the help
    text; `note(dest)` may add a remark after the default."""
    defaults = defaults or {}
    for f, kind in setting_fields(cls):
        dest = dest_of(f)
        default = defaults.get(dest, f.default)
        notes = []
        if kind is bool and default is not None:
            notes.append(f"default {'on' if default else 'off'}")
        elif default is not None and default is not MISSING:
            notes.append(f"default {default}")
        if note is not None and note(dest):
            notes.append(note(dest))
        help_text = f.metadata["help"] + (f" ({'; '.join(notes)})" if notes else "")
        kwargs: dict = {"default": None, "help": help_text.replace("%", "%%"), "dest": dest}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs="+", type=typing.get_args(kind)[0])
        else:
            kwargs.update(type=kind, choices=f.metadata["choices"])
        group.add_argument(flag_of(f), **kwargs)


def build(cls, values: dict, **fixed):
    """`cls` with each setting taken from `values` (keyed by flag dest) where it is present
    and not None, else its declared default; nested config classes likewise. `fixed` sets
    fields of `cls` itself."""
    hints = typing.get_type_hints(cls)
    kwargs = dict(fixed)
    for f in fields(cls):
        if f.name in kwargs:
            continue
        kind = _value_type(hints[f.name])
        if is_dataclass(kind) and not is_setting(f):
            kwargs[f.name] = build(kind, values)
        elif is_setting(f) and values.get(dest_of(f)) is not None:
            kwargs[f.name] = values[dest_of(f)]
    return cls(**kwargs)


def values_of(config) -> dict:
    """A built config's settings keyed by flag dest (nested configs flattened): `build`'s inverse."""
    values = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            values.update(values_of(value))
        elif is_setting(f):
            values[dest_of(f)] = value
    return values


def check_settings(config, error: type[Exception] = ValueError) -> None:
    """Run every setting's declared check on a built config (nested ones included)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            check_settings(value, error)
        elif is_setting(f):
            _check(f, value, error)


def check_values(cls, values: dict, error: type[Exception] = ValueError) -> None:
    """Run the declared checks of `cls`'s settings on `values` (keyed by flag dest), e.g. on the
    flags a user gave before other settings are derived from them: an error then names what the
    user wrote, not a value derived from it."""
    for f, _ in setting_fields(cls):
        _check(f, values.get(dest_of(f)), error)


def _check(f, value, error: type[Exception]) -> None:
    if f.metadata["check"] is not None and value is not None:
        reason = f.metadata["check"](value)
        if reason:
            raise error(f"{flag_of(f)} {reason}, got {value}")


def to_dict(value):
    """A dataclass (nested) as plain JSON-friendly values."""
    if is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: to_dict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_dict(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
