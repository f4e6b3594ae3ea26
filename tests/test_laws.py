"""Every first-order law against jax.grad, in float64 (relative error < 1e-9); docs/theory.md states them.

Each law is compared with autodiff of the loss written as a function of exactly the quantity the law
differentiates with respect to (logits, contexts, alpha, scores, values, queries, keys, weights), so a
wrong law cannot hide behind a right total.
"""

import functools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings

import gradattn as ga
from gradattn import verify
from gradattn.head import causal_mask, normalised_weights, token_losses

RTOL = 1e-9


def blocked_grads(*args):
    return ga.blocked_loss_and_grads(*args)[1]


def rel_err(a, b, floor=1e-12):
    """verify.relative_error of a whole array (floored for all-zero b), of arrays of one shape."""
    assert np.shape(a) == np.shape(b), (np.shape(a), np.shape(b))
    return verify.relative_error(a, b, floor)


def tree_rel_err(got, want):
    """Per-leaf relative error, where a leaf whose true gradient is exactly zero (W_Q and W_K when
    N = 1: one key, nothing to route) is measured against the scale of the whole gradient."""
    scale = max(float(np.max(np.abs(np.asarray(w)), initial=0.0)) for w in jax.tree.leaves(want))
    return {
        i: rel_err(g, w, floor=1e-6 * scale + 1e-300)
        for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    }


def assert_trees_rel(got, want, rtol):
    """Leaf by leaf, max |got - want| <= rtol * max |want| (the error measure used throughout)."""
    chex.assert_trees_all_equal_structs(got, want)
    errors = tree_rel_err(got, want)
    assert max(errors.values()) < rtol, errors


def make_case(seed, n, d_in, d_k, d_v, c, weighted, dtype=jnp.float64, scale=0.7):
    kp, kx, ky, kw, kz = jax.random.split(jax.random.key(seed), 5)
    params = ga.init_head(kp, d_in, d_k, d_v, c, scale=scale, dtype=dtype)
    x = jax.random.normal(kx, (n, d_in), dtype)
    y = jax.random.randint(ky, (n,), 0, c)
    weights = None
    if weighted:
        w = jax.random.uniform(kw, (n,), dtype) * (jax.random.uniform(kz, (n,)) > 0.3)
        weights = w.at[0].set(0.5)  # at least one position counts
    return params, x, y, weights


def loss_from_logits(z, y, weights):
    return jnp.sum(normalised_weights(weights, z.shape[0], z.dtype) * token_losses(z, y))


# Head shapes (N, d_in, d_k, d_v, C) from a fixed list, so that each compiled program is reused
# across examples (every new shape compiles again); the data vary freely. They cover N = 1 (one key,
# dL/ds = 0), every dimension 1 with two classes, and a generic head with several rows per block.
# A law is an identity at every N: N = 23 proves what N = 1999 would (the paper-size float32 test,
# marked slow, covers the length itself).
SHAPES = [(1, 3, 2, 2, 3), (7, 1, 1, 1, 2), (23, 5, 3, 4, 6)]
shape_ids = [f"n{s[0]}-din{s[1]}-dk{s[2]}-dv{s[3]}-c{s[4]}" for s in SHAPES]
seeds = st.integers(0, 2**16)


def shape_case(shape, seed, weighted):
    n, d_in, d_k, d_v, c = shape
    return make_case(seed, n, d_in, d_k, d_v, c, weighted)


VERIFY_NAME = {
    "output_error": "output_error e = dL/dz", "upstream_grad": "upstream u = dL/dg",
    "compatibility": "compatibility b = dL/dalpha", "routing_grad": "routing dL/ds",
    "advantage": "advantage -alpha a = dL/ds", "value_grad": "value dL/dv", "query_grad": "query dL/dq",
    "key_grad": "key dL/dk", "output_weight_grad": "output weight dL/dW_O = G^T e",
}

# The pairs of gradattn.verify (what `gradattn laws-check` reports), one compile per shape.
laws_and_autodiff = jax.jit(verify.law_pairs, static_argnames="causal")


def test_law_pairs_cover_every_law():
    params, x, y, w = make_case(0, 5, 3, 2, 2, 3, True)
    names = " ".join(laws_and_autodiff(params, x, y, w, causal=True))
    for law in ("output_error", "upstream", "compatibility", "advantage", "routing", "value", "query", "key",
                "output weight", "dL/dW_Q", "dL/dW_K", "dL/dW_V", "dL/dW_O"):
        assert law in names, law


