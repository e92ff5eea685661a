"""Parsing ``name:key=value,...`` specifications (``--task``, ``--optimizer``).

Values are coerced to the type of the constructor's default for that key;
commas inside a value are allowed for tuple options (``hidden=20,20``): a token
without ``=`` continues the previous value.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .errors import L2OError


def split_spec(spec: str) -> tuple[str, str]:
    name, _, rest = spec.partition(":")
    return name.strip(), rest.strip()


def parse_options(text: str, what: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    last = None
    for token in filter(None, (t.strip() for t in text.split(","))):
        if "=" in token:
            key, _, value = token.partition("=")
            key = key.strip()
            if not key:
                raise L2OError(f"{what}: empty option name in {text!r}")
            opts[key] = value.strip()
            last = key
        elif last is not None:
            opts[last] += "," + token
        else:
            raise L2OError(f"{what}: expected key=value options, got {token!r}")
    return opts


def coerce(value: str, default: object, what: str) -> object:
    """Convert the string ``value`` to the type of ``default``."""
    try:
        if isinstance(default, bool):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple | list):
            for bracket in "()[]":
                value = value.replace(bracket, "")
            items = [v for v in value.split(",") if v.strip()]
            elem = default[0] if default else 0
            return tuple(coerce(v.strip(), elem, what) for v in items)
        return value
    except ValueError:
        kind = (
            "comma-separated numbers"
            if isinstance(default, tuple | list)
            else type(default).__name__
        )
        raise L2OError(f"{what}: cannot read {value!r} as {kind}") from None


def build_from_spec(spec: str, registry: dict[str, Callable], kind: str) -> object:
    """Build ``registry[name](**options)`` from ``name:key=value,...``."""
    name, rest = split_spec(spec)
    if name not in registry:
        raise L2OError(f"unknown {kind} {name!r}; expected one of {sorted(registry)}")
    factory = registry[name]
    params = inspect.signature(factory).parameters
    kwargs = {}
    for key, raw in parse_options(rest, f"{kind} {spec!r}").items():
        if key not in params or key == "self":
            valid = [p for p in params if p != "self"]
            raise L2OError(f"{kind} {name!r} has no option {key!r}; valid options: {valid}")
        default = params[key].default
        kwargs[key] = coerce(
            raw, default if default is not inspect.Parameter.empty else "", f"{kind} option {key}"
        )
    try:
        return factory(**kwargs)
    except (ValueError, TypeError) as e:
        raise L2OError(f"{kind} {spec!r}: {e}") from None
