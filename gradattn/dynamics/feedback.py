"""The positive feedback loop along training, measured over blocks of query rows.

Does the sign of the advantage a_ij predict the sign of Delta alpha_ij after a step? Does each value
move against the responsibility-weighted error sum_i alpha_ij u_i of the queries that use it?
:func:`feedback_probe` has the ``probe(state_before, state_after, x, y)`` signature of
:func:`gradattn.training.train`, so a vmapped sweep records it at every checkpoint of every seed.
Nothing here builds an N x N matrix; :func:`snapshots` recomputes attention, values and contexts
from recorded parameters afterwards.
"""

# No `from __future__ import annotations` here: the NamedTuples' field annotations must be objects,
# not strings, for pdoc to resolve them (their generated __new__ has no module to look names up in).
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import _shape, check_head_inputs, check_int, check_params, concrete
from gradattn._math import entropy_bits
from gradattn.grads._rows import RowBlocks, causal_visible, masked_scores
from gradattn.head import HeadParams, normalised_weights, token_losses
from gradattn.laws import advantage, compatibility, output_error_rows, value_grad

__all__ = ["FeedbackRecord", "Snapshots", "StepFeedback", "feedback_probe", "feedback_stats", "make_feedback_probe",
           "snapshots", "step_feedback"]


def _attention_rows(q_r, k, r0: int, causal: bool):
    """alpha for query rows r0:r0+|R| against keys ``k`` (|R|, len(k)): the blocked pass's masked scores."""
    return jax.nn.softmax(masked_scores(q_r / jnp.sqrt(jnp.asarray(k.shape[1], k.dtype)), k, r0, causal), axis=-1)


class StepFeedback(NamedTuple):
    """Feedback-loop statistics of one step theta -> theta' (a pytree of scalars): what
    :func:`feedback_stats` returns, and :func:`step_feedback` (for the deep model, one per head).

    Attributes:
      entropy_bits: mean over queries of -sum_j alpha_ij log2 alpha_ij, before the step.
      sign_agreement: over the entries (i, j) that can move (j <= i when causal, i with at least two
        visible keys, alpha_ij > 0, a_ij != 0), the fraction with sign(a_ij) = sign(Delta alpha_ij),
        where a is the advantage before the step and Delta alpha = alpha(theta') - alpha(theta).
      sign_agreement_weighted: the same, each entry weighted by alpha_ij (the routing mass it carries).
      value_alignment: mean over positions j of cos(Delta v_j, -dL/dv_j), where
        dL/dv_j = sum_i alpha_ij u_i is the responsibility-weighted error and Delta v_j = v_j(theta')
        - v_j(theta) is the measured move of value j.
      value_alignment_weighted: the same mean weighted by ||dL/dv_j|| (values that carry error count
        more), equal to sum_j (Delta v_j . -dL/dv_j / ||Delta v_j||) / sum_j ||dL/dv_j||.
    """

    entropy_bits: jax.Array
    sign_agreement: jax.Array
    sign_agreement_weighted: jax.Array
    value_alignment: jax.Array
    value_alignment_weighted: jax.Array


def _sign_sums(a0, adv, a1, r0: int, n: int, causal: bool):
    """Over query rows r0.. of alpha before (a0) and after (a1): the movable entries' counts
    ``(agreeing, movable, agreeing mass, movable mass)`` (movable: visible, at least two visible
    keys, alpha_ij > 0, a_ij != 0)."""
    rows, keys = a0.shape
    visible = causal_visible(rows, keys, r0) if causal else jnp.ones_like(a0, bool)
    n_keys = (r0 + jnp.arange(rows) + 1) if causal else jnp.full((rows,), n)
    ok = visible & (a0 > 0) & (adv != 0) & (n_keys[:, None] > 1)
    hit = ok & (jnp.sign(adv) == jnp.sign(a1 - a0))
    return (jnp.sum(hit), jnp.sum(ok), jnp.sum(jnp.where(hit, a0, 0.0)), jnp.sum(jnp.where(ok, a0, 0.0)))


