"""Two gradient paths of one head on whole N x N matrices: the first-order laws assembled densely
(:func:`dense_loss_and_grads`, no autodiff), and ``jax.value_and_grad`` of the dense loss
(:func:`autodiff_loss_and_grads`), the reference every path is held to."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradattn._checks import check_bool, check_head_inputs
from gradattn.head import HeadParams, _dense_loss_unchecked, _forward_unchecked, normalised_weights, token_losses
from gradattn.laws import (
    compatibility,
    key_grad,
    output_error_rows,
    output_weight_grad,
    projection_grads,
    query_grad,
    routing_grad,
    value_grad,
)


def dense_loss_and_grads(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True):
    """``(loss, grads)`` assembled from the laws above on whole N x N matrices (no autodiff).

    Shapes: x (N, d_in), y (N,), weights (N,) or None; returns a scalar and a HeadParams.
    """
    check_head_inputs(params, x, y, weights, fn="dense_loss_and_grads")
    return _dense_loss_and_grads_unchecked(params, x, y, weights, check_bool("causal", causal, "dense_loss_and_grads"))


def _dense_loss_and_grads_unchecked(params: HeadParams, x, y, weights=None, causal: bool = True):
    """:func:`dense_loss_and_grads` for input already validated."""
    out = _forward_unchecked(params, x, causal)
    w = normalised_weights(weights, x.shape[0], out.logits.dtype)
    loss = jnp.sum(w * token_losses(out.logits, y))
    e = output_error_rows(out.logits, y, w)
    u = e @ params.w_o.T
    ds = routing_grad(out.alpha, compatibility(u, out.v))
    grads = projection_grads(
        x,
        dq=query_grad(ds, out.k),
        dk=key_grad(ds, out.q),
        dv=value_grad(out.alpha, u),
        dw_o=output_weight_grad(out.context, e),
    )
    return loss, grads


def autodiff_loss_and_grads(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True):
    """``(loss, grads)`` by XLA's own reverse mode: ``jax.value_and_grad(dense_loss)``. The reference."""
    check_head_inputs(params, x, y, weights, fn="autodiff_loss_and_grads")
    causal = check_bool("causal", causal, "autodiff_loss_and_grads")
    return jax.value_and_grad(_dense_loss_unchecked)(params, x, y, weights, causal)
