"""First-order checks: one gradient step of size eta against what the laws predict.

The loss changes by -eta ||dL/dtheta||^2 + O(eta^2); a value-only step (alpha fixed) changes the
compatibility, with u held fixed, by Delta b_ij = -eta u_i . sum_k alpha_kj u_k. Measured/predicted
ratios -> 1 as eta -> 0 (docs/theory.md).

The routing half of the feedback loop in aggregate: a gradient step of size eta on W_Q, W_K alone
gives sum_ij a_ij Delta alpha_ij = eta ||dL/d(W_Q, W_K)||^2 + O(eta^2), because each row of Delta alpha
sums to zero, so sum_ij a_ij Delta alpha_ij = -sum_ij b_ij Delta alpha_ij, the first-order loss
change of the step with its sign turned. "Routing rises where the advantage is positive" therefore
holds in aggregate for any small gradient step (:func:`routing_feedback_identity`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradattn._checks import check_head_inputs, check_number, is_traced
from gradattn.grads.blocked import _blocked_loss_and_grads_unchecked, _blocked_loss_unchecked
from gradattn.head import (
    HeadOutputs,
    HeadParams,
    _dense_loss_unchecked,
    _forward_unchecked,
    causal_mask,
    normalised_weights,
    token_losses,
)
from gradattn.laws import advantage, compatibility, output_error_rows, value_grad

__all__ = ["FirstOrderReport", "RoutingFeedback", "first_order_report", "routing_feedback_identity"]


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


def _checked_lr(lr, x, fn: str) -> jax.Array:
    """``lr`` as a scalar of ``x``'s dtype: a positive number, or a traced scalar."""
    if not is_traced(lr):
        check_number("lr", lr, fn, minimum=0.0, exclusive_minimum=True)
    elif np.ndim(lr) != 0:
        raise ValueError(f"{fn}: lr must be a scalar, got shape {np.shape(lr)}")
    return jnp.asarray(lr, x.dtype)


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
      weights, causal: as in :func:`gradattn.grads.blocked.loss_fn`.
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
    lr = _checked_lr(lr, x, "first_order_report")

    loss, g = _blocked_loss_and_grads_unchecked(params, x, y, weights, causal)
    stepped = jax.tree.map(lambda p, d: p - lr * d, params, g)
    predicted = -lr * optax.tree_utils.tree_norm(g, squared=True)
    actual = _blocked_loss_unchecked(stepped, x, y, weights, causal) - loss

    out = _forward_unchecked(params, x, causal)
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
        dw_v = jax.grad(lambda w: _dense_loss_unchecked(params._replace(w_v=w), x, y, weights, causal))(params.w_v)
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


class RoutingFeedback(NamedTuple):
    """What :func:`routing_feedback_identity` measures (a pytree of scalars).

    Attributes:
      aggregate: sum_ij a_ij Delta alpha_ij, with a the advantage before the step and Delta alpha the
        measured change of attention after the routing step W_Q, W_K -= eta dL/d(W_Q, W_K).
      predicted: eta ||dL/d(W_Q, W_K)||^2, its first-order value.
      ratio: aggregate / predicted (-> 1 as eta -> 0; the error is O(eta)).
      loss_change: the measured loss change of the routing step (-predicted to first order).
    """

    aggregate: jax.Array
    predicted: jax.Array
    ratio: jax.Array
    loss_change: jax.Array


def routing_feedback_identity(params: HeadParams, x: jax.Array, y: jax.Array, lr, weights=None,
                              causal: bool = True) -> RoutingFeedback:
    """The feedback loop's routing half in aggregate, for one gradient step of size ``lr`` on W_Q, W_K.

    With a_ij = sum_k alpha_ik b_ik - b_ij the advantage and Delta alpha the change of attention
    after the step, sum_ij a_ij Delta alpha_ij = eta ||dL/d(W_Q, W_K)||^2 + O(eta^2): the rows of
    Delta alpha sum to zero (equivalently sum_j alpha_ij a_ij = 0), so the sum is minus the
    first-order loss change through attention, which a gradient step makes -eta ||g||^2. Routing mass
    therefore moves towards positive advantage in aggregate for any small gradient step, whatever
    the entrywise sign agreement (:func:`gradattn.dynamics.feedback_stats`) says.

    Args:
      params: HeadParams.   x: (N, d_in).   y: (N,) int targets.
      lr: the step size eta (a positive scalar; may be traced).
      weights, causal: as in :func:`gradattn.grads.blocked.loss_fn`.
    Returns:
      a :class:`RoutingFeedback`. Builds (N, N) attention: for diagnostics at moderate N.
    """
    n, *_ = check_head_inputs(params, x, y, weights, fn="routing_feedback_identity")
    lr = _checked_lr(lr, x, "routing_feedback_identity")
    loss, g = _blocked_loss_and_grads_unchecked(params, x, y, weights, causal)
    stepped = params._replace(w_q=params.w_q - lr * g.w_q, w_k=params.w_k - lr * g.w_k)
    out = _forward_unchecked(params, x, causal)
    wn = normalised_weights(weights, n, out.logits.dtype)
    u = output_error_rows(out.logits, y, wn) @ params.w_o.T
    a = advantage(out.alpha, compatibility(u, out.v))
    aggregate = jnp.sum(a * (_forward_unchecked(stepped, x, causal).alpha - out.alpha))
    predicted = lr * (jnp.sum(g.w_q * g.w_q) + jnp.sum(g.w_k * g.w_k))
    return RoutingFeedback(aggregate=aggregate, predicted=predicted, ratio=aggregate / predicted,
                           loss_change=_blocked_loss_unchecked(stepped, x, y, weights, causal) - loss)
