"""flax NNX modules: one attention head, and a deep pre-norm transformer whose heads can be read.

``AttentionHead`` is a thin ``nnx.Module`` over the pure functions of :mod:`gradattn.head` (its four
matrices are ``nnx.Param``s; the forward pass is :func:`gradattn.head.forward`).

``Transformer`` is the deep model of the sticky-chain experiment, one sequence ``x (N, d_in)`` at a
time (vmap for batches)::

    h^0 = x W_in + b_in                                                   (N, d_model)
    for each layer l:
        a   = LN_1(h)                                                     LayerNorm, eps 1e-5
        q^h, k^h, v^h = head h's slice of a W_Q + b_Q, a W_K + b_K, a W_V + b_V   (N, d_h)
        s^h_ij = q^h_i . k^h_j / sqrt(d_h)            causal: j <= i, diagonal kept
        alpha^h = softmax_j(s^h)   (dropout on alpha^h when training)
        g^h_i = sum_j alpha^h_ij v^h_j                 head h's context
        h = h + concat_h(g^h) W_O + b_O
        h = h + dropout(GELU(LN_2(h) W_1 + b_1)) W_2 + b_2, then dropout    (GELU: exact erf form)
    logits = LN_f(h) W_out + b_out                                        (N, C)

with d_h = d_model / n_heads, the feed-forward width 4 d_model, every Linear's weight and bias
uniform in +-1/sqrt(fan_in) and every LayerNorm's scale 1 and bias 0 (PyTorch's defaults, so a
model built here and one built with ``torch.nn`` are the same model). The defaults have 201,928
parameters.

Reading one head. ``model(x, return_taps=True)`` also returns a :class:`HeadTaps` with every head's
scores, attention weights, values and contexts (leading axes ``(n_layers, n_heads)``), and
``model(x, perturb=HeadTaps(...))`` adds the given arrays to those intermediates. Differentiating
the loss with respect to a zero perturbation of the contexts gives u^h_i = dL/dg^h_i through the
output projection, the residual stream and every later layer: the upstream gradient that the laws
of :mod:`gradattn.laws` need for that head (see :func:`gradattn.deep.head_laws`).
``return_residuals=True`` also returns the residual stream entering every block and leaving the
last, and ``sublayer_mask`` drops chosen blocks' attention or feed-forward outputs from it (the
probes of :mod:`gradattn.probes` read and ablate a model through these).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gradattn._checks import check_array, check_int, check_number, check_prng_key
from gradattn.head import HeadParams, causal_mask, forward, init_head

LAYER_NORM_EPS = 1e-5
"""PyTorch's ``nn.LayerNorm`` epsilon (flax's default is 1e-6)."""
RMS_NORM_EPS = 1e-6
"""The small GPT's RMSNorm epsilon."""
GPT_INIT_STD = 0.02
"""The small GPT's initialisation: every weight matrix and embedding N(0, 0.02^2)."""


# --------------------------------------------------------------------------------------------
# One head
# --------------------------------------------------------------------------------------------


