"""The sticky Markov-chain task: chain, means (reference, seeded, explicit), noise, validation, protocol;
its exact Bayes predictor against a direct numpy forward algorithm."""

import dataclasses
import importlib.resources
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradattn.tasks import (
    BijectionElimination,
    DirichletHMM,
    StickyMarkov,
    Task,
    check_task,
    embeddings_from_spec,
    reference_embeddings,
    sticky_transition_matrix,
)
from gradattn.tasks.sticky_markov import (
    bayes_entropy,
    bayes_filter_entropy,
    bayes_log_filter,
    bayes_log_predictive,
    bayes_loss,
    bayes_predictive,
)


def test_h_min_and_row_zero_match_the_paper():
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
    a, b, c = StickyMarkov(embed_seed=0), StickyMarkov(seq_len=10, embed_seed=0), StickyMarkov(embed_seed=1)
    assert a.embeddings.shape == (8, 20) and a.embeddings.dtype == np.float64
    np.testing.assert_array_equal(a.embeddings, np.random.default_rng(0).standard_normal((8, 20)))
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
        (dict(self_prob=-0.1), ValueError, r"self_prob\b.*\[0\.0, 1\.0\).*got -0\.1"),
        (dict(self_prob=np.float32(1.0)), ValueError, "self_prob"),
        (dict(self_prob=float("nan")), ValueError, "self_prob"),
        (dict(self_prob=True), TypeError, "self_prob"),
        (dict(self_prob="0.3"), TypeError, "self_prob"),
        (dict(noise_std=0.0), ValueError, "noise_std"),
        (dict(noise_std=-1.0), ValueError, "noise_std"),
        (dict(noise_std=float("inf")), ValueError, "noise_std"),
        (dict(noise_std="1"), TypeError, "noise_std"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=rf"^StickyMarkov: {match}"):
        StickyMarkov(**kwargs)


def test_bad_sample_dtype():
    with pytest.raises(TypeError, match=r"StickyMarkov\.sample: dtype\b.*floating"):
        StickyMarkov(seq_len=5).sample(jax.random.key(0), dtype=jnp.int32)


def test_task_is_hashable_and_static():
    assert hash(StickyMarkov()) == hash(StickyMarkov())
    assert StickyMarkov().n_positions == 1999


@pytest.mark.parametrize("value", [np.float32(0.3), np.float64(0.3), 0.3, np.array(0.3, np.float32), 0, np.int64(0)])
def test_self_prob_accepts_any_real_number_type(value):
    task = StickyMarkov(self_prob=value)
    assert type(task.self_prob) is float and task.self_prob == float(value)
    np.testing.assert_allclose(task.transition_matrix, sticky_transition_matrix(8, float(value)), rtol=1e-15)
    hash(task)


def _file_means():
    text = importlib.resources.files("gradattn").joinpath("data", "sticky_markov_reference_embeddings.txt").read_text()
    return np.array([[np.float32(v) for v in line.split()] for line in text.splitlines() if line.strip()])


def test_reference_means_equal_the_package_file():
    ref = reference_embeddings()
    file_means = _file_means()
    assert ref.dtype == np.float32 and ref.shape == (8, 20) and file_means.shape == (8, 20)
    np.testing.assert_array_equal(ref, file_means)
    assert ref[0, 0] == np.float32(-1.12583983) and ref[7, 19] == file_means[7, 19]
    with pytest.raises(ValueError):
        ref[0, 0] = 0.0  # read-only: a caller cannot alter the preset for everyone
    for task in (StickyMarkov(), StickyMarkov.reference(), StickyMarkov(embeddings="reference", seq_len=10)):
        assert task.embedding_source == "reference" and task.embed_seed is None
        assert task.embeddings.dtype == np.float64
        np.testing.assert_array_equal(task.embeddings, file_means.astype(np.float64))
    x, _ = StickyMarkov.reference(seq_len=4).sample(jax.random.key(0))
    assert x.dtype == jnp.float32


def test_reference_means_are_torchs_seed_zero_draw():
    torch = pytest.importorskip("torch", reason="PyTorch (the bench extra) is not installed; `make test-all` installs it")
    torch.manual_seed(0)
    np.testing.assert_array_equal(reference_embeddings(), torch.randn(8, 20).numpy())


def test_default_means_reference_at_paper_size_else_seed_zero():
    assert StickyMarkov() == StickyMarkov.reference() and hash(StickyMarkov()) == hash(StickyMarkov.reference())
    assert StickyMarkov() != StickyMarkov(embed_seed=0)
    small = StickyMarkov(n_symbols=5, d_embed=3)
    assert small.embed_seed == 0 and small.embedding_source is None
    np.testing.assert_array_equal(small.embeddings, np.random.default_rng(0).standard_normal((5, 3)))
    with pytest.raises(ValueError, match=r"StickyMarkov: n_symbols=5\b.*match.*reference.*\(8, 20\)"):
        StickyMarkov.reference(n_symbols=5)


