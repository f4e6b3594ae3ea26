"""The wind tunnels' baselines over token ids: the MLP control (no mixing across positions) and the
stacked LSTM (causal): shapes, batching, what each logit can depend on, parameter counts against
formulas and against the 6-layer GPT, PyTorch's modules with the same weights, a short training
run, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gradattn.baselines import CONTROL_RMS_NORM_EPS, TokenLSTM, TokenMLP
from gradattn.nn import LAYER_NORM_EPS, TinyGPT, n_params


def mlp_formula(vocab, max_len, d, layers, n_outputs=None):
    """Token and position embeddings; per block a LayerNorm (2 d) and two biased linear maps
    (d x 4d + 4d, 4d x d + d); the final RMSNorm's scale (d); an untied head adds d C."""
    tied = vocab * d + max_len * d + layers * (2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)) + d
    return tied if n_outputs in (None, vocab) else tied + d * n_outputs


def lstm_formula(vocab, d, layers, n_outputs=None, max_len=None):
    """Token (and position) embeddings; per layer W_ih, W_hh (4d x d each) and two bias vectors
    (4d each), as torch.nn.LSTM has them; the LayerNorm (2 d); the untied head (d C)."""
    c = vocab if n_outputs is None else n_outputs
    return vocab * d + (max_len or 0) * d + layers * (2 * 4 * d * d + 2 * 4 * d) + 2 * d + d * c


def count(build):
    """Parameters of the model ``build()`` makes, counted on shapes alone (nothing is drawn)."""
    return n_params(nnx.eval_shape(build))


def small(kind, dtype=jnp.float64, n_outputs=None, seed=0, **kw):
    if kind == "mlp":
        return TokenMLP(11, 9, 16, 2, n_outputs, rngs=nnx.Rngs(seed), dtype=dtype, **kw)
    return TokenLSTM(11, 16, 2, n_outputs, rngs=nnx.Rngs(seed), dtype=dtype, max_len=kw.pop("max_len", 9), **kw)


TOKENS = jnp.array([3, 0, 10, 7, 7, 1, 4, 9, 2])


