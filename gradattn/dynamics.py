"""The paper's mechanism, measured: first-order checks, the feedback loop, and settling times.

Three groups of pure functions, each stating what it measures in SPEC §2's notation.

* :func:`first_order_report`: one gradient step of size eta. The loss changes by
  -eta ||dL/dtheta||^2 + O(eta^2); a value-only step (alpha fixed) changes the compatibility, with
  u held fixed, by Delta b_ij = -eta u_i . sum_k alpha_kj u_k. Measured/predicted ratios -> 1 as
  eta -> 0.
* :func:`feedback_stats` / :func:`feedback_probe`: the positive feedback loop along training.
  Does the sign of the advantage a_ij predict the sign of Delta alpha_ij after a step? Does each
  value move against the responsibility-weighted error sum_i alpha_ij u_i of the queries that use
  it? ``feedback_probe`` has the ``probe(state_before, state_after, x, y)`` signature of
  :func:`gradattn.training.train`, so a vmapped sweep records it at every checkpoint of every seed.
  It works over blocks of query rows and never builds an N x N matrix.
* :func:`settling_step` / :func:`frame_before_precision`: from checkpoints of a run, when does
  attention reach (and stay within a tolerance of) its final pattern, and when do the values?
  The paper's two-timescale reading predicts attention first ("frame before precision").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_head_inputs, check_int, check_params, concrete, is_real_number
from gradattn.blocked import _masked_scores, query_blocks
from gradattn.head import HeadOutputs, HeadParams, causal_mask, forward, loss_fn, normalised_weights, token_losses
from gradattn.laws import advantage, analytic_loss_and_grads, compatibility, output_error, value_grad

LN2 = math.log(2.0)

# --------------------------------------------------------------------------------------------
# First-order predictions
# --------------------------------------------------------------------------------------------


class FirstOrderReport(NamedTuple):
    """What :func:`first_order_report` measures (a pytree; scalars unless a shape is given).

    Full step on all four matrices, theta' = theta - eta g:
      loss: L(theta).
      predicted_dloss: -eta ||g||^2 (g from the laws of SPEC §2).
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


def _sqnorm(tree) -> jax.Array:
    return sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree))


def first_order_report(
    params: HeadParams,
    x: jax.Array,
    y: jax.Array,
    lr,
    weights=None,
    causal: bool = True,
    value_param: str = "values",
) -> FirstOrderReport:
    """Compare one gradient step of size ``lr`` with the first-order predictions of SPEC §2.

    Args:
      params: HeadParams.   x: (N, d_in).   y: (N,) int targets.
      lr: the step size eta (a positive scalar; may be traced).
      weights, causal: as in :func:`gradattn.head.loss_fn`.
      value_param: how the value-only step is taken.
        ``"values"`` (default; SPEC §2's statement): the values v_j are moved directly,
        v'_j = v_j - eta dL/dv_j, so Delta b_ij = -eta u_i . sum_k alpha_kj u_k.
        ``"w_v"`` (what training does): W_V' = W_V - eta dL/dW_V, so Delta v_j = -eta x_j X^T dL/dV and
        Delta b_ij = -eta u_i . x_j X^T sum_k alpha_k. u_k (the input Gram matrix couples the values).
    Returns:
      a :class:`FirstOrderReport`. Holds three (N, N) matrices: for diagnostics at moderate N.
    """
    n, *_ = check_head_inputs(params, x, y, weights, fn="first_order_report")
    if value_param not in ("values", "w_v"):
        raise ValueError(f"first_order_report: value_param must be 'values' or 'w_v', got {value_param!r}")
    if not is_real_number(lr):
        raise TypeError(f"first_order_report: lr must be a number (a positive step size), got {lr!r} of type {type(lr).__name__}")
    if np.ndim(lr) != 0:
        raise ValueError(f"first_order_report: lr must be a scalar, got shape {np.shape(lr)}")
    if not isinstance(lr, jax.core.Tracer) and not (np.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"first_order_report: lr must be a finite positive step size, got {lr!r}")
    lr = jnp.asarray(lr, x.dtype)

    loss, g = analytic_loss_and_grads(params, x, y, weights, causal)
    stepped = jax.tree.map(lambda p, d: p - lr * d, params, g)
    predicted = -lr * _sqnorm(g)
    actual = loss_fn(stepped, x, y, weights, causal) - loss

    out = forward(params, x, causal)
    wn = normalised_weights(weights, n, out.logits.dtype)
    u = output_error(out, y, weights) @ params.w_o.T
    dv_law = value_grad(out.alpha, u)

    def loss_of_values(v):
        return jnp.sum(wn * token_losses(_outputs_with_values(params, out, v).logits, y))

    if value_param == "values":
        delta_v_law = -lr * dv_law
        delta_v = -lr * jax.grad(loss_of_values)(out.v)
    else:
        delta_v_law = -lr * (x @ (x.T @ dv_law))
        dw_v = jax.grad(lambda w: loss_fn(params._replace(w_v=w), x, y, weights, causal))(params.w_v)
        delta_v = x @ (-lr * dw_v)
    v_new = out.v + delta_v
    mask = causal_mask(n) if causal else jnp.ones((n, n), bool)
    dcompat_pred = jnp.where(mask, compatibility(u, delta_v_law), 0.0)
    dcompat_act = jnp.where(mask, compatibility(u, delta_v), 0.0)
    out_new = _outputs_with_values(params, out, v_new)
    u_new = output_error(out_new, y, weights) @ params.w_o.T
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