def _feedback(sums, entropy_sum, n: int, value_grads, delta_v) -> StepFeedback:
    """The ratios of :class:`StepFeedback` from the accumulated sign sums and entropy, and the
    value law's dL/dv_j (N, d_v) against the measured moves Delta v_j (N, d_v)."""
    agree, count, agree_w, mass = sums
    dv_norm = jnp.linalg.norm(value_grads, axis=-1)
    mv_norm = jnp.linalg.norm(delta_v, axis=-1)
    valid = (dv_norm > 0) & (mv_norm > 0)
    cos = jnp.where(valid, -jnp.sum(delta_v * value_grads, axis=-1) / jnp.where(valid, dv_norm * mv_norm, 1.0), 0.0)
    total = jnp.sum(dv_norm)
    return StepFeedback(
        entropy_bits=entropy_sum / n,
        sign_agreement=agree / jnp.maximum(count, 1),
        sign_agreement_weighted=agree_w / jnp.where(mass > 0, mass, 1.0),
        value_alignment=jnp.sum(cos) / jnp.maximum(jnp.sum(valid), 1),
        value_alignment_weighted=jnp.sum(cos * dv_norm) / jnp.where(total > 0, total, 1.0),
    )


def step_feedback(alpha0, adv, alpha1, value_grads, v0, v1, causal: bool = True) -> StepFeedback:
    """The feedback statistics of one step from whole matrices: alpha before and after (N, N), the
    advantage a (N, N) before, the value law's dL/dv (N, d_v) and the values before and after.

    The dense form of :func:`feedback_stats` (the same sums, over one block of all N rows); the deep
    model applies it to every head, with u^h from the whole network. Pure; vmap it over heads.
    """
    n = alpha0.shape[0]
    sums = _sign_sums(alpha0, adv, alpha1, 0, n, causal)
    return _feedback(sums, jnp.sum(entropy_bits(alpha0)), n, value_grads, v1 - v0)


def feedback_stats(
    params_before: HeadParams,
    params_after: HeadParams,
    x: jax.Array,
    y: jax.Array,
    weights=None,
    causal: bool = True,
    block_size: int | None = None,
) -> StepFeedback:
    """The feedback-loop statistics of the step ``params_before -> params_after`` (docs/theory.md).

    The routing law says dL/ds_ij = -alpha_ij a_ij, so a step raises s_ij, and to first order alpha_ij,
    where the advantage a_ij > 0 (for a step on the scores themselves; through W_Q, W_K the frame
    couples the entries, which is what makes the agreement an empirical question). The value law
    says Delta v_j = -eta sum_i alpha_ij u_i for a step on the values themselves; through W_V the
    input Gram matrix couples them. See :class:`StepFeedback` for the exact definitions.

    Works over static blocks of ``block_size`` query rows (default: the blocked pass's
    :func:`gradattn.grads.blocked.default_block_size`): no N x N matrix is ever built, so it is cheap
    enough to run inside a vmapped training scan. Shapes: x (N, d_in), y (N,).
    """
    return _loss_and_feedback(params_before, params_after, x, y, weights, causal, block_size)[1]


