"""Bijection elimination: the encoding and the sampler against numpy, the exact posterior against
enumeration of every bijection, validation, and a head trained on it."""

import dataclasses
import functools
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import gammaln

import gradattn
from gradattn.head import HeadParams
from gradattn.tasks import BijectionElimination, Task, check_task

KS = (2, 3, 5, 8, 13)


def numpy_encode(order, bijection):
    """x (k, 3k) float64 and y (k,) by the task's definition, one position at a time."""
    k = len(order)
    x = np.zeros((k, 3 * k))
    y = np.zeros(k, np.int64)
    for t in range(k):  # 0-based row t is position t + 1 of the task
        x[t, order[t]] = 1.0
        y[t] = bijection[order[t]]
        if t > 0:
            x[t, k + order[t - 1]] = 1.0
            x[t, 2 * k + bijection[order[t - 1]]] = 1.0
    return x, y


def numpy_uniform_predictive(x, k):
    """p(y_t = c | x_1..x_t): 1 / #unrevealed on the outputs not shown in rows 0..t, 0 on the others."""
    n = x.shape[0]
    p = np.zeros((n, k))
    seen = set()
    for t in range(n):
        hot = np.flatnonzero(x[t, 2 * k :])
        seen.update(int(c) for c in hot)
        free = [c for c in range(k) if c not in seen]
        p[t, free] = 1.0 / len(free)
    return p


def enumerated_posterior(x, k):
    """By brute force over all k! bijections: (predictive (N, k), log #consistent bijections (N,))."""
    query = x[:, :k].argmax(1)
    pairs = []
    preds, log_counts = [], []
    perms = np.array(list(itertools.permutations(range(k))))
    for t in range(x.shape[0]):
        if t > 0:
            pairs.append((int(x[t, k : 2 * k].argmax()), int(x[t, 2 * k :].argmax())))
        ok = np.ones(len(perms), bool)
        for a, b in pairs:
            ok &= perms[:, a] == b
        consistent = perms[ok]
        preds.append(np.bincount(consistent[:, query[t]], minlength=k) / len(consistent))
        log_counts.append(math.log(len(consistent)))
    return np.stack(preds), np.array(log_counts)


def random_draws(rng, k):
    return rng.permutation(k), rng.permutation(k)


@pytest.mark.parametrize("k", KS)
def test_encode_matches_numpy(k):
    task = BijectionElimination(k)
    rng = np.random.default_rng(k)
    for _ in range(3):
        order, pi = random_draws(rng, k)
        x, y = task.encode(order, pi, jnp.float64)
        xr, yr = numpy_encode(order, pi)
        assert x.shape == (k, 3 * k) and x.dtype == jnp.float64 and y.dtype == jnp.int32
        np.testing.assert_array_equal(x, xr)
        np.testing.assert_array_equal(y, yr)


@pytest.mark.parametrize("k", KS)
def test_sample_is_encode_of_the_documented_draws(k):
    task = BijectionElimination(k)
    key = jax.random.key(10 + k)
    k_order, k_pi = jax.random.split(key)
    symbols = jnp.arange(k, dtype=jnp.int32)
    order = np.asarray(jax.random.permutation(k_order, symbols))
    pi = np.asarray(jax.random.permutation(k_pi, symbols))
    x, y = task.sample(key, jnp.float64)
    xr, yr = numpy_encode(order, pi)
    np.testing.assert_array_equal(x, xr)
    np.testing.assert_array_equal(y, yr)


@pytest.mark.parametrize("k", KS)
def test_sample_structure(k):
    """Every input queried once, y a bijection of the inputs, x_t showing the previous pair."""
    task = BijectionElimination(k)
    for i in range(4):
        x, y = task.sample(jax.random.key(i))
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == (k, 3 * k) and x.dtype == np.float32 and y.shape == (k,) and y.dtype == np.int32
        assert set(np.unique(x)) <= {0.0, 1.0}
        query, prev_in, prev_out = x[:, :k], x[:, k : 2 * k], x[:, 2 * k :]
        assert (query.sum(1) == 1).all()
        s = query.argmax(1)
        assert sorted(s) == list(range(k)) and sorted(y) == list(range(k))
        pi = np.empty(k, np.int64)
        pi[s] = y  # y_t = pi(s_t): a well-defined bijection
        assert (x[0, k:] == 0).all()
        assert (prev_in[1:].sum(1) == 1).all() and (prev_out[1:].sum(1) == 1).all()
        np.testing.assert_array_equal(prev_in[1:].argmax(1), s[:-1])
        np.testing.assert_array_equal(prev_out[1:].argmax(1), pi[prev_in[1:].argmax(1)])