# --------------------------------------------------------------------------------------------
# Shapes, dtypes, batching
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("n_outputs", [None, 5])
def test_output_shape_and_dtype(kind, dtype, n_outputs):
    model = small(kind, dtype, n_outputs)
    for n in (1, 9):
        logits = model(TOKENS[:n].astype(jnp.int32))
        assert logits.shape == (n, 11 if n_outputs is None else 5)
        assert logits.dtype == dtype
        assert np.isfinite(np.asarray(logits)).all()
    assert model.n_classes == (11 if n_outputs is None else 5)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_jit_and_vmap_over_a_batch_equal_per_sequence_calls(kind):
    model = small(kind, jnp.float32)
    batch = jax.random.randint(jax.random.key(1), (5, 9), 0, 11)
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def apply(p, tokens):
        return jax.vmap(lambda t: nnx.merge(graphdef, p)(t))(tokens)

    together = apply(params, batch)
    assert together.shape == (5, 9, 11)
    for b in range(5):
        np.testing.assert_allclose(together[b], model(batch[b]), rtol=1e-5, atol=1e-6)
    # nnx's own transforms on the module itself give the same
    np.testing.assert_allclose(nnx.jit(lambda m, t: nnx.vmap(lambda x: m(x))(t))(model, batch), together,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_built_under_vmap_over_keys(kind):
    """The wind tunnels vmap a whole run, the model's construction included, over seeds."""
    def params_of(key):
        m = (TokenMLP(11, 9, 16, 2, rngs=nnx.Rngs(key)) if kind == "mlp"
             else TokenLSTM(11, 16, 2, rngs=nnx.Rngs(key), max_len=9))
        return nnx.state(m, nnx.Param)

    stacked = jax.vmap(params_of)(jax.random.split(jax.random.key(0), 3))
    one = params_of(jax.random.split(jax.random.key(0), 3)[1])
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(one)):
        assert a.shape == (3, *b.shape)
        np.testing.assert_allclose(a[1], b, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# What each logit depends on
# --------------------------------------------------------------------------------------------


def test_mlp_position_t_sees_only_token_t_and_t():
    model = small("mlp")
    logits = model(TOKENS)
    n = TOKENS.shape[0]
    for s in range(n):
        changed = model(TOKENS.at[s].set((TOKENS[s] + 1) % 11))
        others = np.arange(n) != s
        np.testing.assert_allclose(changed[others], logits[others], rtol=1e-13, atol=1e-13)
        assert np.max(np.abs(changed[s] - logits[s])) > 1e-3  # its own token does matter
    # and row t is a function of (token_t, t) alone: any other context gives the same row
    for t in range(n):
        np.testing.assert_allclose(model(jnp.full((n,), TOKENS[t]))[t], logits[t], rtol=1e-13, atol=1e-13)
    # the position matters too (learned positions): one token at two positions, two answers
    same = model(jnp.full((n,), 4))
    assert np.max(np.abs(same[0] - same[5])) > 1e-3


def test_lstm_is_causal_and_earlier_tokens_reach_later_logits():
    model = small("lstm")
    logits = model(TOKENS)
    n = TOKENS.shape[0]
    for s in range(n):
        changed = model(TOKENS.at[s].set((TOKENS[s] + 1) % 11))
        np.testing.assert_allclose(changed[:s], logits[:s], rtol=1e-13, atol=1e-13)  # the past is untouched
        for t in range(s, n):  # from s on, every position sees the change
            assert np.max(np.abs(changed[t] - logits[t])) > 1e-8, (s, t)


def test_lstm_without_positions_takes_any_length():
    model = TokenLSTM(11, 16, 2, rngs=nnx.Rngs(0), dtype=jnp.float64)
    assert model.pos is None and model.max_len is None
    long = jnp.arange(50) % 11
    out = model(long)
    assert out.shape == (50, 11)
    np.testing.assert_allclose(model(long[:20]), out[:20], rtol=1e-12, atol=1e-12)  # a prefix, the same logits


# --------------------------------------------------------------------------------------------
# Architecture and parameter counts
# --------------------------------------------------------------------------------------------


def test_mlp_matches_the_6_layer_gpt_in_capacity():
    mlp = count(lambda: TokenMLP(40, 37, 192, 9, rngs=nnx.Rngs(0)))
    gpt = count(lambda: TinyGPT(40, 37, 192, 6, 6, rngs=nnx.Rngs(0)))
    print(f"TokenMLP(40, 37, 192, 9): {mlp:,} parameters; TinyGPT(40, 37, 192, 6, 6): {gpt:,}")
    assert (mlp, gpt) == (2_681_280, 2_671_488)
    assert abs(mlp - gpt) / gpt < 0.05
    assert mlp == mlp_formula(40, 37, 192, 9)
    # at 38 positions: the authors' count for their MLP control
    assert count(lambda: TokenMLP(40, 38, 192, 9, rngs=nnx.Rngs(0))) == 2_681_472


@pytest.mark.parametrize("sizes", [(11, 9, 16, 2, None), (11, 9, 16, 2, 11), (20, 39, 8, 3, 5), (7, 3, 4, 1, 2)])
def test_mlp_parameter_count_is_the_formula(sizes):
    vocab, max_len, d, layers, outputs = sizes
    assert count(lambda: TokenMLP(vocab, max_len, d, layers, outputs, rngs=nnx.Rngs(0))) == mlp_formula(*sizes)


@pytest.mark.parametrize("sizes", [(40, 192, 6, None, 38), (11, 16, 2, None, None), (20, 8, 3, 5, 39), (7, 4, 1, 2, None)])
def test_lstm_parameter_count_is_the_formula(sizes):
    vocab, d, layers, outputs, max_len = sizes
    got = count(lambda: TokenLSTM(vocab, d, layers, outputs, rngs=nnx.Rngs(0), max_len=max_len))
    assert got == lstm_formula(*sizes)
    if sizes[0] == 40:
        assert got == 1_801_728  # six LSTMs of 192 with learned positions: the authors' "1.80M"


def test_mlp_architecture_detail_by_detail():
    model = TokenMLP(50, 16, 32, 2, rngs=nnx.Rngs(1))
    block = model.blocks[0]
    assert isinstance(block.ln, nnx.LayerNorm) and block.ln.epsilon == LAYER_NORM_EPS == 1e-5
    assert isinstance(model.ln_f, nnx.RMSNorm) and model.ln_f.epsilon == CONTROL_RMS_NORM_EPS == 1e-5
    assert block.fc_1.kernel.shape == (32, 128) and block.fc_1.bias.shape == (128,)  # 4x wide, biases
    assert block.fc_2.kernel.shape == (128, 32) and block.fc_2.bias.shape == (32,)
    for w, fan_in in ((block.fc_1.kernel, 32), (block.fc_1.bias, 32), (block.fc_2.kernel, 128), (block.fc_2.bias, 128)):
        w = np.asarray(w[...])
        assert np.abs(w).max() <= 1 / np.sqrt(fan_in) and np.abs(w).max() > 0.8 / np.sqrt(fan_in)  # U(+-1/sqrt(fan_in))
    for e in (model.tok.embedding, model.pos.embedding):
        assert abs(float(jnp.std(e[...])) - 0.02) < 0.002  # N(0, 0.02^2)
    authors = TokenMLP(50, 16, 32, 2, rngs=nnx.Rngs(1), embed_std=1.0)
    assert abs(float(jnp.std(authors.tok.embedding[...])) - 1.0) < 0.1
    assert model.head is None  # tied
    tokens = jnp.array([3, 7, 7, 1, 49])
    h = model.tok(tokens) + model.pos.embedding[:5]
    for b in model.blocks:
        h = h + b.fc_2(jax.nn.gelu(b.fc_1(b.ln(h)), approximate=False))
    want = model.ln_f(h) @ model.tok.embedding[...].T
    np.testing.assert_allclose(model(tokens), want, rtol=1e-5, atol=1e-6)
    untied = TokenMLP(50, 16, 32, 2, 7, rngs=nnx.Rngs(1))
    assert untied.head.kernel.shape == (32, 7) and untied.head.bias is None


def test_same_models_as_pytorch():
    """The same weights in PyTorch modules (nn.LayerNorm, nn.Linear, exact F.gelu, an RMSNorm
    x rsqrt(mean x^2 + eps) w, a tied head; nn.LSTM layers) give the same logits (float64)."""
    torch = pytest.importorskip("torch", reason="the PyTorch comparison needs torch (the bench extra)")
    F = torch.nn.functional

    def t(a, transpose=False):
        a = np.asarray(a[...], np.float64)
        return torch.tensor(a.T.copy() if transpose else a)

    tokens = jax.random.randint(jax.random.key(2), (9,), 0, 11)
    idx = torch.tensor(np.asarray(tokens))

    mlp = small("mlp", seed=4)
    with torch.no_grad():
        h = t(mlp.tok.embedding)[idx] + t(mlp.pos.embedding)[:9]
        for b in mlp.blocks:
            a = F.layer_norm(h, (16,), t(b.ln.scale), t(b.ln.bias), eps=1e-5)
            a = F.gelu(F.linear(a, t(b.fc_1.kernel, True), t(b.fc_1.bias)))
            h = h + F.linear(a, t(b.fc_2.kernel, True), t(b.fc_2.bias))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * t(mlp.ln_f.scale)
        want = h @ t(mlp.tok.embedding).T
    np.testing.assert_allclose(mlp(tokens), want.numpy(), rtol=1e-10, atol=1e-12)

    lstm = small("lstm", n_outputs=5, seed=5)
    layers = []
    for layer in lstm.layers:
        m = torch.nn.LSTM(16, 16, 1, batch_first=True).double()
        with torch.no_grad():
            m.weight_ih_l0.copy_(t(layer.ih.kernel, True))
            m.bias_ih_l0.copy_(t(layer.ih.bias))
            m.weight_hh_l0.copy_(t(layer.hh.kernel, True))
            m.bias_hh_l0.copy_(t(layer.hh.bias))
        layers.append(m)
    with torch.no_grad():
        h = (t(lstm.tok.embedding)[idx] + t(lstm.pos.embedding)[:9])[None]
        for m in layers:
            h, _ = m(h)
        h = F.layer_norm(h[0], (16,), t(lstm.ln_f.scale), t(lstm.ln_f.bias), eps=1e-5)
        want = F.linear(h, t(lstm.head.kernel, True))
    np.testing.assert_allclose(lstm(tokens), want.numpy(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, shift", [("mlp", 0), ("lstm", 1)])
def test_a_few_adam_steps_learn_a_copy_task(kind, shift):
    """Copy the current token (shift 0: each position on its own, which the MLP can do) or the
    previous one (shift 1: through the recurrence, which only the LSTM can)."""
    vocab, n, batch = 8, 8, 16
    model = (TokenMLP(vocab, n, 16, 2, rngs=nnx.Rngs(0)) if kind == "mlp"
             else TokenLSTM(vocab, 16, 1, rngs=nnx.Rngs(0), max_len=n))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(3e-2)

    def loss(p, tokens):
        logits = jax.vmap(lambda x: nnx.merge(graphdef, p)(x))(tokens)
        labels = jnp.roll(tokens, shift, axis=1)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)[:, shift:]
        return jnp.mean(ce)

    @jax.jit
    def step(carry, key):
        p, s = carry
        tokens = jax.random.randint(key, (batch, n), 0, vocab)
        value, g = jax.value_and_grad(loss)(p, tokens)
        updates, s = tx.update(g, s, p)
        return (optax.apply_updates(p, updates), s), value

    (params, _), curve = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(jax.random.key(1), 60))
    curve = np.asarray(curve)
    assert curve[0] > 0.9 * np.log(vocab)  # starts near chance
    assert curve[-5:].mean() < 0.5 * curve[0], curve


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(vocab_size=1), ValueError, "vocab_size"),
    (dict(vocab_size=8.0), TypeError, "vocab_size"),
    (dict(d_model=0), ValueError, "d_model"),
    (dict(d_model=True), TypeError, "d_model"),
    (dict(n_layers=0), ValueError, "n_layers"),
    (dict(n_outputs=1), ValueError, "n_outputs"),
    (dict(dtype=jnp.int32), TypeError, "dtype"),
    (dict(dtype="not a dtype"), TypeError, "dtype"),
    (dict(embed_std=0.0), ValueError, "embed_std"),
    (dict(embed_std="0.02"), TypeError, "embed_std"),
    (dict(max_len=0), ValueError, "max_len"),
    (dict(rngs=0), TypeError, "rngs"),
])
@pytest.mark.parametrize("cls", [TokenMLP, TokenLSTM])
def test_bad_sizes(cls, kwargs, error, fragment):
    args = dict(vocab_size=8, max_len=4, rngs=nnx.Rngs(0))
    args.update(kwargs)
    with pytest.raises(error, match=f"{cls.__name__}.*{fragment}"):
        cls(**args)


def test_mlp_needs_max_len():
    with pytest.raises(TypeError, match="max_len"):
        TokenMLP(8, rngs=nnx.Rngs(0))  # type: ignore[call-arg]


@pytest.mark.parametrize("tokens, error, fragment", [
    (jnp.zeros((2, 3), jnp.int32), ValueError, "shape \\(T,\\)"),
    (jnp.zeros((0,), jnp.int32), ValueError, "1 <= T"),
    (jnp.zeros((9,), jnp.int32), ValueError, "max_len = 8"),
    (jnp.zeros((3,)), TypeError, "integer token ids"),
    (jnp.array([0, 8, 1]), ValueError, "outside \\[0, 8\\)"),
    (jnp.array([0, -1, 1]), ValueError, "outside \\[0, 8\\)"),
    ([0, 1, 2], TypeError, "tokens must be an array"),
])
@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_bad_tokens(kind, tokens, error, fragment):
    model = (TokenMLP(8, 8, 8, 1, rngs=nnx.Rngs(0)) if kind == "mlp"
             else TokenLSTM(8, 8, 1, rngs=nnx.Rngs(0), max_len=8))
    name = type(model).__name__
    with pytest.raises(error, match=f"{name}.*{fragment}"):
        model(tokens)