class AttentionHead(nnx.Module):
    """One attention head as an ``nnx.Module``: ``W_Q, W_K (d_in, d_k)``, ``W_V (d_in, d_v)``,
    ``W_O (d_v, C)``, each an ``nnx.Param`` drawn i.i.d. N(0, scale^2) (:func:`gradattn.head.init_head`).

    ``head(x)`` returns the logits ``z (N, C)`` of :func:`gradattn.head.forward` on one sequence
    ``x (N, d_in)``; ``head.params`` is the :class:`~gradattn.head.HeadParams` every pure function of
    the library takes, and :meth:`from_params` wraps one.
    """

    def __init__(self, d_in: int, d_k: int, d_v: int, n_classes: int, *, rngs: nnx.Rngs, scale: float = 0.1,
                 dtype=jnp.float32):
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"AttentionHead: rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        scale = check_number("scale", scale, "AttentionHead", minimum=0.0, exclusive_minimum=True)
        p = init_head(rngs.params(), d_in, d_k, d_v, n_classes, scale, dtype)
        self.w_q, self.w_k, self.w_v, self.w_o = (nnx.Param(a) for a in p)

    @property
    def params(self) -> HeadParams:
        """The current matrices as a :class:`~gradattn.head.HeadParams`."""
        return HeadParams(self.w_q[...], self.w_k[...], self.w_v[...], self.w_o[...])

    @classmethod
    def from_params(cls, params: HeadParams) -> AttentionHead:
        """An ``AttentionHead`` holding ``params`` (shapes taken from them)."""
        if not isinstance(params, HeadParams):
            raise TypeError(f"AttentionHead.from_params: params must be a HeadParams, got {type(params).__name__}")
        (d_in, d_k), (_, d_v), (_, c) = params.w_q.shape, params.w_v.shape, params.w_o.shape
        head = cls(d_in, d_k, d_v, c, rngs=nnx.Rngs(0), dtype=params.w_q.dtype)  # matrices replaced below
        head.w_q, head.w_k, head.w_v, head.w_o = (nnx.Param(jnp.asarray(a)) for a in params)
        return head

    def __call__(self, x: jax.Array, causal: bool = True) -> jax.Array:
        """Logits ``(N, C)`` of one sequence ``x (N, d_in)``."""
        return forward(self.params, x, causal).logits


# --------------------------------------------------------------------------------------------
# The deep transformer
# --------------------------------------------------------------------------------------------


class HeadTaps(NamedTuple):
    """Every head's intermediates (or additive perturbations of them), leading axes ``(L, H)``.

    Attributes:
      scores: (L, H, N, N) s^h_ij = q^h_i . k^h_j / sqrt(d_h), before the causal mask.
      alpha: (L, H, N, N) attention weights (before attention dropout); rows sum to 1.
      values: (L, H, N, d_h) v^h_j.
      contexts: (L, H, N, d_h) g^h_i = sum_j alpha^h_ij v^h_j (with the dropped weights when training).

    As a perturbation (``model(x, perturb=...)``) any field may be ``None`` (no perturbation);
    the others are added to the intermediate of the same name.
    """

    scores: jax.Array | None = None
    alpha: jax.Array | None = None
    values: jax.Array | None = None
    contexts: jax.Array | None = None


def _torch_uniform(fan_in: int):
    """PyTorch's ``nn.Linear`` initialiser for both weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    init = _torch_uniform(d_in)
    return nnx.Linear(d_in, d_out, kernel_init=init, bias_init=init, param_dtype=dtype, rngs=rngs)


def _layer_norm(d: int, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
    # Two-pass variance, as PyTorch computes it: a model copied across gives the same numbers.
    return nnx.LayerNorm(d, epsilon=LAYER_NORM_EPS, use_fast_variance=False, param_dtype=dtype, rngs=rngs)


class _Style(NamedTuple):
    """How a block is built: its norm, its linear maps and their initialisation."""

    norm: Callable[[int, nnx.Rngs, Any], nnx.Module]
    linear: Callable[[int, int, nnx.Rngs, Any], nnx.Linear]


def _gpt_linear(d_in: int, d_out: int, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=nnx.initializers.normal(GPT_INIT_STD),
                      param_dtype=dtype, rngs=rngs)


def _rms_norm(d: int, rngs: nnx.Rngs, dtype) -> nnx.RMSNorm:
    return nnx.RMSNorm(d, epsilon=RMS_NORM_EPS, use_fast_variance=False, param_dtype=dtype, rngs=rngs)


TORCH_STYLE = _Style(_layer_norm, _linear)
"""LayerNorm (eps 1e-5), linear maps with biases, PyTorch's default initialisation: the sticky-chain
experiment's :class:`Transformer`."""
GPT_STYLE = _Style(_rms_norm, _gpt_linear)
"""RMSNorm (eps 1e-6, a scale and no bias), bias-free linear maps drawn N(0, 0.02^2): the companion
paper's small GPT (:class:`TinyGPT`)."""


