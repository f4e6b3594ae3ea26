"""Input validation shared by the public functions.

Shapes and dtypes are checked at trace time, so the checks cost nothing under ``jit``. Values
(label range, sign of weights, finiteness) are checked only when the array is concrete, i.e. when
a function is called eagerly; under ``jit``/``vmap`` they cannot be inspected without a host sync.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np


def is_traced(x) -> bool:
    """Whether ``x`` is a tracer: an abstract value inside ``jit``, ``vmap``, ``grad`` or another
    transformation, whose shape and dtype are known but whose value must not be read.

    The one place the library asks this. It is the check JAX documents: its docs name
    ``jax.core.Tracer`` as the class of traced values, and that class stays among the few public
    names of ``jax.core`` as the internals leave that namespace (``jax.core.is_concrete`` and
    ``jax.core.concrete_or_error`` were not kept there, so they are not used).
    """
    return isinstance(x, jax.core.Tracer)


def concrete(a) -> np.ndarray | None:
    """The value of ``a`` as a numpy array, or ``None`` when ``a`` is a tracer."""
    if is_traced(a):
        return None
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def check_array(name: str, a, fn: str) -> None:
    """``a`` must be an array: numpy or jax (tracers included), or an object JAX converts itself
    (one with ``__jax_array__``, such as an ``nnx.Param``).

    A (nested) Python list or a scalar is refused here, naming ``fn`` and ``name``: JAX refuses
    lists as array arguments too, but deep inside with an error that names neither.

    Raises:
      TypeError: naming ``fn``, ``name`` and the type given.
    """
    if not isinstance(a, (np.ndarray, jax.Array)) and not hasattr(a, "__jax_array__"):
        raise TypeError(f"{fn}: {name} must be an array (numpy or jax), got {type(a).__name__}; convert it with jnp.asarray first")


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
        check_array(f"params.{name}", a, fn)
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
    check_array("x", x, fn)
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
    check_array("y", y, fn)
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


def check_divides_steps(name: str, value: int, steps: int, fn: str) -> None:
    """``value``, a positive int (a checkpoint interval or count), must divide ``steps``.

    Raises:
      ValueError: ``"{fn}: {name}={value} must divide steps={steps}"``.
    """
    if steps % value:
        raise ValueError(f"{fn}: {name}={value} must divide steps={steps}")


def check_int32_range(name: str, a, fn: str) -> None:
    """``a``, a concrete numpy 64-bit integer array, must fit 32 bits where JAX runs with x64 off.

    With x64 off (JAX's default) a numpy int64 (uint64) argument becomes int32 (uint32) where it
    enters ``jit`` or ``vmap``, keeping the low 32 bits without a warning: a label 2^32 + 1 arrives
    as 1, a valid label, and nothing inside compiled code can tell. A function that compiles what it
    is given calls this on its integer arguments before they cross that boundary; a function called
    under the caller's own ``jit`` or ``vmap`` gets them already converted and cannot.

    Raises:
      ValueError: naming ``fn``, ``name``, the dtype, the extreme values and the 32-bit range.
    """
    if jax.config.jax_enable_x64 or not isinstance(a, np.ndarray):  # type: ignore[attr-defined]
        return
    if a.dtype not in (np.dtype(np.int64), np.dtype(np.uint64)) or a.size == 0:
        return
    info = np.iinfo(np.int32 if a.dtype == np.int64 else np.uint32)
    lo, hi = a.min(), a.max()
    if lo < info.min or hi > info.max:
        raise ValueError(
            f"{fn}: {name} (shape {_shape(a)}, {a.dtype}) holds values in [{lo}, {hi}], beyond {info.dtype}'s "
            f"[{info.min}, {info.max}]: with x64 off JAX keeps only their low 32 bits inside jit"
        )


def check_weights(weights, n: int, fn: str) -> None:
    if weights is None:
        return
    check_array("weights", weights, fn)
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
    check_array(name, a, fn)
    if np.ndim(a) != len(shape) or any(s is not None and s != t for s, t in zip(shape, _shape(a))):
        want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {_shape(a)}")
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise TypeError(f"{fn}: {name} must be floating point, got dtype {jnp.result_type(a)}")


# ---------------------------------------------------------------------------------------------
# Configuration fields: bounds declared once, next to the field, for the library and the CLI
# ---------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Text to numbers (the command line), bounds shared by the command line and the library
# --------------------------------------------------------------------------------------------

MAX_SEED = 2**64 - 1
"""Seeds are integers in [0, 2^64): each gives its own key (:func:`gradattn.sweeps.seed_key`)."""

MAX_HEAD_SIZE = 4096
"""Largest head size (d_in, d_k, d_v, C) that :func:`gradattn.head.init_head` and the command take."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest finite float32 (about 3.4e38): runs compute in float32, where anything larger is inf."""
FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)
"""Smallest non-zero float32 (about 1.4e-45): a non-zero number below half of it is 0 in float32."""


