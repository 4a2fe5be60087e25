"""How a config section is read: a dataclass whose fields declare their type and, where a
value could crash or hang a run later, the range they take.

Each component keeps its section beside its code (`vilbert/data/config.py`,
`vilbert/model_factory.py`, `vilbert/train/optim.py`, ...); `vilbert.train.config` composes
them into the one YAML file. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A config value or file that cannot work; one line naming the key and what it takes."""


def checked(default, test, takes: str, **kwargs):
    """A dataclass field whose values must pass `test` (`takes` says what passes, for the error)."""
    return field(default=default, metadata={"check": (test, takes)}, **kwargs)


def positive(default):
    return checked(default, lambda v: v > 0, "> 0")


def non_negative(default):
    return checked(default, lambda v: v >= 0, ">= 0")


def unit(default):
    return checked(default, lambda v: 0 <= v <= 1, "in [0, 1]")


def _typed(key: str, value, hint):
    """`value` as the field's type (`hint`), or ConfigError naming the key and the type."""
    def fail(expected: str):
        raise ConfigError(f"{key}={value!r} is not {expected}")

    if hint is Any:
        return value
    if typing.get_origin(hint) in (types.UnionType, typing.Union):  # `str | None`: None or the other type
        inner = [h for h in typing.get_args(hint) if h is not type(None)]
        return None if value is None else _typed(key, value, inner[0])
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail(f"a list of {len(args)} numbers")
        return tuple(_typed(f"{key}[{i}]", v, h) for i, (v, h) in enumerate(zip(value, args)))
    if typing.get_origin(hint) is dict:
        return value if isinstance(value, dict) else fail("a mapping (key: value lines)")
    if hint is bool:
        return value if isinstance(value, bool) else fail("true or false")
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail("an integer")
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                fail("a number")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fail("a number")
    if hint is str:
        return value if isinstance(value, str) else fail("a string")
    return value


def build_section(cls, values: dict, where: str):
    """`cls` (a config dataclass) from YAML values. Unknown keys, values of the wrong type
    and values outside their field's declared range are a ConfigError naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'} must be a mapping (key: value lines), "
                          f"not {values!r:.60}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                          f"{where or 'top level'} takes {sorted(known)}")
    hints, defaults, kwargs = typing.get_type_hints(cls), cls(), {}
    for name, value in values.items():
        key, default = f"{where}{name}", getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_section(type(default), {} if value is None else value, f"{key}.")
            continue
        kwargs[name] = _typed(key, value, hints[name])
        test, takes = known[name].metadata.get("check", (lambda v: True, ""))
        if kwargs[name] is not None and not test(kwargs[name]):
            raise ConfigError(f"{key}={value!r} must be {takes}")
    return cls(**kwargs)