def test_a_wrong_law_is_caught(monkeypatch):
    """The check can fail: a value law off by a transpose is reported far above the tolerance."""
    params, x, y, w = make_case(1, 6, 3, 2, 3, 3, True)
    monkeypatch.setattr(verify.laws, "value_grad", lambda alpha, u: alpha @ u)
    # A fresh jit traces with the broken law in place (one compile instead of op-by-op dispatch).
    pairs = jax.jit(lambda *a: verify.law_pairs(*a, True))(params, x, y, w)
    assert verify.relative_error(*pairs["value dL/dv"]) > 1e-3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)
@settings(max_examples=3, deadline=None)
@given(seed=seeds)
def test_each_law_equals_autodiff(shape, weighted, causal, seed):
    """Every law of gradattn.verify against autodiff, on each fixed shape, causal or not, weighted or
    not (one compile per combination, three random draws of parameters and data each)."""
    params, x, y, w = shape_case(shape, seed, weighted)
    pairs = laws_and_autodiff(params, x, y, w, causal=causal)
    # A law whose true value is exactly zero (dL/ds when N = 1, or when no supervised position can
    # route anywhere) is measured against the scale of all the gradients of this instance.
    scale = max(float(np.max(np.abs(np.asarray(auto)))) for _, auto in pairs.values())
    for name, (law, auto) in pairs.items():
        assert rel_err(law, auto, floor=1e-6 * scale + 1e-300) < RTOL, name


@functools.partial(jax.jit, static_argnums=4)
def _blocked_dense_and_autodiff(params, x, y, w, causal):
    return (ga.blocked_loss_and_grads(params, x, y, w, causal), ga.dense_loss_and_grads(params, x, y, w, causal),
            jax.value_and_grad(ga.dense_loss)(params, x, y, w, causal))


# Each (shape, causal, weighted) compiles the blocked pass anew, so here each shape is paired with
# both masks and both weightings across two cases (not all four); tests/test_blocked.py covers the
# blocked pass over lengths and block sizes with every combination.
GRAD_CASES = [(shape, causal, causal == (i % 2 == 0)) for i, shape in enumerate(SHAPES) for causal in (True, False)]


@pytest.mark.parametrize("shape, causal, weighted", GRAD_CASES,
                         ids=[f"{shape_ids[i // 2]}-{'causal' if c else 'full'}-{'w' if w else 'unw'}"
                              for i, (_, c, w) in enumerate(GRAD_CASES)])
@settings(max_examples=3, deadline=None)
@given(seed=seeds)
def test_blocked_and_dense_grads_equal_autodiff(shape, causal, weighted, seed):
    """The blocked and the dense loss and parameter gradients equal jax.grad of dense_loss (< 1e-9),
    on every fixed shape, causal and not, weighted and not."""
    params, x, y, w = shape_case(shape, seed, weighted)
    (b_loss, b_grads), (d_loss, d_grads), (auto_loss, auto) = _blocked_dense_and_autodiff(params, x, y, w, causal)
    for name, law_loss, grads in (("blocked", b_loss, b_grads), ("dense", d_loss, d_grads)):
        assert abs(float(law_loss) - float(auto_loss)) <= RTOL * abs(float(auto_loss)), name
        errors = tree_rel_err(grads, auto)
        assert max(errors.values()) < RTOL, (name, errors)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)
@settings(max_examples=3, deadline=None)
@given(seed=seeds)
def test_invariants(shape, weighted, causal, seed):
    """Rows of alpha sum to one, rows of dL/ds sum to zero, and nothing flows to the future under the
    causal mask: on each fixed shape, causal or not, weighted or not, three draws each."""
    params, x, y, w = shape_case(shape, seed, weighted)
    out = ga.forward(params, x, causal)
    u = ga.upstream_grad(params, out, y, w)
    b = ga.compatibility(u, out.v)
    ds = ga.routing_grad(out.alpha, b)
    np.testing.assert_allclose(out.alpha.sum(-1), 1.0, rtol=0, atol=1e-14)
    # Rows of dL/ds sum to zero up to rounding of the terms alpha_ij b_ij that cancel in the sum.
    row_scale = np.sum(np.abs(np.asarray(out.alpha * b)), axis=-1)
    assert np.all(np.abs(np.asarray(ds.sum(-1))) <= 1e-13 * row_scale)
    if causal:
        future = ~np.asarray(causal_mask(x.shape[0]))
        assert np.all(np.asarray(out.alpha)[future] == 0.0)
        assert np.all(np.asarray(ds)[future] == 0.0)


