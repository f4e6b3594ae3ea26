"""Two baselines for the wind tunnels, over token ids like :class:`gradattn.nn.TinyGPT`.

Both take one sequence of token ids ``tokens (T,)`` and return ``logits (T, n_outputs)`` (vmap for
batches), and are built as ``TinyGPT`` is (``rngs`` and ``dtype`` keywords, sizes checked at the
door). They follow the companion paper's controls, taken from the authors' descriptions:

* :class:`TokenMLP`, the attention-free "MLP control": a residual MLP applied at each position on
  its own. Position t's logits are a function of token t and of t alone, so on a task whose answer
  depends on earlier tokens it can learn only the marginal answer at each position; with the same
  embeddings, the same head and about the same number of parameters as the 6-layer GPT, it shows
  that mixing information across positions is what the transformer needs.
* :class:`TokenLSTM`, the recurrent baseline: a stack of LSTM layers, causal by construction.

Initialisation is PyTorch's default for every linear map and LSTM weight (uniform in
+-1/sqrt(fan_in), biases included; the LSTM's in +-1/sqrt(d_model), as ``torch.nn.LSTM``), norms
start at scale 1 and bias 0. The embeddings are drawn N(0, embed_std^2), ``embed_std`` 0.02 by
default as in ``TinyGPT``; the authors' PyTorch modules left ``nn.Embedding`` at its default
N(0, 1), which ``embed_std=1.0`` gives. Neither model has dropout (train without).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gradattn._checks import check_array, check_int, check_number, concrete
from gradattn.nn import GPT_INIT_STD, _layer_norm, _linear, _torch_uniform

CONTROL_RMS_NORM_EPS = 1e-5
"""The MLP control's final RMSNorm epsilon (the authors' RMSNorm default; ``TinyGPT`` uses 1e-6)."""


def _check_common(fn: str, rngs, vocab_size, d_model, n_layers, n_outputs, dtype, embed_std):
    """The constructor arguments both baselines share, checked; returns them normalised."""
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(f"{fn}: rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    vocab_size = check_int("vocab_size", vocab_size, fn, minimum=2)
    d_model, n_layers = check_int("d_model", d_model, fn), check_int("n_layers", n_layers, fn)
    n_outputs = vocab_size if n_outputs is None else check_int("n_outputs", n_outputs, fn, minimum=2)
    try:
        floating = bool(jnp.issubdtype(dtype, jnp.floating))
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"{fn}: dtype must be floating point, got {dtype!r}")
    embed_std = check_number("embed_std", embed_std, fn, minimum=0.0, exclusive_minimum=True)
    return vocab_size, d_model, n_layers, n_outputs, embed_std


def _check_tokens(tokens, vocab_size: int, max_len: int | None, fn: str) -> int:
    """``tokens`` must be one sequence ``(T,)`` of integer ids, 1 <= T (<= max_len when there is
    one), in [0, vocab_size) where the values can be read (not under a transformation); returns T."""
    check_array("tokens", tokens, fn)
    shape = tuple(jnp.shape(tokens))
    n = shape[0] if len(shape) == 1 else 0
    longest = "" if max_len is None else f" <= max_len = {max_len}"
    if len(shape) != 1 or n < 1 or (max_len is not None and n > max_len):
        raise ValueError(f"{fn}: tokens must have shape (T,) with 1 <= T{longest}, got shape {shape}; "
                         "use jax.vmap for batches")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise TypeError(f"{fn}: tokens must be integer token ids, got dtype {jnp.result_type(tokens)}")
    values = concrete(tokens)
    if values is not None and (values.min() < 0 or values.max() >= vocab_size):
        raise ValueError(f"{fn}: tokens hold ids in [{values.min()}, {values.max()}], outside [0, {vocab_size}) "
                         f"(vocab_size = {vocab_size})")
    return n


def _embed(n: int, d: int, std: float, rngs: nnx.Rngs, dtype) -> nnx.Embed:
    return nnx.Embed(n, d, embedding_init=nnx.initializers.normal(std), param_dtype=dtype, rngs=rngs)


def _head(d_in: int, d_out: int, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    """A bias-free output head with PyTorch's default initialisation, U(+-1/sqrt(d_in))."""
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=_torch_uniform(d_in), param_dtype=dtype, rngs=rngs)


# --------------------------------------------------------------------------------------------
# The MLP control
# --------------------------------------------------------------------------------------------


