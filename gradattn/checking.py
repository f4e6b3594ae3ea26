"""A checked mode: invalid input inside compiled code becomes an error, not a NaN.

Outside ``jit`` the public functions reject bad values at their door (labels outside [0, C),
negative or all-zero weights, non-finite x). Under ``jit``/``vmap`` the values are not known when
the function is traced, so an invalid label there makes the loss and every gradient NaN, in every
gradient path alike, never a silent finite update. To stop instead, wrap the function::

    safe = gradattn.checked(gradattn.loss_fn)            # or blocked_loss_and_grads, dense_loss, ...
    safe(params, x, y)                                   # compiled; raises on bad input
    jax.vmap(...) / seeds: checked(jax.vmap(fn)) works the same way

:func:`checked` runs ``fn`` under ``jax.experimental.checkify`` with runtime checks on the values
of its arguments (every label in [0, C), weights finite, non-negative and with a positive sum, x
finite) plus checkify's own NaN and out-of-bounds-index checks, compiles it with ``jax.jit``, and
raises ``checkify.JaxRuntimeError`` naming the first failed check. The checks cost a reduction over
each input and a host round trip per call: use it while developing or for untrusted data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from gradattn._checks import check_int32_range

DEFAULT_ERRORS = checkify.user_checks | checkify.index_checks | checkify.nan_checks
"""What :func:`checked` checks by default: the input checks above, out-of-bounds indexing, and NaN
created by any operation."""


def check_values(params, x, y=None, weights=None) -> None:
    """``checkify.check`` the values of a head's inputs (use inside a function being checkified).

    x (..., N, d_in) finite; y (..., N) in [0, C) with C = params.w_o.shape[-1]; weights finite,
    non-negative, with a positive sum over positions. Batched (vmapped) inputs are checked whole.
    """
    checkify.check(jnp.all(jnp.isfinite(x)), "x contains non-finite values")
    if y is not None:
        n_classes = params.w_o.shape[-1]
        checkify.check(
            jnp.all((y >= 0) & (y < n_classes)),
            "labels y must be in [0, {c}); found min {lo}, max {hi}",
            c=jnp.asarray(n_classes),
            lo=jnp.min(y),
            hi=jnp.max(y),
        )
    if weights is not None:
        w = jnp.asarray(weights)
        checkify.check(jnp.all(jnp.isfinite(w)), "weights contain non-finite values")
        checkify.check(jnp.all(w >= 0), "weights must be non-negative; min is {m}", m=jnp.min(w))
        checkify.check(jnp.all(jnp.sum(w, axis=-1) > 0), "weights sum to zero; at least one position must count")


def checked(fn, *, errors=DEFAULT_ERRORS, jit: bool = True, static_argnames=("causal", "block_size")):
    """``fn(params, x, y=None, weights=None, *rest)`` compiled with runtime checks that raise.

    Args:
      fn: any function whose first arguments are ``(params, x, y, weights)`` as in the head's
        functions (``loss_fn``, ``dense_loss``, ``blocked_loss_and_grads``,
        ``dense_loss_and_grads``, ``autodiff_loss_and_grads``, ...), or a vmap of one.
      errors: the checkify error set (default :data:`DEFAULT_ERRORS`).
      jit: compile the checked function with ``jax.jit`` (default); ``False`` runs it eagerly.
      static_argnames: arguments passed as keywords that are static under ``jit``.
    Returns:
      a function with ``fn``'s signature and results that raises ``checkify.JaxRuntimeError`` when a
      check fails (an invalid label, a negative or all-zero weight vector, a non-finite x, NaN made
      inside, an index out of bounds), and a ValueError, before compiling, for numpy int64 labels
      beyond int32 while x64 is off (which ``jit`` would cut to their low 32 bits).
    """
    if not callable(fn):
        raise TypeError(f"checked: fn must be callable, got {fn!r}")

    def with_checks(*args, **kwargs):
        named = dict(zip(("params", "x", "y", "weights"), args))
        named.update({k: v for k, v in kwargs.items() if k in ("params", "x", "y", "weights")})
        check_values(named["params"], named["x"], named.get("y"), named.get("weights"))
        return fn(*args, **kwargs)  # passed on exactly as given

    run = checkify.checkify(with_checks, errors=errors)
    if jit:
        run = jax.jit(run, static_argnames=static_argnames)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # With x64 off, jit keeps only the low 32 bits of an int64 label (2^32 + 1 arrives as 1, a
        # valid label): refuse such labels here, before they cross into the compiled function.
        y = kwargs["y"] if "y" in kwargs else (args[2] if len(args) > 2 else None)
        check_int32_range("y", y, "checked")
        err, out = run(*args, **kwargs)
        err.throw()
        return out

    return wrapper