# --------------------------------------------------------------------------------------------
# The feedback loop along training
# --------------------------------------------------------------------------------------------


class FeedbackStats(NamedTuple):
    """Feedback-loop statistics of one step theta -> theta' (a pytree of scalars).

    Attributes:
      loss: L(theta), before the step.
      sign_agreement: over the entries (i, j) that can move (j <= i when causal, i with at least two
        visible keys, alpha_ij > 0, a_ij != 0), the fraction with sign(a_ij) = sign(Delta alpha_ij),
        where a is the advantage before the step and Delta alpha = alpha(theta') - alpha(theta).
      sign_agreement_weighted: the same, each entry weighted by alpha_ij (the routing mass it carries).
      value_alignment: mean over positions j of cos(Delta v_j, -dL/dv_j), where
        dL/dv_j = sum_i alpha_ij u_i is the responsibility-weighted error and Delta v_j = v_j(theta')
        - v_j(theta) is the measured move of value j.
      value_alignment_weighted: the same mean weighted by ||dL/dv_j|| (values that carry error count
        more), equal to sum_j (Delta v_j . -dL/dv_j / ||Delta v_j||) / sum_j ||dL/dv_j||.
      attention_entropy_bits: mean over queries of -sum_j alpha_ij log2 alpha_ij, before the step.
    """

    loss: jax.Array
    sign_agreement: jax.Array
    sign_agreement_weighted: jax.Array
    value_alignment: jax.Array
    value_alignment_weighted: jax.Array
    attention_entropy_bits: jax.Array


def _attention_rows(q_r, k, r0: int, causal: bool):
    """alpha for query rows r0:r0+|R| against keys ``k`` (|R|, len(k)): the blocked pass's masked scores."""
    return jax.nn.softmax(_masked_scores(q_r / jnp.sqrt(jnp.asarray(k.shape[1], k.dtype)), k, r0, causal), axis=-1)


def _xlogx(p):
    return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)


