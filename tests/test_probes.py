"""The probes of a token model's geometry: each statistic on constructed inputs whose answer is
known, and against an independent numpy computation in float64; the forward pass against the model
itself; the ablations against models whose parameters were edited to do the same thing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gradattn import probes
from gradattn.nn import HeadTaps, TinyGPT, Transformer
from gradattn.probes import (
    attention_posterior,
    cosine_matrix,
    head_ablation,
    key_orthogonality,
    layer_ablation,
    manifold_stats,
    position_r2,
    posterior_kl_bits,
    probe_batch,
    probe_forward,
    qk_alignment,
    shuffled_control,
    split_indices,
    split_r2,
    supervised_points,
)
from gradattn.tasks.bijection_tokens import BijectionTokens

F64 = jnp.float64
TASK = BijectionTokens(V=5, L=4, with_replacement=True)  # T = 7, supervised 0, 2, 4, 6; values 5..9


def gpt(dtype=F64, seed=0, layers=2, heads=2, d=8):
    return TinyGPT(TASK.vocab_size, TASK.seq_len, d, layers, heads, rngs=nnx.Rngs(seed), dtype=dtype)


def deep(dropout=0.0):
    """The deep model of the sticky chain, small: d_in 3, one layer of two heads of 4, 4 classes."""
    return Transformer(d_in=3, d_model=8, n_layers=1, n_heads=2, n_classes=4, dropout=dropout, rngs=nnx.Rngs(2),
                       dtype=F64)


@pytest.fixture(scope="module")
def batch():
    """Six bijection sequences with replacement (a repeated key in each), float64 posteriors."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(6):
        perm = rng.permutation(TASK.V)
        keys = rng.integers(0, TASK.V, TASK.L)
        keys[2] = keys[0]  # the third key repeats the first
        samples.append(TASK.encode(jnp.asarray(perm), jnp.asarray(keys), F64))
    return jax.tree.map(lambda *a: jnp.stack(a), *samples)


def np_kl_bits(logits, p):
    logits = np.asarray(logits, np.float64)
    logq = logits - logits.max(-1, keepdims=True)
    logq = logq - np.log(np.exp(logq).sum(-1, keepdims=True))
    p = np.asarray(p, np.float64)
    safe = np.where(p > 0, p, 1.0)
    return np.where(p > 0, p * (np.log(safe) - logq), 0.0).sum(-1) / np.log(2.0)


def np_rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


# --------------------------------------------------------------------------------------------
# The forward pass
# --------------------------------------------------------------------------------------------


