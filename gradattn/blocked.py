"""The laws of SPEC §2 evaluated over blocks of query rows: exact, causal, and never N x N.

Every row of alpha, b and dL/ds belongs to one query, and the output error of query i needs only
its own context g_i. So a block of query rows R = r0:r1 can run the forward pass *and* every law
for its rows in one go, against the keys it can see (0:r1 when causal, so key blocks in the future
are skipped; 0:N otherwise), keeping only (|R| x keys) matrices alive::

    S_R     = Q_R K^T / sqrt(d_k)            scores; only the diagonal (|R| x |R|) corner is masked
    alpha_R = softmax(S_R) = P_R / l         P_R = exp(S_R - rowmax), l = rowsum(P_R)
    G_R     = alpha_R V                      contexts            Z_R = G_R W_O   logits
    E_R     = w_R (softmax(Z_R) - onehot(y_R)) / sum w          output error     (laws.output_error)
    U_R     = E_R W_O^T                      upstream gradient                   (laws.upstream_grad)
    dW_O   += G_R^T E_R                                                          (laws.output_weight_grad)
    b_R     = U_R V^T                        compatibility                       (laws.compatibility)
    dS_R    = alpha_R (b_R - rowdot(U_R, G_R))   ROUTING LAW (laws.routing_grad), by the identity
                                             sum_k alpha_ik b_ik = u_i . sum_k alpha_ik v_k = u_i . g_i
    dQ_R    = dS_R K / sqrt(d_k)                                                 (laws.query_grad)
    dK     += dS_R^T Q_R / sqrt(d_k)         keys 0:end only                     (laws.key_grad)
    dV     += alpha_R^T U_R                  VALUE LAW, keys 0:end only          (laws.value_grad)

and at the end dW_Q = X^T dQ, dW_K = X^T dK, dW_V = X^T dV (laws.projection_grads). Because
every query's row is whole inside its block, no online softmax is needed: each block is the dense
law restricted to its rows, and the sums over query blocks are exact.

How this maps to :mod:`gradattn.laws`. ``compatibility``, ``query_grad``, ``output_weight_grad``
and ``projection_grads`` are called as they are, on blocks. Three laws are written here in an
equal form that XLA runs faster, and the tests check each against its law: the routing law uses
the identity above (a dot of two d_v-vectors instead of a second reduction over the block); the
key and value laws are accumulated *transposed*, dK^T += (Q_R / sqrt(d_k))^T dS_R and
dV^T += (U_R / l)^T P_R, because XLA:CPU runs dS_R^T Q_R (the large operand contracted over its
leading axis) on a path measured 3x slower; and alpha_R is never stored, since every law uses it
linearly: the row scale 1/l goes onto the small (|R|, d) factors.

Blocks are static Python slices (every shape is known at trace time), so XLA compiles one
straight-line program with at most ``block_size x N`` matrices, run at most
:data:`BLOCKS_IN_FLIGHT` blocks at a time (:func:`_after`), so that the live memory is that of a
few blocks, not of N x N (benchmarks/README.md has the figures per N). Compile time grows with the
number of blocks, hence :func:`default_block_size`. Under ``vmap`` over many seeds, chunks of
:func:`seed_chunk` seeds run in turn (:func:`_seeds_in_chunks`) so that the working set stays in cache.

The custom VJP of :func:`gradattn.head.loss_fn` lives here too (:func:`loss_with_blocked_vjp`):
its forward rule runs the fused pass once and keeps dQ, dK, dV, dW_O and the per-token losses as
residuals, so ``jax.value_and_grad(loss_fn)`` costs one pass (the backward rule only multiplies
those by X or by the weights), while ``loss_fn`` alone runs the forward half of the pass.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradattn._checks import check_head_inputs, check_int
from gradattn.head import HeadParams, normalised_weights, token_losses
from gradattn.laws import compatibility, output_weight_grad, projection_grads, query_grad

DEFAULT_BLOCK_SIZE = 256
"""Query rows per block up to N = 16 * 256 (benchmarks/README.md has the measurements)."""

MAX_BLOCKS = 16
"""Beyond N = 16 * DEFAULT_BLOCK_SIZE the default block grows so that there are at most this many
blocks: the blocks are unrolled at trace time, and compile time grows with their number."""


def default_block_size(n: int) -> int:
    """The default query-block size for a sequence of N positions.

    256 rows up to N = 4096 (a 256 x N block of scores: 2 MB at N = 1999); beyond that, the
    smallest multiple of 256 that covers N in ``MAX_BLOCKS`` blocks, so compile time stays bounded
    (N = 8192: 512 rows; N = 16384: 1024 rows, a 64 MB block). Measured on a 2-core CPU with
    three blocks in flight (ms per step; benchmarks/README.md): N = 1999: 128 rows 4.99, 256 3.92,
    384 4.68, 512 4.94; N = 4096: 16.8 / 15.7 / 18.6 / 20.0. With two in flight, N = 8192: 256 rows
    71 ms but 9 s to compile, 512 rows 79 ms and 3.7 s, 1024 rows 104 ms.
    """
    multiple = -(-n // (MAX_BLOCKS * DEFAULT_BLOCK_SIZE))
    return DEFAULT_BLOCK_SIZE * max(1, multiple)


class BlockedPass(NamedTuple):
    """What one fused pass returns: the loss and the gradient at every position (a pytree).

    Attributes:
      loss: scalar L.
      token_losses: (N,) CE_i = -log softmax(z_i)[y_i].
      dq: (N, d_k) dL/dQ.    dk: (N, d_k) dL/dK.    dv: (N, d_v) dL/dV.
      dw_o: (d_v, C) dL/dW_O.
    """

    loss: jax.Array
    token_losses: jax.Array
    dq: jax.Array
    dk: jax.Array
    dv: jax.Array
    dw_o: jax.Array


def query_blocks(n: int, block_size: int | None = None) -> list[tuple[int, int]]:
    """The static row ranges ``[(r0, r1), ...]`` that tile 0:n in blocks of ``block_size`` (last one shorter).

    ``None`` means :func:`default_block_size`.
    """
    if block_size is None:
        block_size = default_block_size(n)
    block_size = check_int("block_size", block_size, "query_blocks")
    return [(r0, min(r0 + block_size, n)) for r0 in range(0, n, block_size)]


def _masked_scores(q_r: jax.Array, k: jax.Array, r0: int, causal: bool) -> jax.Array:
    """S_R (|R|, end) = Q_R K^T / sqrt(d_k) for query rows r0:r0+|R|, future keys set to -inf.

    ``q_r`` arrives already divided by sqrt(d_k). When causal, ``k`` holds keys 0:r1, so only the
    last |R| columns (the diagonal block) can hold a future key. The mask is one elementwise
    ``where`` against two iotas over the whole block, which XLA fuses into a single pass with
    nothing read from memory but S_R; writing only the diagonal corner (``s.at[:, r0:r1].set``)
    made XLA:CPU copy the whole block, measured 10% slower per step at N = 1999.
    """
    s = q_r @ k.T
    if causal:
        rows = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0) + r0
        cols = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(cols <= rows, s, -jnp.inf)
    return s


def _unnormalised_attention(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(P, 1/l)``: P_ij = exp(s_ij - max_k s_ik) and l_i = sum_j P_ij, so alpha_ij = P_ij / l_i.

    alpha itself is never stored: every law uses it once, linearly, so the row scale 1/l_i is
    applied to the small (|R|, d) factors instead of to another (|R|, end) matrix.
    """
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return p, 1.0 / jnp.sum(p, axis=-1, keepdims=True)


