"""One attention head, its forward pass and its cross-entropy loss, written densely.

Row-vector convention, one sequence ``x (N, d_in)`` (docs/theory.md has the model and notation)::

    q_i = x_i W_Q    k_j = x_j W_K    v_j = x_j W_V
    s_ij = q_i . k_j / sqrt(d_k)              (causal: only j <= i, diagonal kept)
    alpha_ij = softmax_j(s_ij)
    g_i = sum_j alpha_ij v_j
    z_i = g_i W_O
    L = sum_i w_i * (-log softmax(z_i)[y_i]) / sum_i w_i

Batches of sequences (or of parameter sets) are ``jax.vmap`` over these single-sequence functions.

A label outside [0, C) has no loss: where one arrives unchecked (under ``jit``, where values cannot
be inspected), its token loss is NaN, and so are the loss and every gradient of every path, never
a finite number. :func:`gradattn.checking.checked` turns it into an error instead.

The public functions here validate their input (:mod:`gradattn._checks`); the private ``_*_unchecked``
forms are what the library calls once the input has been validated at its door.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradattn._checks import (
    MAX_HEAD_SIZE,
    check_bool,
    check_head_inputs,
    check_in_dtype,
    check_int,
    check_number,
    check_prng_key,
    is_real_number,
)


class HeadParams(NamedTuple):
    """The four matrices of one head (a pytree).

    Attributes:
      w_q: (d_in, d_k) query projection.
      w_k: (d_in, d_k) key projection.
      w_v: (d_in, d_v) value projection.
      w_o: (d_v, C) output (unembedding) matrix; no biases anywhere.
    """

    w_q: jax.Array
    w_k: jax.Array
    w_v: jax.Array
    w_o: jax.Array


class HeadOutputs(NamedTuple):
    """Every intermediate of the forward pass of one sequence (a pytree).

    Attributes:
      q: (N, d_k) queries.   k: (N, d_k) keys.   v: (N, d_v) values.
      scores: (N, N) s_ij = q_i . k_j / sqrt(d_k), unmasked (entries j > i are computed but, when
        causal, never used: alpha is exactly 0 there).
      alpha: (N, N) attention weights; rows sum to 1.
      context: (N, d_v) g_i = sum_j alpha_ij v_j.
      logits: (N, C) z_i = g_i W_O.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    scores: jax.Array
    alpha: jax.Array
    context: jax.Array
    logits: jax.Array


def init_head(key, d_in: int, d_k: int, d_v: int, n_classes: int, scale: float = 0.1, dtype=jnp.float32) -> HeadParams:
    """Parameters with every entry drawn i.i.d. from N(0, scale^2) (the paper's initialisation).

    ``key`` must be a PRNG key (``jax.random.key(seed)``; a raw ``jax.random.PRNGKey`` too): an int
    is a TypeError. The sizes may be any integral type (``np.int64(20)`` as well as ``20``) in
    ``[1, MAX_HEAD_SIZE]`` (4096, the command line's bound); bools and floats are TypeErrors, sizes
    out of range ValueErrors. ``scale`` must be a finite number > 0: at scale 0 every matrix is zero,
    so every gradient is zero too and the head can never move; and so must it be in ``dtype``
    (float32 by default: at most about 3.4e38, and not so small that it rounds to 0 there).
    """
    check_prng_key("key", key, "init_head")
    d_in = check_int("d_in", d_in, "init_head", maximum=MAX_HEAD_SIZE)
    d_k = check_int("d_k", d_k, "init_head", maximum=MAX_HEAD_SIZE)
    d_v = check_int("d_v", d_v, "init_head", maximum=MAX_HEAD_SIZE)
    n_classes = check_int("n_classes", n_classes, "init_head", maximum=MAX_HEAD_SIZE)
    if is_real_number(scale) and jnp.ndim(scale) == 0 and float(scale) == 0.0:
        raise ValueError(
            "init_head: scale must be > 0, got 0: with every matrix zero every gradient is zero too, "
            "so the head (its attention included) can never move"
        )
    scale = check_number("scale", scale, "init_head", minimum=0.0, exclusive_minimum=True)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"init_head: dtype must be floating point, got {dtype}")
    check_in_dtype("scale", scale, dtype, "init_head")
    k_q, k_k, k_v, k_o = jax.random.split(key, 4)
    draw = lambda k, shape: scale * jax.random.normal(k, shape, dtype)  # noqa: E731
    return HeadParams(
        w_q=draw(k_q, (d_in, d_k)),
        w_k=draw(k_k, (d_in, d_k)),
        w_v=draw(k_v, (d_in, d_v)),
        w_o=draw(k_o, (d_v, n_classes)),
    )