def test_probe_forward_is_the_models_own_pass(batch):
    model = gpt()
    tokens = batch.tokens[0]
    out = probe_forward(model, tokens)
    np.testing.assert_array_equal(out.logits, model(tokens))  # the very logits, bit for bit
    assert out.residuals.shape == (3, 7, 8) and out.normed.shape == (3, 7, 8)
    assert out.queries.shape == out.keys.shape == out.values.shape == out.contexts.shape == (2, 2, 7, 4)
    assert out.alpha.shape == out.scores.shape == (2, 2, 7, 7) and out.logits.dtype == F64
    # the residual stream, block by block, and the norms that read it
    h = model.tok(tokens) + model.pos.embedding[:7]
    for layer, block in enumerate(model.blocks):
        np.testing.assert_array_equal(out.residuals[layer], h)
        np.testing.assert_allclose(out.normed[layer], np_rms(np.asarray(h), np.asarray(block.ln_1.scale[...])),
                                   rtol=1e-12, atol=1e-14)
        h, _ = block(h, [None] * 3, HeadTaps())
    np.testing.assert_array_equal(out.residuals[2], h)
    np.testing.assert_allclose(out.normed[2], np_rms(np.asarray(h), np.asarray(model.ln_f.scale[...])), rtol=1e-12)
    np.testing.assert_allclose(out.logits, np.asarray(out.normed[2]) @ np.asarray(model.tok.embedding[...]).T, rtol=1e-12)
    # queries and keys: the scores the model used are their scaled dot products
    np.testing.assert_allclose(np.einsum("lhid,lhjd->lhij", out.queries, out.keys) / 2.0, out.scores, rtol=1e-12, atol=1e-15)
    w_q = np.asarray(model.blocks[1].q_proj.kernel[...])
    np.testing.assert_allclose(out.queries[1, 1], (np.asarray(out.normed[1]) @ w_q)[:, 4:8], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(out.alpha.sum(-1), 1.0, rtol=1e-12)


def test_float32_models_probe_in_float32():
    model = gpt(jnp.float32)
    out = probe_batch(model, jnp.array([[0, 6, 1, 7, 2], [3, 8, 3, 8, 4]], jnp.int32))
    assert all(a.dtype == jnp.float32 for a in out)
    np.testing.assert_allclose(out.alpha.sum(-1), 1.0, rtol=1e-6)


def test_probe_forward_of_the_deep_transformer():
    model = deep(dropout=0.1)
    x = jax.random.normal(jax.random.key(0), (5, 3), F64)
    out = probe_forward(model, x)
    np.testing.assert_array_equal(out.logits, model(x))  # evaluation mode: no dropout
    np.testing.assert_array_equal(out.residuals[0], model.in_proj(x))
    w_k, b_k = np.asarray(model.blocks[0].k_proj.kernel[...]), np.asarray(model.blocks[0].k_proj.bias[...])
    np.testing.assert_allclose(out.keys[0, 1], (np.asarray(out.normed[0]) @ w_k + b_k)[:, 4:], rtol=1e-12, atol=1e-15)
    assert out.queries.shape == (1, 2, 5, 4) and out.normed.shape == (2, 5, 8)


def test_probe_batch_is_probe_forward_of_each_sequence(batch):
    model = gpt()
    b = probe_batch(model, batch.tokens)
    assert b.logits.shape == (6, 7, 10) and b.normed.shape == (6, 3, 7, 8)
    one = probe_forward(model, batch.tokens[3])
    for got, want in zip(b, one):
        np.testing.assert_allclose(got[3], want, rtol=1e-10, atol=1e-13)


def test_new_model_options_leave_every_number_as_it_was(batch):
    model = gpt()
    tokens = batch.tokens[1]
    logits, taps = model(tokens, return_taps=True)
    again, taps2, stream = model(tokens, return_taps=True, return_residuals=True, sublayer_mask=jnp.ones((2, 2)))
    np.testing.assert_array_equal(again, logits)
    for a, b in zip(taps, taps2):
        np.testing.assert_array_equal(a, b)
    only_stream = model(tokens, return_residuals=True)
    assert isinstance(only_stream, tuple) and len(only_stream) == 2
    np.testing.assert_array_equal(only_stream[1], stream)
    # a bypassed block passes its input through unchanged
    bypass_last = model(tokens, sublayer_mask=jnp.array([[1, 1], [0, 0]]), return_residuals=True)[1]
    np.testing.assert_array_equal(bypass_last[2], bypass_last[1])
    with pytest.raises(ValueError, match=r"TinyGPT: sublayer_mask must have shape \(n_layers, 2\) = \(2, 2\).*\(3, 2\)"):
        model(tokens, sublayer_mask=jnp.ones((3, 2)))


# --------------------------------------------------------------------------------------------
# Points, the split, the read-out and the manifold statistics
# --------------------------------------------------------------------------------------------


def test_supervised_points_are_rows_at_the_supervised_positions(batch):
    reps = jax.random.normal(jax.random.key(0), (6, 3, 7, 4), F64)
    pts = supervised_points(reps, batch.posterior, TASK.supervised)
    assert pts.z.shape == (3, 24, 4) and pts.entropy_bits.shape == (24,) and pts.position.dtype == jnp.int32
    r, p = np.asarray(reps), np.asarray(batch.posterior)
    for b in range(6):
        for s, t in enumerate(TASK.supervised):
            row = b * 4 + s
            np.testing.assert_array_equal(pts.z[:, row], r[b, :, t])
            assert pts.position[row] == s
            q = p[b, t][p[b, t] > 0]
            np.testing.assert_allclose(pts.entropy_bits[row], -(q * np.log2(q)).sum(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(pts.entropy_bits[2::4], 0.0, atol=1e-15)  # the repeated key: a point mass
    np.testing.assert_allclose(pts.entropy_bits[0::4], np.log2(5), rtol=1e-13)  # the first key: uniform over 5
    flat = supervised_points(reps[:, -1], batch.posterior, TASK.supervised)
    np.testing.assert_array_equal(flat.z, pts.z[-1])


def test_split_is_eighty_twenty_and_disjoint():
    train, test = split_indices(50, jax.random.key(3))
    assert test.shape == (10,) and train.shape == (40,)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(50))
    train2, _ = split_indices(50, jax.random.key(3))
    np.testing.assert_array_equal(train, train2)  # a key is a split
    assert split_indices(51, jax.random.key(0))[1].shape == (11,)  # ceil(0.2 M), scikit-learn's size


def test_an_exact_affine_function_of_the_covariate_has_share_one_and_r2_one():
    rng = np.random.default_rng(1)
    c = rng.uniform(0, 3, 80)
    u = rng.standard_normal(6)
    z = np.outer(c, u) + rng.standard_normal(6)  # rank one, along u
    s = manifold_stats(jnp.asarray(z), jnp.asarray(c), jax.random.key(0))
    np.testing.assert_allclose([s.pc1_share, s.max_abs_corr, s.r2_train, s.r2_test], 1.0, atol=1e-12)
    assert s.best_pc == 0 and s.dims_90 == 1 and s.explained.shape == (5,) and s.pc_abs_corr.shape == (5,)
    np.testing.assert_allclose(s.explained[1:], 0.0, atol=1e-12)


def numpy_manifold(z, c, train, test, k=5):
    zc = z - z.mean(0)
    _, sv, vt = np.linalg.svd(zc, full_matrices=False)
    ratio = sv ** 2 / (sv ** 2).sum()
    scores = zc @ vt[:k].T
    corr = np.array([abs(np.corrcoef(scores[:, i], c)[0, 1]) for i in range(k)])
    x1 = np.column_stack([np.ones(len(train)), z[train]])
    coef = np.linalg.lstsq(x1, c[train], rcond=None)[0]

    def r2(rows):
        pred = coef[0] + z[rows] @ coef[1:]
        return 1 - ((c[rows] - pred) ** 2).sum() / ((c[rows] - c[rows].mean()) ** 2).sum()

    dims_90 = int(np.argmax(np.cumsum(ratio) >= 0.9)) + 1
    return ratio[:k], corr, r2(train), r2(test), dims_90


def test_manifold_statistics_against_numpy_layer_by_layer():
    rng = np.random.default_rng(2)
    c = rng.uniform(0, 2, 60)
    z = np.stack([rng.standard_normal((60, 7)) * np.arange(1, 8) + 0.5 * np.outer(c, rng.standard_normal(7)),
                  rng.standard_normal((60, 7))])
    key = jax.random.key(4)
    s = manifold_stats(jnp.asarray(z), jnp.asarray(c), key)
    train, test = (np.asarray(a) for a in split_indices(60, key))
    assert s.pc1_share.shape == (2,) and s.pc_abs_corr.shape == (2, 5)
    for layer in range(2):
        ratio, corr, r2_train, r2_test, dims_90 = numpy_manifold(z[layer], c, train, test)
        np.testing.assert_allclose(s.explained[layer], ratio, rtol=1e-12)
        np.testing.assert_allclose(s.pc_abs_corr[layer], corr, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose([s.r2_train[layer], s.r2_test[layer]], [r2_train, r2_test], rtol=1e-10)
        assert s.dims_90[layer] == dims_90 and s.best_pc[layer] == np.argmax(corr)
        one = manifold_stats(jnp.asarray(z[layer]), jnp.asarray(c), key)
        np.testing.assert_allclose(one.r2_test, s.r2_test[layer], rtol=1e-12)
    r = split_r2(jnp.asarray(z[0]), jnp.asarray(c), key)
    np.testing.assert_allclose(r.test, s.r2_test[0], rtol=1e-12)


def test_float32_in_float32_out():
    z = jax.random.normal(jax.random.key(0), (40, 4), jnp.float32)
    c = jax.random.uniform(jax.random.key(1), (40,), jnp.float32)
    s = manifold_stats(z, c, jax.random.key(2))
    assert s.pc1_share.dtype == s.r2_test.dtype == s.pc_abs_corr.dtype == jnp.float32


def test_shuffling_the_covariate_destroys_the_signal():
    rng = np.random.default_rng(3)
    c = rng.uniform(0, 3, 500)
    z = np.outer(c, rng.standard_normal(4)) + 0.1 * rng.standard_normal((500, 4))
    real = manifold_stats(jnp.asarray(z), jnp.asarray(c), jax.random.key(0))
    control = shuffled_control(jnp.asarray(z), jnp.asarray(c), jax.random.key(0), jax.random.key(1))
    assert real.r2_test > 0.99 and real.max_abs_corr > 0.99
    assert abs(control.r2_test) < 0.05 and control.max_abs_corr < 0.15
    np.testing.assert_allclose(control.explained, real.explained)  # the points themselves are the same
    perm = np.asarray(jax.random.permutation(jax.random.key(1), 500))
    again = manifold_stats(jnp.asarray(z), jnp.asarray(c[perm]), jax.random.key(0))
    np.testing.assert_allclose(again.r2_test, control.r2_test, rtol=1e-12)


def test_position_alone_predicts_a_covariate_of_position_perfectly():
    s, b = 9, 12
    position = np.tile(np.arange(s), b)
    c = np.log2(10 - position)  # the bijection's exact entropy without replacement, V = 10
    r = position_r2(jnp.asarray(position, jnp.int32), jnp.asarray(c), jax.random.key(0), s)
    np.testing.assert_allclose([r.train, r.test], 1.0, atol=1e-12)
    # with a part that the position does not fix, the read-out is the per-position training mean
    noisy = c + np.random.default_rng(0).standard_normal(c.shape)
    r = position_r2(jnp.asarray(position, jnp.int32), jnp.asarray(noisy), jax.random.key(0), s)
    train, test = (np.asarray(a) for a in split_indices(s * b, jax.random.key(0)))
    means = np.array([noisy[train][position[train] == p].mean() for p in range(s)])
    pred = means[position[test]]
    want = 1 - ((noisy[test] - pred) ** 2).sum() / ((noisy[test] - noisy[test].mean()) ** 2).sum()
    np.testing.assert_allclose(r.test, want, rtol=1e-10)
    assert r.test < 0.9


# --------------------------------------------------------------------------------------------
# Keys, queries, attention
# --------------------------------------------------------------------------------------------


def test_orthonormal_vectors_have_cosine_zero():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 6)))
    np.testing.assert_allclose(cosine_matrix(jnp.asarray(q[:4] * 3.0)), np.eye(4), atol=1e-14)
    # token i embedded as (u_i, u_i) with u_i orthonormal in R^4, W_K block-diagonal with orthogonal
    # blocks (one per head of 4): every head's keys of tokens 0..3 are orthogonal, of equal norm
    model = gpt()
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    e = np.asarray(model.tok.embedding[...]).copy()
    e[:4] = np.hstack([u, u])
    model.tok.embedding[...] = jnp.asarray(e)
    w = np.zeros((8, 8))
    w[:4, :4], w[4:, 4:] = np.linalg.qr(rng.standard_normal((4, 4)))[0], np.linalg.qr(rng.standard_normal((4, 4)))[0]
    model.blocks[0].k_proj.kernel[...] = jnp.asarray(w)
    k = key_orthogonality(model, jnp.arange(4))
    np.testing.assert_allclose(k.cosine[0], np.broadcast_to(np.eye(4), (2, 4, 4)), atol=1e-14)
    np.testing.assert_allclose([k.offdiag_mean[0], k.offdiag_abs_mean[0], k.offdiag_std[0]], 0.0, atol=1e-14)
    assert np.abs(k.offdiag_mean[1]).max() > 1e-3  # layer 1's random W_K does not keep them orthogonal