def _projections(params: HeadParams, x: jax.Array, weights):
    """Q / sqrt(d_k), K, V (N, d), the same Q as a (d_k, N) array, and w_i / sum w (N,)."""
    scale = 1.0 / jnp.sqrt(jnp.asarray(params.w_q.shape[1], x.dtype))
    q = (x @ params.w_q) * scale
    # Q^T as its own product W_Q^T X^T (not a transpose of q, which XLA would fold back into the
    # dot below and then run that dot on its slow path): the key law needs Q_R^T as a left operand.
    q_t = (params.w_q.T @ x.T) * scale
    return q, q_t, x @ params.w_k, x @ params.w_v, normalised_weights(weights, x.shape[0], x.dtype)


BLOCKS_IN_FLIGHT = 3
"""How many query blocks XLA may run at once: block i waits for block i - BLOCKS_IN_FLIGHT.

Several blocks in flight let XLA:CPU overlap one block's small, single-threaded operations with
another's large ones on a 2-core machine. N = 1999, 256 rows, quiet machine (ms per step, medians
of 7 rounds, two runs): 1 → 5.58, 2 → 4.04 / 4.14, 3 → 3.77 / 3.86, 4 → 3.94, 6 → 4.17. The live
memory grows with it (XLA temporaries at N = 16384: 157 / 205 / 270 / 339 / 415 MB), far from
the 1.2 GB of all blocks at once."""