def float32_underflows(val: float) -> bool:
    """Whether ``val`` is non-zero but rounds to 0 in float32 (``|val|`` below about 7e-46)."""
    return val != 0.0 and float(np.float32(val)) == 0.0


def check_float32(fn: str, values: dict) -> None:
    """Every value of ``values`` (name -> already finite number) must be finite in float32 too, and
    non-zero there unless it is 0.

    Rates, and products of rates that a run forms (``lr * value_lr_multiplier``), are cast to
    float32; one beyond ``FLOAT32_MAX`` would become inf and every loss NaN, and a non-zero one below
    about 7e-46 would become 0 (a rate of 1e-50 is a run that never moves).

    Raises:
      ValueError: naming ``fn``, the first such value, and the bound.
    """
    for name, val in values.items():
        if abs(float(val)) > FLOAT32_MAX:
            raise ValueError(
                f"{fn}: {name} = {float(val):.4g} is beyond float32's finite range (|x| <= {FLOAT32_MAX:.4g}); "
                "the run computes in float32, where it would be inf"
            )
        if float32_underflows(float(val)):
            raise ValueError(
                f"{fn}: {name} = {float(val):.4g} is not 0 but rounds to 0 in float32 (non-zero values need "
                f"|x| >= {FLOAT32_TINY:.2g}); the run computes in float32, where it would be 0"
            )


def check_in_dtype(name: str, val: float, dtype, fn: str) -> None:
    """The finite non-zero number ``val`` must stay finite and non-zero in the floating ``dtype``
    that it is used in (float32: ``|x| <= FLOAT32_MAX`` and not below about 7e-46). ``dtype`` is
    taken as JAX uses it: float64 is float32 while x64 is off.

    Raises:
      ValueError: naming ``fn``, ``name``, the value and the dtype's range.
    """
    info = jnp.finfo(jax.dtypes.canonicalize_dtype(dtype))
    with np.errstate(over="ignore", under="ignore"):
        cast = float(np.asarray(val, np.float64).astype(info.dtype))
    if not math.isfinite(cast):
        raise ValueError(
            f"{fn}: {name} = {val:.4g} is beyond {info.dtype}'s finite range (|x| <= {float(info.max):.4g}); "
            f"it would be inf in {info.dtype}"
        )
    if val != 0.0 and cast == 0.0:
        raise ValueError(
            f"{fn}: {name} = {val:.4g} is not 0 but rounds to 0 in {info.dtype} (non-zero values need "
            f"|x| >= {float(info.smallest_subnormal):.2g})"
        )


def check_bool(name: str, val, fn: str) -> bool:
    """``val`` as a Python bool; anything but ``True``/``False`` (numpy bools included) is a TypeError.

    A flag such as ``causal`` must not take a truthy string: ``causal="no"`` would mean causal.
    """
    if not isinstance(val, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool (True or False), got {val!r} of type {type(val).__name__}")
    return bool(val)


@functools.cache
def _raw_key_shape(impl: str) -> tuple:
    """The shape of a raw key (``jax.random.PRNGKey(0)``) under the PRNG implementation ``impl``."""
    del impl  # the cache key: the shape is that of the implementation in force
    return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def check_prng_key(name: str, key, fn: str) -> None:
    """``key`` must be one PRNG key: a typed key of shape () (``jax.random.key(0)``), or a raw uint32
    key of the default implementation's shape (``jax.random.PRNGKey(0)``: (2,) with threefry).
    Tracers pass too (their shape and dtype are checked).

    Raises:
      TypeError: an int (a seed is not a key), a key array of several keys, raw uint32 data of
        another shape, or anything else.
    """
    dtype = getattr(key, "dtype", None)
    if dtype is not None and isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            if np.ndim(key) == 0:
                return
            raise TypeError(f"{fn}: {name} must be one PRNG key (shape ()), got a key array of shape {_shape(key)}")
        if dtype == np.uint32 and np.ndim(key) == 1:
            want = _raw_key_shape(str(jax.config.jax_default_prng_impl))  # type: ignore[attr-defined]
            if _shape(key) == want:
                return
            raise TypeError(
                f"{fn}: {name} as raw uint32 key data must have shape {want} (jax.random.PRNGKey(seed)), "
                f"got shape {_shape(key)}; use jax.random.key(seed)"
            )
    seed_hint = " (a seed is not a key: use jax.random.key(seed))" if isinstance(key, (int, np.integer)) else ""
    raise TypeError(f"{fn}: {name} must be a PRNG key such as jax.random.key(0), got {key!r} of type {type(key).__name__}{seed_hint}")