def _dropout(x: jax.Array, rate: float, key) -> jax.Array:
    """Inverted dropout (kept entries scaled by 1 / (1 - rate)); the identity when ``key`` is None."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


class _Block(nnx.Module):
    """One pre-norm block: causal multi-head attention, then the feed-forward, each in a residual;
    its norms and linear maps as ``style`` builds them."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, *, rngs: nnx.Rngs, dtype,
                 style: _Style = TORCH_STYLE):
        self.n_heads = n_heads
        self.dropout = dropout
        norm, linear = style
        self.ln_1 = norm(d_model, rngs, dtype)
        self.q_proj = linear(d_model, d_model, rngs, dtype)
        self.k_proj = linear(d_model, d_model, rngs, dtype)
        self.v_proj = linear(d_model, d_model, rngs, dtype)
        self.o_proj = linear(d_model, d_model, rngs, dtype)
        self.ln_2 = norm(d_model, rngs, dtype)
        self.ff_1 = linear(d_model, 4 * d_model, rngs, dtype)
        self.ff_2 = linear(4 * d_model, d_model, rngs, dtype)

    def __call__(self, x, keys, perturb: HeadTaps, keep=None):
        """``x`` through the block; ``keep`` (optional, shape (2,)): where an entry is 0 the attention
        output (entry 0) or the feed-forward output (entry 1) is not added to the residual stream."""
        n, d_model = x.shape
        hd = d_model // self.n_heads
        a = self.ln_1(x)

        def heads(t):  # (N, d_model) -> (H, N, d_h)
            return t.reshape(n, self.n_heads, hd).transpose(1, 0, 2)

        q, k, v = heads(self.q_proj(a)), heads(self.k_proj(a)), heads(self.v_proj(a))
        if perturb.values is not None:
            v = v + perturb.values
        # Plain einsum attention, chosen by measurement: one layer's forward + backward at N = 1999,
        # 4 heads of 16, six interleaved rounds on a loaded 2-core CPU: median 195 ms (123-374) with
        # einsum against 478 ms (268-541) with jax.nn.dot_product_attention(is_causal=True), whose CPU
        # path is XLA's own einsum/softmax with extra work. It also could not drop attention weights
        # or expose them, which training and the per-head laws both need.
        scores = jnp.einsum("hid,hjd->hij", q, k) / jnp.sqrt(jnp.asarray(hd, q.dtype))
        if perturb.scores is not None:
            scores = scores + perturb.scores
        alpha = jax.nn.softmax(jnp.where(causal_mask(n), scores, -jnp.inf), axis=-1)
        if perturb.alpha is not None:
            alpha = alpha + perturb.alpha
        g = jnp.einsum("hij,hjd->hid", _dropout(alpha, self.dropout, keys[0]), v)
        if perturb.contexts is not None:
            g = g + perturb.contexts
        x = x + _kept(self.o_proj(g.transpose(1, 0, 2).reshape(n, d_model)), keep, 0)
        f = _dropout(jax.nn.gelu(self.ff_1(self.ln_2(x)), approximate=False), self.dropout, keys[1])
        x = x + _kept(_dropout(self.ff_2(f), self.dropout, keys[2]), keep, 1)
        return x, HeadTaps(scores=scores, alpha=alpha, values=v, contexts=g)


def _kept(out: jax.Array, keep, i: int) -> jax.Array:
    """``out`` itself without a ``keep`` mask; with one, exact zeros where ``keep[i]`` is 0 (so that
    adding it leaves the residual stream exactly as it was)."""
    if keep is None:
        return out
    return jnp.where(keep[i] != 0, out, jnp.zeros((), out.dtype))


