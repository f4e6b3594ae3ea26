"""gradattn.nn: the NNX head follows gradattn.train; the deep Transformer is the reference model."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gradattn.head import HeadParams, forward, init_head
from gradattn.nn import AttentionHead, HeadTaps, Transformer, n_params
from gradattn.training import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _build(cls, *args, **kw):
    """``cls(*args, **kw, rngs=nnx.Rngs(0))`` initialised under one jit (eager init compiles every op)."""
    make = lambda: cls(*args, **kw, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())


def test_attention_head_wraps_the_pure_functions():
    head = AttentionHead(6, 4, 5, 3, rngs=nnx.Rngs(0))
    p = head.params
    assert isinstance(p, HeadParams) and p.w_q.shape == (6, 4) and p.w_o.shape == (5, 3)
    x = jax.random.normal(jax.random.key(1), (9, 6), jnp.float32)
    np.testing.assert_array_equal(head(x), forward(p, x).logits)
    again = AttentionHead.from_params(p)
    for a, b in zip(again.params, p):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match=r"AttentionHead\.from_params: params\b.*HeadParams.*got tuple"):
        AttentionHead.from_params((p.w_q,))
    with pytest.raises(TypeError, match=r"AttentionHead: rngs\b.*nnx\.Rngs.*got int"):
        AttentionHead(6, 4, 5, 3, rngs=0)


def test_attention_head_nnx_optimizer_follows_train():
    p0 = init_head(jax.random.key(2), 5, 3, 4, 3)
    kx, ky = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (12, 5), jnp.float32)
    y = jax.random.randint(ky, (12,), 0, 3)
    lr, steps = 0.3, 5
    final, hist = train(p0, x, y, optax.sgd(lr), steps, grad_source="autodiff")

    head = AttentionHead.from_params(p0)
    opt = nnx.Optimizer(head, optax.sgd(lr), wrt=nnx.Param)

    def loss(m):
        logp = jax.nn.log_softmax(m(x), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    losses = []
    @nnx.jit
    def step(head, opt):
        value, grads = nnx.value_and_grad(loss)(head)
        opt.update(head, grads)
        return value

    losses = [step(head, opt) for _ in range(steps)]
    np.testing.assert_allclose(losses, hist["loss"], rtol=1e-5)
    for a, b in zip(head.params, final.params):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(head.params.w_v, p0.w_v)  # it did train


def test_transformer_parameter_count_and_init():
    """The default model's parameter count (from its shapes, nothing initialised); the init rules
    (PyTorch's U(+-1/sqrt(fan_in)) for every Linear, LayerNorm 1/0 with eps 1e-5) on a model of the
    default widths with one block instead of four: every block is built by the same code, and one
    block compiles its init in a quarter of the time."""
    assert n_params(nnx.eval_shape(lambda: Transformer(rngs=nnx.Rngs(0)))) == 201_928
    one_block = lambda: Transformer(20, 64, 1, 4, 8, rngs=nnx.Rngs(0))  # noqa: E731
    model = _build(Transformer, 20, 64, 1, 4, 8)
    assert n_params(model) == n_params(nnx.eval_shape(one_block)) < 201_928
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Linear):
            bound = 1 / math.sqrt(var.kernel.shape[0])
            kernel, bias = np.abs(var.kernel[...]), np.abs(var.bias[...])
            # Both drawn within the bound, the bias too (not zero); together they reach near it (an
            # 8-entry bias alone need not: its largest |entry| is below 0.8 of the bound 17% of the time).
            assert max(kernel.max(), bias.max()) <= bound and bias.max() > 0, path
            assert max(kernel.max(), bias.max()) > 0.8 * bound and kernel.max() > 0.8 * bound, path
        if isinstance(var, nnx.LayerNorm):
            np.testing.assert_array_equal(var.scale[...], 1.0)
            np.testing.assert_array_equal(var.bias[...], 0.0)
            assert var.epsilon == 1e-5


def _small(dropout=0.1, dtype=jnp.float32):
    return _build(Transformer, 5, 8, 2, 2, 3, dropout, dtype=dtype)


def test_taps_dropout_and_perturbation():
    model, model0 = _small(), _small(dropout=0.0)
    x = jax.random.normal(jax.random.key(5), (7, 5), jnp.float32)
    k, k2 = jax.random.key(6), jax.random.key(7)

    @nnx.jit
    def outputs(model, model0, x):
        logits, taps = model(x, return_taps=True)
        zero = HeadTaps(*(jnp.zeros_like(a) for a in taps))
        return dict(
            logits=logits, taps=taps, again=model(x),
            zero=model(x, perturb=zero),
            nudged=model(x, perturb=HeadTaps(contexts=zero.contexts.at[1, 0, 3].set(1.0))),
            drop=model(x, dropout_key=k), drop_same=model(x, dropout_key=k), drop_other=model(x, dropout_key=k2),
            rate0_drop=model0(x, dropout_key=k), rate0=model0(x),
        )

    o = outputs(model, model0, x)
    logits, taps = o["logits"], o["taps"]
    assert logits.shape == (7, 3) and taps.alpha.shape == (2, 2, 7, 7) and taps.values.shape == (2, 2, 7, 4)
    np.testing.assert_allclose(taps.alpha.sum(-1), 1.0, rtol=1e-6)
    assert float(jnp.max(jnp.abs(jnp.triu(taps.alpha, 1)))) == 0.0
    np.testing.assert_allclose(taps.contexts, taps.alpha @ taps.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(o["again"], logits)  # evaluation mode is deterministic
    np.testing.assert_allclose(o["zero"], logits, rtol=1e-6)
    assert np.allclose(o["nudged"][:3], logits[:3]) and not np.allclose(o["nudged"][3], logits[3])  # causal
    np.testing.assert_array_equal(o["drop"], o["drop_same"])
    assert not np.allclose(o["drop"], logits) and not np.allclose(o["drop"], o["drop_other"])
    np.testing.assert_array_equal(o["rate0_drop"], o["rate0"])


def test_transformer_input_checks():
    with pytest.raises(ValueError, match=r"Transformer: d_model=10\b.*divisible.*n_heads=4"):
        Transformer(5, 10, 1, 4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"Transformer: rngs\b.*nnx\.Rngs.*got NoneType"):
        Transformer(rngs=None)
    with pytest.raises(ValueError, match=r"Transformer: dropout\b.*\[0\.0, 1\.0\).*got 1\.0"):
        Transformer(5, 8, 1, 2, 3, 1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Transformer: x\b.*d_in = 5.*\(4, 6\)"):
        nnx.eval_shape(lambda: Transformer(5, 8, 2, 2, 3, rngs=nnx.Rngs(0)))(jnp.ones((4, 6), jnp.float32))


def test_same_model_as_pytorch():
    """Weights copied into the PyTorch reference model give the same logits (float64): exact-erf
    GELU, LayerNorm eps 1e-5, pre-norm blocks, causal attention with the diagonal, scale 1/sqrt(d_h)."""
    torch = pytest.importorskip("torch", reason="PyTorch (the bench extra) is not installed; `make test-all` installs it")
    spec = importlib.util.spec_from_file_location("deep_step", ROOT / "benchmarks" / "deep_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with jax.enable_x64(True):
        model = _small(dtype=jnp.float64)
        ref = bench.TorchTransformer(5, 8, 2, 2, 3, 0.1).double().eval()
        bench.copy_weights(model, ref)
        x = jax.random.normal(jax.random.key(8), (11, 5), jnp.float64)
        ours = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
        with torch.no_grad():
            theirs = ref(torch.from_numpy(np.array(x))).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