def test_explicit_means():
    mu = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32)
    task = StickyMarkov(embeddings=mu)
    assert (task.n_symbols, task.d_embed, task.n_classes, task.d_in) == (4, 3, 4, 3)
    assert task.embed_seed is None and task.embeddings.dtype == np.float64
    np.testing.assert_array_equal(task.embeddings, mu.astype(np.float64))
    assert not task.embeddings.flags.writeable
    # Equal values give equal, equally hashed tasks whatever the container; other values do not.
    same = StickyMarkov(embeddings=jnp.asarray(mu), n_symbols=4, d_embed=3)
    assert same == task and hash(same) == hash(task)
    other = mu.copy()
    other[0, 0] += 1.0
    assert StickyMarkov(embeddings=other) != task
    # The reference's numbers passed as an array are the reference task.
    assert StickyMarkov(embeddings=np.array(reference_embeddings())) == StickyMarkov.reference()
    mu[0, 0] = 99.0  # the task keeps its own copy
    assert task.embeddings[0, 0] != 99.0
    x, y = task.sample(jax.random.key(0), jnp.float64)
    assert x.shape == (1999, 3)


@pytest.mark.parametrize(
    "embeddings, kwargs, err, match",
    [
        (np.ones((8, 20)), dict(n_symbols=7), ValueError, r"n_symbols=7\b.*match.*embeddings.*\(8, 20\)"),
        (np.ones((8, 20)), dict(d_embed=10), ValueError, r"d_embed=10\b.*match.*embeddings.*\(8, 20\)"),
        (np.ones(20), {}, ValueError, r"embeddings\b.*\(C, d\).*got shape \(20,\)"),
        (np.ones((8, 20, 1)), {}, ValueError, r"embeddings\b.*shape.*\(8, 20, 1\)"),
        (np.ones((1, 20)), {}, ValueError, r"embeddings\b.*\(1, 20\).*n_symbols\b.*\[2, 1024\].*got 1"),
        (np.ones((8, 0)), {}, ValueError, r"embeddings\b.*shape.*\(8, 0\)"),
        (np.full((8, 20), np.nan), {}, ValueError, r"embeddings\b.*non-finite"),
        (np.where(np.eye(8, 20) > 0, np.inf, 0.0), {}, ValueError, r"embeddings\b.*non-finite"),
        (np.ones((8, 20), np.int32), {}, TypeError, r"embeddings\b.*floating point.*int32"),
        ([[1, 2], [3, 4]], {}, TypeError, r"embeddings\b.*floating point"),
        ("seed:3", {}, ValueError, r"embeddings\b.*'seed:3'.*embed_seed=N"),
        ("reference", dict(embed_seed=0), ValueError, r"embeddings\b.*embed_seed\b.*not both"),
        (np.ones((8, 20)), dict(embed_seed=2), ValueError, r"embeddings\b.*embed_seed\b.*not both"),
    ],
)
def test_bad_embeddings(embeddings, kwargs, err, match):
    with pytest.raises(err, match=rf"^StickyMarkov: .*{match}"):
        StickyMarkov(embeddings=embeddings, **kwargs)


def test_replace_and_json_round_trip():
    for task in (StickyMarkov(seq_len=30), StickyMarkov(embed_seed=3, noise_std=2.0), StickyMarkov(embeddings=np.eye(3, 2))):
        assert dataclasses.replace(task) == task
        shorter = dataclasses.replace(task, seq_len=7)
        assert shorter.seq_len == 7 and np.array_equal(shorter.embeddings, task.embeddings)
        d = json.loads(json.dumps(task.to_dict()))
        assert d["name"] == "StickyMarkov" and StickyMarkov.from_dict(d) == task
        json.dumps(dataclasses.asdict(task))  # a config holding the task serialises too
    assert StickyMarkov().to_dict()["embeddings"] == "reference"
    assert StickyMarkov(embed_seed=3).to_dict()["embeddings"] == "seed:3"
    assert dataclasses.replace(StickyMarkov(embed_seed=0), embed_seed=4) == StickyMarkov(embed_seed=4)
    assert dataclasses.replace(StickyMarkov(), embeddings=np.eye(8, 20)) == StickyMarkov(embeddings=np.eye(8, 20))


