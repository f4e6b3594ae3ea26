"""Input validation shared by the public functions.

Shapes and dtypes are checked at trace time, so the checks cost nothing under ``jit``. Values
(label range, sign of weights, finiteness) are checked only when the array is concrete, i.e. when
a function is called eagerly; under ``jit``/``vmap`` they cannot be inspected without a host sync.
"""

from __future__ import annotations

import operator

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


def check_positive_int(name: str, val, fn: str) -> int:
    """``val`` as a Python ``int`` >= 1, from any integral type (``operator.index``).

    Python, numpy and 0-d integer array sizes are all accepted (``np.int64(20)`` from numpy
    arithmetic is a size like ``20``) and normalised to ``int``, so they hash, compare and serialise
    as plain ints. Bools and floats (even ``2.0``) are TypeErrors; values below 1 ValueErrors.
    """
    if isinstance(val, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a positive integer, got the bool {val!r}")
    try:
        i = operator.index(val)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be a positive integer, got {val!r} of type {type(val).__name__}") from None
    if i < 1:
        raise ValueError(f"{fn}: {name} must be a positive integer, got {i}")
    return i


def check_block_size(block_size, fn: str) -> int:
    """A query-block size as a Python ``int`` >= 1 (numpy integers accepted); anything else,
    bools and floats included, is a ValueError naming ``fn`` and ``block_size``."""
    if isinstance(block_size, (bool, np.bool_)) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"{fn}: block_size must be a positive integer, got {block_size!r}")
    return int(block_size)


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
