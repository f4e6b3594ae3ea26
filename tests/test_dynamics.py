"""First-order predictions, feedback-loop statistics and settling steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradattn import blocked_loss_and_grads, dense_loss, dynamics, forward, init_head, upstream_grad
from gradattn.dynamics import (
    FeedbackRecord,
    StepFeedback,
    distance_to_final,
    feedback_probe,
    feedback_stats,
    first_order_report,
    frame_before_precision,
    make_feedback_probe,
    routing_feedback_identity,
    settling_step,
    snapshots,
)
from gradattn.laws import advantage, compatibility, value_grad

# Eager dispatch of many small ops is the slow part on a shared CPU: compile each function once.
report = jax.jit(first_order_report, static_argnames=("causal", "value_param"))
stats_fn = jax.jit(feedback_stats, static_argnames=("causal", "block_size"))
identity = jax.jit(routing_feedback_identity, static_argnames=("causal",))


def problem(n=24, d_in=6, d_k=4, d_v=5, c=3, scale=0.5, dtype=jnp.float64, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    p = init_head(k1, d_in, d_k, d_v, c, scale=scale, dtype=dtype)
    x = jax.random.normal(k2, (n, d_in), dtype)
    y = jax.random.randint(k3, (n,), 0, c)
    return p, x, y


@pytest.mark.parametrize("value_param", ["values", "w_v"])
def test_first_order_ratios_tend_to_one(value_param):
    p, x, y = problem()
    errs = []
    for lr in (1e-1, 1e-2, 1e-3):
        r = report(p, x, y, lr, value_param=value_param)
        errs.append(abs(float(r.ratio) - 1.0))
        assert r.predicted_dloss < 0
    # The error is O(lr): it shrinks about tenfold per decade and is under 1% at lr = 1e-3.
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-2
    np.testing.assert_allclose(errs[1] / errs[2], 10.0, rtol=0.2)
    r = report(p, x, y, 1e-4, value_param=value_param)
    assert abs(float(r.ratio) - 1) < 1e-3
    assert abs(float(r.value_dloss_ratio) - 1) < 1e-3
    # With u held fixed, Delta b from the autodiff step equals the value law's prediction.
    np.testing.assert_allclose(r.dcompat_actual, r.dcompat_predicted, rtol=1e-9, atol=1e-15)
    assert abs(float(r.dcompat_ratio) - 1) < 1e-9
    # The full change of b (u recomputed) is first order too, but not equal: u moves with the values.
    assert np.isfinite(float(r.dcompat_full_ratio))
    assert abs(float(r.dcompat_full_ratio) - 1) > 1e-3


@pytest.mark.parametrize("causal, weighted", [(True, False), (False, False), (True, True)])
def test_routing_feedback_identity_is_first_order_exact(causal, weighted):
    """sum_ij a_ij Delta alpha_ij after a routing step of size eta is eta ||dL/d(W_Q, W_K)||^2 to
    first order (float64): the ratio's error shrinks tenfold per decade of eta, and the loss falls by
    the same amount."""
    p, x, y = problem()
    w = jnp.linspace(0.0, 2.0, x.shape[0]) if weighted else None
    errs = []
    for lr in (1e-2, 1e-3, 1e-4, 1e-5):
        r = identity(p, x, y, lr, w, causal=causal)
        assert float(r.predicted) > 0 and float(r.aggregate) > 0
        np.testing.assert_allclose(float(r.loss_change), -float(r.predicted), rtol=2e3 * lr)
        errs.append(abs(float(r.ratio) - 1.0))
    np.testing.assert_allclose(np.array(errs[:-1]) / np.array(errs[1:]), 10.0, rtol=0.05)
    assert errs[-1] < 1e-4
    # The predicted side is eta times the squared norm of the routing gradient from autodiff.
    g = jax.grad(lambda wq, wk: dense_loss(p._replace(w_q=wq, w_k=wk), x, y, w, causal), argnums=(0, 1))(p.w_q, p.w_k)
    want = 1e-5 * sum(float(jnp.sum(d * d)) for d in g)
    np.testing.assert_allclose(float(r.predicted), want, rtol=1e-9)


def test_routing_feedback_identity_errors():
    p, x, y = problem(dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"routing_feedback_identity: lr\b.*\(0\.0, inf\).*got 0\.0"):
        routing_feedback_identity(p, x, y, 0.0)
    with pytest.raises(ValueError, match=r"routing_feedback_identity: lr\b.*scalar.*\(2,\)"):
        jax.jit(routing_feedback_identity)(p, x, y, jnp.ones(2))
    with pytest.raises(ValueError, match=r"routing_feedback_identity: x\b.*\(24, 3\).*d_in = 6"):
        routing_feedback_identity(p, x[:, :3], y, 1e-2)


def test_value_step_compatibility_formula():
    p, x, y = problem(n=10)
    lr = 0.01
    r = report(p, x, y, lr)
    out = forward(p, x)
    u, alpha = np.asarray(upstream_grad(p, out, y)), np.asarray(out.alpha)
    n = x.shape[0]
    expected = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1):
            expected[i, j] = -lr * u[i] @ sum(alpha[k, j] * u[k] for k in range(n))
    np.testing.assert_allclose(r.dcompat_predicted, expected, rtol=1e-10, atol=1e-18)
    # sum_ij alpha_ij Delta b_ij is the first-order loss change of the value step: -lr ||dL/dV||^2.
    dv = value_grad(out.alpha, u)
    np.testing.assert_allclose(r.value_dloss_predicted, -lr * float(jnp.sum(dv**2)), rtol=1e-10)


def test_first_order_report_jit_and_errors():
    p, x, y = problem(dtype=jnp.float32)
    r = jax.jit(first_order_report)(p, x, y, 1e-2)
    assert r.ratio.dtype == jnp.float32 and r.dcompat_predicted.shape == (24, 24)
    with pytest.raises(ValueError, match=r"first_order_report: value_param\b.*'v'"):
        first_order_report(p, x, y, 1e-2, value_param="v")
    with pytest.raises(ValueError, match=r"first_order_report: lr\b.*scalar.*\(2,\)"):
        first_order_report(p, x, y, jnp.ones(2))
    with pytest.raises(ValueError, match=r"first_order_report: x\b.*\(24, 3\).*d_in = 6"):
        first_order_report(p, x[:, :3], y, 1e-2)
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match=rf"first_order_report: lr\b.*\(0\.0, inf\).*got {bad}"):
            first_order_report(p, x, y, bad)


@jax.jit
def _dense_parts(p0, p1, x, y):
    o0, o1 = forward(p0, x), forward(p1, x)
    u = upstream_grad(p0, o0, y)
    return (advantage(o0.alpha, compatibility(u, o0.v)), o1.alpha - o0.alpha, o0.alpha, value_grad(o0.alpha, u),
            o1.v - o0.v)


def dense_feedback(p0, p1, x, y):
    """Direct N x N reference for feedback_stats (the jax part compiled once, the statistics in numpy)."""
    a, da, al, dv, mv = (np.asarray(t) for t in _dense_parts(p0, p1, x, y))
    n = x.shape[0]
    ok = np.tril(np.ones((n, n), bool)) & (al > 0) & (a != 0)
    ok[0] = False
    hit = ok & (np.sign(a) == np.sign(da))
    cos = -(dv * mv).sum(1) / (np.linalg.norm(dv, axis=1) * np.linalg.norm(mv, axis=1))
    w = np.linalg.norm(dv, axis=1)
    return hit.sum() / ok.sum(), (al * hit).sum() / (al * ok).sum(), cos.mean(), (cos * w).sum() / w.sum()


@pytest.mark.parametrize("block_size", [5, 256])
def test_feedback_stats_match_dense_reference(block_size):
    """N = 12: blocks of 5 (two whole blocks and a ragged one) and one block larger than N."""
    p0, x, y = problem(n=12)
    g = jax.jit(blocked_loss_and_grads)(p0, x, y)[1]
    p1 = jax.tree.map(lambda a, b: a - 0.3 * b, p0, g)
    s = stats_fn(p0, p1, x, y, block_size=block_size)
    assert type(s) is StepFeedback  # the one type of the statistics, step_feedback's too
    ref = dense_feedback(p0, p1, x, y)
    np.testing.assert_allclose(
        [s.sign_agreement, s.sign_agreement_weighted, s.value_alignment, s.value_alignment_weighted], ref, rtol=1e-10
    )
    alpha = np.asarray(jax.jit(forward)(p0, x).alpha)
    ent = -np.sum(np.where(alpha > 0, alpha * np.log2(np.where(alpha > 0, alpha, 1.0)), 0.0)) / 12
    np.testing.assert_allclose(s.entropy_bits, ent, rtol=1e-10)


def test_value_only_step_in_value_space_aligns_perfectly():
    # If the values could move freely, Delta v_j = -eta dL/dv_j exactly: alignment 1. Through W_V with
    # orthonormal inputs (X^T X = I, N = d_in) the Gram matrix X X^T is I as well.
    p0, _, y = problem(n=6, d_in=6)
    x = jnp.eye(6, dtype=jnp.float64)
    g = blocked_loss_and_grads(p0, x, y)[1]
    p1 = p0._replace(w_v=p0.w_v - 0.1 * g.w_v)
    s = stats_fn(p0, p1, x, y)
    np.testing.assert_allclose(s.value_alignment, 1.0, rtol=1e-12)
    np.testing.assert_allclose(s.value_alignment_weighted, 1.0, rtol=1e-12)


def test_probe_inside_training_scan_under_vmap():
    from gradattn import training
    ps, xs, ys = zip(*(problem(n=16, seed=s, dtype=jnp.float32) for s in range(2)))
    stack = lambda t: jax.tree.map(lambda *a: jnp.stack(a), *t)  # noqa: E731
    opt = training.sgd(0.05)

    def run(p, x, y):
        return training.train(p, x, y, opt, 8, checkpoint_every=4, probe=make_feedback_probe(block_size=8))

    _, hist = jax.jit(jax.vmap(run))(stack(ps), jnp.stack(xs), jnp.stack(ys))
    rec = hist["checkpoints"]
    assert isinstance(rec, FeedbackRecord) and type(rec.stats) is StepFeedback
    assert rec.stats.sign_agreement.shape == (2, 2)
    assert rec.params.w_q.shape == (2, 2, 6, 4)
    np.testing.assert_allclose(rec.loss, hist["loss"][:, ::4], rtol=1e-5)
    np.testing.assert_allclose(rec.params.w_v[0, 0], ps[0].w_v)
    # The default probe has the same output structure.
    _, h2 = training.train(ps[0], xs[0], ys[0], opt, 4, checkpoint_every=4, probe=feedback_probe)
    np.testing.assert_allclose(h2["checkpoints"].stats.value_alignment, rec.stats.value_alignment[0, :1], rtol=1e-5)


def test_snapshots_match_forward():
    p, x, _ = problem(n=20)
    series = jax.tree.map(lambda a: jnp.stack([a, 2 * a, 3 * a]), p)
    snap = snapshots(series, x, rows=jnp.array([0, 7, 19]), block_size=np.int64(6))
    for k in range(3):
        out = forward(jax.tree.map(lambda a, k=k: (k + 1) * a, p), x)
        np.testing.assert_allclose(snap.alpha[k], out.alpha[jnp.array([0, 7, 19])], rtol=1e-12)
        np.testing.assert_allclose(snap.values[k], out.v, rtol=1e-12)
        np.testing.assert_allclose(snap.contexts[k], out.context, rtol=1e-12)
    with pytest.raises(ValueError, match=r"snapshots: params_series\b.*checkpoint axis"):
        snapshots(p, x)


def test_snapshots_reject_rows_outside_the_sequence():
    p, x, _ = problem(n=20)
    series = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), p)
    # Row 20 would be clamped to 19 by the gather and row -1 wrapped to 19: both silently wrong.
    with pytest.raises(ValueError, match=r"snapshots: rows\b.*\[0, N\).*N = 20.*\[20\]"):
        snapshots(series, x, rows=jnp.array([0, 7, 20]))
    with pytest.raises(ValueError, match=r"snapshots: rows\b.*N = 20.*\[-1, 25\]"):
        snapshots(series, x, rows=[-1, 3, 25, 25])
    # The edges are fine.
    assert snapshots(series, x, rows=np.array([0, 19])).alpha.shape == (2, 2, 20)


def test_non_finite_series_never_settles():
    steps = jnp.arange(0, 100, 10)
    good = (1.0 + 2.0 * 0.5 ** jnp.arange(10.0)).at[-1].set(1.0)  # settles at 50 (see below)
    diverged = good.at[7:].set(jnp.nan)  # NaN from checkpoint 7 on: used to read as "settled at 0"
    # Eagerly: a ValueError naming the argument and the checkpoints.
    with pytest.raises(ValueError, match=r"settling_step: series\b.*non-finite.*checkpoints \[7, 8, 9\]"):
        settling_step(steps, diverged)
    with pytest.raises(ValueError, match=r"settling_step: series\b.*non-finite.*checkpoints \[3\]"):
        settling_step(steps, good.at[3].set(jnp.inf))
    attn = jnp.ones((10, 2, 3))
    with pytest.raises(ValueError, match=r"frame_before_precision: value_series\b.*non-finite.*checkpoints \[9\]"):
        frame_before_precision(steps, attn, jnp.ones((10, 3)).at[9, 1].set(jnp.nan))
    with pytest.raises(ValueError, match=r"frame_before_precision: attention_series\b.*non-finite.*checkpoints \[0\]"):
        frame_before_precision(steps, attn.at[0].set(jnp.nan), jnp.ones((10, 3)))
    # Traced (a sweep where one seed diverges): NaN, not a step.
    out = jax.jit(jax.vmap(lambda s: settling_step(steps, s, 0.1)))(jnp.stack([good, diverged, good.at[2].set(jnp.nan)]))
    assert out[0] == 50 and np.isnan(out[1]) and np.isnan(out[2])
    fbp = jax.jit(frame_before_precision)(steps, attn, jnp.ones((10, 3)).at[9].set(jnp.nan))
    assert int(fbp.attention_step) == 0 and np.isnan(fbp.value_step) and np.isnan(fbp.lag)


def test_first_order_report_rejects_a_string_lr():
    p, x, y = problem(n=6)
    with pytest.raises(TypeError, match=r"first_order_report: lr\b.*real number.*'0\.1'"):
        first_order_report(p, x, y, "0.1")


def test_settling_step_constructed():
    steps = jnp.arange(0, 100, 10)
    # Exponential approach to 1: relative distance 2 * 0.5^k; within tol=0.1 from k = 5 (0.0625).
    series = 1.0 + 2.0 * 0.5 ** jnp.arange(10.0)
    series = series.at[-1].set(1.0)
    assert int(settling_step(steps, series, tol=0.1)) == 50
    # A series that leaves the band late and comes back: it settles only after its last excursion.
    s2 = jnp.ones(10).at[7].set(2.0)
    assert int(settling_step(steps, s2, tol=0.1)) == 80
    # Never outside the band: the first checkpoint.
    assert int(settling_step(steps, jnp.ones((10, 3, 4)), tol=0.1)) == 0
    assert not hasattr(dynamics, "settling_steps")  # one name
    # vmap over seeds.
    both = jnp.stack([series, s2])
    np.testing.assert_array_equal(jax.vmap(lambda s: settling_step(steps, s, 0.1))(both), [50, 80])
    with pytest.raises(ValueError, match=r"settling_step: series\b.*shape.*K = 10.*\(9,\)"):
        settling_step(steps, jnp.ones(9))
    with pytest.raises(ValueError, match=r"settling_step: tol\b.*\[0\.0, inf\).*got -1\.0"):
        settling_step(steps, series, tol=-1.0)


def test_frame_before_precision_constructed():
    # Attention converges by step 20 and the values keep growing until step 60: frame first.
    steps = jnp.arange(0, 100, 10)
    t = jnp.arange(10.0)
    attn = jnp.stack([jnp.full((4, 8), 0.125) + 0.5 * jnp.exp(-3.0 * tt) for tt in t])
    vals = jnp.stack([jnp.ones((8, 3)) * jnp.minimum(tt, 6.0) for tt in t])
    res = frame_before_precision(steps, attn, vals, tol=0.05, scale="final")
    assert int(res.attention_step) == 20
    assert int(res.value_step) == 60
    assert int(res.lag) == 40
    # Separate tolerances.
    res2 = frame_before_precision(steps, attn, vals, tol=0.05, value_tol=0.2, scale="final")
    assert int(res2.value_step) == 50  # relative distances 2/6 at step 40, 1/6 at step 50
    # Relative to the total change (the default): attention's distance is exp(-3k) of its change
    # (0.0025 at k = 2, 0.05 at k = 1), the values' (6 - k) / 6.
    res3 = frame_before_precision(steps, attn, vals, tol=0.04)
    assert int(res3.attention_step) == 20 and int(res3.value_step) == 60


def test_distance_scales():
    s = jnp.array([4.0, 3.0, 2.0])
    np.testing.assert_allclose(distance_to_final(s), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(distance_to_final(s, "change"), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(distance_to_final(s + 8.0, "change"), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(distance_to_final(s + 8.0, "final"), [0.2, 0.1, 0.0])
    np.testing.assert_allclose(distance_to_final(s, None), [2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"distance_to_final: scale\b.*'relative'"):
        distance_to_final(s, "relative")


def test_w_v_value_step_is_checked_against_dense_autodiff(monkeypatch):
    """With value_param="w_v" the measured step comes from autodiff of dense_loss, not from the
    blocked law behind loss_fn's VJP: a wrong value law would show as a mismatch."""
    from gradattn.dynamics import first_order

    p, x, y = problem(n=10)
    # A fresh jit each time, so the second one traces with the broken law in place.
    run = lambda: jax.jit(lambda p_, x_, y_: first_order_report(p_, x_, y_, 1e-4, value_param="w_v"))(p, x, y)  # noqa: E731
    good = run()
    np.testing.assert_allclose(good.dcompat_actual, good.dcompat_predicted, rtol=1e-9, atol=1e-15)
    # Break the value law used for the prediction: the report must notice.
    monkeypatch.setattr(first_order, "value_grad", lambda alpha, u: 2.0 * value_grad(alpha, u))
    bad = run()
    assert abs(float(bad.dcompat_ratio) - 0.5) < 1e-6