def test_embeddings_from_spec(tmp_path):
    assert embeddings_from_spec("reference") == {"embeddings": "reference"}
    assert embeddings_from_spec("seed:12") == {"embed_seed": 12}
    mu = np.random.default_rng(1).standard_normal((8, 20))
    np.save(tmp_path / "mu.npy", mu)
    spec = embeddings_from_spec(str(tmp_path / "mu.npy"))
    np.testing.assert_array_equal(spec["embeddings"], mu)
    assert StickyMarkov(**spec) == StickyMarkov(embeddings=mu)
    assert StickyMarkov(**embeddings_from_spec("seed:12")) == StickyMarkov(embed_seed=12)
    assert StickyMarkov(seq_len=5, **embeddings_from_spec("reference")) == StickyMarkov.reference(seq_len=5)


def test_embeddings_from_spec_errors(tmp_path):
    np.save(tmp_path / "flat.npy", np.ones(20))
    np.save(tmp_path / "nan.npy", np.full((8, 20), np.nan))
    np.save(tmp_path / "int.npy", np.ones((8, 20), np.int64))
    (tmp_path / "junk.npy").write_text("not an array")
    (tmp_path / "dir.npy").mkdir()
    cases = [  # each message quotes the spec or the file at fault and says what is wrong with it
        ("seed:-1", r"'seed:-1'.*non-negative integer.*'-1'"),
        ("seed:1.5", r"'seed:1\.5'.*non-negative integer"),
        ("seed:", r"'seed:'.*non-negative integer"),
        (" seed:12 ", r"' seed:12 '.*no spaces"),
        ("seed: 12", r"'seed: 12'.*no spaces"),
        ("referencee", r"'referencee'.*expected.*'reference'.*'seed:N'"),
        ("", r"'':.*expected"),
        (str(tmp_path / "missing.npy"), r"missing\.npy'.*no such file"),
        (str(tmp_path / "dir.npy"), r"dir\.npy'.*regular file"),
        (str(tmp_path / "junk.npy"), r"junk\.npy'.*not a readable"),
        (str(tmp_path / "flat.npy"), r"flat\.npy'.*shape \(C, d\).*\(20,\)"),
        (str(tmp_path / "nan.npy"), r"nan\.npy'.*non-finite"),
        (str(tmp_path / "int.npy"), r"int\.npy'.*floating point"),
    ]
    for text, match in cases:
        with pytest.raises(ValueError, match=rf"^embeddings_from_spec: .*{match}"):
            embeddings_from_spec(text)
    with pytest.raises(TypeError, match=r"embeddings_from_spec: .*string.*got int"):
        embeddings_from_spec(3)
    np.save(tmp_path / "small.npy", np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"StickyMarkov: n_symbols=8\b.*match.*\(3, 4\)"):
        StickyMarkov(n_symbols=8, **embeddings_from_spec(str(tmp_path / "small.npy")))


@pytest.mark.parametrize("sigma", [0.5, 3.0])
def test_noise_std_scales_the_emission(sigma):
    task = StickyMarkov(seq_len=10001, noise_std=sigma)
    x, y = task.sample(jax.random.key(2))
    eps = np.asarray(x[1:], np.float64) - task.embeddings[np.asarray(y)[:-1]]
    assert abs(eps.std() / sigma - 1.0) < 0.02 and abs(eps.mean()) < 0.02 * sigma
    # Same key, same chain and same unit noise: only the scale changes.
    x1, y1 = dataclasses.replace(task, noise_std=1.0).sample(jax.random.key(2))
    np.testing.assert_array_equal(y, y1)
    mu_prev = task.embeddings[np.asarray(y)[:-1]]
    np.testing.assert_allclose(np.asarray(x[1:]) - mu_prev, sigma * (np.asarray(x1[1:]) - mu_prev), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task", [StickyMarkov(seq_len=12), DirichletHMM(seq_len=12), BijectionElimination(5)])
def test_task_protocol(task):
    assert isinstance(task, Task)
    check_task(task, "test")
    x, y = task.sample(jax.random.key(0))
    assert x.shape == (task.n_positions, task.d_in) and y.shape == (task.n_positions,)
    p = np.asarray(task.bayes_predictive(x))
    assert p.shape == (task.n_positions, task.n_classes)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.exp(task.bayes_log_predictive(x)), p, rtol=1e-6)
    np.testing.assert_allclose(task.bayes_loss(x, y).mean, -np.mean(np.log(p[np.arange(len(y)), np.asarray(y)])), rtol=1e-5)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    np.testing.assert_allclose(task.bayes_entropy(x), entropy, rtol=1e-5, atol=1e-6)
    assert task.bayes_filter_entropy(x).shape == (task.n_positions,)
    d = json.loads(json.dumps(task.to_dict()))
    assert d["name"] == type(task).__name__ and type(task).from_dict(d) == task
    name = type(task).__name__
    with pytest.raises(ValueError, match=rf"^{name}\.from_dict: .*{name} description"):
        type(task).from_dict({**d, "name": "Other"})


