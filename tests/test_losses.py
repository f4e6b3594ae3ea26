"""Cross-entropy against labels or soft targets, weighted or with ignored positions: the loss equals
its definition computed in numpy, and its gradient equals autodiff of it (float64, < 1e-9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradattn.head import token_losses
from gradattn.losses import cross_entropy, cross_entropy_error, soft_token_losses
from gradattn.verify import relative_error


def instance(n=7, c=5, seed=0, zeros=True):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(n, c)) * 2.0)
    p = rng.dirichlet(np.ones(c), size=n)
    if zeros:  # exact posteriors put 0 on impossible classes (the bijection's revealed values)
        p[:, 0] = 0.0
        p /= p.sum(axis=1, keepdims=True)
    y = jnp.asarray(rng.integers(0, c, size=n), jnp.int32)
    w = jnp.asarray(rng.integers(0, 2, size=n).astype(np.float64) + (np.arange(n) == 0))  # 0/1, at least one 1
    return logits, jnp.asarray(p), y, w


def numpy_loss(logits, p, w):
    z = np.asarray(logits, np.float64)
    logq = z - z.max(1, keepdims=True)
    logq -= np.log(np.exp(logq).sum(1, keepdims=True))
    per = -np.sum(np.where(np.asarray(p) > 0, np.asarray(p) * logq, 0.0), axis=1)
    w = np.ones(len(per)) if w is None else np.asarray(w, np.float64)
    return float(np.sum(w * per) / np.sum(w))


@pytest.mark.parametrize("soft", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_loss_is_its_definition_and_its_gradient_is_autodiff(soft, weighted):
    logits, p, y, w = instance()
    targets = p if soft else y
    weights = w if weighted else None
    want = numpy_loss(logits, p if soft else jax.nn.one_hot(y, 5, dtype=jnp.float64), weights)
    assert abs(float(cross_entropy(logits, targets, weights)) - want) < 1e-12
    auto = jax.grad(cross_entropy)(logits, targets, weights)
    assert relative_error(cross_entropy_error(logits, targets, weights), auto) < 1e-9
    if weighted:  # an ignored position has no gradient at all
        assert np.all(np.asarray(cross_entropy_error(logits, targets, weights))[np.asarray(w) == 0] == 0)


def test_a_label_is_its_one_hot_distribution():
    logits, _, y, w = instance(zeros=False)
    one_hot = jax.nn.one_hot(y, 5, dtype=jnp.float64)
    np.testing.assert_allclose(soft_token_losses(logits, one_hot), token_losses(logits, y), rtol=0, atol=1e-13)
    assert abs(float(cross_entropy(logits, one_hot, w)) - float(cross_entropy(logits, y, w))) < 1e-13


def test_soft_loss_is_entropy_plus_kl_and_minimal_at_the_target():
    _, p, _, _ = instance()
    logp = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -1e30)  # logits whose softmax is p
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)
    assert abs(float(cross_entropy(logp, p)) - float(entropy.mean())) < 1e-12
    assert float(jnp.max(jnp.abs(cross_entropy_error(logp, p)))) < 1e-12


def test_batches_are_vmapped_sequences():
    batch = [instance(seed=s) for s in range(3)]
    logits, p = jnp.stack([b[0] for b in batch]), jnp.stack([b[1] for b in batch])
    per = jax.vmap(cross_entropy)(logits, p)
    np.testing.assert_allclose(per, [numpy_loss(b[0], b[1], None) for b in batch], rtol=1e-12)


@pytest.mark.parametrize("args, error, fragment", [
    ((jnp.zeros((3, 4)), jnp.zeros((3, 5))), ValueError, "shape \\(3, 4\\)"),
    ((jnp.zeros((3, 4)), jnp.zeros((2,), jnp.int32)), ValueError, "y must have shape \\(3,\\)"),
    ((jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32)), ValueError, "logits must be a floating \\(N, C\\)"),
    ((jnp.zeros((3, 4)), [0, 1, 2]), TypeError, "targets must be an array"),
    ((jnp.zeros((3, 4)), jnp.array([0, 1, 4])), ValueError, "outside \\[0, 4\\)"),
    ((jnp.zeros((3, 4)), jnp.zeros((3, 4)), jnp.ones(2)), ValueError, "weights must have shape \\(3,\\)"),
])
def test_bad_input_is_refused_at_the_door(args, error, fragment):
    for fn in (cross_entropy, cross_entropy_error):
        with pytest.raises(error, match=f"{fn.__name__}.*{fragment}"):
            fn(*args)
