"""The sticky Markov-chain task of SPEC §3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradattn.tasks import StickyMarkov, sticky_transition_matrix


def test_h_min_and_row_zero_match_spec():
    task = StickyMarkov()
    assert f"{task.h_min:.4f}" == "1.8292"
    np.testing.assert_allclose(
        task.transition_matrix[0], [0.3498, 0.1660, 0.0830, 0.0553, 0.0415, 0.0553, 0.0830, 0.1660], atol=5e-5
    )


def test_transition_matrix_is_stochastic_and_circulant():
    p = StickyMarkov().transition_matrix
    assert p.shape == (8, 8) and p.dtype == np.float64
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-14)
    for i in range(8):  # every row is row 0 rotated (circular distance)
        np.testing.assert_allclose(p[i], np.roll(p[0], i), rtol=1e-14)
    q = sticky_transition_matrix(5, 0.0)
    np.testing.assert_allclose(q[0], np.array([0, 1, 0.5, 0.5, 1]) / 3.0, rtol=1e-14)


def test_embeddings_fixed_by_seed():
    a, b, c = StickyMarkov(), StickyMarkov(seq_len=10), StickyMarkov(embed_seed=1)
    assert a.embeddings.shape == (8, 20) and a.embeddings.dtype == np.float64
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert not np.array_equal(a.embeddings, c.embeddings)
    assert abs(a.embeddings.std() - 1.0) < 0.25


def test_sample_shapes_dtypes_and_determinism():
    task = StickyMarkov(seq_len=50)
    x, y = task.sample(jax.random.key(3))
    assert x.shape == (49, 20) and x.dtype == jnp.float32
    assert y.shape == (49,) and y.dtype == jnp.int32
    assert int(y.min()) >= 0 and int(y.max()) < 8
    x1, y1 = task.sample(jax.random.key(3))
    np.testing.assert_array_equal(x, x1)
    np.testing.assert_array_equal(y, y1)
    jitted = jax.jit(task.sample)
    np.testing.assert_array_equal(jitted(jax.random.key(3))[0], jitted(jax.random.key(3))[0])
    x2, y2 = jitted(jax.random.key(3))
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_allclose(x, x2, rtol=1e-5, atol=1e-6)  # eager and compiled erfinv may round differently
    x3, _ = task.sample(jax.random.key(4))
    assert not np.array_equal(x, x3)
    x64, y64 = task.sample(jax.random.key(3), dtype=jnp.float64)
    assert x64.dtype == jnp.float64
    np.testing.assert_array_equal(y64, y)  # the chain does not depend on dtype


def test_sample_vmaps():
    task = StickyMarkov(seq_len=20, n_symbols=5, d_embed=3)
    xs, ys = jax.jit(jax.vmap(task.sample))(jax.random.split(jax.random.key(0), 4))
    assert xs.shape == (4, 19, 3) and ys.shape == (4, 19)
    x1, y1 = task.sample(jax.random.split(jax.random.key(0), 4)[2])
    np.testing.assert_array_equal(ys[2], y1)
    np.testing.assert_allclose(xs[2], x1, rtol=1e-6)


def test_sample_follows_the_chain_and_the_emission():
    task = StickyMarkov(seq_len=20001)
    x, y = task.sample(jax.random.key(11))
    y = np.asarray(y)
    counts = np.zeros((8, 8))
    np.add.at(counts, (y[:-1], y[1:]), 1)
    empirical = counts / counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(empirical, task.transition_matrix, atol=0.03)
    # x_{t+1} = mu[y_t] + eps with eps ~ N(0, I): y holds the targets, so y[t] is the symbol x[t+1] embeds.
    eps = np.asarray(x[1:], np.float64) - task.embeddings[y[:-1]]
    assert abs(eps.mean()) < 0.01 and abs(eps.var() - 1.0) < 0.02


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(n_symbols=1), ValueError, "n_symbols"),
        (dict(seq_len=1), ValueError, "seq_len"),
        (dict(self_prob=1.0), ValueError, "self_prob"),
        (dict(d_embed=0), ValueError, "d_embed"),
        (dict(seq_len=10.0), TypeError, "seq_len"),
        (dict(embed_seed=-1), ValueError, "embed_seed"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        StickyMarkov(**kwargs)


def test_bad_sample_dtype():
    with pytest.raises(TypeError, match="dtype"):
        StickyMarkov(seq_len=5).sample(jax.random.key(0), dtype=jnp.int32)


def test_task_is_hashable_and_static():
    assert hash(StickyMarkov()) == hash(StickyMarkov())
    assert StickyMarkov().n_positions == 1999
