"""Flags and environment variables derived from typed, frozen config dataclasses.

A config dataclass (mesh.config) declares each setting once, with `setting(default, help)`.
From it, every command gets one flag per field, `--field-name`, whose default comes from
the environment as `EDGEMESH_FIELD_NAME`: flag > environment > default. A field whose
default is another config dataclass (`nested(Timeouts)`) contributes that dataclass's flags
too, in a help group of their own, so a command that uses Timeouts has all of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mesh.errors import ConfigError

ENV_PREFIX = "EDGEMESH_"


def setting(default: Any, help: str, *, flag: str | None = None, secret: bool = False,
            choices: Sequence[str] = (), environment: bool = True) -> Any:
    """A config field with its help text. `secret` fields are never shown in logs or help;
    `choices` are the only values the flag takes; `environment=False`: the flag only, never
    EDGEMESH_<FIELD> (a launcher's own key must not be the one exported for real nodes)."""
    return field(default=default, metadata={"help": help, "flag": flag, "secret": secret,
                                            "choices": tuple(choices), "environment": environment})


def same_as(cls: type[Any], name: str) -> Any:
    """A field declared exactly as `cls.name` is (default and help): a launcher's setting
    that means what the node's or the gateway's does, written once."""
    original = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field(default=original.default, metadata=original.metadata)


def nested(cls: type[Any], title: str) -> Any:
    """A field holding a whole config dataclass, whose flags join the command's."""
    return field(default_factory=cls, metadata={"nested": title})


def flag_of(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def variable_of(f: dataclasses.Field[Any]) -> str:
    return ENV_PREFIX + f.name.upper()


def _nested_class(f: dataclasses.Field[Any]) -> type[Any] | None:
    return f.default_factory if f.metadata.get("nested") else None  # type: ignore[return-value]


def _positive(cls: type[Any]) -> bool:
    return bool(getattr(cls, "every_value_positive", False))


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type[Any], *, skip: tuple[str, ...] = (),
                  only: tuple[str, ...] = ()) -> None:
    """Add one flag per field of a config dataclass (and of the dataclasses it nests); env
    EDGEMESH_<FIELD> sets the default."""
    for f in dataclasses.fields(cls):
        if f.name in skip or (only and f.name not in only):
            continue
        inner = _nested_class(f)
        if inner is not None:
            add_arguments(parser.add_argument_group(f.metadata["nested"]), inner)
            continue
        _add_argument(parser, f, positive=_positive(cls))


def _add_argument(parser: Any, f: dataclasses.Field[Any], *, positive: bool) -> None:
    flag, variable = flag_of(f), variable_of(f)
    env = os.environ.get(variable) if f.metadata.get("environment", True) else None
    help_text = f.metadata.get("help", "")
    default: Any = f.default
    value = default if env is None else _from_environment(variable, env, default, flag, positive)
    if isinstance(default, bool):
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=value,
                            help=help_text)
    elif isinstance(default, tuple):
        parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_text)
        parser.set_defaults(**{f"_default_{f.name}": value})
    else:
        shown = "(hidden)" if f.metadata.get("secret") else repr(default)
        parser.add_argument(flag, dest=f.name, type=_flag_type(type(default), positive), default=value,
                            choices=f.metadata.get("choices") or None, help=f"{help_text} [default: {shown}]")


def _flag_type(kind: type[Any], positive: bool) -> Callable[[str], Any]:
    if not positive:
        return kind

    def read(text: str) -> Any:
        value = _number(kind, text)
        if value is None or not _is_positive(value):
            raise argparse.ArgumentTypeError(f"must be a positive {_expected(kind)}, not {text!r}")
        return value

    read.__name__ = kind.__name__  # argparse names the type in its own messages
    return read


@dataclass(frozen=True)
class _BadEnvironment:
    """An EDGEMESH_<FIELD> value that is not of its setting's type. It stands as the flag's
    default, so that only a command that uses the setting fails (a bad EDGEMESH_SLOTS does
    not break `edgemesh status`), and an explicit flag still wins over it."""

    variable: str
    value: str
    expected: str
    flag: str

    def error(self) -> ConfigError:
        return ConfigError(f"{self.variable}={self.value!r} is not {self.expected} (it sets {self.flag}; "
                           f"fix or unset it)")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _expected(kind: type[Any]) -> str:
    return "whole number" if kind is int else "number"


def _number(kind: type[Any], text: str) -> int | float | None:
    try:
        return int(text) if kind is int else float(text)
    except ValueError:
        return None


def _is_positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)


def _from_environment(variable: str, raw: str, default: Any, flag: str, positive: bool = False) -> Any:
    """An environment value read as the type of its setting's default, or _BadEnvironment."""
    text = raw.strip()
    if isinstance(default, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        return _BadEnvironment(variable, raw, "a boolean (1, true, yes, on or 0, false, no, off)", flag)
    if isinstance(default, tuple):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if isinstance(default, (int, float)):
        kind = type(default)
        value = _number(kind, text)
        if value is None:
            return _BadEnvironment(variable, raw, f"a {_expected(kind)}", flag)
        if positive and not _is_positive(value):
            return _BadEnvironment(variable, raw, f"a positive {_expected(kind)}", flag)
        return value
    return raw


T = TypeVar("T")


def from_arguments(cls: type[T], args: argparse.Namespace) -> T:
    """The config dataclass from parsed flags; an unreadable environment value that no flag
    overrode is a ConfigError naming the variable and the type it needs."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        inner = _nested_class(f)
        if inner is not None:
            values[f.name] = from_arguments(inner, args)
            continue
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if isinstance(f.default, tuple):
            value = tuple(value) if value is not None else getattr(args, f"_default_{f.name}", ())
        if isinstance(value, _BadEnvironment):
            raise value.error()
        values[f.name] = value
    return cls(**values)


def from_environment(cls: type[T]) -> T:
    """The config dataclass with only the environment's EDGEMESH_<FIELD> values over its
    defaults (no flags), each checked as from_arguments checks it."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, cls)
    return from_arguments(cls, parser.parse_args([]))


def env_names(cls: type[Any]) -> frozenset[str]:
    """The EDGEMESH_<FIELD> variables of a config class's own fields."""
    return frozenset(variable_of(f) for f in dataclasses.fields(cls))


def as_flags(config: Any) -> list[str]:
    """The flags that make a child process's config equal `config`, for the fields that
    differ from their defaults (nested dataclasses included): what a launcher passes on to
    the processes it starts."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if _nested_class(f) is not None:
            argv += as_flags(value)
            continue
        if value == f.default:
            continue
        if f.metadata.get("secret"):
            raise ConfigError(f"{f.name} is secret: pass it by environment, not on a command line")
        flag = flag_of(f)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [arg for item in value for arg in (flag, str(item))]
        else:
            argv += [flag, str(value)]
    return argv


def shared(source: Any, target: type[Any]) -> dict[str, Any]:
    """The values of `source`'s fields that `target` has too (same name): how a launcher's
    config hands its gateway's or nodes' settings on without listing them again."""
    names = {f.name for f in dataclasses.fields(target)}
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(source) if f.name in names}
