"""The laws evaluated over blocks of query rows: exact, causal, and never N x N.

Every row of alpha, b and dL/ds belongs to one query, and the output error of query i needs only
its own context g_i. So a block of query rows R = r0:r1 (:class:`gradattn.grads._rows.RowBlocks`) runs the
forward pass *and* every law for its rows in one go, against the keys it can see (0:r1 when causal,
0:N otherwise), keeping only (|R| x keys) matrices alive. Because every query's row is whole inside
its block, no online softmax is needed: each block is the dense law restricted to its rows, and the
sums over query blocks are exact.

The correspondence with the named laws of :mod:`gradattn.laws`, block by block, with alpha_R kept
as P_R / l (P_R = exp(S_R - rowmax), l = rowsum P_R)::

    blocked form (this module)                        named law (gradattn.laws)        how
    E_R = output_error_rows(Z_R, y_R, w_R)            output_error                     called
    U_R = E_R W_O^T                                   upstream_grad                    same product
    b_R = compatibility(U_R, V)                       compatibility                    called
    dS_R = routing_grad_block(P_R, 1/l, b_R, U_R, G_R) routing_grad(alpha_R, b_R)      identity (1)
    dQ_R = query_grad(dS_R, K)                        query_grad                       called
    dK^T += key_grad_block_t(Q_R^T / sqrt(d_k), dS_R)  key_grad(dS_R, Q_R)^T           transposed (2)
    dV^T += value_grad_block_t(W_O, E_R, 1/l, P_R)     value_grad(alpha_R, U_R)^T      transposed (2)
    dW_O += output_weight_grad(G_R, E_R)              output_weight_grad               called
    dW_Q, dW_K, dW_V = X^T [dQ, dK, dV]               projection_grads                 same products (3)

(1) sum_k alpha_ik b_ik = u_i . sum_k alpha_ik v_k = u_i . g_i: a dot of two d_v-vectors instead of
a second reduction over the block. (2) The key and value accumulators are kept transposed, (d, N),
so both products contract the block's rows as the inner index of a plain matrix product (the
untransposed form makes XLA:CPU contract the leading axis of the large operand, a slower path), and
alpha_R is never stored: every law uses it linearly, so 1/l goes onto the small (|R|, d) factors.
(3) X^T is built once as its own (d_in, N) array (:func:`materialised_transpose`, as are Q^T and
the value law's (C, |R|) factor), so that every product has a plain left operand: written as
``x.T @ dq``, XLA:CPU folds the transpose into the product and runs it on its general dot path,
several times slower for these thin shapes, and the weight products lie on the serial tail of
every training step.

(4) When the head has fewer classes than value dimensions (C < d_v; the paper's head has C = 8,
d_v = 15), the pass attends over M = V W_O (N, C) instead of V, which gives the logits directly,
Z_R = P_R M / l. The laws are the same products re-associated (:func:`attends_through_output`)::

    b_R = U_R V^T = E_R M^T                           compatibility(U_R, V)            associativity
    sum_k alpha_ik b_ik = e_i . z_i                   (identity (1) in M's coordinates)
    A^T += output_value_grad_block_t(E_R, 1/l, P_R)   A = alpha^T E (N, C)
    dV = A W_O^T                                      value_grad(alpha, U)             associativity
    dW_O = V^T A = W_V^T (X^T A)                      output_weight_grad(G, E)         associativity
    dW_V = X^T dV = (X^T A) W_O^T                     projection_grads                 associativity

so three of the six products over each (|R| x keys) block are C wide instead of d_v wide (the
step does 28% less arithmetic at the paper's sizes). Otherwise it attends over V as in the table.
``tests/test_blocked.py`` checks each blocked form against its named law on a block, and the pass
in both forms against autodiff.

:func:`loss_fn` is the loss with a ``jax.custom_vjp`` whose forward rule runs the fused pass once
and keeps dQ, dK, dV, dW_O and the per-token losses as residuals, so ``jax.value_and_grad(loss_fn)``
costs one pass (the backward rule only multiplies those by X or by the weights), while ``loss_fn``
alone runs the forward half of the pass.

Under ``vmap`` over many seeds, groups of :func:`seed_group` seeds run in turn
(:func:`gradattn._vmap.grouped_vmap`) so that the working set stays in cache; the block size, the
blocks in flight and the seed groups are per-backend choices (:mod:`gradattn._backend`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradattn._backend import backend_choices
from gradattn._checks import check_bool, check_head_inputs, check_int
from gradattn._vmap import grouped_vmap
from gradattn.grads import BlockedPass
from gradattn.grads._rows import RowBlocks, default_block_size, masked_scores, query_blocks
from gradattn.head import HeadParams, normalised_weights, token_losses
from gradattn.laws import compatibility, output_error_rows, output_weight_grad, query_grad

__all__ = [
    "BlockedPass",
    "attends_through_output",
    "blocked_loss",
    "blocked_loss_and_grads",
    "blocked_pass",
    "default_block_size",
    "input_grad",
    "key_grad_block_t",
    "loss_fn",
    "materialised_transpose",
    "output_value_grad_block_t",
    "query_blocks",
    "routing_grad_block",
    "seed_group",
    "value_grad_block_t",
    "weight_grad",
]


# ---------------------------------------------------------------------------------------------
# The three laws written in their blocked forms (each equal to its named law on a block)
# ---------------------------------------------------------------------------------------------


def routing_grad_block(exp_scores, inv_rowsum, b, u, g):
    """dS_R (|R|, keys) = P_R * (b_R - rowdot(U_R, G_R)) / l: ``laws.routing_grad(P_R / l, b_R)``.

    ``exp_scores`` P_R (|R|, keys), ``inv_rowsum`` 1/l (|R|, 1), ``b`` (|R|, keys), ``u`` U_R and
    ``g`` G_R (|R|, d_v), using sum_k alpha_ik b_ik = u_i . g_i.
    """
    return exp_scores * ((b - jnp.sum(u * g, axis=-1, keepdims=True)) * inv_rowsum)


def key_grad_block_t(q_t_scaled, ds):
    """(d_k, keys) = (Q_R / sqrt(d_k))^T dS_R: ``laws.key_grad(dS_R, Q_R).T`` for keys 0:keys.

    ``q_t_scaled`` is Q_R^T / sqrt(d_k) (d_k, |R|), built as its own product (see :func:`_projections`).
    """
    return q_t_scaled @ ds


def value_grad_block_t(w_o, e, inv_rowsum, exp_scores):
    """(d_v, keys) = (U_R / l)^T P_R with U_R = E_R W_O^T: ``laws.value_grad(P_R / l, U_R).T``.

    U_R^T is formed as the product W_O E_R^T (not a transpose of U_R, which XLA would fold back into
    the dot and run on its slow path).
    """
    return (w_o @ e.T) * inv_rowsum.T @ exp_scores


def output_value_grad_block_t(e, inv_rowsum, exp_scores):
    """(C, keys) = (E_R / l)^T P_R = (alpha_R^T E_R)^T: the value law before its factor W_O^T, since
    ``laws.value_grad(alpha_R, E_R W_O^T) = (alpha_R^T E_R) W_O^T`` (used when C < d_v; see
    :func:`attends_through_output`). The (C, |R|) factor is its own array
    (:func:`materialised_transpose`), so that the block product is a plain one."""
    return materialised_transpose(e * inv_rowsum) @ exp_scores


def materialised_transpose(a: jax.Array) -> jax.Array:
    """``a.T`` (n, m) for a (m, n) array, computed as the product I_n a^T so that XLA keeps it as an array.

    A plain ``a.T`` feeding a matrix product is folded by XLA into that product as a contraction
    over the leading axis of its left operand, which XLA:CPU runs on its general dot path (for the
    thin products of this module, 3-8x slower than the path it takes for a plain left operand). The
    identity product is exact for finite ``a`` (each entry is 1 * a_ji plus zeros) and costs n^2 m
    multiply-adds, small for the widths it is used at (n <= d_in).
    """
    return jnp.eye(a.shape[1], dtype=a.dtype) @ a.T


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def _projections(params: HeadParams, x: jax.Array, weights):
    """Q / sqrt(d_k), K, V (N, d), the same scaled Q as a (d_k, N) array (the key law needs Q_R^T
    as a left operand), and w_i / sum w (N,)."""
    scale = 1.0 / jnp.sqrt(jnp.asarray(params.w_q.shape[1], x.dtype))
    q = (x @ params.w_q) * scale
    return q, materialised_transpose(q), x @ params.w_k, x @ params.w_v, normalised_weights(weights, x.shape[0], x.dtype)


def seed_group(n: int, block_size: int | None = None) -> int | None:
    """How many vmapped sequences (seeds) share one pass: about the backend's ``seed_group_bytes``
    of scores per block (CPU: 2 MB, so N = 127 gives 32 seeds and N = 1999 one). ``None`` where the
    backend does not group (every seed in one vmap)."""
    budget = backend_choices().seed_group_bytes
    if budget is None:
        return None
    rows = min(n, block_size or default_block_size(n))
    return max(1, budget // (4 * rows * n))


def _in_seed_groups(fn, causal: bool, block_size, n: int):
    """``fn(params, x, y, weights)`` with the static arguments closed over, batched in seed groups."""
    return grouped_vmap(lambda params, x, y, weights: fn(params, x, y, weights, causal, block_size),
                        seed_group(n, block_size))


def _check_block_size(block_size, fn: str):
    return None if block_size is None else check_int("block_size", block_size, fn)


def blocked_pass(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True,
                 block_size: int | None = None) -> BlockedPass:
    """The loss and dL/dQ, dL/dK, dL/dV, dL/dW_O of one sequence in one fused blocked pass.

    Shapes: x (N, d_in), y (N,), weights (N,) or None. No array larger than ``block_size x N``
    is built. Per block of query rows R with visible keys 0:keys (the table in the module
    docstring)::

        [P_R V, l] = P_R [V, 1]                     (l = rowsum P_R from the same product)
        G_R = (P_R V) / l                           b_R = U_R V^T            (laws.compatibility)
        dS_R = P_R * (b_R - rowdot(U_R, G_R)) / l   (routing law)
        dQ_R = dS_R K / sqrt(d_k)                                            (laws.query_grad)
        dK^T[:, :keys] += (Q_R / sqrt(d_k))^T dS_R  (key law, transposed)
        dV^T[:, :keys] += (U_R / l)^T P_R           (value law, transposed)

    with V replaced by V W_O and U_R by E_R when C < d_v (:func:`attends_through_output`).
    """
    n, *_ = check_head_inputs(params, x, y, weights, fn="blocked_pass")
    block_size = _check_block_size(block_size, "blocked_pass")
    causal = check_bool("causal", causal, "blocked_pass")
    return _blocked_pass_unchecked(params, x, y, weights, causal, block_size)


def _blocked_pass_unchecked(params, x, y, weights=None, causal=True, block_size=None) -> BlockedPass:
    """:func:`blocked_pass` for input already validated."""
    return _in_seed_groups(_blocked_pass, causal, block_size, x.shape[0])(params, x, y, weights)


def attends_through_output(params: HeadParams) -> bool:
    """Whether the blocked pass attends over V W_O (N, C) instead of V (N, d_v): when C < d_v.

    z_i = g_i W_O = sum_j alpha_ij (v_j W_O), so the pass may carry the values already mapped to
    the logits. Every law is then the same product re-associated: b_ij = u_i . v_j = e_i . (v_j W_O),
    sum_k alpha_ik b_ik = e_i . z_i, dL/dV = (alpha^T E) W_O^T and dL/dW_O = V^T (alpha^T E). The
    three products of width d_v over the (|R|, keys) blocks become products of width C (the head
    of the paper: 8 instead of 15), and the value accumulator holds alpha^T E (N, C).
    """
    return params.w_o.shape[1] < params.w_v.shape[1]


class _Sums(NamedTuple):
    """What the loop over query blocks accumulates (see :func:`_pass_sums`)."""

    loss: jax.Array
    token_losses: jax.Array
    dq: jax.Array  # (N, d_k)
    dk_t: jax.Array  # (d_k, N)
    dm_t: jax.Array  # (C, N) alpha^T E through the output, else (d_v, N) dL/dV; transposed
    dw_o: jax.Array  # accumulated over blocks when attending over V; zero (unused) through the output
    v: jax.Array


def _blocked_pass(params, x, y, weights, causal, block_size) -> BlockedPass:
    sums = _pass_sums(params, x, y, weights, causal, block_size)
    if attends_through_output(params):  # dL/dV = (alpha^T E) W_O^T and dL/dW_O = V^T (alpha^T E)
        dv, dw_o = (params.w_o @ sums.dm_t).T, (sums.dm_t @ sums.v).T
    else:
        dv, dw_o = sums.dm_t.T, sums.dw_o
    return BlockedPass(loss=sums.loss, token_losses=sums.token_losses, dq=sums.dq, dk=sums.dk_t.T, dv=dv, dw_o=dw_o)


def _pass_sums(params, x, y, weights, causal, block_size) -> _Sums:
    n = x.shape[0]
    q, q_t, k, v, w = _projections(params, x, weights)
    d_k = k.shape[1]
    through_output = attends_through_output(params)
    # M, what the queries attend over: V W_O (N, C) or V (N, d_v); [M, 1] so that one product over
    # P gives both P M and l = rowsum P.
    m = v @ params.w_o if through_output else v
    width = m.shape[1]
    m_and_ones = jnp.concatenate([m, jnp.ones((n, 1), m.dtype)], axis=1)
    dk_t = jnp.zeros((d_k, n), x.dtype)
    dm_t = jnp.zeros((width, n), x.dtype)  # alpha^T E (through the output) or alpha^T U = dL/dV, transposed
    dw_o = jnp.zeros_like(params.w_o)
    ce_blocks, dq_blocks = [], []
    blocks = RowBlocks(n, block_size, causal)
    for blk in blocks:
        r0, r1, keys = blk.start, blk.stop, blk.keys
        q, k, m = blocks.gate(blk, (q, k, m))
        k_r, m_r = k[:keys], m[:keys]
        s_r = masked_scores(q[r0:r1], k_r, r0, causal)
        exp_s = jnp.exp(s_r - jnp.max(s_r, axis=-1, keepdims=True))
        attended_and_rowsum = exp_s @ m_and_ones[:keys]
        inv_rowsum = 1.0 / attended_and_rowsum[:, width:]
        attended = attended_and_rowsum[:, :width] * inv_rowsum  # z_R (through the output) or G_R
        z = attended if through_output else attended @ params.w_o
        ce_blocks.append(token_losses(z, y[r0:r1]))
        e = output_error_rows(z, y[r0:r1], w[r0:r1])
        # The error in M's coordinates: E_R itself, or U_R = E_R W_O^T. Then b_R = F_R M^T and
        # sum_k alpha_ik b_ik = f_i . (attended)_i either way.
        f = e if through_output else e @ params.w_o.T
        ds = routing_grad_block(exp_s, inv_rowsum, compatibility(f, m_r), f, attended)
        dq_blocks.append(query_grad(ds, k_r))
        dk_t = dk_t.at[:, :keys].add(key_grad_block_t(q_t[:, r0:r1], ds))
        if through_output:
            dm_t = dm_t.at[:, :keys].add(output_value_grad_block_t(e, inv_rowsum, exp_s))
        else:
            dm_t = dm_t.at[:, :keys].add(value_grad_block_t(params.w_o, e, inv_rowsum, exp_s))
            dw_o = dw_o + output_weight_grad(attended, e)
        blocks.finish(blk, dk_t[0, 0], dm_t[0, 0], dw_o[0, 0], dq_blocks[-1][0, 0], ce_blocks[-1][0])
    ce = jnp.concatenate(ce_blocks)
    return _Sums(loss=jnp.sum(w * ce), token_losses=ce, dq=jnp.concatenate(dq_blocks), dk_t=dk_t, dm_t=dm_t, dw_o=dw_o,
                 v=v)


def blocked_loss(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True,
                 block_size: int | None = None) -> jax.Array:
    """The loss L alone, by the forward half of the blocked pass (no N x N buffer)."""
    check_head_inputs(params, x, y, weights, fn="blocked_loss")
    block_size = _check_block_size(block_size, "blocked_loss")
    causal = check_bool("causal", causal, "blocked_loss")
    return _blocked_loss_unchecked(params, x, y, weights, causal, block_size)


def _blocked_loss_unchecked(params, x, y, weights=None, causal=True, block_size=None) -> jax.Array:
    """:func:`blocked_loss` for input already validated."""
    return _in_seed_groups(_blocked_loss, causal, block_size, x.shape[0])(params, x, y, weights)


def _blocked_loss(params, x, y, weights, causal, block_size) -> jax.Array:
    n = x.shape[0]
    q, _, k, v, w = _projections(params, x, weights)
    through_output = attends_through_output(params)
    m = v @ params.w_o if through_output else v  # as in the pass: z_R = P_R (V W_O) / l when C < d_v
    ce_blocks = []
    blocks = RowBlocks(n, block_size, causal)
    for blk in blocks:
        r0, r1, keys = blk.start, blk.stop, blk.keys
        q, k, m = blocks.gate(blk, (q, k, m))
        s_r = masked_scores(q[r0:r1], k[:keys], r0, causal)
        exp_s = jnp.exp(s_r - jnp.max(s_r, axis=-1, keepdims=True))
        attended = (exp_s @ m[:keys]) * (1.0 / jnp.sum(exp_s, axis=-1, keepdims=True))
        ce_blocks.append(token_losses(attended if through_output else attended @ params.w_o, y[r0:r1]))
        blocks.finish(blk, ce_blocks[-1][0])
    return jnp.sum(w * jnp.concatenate(ce_blocks))


def blocked_loss_and_grads(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True,
                           block_size: int | None = None) -> tuple[jax.Array, HeadParams]:
    """``(L, dL/dparams)`` from the laws in one fused blocked pass (no autodiff inside).

    Args:
      params: HeadParams with w_q, w_k (d_in, d_k), w_v (d_in, d_v), w_o (d_v, C).
      x: (N, d_in) inputs.   y: (N,) integer targets.   weights: optional (N,) non-negative.
      causal: mask keys j > i (and skip future key blocks).
      block_size: query rows per block (static; default :func:`default_block_size`). Any N works,
        including N < block_size.
    Returns:
      scalar loss and a HeadParams of gradients, in the dtype of the inputs.
    """
    check_head_inputs(params, x, y, weights, fn="blocked_loss_and_grads")
    block_size = _check_block_size(block_size, "blocked_loss_and_grads")
    causal = check_bool("causal", causal, "blocked_loss_and_grads")
    return _blocked_loss_and_grads_unchecked(params, x, y, weights, causal, block_size)


def _blocked_loss_and_grads_unchecked(params, x, y, weights=None, causal=True, block_size=None):
    """:func:`blocked_loss_and_grads` for input already validated."""
    return _in_seed_groups(_blocked_loss_and_grads, causal, block_size, x.shape[0])(params, x, y, weights)


def _blocked_loss_and_grads(params, x, y, weights, causal, block_size):
    """The pass, then ``laws.projection_grads`` with X^T as a left operand (note (3) of the module
    docstring), and through the output dL/dW_V = (X^T A) W_O^T, dL/dW_O = W_V^T (X^T A)."""
    sums = _pass_sums(params, x, y, weights, causal, block_size)
    x_t = materialised_transpose(x)
    grad_q, grad_k = x_t @ sums.dq, x_t @ sums.dk_t.T
    if attends_through_output(params):
        x_t_a = x_t @ sums.dm_t.T  # X^T alpha^T E (d_in, C)
        return sums.loss, HeadParams(w_q=grad_q, w_k=grad_k, w_v=x_t_a @ params.w_o.T, w_o=params.w_v.T @ x_t_a)
    return sums.loss, HeadParams(w_q=grad_q, w_k=grad_k, w_v=x_t @ sums.dm_t.T, w_o=sums.dw_o)


# ---------------------------------------------------------------------------------------------
# loss_fn: the loss whose reverse rule is the blocked pass
# ---------------------------------------------------------------------------------------------


def input_grad(params: HeadParams, dq: jax.Array, dk: jax.Array, dv: jax.Array) -> jax.Array:
    """dL/dX (N, d_in) = dL/dQ W_Q^T + dL/dK W_K^T + dL/dV W_V^T (q_i, k_i, v_i all read x_i)."""
    return dq @ params.w_q.T + dk @ params.w_k.T + dv @ params.w_v.T


def weight_grad(token_ce: jax.Array, loss: jax.Array, weights) -> jax.Array:
    """dL/dw (N,) = (CE_i - L) / sum_k w_k, since L = sum_i w_i CE_i / sum_k w_k."""
    return (token_ce - loss) / jnp.sum(jnp.asarray(weights, token_ce.dtype))


def loss_fn(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True,
            block_size: int | None = None) -> jax.Array:
    """Weighted mean cross-entropy (nats) of the head on one sequence, fast to differentiate.

    Evaluated alone it runs the forward half of the blocked pass, which never builds an N x N
    matrix. Its reverse-mode rule is a ``jax.custom_vjp`` whose forward step runs the fused blocked
    pass once and keeps dL/dQ, dL/dK, dL/dV, dL/dW_O and the per-token losses, so ``jax.grad`` /
    ``jax.value_and_grad`` (w.r.t. params, x or weights) cost one pass and match
    ``jax.grad(dense_loss)``. Works under ``jit`` and ``vmap``, and reverse-over-reverse
    (``jax.jacrev(jax.grad(...))``); forward mode (``jax.jvp``, ``jax.hessian``) is not defined for
    a custom VJP: differentiate :func:`gradattn.head.dense_loss` for that.

    Args:
      params: HeadParams.
      x: (N, d_in) inputs.
      y: (N,) integer targets in [0, C).
      weights: optional (N,) non-negative position weights (default: all 1, the mean).
      causal: mask keys j > i.
      block_size: query rows per block (default :func:`default_block_size`).
    Returns:
      scalar loss, in the dtype of ``x``/``params``.
    """
    check_head_inputs(params, x, y, weights, fn="loss_fn")
    block_size = _check_block_size(block_size, "loss_fn")
    return _loss_with_blocked_vjp(params, x, y, weights, check_bool("causal", causal, "loss_fn"), block_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _loss_with_blocked_vjp(params, x, y, weights, causal, block_size):
    return _blocked_loss_unchecked(params, x, y, weights, causal, block_size)


def _vjp_forward(params, x, y, weights, causal, block_size):
    fused = _blocked_pass_unchecked(params, x, y, weights, causal, block_size)
    return fused.loss, (params, x, weights, fused)


def _cotangent_like(a, ct):
    """The cotangent of an input: ``None`` (zero) for integer arrays, ``ct`` cast to a's dtype otherwise."""
    return ct.astype(jnp.result_type(a)) if jnp.issubdtype(jnp.result_type(a), jnp.inexact) else None


def _vjp_backward(causal, block_size, residuals, ct):
    params, x, weights, fused = residuals
    x_t = materialised_transpose(x)  # note (3) of the module docstring
    grads = HeadParams(w_q=x_t @ fused.dq, w_k=x_t @ fused.dk, w_v=x_t @ fused.dv, w_o=fused.dw_o)
    d_params = jax.tree.map(lambda a: ct * a, grads)
    d_x = ct * input_grad(params, fused.dq, fused.dk, fused.dv)
    d_weights = None if weights is None else _cotangent_like(weights, ct * weight_grad(fused.token_losses, fused.loss, weights))
    return d_params, d_x, None, d_weights


_loss_with_blocked_vjp.defvjp(_vjp_forward, _vjp_backward)