def test_samples_cover_orders_and_bijections():
    """k = 3: over many keys every one of the 6 orders and 6 bijections turns up, roughly equally."""
    task = BijectionElimination(3)
    xs, ys = jax.vmap(task.sample)(jax.random.split(jax.random.key(0), 3000))
    s = np.asarray(xs[:, :, :3]).argmax(2)
    pi = np.empty_like(s)
    np.put_along_axis(pi, s, np.asarray(ys), axis=1)
    for draws in (s, pi):
        codes = draws @ np.array([9, 3, 1])
        counts = np.unique(codes, return_counts=True)[1]
        assert len(counts) == 6 and counts.min() > 400 and counts.max() < 600


@pytest.mark.parametrize("k", (2, 3, 4, 5, 6))
def test_predictive_and_filter_entropy_match_enumeration(k):
    task = BijectionElimination(k)
    for i in range(2):
        x, _ = task.sample(jax.random.key(i), jnp.float64)
        x = np.asarray(x)
        pred, log_count = enumerated_posterior(x, k)
        np.testing.assert_allclose(task.bayes_predictive(x), pred, rtol=0, atol=1e-14)
        np.testing.assert_allclose(task.bayes_filter_entropy(x), log_count, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", KS + (40,))
def test_predictive_matches_the_numpy_reference(k):
    task = BijectionElimination(k)
    x, _ = task.sample(jax.random.key(k), jnp.float64)
    p = task.bayes_predictive(x)
    assert p.shape == (k, k) and p.dtype == jnp.float64
    np.testing.assert_allclose(p, numpy_uniform_predictive(np.asarray(x), k), rtol=1e-14, atol=0)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-14)
    x32 = x.astype(jnp.float32)
    assert task.bayes_predictive(x32).dtype == jnp.float32
    np.testing.assert_allclose(task.bayes_predictive(x32), p, rtol=1e-6)


