"""BijectionTokens: the token layout, the exact posterior against enumeration of the bijections, the
sampler, the entropies and the errors at the door."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradattn.tasks.bijection_tokens import BijectionTokens
from gradattn.tasks.tokens import TokenSample, TokenTask, check_token_task


def _sample(task, seed, dtype=jnp.float64):
    return task.sample(jax.random.key(seed), dtype=dtype)


def test_token_layout_of_one_draw_written_out():
    task = BijectionTokens(V=4, L=3)
    perm = np.array([2, 0, 3, 1])  # pi(0) = 2, pi(1) = 0, pi(2) = 3, pi(3) = 1
    keys = np.array([3, 0, 2])
    s = task.encode(perm, keys, dtype=jnp.float64)
    assert isinstance(s, TokenSample)
    # [k1, V + pi(k1), k2, V + pi(k2), k3]
    assert s.tokens.tolist() == [3, 5, 0, 6, 2]
    assert s.labels.tolist() == [5, 0, 6, 0, 7]
    assert s.mask.tolist() == [1, 0, 1, 0, 1]
    assert task.supervised == (0, 2, 4)
    assert (task.seq_len, task.vocab_size, task.n_classes, task.class_range) == (5, 8, 8, (4, 8))
    assert task.soft_targets is False
    q = 1 / 3
    np.testing.assert_array_equal(s.posterior, [
        [0, 0, 0, 0, 0.25, 0.25, 0.25, 0.25],
        [0] * 8,
        [0, 0, 0, 0, q, 0, q, q],  # value 1 (token 5) revealed
        [0] * 8,
        [0, 0, 0, 0, 0.5, 0, 0, 0.5],  # values 1 and 2 (tokens 5, 6) revealed
    ])
    assert s.tokens.dtype == jnp.int32 and s.labels.dtype == jnp.int32
    assert s.posterior.dtype == jnp.float64 and s.mask.dtype == jnp.float64


def test_layout_with_replacement_and_a_single_key():
    task = BijectionTokens(V=3, L=4, with_replacement=True)
    s = task.encode(np.array([1, 2, 0]), np.array([2, 2, 0, 2]), dtype=jnp.float64)
    assert s.tokens.tolist() == [2, 3, 2, 3, 0, 4, 2]
    assert s.labels.tolist() == [3, 0, 3, 0, 4, 0, 3]
    np.testing.assert_array_equal(s.posterior[0::2], [
        [0, 0, 0, 1 / 3, 1 / 3, 1 / 3],
        [0, 0, 0, 1, 0, 0],  # key 2 again: its value is known
        [0, 0, 0, 0, 0.5, 0.5],  # key 0 is new: the values other than pi(2) = 0
        [0, 0, 0, 1, 0, 0],
    ])
    one = BijectionTokens(V=2, L=1).encode(np.array([1, 0]), np.array([1]))
    assert one.tokens.tolist() == [1] and one.labels.tolist() == [2] and BijectionTokens(V=2, L=1).supervised == (0,)
    np.testing.assert_array_equal(one.posterior, [[0, 0, 0.5, 0.5]])


def _enumerated_posterior(V, perm, keys):
    """(T, 2V) by brute force: at the key of k_t, the distribution of pi(k_t) over the permutations
    that agree with the pairs revealed before it (each equally likely a priori)."""
    L = len(keys)
    T = 2 * L - 1
    out = np.zeros((T, 2 * V))
    all_perms = np.array(list(itertools.permutations(range(V))))
    for t in range(L):
        ok = np.ones(len(all_perms), bool)
        for s in range(t):
            ok &= all_perms[:, keys[s]] == perm[keys[s]]
        counts = np.bincount(all_perms[ok, keys[t]], minlength=V)
        out[2 * t, V:] = counts / counts.sum()
    return out


@pytest.mark.parametrize("with_replacement", [False, True])
@pytest.mark.parametrize("V", [2, 3, 4, 5, 6])
def test_posterior_is_the_enumerated_bayes_posterior(V, with_replacement):
    rng = np.random.default_rng(V + 10 * with_replacement)
    lengths = sorted({1, 2, V, V + 1, 2 * V + 1}) if with_replacement else range(1, V + 1)
    for L in lengths:
        task = BijectionTokens(V=V, L=L, with_replacement=with_replacement)
        perms = np.stack([rng.permutation(V) for _ in range(6)])
        keys = rng.integers(0, V, (6, L)) if with_replacement else np.stack([rng.permutation(V)[:L] for _ in range(6)])
        if with_replacement:
            keys[0] = keys[0, 0]  # one key over and over
        got = np.asarray(jax.jit(jax.vmap(lambda p, k, task=task: task.encode(p, k, dtype=jnp.float64).posterior))(perms, keys))
        assert got.dtype == np.float64
        for b in range(6):
            assert np.max(np.abs(got[b] - _enumerated_posterior(V, perms[b], keys[b]))) < 1e-12


def test_sampled_posteriors_are_the_enumerated_ones():
    for task in (BijectionTokens(V=5, L=5), BijectionTokens(V=4, L=9, with_replacement=True)):
        batch = jax.vmap(lambda k, task=task: task.sample(k, dtype=jnp.float64))(jax.random.split(jax.random.key(3), 8))
        for b in range(8):
            keys = np.asarray(batch.tokens[b, 0::2])
            perm = np.zeros(task.V, int)
            perm[keys[:-1]] = np.asarray(batch.tokens[b, 1::2]) - task.V
            exact = _enumerated_posterior(task.V, perm, keys)
            assert np.max(np.abs(np.asarray(batch.posterior[b]) - exact)) < 1e-12


@pytest.mark.parametrize("task", [BijectionTokens(), BijectionTokens(V=6, L=6), BijectionTokens(V=5, L=12, with_replacement=True)],
                         ids=["default", "V6L6", "replacement"])
def test_samples(task):
    keys = jax.random.split(jax.random.key(0), 64)
    batch = jax.vmap(lambda k: task.sample(k, dtype=jnp.float64))(keys)
    T, V = task.seq_len, task.V
    sup = np.array(task.supervised)
    assert batch.tokens.shape == (64, T) and batch.posterior.shape == (64, T, 2 * V)
    tokens, labels, post = np.asarray(batch.tokens), np.asarray(batch.labels), np.asarray(batch.posterior)
    key_tokens = tokens[:, 0::2]
    assert ((key_tokens >= 0) & (key_tokens < V)).all()
    assert ((tokens[:, 1::2] >= V) & (tokens[:, 1::2] < 2 * V)).all()
    if task.with_replacement:
        assert any(len(set(row)) < len(row) for row in key_tokens.tolist())  # keys do repeat
    else:
        assert all(len(set(row)) == len(row) for row in key_tokens.tolist())
    # labels are the next tokens at the key positions (the last one, never shown, in range)
    np.testing.assert_array_equal(labels[:, sup[:-1]], tokens[:, sup[:-1] + 1])
    assert ((labels[:, sup] >= V) & (labels[:, sup] < 2 * V)).all()
    assert (np.delete(labels, sup, axis=1) == 0).all()
    mask = np.asarray(batch.mask)
    assert (mask[:, sup] == 1).all() and (np.delete(mask, sup, axis=1) == 0).all()
    # every label is possible under the posterior; rows are distributions on the values
    assert (np.take_along_axis(post[:, sup], labels[:, sup, None], axis=-1) > 0).all()
    np.testing.assert_allclose(post.sum(-1), mask, atol=1e-12)
    assert (post[..., :V] == 0).all() and (post >= 0).all()


def test_sample_is_pure_jits_and_vmaps():
    task = BijectionTokens()
    keys = jax.random.split(jax.random.key(5), 4)
    single = [task.sample(k) for k in keys]
    jitted = jax.jit(task.sample)
    batch = jax.vmap(task.sample)(keys)
    for i, s in enumerate(single):
        for a, b, c in zip(s, jitted(keys[i]), batch):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c[i])
    again = task.sample(keys[0])
    for a, b in zip(single[0], again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(single[0].tokens, single[1].tokens)
    # float32 by default even with x64 on; the draws do not depend on the dtype
    assert single[0].posterior.dtype == jnp.float32 and single[0].mask.dtype == jnp.float32
    assert single[0].tokens.dtype == jnp.int32 and single[0].labels.dtype == jnp.int32
    np.testing.assert_allclose(single[0].posterior.sum(-1), single[0].mask, atol=1e-6)
    s64 = task.sample(keys[0], dtype=jnp.float64)
    np.testing.assert_array_equal(s64.tokens, single[0].tokens)
    np.testing.assert_allclose(s64.posterior, single[0].posterior, atol=1e-6)
    raw = task.sample(jax.random.PRNGKey(0))
    assert raw.tokens.shape == (37,)


def test_is_a_token_task():
    task = BijectionTokens()
    assert isinstance(task, TokenTask)
    check_token_task(task, "test")
    assert task.n_positions == task.seq_len == 37


def test_with_replacement_sawtooth():
    V = 6
    task = BijectionTokens(V=V, L=7, with_replacement=True)
    keys = np.array([1, 2, 1, 3, 2, 2, 0])
    s = task.encode(np.array([5, 3, 1, 0, 2, 4]), keys, dtype=jnp.float64)
    h = np.asarray(task.entropy_bits(s.posterior))
    np.testing.assert_allclose(h, [np.log2(6), np.log2(5), 0, np.log2(4), 0, 0, np.log2(3)], rtol=0, atol=1e-12)
    assert (h[[2, 4, 5]] == 0).all()
    # the repeated keys' posterior is a point mass on the label
    for t in (2, 4, 5):
        assert s.posterior[2 * t, s.labels[2 * t]] == 1
    with pytest.raises(ValueError, match="exact_entropy_bits.*entropy_bits"):
        _ = task.exact_entropy_bits
    with pytest.raises(ValueError, match="bayes_loss_nats"):
        _ = task.bayes_loss_nats


def test_exact_entropy_and_bayes_loss_at_the_default_size():
    task = BijectionTokens()
    h = task.exact_entropy_bits
    assert h.shape == (19,) and h.dtype == np.float64 and not h.flags.writeable
    assert h[0] == pytest.approx(4.3219, abs=1e-4) and h[-1] == 1.0
    assert h.mean() == pytest.approx(3.2146, abs=1e-4)
    assert task.bayes_loss_nats == pytest.approx(2.2282, abs=1e-4)
    assert task.bayes_loss_nats == pytest.approx(h.mean() * np.log(2), rel=1e-13)
    # the same entropies in every sample, from its posterior; and batches of posteriors
    batch = jax.vmap(lambda k: task.sample(k, dtype=jnp.float64))(jax.random.split(jax.random.key(1), 3))
    got = task.entropy_bits(batch.posterior)
    assert got.shape == (3, 19) and got.dtype == jnp.float64
    np.testing.assert_allclose(got, np.broadcast_to(h, (3, 19)), rtol=0, atol=1e-12)
    # the hard-label cross-entropy of the exact posterior is the Bayes loss
    sup = np.array(task.supervised)
    p = np.take_along_axis(np.asarray(batch.posterior)[:, sup], np.asarray(batch.labels)[:, sup, None], -1)
    np.testing.assert_allclose(-np.log(p).mean(axis=(1, 2)), task.bayes_loss_nats, rtol=1e-12)
    assert BijectionTokens(V=2, L=2).exact_entropy_bits.tolist() == [1.0, 0.0]


def test_dict_round_trip_equality_and_hash():
    task = BijectionTokens(V=7, L=5, with_replacement=True)
    d = json.loads(json.dumps(task.to_dict()))
    assert d == {"name": "BijectionTokens", "V": 7, "L": 5, "with_replacement": True}
    assert BijectionTokens.from_dict(d) == task and hash(BijectionTokens.from_dict(d)) == hash(task)
    assert BijectionTokens.from_dict(BijectionTokens().to_dict()) == BijectionTokens(20, 19, False)
    assert BijectionTokens(np.int64(7), 5) == BijectionTokens(7, 5) and type(BijectionTokens(np.int64(7), 5).V) is int
    assert BijectionTokens(7, 5) != task
    with pytest.raises(ValueError, match="BijectionTokens.from_dict"):
        BijectionTokens.from_dict({"name": "BijectionElimination", "V": 7, "L": 5})


@pytest.mark.parametrize("kw, error, match", [
    ({"V": 1}, ValueError, r"V must be an integer in \[2, 1024\]"),
    ({"V": 1025, "L": 3}, ValueError, r"V must be an integer in \[2, 1024\]"),
    ({"V": 20.0}, TypeError, "V must be an integer"),
    ({"V": True}, TypeError, "V must be an integer"),
    ({"L": 0}, ValueError, r"L must be an integer in \[1, 4096\]"),
    ({"L": 21}, ValueError, r"L must be an integer in \[1, V\] = \[1, 20\] without replacement"),
    ({"L": 4097, "with_replacement": True}, ValueError, r"L must be an integer in \[1, 4096\]"),
    ({"with_replacement": "yes"}, TypeError, "with_replacement must be a bool"),
])
def test_bad_fields(kw, error, match):
    with pytest.raises(error, match=f"BijectionTokens: {match}"):
        BijectionTokens(**kw)


def test_long_with_replacement_is_allowed():
    task = BijectionTokens(V=3, L=50, with_replacement=True)
    s = task.sample(jax.random.key(0))
    assert s.tokens.shape == (99,)


def test_bad_encode_sample_and_entropy_inputs():
    task = BijectionTokens(V=4, L=3)
    perm, keys = np.array([2, 0, 3, 1]), np.array([3, 0, 2])
    fn = "BijectionTokens.encode"
    with pytest.raises(ValueError, match=rf"{fn}: perm must have shape \(4,\)"):
        task.encode(perm[:3], keys)
    with pytest.raises(ValueError, match=rf"{fn}: perm must be a permutation of 0..3"):
        task.encode(np.array([0, 0, 1, 2]), keys)
    with pytest.raises(TypeError, match=f"{fn}: perm must hold integers"):
        task.encode(perm.astype(float), keys)
    with pytest.raises(TypeError, match=f"{fn}: perm must be an array"):
        task.encode([2, 0, 3, 1], keys)
    with pytest.raises(ValueError, match=rf"{fn}: keys must have shape \(3,\)"):
        task.encode(perm, np.array([3, 0]))
    with pytest.raises(ValueError, match=rf"{fn}: keys must lie in \[0, V\) = \[0, 4\)"):
        task.encode(perm, np.array([3, 0, 4]))
    with pytest.raises(ValueError, match=rf"{fn}: keys must lie in"):
        task.encode(perm, np.array([-1, 0, 1]))
    with pytest.raises(ValueError, match=f"{fn}: keys must be distinct without replacement"):
        task.encode(perm, np.array([3, 0, 3]))
    BijectionTokens(V=4, L=3, with_replacement=True).encode(perm, np.array([3, 0, 3]))  # fine with
    with pytest.raises(TypeError, match=f"{fn}: dtype must be floating point"):
        task.encode(perm, keys, dtype=jnp.int32)
    with pytest.raises(TypeError, match="BijectionTokens.sample: key must be a PRNG key.*a seed is not a key"):
        task.sample(0)
    with pytest.raises(TypeError, match="BijectionTokens.sample: key must be one PRNG key"):
        task.sample(jax.random.split(jax.random.key(0), 2))
    with pytest.raises(TypeError, match="BijectionTokens.sample: dtype must be floating point"):
        task.sample(jax.random.key(0), dtype=jnp.int32)
    post = task.encode(perm, keys).posterior
    with pytest.raises(ValueError, match=r"BijectionTokens.entropy_bits: posterior must have shape \(\.\.\., 5, 8\)"):
        task.entropy_bits(post[:4])
    with pytest.raises(ValueError, match="BijectionTokens.entropy_bits: posterior must have shape"):
        task.entropy_bits(post[0])
    with pytest.raises(TypeError, match="BijectionTokens.entropy_bits: posterior must be floating point"):
        task.entropy_bits(np.zeros((5, 8), int))
    with pytest.raises(TypeError, match="BijectionTokens.entropy_bits: posterior must be an array"):
        task.entropy_bits(post.tolist())
