"""One attention head, its forward pass and its cross-entropy loss (SPEC §1).

Row-vector convention, one sequence ``x (N, d_in)``::

    q_i = x_i W_Q    k_j = x_j W_K    v_j = x_j W_V
    s_ij = q_i . k_j / sqrt(d_k)              (causal: only j <= i, diagonal kept)
    alpha_ij = softmax_j(s_ij)
    g_i = sum_j alpha_ij v_j
    z_i = g_i W_O
    L = sum_i w_i * (-log softmax(z_i)[y_i]) / sum_i w_i

Batches of sequences (or of parameter sets) are ``jax.vmap`` over these single-sequence functions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradattn._checks import check_head_inputs, check_positive_int


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

    The sizes may be any integral type (``np.int64(20)`` as well as ``20``); bools and floats are
    TypeErrors, sizes below 1 ValueErrors.
    """
    d_in = check_positive_int("d_in", d_in, "init_head")
    d_k = check_positive_int("d_k", d_k, "init_head")
    d_v = check_positive_int("d_v", d_v, "init_head")
    n_classes = check_positive_int("n_classes", n_classes, "init_head")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"init_head: dtype must be floating point, got {dtype}")
    k_q, k_k, k_v, k_o = jax.random.split(key, 4)
    draw = lambda k, shape: scale * jax.random.normal(k, shape, dtype)  # noqa: E731
    return HeadParams(
        w_q=draw(k_q, (d_in, d_k)),
        w_k=draw(k_k, (d_in, d_k)),
        w_v=draw(k_v, (d_in, d_v)),
        w_o=draw(k_o, (d_v, n_classes)),
    )


def causal_mask(n: int) -> jax.Array:
    """(n, n) boolean mask, True where key j may be attended by query i (j <= i)."""
    return jnp.tril(jnp.ones((n, n), dtype=bool))


def forward(params: HeadParams, x: jax.Array, causal: bool = True) -> HeadOutputs:
    """The forward pass of SPEC §1 for one sequence ``x (N, d_in)``, keeping every intermediate."""
    n, _, d_k, _, _ = check_head_inputs(params, x, fn="forward")
    q = x @ params.w_q
    k = x @ params.w_k
    v = x @ params.w_v
    scores = (q @ k.T) / jnp.sqrt(jnp.asarray(d_k, q.dtype))
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


def token_losses(logits: jax.Array, y: jax.Array) -> jax.Array:
    """(N,) per-position cross-entropy -log softmax(z_i)[y_i] in nats."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


def dense_loss(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True) -> jax.Array:
    """SPEC §1's loss written as plain jnp ops on the whole N x N matrices.

    This is the autodiff reference that every law is tested against: ``jax.grad(dense_loss)``
    differentiates the forward pass itself, with no hand-written rule anywhere.
    """
    n, *_ = check_head_inputs(params, x, y, weights, fn="dense_loss")
    out = forward(params, x, causal)
    return jnp.sum(normalised_weights(weights, n, out.logits.dtype) * token_losses(out.logits, y))


def loss_fn(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True,
            block_size: int | None = None) -> jax.Array:
    """Weighted mean cross-entropy (nats) of the head on one sequence (SPEC §1), fast to differentiate.

    Evaluated alone it runs the forward half of the blocked pass (:mod:`gradattn.blocked`), which
    never builds an N x N matrix. Its reverse-mode rule is a ``jax.custom_vjp`` whose forward step
    runs the fused blocked pass of the laws of SPEC §2 once and keeps dL/dQ, dL/dK, dL/dV, dL/dW_O
    and the per-token losses, so ``jax.grad`` / ``jax.value_and_grad`` (w.r.t. params, x or weights)
    cost one pass and match ``jax.grad(dense_loss)``. Works under ``jit`` and ``vmap``, and
    reverse-over-reverse (``jax.jacrev(jax.grad(...))``); forward mode (``jax.jvp``, ``jax.hessian``)
    is not defined for a custom VJP: differentiate :func:`dense_loss` for that.

    Args:
      params: HeadParams.
      x: (N, d_in) inputs.
      y: (N,) integer targets in [0, C).
      weights: optional (N,) non-negative position weights (default: all 1, the mean).
      causal: mask keys j > i.
      block_size: query rows per block (default :func:`gradattn.blocked.default_block_size`).
    Returns:
      scalar loss, in the dtype of ``x``/``params``.
    """
    check_head_inputs(params, x, y, weights, fn="loss_fn")
    from gradattn import blocked  # blocked builds on head (and laws); imported here to avoid a cycle

    blocked.query_blocks(1, block_size)  # validates block_size before tracing into the custom VJP
    return blocked.loss_with_blocked_vjp(params, x, y, weights, bool(causal), block_size)
