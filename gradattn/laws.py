"""The first-order laws of one attention head, each under its own name (docs/theory.md states them).

Given the forward pass of :func:`gradattn.head.forward`, the gradient of the loss flows back as::

    e_i  = dL/dz_i  = w_i (p_i - onehot(y_i)) / sum w             output error        (N, C)
    u_i  = dL/dg_i  = e_i W_O^T                                     upstream gradient   (N, d_v)
    dL/dW_O = G^T E                                                                     (d_v, C)
    b_ij = dL/dalpha_ij = u_i . v_j                                 compatibility       (N, N)
    a_ij = sum_k alpha_ik b_ik - b_ij                               advantage           (N, N)
    dL/ds_ij = alpha_ij (b_ij - sum_k alpha_ik b_ik) = -alpha_ij a_ij   ROUTING LAW     (N, N)
    dL/dv_j  = sum_i alpha_ij u_i                                   VALUE LAW           (N, d_v)
    dL/dq_i  = sum_j dL/ds_ij k_j / sqrt(d_k)                       query (frame)       (N, d_k)
    dL/dk_j  = sum_i dL/ds_ij q_i / sqrt(d_k)                       key (frame)         (N, d_k)
    dL/dW_Q = X^T dL/dQ,  dL/dW_K = X^T dL/dK,  dL/dW_V = X^T dL/dV

Nothing here calls autodiff (the reference, :func:`gradattn.grads.dense.autodiff_loss_and_grads`, is
a gradient path); the tests check
every line against ``jax.grad`` in float64. These are the dense forms, which build whole N x N
matrices: use them to look at the dynamics. :func:`output_error_rows` is the output error of any
set of rows, called by the dense laws, the blocked pass (:mod:`gradattn.grads.blocked`) and the feedback
statistics alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradattn._checks import check_labels, check_matrix, check_weights
from gradattn.head import (
    HeadOutputs,
    HeadParams,
    label_factor,
    normalised_weights,
)


def output_error_rows(z: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    """E (R, C): e_i = w_i (softmax(z_i) - onehot(y_i)) for rows of logits z (R, C), labels y (R,)
    and weights w (R,) already divided by sum_k w_k over the whole sequence.

    A row whose label is not in [0, C) is NaN (see :func:`gradattn.head.label_factor`).
    """
    n_classes = z.shape[-1]
    e = jax.nn.softmax(z, axis=-1) - jax.nn.one_hot(y, n_classes, dtype=z.dtype)
    return (w * label_factor(y, n_classes, z.dtype))[:, None] * e


def output_error(out: HeadOutputs, y: jax.Array, weights=None) -> jax.Array:
    """e (N, C): e_i = dL/dz_i = w_i (softmax(z_i) - onehot(y_i)) / sum_k w_k."""
    n, n_classes = out.logits.shape
    check_labels(y, n, n_classes, "output_error")
    check_weights(weights, n, "output_error")
    return output_error_rows(out.logits, y, normalised_weights(weights, n, out.logits.dtype))


def upstream_grad(params: HeadParams, out: HeadOutputs, y: jax.Array, weights=None) -> jax.Array:
    """u (N, d_v): u_i = dL/dg_i = e_i W_O^T, the error signal arriving at each context vector."""
    check_matrix("params.w_o", params.w_o, (out.context.shape[1], out.logits.shape[1]), "upstream_grad")
    return output_error(out, y, weights) @ params.w_o.T


def output_weight_grad(context: jax.Array, e: jax.Array) -> jax.Array:
    """dL/dW_O (d_v, C) = G^T E, with G (N, d_v) the contexts and E (N, C) the output errors."""
    check_matrix("context", context, (None, None), "output_weight_grad")
    check_matrix("e", e, (context.shape[0], None), "output_weight_grad")
    return context.T @ e


def compatibility(u: jax.Array, v: jax.Array) -> jax.Array:
    """b (N, N): b_ij = dL/dalpha_ij = u_i . v_j, how much value j would raise query i's loss."""
    check_matrix("u", u, (None, None), "compatibility")
    check_matrix("v", v, (None, u.shape[1]), "compatibility")
    return u @ v.T


def _check_alpha_b(alpha, b, fn):
    check_matrix("alpha", alpha, (None, None), fn)
    check_matrix("b", b, alpha.shape, fn)


def advantage(alpha: jax.Array, b: jax.Array) -> jax.Array:
    """a (N, N): a_ij = sum_k alpha_ik b_ik - b_ij, so that dL/ds_ij = -alpha_ij a_ij.

    a_ij > 0 means value j lowers query i's loss more than i's current attention-weighted average
    does; gradient descent then raises s_ij. (Where alpha_ij = 0, e.g. masked future keys, a_ij is
    still defined but has no effect.)
    """
    _check_alpha_b(alpha, b, "advantage")
    return jnp.sum(alpha * b, axis=-1, keepdims=True) - b


def routing_grad(alpha: jax.Array, b: jax.Array) -> jax.Array:
    """dL/ds (N, N): dL/ds_ij = alpha_ij (b_ij - sum_k alpha_ik b_ik), the advantage-based routing law.

    Each row sums to zero (softmax is shift invariant) and is exactly zero where alpha_ij = 0.
    """
    _check_alpha_b(alpha, b, "routing_grad")
    return alpha * (b - jnp.sum(alpha * b, axis=-1, keepdims=True))


def value_grad(alpha: jax.Array, u: jax.Array) -> jax.Array:
    """dL/dV (N, d_v): dL/dv_j = sum_i alpha_ij u_i, the responsibility-weighted value law.

    Plain SGD moves each value against the error signals of the queries that use it, weighted by
    how much they use it: Delta v_j = -eta sum_i alpha_ij u_i.
    """
    check_matrix("alpha", alpha, (None, None), "value_grad")
    check_matrix("u", u, (alpha.shape[0], None), "value_grad")
    return alpha.T @ u


def query_grad(ds: jax.Array, k: jax.Array) -> jax.Array:
    """dL/dQ (N, d_k): dL/dq_i = sum_j dL/ds_ij k_j / sqrt(d_k) (the hypothesis frame, query side)."""
    check_matrix("ds", ds, (None, None), "query_grad")
    check_matrix("k", k, (ds.shape[1], None), "query_grad")
    return (ds @ k) / jnp.sqrt(jnp.asarray(k.shape[1], k.dtype))


def key_grad(ds: jax.Array, q: jax.Array) -> jax.Array:
    """dL/dK (N, d_k): dL/dk_j = sum_i dL/ds_ij q_i / sqrt(d_k) (the hypothesis frame, key side)."""
    check_matrix("ds", ds, (None, None), "key_grad")
    check_matrix("q", q, (ds.shape[0], None), "key_grad")
    return (ds.T @ q) / jnp.sqrt(jnp.asarray(q.shape[1], q.dtype))


def projection_grads(x: jax.Array, dq: jax.Array, dk: jax.Array, dv: jax.Array, dw_o: jax.Array) -> HeadParams:
    """Chain the per-position gradients into the weights: dL/dW_Q = X^T dL/dQ, and so on."""
    return HeadParams(w_q=x.T @ dq, w_k=x.T @ dk, w_v=x.T @ dv, w_o=dw_o)