def test_loss_fn_matches_reference_and_mean_cross_entropy():
    params, x, y, _ = make_case(3, 9, 4, 3, 5, 6, weighted=False)
    out = jax.jit(ga.forward)(params, x)
    p = jax.nn.softmax(np.asarray(out.logits))
    by_hand = -np.mean(np.log(np.asarray(p)[np.arange(9), np.asarray(y)]))
    loss = jax.jit(ga.loss_fn)
    assert abs(float(loss(params, x, y)) - by_hand) < 1e-12
    # weights 0/1 select positions: the loss is the mean over the selected ones.
    w = jnp.array([1, 0, 1, 1, 0, 0, 1, 0, 1], jnp.float64)
    sel = np.asarray(w) > 0
    by_hand_w = -np.mean(np.log(np.asarray(p)[np.arange(9), np.asarray(y)])[sel])
    assert abs(float(loss(params, x, y, w)) - by_hand_w) < 1e-12


def test_noncausal_attends_to_the_future_and_causal_does_not():
    params, x, _, _ = make_case(4, 6, 3, 2, 2, 3, weighted=False)
    a_causal = np.asarray(ga.forward(params, x, causal=True).alpha)
    a_full = np.asarray(ga.forward(params, x, causal=False).alpha)
    assert np.all(np.triu(a_causal, 1) == 0) and np.all(np.diag(a_causal) > 0)
    assert np.all(a_full > 0)
    assert a_causal[0, 0] == 1.0


class VariantsTest(chex.TestCase):
    """Each public function gives the same answer with and without jit."""

    def setUp(self):
        super().setUp()
        self.params, self.x, self.y, self.w = make_case(7, 10, 5, 3, 4, 6, weighted=True)
        self.out = ga.forward(self.params, self.x)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(True, False)
    def test_head_functions(self, causal):
        """Against independent references: a numpy forward pass and loss, and jax.grad(dense_loss)."""
        ref = numpy_forward(self.params, self.x, self.y, self.w, causal)
        fwd = self.variant(ga.forward, static_argnames="causal")(self.params, self.x, causal=causal)
        np.testing.assert_allclose(fwd.alpha, ref["alpha"], rtol=1e-12, atol=1e-300)
        np.testing.assert_allclose(fwd.logits, ref["logits"], rtol=1e-12)
        for f in (ga.loss_fn, ga.dense_loss):
            got = self.variant(f, static_argnames="causal")(self.params, self.x, self.y, self.w, causal=causal)
            np.testing.assert_allclose(got, ref["loss"], rtol=1e-12)
        autodiff = jax.grad(ga.dense_loss)(self.params, self.x, self.y, self.w, causal)
        for f in (ga.dense_loss_and_grads, ga.blocked_loss_and_grads):
            got = self.variant(f, static_argnames="causal")(self.params, self.x, self.y, self.w, causal=causal)
            if isinstance(got, tuple) and not isinstance(got, ga.HeadParams):
                np.testing.assert_allclose(got[0], ref["loss"], rtol=1e-12)
                got = got[1]
            assert_trees_rel(got, autodiff, 1e-9)

    @chex.variants(with_jit=True, without_jit=True)
    def test_laws(self):
        """Each law, jitted or not, against autodiff in that law's own variable."""
        out, p, y, w = self.out, self.params, self.y, self.w
        auto = {name: pair[1] for name, pair in laws_and_autodiff(p, self.x, y, w, True).items()}
        u = ga.upstream_grad(p, out, y, w)
        b = ga.compatibility(u, out.v)
        ds = ga.routing_grad(out.alpha, b)
        e = ga.output_error(out, y, w)
        cases = [
            ("output_error", ga.output_error, (out, y, w), lambda r: r),
            ("upstream_grad", ga.upstream_grad, (p, out, y, w), lambda r: r),
            ("compatibility", ga.compatibility, (u, out.v), lambda r: jnp.where(causal_mask(10), r, 0.0)),
            ("routing_grad", ga.routing_grad, (out.alpha, b), lambda r: r),
            ("advantage", ga.advantage, (out.alpha, b), lambda r: -out.alpha * r),
            ("value_grad", ga.value_grad, (out.alpha, u), lambda r: r),
            ("query_grad", ga.query_grad, (ds, out.k), lambda r: r),
            ("key_grad", ga.key_grad, (ds, out.q), lambda r: r),
            ("output_weight_grad", ga.output_weight_grad, (out.context, e), lambda r: r),
        ]
        for name, f, args, view in cases:
            want = auto[VERIFY_NAME[name]]
            if name == "compatibility":  # dL/dalpha_ij is u_i . v_j for every (i, j); compare the visible ones
                want = jnp.where(causal_mask(10), want, 0.0)
            assert_trees_rel(view(self.variant(f)(*args)), want, 1e-9)


