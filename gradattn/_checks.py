"""Input validation shared by the public functions.

Shapes and dtypes are checked at trace time, so the checks cost nothing under ``jit``. Values
(label range, sign of weights, finiteness) are checked only when the array is concrete, i.e. when
a function is called eagerly; under ``jit``/``vmap`` they cannot be inspected without a host sync.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np


def concrete(a) -> np.ndarray | None:
    """The value of ``a`` as a numpy array, or ``None`` when ``a`` is a tracer."""
    if isinstance(a, jax.core.Tracer):
        return None
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def _range_text(minimum, maximum, exclusive_minimum=False, exclusive_maximum=False) -> str:
    lo = "(" if exclusive_minimum else "["
    hi = ")" if exclusive_maximum else "]"
    lo_v = "-inf" if minimum is None else repr(minimum)
    hi_v = "inf" if maximum is None else repr(maximum)
    if maximum is None:
        hi = ")"
    if minimum is None:
        lo = "("
    return f"{lo}{lo_v}, {hi_v}{hi}"


def check_int(name: str, val, fn: str, *, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``val`` as a Python ``int`` in ``[minimum, maximum]`` (``None``: unbounded on that side).

    Any integral type is accepted through ``operator.index`` (Python ints, numpy integers, 0-d
    integer arrays: ``np.int64(20)`` from numpy arithmetic is a size like ``20``) and normalised to
    ``int``, so it hashes, compares and serialises as a plain int.

    Raises:
      TypeError: ``val`` is a bool, a float (even ``2.0``) or anything else not integral.
      ValueError: ``val`` is outside the range; the message names ``fn``, ``name``, the value and
        the range.
    """
    kind = "a positive integer" if (minimum == 1 and maximum is None) else "an integer"
    if isinstance(val, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be {kind}, got the bool {val!r}")
    try:
        i = operator.index(val)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be {kind}, got {val!r} of type {type(val).__name__}") from None
    if (minimum is not None and i < minimum) or (maximum is not None and i > maximum):
        where = "" if kind == "a positive integer" else f" in {_range_text(minimum, maximum)}"
        raise ValueError(f"{fn}: {name} must be {kind}{where}, got {i}")
    return int(i)


def check_number(
    name: str,
    val,
    fn: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``val`` as a finite Python ``float`` within the given bounds.

    Accepted: Python and numpy real scalars (ints and floats, ``np.float32`` included) and 0-d real
    numpy/jax arrays. ``exclusive_minimum``/``exclusive_maximum`` make the bound strict.

    Raises:
      TypeError: a bool, a string (``"0.1"`` is not a number even though ``float()`` parses it), a
        complex number, or anything else that is not a real scalar.
      ValueError: an array that is not 0-d; NaN or infinity; a value out of range. The message
        names ``fn``, ``name``, the value and the range.
    """
    if not is_real_number(val):
        raise TypeError(f"{fn}: {name} must be a real number, got {val!r} of type {type(val).__name__}")
    if np.ndim(val) != 0:
        raise ValueError(f"{fn}: {name} must be a scalar, got shape {tuple(np.shape(val))}")
    f = float(val)
    rng = _range_text(minimum, maximum, exclusive_minimum, exclusive_maximum)
    if not math.isfinite(f):
        raise ValueError(f"{fn}: {name} must be a finite number in {rng}, got {f!r}")
    too_low = minimum is not None and (f <= minimum if exclusive_minimum else f < minimum)
    too_high = maximum is not None and (f >= maximum if exclusive_maximum else f > maximum)
    if too_low or too_high:
        raise ValueError(f"{fn}: {name} must be a number in {rng}, got {f!r}")
    return f


def is_real_number(val) -> bool:
    """True for a real number or a real array: Python/numpy ints and floats, integer or floating
    numpy/jax arrays (any shape; tracers included). False for bools, strings, complex numbers and
    anything else (a string such as ``"0.1"`` must not pass because ``float()`` happens to parse it)."""
    if isinstance(val, (bool, np.bool_)):
        return False
    if isinstance(val, (int, float, np.integer, np.floating)):
        return True
    if isinstance(val, (np.ndarray, jax.Array)):
        return bool(jnp.issubdtype(val.dtype, jnp.integer) or jnp.issubdtype(val.dtype, jnp.floating))
    return False


def check_params(params, fn: str) -> tuple[int, int, int, int]:
    """Validate a ``HeadParams``; returns ``(d_in, d_k, d_v, n_classes)``."""
    names = ("w_q", "w_k", "w_v", "w_o")
    for name in names:
        if not hasattr(params, name):
            raise TypeError(f"{fn}: params must be a HeadParams with fields {names}, got {type(params).__name__}")
        a = getattr(params, name)
        if np.ndim(a) != 2:
            raise ValueError(f"{fn}: params.{name} must be 2-D, got shape {_shape(a)}")
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise TypeError(f"{fn}: params.{name} must be floating point, got dtype {jnp.result_type(a)}")
    d_in, d_k = _shape(params.w_q)
    if _shape(params.w_k) != (d_in, d_k):
        raise ValueError(
            f"{fn}: params.w_k has shape {_shape(params.w_k)} but params.w_q has shape {(d_in, d_k)}; they must match"
        )
    if _shape(params.w_v)[0] != d_in:
        raise ValueError(
            f"{fn}: params.w_v has shape {_shape(params.w_v)}; its first dimension must be d_in = {d_in} (from params.w_q)"
        )
    d_v = _shape(params.w_v)[1]
    if _shape(params.w_o)[0] != d_v:
        raise ValueError(
            f"{fn}: params.w_o has shape {_shape(params.w_o)}; its first dimension must be d_v = {d_v} (from params.w_v)"
        )
    return d_in, d_k, d_v, _shape(params.w_o)[1]


def check_x(x, d_in: int, fn: str) -> int:
    """Validate one sequence ``x (N, d_in)``; returns N."""
    if np.ndim(x) != 2:
        raise ValueError(
            f"{fn}: x must be 2-D (N, d_in) for one sequence, got shape {_shape(x)}; use jax.vmap for batches"
        )
    n, d = _shape(x)
    if d != d_in:
        raise ValueError(f"{fn}: x has shape {_shape(x)} but the head expects d_in = {d_in} (params.w_q is ({d_in}, ...))")
    if n < 1:
        raise ValueError(f"{fn}: x must have at least one position, got shape {_shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{fn}: x must be floating point, got dtype {jnp.result_type(x)}")
    xc = concrete(x)
    if xc is not None and not np.isfinite(xc).all():
        raise ValueError(f"{fn}: x (shape {_shape(x)}) contains non-finite values")
    return n


def check_labels(y, n: int, n_classes: int, fn: str) -> None:
    if np.ndim(y) != 1 or _shape(y)[0] != n:
        raise ValueError(f"{fn}: y must have shape ({n},) to match x with N = {n} positions, got shape {_shape(y)}")
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
        raise TypeError(f"{fn}: y must hold integer class labels, got dtype {jnp.result_type(y)}")
    yc = concrete(y)
    if yc is not None and yc.size and (yc.min() < 0 or yc.max() >= n_classes):
        raise ValueError(
            f"{fn}: y (shape {_shape(y)}) has labels in [{yc.min()}, {yc.max()}], outside [0, {n_classes}) "
            f"(params.w_o has {n_classes} columns)"
        )


def check_weights(weights, n: int, fn: str) -> None:
    if weights is None:
        return
    if np.ndim(weights) != 1 or _shape(weights)[0] != n:
        raise ValueError(f"{fn}: weights must have shape ({n},) to match x with N = {n} positions, got shape {_shape(weights)}")
    if not (jnp.issubdtype(jnp.result_type(weights), jnp.floating) or jnp.issubdtype(jnp.result_type(weights), jnp.integer)):
        raise TypeError(f"{fn}: weights must be numeric, got dtype {jnp.result_type(weights)}")
    wc = concrete(weights)
    if wc is not None:
        if not np.isfinite(wc).all():
            raise ValueError(f"{fn}: weights (shape {_shape(weights)}) contain non-finite values")
        if (wc < 0).any():
            raise ValueError(f"{fn}: weights (shape {_shape(weights)}) must be non-negative, min is {wc.min()}")
        if wc.sum() <= 0:
            raise ValueError(f"{fn}: weights (shape {_shape(weights)}) sum to zero; at least one position must count")


def check_head_inputs(params, x, y=None, weights=None, *, fn: str) -> tuple[int, int, int, int, int]:
    """Validate everything a head function takes; returns ``(N, d_in, d_k, d_v, n_classes)``."""
    d_in, d_k, d_v, n_classes = check_params(params, fn)
    n = check_x(x, d_in, fn)
    dtypes = {name: jnp.result_type(getattr(params, name)) for name in ("w_q", "w_k", "w_v", "w_o")}
    dtypes["x"] = jnp.result_type(x)
    if len(set(dtypes.values())) > 1:
        # Mixed precisions would make JAX cast float64 updates into float32 accumulators (and back):
        # gradients of mixed dtypes whose accuracy is that of the lowest precision.
        listed = ", ".join(f"{k} {v}" for k, v in dtypes.items())
        raise TypeError(f"{fn}: params and x must share one floating dtype, got {listed}; cast them first")
    if y is not None:
        check_labels(y, n, n_classes, fn)
    check_weights(weights, n, fn)
    return n, d_in, d_k, d_v, n_classes


def check_matrix(name: str, a, shape: tuple, fn: str) -> None:
    """``a`` must be a floating array of ``shape`` (entries of ``None`` match any size)."""
    if np.ndim(a) != len(shape) or any(s is not None and s != t for s, t in zip(shape, _shape(a))):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {_shape(a)}")
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise TypeError(f"{fn}: {name} must be floating point, got dtype {jnp.result_type(a)}")


# ---------------------------------------------------------------------------------------------
# Configuration fields: bounds declared once, next to the field, for the library and the CLI
# ---------------------------------------------------------------------------------------------

BOUND_KEYS = ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")


def option(default=dataclasses.MISSING, *, help: str, default_factory=dataclasses.MISSING, **bounds) -> dataclasses.Field:
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
        return check_number(name, val, fn, **bounds)
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