class _MLPBlock(nnx.Module):
    """``h + W_2 GELU(W_1 LayerNorm(h) + b_1) + b_2`` at each position (4x wide, exact GELU)."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype):
        self.ln = _layer_norm(d_model, rngs, dtype)
        self.fc_1 = _linear(d_model, 4 * d_model, rngs, dtype)
        self.fc_2 = _linear(4 * d_model, d_model, rngs, dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        return h + self.fc_2(jax.nn.gelu(self.fc_1(self.ln(h)), approximate=False))


class TokenMLP(nnx.Module):
    """The attention-free MLP control over a sequence of token ids (one at a time; vmap for batches)::

        h^0_t = E[token_t] + P[t]                           token and learned position embeddings
        for each of n_layers blocks:
            h_t = h_t + W_2 GELU(W_1 LayerNorm(h_t) + b_1) + b_2      4 d_model wide, exact GELU
        logits_t = RMSNorm(h_t) E^T                         tied head (n_outputs = vocab_size)
                 = RMSNorm(h_t) W_out                       or an untied bias-free head of n_outputs

    Nothing mixes positions: position t's logits depend only on token t and on t. On a task whose
    answer at t depends on earlier tokens (the bijection: which values are still unused) the best
    it can do is the marginal answer at each position, whatever its size, so set beside
    :class:`~gradattn.nn.TinyGPT` it separates what the architecture can compute from what
    capacity buys.

    LayerNorm has eps 1e-5 and a bias, the final RMSNorm eps 1e-5 and a scale; the linear maps have
    biases and PyTorch's initialisation, U(+-1/sqrt(fan_in)) for weight and bias (an untied head
    too, without a bias); embeddings N(0, embed_std^2). Tied, it has ``vocab_size d + max_len d +
    n_layers (8 d^2 + 7 d) + d`` parameters (an untied head adds ``d n_outputs``). At d_model 192
    and 9 blocks it is matched in capacity to the 6-layer GPT: 2,681,280 parameters against
    ``TinyGPT``'s 2,671,488 at vocabulary 40 and 37 positions (0.4% more), and 2,681,472 at 38
    positions, the authors' count for their control.

    Args:
      vocab_size: input token ids are in [0, vocab_size).
      max_len: the longest sequence (rows of the position embedding).
      d_model, n_layers: width and number of blocks.
      n_outputs: output classes; ``None`` (default) or ``vocab_size``: the tied head.
      rngs: ``nnx.Rngs`` for the initial parameters.
      dtype: parameter dtype (floating point).
      embed_std: standard deviation of the embeddings' initialisation (0.02; the authors' 1.0).
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int = 192, n_layers: int = 9,
                 n_outputs: int | None = None, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 embed_std: float = GPT_INIT_STD):
        fn = "TokenMLP"
        vocab_size, d_model, n_layers, n_outputs, embed_std = _check_common(
            fn, rngs, vocab_size, d_model, n_layers, n_outputs, dtype, embed_std)
        max_len = check_int("max_len", max_len, fn)
        self.vocab_size, self.max_len, self.d_model, self.n_layers, self.n_classes = (
            vocab_size, max_len, d_model, n_layers, n_outputs)
        self.tok = _embed(vocab_size, d_model, embed_std, rngs, dtype)
        self.pos = _embed(max_len, d_model, embed_std, rngs, dtype)
        self.blocks = nnx.List([_MLPBlock(d_model, rngs=rngs, dtype=dtype) for _ in range(n_layers)])
        self.ln_f = nnx.RMSNorm(d_model, epsilon=CONTROL_RMS_NORM_EPS, use_fast_variance=False, param_dtype=dtype,
                                rngs=rngs)
        self.head = None if n_outputs == vocab_size else _head(d_model, n_outputs, rngs, dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(T, n_outputs)`` of one sequence of token ids ``tokens (T,)``, 1 <= T <= max_len."""
        n = _check_tokens(tokens, self.vocab_size, self.max_len, "TokenMLP")
        h = self.tok(tokens) + self.pos.embedding[:n]
        for block in self.blocks:
            h = block(h)
        h = self.ln_f(h)
        return self.tok.attend(h) if self.head is None else self.head(h)


# --------------------------------------------------------------------------------------------
# The LSTM
# --------------------------------------------------------------------------------------------


class _LSTMLayer(nnx.Module):
    """One LSTM layer over a sequence, ``torch.nn.LSTM(d_in, d, 1)``'s cell::

        i, f, g, o = split(x_t W_ih + b_ih + h_{t-1} W_hh + b_hh)     gates in this order
        c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g),   h_t = sigmoid(o) tanh(c_t),   h_0 = c_0 = 0

    with both bias vectors, as PyTorch has them, and every weight and bias U(+-1/sqrt(d)).
    """

    def __init__(self, d_in: int, d: int, *, rngs: nnx.Rngs, dtype):
        init = _torch_uniform(d)
        self.ih = nnx.Linear(d_in, 4 * d, kernel_init=init, bias_init=init, param_dtype=dtype, rngs=rngs)
        self.hh = nnx.Linear(d, 4 * d, kernel_init=init, bias_init=init, param_dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Hidden states ``(T, d)`` of the sequence ``x (T, d_in)``."""
        # the input's part of every gate at all positions at once; the recurrence in one scan
        b_hh = self.hh.bias
        assert b_hh is not None  # built with a bias
        return _lstm_recurrence(self.ih(x), self.hh.kernel[...], b_hh[...])