@pytest.mark.parametrize("k", KS)
def test_entropy_per_position(k):
    task = BijectionElimination(k)
    x, _ = task.sample(jax.random.key(1), jnp.float64)
    expected = np.log(k - np.arange(1, k + 1) + 1.0)  # log(k - t + 1), t = 1..k
    np.testing.assert_allclose(task.entropy_profile, expected, rtol=1e-15, atol=0)
    np.testing.assert_allclose(task.bayes_entropy(x), expected, rtol=1e-13, atol=1e-15)
    p = np.asarray(task.bayes_predictive(x))
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    np.testing.assert_allclose(h, expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(task.bayes_filter_entropy(x), gammaln(k - np.arange(1, k + 1) + 2.0), rtol=1e-12, atol=1e-12)
    assert not task.entropy_profile.flags.writeable


@pytest.mark.parametrize("k", KS)
def test_bayes_loss_is_the_mean_log_loss_of_the_predictive(k):
    task = BijectionElimination(k)
    x, y = task.sample(jax.random.key(2 * k), jnp.float64)
    p = np.asarray(task.bayes_predictive(x))
    per_pos = -np.log(p[np.arange(k), np.asarray(y)])
    loss = task.bayes_loss(x, y)
    np.testing.assert_allclose(loss.per_position, per_pos, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(loss.mean, per_pos.mean(), rtol=1e-13)
    np.testing.assert_allclose(loss.bits, per_pos.mean() / np.log(2), rtol=1e-13)
    assert float(loss.mean) == pytest.approx(task.bayes_loss_value, rel=1e-13)
    assert task.bayes_loss_value == pytest.approx(math.log(math.factorial(k)) / k, rel=1e-13)
    w = np.random.default_rng(0).uniform(0.1, 1.0, k)
    np.testing.assert_allclose(task.bayes_loss(x, y, w).mean, np.sum(w * per_pos) / w.sum(), rtol=1e-13)


def test_protocol_hashing_and_round_trip():
    task = BijectionElimination(6)
    assert isinstance(task, Task) and isinstance(task, gradattn.Task)
    check_task(task, "test")
    assert (task.d_in, task.n_classes, task.seq_len, task.n_positions, task.h_min) == (18, 6, 6, 6, 0.0)
    assert task == BijectionElimination(np.int64(6)) and hash(task) == hash(BijectionElimination(6))
    assert type(BijectionElimination(np.int64(6)).n_symbols) is int
    assert task != BijectionElimination(7)
    d = json.loads(json.dumps(task.to_dict()))
    assert d == {"name": "BijectionElimination", "n_symbols": 6}
    assert BijectionElimination.from_dict(d) == task
    with pytest.raises(ValueError, match="BijectionElimination"):
        BijectionElimination.from_dict({"name": "StickyMarkov", "n_symbols": 6})
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.n_symbols = 3
    assert BijectionElimination().n_symbols == 8


def test_jit_and_vmap_of_sample_equal_eager():
    task = BijectionElimination(7)
    keys = jax.random.split(jax.random.key(5), 3)
    xs, ys = jax.jit(jax.vmap(task.sample))(keys)
    xv, yv = jax.vmap(task.sample)(keys)
    assert xs.shape == (3, 7, 21) and ys.shape == (3, 7)
    jitted = jax.jit(task.sample)
    for i, key in enumerate(keys):
        x, y = task.sample(key)
        xj, yj = jitted(key)
        for a in (xs[i], xv[i], xj):
            np.testing.assert_array_equal(a, x)
        for b in (ys[i], yv[i], yj):
            np.testing.assert_array_equal(b, y)
    x64, y64 = task.sample(keys[0], jnp.float64)
    assert x64.dtype == jnp.float64
    np.testing.assert_array_equal(y64, task.sample(keys[0])[1])  # the draws do not depend on dtype
    x0, x1 = task.sample(keys[0])[0], task.sample(keys[1])[0]
    assert not np.array_equal(x0, x1)  # another key, another sample (equal with probability 1 / 7!^2)


def test_bayes_functions_jit_and_vmap():
    task = BijectionElimination(6)
    xs, ys = jax.vmap(lambda k: task.sample(k, jnp.float64))(jax.random.split(jax.random.key(0), 4))
    pv = jax.jit(jax.vmap(task.bayes_predictive))(xs)
    lv = jax.jit(jax.vmap(lambda x, y: task.bayes_loss(x, y).mean))(xs, ys)
    hv = jax.jit(jax.vmap(task.bayes_filter_entropy))(xs)
    for i in range(4):
        np.testing.assert_array_equal(pv[i], task.bayes_predictive(xs[i]))
        np.testing.assert_allclose(lv[i], task.bayes_loss(xs[i], ys[i]).mean, rtol=1e-14)
        np.testing.assert_allclose(hv[i], task.bayes_filter_entropy(xs[i]), rtol=1e-14)


def test_a_prefix_is_a_valid_input():
    task = BijectionElimination(6)
    x, y = task.sample(jax.random.key(3), jnp.float64)
    np.testing.assert_array_equal(task.bayes_predictive(x[:3]), task.bayes_predictive(x)[:3])
    np.testing.assert_allclose(task.bayes_loss(x[:3], y[:3]).per_position, np.log([6.0, 5.0, 4.0]), rtol=1e-14)


@pytest.mark.parametrize(
    "value, err",
    [(1, ValueError), (0, ValueError), (-3, ValueError), (1025, ValueError),
     (2.0, TypeError), (True, TypeError), ("8", TypeError), (None, TypeError)],
)
def test_bad_n_symbols(value, err):
    with pytest.raises(err, match="n_symbols"):
        BijectionElimination(value)


def test_bounds_are_accepted():
    assert BijectionElimination(2).d_in == 6
    assert BijectionElimination(1024).n_classes == 1024


def test_bad_dtype_and_draws():
    task = BijectionElimination(4)
    with pytest.raises(TypeError, match="dtype"):
        task.sample(jax.random.key(0), jnp.int32)
    with pytest.raises(TypeError, match="dtype"):
        task.encode(np.arange(4), np.arange(4), jnp.int32)
    with pytest.raises(ValueError, match="order"):
        task.encode(np.array([0, 1, 1, 3]), np.arange(4))
    with pytest.raises(ValueError, match="bijection"):
        task.encode(np.arange(4), np.arange(5))
    with pytest.raises(TypeError, match="order"):
        task.encode(np.arange(4.0), np.arange(4))


def test_bad_x_and_y():
    task = BijectionElimination(4)
    x, y = task.sample(jax.random.key(0), jnp.float64)
    x = np.asarray(x)
    for bad in (x[None], x[:, :-1], np.concatenate([x, x[:1]]), x[:0]):
        with pytest.raises(ValueError, match=r"bayes_predictive: x\b.*shape"):
            task.bayes_predictive(bad)
    with pytest.raises(TypeError, match=r"bayes_predictive: x\b.*floating"):
        task.bayes_predictive(x.astype(np.int32))
    broken = {
        "half": x * 0.5,
        "two queries": x + np.eye(4, 12),
        "first pair shown": np.concatenate([np.where(np.arange(12) == 4, 1.0, x[:1]), x[1:]]),
        "wrong revealed input": x[:, [0, 1, 2, 3, 5, 6, 7, 4, 8, 9, 10, 11]],
    }
    revealed_twice = x.copy()
    revealed_twice[2, 8:] = x[1, 8:]
    broken["revealed twice"] = revealed_twice
    for bad in broken.values():
        for fn in (task.bayes_predictive, task.bayes_filter_entropy, task.bayes_entropy):
            with pytest.raises(ValueError, match=rf"{fn.__name__}: x\b.*not a sample"):
                fn(bad)
    with pytest.raises(ValueError, match=r"bayes_loss: y\b.*shape \(4,\).*\(3,\)"):
        task.bayes_loss(x, y[:-1])
    with pytest.raises(ValueError, match="y"):
        task.bayes_loss(x, np.array([0, 1, 2, 4]))
    with pytest.raises(TypeError, match="y"):
        task.bayes_loss(x, y.astype(np.float64))
    with pytest.raises(ValueError, match="weights"):
        task.bayes_loss(x, y, -np.ones(4))


def test_one_head_can_express_the_elimination():
    """Uniform attention reading the revealed-output block through W_O = -c I approaches the Bayes
    loss as c grows (the construction in the module docstring)."""
    k = 8
    task = BijectionElimination(k)
    xs, ys = jax.vmap(lambda key: task.sample(key, jnp.float64))(jax.random.split(jax.random.key(1), 16))
    w_v = jnp.concatenate([jnp.zeros((2 * k, k)), jnp.eye(k)])
    gaps = []
    for c in (1.0, 10.0, 100.0, 400.0):
        params = HeadParams(jnp.zeros((3 * k, 1)), jnp.zeros((3 * k, 1)), w_v, -c * jnp.eye(k))
        loss = jax.vmap(functools.partial(gradattn.dense_loss, params))(xs, ys)
        gaps.append(float(jnp.mean(loss)) - task.bayes_loss_value)
    assert all(g > 0 for g in gaps[:-1]) and gaps[-1] >= -1e-12
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-6


def test_sgd_on_one_sample_reduces_the_loss():
    task = BijectionElimination(8)
    data_key, init_key = jax.random.split(jax.random.key(0))
    x, y = task.sample(data_key)
    params = gradattn.init_head(init_key, task.d_in, 8, 8, task.n_classes)
    _, history = gradattn.train(params, x, y, gradattn.sgd(0.5), 50)
    loss = np.asarray(history["loss"])
    assert loss.shape == (50,) and np.isfinite(loss).all()
    assert loss[-1] < loss[0] - 0.05


def test_em_vs_sgd_runs_on_the_task():
    task = BijectionElimination(6)
    config = gradattn.EmVsSgdConfig(steps=5, task=task)
    out = gradattn.em_vs_sgd(2, config)
    assert out["h_min"] == 0.0 and out["seeds"] == [0, 1]
    assert len(out["curves"]["sgd_mean"]) == 5
    assert np.isfinite(out["sgd"]["final_loss_mean"]) and np.isfinite(out["em"]["final_loss_mean"])
    assert config.to_dict()["task"] == {"name": "BijectionElimination", "n_symbols": 6}
