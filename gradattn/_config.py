"""The fields of the library's configs: each a dataclass field carrying its command-line help and
bounds (:func:`option`), checked in the library (:func:`check_fields`) and made a flag by
:mod:`gradattn.cli` (:func:`field_kind`, :func:`check_field`)."""

from __future__ import annotations

import dataclasses
import types
import typing

import numpy as np

from gradattn._checks import check_float32, check_int, check_number

BOUND_KEYS = ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")


_T = typing.TypeVar("_T")


# Typed as dataclasses.field is: to a type checker the call is the field's default value, so that
# `steps: int = option(1000, help=...)` checks 1000 against int (at run time it is a dataclasses.Field).
@typing.overload
def option(default: _T, *, help: str, **bounds: typing.Any) -> _T: ...


@typing.overload
def option(*, help: str, default_factory: typing.Callable[[], _T], **bounds: typing.Any) -> _T: ...


@typing.overload
def option(*, help: str, **bounds: typing.Any) -> typing.Any: ...


def option(default=dataclasses.MISSING, *, help: str, default_factory=dataclasses.MISSING, **bounds) -> typing.Any:
    """A dataclass field carrying its command-line ``help`` and its bounds (``minimum``,
    ``maximum``, ``exclusive_minimum``, ``exclusive_maximum``; ``choices`` for a string; ``flag`` and
    ``const`` for a switch that sets the field to ``const``) in its metadata. :func:`check_fields`
    enforces them in the library and :mod:`gradattn.cli` makes a flag of each."""
    unknown = set(bounds) - {*BOUND_KEYS, "choices", "flag", "const"}
    if unknown:
        raise TypeError(f"option: unknown metadata {sorted(unknown)}")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"help": help, **bounds})


def field_kind(cls, name: str) -> tuple[type, bool]:
    """The base type (int, float, bool, str or another class) of field ``name`` of dataclass
    ``cls``, and whether ``None`` is allowed (an ``X | None`` annotation)."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    if args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else object), type(None) in args
    return hint, False


def check_field(cls, name: str, val, fn: str):
    """``val`` checked against the type and the bounds declared for field ``name`` of ``cls``
    (see :func:`option`), and normalised: sizes to ``int``, rates to ``float``."""
    meta = next(f for f in dataclasses.fields(cls) if f.name == name).metadata
    kind, optional = field_kind(cls, name)
    bounds = {k: meta[k] for k in BOUND_KEYS if k in meta}
    if val is None and optional:
        return None
    if kind is bool:
        if not isinstance(val, (bool, np.bool_)):
            raise TypeError(f"{fn}: {name} must be a bool, got {val!r}")
        return bool(val)
    if kind is int:
        return check_int(name, val, fn, minimum=bounds.get("minimum"), maximum=bounds.get("maximum"))
    if kind is float:
        val = check_number(name, val, fn, **bounds)
        check_float32(fn, {name: val})  # runs compute in float32: a larger value would be inf there
        return val
    if kind is str:
        if not isinstance(val, str):
            raise TypeError(f"{fn}: {name} must be a string, got {val!r}")
        if "choices" in meta and val not in meta["choices"]:
            raise ValueError(f"{fn}: {name} must be one of {tuple(meta['choices'])}, got {val!r}")
        return val
    return val


def check_fields(obj, fn: str, *, store: bool = True) -> None:
    """Every field of the dataclass ``obj`` declared with :func:`option`, checked by
    :func:`check_field`; with ``store`` (a frozen config's ``__post_init__``) the normalised values
    are written back."""
    for f in dataclasses.fields(obj):
        if "help" not in f.metadata:
            continue
        val = check_field(type(obj), f.name, getattr(obj, f.name), fn)
        if store:
            object.__setattr__(obj, f.name, val)


def check_unused_option(fn: str, config, name: str, *, active: bool, needs: str) -> None:
    """A dataclass field ``name`` of ``config`` set away from its default while the option it belongs
    to (``needs``) is off would be silently ignored: a ValueError instead."""
    default = {f.name: f.default for f in dataclasses.fields(config)}[name]
    val = getattr(config, name)
    if not active and val != default:
        raise ValueError(f"{fn}: {name}={val!r} has no effect without {needs}; give {needs} or leave {name} at its default {default!r}")