def feedback_stats(
    params_before: HeadParams,
    params_after: HeadParams,
    x: jax.Array,
    y: jax.Array,
    weights=None,
    causal: bool = True,
    block_size: int = 256,
) -> FeedbackStats:
    """The feedback-loop statistics of the step ``params_before -> params_after`` (SPEC §2, Reading).

    The routing law says dL/ds_ij = -alpha_ij a_ij, so a step raises s_ij, and to first order alpha_ij,
    where the advantage a_ij > 0 (for a step on the scores themselves; through W_Q, W_K the frame
    couples the entries, which is what makes the agreement an empirical question). The value law
    says Delta v_j = -eta sum_i alpha_ij u_i for a step on the values themselves; through W_V the
    input Gram matrix couples them. See :class:`FeedbackStats` for the exact definitions.

    Works over static blocks of ``block_size`` query rows: no N x N matrix is ever built, so it is
    cheap enough to run inside a vmapped training scan. Shapes: x (N, d_in), y (N,).
    """
    n, *_ = check_head_inputs(params_before, x, y, weights, fn="feedback_stats")
    check_head_inputs(params_after, x, y, weights, fn="feedback_stats")
    shapes_before = [np.shape(a) for a in params_before]
    shapes_after = [np.shape(a) for a in params_after]
    if shapes_before != shapes_after:
        raise ValueError(
            f"feedback_stats: params_before and params_after must have the same shapes, got {shapes_before} and {shapes_after}"
        )
    block_size = check_int("block_size", block_size, "feedback_stats")
    dt = x.dtype
    w = normalised_weights(weights, n, dt)
    q0, k0, v0 = x @ params_before.w_q, x @ params_before.w_k, x @ params_before.w_v
    q1, k1 = x @ params_after.w_q, x @ params_after.w_k
    v1 = x @ params_after.w_v
    c = params_before.w_o.shape[1]

    zero = jnp.zeros((), dt)
    agree = count = agree_w = mass = loss = ent = zero
    dv = jnp.zeros_like(v0)
    for r0, r1 in query_blocks(n, block_size):
        end = r1 if causal else n
        a0 = _attention_rows(q0[r0:r1], k0[:end], r0, causal)
        a1 = _attention_rows(q1[r0:r1], k1[:end], r0, causal)
        g = a0 @ v0[:end]
        z = g @ params_before.w_o
        yr = y[r0:r1]
        loss = loss + jnp.sum(w[r0:r1] * token_losses(z, yr))
        e = w[r0:r1, None] * (jax.nn.softmax(z, axis=-1) - jax.nn.one_hot(yr, c, dtype=dt))
        u = e @ params_before.w_o.T
        adv = advantage(a0, compatibility(u, v0[:end]))
        d_alpha = a1 - a0
        visible = jnp.arange(end)[None, :] <= (r0 + jnp.arange(r1 - r0))[:, None] if causal else jnp.ones_like(a0, bool)
        n_keys = (r0 + jnp.arange(r1 - r0) + 1) if causal else jnp.full((r1 - r0,), n)
        ok = visible & (a0 > 0) & (adv != 0) & (n_keys[:, None] > 1)
        hit = ok & (jnp.sign(adv) == jnp.sign(d_alpha))
        agree = agree + jnp.sum(hit)
        count = count + jnp.sum(ok)
        agree_w = agree_w + jnp.sum(jnp.where(hit, a0, 0.0))
        mass = mass + jnp.sum(jnp.where(ok, a0, 0.0))
        ent = ent - jnp.sum(_xlogx(a0)) / LN2
        dv = dv.at[:end].add(value_grad(a0, u))

    delta_v = v1 - v0
    dv_norm = jnp.linalg.norm(dv, axis=-1)
    mv_norm = jnp.linalg.norm(delta_v, axis=-1)
    dot = -jnp.sum(delta_v * dv, axis=-1)
    valid = (dv_norm > 0) & (mv_norm > 0)
    cos = jnp.where(valid, dot / jnp.where(valid, dv_norm * mv_norm, 1.0), 0.0)
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    return FeedbackStats(
        loss=loss,
        sign_agreement=agree / jnp.maximum(count, 1),
        sign_agreement_weighted=agree_w / jnp.where(mass > 0, mass, 1.0),
        value_alignment=jnp.sum(cos) / n_valid,
        value_alignment_weighted=jnp.sum(cos * dv_norm) / jnp.where(jnp.sum(dv_norm) > 0, jnp.sum(dv_norm), 1.0),
        attention_entropy_bits=ent / n,
    )


