"""The head and its laws as two fused Pallas kernels, tiled like flash attention.

The laws of the head (paper eqs. for the output error, compatibility, routing and value laws) are
exact per row of attention, and every row of alpha depends only on its own query. So the pass runs
over tiles of ``block_q`` query rows and ``block_k`` keys with no N x N matrix ever leaving the
chip: only O(N d) per-row quantities go to memory between the two kernels.

Kernel 1, one program per query tile R (``_forward_and_query_kernel``)::

    first sweep over key tiles K (online softmax; causal: tiles wholly in the future skipped,
    the diagonal tile masked):
        S_RK   = Q'_R K_K^T                 Q' = Q / sqrt(d_k), folded in before the kernel
        m     <- max(m, rowmax S_RK)        running max
        l     <- l e^(m_old - m) + rowsum e^(S_RK - m)              running sum
        acc   <- acc e^(m_old - m) + e^(S_RK - m) V_K
    per row, once the row is complete:
        g_i    = acc_i / l_i                context              lse_i = m_i + log l_i
        z_i    = g_i W_O                    logits; CE_i = -log softmax(z_i)[y_i]
        e_i    = w_i (softmax(z_i) - onehot(y_i))                   OUTPUT ERROR (w sums to 1)
        u_i    = e_i W_O^T                  UPSTREAM GRADIENT
        c_i    = u_i . g_i = sum_k alpha_ik b_ik                    (the row's mean compatibility)
    second sweep over the same key tiles:
        alpha_RK = exp(S_RK - lse_R)        the attention weights, recomputed
        b_RK     = U_R V_K^T                COMPATIBILITY b_ij = u_i . v_j
        dS_RK    = alpha_RK (b_RK - c_R)    ROUTING LAW dL/ds_ij = alpha_ij (b_ij - sum_k alpha_ik b_ik)
        dQ_R    += dS_RK K_K / sqrt(d_k)    QUERY GRADIENT

Kernel 2, one program per key tile K (``_key_value_kernel``), sweeping the query tiles that can
see it (causal: R from the diagonal on) with lse, U and c from kernel 1::

        alpha_RK, b_RK, dS_RK as above
        dK_K    += dS_RK^T Q'_R             KEY GRADIENT dL/dk_j = sum_i dL/ds_ij q_i / sqrt(d_k)
        dV_K    += alpha_RK^T U_R           VALUE LAW dL/dv_j = sum_i alpha_ij u_i

Outside the kernels, as small XLA products: Q, K, V = X W_Q, X W_K, X W_V (before), and
dL/dW_O = G^T E, dL/dW_Q = X^T dQ, dL/dW_K = X^T dK, dL/dW_V = X^T dV (after).

Padding. The head is small (d_k = 10, d_v = 15, C = 8 in the paper's task), below what a GPU
matrix unit multiplies (16 in every dimension of a Triton dot). d_k, d_v and C are padded with
zero columns to a power of two >= 16: a zero column of W_Q, W_K or W_V adds nothing to any score,
context, compatibility or gradient, and padded classes get a logit of -inf-like size, so softmax
gives them probability 0. N is padded to a whole number of tiles; padded rows carry weight 0 (so
their e, u and c are 0 and they add nothing to dK or dV) and padded keys are masked out.

Precision. Every product over a tile (S, P V, b, dS K, dS^T Q', alpha^T U) runs at the
``precision`` named by the caller; the per-row output-layer products (G W_O and E W_O^T) are
always at full precision, being tiny. ``"float32"`` is full precision of the input dtype (IEEE
float32 dots on a GPU; float64 inputs run in float64); ``"tf32"`` lets a GPU use TF32 tensor
cores (10-bit mantissa inputs, float32 accumulation); ``"bfloat16"`` casts the tile operands to
bfloat16 (8-bit mantissa) with float32 accumulation. In Pallas interpret mode on a CPU every dot
is exact whatever is asked for, except that the bfloat16 casts are real: there, ``"tf32"`` equals
``"float32"``, and only ``"bfloat16"``'s own error can be measured. Measured so, against the
float64 dense laws at N = 1999 with the paper's head and initialisation (largest |error| over the
loss and each gradient, relative to that quantity's largest entry): ``"float32"`` 3.9e-7,
``"bfloat16"`` 3.9e-3 (``python benchmarks/gpu_pallas.py --n 1999 --budget-s 0`` prints both; on a
GPU it also gives ``"tf32"``'s, which interpret mode cannot show).

On a GPU the kernels compile through Pallas's Triton lowering. Anywhere else (CI's CPU) they run
in Pallas interpret mode, which executes the same kernel bodies as ordinary XLA programs. The
Triton module (``jax.experimental.pallas.triton``, deprecated since jax 0.11 in favour of the
Mosaic GPU backend) is imported only when a kernel is compiled for a GPU, so interpret mode and
every other gradient path work on a jax without it; compiling there raises a ``RuntimeError``
that says so.
Under ``jax.vmap`` (a sweep over seeds) Pallas adds the batch as an outer grid axis, so all
seeds run in the same two kernel launches.
"""

