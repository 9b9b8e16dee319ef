"""Strategy options: the attrs fields of a strategy class, set with ``-o key=value`` or keywords.

Strategy authors declare options as attrs fields and may use the validators here so that errors
name the valid range. Every value the user gives is either applied or rejected: unknown keys are an
error, never silently dropped.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Mapping

import attrs

from .errors import MoedecError


class OptionError(ValueError):
    """Raised by option validators; ``option`` names the offending field."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def in_range(lo: float | None = None, hi: float | None = None):
    """attrs validator: ``lo <= value <= hi`` (either bound may be ``None``)."""

    def check(inst, attribute, value):
        if value is None:
            return
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise OptionError(attribute.name, f"must be in {describe_range(lo, hi)}")

    check.moedec_range = (lo, hi)  # shown by `moedec strategies`
    return check


def describe_range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"[{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}"


def option_fields(cls: type) -> tuple[attrs.Attribute, ...]:
    """The public options of a strategy class (attrs fields not starting with ``_``)."""
    if not attrs.has(cls):
        return ()
    return tuple(f for f in attrs.fields(cls) if f.init and not f.name.startswith("_"))


def _resolve_type(cls: type, field: attrs.Attribute):
    hints = {}
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: fall back to the raw ones
        pass
    return hints.get(field.name, field.type)


def describe_option(cls: type, field: attrs.Attribute) -> str:
    """``name: type = default [range]`` for listings."""
    tname = _type_name(_resolve_type(cls, field))
    default = field.default
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    text = f"{field.name}: {tname} = {default!r}"
    for v in _validators(field):
        rng = getattr(v, "moedec_range", None)
        if rng:
            text += f" {describe_range(*rng)}"
    return text


def _type_name(typ) -> str:
    """``int``, ``str | None``, ... for listings."""
    args = typing.get_args(typ)
    if args and (typing.get_origin(typ) is typing.Union or str(typing.get_origin(typ)) == "types.UnionType"):
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    return getattr(typ, "__name__", None) or str(typ).replace("typing.", "")


def _validators(field: attrs.Attribute):
    v = field.validator
    if v is None:
        return []
    inner = getattr(v, "_validators", None)  # attrs' and_()
    return list(inner) if inner else [v]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(value: Any, typ: Any, name: str) -> Any:
    """Convert a CLI string to the field's type; non-strings pass through untouched."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in {"none", "null"} and len(args) < len(typing.get_args(typ)):
            return None
        for a in args:
            if a is str:
                continue
            try:
                return _convert(value, a, name)
            except ValueError:
                pass
        return value
    if typ is bool:
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected a boolean (true/false), got {value!r}")
    if typ is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if typ is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if typ is Path:
        return Path(value)
    return value


def parse_cli_options(pairs: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a pair without ``=`` is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MoedecError(f"bad option {pair!r}: expected key=value")
        out[key.strip()] = value
    return out


def build_strategy(cls: type, options: Mapping[str, Any]):
    """Instantiate a strategy class with validated options; errors are one-line MoedecErrors."""
    name = getattr(cls, "name", cls.__name__)
    fields = {f.name: f for f in option_fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "none"
        raise MoedecError(
            f"strategy {name!r} has no option {unknown[0]!r} (its options: {valid})"
        )
    kwargs = {}
    for key, value in options.items():
        try:
            kwargs[key] = _convert(value, _resolve_type(cls, fields[key]), key)
        except ValueError as e:
            raise MoedecError(f"strategy {name!r}: bad option {key}={value!r}: {e}") from None
    try:
        return cls(**kwargs)
    except OptionError as e:
        raise MoedecError(
            f"strategy {name!r}: bad option {e.option}={options.get(e.option)!r}: {e}"
        ) from None
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        bad = next((k for k in kwargs if k in msg), None)
        where = f"bad option {bad}={options[bad]!r}: " if bad else "bad options: "
        raise MoedecError(f"strategy {name!r}: {where}{msg}") from None
