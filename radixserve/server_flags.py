"""How a server flag is declared once: its default, help, argparse group, allowed values and bounds.
ServerArgs derives its command-line parser and its per-flag checks from these declarations."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any


class ServerArgsError(ValueError):
    """A flag has a bad value. The message names the flag and what is allowed."""


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class Flag:
    help: str
    group: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    below: float | None = None  # exclusive upper bound
    unit: str = ""  # in messages: "must be > 0 seconds"
    aliases: tuple[str, ...] = ()  # other spellings, as SGLang accepts them


def flag(default: Any, help: str, group: str, **spec: Any) -> Any:
    """A ServerArgs field with its flag's declaration."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help, group, **spec)})


def declared(cls: type) -> list[tuple[dataclasses.Field, Flag]]:
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls) if "flag" in f.metadata]


def value_type(f: dataclasses.Field) -> type:
    """bool, int, float or str, from the field's annotation ("int | None" is int)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if name in text.replace(" ", "").split("|"):
            return kind
    return str


def check(f: dataclasses.Field, spec: Flag, value: Any) -> None:
    """The flag's own checks: type, allowed values, bounds. None (auto) always passes."""
    if value is None:
        return
    name, kind = flag_name(f.name), value_type(f)
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(map(str, spec.choices))
        raise ServerArgsError(f"{name}: invalid value {value!r}; allowed: {allowed}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ServerArgsError(f"{name}: must be an integer; got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ServerArgsError(f"{name}: must be a number{spec.unit and ' of ' + spec.unit.strip()}; got {value!r}")
    unit = f" {spec.unit}" if spec.unit else ""
    if spec.above is not None and spec.below is not None and not spec.above < value < spec.below:
        raise ServerArgsError(f"{name}: must be in ({spec.above:g}, {spec.below:g}); got {value}")
    if spec.above is not None and not value > spec.above:
        raise ServerArgsError(f"{name}: must be > {spec.above:g}{unit}; got {value!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise ServerArgsError(f"{name}: must be >= {spec.minimum:g}{unit}; got {value}")
    if spec.maximum is not None and value > spec.maximum:
        raise ServerArgsError(f"{name}: must be <= {spec.maximum:g}{unit}; got {value}")


def add_arguments(cls: type, parser: argparse.ArgumentParser) -> None:
    """One argparse group per declared group, in declaration order."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, spec in declared(cls):
        group = groups.get(spec.group) or groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        kind = value_type(f)
        if kind is bool:
            group.add_argument(flag_name(f.name), *spec.aliases, action="store_true", help=spec.help)
            continue
        kw: dict[str, Any] = {"default": f.default, "help": spec.help}
        if kind is not str:
            kw["type"] = kind
        if spec.choices is not None:
            kw["choices"] = spec.choices
        group.add_argument(flag_name(f.name), *spec.aliases, **kw)