class FeedbackRecord(NamedTuple):
    """What :func:`feedback_probe` records at a checkpoint: the statistics and the parameters
    before the step (cheap: four small matrices), from which attention and values at that checkpoint
    can be recomputed afterwards (:func:`snapshots`)."""

    stats: FeedbackStats
    params: HeadParams


def feedback_probe(state_before, state_after, x, y) -> FeedbackRecord:
    """A probe for :func:`gradattn.training.train`: ``probe(state_before, state_after, x, y)``.

    Records :func:`feedback_stats` of the checkpoint's step and the parameters before it. Pure; runs
    inside the training scan and under vmap over seeds. For position weights or a non-causal head,
    use :func:`make_feedback_probe`.
    """
    return make_feedback_probe()(state_before, state_after, x, y)


def make_feedback_probe(weights=None, causal: bool = True, block_size: int = 256):
    """A :func:`feedback_probe` with fixed position ``weights``, ``causal`` flag and row block size."""

    def probe(state_before, state_after, x, y) -> FeedbackRecord:
        stats = feedback_stats(state_before.params, state_after.params, x, y, weights, causal, block_size)
        return FeedbackRecord(stats=stats, params=state_before.params)

    return probe


class Snapshots(NamedTuple):
    """Attention rows, values and contexts at each checkpoint (a pytree with a leading (K,) axis).

    Attributes:
      alpha: (K, R, N) attention weights of the query rows ``rows``.
      values: (K, N, d_v) v_j = x_j W_V.
      contexts: (K, N, d_v) g_i = sum_j alpha_ij v_j.
    """

    alpha: jax.Array
    values: jax.Array
    contexts: jax.Array


def snapshots(params_series: HeadParams, x: jax.Array, rows=None, causal: bool = True, block_size: int = 256) -> Snapshots:
    """Recompute attention (on query ``rows``), values and contexts from stacked checkpoint params.

    Args:
      params_series: HeadParams whose leaves have a leading checkpoint axis K (as recorded by
        :func:`feedback_probe` or training's default probe).
      x: (N, d_in) the training sequence.
      rows: int array (R,) of query positions in [0, N) whose attention rows to keep (out-of-range
        rows are a ValueError when ``rows`` is concrete); default: 64 rows evenly spaced over
        0..N-1 (attention rows are N long; all of them would be K x N x N).
      causal: as in the head.
    Returns:
      :class:`Snapshots`. Computed checkpoint by checkpoint (``lax.map``), rows in blocks.
    """
    if not hasattr(params_series, "w_q") or np.ndim(params_series.w_q) != 3:
        raise ValueError(
            "snapshots: params_series must be a HeadParams with a leading checkpoint axis (leaves of rank 3), "
            f"got w_q of shape {np.shape(getattr(params_series, 'w_q', None))}"
        )
    first = jax.tree.map(lambda a: a[0], params_series)
    check_params(first, "snapshots")
    block_size = check_int("block_size", block_size, "snapshots")
    n, *_ = check_head_inputs(first, x, fn="snapshots")
    rows = jnp.linspace(0, n - 1, min(64, n)).astype(jnp.int32) if rows is None else jnp.asarray(rows)
    if rows.ndim != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ValueError(f"snapshots: rows must be a 1-D integer array of query positions, got shape {rows.shape}, dtype {rows.dtype}")
    # Out-of-range rows would be wrapped (negative) or clamped by the gather, silently: reject them
    # when they are concrete (traced rows cannot be inspected).
    rc = concrete(rows)
    if rc is not None and ((rc < 0) | (rc >= n)).any():
        bad = np.unique(rc[(rc < 0) | (rc >= n)])
        raise ValueError(
            f"snapshots: rows must be query positions in [0, N) with N = {n} (from x of shape {np.shape(x)}), "
            f"got out-of-range rows {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}"
        )

    def one(p):
        q, k, v = x @ p.w_q, x @ p.w_k, x @ p.w_v
        ctx = []
        for r0, r1 in query_blocks(n, block_size):
            end = r1 if causal else n
            ctx.append(_attention_rows(q[r0:r1], k[:end], r0, causal) @ v[:end])
        s = (q[rows] @ k.T) / jnp.sqrt(jnp.asarray(k.shape[1], k.dtype))
        if causal:
            s = jnp.where(jnp.arange(n)[None, :] <= rows[:, None], s, -jnp.inf)
        return Snapshots(alpha=jax.nn.softmax(s, axis=-1), values=v, contexts=jnp.concatenate(ctx))

    return jax.lax.map(one, params_series)


