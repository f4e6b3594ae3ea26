"""The Dirichlet HMM filtering task: draws, samples, the exact predictive, and a head trained on it."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradattn
from gradattn.tasks import DirichletHMM, Task


def numpy_forward(A, B, pi, obs):
    """Textbook forward algorithm over discrete observations, probability space, float64."""
    prior = np.asarray(pi, np.float64)
    preds, filters = [], []
    for o in obs:
        post = prior * B[:, o]
        post /= post.sum()
        nxt = post @ A
        preds.append(nxt @ B)
        filters.append(post)
        prior = nxt
    return np.stack(filters), np.stack(preds)


def test_matrices_drawn_once_from_the_seed():
    a, b, c = DirichletHMM(), DirichletHMM(seq_len=20), DirichletHMM(task_seed=1)
    assert a.transition_matrix.shape == (5, 5) and a.emission_matrix.shape == (5, 8)
    np.testing.assert_allclose(a.transition_matrix.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(a.emission_matrix.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(a.transition_matrix, b.transition_matrix)
    np.testing.assert_array_equal(a.emission_matrix, b.emission_matrix)
    assert not np.array_equal(a.emission_matrix, c.emission_matrix)
    pi = a.initial_distribution
    np.testing.assert_allclose(pi @ a.transition_matrix, pi, atol=1e-12)
    np.testing.assert_allclose(pi.sum(), 1.0, rtol=1e-12)
    # Concentration moves the rows towards one-hot (small) or uniform (large).
    peaky = DirichletHMM(emission_concentration=0.05).emission_matrix.max(1).mean()
    flat = DirichletHMM(emission_concentration=50.0).emission_matrix.max(1).mean()
    assert peaky > 0.6 and flat < 0.25


def test_h_min_is_the_state_oracles_loss():
    task = DirichletHMM()
    M = task.transition_matrix @ task.emission_matrix
    expected = -(task.initial_distribution * (M * np.log(M)).sum(1)).sum()
    assert task.h_min == pytest.approx(expected, rel=1e-12)
    assert 0 < task.h_min < np.log(task.n_obs)


def test_sample_shapes_dtypes_and_statistics():
    task = DirichletHMM(seq_len=30001)
    x, y = task.sample(jax.random.key(0))
    assert x.shape == (30000, 8) and x.dtype == jnp.float32 and y.shape == (30000,) and y.dtype == jnp.int32
    xn = np.asarray(x)
    assert set(np.unique(xn)) == {0.0, 1.0} and (xn.sum(1) == 1).all()
    obs = xn.argmax(1)
    np.testing.assert_array_equal(obs[1:], np.asarray(y)[:-1])  # the target is the next input
    # The stationary chain's observation marginal is pi B.
    freq = np.bincount(obs, minlength=8) / len(obs)
    np.testing.assert_allclose(freq, task.initial_distribution @ task.emission_matrix, atol=0.015)
    x64, y64 = task.sample(jax.random.key(0), jnp.float64)
    assert x64.dtype == jnp.float64
    np.testing.assert_array_equal(y64, y)
    xs, ys = jax.jit(jax.vmap(DirichletHMM(seq_len=9).sample))(jax.random.split(jax.random.key(1), 3))
    assert xs.shape == (3, 8, 8) and ys.shape == (3, 8)


@pytest.mark.parametrize("kwargs", [dict(), dict(n_states=3, n_obs=4, emission_concentration=0.3, task_seed=7)])
def test_predictive_matches_numpy_forward(kwargs):
    """Every exact quantity against the numpy forward algorithm, at the same sizes as ever; the
    float64 quantities are computed in one compiled program (not one eager dispatch per op)."""
    task = DirichletHMM(seq_len=200, **kwargs)
    x, y = jax.jit(lambda k: task.sample(k, jnp.float64))(jax.random.key(3))
    filters, preds = numpy_forward(task.transition_matrix, task.emission_matrix, task.initial_distribution, np.asarray(x).argmax(1))

    @jax.jit
    def exact(x, y):
        return (task.bayes_predictive(x), task.bayes_log_filter(x), task.bayes_filter_entropy(x), task.bayes_entropy(x),
                task.bayes_loss(x, y).per_position)

    p, log_filter, filter_entropy, entropy, per_position = (np.asarray(a) for a in exact(x, y))
    assert p.dtype == np.float64
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(p, preds, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(np.exp(log_filter), filters, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(filter_entropy, -(filters * np.log(filters)).sum(1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(entropy, -(preds * np.log(preds)).sum(1), rtol=1e-10)
    np.testing.assert_allclose(per_position, -np.log(preds[np.arange(len(y)), np.asarray(y)]), rtol=1e-10)
    p32 = jax.jit(task.bayes_predictive)(x.astype(jnp.float32))
    assert p32.dtype == jnp.float32
    np.testing.assert_allclose(p32, preds, rtol=1e-4, atol=1e-6)


def test_posterior_stays_uncertain_and_bayes_sits_above_the_oracle():
    """Same sizes and draws as ever (4 sequences of 2000); sampling, filter entropies and losses
    are one compiled program instead of many eager dispatches."""
    task = DirichletHMM(seq_len=2000)

    @jax.jit
    def run(keys):
        xs, ys = jax.vmap(task.sample)(keys)
        return jax.vmap(task.bayes_filter_entropy)(xs), jax.vmap(lambda x, y: task.bayes_loss(x, y).mean)(xs, ys)

    ent, losses = (np.asarray(a) for a in run(jax.random.split(jax.random.key(4), 4)))
    assert (ent > 0.1).mean() > 0.8
    assert losses.mean() > task.h_min and losses.mean() < np.log(task.n_obs)


def test_validation():
    for kwargs, err, match in [
        (dict(n_states=0), ValueError, "n_states"),
        (dict(n_obs=1), ValueError, "n_obs"),
        (dict(seq_len=1), ValueError, "seq_len"),
        (dict(task_seed=-1), ValueError, "task_seed"),
        (dict(transition_concentration=0.0), ValueError, "transition_concentration"),
        (dict(emission_concentration=float("nan")), ValueError, "emission_concentration"),
        (dict(n_obs=8.0), TypeError, "n_obs"),
    ]:
        with pytest.raises(err, match=rf"DirichletHMM: {match}\b"):
            DirichletHMM(**kwargs)
    task = DirichletHMM(seq_len=10)
    x, y = task.sample(jax.random.key(0))
    with pytest.raises(ValueError, match=r"bayes_predictive: x\b.*\(N, 8\).*\(9, 4\)"):
        task.bayes_predictive(x[:, :4])
    with pytest.raises(ValueError, match=r"bayes_predictive: x\b.*one-hot"):
        task.bayes_predictive(x * 0.5)
    with pytest.raises(TypeError, match=r"bayes_predictive: x\b.*floating"):
        task.bayes_predictive(x.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"bayes_loss: y\b.*\(9,\).*\(8,\)"):
        task.bayes_loss(x, y[:-1])
    with pytest.raises(ValueError, match=r"bayes_loss: y\b.*outside \[0, 8\)"):
        task.bayes_loss(x, y.at[0].set(8))


def test_protocol_hash_and_json():
    task = DirichletHMM(n_states=3, seq_len=40)
    assert isinstance(task, Task) and (task.d_in, task.n_classes, task.n_positions) == (8, 8, 39)
    assert hash(task) == hash(DirichletHMM(n_states=np.int64(3), seq_len=40)) and task == DirichletHMM(n_states=3, seq_len=40)
    d = json.loads(json.dumps(task.to_dict()))
    assert d["name"] == "DirichletHMM" and DirichletHMM.from_dict(d) == task
    assert dataclasses.replace(task, seq_len=5).n_positions == 4


def test_head_trains_on_the_task():
    task = DirichletHMM(seq_len=200)
    x, y = task.sample(jax.random.key(0))
    params = gradattn.init_head(jax.random.key(1), task.d_in, 6, 6, task.n_classes, 0.1, jnp.float32)
    _, history = gradattn.train(params, x, y, gradattn.sgd(0.5), 60, grad_source="autodiff")
    loss = np.asarray(history["loss"])
    assert np.isfinite(loss).all()
    assert loss[-1] < loss[0] - 0.05, (loss[0], loss[-1])
    assert loss[0] == pytest.approx(np.log(task.n_classes), abs=0.05)  # a small head starts near uniform