class Transformer(nnx.Module):
    """The deep pre-norm transformer of the sticky-chain experiment (see the module docstring).

    Args:
      d_in: input size (the task's embedding dimension).
      d_model: residual width; must be divisible by ``n_heads``.
      n_layers: number of blocks.
      n_heads: heads per block, each of size d_model / n_heads.
      n_classes: C, output classes.
      dropout: rate on the attention weights, after GELU and after the feed-forward (training only).
      rngs: ``nnx.Rngs`` for the initial parameters.
      dtype: parameter dtype (float32; float64 for checks against autodiff).
    """

    def __init__(self, d_in: int = 20, d_model: int = 64, n_layers: int = 4, n_heads: int = 4, n_classes: int = 8,
                 dropout: float = 0.1, *, rngs: nnx.Rngs, dtype=jnp.float32):
        fn = "Transformer"
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"{fn}: rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        d_in, d_model = check_int("d_in", d_in, fn), check_int("d_model", d_model, fn)
        n_layers, n_heads = check_int("n_layers", n_layers, fn), check_int("n_heads", n_heads, fn)
        n_classes = check_int("n_classes", n_classes, fn, minimum=2)
        if d_model % n_heads:
            raise ValueError(f"{fn}: d_model={d_model} must be divisible by n_heads={n_heads}")
        dropout = float(check_number("dropout", dropout, fn, minimum=0.0, maximum=1.0, exclusive_maximum=True))
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{fn}: dtype must be floating point, got {dtype}")
        self.d_in, self.d_model, self.n_layers, self.n_heads, self.n_classes = d_in, d_model, n_layers, n_heads, n_classes
        self.dropout = dropout
        self.in_proj = _linear(d_in, d_model, rngs, dtype)
        self.blocks = nnx.List([_Block(d_model, n_heads, dropout, rngs=rngs, dtype=dtype) for _ in range(n_layers)])
        self.ln_f = _layer_norm(d_model, rngs, dtype)
        self.out_proj = _linear(d_model, n_classes, rngs, dtype)

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None, perturb: HeadTaps | None = None,
                 return_taps: bool = False, sublayer_mask: jax.Array | None = None, return_residuals: bool = False):
        """Logits ``(N, C)`` of one sequence ``x (N, d_in)``.

        Args:
          x: (N, d_in) inputs, floating point, N >= 1.
          dropout_key: a PRNG key (``jax.random.key(seed)``, not an int) turns dropout on
            (training); ``None`` (default) is evaluation mode.
          perturb: optional :class:`HeadTaps` of arrays added to every head's scores, attention
            weights, values or contexts (leading axes (n_layers, n_heads)); pass zeros and
            differentiate to get the loss's gradient with respect to those intermediates.
          return_taps: also return every head's :class:`HeadTaps`.
          sublayer_mask: optional ``(n_layers, 2)`` array; where ``[l, 0]`` is 0, block l's
            attention output (after ``W_O``, its bias included) is not added to the residual
            stream, and where ``[l, 1]`` is 0 neither is its feed-forward output (both 0: the block
            passes its input through unchanged). ``None`` (default): every output is added.
          return_residuals: also return the residual stream ``(n_layers + 1, N, d_model)``: row l
            enters block l (row 0 is ``x W_in + b_in``), the last row leaves the last block (before
            LN_f).
        Returns:
          ``logits``; with ``return_taps`` and/or ``return_residuals`` a tuple ``(logits, taps,
          residuals)`` of those asked for, in that order.
        """
        check_array("x", x, "Transformer")
        if jnp.ndim(x) != 2 or jnp.shape(x)[1] != self.d_in:
            raise ValueError(
                f"Transformer: x must have shape (N, d_in) with d_in = {self.d_in}, got shape {tuple(jnp.shape(x))}; "
                "use jax.vmap for batches"
            )
        if jnp.shape(x)[0] < 1:
            raise ValueError(f"Transformer: x must have at least one position, got shape {tuple(jnp.shape(x))}")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise TypeError(f"Transformer: x must be floating point, got dtype {jnp.result_type(x)}")
        h, taps, stream = _run_blocks(self.blocks, self.in_proj(x), dropout_key, perturb, "Transformer", sublayer_mask,
                                      return_residuals)
        logits = self.out_proj(self.ln_f(h))
        return _outputs(logits, taps, stream, return_taps, return_residuals)