def causal_visible(n_rows: int, n_keys: int, row_offset: int = 0,
                   query_positions: jax.Array | None = None) -> jax.Array:
    """(n_rows, n_keys) boolean, True where key j may be attended by query i (j <= i, the diagonal
    kept), the query of each row being i = row_offset + row, or ``query_positions[row]`` when that
    (n_rows,) integer array is given (rows gathered in any order). The one causal mask of the library."""
    if query_positions is None:
        rows = jax.lax.broadcasted_iota(jnp.int32, (n_rows, n_keys), 0) + row_offset
    else:
        rows = query_positions[:, None]
    cols = jax.lax.broadcasted_iota(jnp.int32, (n_rows, n_keys), 1)
    return cols <= rows


def causal_mask(n: int) -> jax.Array:
    """(n, n) boolean mask, True where key j may be attended by query i (j <= i)."""
    return causal_visible(n, n)


def forward(params: HeadParams, x: jax.Array, causal: bool = True) -> HeadOutputs:
    """The forward pass for one sequence ``x (N, d_in)``, keeping every intermediate (shapes in
    :class:`HeadOutputs`). ``causal`` must be a bool."""
    check_head_inputs(params, x, fn="forward")
    return _forward_unchecked(params, x, check_bool("causal", causal, "forward"))


def _forward_unchecked(params: HeadParams, x: jax.Array, causal: bool = True) -> HeadOutputs:
    """:func:`forward` for input already validated."""
    n = x.shape[0]
    q = x @ params.w_q
    k = x @ params.w_k
    v = x @ params.w_v
    scores = (q @ k.T) / jnp.sqrt(jnp.asarray(q.shape[1], q.dtype))
    masked = jnp.where(causal_mask(n), scores, -jnp.inf) if causal else scores
    alpha = jax.nn.softmax(masked, axis=-1)
    context = alpha @ v
    logits = context @ params.w_o
    return HeadOutputs(q=q, k=k, v=v, scores=scores, alpha=alpha, context=context, logits=logits)


def normalised_weights(weights, n: int, dtype) -> jax.Array:
    """w_i / sum_i w_i, with w_i = 1 (the plain mean) when ``weights`` is None."""
    if weights is None:
        return jnp.full((n,), 1.0 / n, dtype)
    w = jnp.asarray(weights, dtype)
    return w / jnp.sum(w)


def label_factor(y: jax.Array, n_classes: int, dtype) -> jax.Array:
    """(N,) 1 where the label y_i is in [0, C), NaN elsewhere.

    Every per-position quantity that reads a label is multiplied by this, so an invalid label that
    reaches compiled code makes the loss NaN *and* every gradient NaN, in every gradient path alike
    (a factor, not a ``where``, so that autodiff carries the NaN into the gradient as well).
    """
    valid = (y >= 0) & (y < n_classes)
    return jnp.where(valid, jnp.ones((), dtype), jnp.full((), jnp.nan, dtype))


def token_losses(logits: jax.Array, y: jax.Array) -> jax.Array:
    """(N,) per-position cross-entropy -log softmax(z_i)[y_i] in nats (NaN where y_i is not in [0, C))."""
    n_classes = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.clip(y, 0, n_classes - 1)[:, None], axis=-1)[:, 0]
    return -picked * label_factor(y, n_classes, logits.dtype)


def dense_loss(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True) -> jax.Array:
    """The loss L written as plain jnp ops on the whole N x N matrices (scalar, dtype of x).

    This is the autodiff reference that every law is tested against: ``jax.grad(dense_loss)``
    differentiates the forward pass itself, with no hand-written rule anywhere. ``causal`` must be
    a bool.
    """
    check_head_inputs(params, x, y, weights, fn="dense_loss")
    return _dense_loss_unchecked(params, x, y, weights, check_bool("causal", causal, "dense_loss"))


def _dense_loss_unchecked(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True) -> jax.Array:
    """:func:`dense_loss` for input already validated."""
    out = _forward_unchecked(params, x, causal)
    return jnp.sum(normalised_weights(weights, x.shape[0], out.logits.dtype) * token_losses(out.logits, y))