def _loss_and_feedback(params_before, params_after, x, y, weights, causal, block_size):
    """``(loss, stats)``: L(theta) before the step, computed block by block with the statistics, and
    :func:`feedback_stats`."""
    n, *_ = check_head_inputs(params_before, x, y, weights, fn="feedback_stats")
    check_head_inputs(params_after, x, y, weights, fn="feedback_stats")
    shapes_before = [np.shape(a) for a in params_before]
    shapes_after = [np.shape(a) for a in params_after]
    if shapes_before != shapes_after:
        raise ValueError(
            f"feedback_stats: params_before and params_after must have the same shapes, got {shapes_before} and {shapes_after}"
        )
    block_size = None if block_size is None else check_int("block_size", block_size, "feedback_stats")
    dt = x.dtype
    w = normalised_weights(weights, n, dt)
    q0, k0, v0 = x @ params_before.w_q, x @ params_before.w_k, x @ params_before.w_v
    q1, k1 = x @ params_after.w_q, x @ params_after.w_k
    v_after = x @ params_after.w_v

    zero = jnp.zeros((), dt)
    sums = (zero, zero, zero, zero)
    loss = ent = zero
    dv = jnp.zeros_like(v0)
    blocks = RowBlocks(n, block_size, causal)
    for blk in blocks:
        r0, r1, keys = blk.start, blk.stop, blk.keys
        q0, k0, v0, q1, k1 = blocks.gate(blk, (q0, k0, v0, q1, k1))
        a0 = _attention_rows(q0[r0:r1], k0[:keys], r0, causal)
        a1 = _attention_rows(q1[r0:r1], k1[:keys], r0, causal)
        z = (a0 @ v0[:keys]) @ params_before.w_o
        yr = y[r0:r1]
        loss = loss + jnp.sum(w[r0:r1] * token_losses(z, yr))
        u = output_error_rows(z, yr, w[r0:r1]) @ params_before.w_o.T
        adv = advantage(a0, compatibility(u, v0[:keys]))
        sums = tuple(t + b for t, b in zip(sums, _sign_sums(a0, adv, a1, r0, n, causal)))
        ent = ent + jnp.sum(entropy_bits(a0))
        dv = dv.at[:keys].add(value_grad(a0, u))
        blocks.finish(blk, loss, ent)

    return loss, _feedback(sums, ent, n, dv, v_after - v0)


class FeedbackRecord(NamedTuple):
    """What :func:`feedback_probe` records at a checkpoint: the statistics, the parameters before the
    step (cheap: four small matrices), from which attention and values at that checkpoint can be
    recomputed afterwards (:func:`snapshots`), and the loss L(theta) before the step."""

    stats: StepFeedback
    params: HeadParams
    loss: jax.Array


def feedback_probe(state_before, state_after, x, y) -> FeedbackRecord:
    """A probe for :func:`gradattn.training.train`: ``probe(state_before, state_after, x, y)``.

    Records :func:`feedback_stats` of the checkpoint's step, and the parameters and the loss before
    it. Pure; runs inside the training scan and under vmap over seeds. For position weights or a
    non-causal head, use :func:`make_feedback_probe`.
    """
    return make_feedback_probe()(state_before, state_after, x, y)


def make_feedback_probe(weights=None, causal: bool = True, block_size: int | None = None):
    """A :func:`feedback_probe` with fixed position ``weights``, ``causal`` flag and row block size."""

    def probe(state_before, state_after, x, y) -> FeedbackRecord:
        loss, stats = _loss_and_feedback(state_before.params, state_after.params, x, y, weights, causal, block_size)
        return FeedbackRecord(stats=stats, params=state_before.params, loss=loss)

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


def snapshots(params_series: HeadParams, x: jax.Array, rows=None, causal: bool = True,
              block_size: int | None = None) -> Snapshots:
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
            f"got w_q of shape {_shape(getattr(params_series, 'w_q', None))}"
        )
    first = jax.tree.map(lambda a: a[0], params_series)
    check_params(first, "snapshots")
    block_size = None if block_size is None else check_int("block_size", block_size, "snapshots")
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
        blocks = RowBlocks(n, block_size, causal)
        for blk in blocks:
            q, k, v = blocks.gate(blk, (q, k, v))
            ctx.append(_attention_rows(q[blk.start:blk.stop], k[:blk.keys], blk.start, causal) @ v[:blk.keys])
            blocks.finish(blk, ctx[-1][0, 0])
        s = (q[rows] @ k.T) / jnp.sqrt(jnp.asarray(k.shape[1], k.dtype))
        if causal:
            s = jnp.where(causal_visible(rows.shape[0], n, query_positions=rows), s, -jnp.inf)
        return Snapshots(alpha=jax.nn.softmax(s, axis=-1), values=v, contexts=jnp.concatenate(ctx))

    return jax.lax.map(one, params_series)
