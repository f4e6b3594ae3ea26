"""First-order checks: one gradient step of size eta against what the laws predict.

The loss changes by -eta ||dL/dtheta||^2 + O(eta^2); a value-only step (alpha fixed) changes the
compatibility, with u held fixed, by Delta b_ij = -eta u_i . sum_k alpha_kj u_k. Measured/predicted
ratios -> 1 as eta -> 0 (docs/theory.md).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_head_inputs, check_number
from gradattn._math import tree_norm
from gradattn.blocked import blocked_loss_and_grads_unchecked, blocked_loss_unchecked
from gradattn.head import HeadOutputs, HeadParams, causal_mask, dense_loss_unchecked, forward_unchecked, normalised_weights, token_losses
from gradattn.laws import compatibility, output_error_rows, value_grad

__all__ = ["FirstOrderReport", "first_order_report"]


class FirstOrderReport(NamedTuple):
    """What :func:`first_order_report` measures (a pytree; scalars unless a shape is given).

    Full step on all four matrices, theta' = theta - eta g:
      loss: L(theta).
      predicted_dloss: -eta ||g||^2 (g from the laws).
      actual_dloss: L(theta') - L(theta).
      ratio: actual_dloss / predicted_dloss (-> 1 as eta -> 0).
    Value-only step (alpha, and therefore the routing, untouched):
      value_dloss_predicted: sum_ij alpha_ij Delta b_ij = sum_j dL/dv_j . Delta v_j, the first-order
        loss change of the value step.
      value_dloss_actual: the measured loss change of the value step.
      value_dloss_ratio: their ratio (-> 1 as eta -> 0).
      dcompat_predicted: (N, N) Delta b_ij predicted by the value law with u held fixed
        (value space: -eta u_i . sum_k alpha_kj u_k); zero where j > i when causal.
      dcompat_actual: (N, N) u_i . (v'_j - v_j) with v' the values after the step taken with the
        autodiff gradient (so the law is checked against autodiff, not against itself).
      dcompat_ratio: least-squares slope of dcompat_actual on dcompat_predicted over the visible
        (i, j): sum(actual * predicted) / sum(predicted^2).
      dcompat_full: (N, N) u'_i . v'_j - u_i . v_j, the whole change of b when u is recomputed at
        the new values too; the difference from ``dcompat_actual`` is the feedback through u.
      dcompat_full_ratio: the least-squares slope of dcompat_full on dcompat_predicted. It does
        *not* tend to 1: u moves at first order as well, and this number says by how much.
    """

    loss: jax.Array
    predicted_dloss: jax.Array
    actual_dloss: jax.Array
    ratio: jax.Array
    value_dloss_predicted: jax.Array
    value_dloss_actual: jax.Array
    value_dloss_ratio: jax.Array
    dcompat_predicted: jax.Array
    dcompat_actual: jax.Array
    dcompat_ratio: jax.Array
    dcompat_full: jax.Array
    dcompat_full_ratio: jax.Array


def _outputs_with_values(params: HeadParams, out: HeadOutputs, v: jax.Array) -> HeadOutputs:
    """The forward pass with the values replaced by ``v`` (alpha does not depend on the values)."""
    context = out.alpha @ v
    return out._replace(v=v, context=context, logits=context @ params.w_o)


def first_order_report(
    params: HeadParams,
    x: jax.Array,
    y: jax.Array,
    lr,
    weights=None,
    causal: bool = True,
    value_param: str = "values",
) -> FirstOrderReport:
    """Compare one gradient step of size ``lr`` with the first-order predictions of the laws.

    Args:
      params: HeadParams.   x: (N, d_in).   y: (N,) int targets.
      lr: the step size eta (a positive scalar; may be traced).
      weights, causal: as in :func:`gradattn.blocked.loss_fn`.
      value_param: how the value-only step is taken.
        ``"values"`` (default; the law as stated in docs/theory.md): the values v_j are moved directly,
        v'_j = v_j - eta dL/dv_j, so Delta b_ij = -eta u_i . sum_k alpha_kj u_k.
        ``"w_v"`` (what training does): W_V' = W_V - eta dL/dW_V, so Delta v_j = -eta x_j X^T dL/dV and
        Delta b_ij = -eta u_i . x_j X^T sum_k alpha_k. u_k (the input Gram matrix couples the values).
    Returns:
      a :class:`FirstOrderReport`. Holds three (N, N) matrices: for diagnostics at moderate N.
    """
    n, *_ = check_head_inputs(params, x, y, weights, fn="first_order_report")
    if value_param not in ("values", "w_v"):
        raise ValueError(f"first_order_report: value_param must be 'values' or 'w_v', got {value_param!r}")
    if not isinstance(lr, jax.core.Tracer):
        check_number("lr", lr, "first_order_report", minimum=0.0, exclusive_minimum=True)
    elif np.ndim(lr) != 0:
        raise ValueError(f"first_order_report: lr must be a scalar, got shape {np.shape(lr)}")
    lr = jnp.asarray(lr, x.dtype)

    loss, g = blocked_loss_and_grads_unchecked(params, x, y, weights, causal)
    stepped = jax.tree.map(lambda p, d: p - lr * d, params, g)
    predicted = -lr * tree_norm(g, squared=True)
    actual = blocked_loss_unchecked(stepped, x, y, weights, causal) - loss

    out = forward_unchecked(params, x, causal)
    wn = normalised_weights(weights, n, out.logits.dtype)
    u = output_error_rows(out.logits, y, wn) @ params.w_o.T
    dv_law = value_grad(out.alpha, u)

    def loss_of_values(v):
        return jnp.sum(wn * token_losses(_outputs_with_values(params, out, v).logits, y))

    if value_param == "values":
        delta_v_law = -lr * dv_law
        delta_v = -lr * jax.grad(loss_of_values)(out.v)
    else:
        delta_v_law = -lr * (x @ (x.T @ dv_law))
        # autodiff of the dense loss: loss_fn's reverse rule *is* the blocked value law, so it
        # could not disagree with the prediction
        dw_v = jax.grad(lambda w: dense_loss_unchecked(params._replace(w_v=w), x, y, weights, causal))(params.w_v)
        delta_v = x @ (-lr * dw_v)
    v_new = out.v + delta_v
    mask = causal_mask(n) if causal else jnp.ones((n, n), bool)
    dcompat_pred = jnp.where(mask, compatibility(u, delta_v_law), 0.0)
    dcompat_act = jnp.where(mask, compatibility(u, delta_v), 0.0)
    out_new = _outputs_with_values(params, out, v_new)
    u_new = output_error_rows(out_new.logits, y, wn) @ params.w_o.T
    dcompat_full = jnp.where(mask, compatibility(u_new, v_new) - compatibility(u, out.v), 0.0)
    denom = jnp.sum(dcompat_pred * dcompat_pred)

    value_pred = jnp.sum(out.alpha * dcompat_pred)
    value_act = loss_of_values(v_new) - loss_of_values(out.v)
    return FirstOrderReport(
        loss=loss,
        predicted_dloss=predicted,
        actual_dloss=actual,
        ratio=actual / predicted,
        value_dloss_predicted=value_pred,
        value_dloss_actual=value_act,
        value_dloss_ratio=value_act / value_pred,
        dcompat_predicted=dcompat_pred,
        dcompat_actual=dcompat_act,
        dcompat_ratio=jnp.sum(dcompat_act * dcompat_pred) / denom,
        dcompat_full=dcompat_full,
        dcompat_full_ratio=jnp.sum(dcompat_full * dcompat_pred) / denom,
    )