def test_every_task_is_one_template():
    """Each task is a frozen dataclass whose every field declares its help and bounds (so the command
    line can build it), checked by its own constructor."""
    for cls in (StickyMarkov, DirichletHMM, BijectionElimination):
        options = [f for f in dataclasses.fields(cls) if "help" in f.metadata]
        assert options and all(f.name == "embedding_source" for f in dataclasses.fields(cls) if f not in options), cls
        assert cls.__dataclass_params__.frozen
    for kwargs, name, bound in [(dict(n_states=1025), "n_states", r"\[1, 1024\]"), (dict(n_obs=1), "n_obs", r"\[2, 1024\]"),
                                (dict(seq_len=65_538), "seq_len", r"\[2, 65537\]"), (dict(task_seed=2**64), "task_seed", "")]:
        with pytest.raises(ValueError, match=rf"DirichletHMM: {name}\b.*{bound}"):
            DirichletHMM(**kwargs)


def test_a_task_of_ones_own_needs_no_base_class():
    """Task is structural: any object with its members is a task."""

    class Constant:
        d_in = n_classes = 2
        seq_len, n_positions, h_min = 4, 3, None

        def sample(self, key, dtype=jnp.float32):
            return jnp.zeros((3, 2), dtype), jnp.zeros(3, jnp.int32)

        def bayes_log_predictive(self, x):
            return jnp.full((x.shape[0], 2), -jnp.log(2.0))

        bayes_predictive = bayes_loss = bayes_entropy = bayes_filter_entropy = bayes_log_predictive

        def to_dict(self):
            return {"name": "Constant"}

        @classmethod
        def from_dict(cls, d):
            return cls()

    assert isinstance(Constant(), Task)
    check_task(Constant(), "test")
    assert not isinstance(object(), Task)
    with pytest.raises(TypeError, match=r"test: task\b.*Task members.*lacks d_in"):
        check_task(object(), "test")


# --------------------------------------------------------------------------------------------
# The exact Bayes predictor of the chain (the module's functions, for any P and means, and the task's)
# --------------------------------------------------------------------------------------------


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
    """bayes_predictive's checks are made (and named) by bayes_log_predictive, which it calls:
    either name is accepted."""
    P, mu, x, y = random_hmm(7)
    with pytest.raises(ValueError, match=r"^bayes_\w*predictive: transition_matrix\b.*square.*\(5, 4\)"):
        bayes_predictive(P[:, :4], mu, x)
    with pytest.raises(ValueError, match=r"^bayes_\w*predictive: embeddings\b.*\(C, d\).*C = 5.*\(4, 4\)"):
        bayes_predictive(P, mu[:4], x)
    with pytest.raises(ValueError, match=r"^bayes_\w*predictive: x\b.*d = 4.*\(60, 3\)"):
        bayes_predictive(P, mu, x[:, :3])
    with pytest.raises(ValueError, match=r"^bayes_\w*predictive: x\b.*shape.*\(1, 60, 4\)"):
        bayes_predictive(P, mu, x[None])
    with pytest.raises(ValueError, match=r"^bayes_\w*predictive: .*transition_matrix\b.*sum to 1"):
        bayes_predictive(P * 2, mu, x)
    with pytest.raises(TypeError, match=r"^bayes_\w*predictive: x\b.*floating point"):
        bayes_predictive(P, mu, x.astype(np.int32))
    with pytest.raises(ValueError, match=r"^bayes_loss: y\b.*\(60,\).*\(59,\)"):
        bayes_loss(P, mu, x, y[:-1])


def test_sticky_chain_bayes_loss_near_h_min():
    task = StickyMarkov()
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
    with pytest.raises(err, match=r"^bayes_\w+: noise_std\b"):
        bayes_predictive(P, mu, x, noise_std=bad)
    with pytest.raises(err, match=r"^bayes_\w+: noise_std\b"):  # named by bayes_log_predictive, which both call
        bayes_loss(P, mu, x, y, noise_std=bad)


def test_noise_std_traced_under_jit():
    P, mu, x, _ = random_hmm(10)
    f = jax.jit(lambda s: bayes_predictive(P, mu, jnp.asarray(x, jnp.float64), noise_std=s))
    np.testing.assert_allclose(f(jnp.float64(2.0)), numpy_forward(P, mu, x, sigma=2.0), rtol=1e-10, atol=1e-13)