def _after(arrays, scalars):
    """``arrays`` unchanged in value, but computed after ``scalars``: a bound on blocks in flight.

    Without this, XLA:CPU schedules the unrolled blocks breadth first (every block's scores, then
    every block's exponentials, ...) and keeps all their (|R|, end) matrices alive, about N^2 floats:
    1.2 GB at N = 16384. ``jax.lax.optimization_barrier`` would say this, but XLA:CPU drops it
    before scheduling, so the order is written as a data dependence: adding 0 * (a value of an
    earlier block). XLA never folds 0 * s for floats (s may be NaN), and a NaN there means that
    block's result was NaN already.
    """
    zero = 0.0 * sum(scalars)
    return tuple(a + zero.astype(a.dtype) for a in arrays)


SEED_CHUNK_BYTES = 2 << 20
"""Under ``vmap``, seeds are processed this many bytes of (block x N) scores at a time."""


def seed_chunk(n: int, block_size: int | None = None) -> int:
    """How many vmapped sequences (seeds) share one pass: ~``SEED_CHUNK_BYTES`` of scores per block.

    N = 127: 32 seeds (a 127 x 127 block of scores is 64 kB); N = 1999: 1.
    """
    rows = min(n, block_size or default_block_size(n))
    return max(1, SEED_CHUNK_BYTES // (4 * rows * n))


def _seeds_in_chunks(fn, causal: bool, block_size, n: int):
    """``fn(params, x, y, weights)`` (closed over the static arguments) whose ``vmap`` over many seeds
    runs ``lax.map`` over chunks of :func:`seed_chunk` seeds, each chunk vmapped.

    Why: a plain vmap over S seeds makes every (block x N) matrix S times larger; past the caches
    that costs time per seed (measured at N = 127: 256 seeds, 2x slower per seed-step than 16).
    Chunks keep the working set of one chunk in cache. Values are identical; differentiation goes
    through the plain function (a ``custom_jvp`` whose rule is ``jax.jvp`` of it), so this changes
    only how a vmap is scheduled.
    """
    chunk = seed_chunk(n, block_size)

    def plain(params, x, y, weights):
        return fn(params, x, y, weights, causal, block_size)

    def vmap_rule(axis_size, in_batched, *args):
        leaves, tree = jax.tree.flatten(list(args))
        flags = jax.tree.leaves(list(in_batched))
        mapped = [a for a, b in zip(leaves, flags) if b]

        def on_mapped(*mapped_leaves):  # the unbatched leaves (shared by every seed) are closed over
            it = iter(mapped_leaves)
            return plain(*jax.tree.unflatten(tree, [next(it) if b else a for a, b in zip(leaves, flags)]))

        per_chunk = jax.vmap(on_mapped)
        if axis_size <= chunk:
            out = per_chunk(*mapped)
        else:
            full = axis_size - axis_size % chunk
            groups = [a[:full].reshape((full // chunk, chunk) + a.shape[1:]) for a in mapped]
            out = jax.lax.map(lambda g: per_chunk(*g), groups)
            out = jax.tree.map(lambda a: a.reshape((full,) + a.shape[2:]), out)
            if full < axis_size:
                rest = per_chunk(*[a[full:] for a in mapped])
                out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)
        return out, jax.tree.map(lambda _: True, out)

    chunked = jax.custom_batching.custom_vmap(plain)
    chunked.def_vmap(vmap_rule)
    with_jvp = jax.custom_jvp(lambda params, x, y, weights: chunked(params, x, y, weights))
    with_jvp.defjvp(lambda primals, tangents: jax.jvp(plain, primals, tangents))
    return with_jvp


def output_error_rows(z: jax.Array, y: jax.Array, w: jax.Array) -> jax.Array:
    """E_R (|R|, C): e_i = w_i (softmax(z_i) - onehot(y_i)) with w already divided by sum w (laws.output_error)."""
    return w[:, None] * (jax.nn.softmax(z, axis=-1) - jax.nn.one_hot(y, z.shape[1], dtype=z.dtype))


def blocked_pass(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True,
                 block_size: int | None = None) -> BlockedPass:
    """The loss and dL/dQ, dL/dK, dL/dV, dL/dW_O of one sequence in one fused blocked pass.

    Shapes: x (N, d_in), y (N,), weights (N,) or None. No array larger than ``block_size x N``
    is built. Per block of query rows R with visible keys 0:end (module docstring), alpha_R is kept
    as P_R / l (:func:`_unnormalised_attention`) and::

        [P_R V, l] = P_R [V, 1]                     (l = rowsum P_R from the same product)
        G_R = (P_R V) / l                           b_R = U_R V^T            (laws.compatibility)
        dS_R = P_R * (b_R - rowdot(U_R, G_R)) / l   (routing law)
        dQ_R = dS_R K / sqrt(d_k)                                            (laws.query_grad)
        dK^T[:, :end] += (Q_R / sqrt(d_k))^T dS_R   (key law, transposed)
        dV^T[:, :end] += (U_R / l)^T P_R            (value law, transposed)

    The two accumulators are kept transposed, (d, N), because then both products contract the
    block's rows as the *inner* index of a plain matrix product; written as dS_R^T Q_R they make
    XLA:CPU contract the leading axis of the large operand, which measured 3x slower.
    """
    n, *_ = check_head_inputs(params, x, y, weights, fn="blocked_pass")
    return _seeds_in_chunks(_blocked_pass, causal, block_size, n)(params, x, y, weights)


def _blocked_pass(params, x, y, weights, causal, block_size) -> BlockedPass:
    n = x.shape[0]
    q, q_t, k, v, w = _projections(params, x, weights)
    d_k, d_v = k.shape[1], v.shape[1]
    v1 = jnp.concatenate([v, jnp.ones((n, 1), v.dtype)], axis=1)  # P [V, 1] = [P V, rowsum P]: one pass over P
    dk_t = jnp.zeros((d_k, n), x.dtype)
    dv_t = jnp.zeros((d_v, n), x.dtype)
    dw_o = jnp.zeros_like(params.w_o)
    ce_blocks, dq_blocks, done = [], [], []  # done[i]: scalars that exist only once block i is finished
    for i, (r0, r1) in enumerate(query_blocks(n, block_size)):
        end = r1 if causal else n
        if i >= BLOCKS_IN_FLIGHT:
            q, k, v = _after((q, k, v), done[i - BLOCKS_IN_FLIGHT])
        k_r, v_r = k[:end], v[:end]
        s_r = _masked_scores(q[r0:r1], k_r, r0, causal)
        p = jnp.exp(s_r - jnp.max(s_r, axis=-1, keepdims=True))
        g_l = p @ v1[:end]
        inv_l = 1.0 / g_l[:, d_v:]
        g = g_l[:, :d_v] * inv_l
        z = g @ params.w_o
        ce_blocks.append(token_losses(z, y[r0:r1]))
        e = output_error_rows(z, y[r0:r1], w[r0:r1])
        u = e @ params.w_o.T
        b = compatibility(u, v_r)
        ds = p * ((b - jnp.sum(u * g, axis=-1, keepdims=True)) * inv_l)
        dq_blocks.append(query_grad(ds, k_r))
        dk_t = dk_t.at[:, :end].add(q_t[:, r0:r1] @ ds)
        dv_t = dv_t.at[:, :end].add((params.w_o @ e.T) * inv_l.T @ p)  # (d_v, |R|) as a product, not u.T: see _projections
        dw_o = dw_o + output_weight_grad(g, e)
        done.append((dk_t[0, 0], dv_t[0, 0], dw_o[0, 0], dq_blocks[-1][0, 0], ce_blocks[-1][0]))
    ce = jnp.concatenate(ce_blocks)
    return BlockedPass(loss=jnp.sum(w * ce), token_losses=ce, dq=jnp.concatenate(dq_blocks), dk=dk_t.T, dv=dv_t.T,
                       dw_o=dw_o)


def blocked_loss(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True,
                 block_size: int | None = None) -> jax.Array:
    """The loss L of SPEC §1 alone, by the forward half of the blocked pass (no N x N buffer)."""
    n, *_ = check_head_inputs(params, x, y, weights, fn="blocked_loss")
    return _seeds_in_chunks(_blocked_loss, causal, block_size, n)(params, x, y, weights)


def _blocked_loss(params, x, y, weights, causal, block_size) -> jax.Array:
    n = x.shape[0]
    q, _, k, v, w = _projections(params, x, weights)
    ce_blocks = []
    for i, (r0, r1) in enumerate(query_blocks(n, block_size)):
        end = r1 if causal else n
        if i >= BLOCKS_IN_FLIGHT:
            q, k, v = _after((q, k, v), (ce_blocks[i - BLOCKS_IN_FLIGHT][0],))
        p, inv_l = _unnormalised_attention(_masked_scores(q[r0:r1], k[:end], r0, causal))
        ce_blocks.append(token_losses(((p @ v[:end]) * inv_l) @ params.w_o, y[r0:r1]))
    return jnp.sum(w * jnp.concatenate(ce_blocks))


def blocked_loss_and_grads(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True,
                           block_size: int | None = None) -> tuple[jax.Array, HeadParams]:
    """``(L, dL/dparams)`` from the laws of SPEC §2 in one fused blocked pass (no autodiff inside).

    Args:
      params: HeadParams with w_q, w_k (d_in, d_k), w_v (d_in, d_v), w_o (d_v, C).
      x: (N, d_in) inputs.   y: (N,) integer targets.   weights: optional (N,) non-negative.
      causal: mask keys j > i (and skip future key blocks).
      block_size: query rows per block (static; default :func:`default_block_size`). Any N works,
        including N < block_size.
    Returns:
      scalar loss and a HeadParams of gradients, in the dtype of the inputs.
    """
    n, *_ = check_head_inputs(params, x, y, weights, fn="blocked_loss_and_grads")
    return _seeds_in_chunks(_blocked_loss_and_grads, causal, block_size, n)(params, x, y, weights)


def _blocked_loss_and_grads(params, x, y, weights, causal, block_size):
    p = _blocked_pass(params, x, y, weights, causal, block_size)
    return p.loss, projection_grads(x, p.dq, p.dk, p.dv, p.dw_o)


def input_grad(params: HeadParams, dq: jax.Array, dk: jax.Array, dv: jax.Array) -> jax.Array:
    """dL/dX (N, d_in) = dL/dQ W_Q^T + dL/dK W_K^T + dL/dV W_V^T (q_i, k_i, v_i all read x_i)."""
    return dq @ params.w_q.T + dk @ params.w_k.T + dv @ params.w_v.T


def weight_grad(token_ce: jax.Array, loss: jax.Array, weights) -> jax.Array:
    """dL/dw (N,) = (CE_i - L) / sum_k w_k, since L = sum_i w_i CE_i / sum_k w_k."""
    return (token_ce - loss) / jnp.sum(jnp.asarray(weights, token_ce.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def loss_with_blocked_vjp(params, x, y, weights, causal, block_size):
    """L, with a reverse rule that is one fused blocked pass. Call :func:`gradattn.head.loss_fn`."""
    return blocked_loss(params, x, y, weights, causal, block_size)


def _vjp_forward(params, x, y, weights, causal, block_size):
    p = blocked_pass(params, x, y, weights, causal, block_size)
    return p.loss, (params, x, weights, p)


def _cotangent_like(a, ct):
    """The cotangent of an input: ``None`` (zero) for integer arrays, ``ct`` cast to a's dtype otherwise."""
    return ct.astype(jnp.result_type(a)) if jnp.issubdtype(jnp.result_type(a), jnp.inexact) else None


def _vjp_backward(causal, block_size, residuals, ct):
    params, x, weights, p = residuals
    d_params = jax.tree.map(lambda a: ct * a, projection_grads(x, p.dq, p.dk, p.dv, p.dw_o))
    d_x = ct * input_grad(params, p.dq, p.dk, p.dv)
    d_weights = None if weights is None else _cotangent_like(weights, ct * weight_grad(p.token_losses, p.loss, weights))
    return d_params, d_x, None, d_weights


loss_with_blocked_vjp.defvjp(_vjp_forward, _vjp_backward)