def _run_blocks(blocks, h: jax.Array, dropout_key, perturb: HeadTaps | None, fn: str, sublayer_mask=None,
                with_stream: bool = False) -> tuple[jax.Array, HeadTaps, jax.Array | None]:
    """The residual stream ``h (N, d_model)`` through every block (dropout with ``dropout_key``,
    ``perturb`` added to the heads' intermediates, ``sublayer_mask`` (n_layers, 2) dropping the
    attention or feed-forward outputs where it is 0); returns it, every head's :class:`HeadTaps`
    (leading axes (n_layers, n_heads)) and, ``with_stream``, the stream entering each block and
    leaving the last one, ``(n_layers + 1, N, d_model)`` (else ``None``)."""
    if dropout_key is not None:
        check_prng_key("dropout_key", dropout_key, fn)
    perturb = HeadTaps() if perturb is None else perturb
    if not isinstance(perturb, HeadTaps):
        raise TypeError(f"{fn}: perturb must be a HeadTaps or None, got {type(perturb).__name__}")
    n_layers = len(blocks)
    if sublayer_mask is not None:
        check_array("sublayer_mask", sublayer_mask, fn)
        if tuple(jnp.shape(sublayer_mask)) != (n_layers, 2):
            raise ValueError(f"{fn}: sublayer_mask must have shape (n_layers, 2) = ({n_layers}, 2) (attention, "
                             f"feed-forward), got shape {tuple(jnp.shape(sublayer_mask))}")
    keys = [None] * (3 * n_layers) if dropout_key is None else list(jax.random.split(dropout_key, 3 * n_layers))
    taps, stream = [], []
    for layer, block in enumerate(blocks):
        p_l = HeadTaps(*(None if a is None else a[layer] for a in perturb))
        stream.append(h)
        h, t = block(h, keys[3 * layer: 3 * layer + 3], p_l, None if sublayer_mask is None else sublayer_mask[layer])
        taps.append(t)
    stream.append(h)
    return h, jax.tree.map(lambda *a: jnp.stack(a), *taps), jnp.stack(stream) if with_stream else None


def _outputs(logits, taps, stream, return_taps: bool, return_residuals: bool):
    """``logits``, followed by ``taps`` and ``stream`` when asked for (a tuple then)."""
    out = (logits, *((taps,) if return_taps else ()), *((stream,) if return_residuals else ()))
    return out[0] if len(out) == 1 else out


# --------------------------------------------------------------------------------------------
# The companion paper's small GPT, on token sequences
# --------------------------------------------------------------------------------------------