def numpy_forward(params, x, y, w, causal):
    """The head's forward pass and loss in plain numpy float64: an implementation independent of gradattn."""
    wq, wk, wv, wo = (np.asarray(a, np.float64) for a in params)
    x = np.asarray(x, np.float64)
    q, k, v = x @ wq, x @ wk, x @ wv
    s = q @ k.T / np.sqrt(wq.shape[1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape, bool)), s, -np.inf)
    alpha = np.exp(s - s.max(axis=1, keepdims=True))
    alpha /= alpha.sum(axis=1, keepdims=True)
    logits = alpha @ v @ wo
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    ce = -logp[np.arange(len(y)), np.asarray(y)]
    wn = np.ones(len(y)) if w is None else np.asarray(w, np.float64)
    return {"alpha": alpha, "logits": logits, "loss": float(np.sum(wn * ce) / np.sum(wn))}


def test_vmap_over_sequences_and_parameter_sets():
    params, x, y, w = make_case(11, 8, 4, 3, 3, 5, weighted=True)
    xs = jnp.stack([x, x[::-1], 2 * x])
    ys = jnp.stack([y, y[::-1], y])
    ws = jnp.stack([w, w[::-1], w])
    # Everything under jit (the same vmaps, compiled once each instead of dispatched op by op).
    batched = jax.jit(jax.vmap(blocked_grads, in_axes=(None, 0, 0, 0)))(params, xs, ys, ws)
    one = jax.jit(blocked_grads)
    for i in range(3):
        assert_trees_rel(jax.tree.map(lambda a, i=i: a[i], batched), one(params, xs[i], ys[i], ws[i]), 1e-12)
    losses = jax.jit(jax.vmap(ga.loss_fn, in_axes=(None, 0, 0, 0)))(params, xs, ys, ws)
    dense = jax.jit(ga.dense_loss)
    np.testing.assert_allclose(losses, [dense(params, xs[i], ys[i], ws[i]) for i in range(3)], rtol=1e-12)

    keys = jax.random.split(jax.random.key(5), 4)
    stacked = jax.jit(jax.vmap(lambda k: ga.init_head(k, 4, 3, 3, 5, dtype=jnp.float64)))(keys)
    per_set = jax.jit(jax.vmap(blocked_grads, in_axes=(0, None, None, None)))(stacked, x, y, w)
    auto = jax.jit(jax.vmap(jax.grad(ga.dense_loss), in_axes=(0, None, None, None)))(stacked, x, y, w)
    assert_trees_rel(per_set, auto, 1e-10)

    # A law vmapped over a batch of heads.
    @jax.jit
    def value_grads(stacked, x, y, w):
        outs = jax.vmap(ga.forward, in_axes=(0, None))(stacked, x)
        us = jax.vmap(ga.upstream_grad, in_axes=(0, 0, None, None))(stacked, outs, y, w)
        return jax.vmap(ga.value_grad)(outs.alpha, us)

    dv = value_grads(stacked, x, y, w)
    assert dv.shape == (4, 8, 3)


def test_grad_of_loss_fn_wrt_params_and_inputs():
    params, x, y, w = make_case(12, 7, 3, 2, 4, 4, weighted=True)
    both = lambda f: jax.jit(jax.grad(f, argnums=(0, 1)))(params, x, y, w)  # noqa: E731
    (dp, dx), (dp_ref, dx_ref) = both(ga.loss_fn), both(ga.dense_loss)
    assert_trees_rel(dp, dp_ref, 1e-10)
    assert rel_err(dx, dx_ref) < RTOL