from __future__ import annotations

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from gradattn._checks import check_head_inputs, check_int
from gradattn.grads import BlockedPass
from gradattn.head import HeadParams, label_factor, normalised_weights

PRECISIONS = ("float32", "tf32", "bfloat16")
"""Dot precisions of the tile products: full, TF32 tensor cores, bfloat16 inputs (f32 accumulation)."""

DEFAULT_BLOCK_Q = 64
"""Query rows per tile (a power of two >= 16). Not yet tuned on a GPU; benchmarks/gpu_pallas.py
times 32, 64 and 128."""

DEFAULT_BLOCK_K = 64
"""Keys per tile (a power of two >= 16)."""

MIN_TILE = 16
"""The smallest dimension of a Triton dot on a GPU; tiles and padded head sizes are at least this."""

_MASKED = -0.7 * float(np.finfo(np.float32).max)
"""Score (and padded logit) of a masked entry: finite, so that 0 * masked stays 0 (an -inf would
give NaN in the one-hot cross-entropy), yet exp(masked - any real score) is exactly 0."""


def _lanes(d: int) -> int:
    """The padded size of a head dimension: a power of two, at least :data:`MIN_TILE`."""
    return max(MIN_TILE, pl.next_power_of_2(d))


def _tile(block: int, n: int) -> int:
    """The tile actually used: ``block``, or less when the whole (padded) sequence is shorter."""
    return min(block, _lanes(n))


