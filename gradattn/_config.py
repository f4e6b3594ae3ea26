"""The fields of the library's configs: each a dataclass field carrying its command-line help and
bounds (:func:`option`), checked in the library (:func:`check_fields`) and made a flag by
:mod:`gradattn.cli` (:func:`field_kind`, :func:`check_field`)."""

from __future__ import annotations

import dataclasses
import functools
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
    :func:`check_field`, and every :func:`nested` field of a spec of its type (which checks its
    own); with ``store`` (a frozen config's ``__post_init__``) the normalised values are written back."""
    check_nested(obj, fn)
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


# ---------------------------------------------------------------------------------------------
# Nested specs: a config field holding another dataclass of options (the head's sizes, the arms'
# rates), whose options stay flat on the command line and in JSON.
# ---------------------------------------------------------------------------------------------


def nested(spec_type: type[_T], *, prefix: str = "", help: str = "", **defaults) -> _T:
    """A config field holding a ``spec_type`` (a frozen dataclass of :func:`option` fields),
    ``spec_type(**defaults)`` by default. Its options are named ``prefix + name`` on the command
    line and in the config's JSON (:func:`flat_fields`), their help led by ``help``."""
    factory = functools.partial(spec_type, **defaults)
    return dataclasses.field(default_factory=factory,
                             metadata={"nested": spec_type, "prefix": prefix, "help_prefix": help})


class Flat(typing.NamedTuple):
    """One option of a config, reached through its nested specs."""

    name: str
    """Its flat name: the nested fields' prefixes and its own name (its flag and its JSON key)."""
    path: tuple[str, ...]
    """The attribute path from the config to it."""
    owner: type
    """The dataclass that declares it."""
    field: dataclasses.Field
    """Its declaration (help and bounds in the metadata)."""
    help_prefix: str
    """Words that lead its help (from the nested fields above it)."""


def flat_fields(cls, *, prefix: str = "", path: tuple[str, ...] = (), help_prefix: str = "") -> list[Flat]:
    """Every :func:`option` field of dataclass ``cls``, those of its :func:`nested` specs
    included (recursively), in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("nested")
        if spec is not None:
            out += flat_fields(spec, prefix=prefix + f.metadata["prefix"], path=(*path, f.name),
                               help_prefix=help_prefix + f.metadata["help_prefix"])
        elif "help" in f.metadata:
            out.append(Flat(prefix + f.name, (*path, f.name), cls, f, help_prefix))
    return out


def flat_get(obj, flat: Flat):
    """The value of option ``flat`` in config ``obj``."""
    for name in flat.path:
        obj = getattr(obj, name)
    return obj


def nest(cls, values: dict, *, base=None) -> dict:
    """Keyword arguments of ``cls`` from ``values`` keyed by flat option names (and any
    non-option field by its own name): each nested spec rebuilt from its default (or ``base``'s,
    a ``cls`` instance) with the options given for it. Unknown names are left for ``cls`` to refuse."""
    values = dict(values)
    kw = {}
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("nested")
        if spec is None:
            if f.name in values:
                kw[f.name] = values.pop(f.name)
            continue
        mine = {flat.name: flat for flat in flat_fields(cls) if flat.path[0] == f.name}
        given = {name: values.pop(name) for name in list(values) if name in mine}
        if given:
            current = getattr(base, f.name) if base is not None else typing.cast(typing.Callable, f.default_factory)()
            inner = {}
            for name, value in given.items():
                inner[".".join(mine[name].path[1:])] = value
            kw[f.name] = _replace_path(current, inner)
    kw.update(values)
    return kw


def _replace_path(obj, values: dict):
    """``obj`` with the attributes at the dotted paths of ``values`` replaced (nested dataclasses rebuilt)."""
    direct = {k: v for k, v in values.items() if "." not in k}
    deeper: dict[str, dict] = {}
    for k, v in values.items():
        if "." in k:
            head, _, rest = k.partition(".")
            deeper.setdefault(head, {})[rest] = v
    for head, inner in deeper.items():
        direct[head] = _replace_path(getattr(obj, head), inner)
    return dataclasses.replace(obj, **direct)


def check_nested(obj, fn: str) -> None:
    """Every :func:`nested` field of ``obj`` holds an instance of its spec type (TypeError naming it)."""
    for f in dataclasses.fields(obj):
        spec = f.metadata.get("nested")
        if spec is not None and not isinstance(getattr(obj, f.name), spec):
            article = "an" if spec.__name__[:1] in "AEIOU" else "a"
            raise TypeError(f"{fn}: {f.name} must be {article} {spec.__name__}, got {type(getattr(obj, f.name)).__name__}")