# --------------------------------------------------------------------------------------------
# Settling: frame before precision
# --------------------------------------------------------------------------------------------


_SCALES = ("final", "change", None)


def _check_scale(scale, fn: str) -> None:
    if scale not in _SCALES:
        raise ValueError(f"{fn}: scale must be 'final', 'change' or None, got {scale!r}")


def distance_to_final(series: jax.Array, scale: str | None = "final") -> jax.Array:
    """(K,) d_k = ||s_k - s_{K-1}|| (Frobenius over all trailing axes), optionally normalised.

    ``series`` (K, ...) holds one snapshot per checkpoint, the last one being the final state.
    ``scale`` chooses the normaliser: ``"final"`` divides by ||s_{K-1}|| (relative to the final
    value); ``"change"`` by ||s_0 - s_{K-1}|| (the fraction of the run's total change still to go,
    1 at the start and 0 at the end: right for quantities such as attention that start near a large
    constant pattern, where "relative to the final value" is small from step 0); ``None`` leaves the
    distance absolute. A zero normaliser leaves the distance absolute.
    """
    _check_scale(scale, "distance_to_final")
    series = jnp.asarray(series)
    if series.ndim < 1 or series.shape[0] < 1:
        raise ValueError(f"distance_to_final: series must have a leading checkpoint axis (K, ...), got shape {series.shape}")
    flat = series.reshape(series.shape[0], -1)
    d = jnp.linalg.norm(flat - flat[-1], axis=-1)
    if scale is not None:
        ref = jnp.linalg.norm(flat[-1]) if scale == "final" else d[0]
        d = d / jnp.where(ref > 0, ref, 1.0)
    return d


def settling_step(checkpoint_steps, series, tol: float = 0.1, scale: str | None = "final") -> jax.Array:
    """The first checkpoint step after which ``series`` stays within ``tol`` of its final value.

    With d_k = :func:`distance_to_final` (``scale="final"``: relative to the size of the final
    value; ``"change"``: relative to the run's total change; ``None``: absolute), the answer is
    checkpoint_steps[k*] for the smallest k* such that d_k <= tol for every k >= k*. For a finite
    series the last checkpoint always qualifies (d = 0), so the answer is defined; it is
    checkpoint_steps[0] when the series never leaves the tolerance.

    A series with any non-finite value (a diverged run) never settles: it has no final value to
    settle to, and every comparison with NaN fails, which would otherwise read as "settled at the
    first checkpoint". Called eagerly, that is a ValueError naming ``series`` and the checkpoints
    concerned; traced (under ``jit``/``vmap``, e.g. in a sweep where one seed diverges), the result
    is NaN, so means over seeds show it instead of absorbing a plausible-looking step.

    Args:
      checkpoint_steps: (K,) the step of each checkpoint, increasing (e.g. 0, k, 2k, ...).
      series: (K, ...) a snapshot per checkpoint (attention rows, values, a scalar, ...).
      tol: tolerance on d_k.
      scale: the normaliser of d_k, as above.
    Returns:
      scalar, the settling step, floating (so that "never" can be NaN): the dtype of
      ``checkpoint_steps`` if it is floating, else JAX's default float. Pure and vmap-able over seeds.
    """
    return _settling_step(checkpoint_steps, series, tol, scale, "series", "settling_step")


