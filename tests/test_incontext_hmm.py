"""The in-context HMM token task: its token layout, the discretisation of the rows against a plain
transcription of the authors' procedure, the exact filter against a numpy forward algorithm,
sampling under jit/vmap and across lengths, and bad inputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradattn.tasks.incontext_hmm import InContextHMM, discretise_rows
from gradattn.tasks.tokens import TokenSample, TokenTask, check_token_task


def authors_discretisation(row, min_cents=5):
    """The authors' per-row procedure, written out in plain numpy from its description: round to 2
    decimals, cents = rint(100 row), floor at min_cents, then walk cyclically over the argsort order
    (ascending to add, descending to subtract), adding 1 where an entry is below 100 or subtracting
    1 where it is above min_cents, until the row holds 100. Ties in the order go to the lower index.
    Returns (cents, whether a cap made the walk skip an entry)."""
    mat = np.round(np.asarray(row, np.float64), 2)
    cents = np.rint(mat * 100.0).astype(int)
    cents = np.maximum(cents, min_cents)
    diff = 100 - int(cents.sum())
    n = len(cents)
    skipped = False
    if diff > 0:
        order = np.argsort(cents, kind="stable")
        idx = 0
        while diff > 0:
            j = order[idx % n]
            if cents[j] < 100:
                cents[j] += 1
                diff -= 1
            else:
                skipped = True
            idx += 1
    elif diff < 0:
        order = np.argsort(-cents, kind="stable")
        idx = 0
        while diff < 0:
            j = order[idx % n]
            if cents[j] > min_cents:
                cents[j] -= 1
                diff += 1
            else:
                skipped = True
            idx += 1
    return cents, skipped


def numpy_filter(trans, emit, obs):
    """The forward algorithm in probability space, float64: p(s_t | o_0..o_t), uniform start."""
    prior = np.full(trans.shape[0], 1.0 / trans.shape[0])
    out = []
    for o in obs:
        post = prior * emit[:, o]
        post = post / post.sum()
        out.append(post)
        prior = post @ trans
    return np.stack(out)


def test_is_a_token_task_with_the_authors_layout_at_the_defaults():
    task = InContextHMM()
    assert isinstance(task, TokenTask)
    check_token_task(task, "test")
    assert (task.n_states, task.n_obs, task.length, task.min_prob) == (5, 5, 20, 0.05)
    assert task.vocab_size == 105 and task.n_classes == 5 and task.class_range == (0, 5)
    assert task.seq_len == 93 and task.header_len == 53 and task.soft_targets is True
    assert (task.trans_token, task.emit_token, task.sep_token, task.obs_token, task.first_symbol_token) == (96, 97, 98, 99, 100)
    assert task.supervised == tuple(range(54, 93, 2)) and task.n_positions == 20
    assert InContextHMM(length=15).seq_len == 83 and InContextHMM(length=50).seq_len == 153


def test_layout_of_one_small_example_written_out():
    task = InContextHMM(n_states=2, n_obs=2, length=3)
    trans = np.array([[70, 30], [45, 55]])
    emit = np.array([[90, 10], [5, 95]])
    states = np.array([0, 1, 1])
    obs = np.array([0, 1, 1])
    s = task.encode(trans, emit, states, obs, jnp.float64)
    assert isinstance(s, TokenSample) and task.seq_len == 17 and task.supervised == (12, 14, 16)
    assert s.tokens.dtype == jnp.int32 and s.labels.dtype == jnp.int32
    assert s.posterior.dtype == jnp.float64 and s.mask.dtype == jnp.float64
    #                          [TRANS] T (cents - 5)  [EMIT] E (cents - 5)  [SEP] [OBS] o_0  [OBS] o_1  [OBS] o_2
    assert s.tokens.tolist() == [96, 65, 25, 40, 50, 97, 85, 5, 0, 90, 98, 99, 100, 99, 101, 99, 101]
    assert s.mask.tolist() == [0] * 12 + [1, 0, 1, 0, 1]
    assert s.labels.tolist() == [0] * 12 + [0, 0, 1, 0, 1]
    post = np.asarray(s.posterior)
    assert (post[[i for i in range(17) if i not in (12, 14, 16)]] == 0).all()
    # t = 0: uniform prior times E[:, 0] = (0.90, 0.05).
    np.testing.assert_allclose(post[12], [18 / 19, 1 / 19], rtol=1e-15)
    # t = 1: prior (18/19) T[0] + (1/19) T[1] = (13.05, 5.95) / 19, times E[:, 1] = (0.10, 0.95).
    np.testing.assert_allclose(post[14], np.array([1.305, 5.6525]) / 6.9575, rtol=1e-14)
    # The generalised ids at another floor: one cent, so probability ids 0 .. 99 and the specials after.
    g = InContextHMM(n_states=2, n_obs=3, length=1, min_prob=0.01)
    assert (g.trans_token, g.obs_token, g.first_symbol_token, g.vocab_size) == (100, 103, 104, 107)
    t = g.encode(np.array([[1, 99], [50, 50]]), np.array([[1, 1, 98], [100 - 2, 1, 1]]), np.array([1]), np.array([2]))
    assert t.tokens.tolist() == [100, 0, 98, 49, 49, 101, 0, 0, 97, 97, 0, 0, 102, 103, 106]


def _discretisation_rows(rng):
    """Rows of every width: Dirichlet draws of several concentrations (the task's floored and
    renormalised ones included), rows on half-cents, and uniform rows (ties)."""
    rows = []
    for n in range(2, 17):
        for alpha in (0.1, 1.0, 10.0):
            raw = rng.dirichlet(np.full(n, alpha), size=40)
            rows += list(raw)
            floored = np.maximum(raw, 0.05)
            rows += list(floored / floored.sum(1, keepdims=True))
        halves = (rng.integers(0, 40, size=(10, n)) + 0.5) / 100
        rows += list(halves)
        rows.append(np.full(n, 1.0 / n))
    return rows


_discretise = jax.jit(discretise_rows)  # min_cents traced: one program per width


@pytest.mark.parametrize("min_cents", [5, 1, 3])
def test_discretisation_is_the_authors_procedure(min_cents):
    rng = np.random.default_rng(min_cents)
    rows = [r for r in _discretisation_rows(rng) if len(r) * min_cents <= 100]
    assert len(rows) >= 1000
    by_width: dict[int, list] = {}
    for r in rows:
        by_width.setdefault(len(r), []).append(r)
    skipped = 0
    for n, group in by_width.items():
        got = np.asarray(_discretise(jnp.asarray(np.stack(group)), min_cents))
        assert got.dtype == np.int32 and got.shape == (len(group), n)
        for r, g in zip(group, got):
            want, skip = authors_discretisation(r, min_cents)
            skipped += skip
            np.testing.assert_array_equal(g, want, err_msg=f"row {r!r}")
        assert (got.sum(1) == 100).all() and (got >= min_cents).all()
    assert skipped >= 20  # rows where the floor's cap made the walk pass an entry by are among them


def test_discretisation_of_rows_where_the_walk_laps_the_row():
    # Many entries floored up from ~0 give a large excess, taken in several passes, passing the
    # entries already at the floor: here 13 entries at 0 become 5 cents each (65) beside 40 + 30 + 30.
    row = np.array([0.4, 0.3, 0.3] + [0.0] * 13)
    want, skipped = authors_discretisation(row)
    assert skipped and want.sum() == 100
    np.testing.assert_array_equal(discretise_rows(jnp.asarray(row)), want)
    # 65 cents to take: 21 passes over the three entries above the floor (63), then one more from the
    # first two in descending order (40, then the lower-indexed 30).
    np.testing.assert_array_equal(want, [18, 8, 9] + [5] * 13)
    # A row that must end all at the floor (min_cents * n = 100).
    np.testing.assert_array_equal(discretise_rows(jnp.asarray(np.eye(20)[0]), 5), np.full(20, 5))


@pytest.mark.parametrize("kwargs", [dict(), dict(n_states=3, n_obs=7, length=200), dict(n_states=16, n_obs=16, length=64, min_prob=0.06)])
def test_posterior_is_the_exact_filter(kwargs):
    task = InContextHMM(**kwargs)
    keys = jax.random.split(jax.random.key(11), 8)
    batch = jax.jit(jax.vmap(lambda k: task.sample(k, jnp.float64)))(keys)
    params = jax.jit(jax.vmap(lambda k: task.draw_parameters(jax.random.split(k)[0])))(keys)
    sup = np.asarray(task.supervised)
    n_s, n_o = task.n_states, task.n_obs
    worst = 0.0
    for i in range(len(keys)):
        tokens = np.asarray(batch.tokens[i])
        trans = (tokens[1:1 + n_s * n_s] + task.min_cents).reshape(n_s, n_s)
        emit = (tokens[2 + n_s * n_s:2 + n_s * n_s + n_s * n_o] + task.min_cents).reshape(n_s, n_o)
        np.testing.assert_array_equal(trans, params[0][i])
        np.testing.assert_array_equal(emit, params[1][i])
        assert (trans.sum(1) == 100).all() and (emit.sum(1) == 100).all()
        obs = tokens[sup] - task.first_symbol_token
        assert ((obs >= 0) & (obs < n_o)).all() and (tokens[sup - 1] == task.obs_token).all()
        want = numpy_filter(trans / 100.0, emit / 100.0, obs)
        post = np.asarray(batch.posterior[i])
        worst = max(worst, np.abs(post[sup] - want).max())
        off = np.setdiff1d(np.arange(task.seq_len), sup)
        assert (post[off] == 0).all() and (np.asarray(batch.mask[i])[off] == 0).all()
        assert (np.asarray(batch.mask[i])[sup] == 1).all()
        labels = np.asarray(batch.labels[i])
        assert (labels[off] == 0).all() and ((labels[sup] >= 0) & (labels[sup] < n_s)).all()
    assert batch.posterior.dtype == jnp.float64
    assert worst < 1e-12


def test_sampling_is_pure_and_batches():
    task = InContextHMM(length=12)
    keys = jax.random.split(jax.random.key(0), 4)
    batch = jax.jit(jax.vmap(task.sample))(keys)
    assert batch.tokens.shape == (4, task.seq_len) and batch.posterior.shape == (4, task.seq_len, 5)
    assert batch.posterior.dtype == jnp.float32 and batch.mask.dtype == jnp.float32
    single = jax.jit(task.sample)
    for i, k in enumerate(keys):
        one, again = single(k), single(k)
        for a, b, c in zip(one, again, jax.tree.map(lambda x, i=i: x[i], batch)):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(one.tokens, batch.tokens[i])
        np.testing.assert_array_equal(one.labels, batch.labels[i])
    assert not np.array_equal(batch.tokens[0], batch.tokens[1])
    sup = np.asarray(task.supervised)
    np.testing.assert_allclose(np.asarray(batch.posterior)[:, sup].sum(-1), 1.0, atol=1e-6)
    assert ((np.asarray(batch.tokens) >= 0) & (np.asarray(batch.tokens) < task.vocab_size)).all()
    # Neither the posterior's dtype nor the x64 mode changes what is drawn; a raw key serves too.
    s64 = jax.jit(lambda k: task.sample(k, jnp.float64))(keys[0])
    with jax.enable_x64(False):
        s32 = jax.jit(task.sample)(keys[0])
    for s in (s64, s32):
        np.testing.assert_array_equal(s.tokens, batch.tokens[0])
        np.testing.assert_array_equal(s.labels, batch.labels[0])
        np.testing.assert_allclose(s.posterior, batch.posterior[0], atol=1e-5)
    assert single(jax.random.PRNGKey(5)).tokens.shape == (task.seq_len,)


def test_a_longer_task_draws_the_same_hmm_and_the_same_first_steps():
    short, long = InContextHMM(length=20), InContextHMM(length=40)
    keys = jax.random.split(jax.random.key(3), 6)
    a = jax.jit(jax.vmap(short.sample))(keys)
    b = jax.jit(jax.vmap(long.sample))(keys)
    n = short.seq_len
    np.testing.assert_array_equal(a.tokens, b.tokens[:, :n])
    np.testing.assert_array_equal(a.labels, b.labels[:, :n])
    np.testing.assert_array_equal(a.mask, b.mask[:, :n])
    np.testing.assert_allclose(a.posterior, b.posterior[:, :n], rtol=1e-6, atol=1e-7)
    assert not np.array_equal(b.tokens[:, n:], np.broadcast_to(b.tokens[:1, n:], b.tokens[:, n:].shape))
    p, q = (jax.jit(jax.vmap(t.draw_parameters))(keys) for t in (short, long))
    np.testing.assert_array_equal(p[0], q[0])
    np.testing.assert_array_equal(p[1], q[1])
    # One observation: the header, [OBS] o_0, and the posterior after o_0 alone.
    one = jax.jit(InContextHMM(length=1).sample)(keys[0])
    assert one.tokens.shape == (55,) and one.mask.tolist() == [0] * 54 + [1]
    np.testing.assert_array_equal(one.tokens, a.tokens[0, :55])


def test_paths_follow_the_given_rows():
    task = InContextHMM(n_states=3, n_obs=4, length=60)
    trans = np.array([[80, 15, 5], [5, 5, 90], [30, 30, 40]])
    emit = np.array([[70, 10, 10, 10], [5, 5, 5, 85], [25, 25, 25, 25]])
    keys = jax.random.split(jax.random.key(7), 2000)
    states, obs = jax.jit(jax.vmap(lambda k: task.draw_path(k, trans, emit)))(keys)
    states, obs = np.asarray(states), np.asarray(obs)
    assert states.dtype == np.int32 and states.shape == (2000, 60)
    np.testing.assert_allclose(np.bincount(states[:, 0], minlength=3) / 2000, 1 / 3, atol=0.04)
    counts = np.zeros((3, 3))
    np.add.at(counts, (states[:, :-1].ravel(), states[:, 1:].ravel()), 1)
    np.testing.assert_allclose(counts / counts.sum(1, keepdims=True), trans / 100, atol=0.015)
    counts = np.zeros((3, 4))
    np.add.at(counts, (states.ravel(), obs.ravel()), 1)
    np.testing.assert_allclose(counts / counts.sum(1, keepdims=True), emit / 100, atol=0.015)
    # The drawn rows: on the grid, floored, and spread over the simplex.
    t, e = jax.vmap(InContextHMM().draw_parameters)(jax.random.split(jax.random.key(8), 2000))
    assert (np.asarray(t).sum(-1) == 100).all() and (np.asarray(e) >= 5).all()
    np.testing.assert_allclose(np.asarray(t).mean((0, 1)), 20, atol=0.5)
    assert np.asarray(e).max() > 60


def test_dict_round_trip():
    for task in (InContextHMM(), InContextHMM(n_states=3, n_obs=16, length=7, min_prob=0.02)):
        d = task.to_dict()
        assert d["name"] == "InContextHMM"
        again = InContextHMM.from_dict(json.loads(json.dumps(d)))
        assert again == task and hash(again) == hash(task)
    assert InContextHMM().to_dict() == {"name": "InContextHMM", "n_states": 5, "n_obs": 5, "length": 20, "min_prob": 0.05}
    with pytest.raises(ValueError, match="InContextHMM.from_dict"):
        InContextHMM.from_dict({"name": "DirichletHMM", "n_states": 5})


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(n_states=1), ValueError, r"InContextHMM: n_states must be an integer in \[2, 16\]"),
    (dict(n_states=17), ValueError, r"n_states must be an integer in \[2, 16\], got 17"),
    (dict(n_obs=1), ValueError, r"InContextHMM: n_obs must be an integer in \[2, 16\]"),
    (dict(length=0), ValueError, r"InContextHMM: length must be an integer in \[1, 4096\]"),
    (dict(length=4097), ValueError, r"length must be an integer in \[1, 4096\], got 4097"),
    (dict(n_states=2.0), TypeError, "InContextHMM: n_states must be an integer"),
    (dict(min_prob=0.0), ValueError, r"InContextHMM: min_prob must be a number in \[0.01, 0.5\]"),
    (dict(min_prob=0.055), ValueError, "InContextHMM: min_prob must lie on the 0.01 grid"),
    (dict(n_states=16, min_prob=0.07), ValueError, r"min_prob \* max\(n_states, n_obs\) must be <= 1"),
    (dict(n_obs=11, min_prob=0.1), ValueError, r"min_prob \* max\(n_states, n_obs\) must be <= 1"),
    (dict(min_prob="0.05"), TypeError, "InContextHMM: min_prob must be a real number"),
])
def test_bad_fields(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        InContextHMM(**kwargs)


def test_bad_calls():
    task = InContextHMM(n_states=2, n_obs=3, length=2)
    trans = np.array([[50, 50], [20, 80]])
    emit = np.array([[40, 30, 30], [5, 5, 90]])
    path = np.array([0, 1])
    over, floor = np.array([[50, 51], [20, 80]]), np.array([[97, 3], [20, 80]])
    with pytest.raises(TypeError, match="InContextHMM.sample: key must be a PRNG key"):
        task.sample(0)
    with pytest.raises(TypeError, match="InContextHMM.sample: dtype must be floating point"):
        task.sample(jax.random.key(0), jnp.int32)
    with pytest.raises(TypeError, match="InContextHMM.draw_parameters: key must be one PRNG key"):
        task.draw_parameters(jax.random.split(jax.random.key(0)))
    cases = [
        ((trans.T[:1], emit, path, path), ValueError, r"InContextHMM.encode: trans_cents must have shape \(2, 2\), got shape \(1, 2\)"),
        ((trans, emit[:, :2], path, path), ValueError, r"emit_cents must have shape \(2, 3\)"),
        ((trans / 100, emit, path, path), TypeError, "InContextHMM.encode: trans_cents must hold integer cents"),
        ((trans.tolist(), emit, path, path), TypeError, "InContextHMM.encode: trans_cents must be an array"),
        ((over, emit, path, path), ValueError, r"every row of trans_cents must sum to 100 cents, got row sums \[101, 100\]"),
        ((floor, emit, path, path), ValueError, r"trans_cents \(shape \(2, 2\)\) has entries in \[3, 97\], outside \[5, 100\]"),
        ((trans, emit, np.array([0, 2]), path), ValueError, r"InContextHMM.encode: states \(shape \(2,\)\) has values in \[0, 2\], outside \[0, 2\)"),
        ((trans, emit, path, np.array([3, 0])), ValueError, r"observations \(shape \(2,\)\) has values in \[0, 3\], outside \[0, 3\)"),
        ((trans, emit, np.array([0, 1, 1]), path), ValueError, r"states must have shape \(2,\) \(length K = 2\), got shape \(3,\)"),
        ((trans, emit, path, np.array([0.0, 1.0])), TypeError, "observations must hold integers"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            task.encode(*args)
    with pytest.raises(TypeError, match="InContextHMM.encode: dtype must be floating point"):
        task.encode(trans, emit, path, path, jnp.int32)
    with pytest.raises(ValueError, match="InContextHMM.draw_path: every row of emit_cents must sum to 100"):
        task.draw_path(jax.random.key(0), trans, np.array([[40, 30, 30], [5, 5, 5]]))
    # Traced arguments are checked for shape and dtype only, and the sample is the eager one.
    eager = task.encode(trans, emit, path, path)
    traced = jax.jit(task.encode)(trans, emit, path, path)
    np.testing.assert_array_equal(eager.tokens, traced.tokens)
    np.testing.assert_allclose(eager.posterior, traced.posterior, rtol=1e-6)
    with pytest.raises(ValueError, match=r"discretise_rows: min_cents must be an integer in \[0, 20\], got 21"):
        discretise_rows(jnp.ones((2, 5)) / 5, 21)
    with pytest.raises(ValueError, match=r"discretise_rows: rows must be a floating array \(\.\.\., C\) with C >= 2"):
        discretise_rows(jnp.ones((2, 5), jnp.int32), 5)
    with pytest.raises(TypeError, match="discretise_rows: rows must be an array"):
        discretise_rows([0.5, 0.5])
