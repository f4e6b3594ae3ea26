"""The exact Bayes predictor of the sticky chain against a direct numpy forward algorithm."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradattn.bayes import (
    bayes_entropy,
    bayes_filter_entropy,
    bayes_log_filter,
    bayes_log_predictive,
    bayes_loss,
    bayes_predictive,
)
from gradattn.tasks import StickyMarkov


def numpy_forward(P, mu, x, return_filter=False, sigma=1.0):
    """Textbook forward algorithm in probability space, float64, renormalising every step."""
    P, mu, x = (np.asarray(a, np.float64) for a in (P, mu, x))
    c = P.shape[0]
    prior = np.full(c, 1.0 / c)
    preds, posts = [], []
    for xt in x:
        lik = np.exp(-0.5 * ((xt[None, :] - mu) ** 2).sum(-1) / sigma**2)
        post = prior * lik
        post /= post.sum()
        pred = post @ P
        preds.append(pred)
        posts.append(post)
        prior = pred
    return (np.stack(posts), np.stack(preds)) if return_filter else np.stack(preds)


def random_hmm(seed, c=5, d=4, n=60, scale=1.0):
    rng = np.random.default_rng(seed)
    P = rng.random((c, c)) + 0.1
    P /= P.sum(1, keepdims=True)
    mu = scale * rng.standard_normal((c, d))
    states = [rng.integers(c)]
    for _ in range(n - 1):
        states.append(rng.choice(c, p=P[states[-1]]))
    states = np.array(states)
    x = mu[states] + rng.standard_normal((n, d))
    y = np.array([rng.choice(c, p=P[s]) for s in states])
    return P, mu, x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_forward_float64(seed):
    P, mu, x, _ = random_hmm(seed)
    ours = np.asarray(bayes_predictive(P, mu, jnp.asarray(x, jnp.float64)))
    ref = numpy_forward(P, mu, x)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-12)
    beta, _ = numpy_forward(P, mu, x, return_filter=True)
    np.testing.assert_allclose(np.exp(bayes_log_filter(P, mu, jnp.asarray(x))), beta, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(bayes_filter_entropy(P, mu, jnp.asarray(x)), -(beta * np.log(beta)).sum(1), rtol=1e-9, atol=1e-12)


def test_far_apart_emissions_do_not_underflow():
    # Likelihoods exp(-||x-mu||^2/2) underflow in probability space here; log space must not care.
    P, mu, x, _ = random_hmm(3, scale=30.0)
    logp = np.asarray(bayes_log_predictive(P, mu, jnp.asarray(x, jnp.float64)))
    assert np.isfinite(logp).all()
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, atol=1e-12)


def test_zero_transitions_allowed():
    P = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    mu = np.eye(3) * 4.0
    x = jnp.asarray(mu[[0, 1, 2, 0]] + 0.1, jnp.float64)
    pred = np.asarray(bayes_predictive(P, mu, x))
    ref = numpy_forward(P, mu, np.asarray(x))
    np.testing.assert_allclose(pred, ref, atol=1e-12)
    assert np.isfinite(pred).all()


def test_first_position_uses_uniform_prior():
    P, mu, x, _ = random_hmm(4)
    pred = np.asarray(bayes_predictive(P, mu, jnp.asarray(x[:1], jnp.float64)))
    lik = np.exp(-0.5 * ((x[0] - mu) ** 2).sum(-1))
    np.testing.assert_allclose(pred[0], (lik / lik.sum()) @ P, rtol=1e-12)


def test_loss_and_entropy_per_position():
    P, mu, x, y = random_hmm(5)
    x = jnp.asarray(x, jnp.float64)
    ref = numpy_forward(P, mu, np.asarray(x))
    res = bayes_loss(P, mu, x, jnp.asarray(y))
    np.testing.assert_allclose(res.per_position, -np.log(ref[np.arange(len(y)), y]), rtol=1e-10)
    np.testing.assert_allclose(res.mean, res.per_position.mean(), rtol=1e-12)
    np.testing.assert_allclose(res.bits, res.mean / math.log(2), rtol=1e-12)
    ent = np.asarray(bayes_entropy(P, mu, x))
    np.testing.assert_allclose(ent, -(ref * np.log(ref)).sum(1), rtol=1e-10)
    w = np.zeros(len(y))
    w[10:20] = 1.0
    np.testing.assert_allclose(bayes_loss(P, mu, x, jnp.asarray(y), jnp.asarray(w)).mean, res.per_position[10:20].mean(), rtol=1e-12)


def test_float32_stays_float32_and_jit_vmap():
    P, mu, x, y = random_hmm(6)
    xs = jnp.asarray(np.stack([x, x[::-1]]), jnp.float32)
    f = jax.jit(jax.vmap(lambda xx: bayes_predictive(P, mu, xx)))
    out = f(xs)
    assert out.dtype == jnp.float32 and out.shape == (2, 60, 5)
    np.testing.assert_allclose(out[0], numpy_forward(P, mu, x), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(out[1], numpy_forward(P, mu, x[::-1]), rtol=2e-4, atol=1e-6)
    lf = jax.jit(lambda xx, yy: bayes_loss(P, mu, xx, yy))(xs[0], jnp.asarray(y))
    assert lf.mean.dtype == jnp.float32


def test_bad_inputs_name_argument_and_shapes():
    P, mu, x, y = random_hmm(7)
    with pytest.raises(ValueError, match="transition_matrix must be square"):
        bayes_predictive(P[:, :4], mu, x)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(C, d\) with C = 5"):
        bayes_predictive(P, mu[:4], x)
    with pytest.raises(ValueError, match=r"x must have shape \(N, d\) with d = 4"):
        bayes_predictive(P, mu, x[:, :3])
    with pytest.raises(ValueError, match="x must have shape"):
        bayes_predictive(P, mu, x[None])
    with pytest.raises(ValueError, match="sum to 1"):
        bayes_predictive(P * 2, mu, x)
    with pytest.raises(TypeError, match="x must be floating point"):
        bayes_predictive(P, mu, x.astype(np.int32))
    with pytest.raises(ValueError, match="y must have shape"):
        bayes_loss(P, mu, x, y[:-1])


def test_sticky_chain_bayes_loss_near_h_min():
    tasks = pytest.importorskip("gradattn.tasks")
    task = tasks.StickyMarkov()
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    xs, ys = jax.vmap(task.sample)(keys)
    losses = np.asarray(jax.vmap(lambda xx, yy: bayes_loss(task.transition_matrix, task.embeddings, xx, yy).mean)(xs, ys))
    assert np.all((losses > 1.74) & (losses < 1.92)), losses
    # Averaged over sequences the Bayes loss sits a little above H_min (1.8292): the filter is not
    # an oracle for y_{t-1}; single sequences scatter by about +-0.02.
    assert 1.80 < losses.mean() < 1.87, losses
    assert losses.mean() > task.h_min - 0.02
    np.testing.assert_allclose(task.bayes_predictive(xs[0]), bayes_predictive(task.transition_matrix, task.embeddings, xs[0]), rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_noise_std_matches_numpy_forward(sigma):
    # Data drawn at this noise level, so the posterior is as (un)certain as the task makes it.
    rng = np.random.default_rng(int(sigma * 10))
    P, mu, _, _ = random_hmm(8)
    states = rng.integers(0, 5, size=80)
    x = mu[states] + sigma * rng.standard_normal((80, 4))
    beta_ref, ref = numpy_forward(P, mu, x, return_filter=True, sigma=sigma)
    xj = jnp.asarray(x, jnp.float64)
    np.testing.assert_allclose(bayes_predictive(P, mu, xj, noise_std=sigma), ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(np.exp(bayes_log_filter(P, mu, xj, noise_std=sigma)), beta_ref, rtol=1e-10, atol=1e-13)
    if sigma != 1.0:  # the noise level changes the answer: the default would be wrong here
        assert np.abs(np.asarray(bayes_predictive(P, mu, xj)) - ref).max() > 1e-3


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_task_bayes_follows_its_noise(sigma):
    task = StickyMarkov(seq_len=120, noise_std=sigma)
    x, y = task.sample(jax.random.key(1), jnp.float64)
    beta_ref, ref = numpy_forward(task.transition_matrix, task.embeddings, np.asarray(x), return_filter=True, sigma=sigma)
    np.testing.assert_allclose(task.bayes_predictive(x), ref, rtol=1e-10, atol=1e-13)
    res = task.bayes_loss(x, y)
    np.testing.assert_allclose(res.per_position, -np.log(ref[np.arange(len(y)), np.asarray(y)]), rtol=1e-10)
    np.testing.assert_allclose(task.bayes_entropy(x), -(ref * np.log(ref)).sum(1), rtol=1e-9)
    np.testing.assert_allclose(task.bayes_filter_entropy(x), -(beta_ref * np.log(beta_ref)).sum(1), rtol=1e-8, atol=1e-12)


def test_larger_noise_leaves_the_posterior_uncertain():
    keys = jax.random.split(jax.random.key(0), 2)
    frac = []
    for sigma in (1.0, 3.0):
        task = StickyMarkov(seq_len=1000, noise_std=sigma)
        xs, _ = jax.vmap(task.sample)(keys)
        ent = np.asarray(jax.vmap(task.bayes_filter_entropy)(xs))
        frac.append((ent > 0.1).mean())
    assert frac[0] < 0.15 and frac[1] > 0.5, frac


@pytest.mark.parametrize("bad, err", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("1", TypeError)])
def test_bad_noise_std(bad, err):
    P, mu, x, y = random_hmm(9)
    with pytest.raises(err, match="noise_std"):
        bayes_predictive(P, mu, x, noise_std=bad)
    with pytest.raises(err, match="noise_std"):
        bayes_loss(P, mu, x, y, noise_std=bad)


def test_noise_std_traced_under_jit():
    P, mu, x, _ = random_hmm(10)
    f = jax.jit(lambda s: bayes_predictive(P, mu, jnp.asarray(x, jnp.float64), noise_std=s))
    np.testing.assert_allclose(f(jnp.float64(2.0)), numpy_forward(P, mu, x, sigma=2.0), rtol=1e-10, atol=1e-13)