@pytest.mark.parametrize("through_norm", [False, True])
def test_key_orthogonality_against_numpy(through_norm):
    model = gpt(seed=3, heads=2)
    ids = np.arange(5)  # the bijection's key tokens
    k = key_orthogonality(model, jnp.asarray(ids), through_norm=through_norm)
    assert k.cosine.shape == (2, 2, 5, 5) and k.offdiag_mean.shape == (2, 2)
    e = np.asarray(model.tok.embedding[...])[ids]
    for layer, block in enumerate(model.blocks):
        a = np_rms(e, np.asarray(block.ln_1.scale[...])) if through_norm else e
        keys = a @ np.asarray(block.k_proj.kernel[...])
        for head in range(2):
            kh = keys[:, 4 * head: 4 * head + 4]
            kh = kh / np.linalg.norm(kh, axis=1, keepdims=True)
            cos = kh @ kh.T
            off = cos[~np.eye(5, dtype=bool)]
            np.testing.assert_allclose(k.cosine[layer, head], cos, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose([k.offdiag_mean[layer, head], k.offdiag_abs_mean[layer, head],
                                        k.offdiag_std[layer, head]], [off.mean(), np.abs(off).mean(), off.std()],
                                       rtol=1e-11, atol=1e-14)
    every = key_orthogonality(model)
    assert every.cosine.shape == (2, 2, 10, 10)  # every token id by default


def test_qk_alignment_against_numpy():
    rng = np.random.default_rng(5)
    q, k = rng.standard_normal((2, 3, 7, 4)), rng.standard_normal((2, 3, 7, 4))
    pos = (0, 2, 4, 6)
    a = qk_alignment(jnp.asarray(q), jnp.asarray(k), pos)
    assert a.cosine.shape == (2, 3, 4, 4) and a.head_mean.shape == (2, 4, 4) and a.layer_mean.shape == (2,)
    want = np.full((2, 3, 4, 4), np.nan)
    for i, pi in enumerate(pos):
        for j, pj in enumerate(pos[:i]):
            qi = q[:, :, pi] / np.linalg.norm(q[:, :, pi], axis=-1, keepdims=True)
            kj = k[:, :, pj] / np.linalg.norm(k[:, :, pj], axis=-1, keepdims=True)
            want[:, :, i, j] = (qi * kj).sum(-1)
    np.testing.assert_allclose(a.cosine, want, rtol=1e-12, atol=1e-15)  # NaN where j >= i, in both
    np.testing.assert_allclose(a.head_mean, want.mean(1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a.layer_mean, np.nanmean(want.mean(1), axis=(1, 2)), rtol=1e-12)


def test_qk_alignment_of_one_pass_is_that_of_each_prefix(batch):
    # The authors run each prefix [k_1, v_1, ..., k_t] and take its last query; a causal model gives
    # the same query and keys inside the whole sequence.
    model = gpt(seed=1)
    tokens = batch.tokens[0]
    full = probe_forward(model, tokens)
    prefix = probe_forward(model, tokens[:5])  # ends on k_3
    np.testing.assert_allclose(prefix.queries[:, :, 4], full.queries[:, :, 4], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(prefix.keys[:, :, [0, 2]], full.keys[:, :, [0, 2]], rtol=1e-12, atol=1e-15)


def test_attention_on_the_revealed_value_is_the_exact_posterior():
    # keys 0, 1, 0, 2 with replacement: tokens [0, v0, 1, v1, 0, v0, 2]; the third key repeats the first
    perm = jnp.array([3, 1, 4, 0, 2])
    s = TASK.encode(perm, jnp.array([0, 1, 0, 2]), F64)
    t = 7
    alpha = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]  # uniform over j <= i
    alpha[4] = np.eye(t)[1]  # at the repeated key: all on the value it revealed
    alpha[2] = np.eye(t)[1]  # at the new key 1: all on a value already taken
    a = attention_posterior(jnp.asarray(alpha)[None, None], s.tokens, s.posterior, TASK.supervised, TASK.class_range)
    assert a.distribution.shape == (1, 1, 4, 5) and a.kl_bits.shape == (1, 1, 4)
    np.testing.assert_allclose(a.kl_bits[0, 0, 2], 0.0, atol=1e-15)  # the exact point mass, retrieved
    np.testing.assert_allclose([a.value_mass[0, 0, 2], a.possible_mass[0, 0, 2]], 1.0)
    np.testing.assert_allclose(a.distribution[0, 0, 2], np.eye(5)[3])  # pi(0) = 3
    assert np.isinf(a.kl_bits[0, 0, 1]) and a.possible_mass[0, 0, 1] == 0.0  # ruled out: elimination
    np.testing.assert_allclose(a.value_mass[0, 0, 1], 1.0)
    assert a.value_mass[0, 0, 0] == 0.0 and np.isinf(a.kl_bits[0, 0, 0])  # nothing in context yet
    np.testing.assert_allclose(a.value_mass[0, 0, 3], 3 / 7)  # uniform row 6: three value positions of seven


def test_attention_posterior_against_numpy(batch):
    out = probe_forward(gpt(seed=2), batch.tokens[2])
    tokens, post = np.asarray(batch.tokens[2]), np.asarray(batch.posterior[2])
    a = attention_posterior(out.alpha, batch.tokens[2], batch.posterior[2], TASK.supervised, TASK.class_range)
    alpha = np.asarray(out.alpha)
    for s, i in enumerate(TASK.supervised):
        mass = np.zeros((2, 2, 5))
        for j in range(i):
            if 5 <= tokens[j] < 10:
                mass[:, :, tokens[j] - 5] += alpha[:, :, i, j]
        p = post[i, 5:]
        total = mass.sum(-1)
        np.testing.assert_allclose(a.value_mass[:, :, s], total, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(a.possible_mass[:, :, s], (mass * (p > 0)).sum(-1), rtol=1e-12, atol=1e-15)
        if total.min() > 0:
            q = mass / total[..., None]
            np.testing.assert_allclose(a.distribution[:, :, s], q, rtol=1e-12, atol=1e-15)
            with np.errstate(divide="ignore", invalid="ignore"):
                kl = np.where(p > 0, p * (np.log2(np.where(p > 0, p, 1.0)) - np.log2(q)), 0.0).sum(-1)
            np.testing.assert_allclose(a.kl_bits[:, :, s], kl, rtol=1e-12)
    assert np.isfinite(a.kl_bits[:, :, 2]).all()  # the repeated key: its value is in context


# --------------------------------------------------------------------------------------------
# Ablations
# --------------------------------------------------------------------------------------------


def test_posterior_kl_against_numpy(batch):
    logits = jax.random.normal(jax.random.key(0), (6, 7, 10), F64)
    np.testing.assert_allclose(posterior_kl_bits(logits, batch.posterior), np_kl_bits(logits, batch.posterior),
                               rtol=1e-12, atol=1e-15)


def mean_kl(model, batch, **kw):
    idx = list(TASK.supervised)
    logits = np.stack([np.asarray(model(t, **kw)) for t in batch.tokens])
    return np_kl_bits(logits[:, idx], np.asarray(batch.posterior)[:, idx]).mean()


def test_head_ablation_zeroes_one_context_and_a_silent_head_is_worth_nothing(batch):
    model = gpt(seed=4)
    silent = model.blocks[1].o_proj.kernel[...]
    model.blocks[1].o_proj.kernel[...] = silent.at[0:4].set(0.0)  # head 0 of layer 1 writes nothing
    r = head_ablation(model, batch.tokens, batch.posterior, TASK.supervised)
    assert r.ablated_bits.shape == r.delta_bits.shape == (2, 2)
    np.testing.assert_allclose(r.baseline_bits, mean_kl(model, batch), rtol=1e-12)
    np.testing.assert_allclose(r.delta_bits[1, 0], 0.0, atol=1e-13)
    assert np.abs(r.delta_bits[0]).min() > 0
    # against the same ablation done by hand: that head's context minus itself
    by_hand = []
    for t in batch.tokens:
        _, taps = model(t, return_taps=True)
        minus = jnp.zeros_like(taps.contexts).at[0, 1].set(-taps.contexts[0, 1])
        by_hand.append(model(t, perturb=HeadTaps(contexts=minus)))
    idx = list(TASK.supervised)
    want = np_kl_bits(np.stack(by_hand)[:, idx], np.asarray(batch.posterior)[:, idx]).mean()
    np.testing.assert_allclose(r.ablated_bits[0, 1], want, rtol=1e-11)


def test_layer_ablations_are_the_model_with_that_output_removed(batch):
    model = gpt(seed=5)
    r = layer_ablation(model, batch.tokens, batch.posterior, TASK.supervised)
    assert probes.LAYER_ABLATIONS == ("bypass", "zero_attention", "zero_ffn") and r.ablated_bits.shape == (3, 2)
    np.testing.assert_allclose(r.delta_bits, r.ablated_bits - r.baseline_bits)
    # zeroing W_O (or the feed-forward's last matrix) of a bias-free block removes that output exactly
    for row, name in ((1, "o_proj"), (2, "ff_2")):
        for layer in range(2):
            edited = nnx.clone(model)
            w = getattr(edited.blocks[layer], name).kernel
            w[...] = jnp.zeros_like(w[...])
            np.testing.assert_allclose(r.ablated_bits[row, layer], mean_kl(edited, batch), rtol=1e-11)
    # bypassing the last block: the stream after block 0 straight into the final norm and the head
    idx = list(TASK.supervised)
    logits = []
    for t in batch.tokens:
        h, _ = model.blocks[0](model.tok(t) + model.pos.embedding[:7], [None] * 3, HeadTaps())
        logits.append(model.tok.attend(model.ln_f(h)))
    want = np_kl_bits(np.stack(logits)[:, idx], np.asarray(batch.posterior)[:, idx]).mean()
    np.testing.assert_allclose(r.ablated_bits[0, 1], want, rtol=1e-11)
    # all heads of a layer ablated is its attention output dropped (no bias in W_O)
    heads = head_ablation(model, batch.tokens, batch.posterior, TASK.supervised)
    np.testing.assert_allclose(heads.baseline_bits, r.baseline_bits, rtol=1e-12)


def test_ablations_of_the_deep_transformer_drop_the_output_bias_too():
    model = deep()
    x = jax.random.normal(jax.random.key(0), (3, 5, 3), F64)
    posterior = jax.nn.softmax(jax.random.normal(jax.random.key(1), (3, 5, 4), F64))
    r = layer_ablation(model, x, posterior, (1, 2, 4))
    edited = nnx.clone(model)
    edited.blocks[0].o_proj.kernel[...] = jnp.zeros((8, 8), F64)
    edited.blocks[0].o_proj.bias[...] = jnp.zeros((8,), F64)
    logits = jax.vmap(edited)(x)[:, [1, 2, 4]]
    np.testing.assert_allclose(r.ablated_bits[1, 0], np_kl_bits(logits, posterior[:, [1, 2, 4]]).mean(), rtol=1e-11)


# --------------------------------------------------------------------------------------------
# Input validation at the door
# --------------------------------------------------------------------------------------------


def bad_calls():
    model = gpt()
    ok_tokens = jnp.zeros((7,), jnp.int32)
    z, c, key = jnp.zeros((20, 3)), jnp.zeros((20,)), jax.random.key(0)
    q = jnp.zeros((2, 2, 7, 4))
    post = jnp.zeros((7, 10))
    return [
        (lambda: probe_forward(model, jnp.zeros((8,), jnp.int32)), ValueError, r"probe_forward: inputs .*\(T\).*max_len = 7.*\(8,\)"),
        (lambda: probe_forward(model, jnp.zeros((7,))), TypeError, r"probe_forward: inputs must be integer"),
        (lambda: probe_forward(model, ok_tokens.at[0].set(10)), ValueError, r"probe_forward: inputs .*\[0, 10\]"),
        (lambda: probe_forward("model", ok_tokens), TypeError, r"probe_forward: model must be"),
        (lambda: probe_batch(model, ok_tokens), ValueError, r"probe_batch: inputs .*\(B, T\).*got shape \(7,\)"),
        (lambda: manifold_stats(z, jnp.zeros((19,)), key), ValueError, r"manifold_stats: c must have shape \(20,\).*\(19,\)"),
        (lambda: manifold_stats(jnp.zeros((20,)), c, key), ValueError, r"manifold_stats: z must be .*got shape \(20,\)"),
        (lambda: manifold_stats(z.astype(jnp.int32), c, key), TypeError, r"manifold_stats: z must be floating"),
        (lambda: manifold_stats(z, c, 0), TypeError, r"manifold_stats: split_key must be a PRNG key"),
        (lambda: manifold_stats(z, c, key, n_components=0), ValueError, r"manifold_stats: n_components"),
        (lambda: manifold_stats(z[:4], c[:4], key), ValueError, r"manifold_stats: 4 points .*hold out 1 and keep 3"),
        (lambda: shuffled_control(z, c, key, 1), TypeError, r"shuffled_control: shuffle_key"),
        (lambda: split_r2(z, c[:5], key), ValueError, r"split_r2: c must have shape \(20,\)"),
        (lambda: split_indices(3, key), ValueError, r"split_indices: m"),
        (lambda: position_r2(jnp.zeros((20,)), c, key, 3), TypeError, r"position_r2: position must hold integers"),
        (lambda: position_r2(jnp.full((20,), 3), c, key, 3), ValueError, r"position_r2: position .*\[0, 3\)"),
        (lambda: supervised_points(jnp.zeros((6, 7, 4)), jnp.zeros((6, 8, 10)), TASK.supervised), ValueError,
         r"supervised_points: posterior must have shape \(6, 7, C\).*\(6, 8, 10\)"),
        (lambda: supervised_points(jnp.zeros((6, 7, 4)), jnp.zeros((6, 7, 10)), (0, 7)), ValueError,
         r"supervised_points: positions must be strictly increasing in \[0, 7\)"),
        (lambda: supervised_points(jnp.zeros((6, 7, 4)), jnp.zeros((6, 7, 10)), 3), TypeError,
         r"supervised_points: positions must be a sequence"),
        (lambda: cosine_matrix(jnp.zeros((4,))), ValueError, r"cosine_matrix: vectors must be .*\(4,\)"),
        (lambda: key_orthogonality(deep()), TypeError,
         r"key_orthogonality: model must be a gradattn.nn.TinyGPT"),
        (lambda: key_orthogonality(model, jnp.array([0, 10])), ValueError, r"key_orthogonality: token_ids .*\[0, 10\]"),
        (lambda: key_orthogonality(model, jnp.array([0])), ValueError, r"key_orthogonality: token_ids must have shape \(n,\)"),
        (lambda: qk_alignment(q, q[:, :, :6], TASK.supervised), ValueError,
         r"qk_alignment: keys must have the shape of queries \(2, 2, 7, 4\).*\(2, 2, 6, 4\)"),
        (lambda: qk_alignment(q[0], q[0], TASK.supervised), ValueError, r"qk_alignment: queries must be \(L, H, T, d_h\)"),
        (lambda: attention_posterior(jnp.zeros((2, 2, 7, 7)), ok_tokens, post, TASK.supervised, (5, 11)), ValueError,
         r"attention_posterior: value_range must satisfy 0 <= lo < hi <= C = 10"),
        (lambda: attention_posterior(jnp.zeros((2, 2, 7, 7)), ok_tokens[:6], post, TASK.supervised, (5, 10)), ValueError,
         r"attention_posterior: tokens must have shape \(7,\).*\(6,\)"),
        (lambda: attention_posterior(jnp.zeros((2, 2, 7, 7)), ok_tokens, post, TASK.supervised, 5), TypeError,
         r"attention_posterior: value_range must be a pair"),
        (lambda: posterior_kl_bits(jnp.zeros((7, 10)), post[:, :9]), ValueError,
         r"posterior_kl_bits: posterior must have the shape of logits \(7, 10\)"),
        (lambda: head_ablation(model, jnp.zeros((2, 7), jnp.int32), jnp.zeros((2, 7, 9)), TASK.supervised), ValueError,
         r"head_ablation: posterior must have shape \(B, T, C\) = \(2, 7, 10\).*\(2, 7, 9\)"),
        (lambda: layer_ablation(model, jnp.zeros((2, 7), jnp.int32), jnp.zeros((2, 7, 10)), (1, 9)), ValueError,
         r"layer_ablation: positions must be strictly increasing in \[0, 7\)"),
    ]


@pytest.mark.parametrize("case", range(len(bad_calls())))
def test_bad_input_names_the_argument_and_the_shapes(case):
    call, error, pattern = bad_calls()[case]
    with pytest.raises(error, match=pattern):
        call()