def _settling_step(checkpoint_steps, series, tol, scale, name: str, fn: str) -> jax.Array:
    """:func:`settling_step`, with the argument and function names its errors should give."""
    _check_scale(scale, fn)
    steps = jnp.asarray(checkpoint_steps)
    series = jnp.asarray(series)
    if steps.ndim != 1:
        raise ValueError(f"{fn}: checkpoint_steps must be 1-D (K,), got shape {steps.shape}")
    if series.ndim < 1 or series.shape[0] != steps.shape[0]:
        raise ValueError(
            f"{fn}: {name} must have shape (K, ...) with K = {steps.shape[0]} (from checkpoint_steps), "
            f"got shape {series.shape}"
        )
    if np.ndim(tol) != 0 or (not isinstance(tol, jax.core.Tracer) and not float(tol) >= 0):
        raise ValueError(f"{fn}: tol must be a non-negative scalar, got {tol!r}")
    sc = concrete(series)
    if sc is not None and not np.isfinite(sc).all():
        bad = np.flatnonzero(~np.isfinite(sc.reshape(sc.shape[0], -1)).all(axis=1))
        raise ValueError(
            f"{fn}: {name} (shape {series.shape}) has non-finite values at checkpoints {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}; a non-finite series never settles"
        )
    within = distance_to_final(series, scale) <= tol
    stays = jnp.flip(jnp.cumprod(jnp.flip(within).astype(jnp.int32))).astype(bool)
    dtype = steps.dtype if jnp.issubdtype(steps.dtype, jnp.floating) else jnp.result_type(float)
    return jnp.where(jnp.all(jnp.isfinite(series)), steps[jnp.argmax(stays)].astype(dtype), jnp.nan)


settling_steps = settling_step


class FrameBeforePrecision(NamedTuple):
    """Settling steps of attention (the frame) and of the values (the precision) in one run.

    Attributes:
      attention_step: :func:`settling_step` of the attention snapshots (floating; NaN: never).
      value_step: :func:`settling_step` of the values.
      lag: value_step - attention_step (> 0: frame before precision).
    """

    attention_step: jax.Array
    value_step: jax.Array
    lag: jax.Array


def frame_before_precision(
    checkpoint_steps, attention_series, value_series, tol: float = 0.1, value_tol=None, scale: str | None = "change"
) -> FrameBeforePrecision:
    """When attention settles versus when the values settle (the paper's "frame before precision").

    Both settling steps are :func:`settling_step` with the same ``scale``. The default, ``"change"``,
    asks when each has covered all but ``tol`` of its total change over the run: attention starts
    near the uniform causal pattern, whose norm dwarfs what training changes, so a tolerance relative
    to the final attention would call it settled at step 0.

    Args:
      checkpoint_steps: (K,) steps of the checkpoints (include the final state as the last one).
      attention_series: (K, ...) attention at each checkpoint, e.g. ``snapshots(...).alpha``.
      value_series: (K, ...) the values at each checkpoint, e.g. ``snapshots(...).values``.
      tol: tolerance for attention; ``value_tol`` for the values (default: ``tol``).
      scale: ``"change"`` (default), ``"final"`` or ``None``, as in :func:`distance_to_final`.
    Returns:
      :class:`FrameBeforePrecision`; vmap over seeds for many runs. A non-finite series never
      settles (see :func:`settling_step`): a ValueError eagerly, NaN steps (and lag) when traced.
    """
    value_tol = tol if value_tol is None else value_tol
    a = _settling_step(checkpoint_steps, attention_series, tol, scale, "attention_series", "frame_before_precision")
    v = _settling_step(checkpoint_steps, value_series, value_tol, scale, "value_series", "frame_before_precision")
    return FrameBeforePrecision(attention_step=a, value_step=v, lag=v - a)
