"""The companion paper's small GPT over token ids: its architecture detail by detail, its parameter
count against the authors' formula, and the per-head laws inside it against autodiff (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gradattn.deep import head_laws
from gradattn.deep.laws import _laws_and_autodiff
from gradattn.nn import GPT_INIT_STD, RMS_NORM_EPS, HeadTaps, TinyGPT, n_params
from gradattn.verify import relative_error


def formula(vocab, max_len, d, layers, n_outputs=None):
    """The authors' count: token and position embeddings, per layer two norm scales and 12 d^2
    (q, k, v, o and the 4x feed-forward, no biases), the final norm; an untied head adds d C."""
    tied = vocab * d + max_len * d + layers * (2 * d + 12 * d * d) + d
    return tied if n_outputs is None else tied + d * n_outputs


@pytest.mark.parametrize("sizes", [(20, 39, 192, 6, 6, None), (40, 37, 64, 4, 4, None), (105, 93, 32, 2, 4, 5)])
def test_parameter_count_is_the_authors_formula(sizes):
    vocab, max_len, d, layers, heads, outputs = sizes
    model = TinyGPT(vocab, max_len, d, layers, heads, outputs, rngs=nnx.Rngs(0))
    assert n_params(model) == formula(vocab, max_len, d, layers, outputs)
    if sizes[0] == 20:
        assert n_params(model) == 2_668_032  # V 20, T 39, d 192, 6 layers: the authors' src TinyGPT


def test_architecture_detail_by_detail():
    model = TinyGPT(50, 16, 64, 2, 4, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    names = {"/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(state)}
    assert not [n for n in names if "bias" in n]  # bias-free everywhere
    block = model.blocks[0]
    assert isinstance(block.ln_1, nnx.RMSNorm) and block.ln_1.epsilon == RMS_NORM_EPS == 1e-6
    assert block.ff_1.kernel.shape == (64, 256)  # 4x feed-forward
    for w in (model.tok.embedding, model.pos.embedding, block.q_proj.kernel, block.ff_2.kernel):
        assert abs(float(jnp.std(w[...])) - GPT_INIT_STD) < 0.1 * GPT_INIT_STD  # N(0, 0.02^2)
    np.testing.assert_array_equal(block.ln_1.scale[...], 1.0)
    tokens = jnp.array([3, 7, 7, 1, 49])
    logits = model(tokens)
    # tied head: the logits are the final RMSNorm's output times the token embedding's transpose
    h = model.tok(tokens) + model.pos.embedding[:5]
    for b in model.blocks:
        h, _ = b(h, [None] * 3, HeadTaps())
    want = model.ln_f(h) @ model.tok.embedding[...].T
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
    # causal: a later token does not change earlier logits
    np.testing.assert_allclose(model(tokens.at[4].set(0))[:4], logits[:4], rtol=1e-6, atol=1e-6)
    # exact GELU in the feed-forward: the erf form, not tanh's approximation
    x = jnp.linspace(-3, 3, 7)
    assert not np.allclose(jax.nn.gelu(x, approximate=False), jax.nn.gelu(x, approximate=True), atol=1e-5)


def test_per_head_laws_hold_inside_the_token_gpt_float64():
    with jax.enable_x64(True):
        model = TinyGPT(12, 9, 16, 2, 2, rngs=nnx.Rngs(3), dtype=jnp.float64)
        tokens = jax.random.randint(jax.random.key(0), (9,), 0, 12)
        y = jax.random.randint(jax.random.key(1), (9,), 0, 12)
        mask = jnp.array([1, 0, 1, 0, 1, 0, 1, 0, 1], jnp.float64)  # supervised positions only
        graphdef, params = nnx.split(model, nnx.Param)
        lw, ds, da, dv = _laws_and_autodiff(graphdef, params, tokens, y, mask, (2, 2, 9, 8))
        assert relative_error(lw.routing_grad, ds) < 1e-9
        assert relative_error(lw.value_grad, dv) < 1e-9
        assert relative_error(lw.compatibility, da) < 1e-9
        public = head_laws(model, tokens, y, mask)
        assert relative_error(public.routing_grad, lw.routing_grad) < 1e-12  # eager and compiled, one answer


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(vocab_size=1, max_len=4), ValueError, "vocab_size"),
    (dict(vocab_size=8, max_len=4, d_model=10, n_heads=3), ValueError, "divisible"),
    (dict(vocab_size=8, max_len=4, n_outputs=1), ValueError, "n_outputs"),
])
def test_bad_sizes(kwargs, error, fragment):
    with pytest.raises(error, match=f"TinyGPT.*{fragment}"):
        TinyGPT(**kwargs, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("tokens, error, fragment", [
    (jnp.zeros((2, 3), jnp.int32), ValueError, "shape \\(T,\\)"),
    (jnp.zeros((9,), jnp.int32), ValueError, "max_len = 8"),
    (jnp.zeros((3,)), TypeError, "integer token ids"),
])
def test_bad_tokens(tokens, error, fragment):
    model = TinyGPT(8, 8, 8, 1, 2, rngs=nnx.Rngs(0))
    with pytest.raises(error, match=f"TinyGPT.*{fragment}"):
        model(tokens)