def test_float32_at_paper_size():
    """N = 1999, the paper's head: the blocked pass vs autodiff within float32 tolerance, float32 throughout."""
    params, x, y, _ = make_case(0, 1999, 20, 10, 15, 8, weighted=False, dtype=jnp.float32, scale=0.1)
    x = x.astype(jnp.float32)
    loss, grads = jax.jit(ga.blocked_loss_and_grads)(params, x, y)
    ref_loss, ref = jax.jit(jax.value_and_grad(ga.dense_loss))(params, x, y)
    assert loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in grads)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    for name in ga.HeadParams._fields:
        assert rel_err(getattr(grads, name), getattr(ref, name)) < 2e-4, name
    # And in float64 the two agree to 1e-9 at the same size.
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x64 = x.astype(jnp.float64)
    g64 = jax.jit(blocked_grads)(p64, x64, y)
    r64 = jax.jit(jax.grad(ga.dense_loss))(p64, x64, y)
    for name in ga.HeadParams._fields:
        assert rel_err(getattr(g64, name), getattr(r64, name)) < RTOL, name


class TestBadInput:
    def setup_method(self):
        self.params, self.x, self.y, _ = make_case(1, 5, 4, 3, 3, 4, weighted=False)

    @pytest.mark.parametrize("fn", [ga.loss_fn, ga.blocked_loss_and_grads, blocked_grads, ga.dense_loss])
    def test_each_bad_input_raises_and_names_the_argument(self, fn):
        """Each message names the argument right after the function's name (``fn: x ...``), and
        the shape, bound or value at fault."""
        p, x, y = self.params, self.x, self.y
        with pytest.raises(ValueError, match=r"^\w+: x\b.*\(5, 3\).*d_in = 4"):
            fn(p, x[:, :3], y)
        with pytest.raises(ValueError, match=r"^\w+: x\b.*2-D.*\(5,\)"):
            fn(p, x[:, 0], y)
        with pytest.raises(ValueError, match=r"^\w+: x\b.*2-D.*\(2, 5, 4\)"):
            fn(p, jnp.stack([x, x]), y)
        with pytest.raises(ValueError, match=r"^\w+: y\b.*\(5,\).*\(4,\)"):
            fn(p, x, y[:4])
        with pytest.raises(TypeError, match=r"^\w+: y\b.*integer.*float64"):
            fn(p, x, y.astype(jnp.float64))
        with pytest.raises(ValueError, match=r"^\w+: y\b.*\[0, 4\].*outside \[0, 4\)"):
            fn(p, x, y.at[2].set(4))
        with pytest.raises(ValueError, match=r"^\w+: y\b.*\[-1, \d\].*outside \[0, 4\)"):
            fn(p, x, y.at[0].set(-1))
        with pytest.raises(ValueError, match=r"^\w+: weights\b.*\(5,\).*\(3,\)"):
            fn(p, x, y, jnp.ones(3))
        with pytest.raises(ValueError, match=r"^\w+: weights\b.*non-negative"):
            fn(p, x, y, jnp.array([1.0, -1.0, 1.0, 1.0, 1.0]))
        with pytest.raises(ValueError, match=r"^\w+: weights\b.*sum to zero"):
            fn(p, x, y, jnp.zeros(5))
        with pytest.raises(ValueError, match=r"^\w+: x\b.*non-finite"):
            fn(p, x.at[1, 1].set(jnp.nan), y)
        with pytest.raises(TypeError, match=r"^\w+: x\b.*floating"):
            fn(p, jnp.ones((5, 4), jnp.int32), y)
        with pytest.raises(ValueError, match=r"^\w+: params\.w_k\b.*\(4, 2\)"):
            fn(p._replace(w_k=p.w_k[:, :2]), x, y)
        with pytest.raises(ValueError, match=r"^\w+: params\.w_o\b.*\(2, 4\).*d_v = 3"):
            fn(p._replace(w_o=p.w_o[:2]), x, y)
        with pytest.raises(TypeError, match=r"^\w+: params\b.*HeadParams.*got tuple"):
            fn((p.w_q, p.w_k), x, y)

    def test_mixed_dtypes_are_rejected(self):
        p32 = jax.tree.map(lambda a: a.astype(jnp.float32), self.params)
        with pytest.raises(TypeError, match=r"blocked_loss_and_grads: .*dtype.*w_q float32.*x float64"):
            blocked_grads(p32, self.x, self.y)
        with pytest.raises(TypeError, match=r"loss_fn: .*dtype.*w_v float32"):
            ga.loss_fn(self.params._replace(w_v=p32.w_v), self.x, self.y)

    def test_shape_errors_are_raised_at_trace_time_under_jit(self):
        with pytest.raises(ValueError, match=r"loss_fn: y\b.*\(5,\).*\(3,\)"):
            jax.jit(ga.loss_fn)(self.params, self.x, self.y[:3])

    def test_laws_reject_mismatched_shapes(self):
        out = ga.forward(self.params, self.x)
        u = ga.upstream_grad(self.params, out, self.y)
        with pytest.raises(ValueError, match=r"routing_grad: b\b.*\(5, 5\).*\(5, 4\)"):
            ga.routing_grad(out.alpha, jnp.ones((5, 4)))
        with pytest.raises(ValueError, match=r"compatibility: v\b.*\(\?, 3\).*\(5, 2\)"):
            ga.compatibility(u, jnp.ones((5, 2)))
        with pytest.raises(ValueError, match=r"value_grad: u\b.*\(5, \?\).*\(4, 3\)"):
            ga.value_grad(out.alpha, u[:4])
        with pytest.raises(ValueError, match=r"output_error: y\b.*\(5,\).*\(2,\)"):
            ga.output_error(out, self.y[:2])

    def test_init_head_rejects_bad_sizes(self):
        with pytest.raises(ValueError, match=r"init_head: d_k\b.*\[1, 4096\].*got 0"):
            ga.init_head(jax.random.key(0), 4, 0, 3, 2)
        with pytest.raises(TypeError, match=r"init_head: dtype\b.*floating"):
            ga.init_head(jax.random.key(0), 4, 2, 3, 2, dtype=jnp.int32)

    def test_init_head_accepts_any_integral_size(self):
        key = jax.random.key(0)
        p = ga.init_head(key, np.int64(4), np.int32(2), np.array(3), jnp.int32(2))
        ref = ga.init_head(key, 4, 2, 3, 2)
        for a, b in zip(p, ref):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(TypeError, match=r"init_head: d_v\b.*integer.*3\.0.*float"):
            ga.init_head(key, 4, 2, 3.0, 2)
        with pytest.raises(TypeError, match=r"init_head: d_in\b.*integer.*bool"):
            ga.init_head(key, True, 2, 3, 2)
        with pytest.raises(TypeError, match=r"init_head: n_classes\b.*integer"):
            ga.init_head(key, 4, 2, 3, np.float64(2))
        with pytest.raises(ValueError, match=r"init_head: d_k\b.*\[1, 4096\].*got 0"):
            ga.init_head(key, 4, np.int64(0), 3, 2)

    def test_init_head_draws_the_papers_distribution(self):
        p = ga.init_head(jax.random.key(0), 200, 100, 150, 80)
        assert p.w_q.dtype == jnp.float32 and p.w_o.shape == (150, 80)
        allv = np.concatenate([np.ravel(a) for a in p])
        assert abs(allv.mean()) < 0.002 and abs(allv.std() - 0.1) < 0.002


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), float("inf")])
def test_init_head_rejects_a_scale_that_is_not_finite_and_positive(scale):
    with pytest.raises(ValueError, match="init_head: scale"):
        ga.init_head(jax.random.key(0), 4, 2, 3, 2, scale=scale)


def test_init_head_scale_zero_says_why_and_numpy_scales_work():
    with pytest.raises(ValueError, match=r"init_head: scale\b.*got 0\b.*never move"):
        ga.init_head(jax.random.key(0), 4, 2, 3, 2, scale=0)
    with pytest.raises(TypeError, match=r"init_head: scale\b.*'0\.1'"):
        ga.init_head(jax.random.key(0), 4, 2, 3, 2, scale="0.1")
    a = ga.init_head(jax.random.key(0), 4, 2, 3, 2, scale=np.float32(0.5))
    b = ga.init_head(jax.random.key(0), 4, 2, 3, 2, scale=0.5)
    np.testing.assert_array_equal(a.w_q, b.w_q)