def _dot(a, b, precision: str, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (optionally a^T, b^T) for the tile products, at the named precision, accumulating in
    the dtype of ``a`` (float32 for bfloat16 inputs)."""
    acc = a.dtype
    if precision == "bfloat16":
        # HIGHEST on bfloat16 operands: plain bfloat16 products (DEFAULT would tag them TF32, which
        # means nothing for bfloat16 and is best not left to the compiler to interpret).
        a, b, prec = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), lax.Precision.HIGHEST
    elif precision == "tf32":
        prec = lax.Precision.DEFAULT  # the Triton lowering runs DEFAULT float32 dots as TF32
    else:
        prec = lax.Precision.HIGHEST  # IEEE float32 in the Triton lowering
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=acc)


def _full_dot(a, b, *, trans_b: bool = False):
    return _dot(a, b, "float32", trans_b=trans_b)


def _masked(s, rows, cols, n: int, causal: bool):
    """The scores S = Q' K^T of one (query tile, key tile) with padded keys (j >= n) and, when
    causal, future keys (j > i) set to :data:`_MASKED`. ``rows``/``cols`` are global indices."""
    keep = cols[None, :] < n
    if causal:
        keep = keep & (cols[None, :] <= rows[:, None])
    return jnp.where(keep, s, _MASKED)


def _forward_and_query_kernel(
    q_ref, k_ref, v_ref, wo_ref, y_ref, w_ref,  # inputs: Q' tile, all K, all V, W_O, labels, weights
    lse_ref, u_ref, c_ref, g_ref, e_ref, ce_ref, dq_ref,  # outputs, one tile of rows each
    *, n: int, n_classes: int, causal: bool, block_q: int, block_k: int, precision: str, scale: float,
):
    """Forward pass, output error, upstream gradient and dL/dQ for one tile of query rows."""
    i = pl.program_id(0)
    q = q_ref[...]
    dtype = q.dtype
    rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
    n_key_tiles = pl.cdiv(n, block_k)
    last: jax.Array | int  # a traced bound when causal, a static one otherwise
    if causal:
        # Key tiles holding only future keys are skipped; lax.div, since i is a traced int32.
        last = jnp.minimum(lax.div((i + 1) * block_q + block_k - 1, jnp.int32(block_k)), n_key_tiles)
    else:
        last = n_key_tiles

    def tile(j):
        keys = pl.ds(j * block_k, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        return _masked(_dot(q, k, precision, trans_b=True), rows, cols, n, causal), k, v

    def online_softmax(j, carry):
        m, l_sum, acc = carry
        s, _, v = tile(j)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        rescale = jnp.exp(m - m_new)
        return m_new, rescale * l_sum + jnp.sum(p, axis=1), rescale[:, None] * acc + _dot(p, v, precision)

    init = (
        jnp.full((block_q,), -jnp.inf, dtype),  # key 0 is visible to every row, so m is finite after tile 0
        jnp.zeros((block_q,), dtype),
        jnp.zeros((block_q, v_ref.shape[1]), dtype),
    )
    m, l_sum, acc = lax.fori_loop(0, last, online_softmax, init)
    g = acc / l_sum[:, None]
    lse = m + jnp.log(l_sum)

    # The output layer, row by row: logits, cross-entropy, output error e and upstream gradient u.
    w_o = wo_ref[...]
    classes = jnp.arange(w_o.shape[1], dtype=jnp.int32)
    z = jnp.where(classes[None, :] < n_classes, _full_dot(g, w_o), _MASKED)
    z_max = jnp.max(z, axis=1)
    ez = jnp.exp(z - z_max[:, None])
    z_sum = jnp.sum(ez, axis=1)
    onehot = (classes[None, :] == y_ref[...][:, None]).astype(dtype)
    ce = z_max + jnp.log(z_sum) - jnp.sum(onehot * z, axis=1)
    e = w_ref[...][:, None] * (ez / z_sum[:, None] - onehot)
    u = _full_dot(e, w_o, trans_b=True)
    c = jnp.sum(u * g, axis=1)  # = sum_k alpha_ik b_ik, since b_ik = u_i . v_k and g_i = sum_k alpha_ik v_k

    def query_grad(j, dq):
        s, k, v = tile(j)
        alpha = jnp.exp(s - lse[:, None])
        b = _dot(u, v, precision, trans_b=True)  # compatibility
        ds = alpha * (b - c[:, None])  # routing law
        return dq + _dot(ds, k, precision)

    dq = lax.fori_loop(0, last, query_grad, jnp.zeros((block_q, q_ref.shape[1]), dtype))

    lse_ref[...] = lse
    u_ref[...] = u
    c_ref[...] = c
    g_ref[...] = g
    e_ref[...] = e
    ce_ref[...] = ce
    dq_ref[...] = dq * scale


def _key_value_kernel(
    q_ref, k_ref, v_ref, lse_ref, u_ref, c_ref,  # inputs: all Q', one K tile, one V tile, all row stats
    dk_ref, dv_ref,  # outputs: one tile of keys each
    *, n: int, causal: bool, block_q: int, block_k: int, precision: str,
):
    """dL/dK (the key gradient) and dL/dV (the value law) for one tile of keys."""
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    dtype = k.dtype
    cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
    # Query tiles wholly before this key tile cannot see it when causal.
    first = lax.div(j * block_k, jnp.int32(block_q)) if causal else 0

    def accumulate(i, carry):
        dk, dv = carry
        r = pl.ds(i * block_q, block_q)
        q, lse, u, c = q_ref[r, :], lse_ref[r], u_ref[r, :], c_ref[r]
        rows = i * block_q + jnp.arange(block_q, dtype=jnp.int32)
        alpha = jnp.exp(_masked(_dot(q, k, precision, trans_b=True), rows, cols, n, causal) - lse[:, None])
        b = _dot(u, v, precision, trans_b=True)  # compatibility
        ds = alpha * (b - c[:, None])  # routing law
        return dk + _dot(ds, q, precision, trans_a=True), dv + _dot(alpha, u, precision, trans_a=True)

    init = (jnp.zeros((block_k, k.shape[1]), dtype), jnp.zeros((block_k, v.shape[1]), dtype))
    dk, dv = lax.fori_loop(first, pl.cdiv(n, block_q), accumulate, init)
    dk_ref[...] = dk
    dv_ref[...] = dv


TRITON_MODULE = "jax.experimental.pallas.triton"
"""Pallas's Triton backend, which the compiled (GPU) kernels are written for; imported only by
:func:`_triton_compiler_params`."""


def _triton_compiler_params():
    """The Triton compiler parameters of both kernels, importing Pallas's Triton backend here, when
    a kernel is compiled for a GPU, and nowhere else: jax 0.11 deprecated that backend (to be
    removed; Mosaic GPU replaces it), and interpret mode never needs it."""
    try:
        plgpu = importlib.import_module(TRITON_MODULE)
    except ImportError as err:
        raise RuntimeError(
            f"gradattn.grads.pallas: this jax ({jax.__version__}) has no Pallas Triton backend ({TRITON_MODULE}), "
            "which the compiled kernels are written for. Run them in Pallas interpret mode (interpret=True), "
            "or take another gradient path (grad_source='dense' or 'blocked')."
        ) from err
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _pad(a, shape):
    return jnp.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


@functools.partial(jax.jit, static_argnames=("causal", "precision", "block_q", "block_k", "interpret"))
def _pallas_pass(params, x, y, weights, causal, precision, block_q, block_k, interpret) -> BlockedPass:
    n, d_in = x.shape
    d_k, d_v, n_classes = params.w_q.shape[1], params.w_v.shape[1], params.w_o.shape[1]
    dtype = x.dtype
    bq, bk = _tile(block_q, n), _tile(block_k, n)
    n_pad = -(-n // max(bq, bk)) * max(bq, bk)
    dkp, dvp, cp = _lanes(d_k), _lanes(d_v), _lanes(n_classes)
    mm = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST if precision == "float32" else None)
    scale = 1.0 / math.sqrt(d_k)

    xp = _pad(x, (n_pad, d_in))
    q = mm(xp, _pad(params.w_q, (d_in, dkp))) * jnp.asarray(scale, dtype)
    k = mm(xp, _pad(params.w_k, (d_in, dkp)))
    v = mm(xp, _pad(params.w_v, (d_in, dvp)))
    w_o = _pad(params.w_o, (dvp, cp))
    # A label outside [0, C) (possible only under jit) makes its row's weight NaN, hence the loss and
    # every gradient NaN, as in every other path.
    valid = label_factor(y, n_classes, dtype)
    w = _pad(normalised_weights(weights, n, dtype) * valid, (n_pad,))
    yp = _pad(y.astype(jnp.int32), (n_pad,))

    compiler_params = None if interpret else _triton_compiler_params()
    tile_rows = lambda i: (i, 0)  # noqa: E731
    tile_vec = lambda i: (i,)  # noqa: E731
    whole = lambda i: (0, 0)  # noqa: E731
    whole_vec = lambda i: (0,)  # noqa: E731
    sds = jax.ShapeDtypeStruct

    lse, u, c, g, e, ce, dq = pl.pallas_call(
        functools.partial(
            _forward_and_query_kernel, n=n, n_classes=n_classes, causal=causal, block_q=bq, block_k=bk,
            precision=precision, scale=scale,
        ),
        grid=(n_pad // bq,),
        in_specs=[
            pl.BlockSpec((bq, dkp), tile_rows),
            pl.BlockSpec((n_pad, dkp), whole),
            pl.BlockSpec((n_pad, dvp), whole),
            pl.BlockSpec((dvp, cp), whole),
            pl.BlockSpec((bq,), tile_vec),
            pl.BlockSpec((bq,), tile_vec),
        ],
        out_specs=[
            pl.BlockSpec((bq,), tile_vec),
            pl.BlockSpec((bq, dvp), tile_rows),
            pl.BlockSpec((bq,), tile_vec),
            pl.BlockSpec((bq, dvp), tile_rows),
            pl.BlockSpec((bq, cp), tile_rows),
            pl.BlockSpec((bq,), tile_vec),
            pl.BlockSpec((bq, dkp), tile_rows),
        ],
        out_shape=[
            sds((n_pad,), dtype), sds((n_pad, dvp), dtype), sds((n_pad,), dtype), sds((n_pad, dvp), dtype),
            sds((n_pad, cp), dtype), sds((n_pad,), dtype), sds((n_pad, dkp), dtype),
        ],
        interpret=interpret,
        compiler_params=compiler_params,
        name="head_forward_and_query_grad",
    )(q, k, v, w_o, yp, w)

    dk, dv = pl.pallas_call(
        functools.partial(_key_value_kernel, n=n, causal=causal, block_q=bq, block_k=bk, precision=precision),
        grid=(n_pad // bk,),
        in_specs=[
            pl.BlockSpec((n_pad, dkp), whole),
            pl.BlockSpec((bk, dkp), tile_rows),
            pl.BlockSpec((bk, dvp), tile_rows),
            pl.BlockSpec((n_pad,), whole_vec),
            pl.BlockSpec((n_pad, dvp), whole),
            pl.BlockSpec((n_pad,), whole_vec),
        ],
        out_specs=[pl.BlockSpec((bk, dkp), tile_rows), pl.BlockSpec((bk, dvp), tile_rows)],
        out_shape=[sds((n_pad, dkp), dtype), sds((n_pad, dvp), dtype)],
        interpret=interpret,
        compiler_params=compiler_params,
        name="head_key_value_grad",
    )(q, k, v, lse, u, c)

    ce = ce[:n] * valid
    return BlockedPass(
        loss=jnp.sum(w[:n] * ce),
        token_losses=ce,
        dq=dq[:n, :d_k],
        dk=dk[:n, :d_k],
        dv=dv[:n, :d_v],
        dw_o=mm(g[:n, :d_v].T, e[:n, :n_classes]),
    )


def _options(fn: str, precision, block_q, block_k, interpret) -> tuple[str, int, int, bool]:
    """Validated static options; ``interpret=None`` becomes True off a GPU."""
    if not isinstance(precision, str):
        raise TypeError(f"{fn}: precision must be one of {PRECISIONS}, got {precision!r} of type {type(precision).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"{fn}: precision must be one of {PRECISIONS}, got {precision!r}")
    sizes = []
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        val = check_int(name, val, fn, minimum=MIN_TILE)
        if val & (val - 1):
            raise ValueError(f"{fn}: {name} must be a power of two (a Triton tile), got {val}")
        sizes.append(val)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    elif not isinstance(interpret, (bool, np.bool_)):
        raise TypeError(f"{fn}: interpret must be None or a bool, got {interpret!r}")
    return precision, sizes[0], sizes[1], bool(interpret)


def pallas_pass(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True, *,
                precision: str = "float32", block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                interpret: bool | None = None) -> BlockedPass:
    """The loss and dL/dQ, dL/dK, dL/dV, dL/dW_O of one sequence from two fused Pallas kernels.

    The same contract as :func:`gradattn.grads.blocked.blocked_pass`: the module docstring gives the
    per-tile laws. No array larger than O(N (d_k + d_v + C)) is written to memory.

    Args:
      params: HeadParams with w_q, w_k (d_in, d_k), w_v (d_in, d_v), w_o (d_v, C).
      x: (N, d_in) inputs.   y: (N,) integer targets in [0, C).   weights: optional (N,) non-negative.
      causal: mask keys j > i (and skip key tiles wholly in the future).
      precision: ``"float32"`` (full precision of the input dtype; default), ``"tf32"`` or
        ``"bfloat16"`` for the tile products (module docstring).
      block_q: query rows per tile; block_k: keys per tile. Powers of two >= 16; shrunk to the
        padded sequence when N is shorter. Any N >= 1 works.
      interpret: run the kernels in Pallas interpret mode; ``None``: on a GPU compile them
        (Triton), on any other backend interpret.
    Returns:
      BlockedPass(loss (), token_losses (N,), dq (N, d_k), dk (N, d_k), dv (N, d_v), dw_o (d_v, C)),
      in the dtype of ``x``.
    """
    check_head_inputs(params, x, y, weights, fn="pallas_pass")
    opts = _options("pallas_pass", precision, block_q, block_k, interpret)
    return _pallas_pass(params, x, y, weights, bool(causal), *opts)


def pallas_loss_and_grads(params: HeadParams, x: jax.Array, y: jax.Array, weights=None, causal: bool = True, *,
                          precision: str = "float32", block_q: int = DEFAULT_BLOCK_Q,
                          block_k: int = DEFAULT_BLOCK_K, interpret: bool | None = None):
    """``(L, dL/dparams)`` from the fused Pallas kernels: the laws of the head, no autodiff inside.

    dL/dW_Q = X^T dQ, dL/dW_K = X^T dK, dL/dW_V = X^T dV, dL/dW_O = G^T E. Arguments as in
    :func:`pallas_pass`. Works under ``jit`` and ``vmap`` (a vmap over seeds becomes a grid axis
    of both kernels).

    Returns:
      scalar loss and a HeadParams of gradients, in the dtype of the inputs.
    """
    check_head_inputs(params, x, y, weights, fn="pallas_loss_and_grads")
    opts = _options("pallas_loss_and_grads", precision, block_q, block_k, interpret)
    p = _pallas_pass(params, x, y, weights, bool(causal), *opts)
    mm = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST if opts[0] == "float32" else None)
    return p.loss, HeadParams(w_q=mm(x.T, p.dq), w_k=mm(x.T, p.dk), w_v=mm(x.T, p.dv), w_o=p.dw_o)