class TinyGPT(nnx.Module):
    """The companion paper's small GPT over a sequence of token ids (one at a time; vmap for batches)::

        h^0_t = E[token_t] + P[t]                       token and learned position embeddings
        for each layer: the pre-norm block of :class:`Transformer`, with RMSNorm (eps 1e-6, a scale,
                        no bias) and bias-free linear maps (attention projections; feed-forward
                        4 d_model wide, exact GELU)
        logits_t = RMSNorm(h_t) E^T                     tied output head (n_outputs = vocab_size)
                 = RMSNorm(h_t) W_out                   or an untied bias-free head of n_outputs

    Every embedding and weight matrix is drawn N(0, 0.02^2); the norms' scales start at 1. Tied, it
    has ``vocab_size d + max_len d + n_layers (2 d + 12 d^2) + d`` parameters (an untied head adds
    ``d n_outputs``). No dropout (the paper's models train without). Every head can be read and
    perturbed as in :class:`Transformer` (``return_taps``, ``perturb``), so the per-head laws of
    :func:`gradattn.deep.head_laws` hold inside it.

    Args:
      vocab_size: input token ids are in [0, vocab_size).
      max_len: the longest sequence (rows of the position embedding).
      d_model, n_layers, n_heads: sizes (d_model divisible by n_heads).
      n_outputs: output classes; ``None`` (default): ``vocab_size``, through the tied head.
      rngs, dtype: as in :class:`Transformer`.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int = 192, n_layers: int = 6, n_heads: int = 6,
                 n_outputs: int | None = None, *, rngs: nnx.Rngs, dtype=jnp.float32):
        fn = "TinyGPT"
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"{fn}: rngs must be an nnx.Rngs, got {type(rngs).__name__}")
        vocab_size = check_int("vocab_size", vocab_size, fn, minimum=2)
        max_len, d_model = check_int("max_len", max_len, fn), check_int("d_model", d_model, fn)
        n_layers, n_heads = check_int("n_layers", n_layers, fn), check_int("n_heads", n_heads, fn)
        n_outputs = vocab_size if n_outputs is None else check_int("n_outputs", n_outputs, fn, minimum=2)
        if d_model % n_heads:
            raise ValueError(f"{fn}: d_model={d_model} must be divisible by n_heads={n_heads}")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{fn}: dtype must be floating point, got {dtype}")
        self.vocab_size, self.max_len, self.d_model = vocab_size, max_len, d_model
        self.n_layers, self.n_heads, self.n_classes = n_layers, n_heads, n_outputs
        init = nnx.initializers.normal(GPT_INIT_STD)
        self.tok = nnx.Embed(vocab_size, d_model, embedding_init=init, param_dtype=dtype, rngs=rngs)
        self.pos = nnx.Embed(max_len, d_model, embedding_init=init, param_dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([_Block(d_model, n_heads, 0.0, rngs=rngs, dtype=dtype, style=GPT_STYLE)
                                for _ in range(n_layers)])
        self.ln_f = _rms_norm(d_model, rngs, dtype)
        self.head = None if n_outputs == vocab_size else _gpt_linear(d_model, n_outputs, rngs, dtype)

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads

    def __call__(self, tokens: jax.Array, *, perturb: HeadTaps | None = None, return_taps: bool = False,
                 sublayer_mask: jax.Array | None = None, return_residuals: bool = False):
        """Logits ``(T, n_outputs)`` of one sequence of token ids ``tokens (T,)``, 1 <= T <= max_len
        (``perturb``, ``return_taps``, ``sublayer_mask`` and ``return_residuals`` as in
        :class:`Transformer`; row 0 of the residuals is ``E[token_t] + P[t]``)."""
        check_array("tokens", tokens, "TinyGPT")
        if jnp.ndim(tokens) != 1 or not 1 <= jnp.shape(tokens)[0] <= self.max_len:
            raise ValueError(f"TinyGPT: tokens must have shape (T,) with 1 <= T <= max_len = {self.max_len}, got shape "
                             f"{tuple(jnp.shape(tokens))}; use jax.vmap for batches")
        if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise TypeError(f"TinyGPT: tokens must be integer token ids, got dtype {jnp.result_type(tokens)}")
        h = self.tok(tokens) + self.pos.embedding[: jnp.shape(tokens)[0]]
        h, taps, stream = _run_blocks(self.blocks, h, None, perturb, "TinyGPT", sublayer_mask, return_residuals)
        h = self.ln_f(h)
        logits = self.tok.attend(h) if self.head is None else self.head(h)
        return _outputs(logits, taps, stream, return_taps, return_residuals)


def n_params(model: nnx.Module) -> int:
    """The number of scalar parameters of ``model`` (every ``nnx.Param``)."""
    return int(sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param))))