@jax.jit
def _lstm_recurrence(gx: jax.Array, w_hh: jax.Array, b_hh: jax.Array) -> jax.Array:
    """``h_t`` for t = 0..T-1 from the input's gate parts ``gx (T, 4d)``, from h_0 = c_0 = 0.

    Compiled once per shape (called eagerly, a scan over a fresh closure would compile on every
    call); inside another transformation it is traced into the caller's program.
    """

    def step(carry, g_t):
        h, c = carry
        i, f, g, o = jnp.split(g_t + h @ w_hh + b_hh, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zero = jnp.zeros(w_hh.shape[:1], gx.dtype)
    _, hs = jax.lax.scan(step, (zero, zero), gx)
    return hs


class TokenLSTM(nnx.Module):
    """A stacked LSTM over a sequence of token ids (one at a time; vmap for batches)::

        h^0_t = E[token_t] (+ P[t] when max_len is given)   token (and learned position) embeddings
        h^l = LSTM_l(h^{l-1})                               n_layers single-layer LSTMs of width d_model
        logits_t = LayerNorm(h^L_t) W_out                   untied bias-free head of n_outputs

    Causal by construction: position t's logits depend on tokens 0..t only. The authors' bijection
    LSTM (six single-layer LSTMs of width 192, LayerNorm, an untied bias-free head, about 1.80M
    parameters; ``TokenLSTM(40, 192, 6, max_len=38)`` has 1,801,728) had learned positions; pass
    ``max_len`` to have them too. Without it (the default) there is no position embedding, as in
    their HMM LSTM, and any length is accepted.

    Each LSTM layer is ``torch.nn.LSTM``'s (gates i, f, g, o; both bias vectors; weights and biases
    U(+-1/sqrt(d_model)); zero initial state); LayerNorm eps 1e-5; the head U(+-1/sqrt(d_model));
    embeddings N(0, embed_std^2). It has ``vocab_size d + n_layers (8 d^2 + 8 d) + 2 d + d n_outputs``
    parameters, plus ``max_len d`` with positions.

    Args:
      vocab_size: input token ids are in [0, vocab_size).
      d_model, n_layers: width and number of LSTM layers.
      n_outputs: output classes; ``None`` (default): ``vocab_size``.
      rngs: ``nnx.Rngs`` for the initial parameters.
      dtype: parameter dtype (floating point).
      max_len: the longest sequence, with a learned position embedding of that many rows; ``None``
        (default): no position embedding.
      embed_std: standard deviation of the embeddings' initialisation (0.02; the authors' 1.0).
    """

    def __init__(self, vocab_size: int, d_model: int = 192, n_layers: int = 6, n_outputs: int | None = None, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, max_len: int | None = None, embed_std: float = GPT_INIT_STD):
        fn = "TokenLSTM"
        vocab_size, d_model, n_layers, n_outputs, embed_std = _check_common(
            fn, rngs, vocab_size, d_model, n_layers, n_outputs, dtype, embed_std)
        max_len = None if max_len is None else check_int("max_len", max_len, fn)
        self.vocab_size, self.max_len, self.d_model, self.n_layers, self.n_classes = (
            vocab_size, max_len, d_model, n_layers, n_outputs)
        self.tok = _embed(vocab_size, d_model, embed_std, rngs, dtype)
        self.pos = None if max_len is None else _embed(max_len, d_model, embed_std, rngs, dtype)
        self.layers = nnx.List([_LSTMLayer(d_model, d_model, rngs=rngs, dtype=dtype) for _ in range(n_layers)])
        self.ln_f = _layer_norm(d_model, rngs, dtype)
        self.head = _head(d_model, n_outputs, rngs, dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(T, n_outputs)`` of one sequence of token ids ``tokens (T,)``, 1 <= T (<= max_len
        when the model has positions)."""
        n = _check_tokens(tokens, self.vocab_size, self.max_len, "TokenLSTM")
        h = self.tok(tokens)
        if self.pos is not None:
            h = h + self.pos.embedding[:n]
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln_f(h))
