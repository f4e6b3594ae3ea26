"""Optimisers as optax transformations, the pure step, and train() as one lax.scan.

Small float64 instances (conftest enables x64) so exact update rules can be checked to 1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradattn as ga
from gradattn import _backend, grads, training

ROUTING = ("w_q", "w_k", "w_o")


def case(seed=0, n=9, d_in=4, d_k=3, d_v=5, c=3, dtype=jnp.float64):
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    params = ga.init_head(kp, d_in, d_k, d_v, c, scale=0.5, dtype=dtype)
    x = jax.random.normal(kx, (n, d_in), dtype)
    y = jax.random.randint(ky, (n,), 0, c, dtype=jnp.int32)
    return params, x, y


def one_update(optimizer, params, x, y):
    """(grads, params after one step of make_step)."""
    state = training.init_state(params, optimizer)
    new, metrics = jax.jit(training.make_step(optimizer))(state, x, y)
    grads = ga.blocked_loss_and_grads(params, x, y)[1]
    return grads, new, metrics


def test_param_labels():
    assert training.param_labels() == ga.HeadParams(w_q="routing", w_k="routing", w_v="value", w_o="routing")


def test_sgd_update_is_minus_lr_grad():
    params, x, y = case()
    grads, new, metrics = one_update(training.sgd(0.05), params, x, y)
    for name in ga.HeadParams._fields:
        np.testing.assert_allclose(getattr(new.params, name) - getattr(params, name), -0.05 * getattr(grads, name), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(metrics["loss"], ga.loss_fn(params, x, y), rtol=1e-12)
    assert int(new.step) == 1


def test_em_like_gives_values_their_own_rate():
    params, x, y = case(1)
    grads, new, metrics = one_update(training.em_like(value_lr=0.1, routing_lr=0.01), params, x, y)
    np.testing.assert_allclose(new.params.w_v - params.w_v, -0.1 * grads.w_v, rtol=1e-12, atol=1e-15)
    for name in ROUTING:
        np.testing.assert_allclose(getattr(new.params, name) - getattr(params, name), -0.01 * getattr(grads, name), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(metrics["grad_norm_value"], np.linalg.norm(grads.w_v), rtol=1e-12)
    want = np.sqrt(sum(np.sum(np.square(getattr(grads, n))) for n in ROUTING))
    np.testing.assert_allclose(metrics["grad_norm_routing"], want, rtol=1e-12)


def test_em_like_accepts_any_optax_base():
    params, x, y = case(2)
    opt = training.em_like(1e-3, 1e-4, base=optax.adam)
    _, new, _ = one_update(opt, params, x, y)
    # Adam's first step moves every entry by about lr * sign(g).
    np.testing.assert_allclose(np.abs(new.params.w_v - params.w_v).max(), 1e-3, rtol=1e-3)
    np.testing.assert_allclose(np.abs(new.params.w_q - params.w_q).max(), 1e-4, rtol=1e-3)


@pytest.mark.parametrize("period", [1, 2])
def test_alternating_moves_one_group_per_step(period):
    params, x, y = case(3)
    opt = training.alternating(value_lr=0.1, routing_lr=0.01, period=period)
    state = training.init_state(params, opt)
    step = jax.jit(training.make_step(opt))
    for t in range(4 * period):
        before = state.params
        grads = ga.blocked_loss_and_grads(before, x, y)[1]
        state, _ = step(state, x, y)
        value_step = (t // period) % 2 == 0
        moved_v = not np.array_equal(state.params.w_v, before.w_v)
        moved_r = [not np.array_equal(getattr(state.params, n), getattr(before, n)) for n in ROUTING]
        assert moved_v == value_step, t
        assert all(m == (not value_step) for m in moved_r), t
        if value_step:
            np.testing.assert_allclose(state.params.w_v - before.w_v, -0.1 * grads.w_v, rtol=1e-12, atol=1e-15)
        else:
            np.testing.assert_allclose(state.params.w_o - before.w_o, -0.01 * grads.w_o, rtol=1e-12, atol=1e-15)


def test_alternating_groups_see_only_their_own_steps():
    """Under alternating(base=optax.adam) each group's Adam sees only the steps on which its group
    moves. Step 1 (routing) moves W_Q, W_K, W_O by exactly a fresh Adam's first update of step 1's
    gradients, and step 2 (values) moves W_V by exactly Adam's second update, fed the value
    gradients of steps 0 and 2 alone: neither group's moments nor its step count (Adam's bias
    correction) saw the other group's step. This is what alternating relies on from optax's
    conditionally_mask, checked through the updates rather than the layout of its state."""
    params, x, y = case(4)
    lr = 1e-3
    opt = training.alternating(lr, lr, base=optax.adam)
    state = training.init_state(params, opt)
    step = jax.jit(training.make_step(opt))
    before, grads = [], []
    for _ in range(3):
        before.append(state.params)
        grads.append(ga.blocked_loss_and_grads(state.params, x, y)[1])
        state, _ = step(state, x, y)
    after = [*before[1:], state.params]

    def routing(p):
        return tuple(getattr(p, n) for n in ROUTING)

    adam = optax.adam(lr)
    update, _ = adam.update(routing(grads[1]), adam.init(routing(params)))
    for got, start, u in zip(routing(after[1]), routing(before[1]), update):
        np.testing.assert_allclose(got - start, u, rtol=1e-12, atol=1e-18)
    s = adam.init(params.w_v)
    _, s = adam.update(grads[0].w_v, s)
    update, _ = adam.update(grads[2].w_v, s)
    np.testing.assert_allclose(after[2].w_v - before[2].w_v, update, rtol=1e-12, atol=1e-18)
    # Neither group moves on the other's step.
    np.testing.assert_array_equal(after[1].w_v, before[1].w_v)
    for a, b in zip(routing(after[2]) + routing(after[0]), routing(before[2]) + routing(before[0])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(value_lr=-1.0), "value_lr"),
        (dict(routing_lr=float("nan")), "routing_lr"),
        (dict(period=0), "period"),
    ],
)
def test_alternating_rejects_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=rf"^alternating: {match}\b"):
        training.alternating(**bad)


def test_train_equals_python_loop_of_steps():
    params, x, y = case(5)
    opt = training.em_like(0.1, 0.01)
    steps = 7
    final, history = jax.jit(lambda p: training.train(p, x, y, opt, steps))(params)
    state = training.init_state(params, opt)
    step = jax.jit(training.make_step(opt))
    losses = []
    for _ in range(steps):
        state, m = step(state, x, y)
        losses.append(m["loss"])
    assert history["loss"].shape == (steps,)
    assert set(history) == {"loss", "grad_norm_value", "grad_norm_routing"}
    np.testing.assert_allclose(history["loss"], losses, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
    assert int(final.step) == steps
    assert history["loss"][-1] < history["loss"][0]


def test_checkpoints_shape_and_timing():
    params, x, y = case(6)
    opt = training.sgd(0.1)
    _, plain = training.train(params, x, y, opt, 6)
    _, default = training.train(params, x, y, opt, 6, checkpoint_every=2)
    np.testing.assert_allclose(default["loss"], plain["loss"], rtol=1e-12)
    ck = default["checkpoints"]
    assert isinstance(ck, ga.HeadParams)
    assert ck.w_q.shape == (3,) + params.w_q.shape and ck.w_o.shape == (3,) + params.w_o.shape
    np.testing.assert_array_equal(ck.w_v[0], params.w_v)  # checkpoint 0 is the initial state

    def probe(before, after, x_, y_):
        return {"before": before.step, "after": after.step, "loss": ga.loss_fn(before.params, x_, y_)}

    _, hist = training.train(params, x, y, opt, 6, checkpoint_every=2, probe=probe)
    np.testing.assert_array_equal(hist["checkpoints"]["before"], [0, 2, 4])
    np.testing.assert_array_equal(hist["checkpoints"]["after"], [1, 3, 5])
    np.testing.assert_allclose(hist["checkpoints"]["loss"], plain["loss"][::2], rtol=1e-12)
    _, every = training.train(params, x, y, opt, 6, checkpoint_every=1, probe=probe)
    np.testing.assert_array_equal(every["checkpoints"]["before"], np.arange(6))


def test_grad_sources_agree():
    params, x, y = case(7)
    opt = training.sgd(0.1)
    _, a = training.train(params, x, y, opt, 3, grad_source="blocked")
    _, b = training.train(params, x, y, opt, 3, grad_source="autodiff")
    calls = []

    def custom(p, x_, y_, weights, causal):
        calls.append(causal)
        return ga.blocked_loss_and_grads(p, x_, y_, weights, causal)

    _, c = training.train(params, x, y, opt, 3, grad_source=custom, causal=False)
    _, d = training.train(params, x, y, opt, 3, causal=False)
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-12)
    np.testing.assert_allclose(c["loss"], d["loss"], rtol=1e-12)
    assert calls and calls[0] is False


def test_weights_are_used():
    params, x, y = case(8)
    w = jnp.zeros(x.shape[0]).at[:3].set(1.0)
    _, hist = training.train(params, x, y, training.sgd(0.1), 2, weights=w)
    np.testing.assert_allclose(hist["loss"][0], ga.loss_fn(params, x, y, w), rtol=1e-12)


def test_train_vmaps_over_params_and_float32_stays_float32():
    p0, x, y = case(9, dtype=jnp.float32)
    p1, _, _ = case(10, dtype=jnp.float32)
    batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1)
    run = jax.jit(jax.vmap(lambda p: training.train(p, x, y, training.em_like(), 4)))
    final, hist = run(batch)
    assert hist["loss"].shape == (2, 4) and hist["loss"].dtype == jnp.float32
    assert final.params.w_v.dtype == jnp.float32
    _, single = training.train(p1, x, y, training.em_like(), 4)
    np.testing.assert_allclose(hist["loss"][1], single["loss"], rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(steps=0), ValueError, r"train: steps\b.*got 0"),
        (dict(steps=2.0), TypeError, r"train: steps\b.*positive integer.*2\.0.*float"),
        (dict(steps=True), TypeError, r"train: steps\b.*positive integer.*bool"),
        (dict(steps=np.float32(2)), TypeError, r"train: steps\b.*float32"),
        (dict(steps=6, checkpoint_every=2.0), TypeError, r"train: checkpoint_every\b.*2\.0"),
        (dict(steps=6, checkpoint_every=4), ValueError, r"train: checkpoint_every=4\b.*divide.*steps=6"),
        (dict(steps=6, checkpoint_every=0), ValueError, r"train: checkpoint_every\b.*got 0"),
        (dict(steps=6, probe=lambda *a: 0), ValueError, r"train: probe\b.*checkpoint_every\b.*None"),
        (dict(steps=6, checkpoint_every=2, probe=3), TypeError, r"train: probe\b.*callable.*got 3"),
        (dict(steps=2, grad_source="numeric"), ValueError, r"grad_source\b.*'auto'.*'numeric'"),
    ],
)
def test_train_rejects_bad_arguments(kwargs, err, match):
    params, x, y = case()
    steps = kwargs.pop("steps")
    with pytest.raises(err, match=match):
        training.train(params, x, y, training.sgd(0.1), steps, **kwargs)


def test_bad_optimizer_and_lr():
    params, x, y = case()
    with pytest.raises(TypeError, match=r"train: optimizer\b.*optax GradientTransformation.*got object"):
        training.train(params, x, y, object(), 2)
    with pytest.raises(ValueError, match=r"sgd: lr\b.*\[0\.0, inf\).*got -0\.1"):
        training.sgd(-0.1)
    with pytest.raises(TypeError, match=r"em_like: value_lr\b.*'fast'"):
        training.em_like(value_lr="fast")
    # A schedule is a valid learning rate.
    training.sgd(optax.constant_schedule(0.1))
    training.em_like(np.float32(0.1), jnp.asarray(0.01))


def test_numpy_integer_sizes_are_accepted():
    params, x, y = case(3)
    opt = training.sgd(0.1)
    final, hist = training.train(params, x, y, opt, np.int64(4), checkpoint_every=np.int32(2))
    ref_final, ref_hist = training.train(params, x, y, opt, 4, checkpoint_every=2)
    np.testing.assert_array_equal(hist["loss"], ref_hist["loss"])
    np.testing.assert_array_equal(final.params.w_v, ref_final.params.w_v)
    assert hist["checkpoints"].w_q.shape[0] == 2
    training.alternating(period=np.int64(2))
    with pytest.raises(TypeError, match=r"alternating: period\b.*2\.0"):
        training.alternating(period=2.0)


@pytest.mark.parametrize("bad", ["0.1", b"0.1", True, None, [0.1], 0.1 + 0j, np.array("0.1")])
def test_non_numeric_learning_rates_are_rejected_early(bad):
    # A string used to pass (float("0.1") parses) and fail deep inside optax's first update.
    with pytest.raises(TypeError, match=r"sgd: lr\b.*number.*optax schedule"):
        training.sgd(bad)
    with pytest.raises(TypeError, match=r"em_like: routing_lr\b.*number.*optax schedule"):
        training.em_like(0.1, bad)
    with pytest.raises(TypeError, match=r"alternating: value_lr\b.*number.*optax schedule"):
        training.alternating(bad, 0.01)
    # Shape errors of a numeric lr stay ValueErrors.
    with pytest.raises(ValueError, match=r"sgd: lr\b.*scalar.*\(2,\)"):
        training.sgd(np.array([0.1, 0.2]))


def test_learning_rates_can_be_vmapped():
    params, x, y = case(11)

    def final_loss(value_lr):
        return training.train(params, x, y, training.em_like(value_lr, 0.01), 3)[1]["loss"][-1]

    batched = jax.jit(jax.vmap(final_loss))(jnp.array([0.0, 0.1]))
    np.testing.assert_allclose(batched[1], final_loss(0.1), rtol=1e-10)


def test_grad_source_names_and_auto(monkeypatch):
    """Every named source gives the same run; "auto" runs the backend's path; a callable plugs in."""
    params, x, y = case(3)
    opt = training.sgd(0.1)
    runs = {name: training.train(params, x, y, opt, 2, grad_source=name)[1]["loss"]
            for name in ("auto", "blocked", "dense", "autodiff")}
    for name, loss in runs.items():
        np.testing.assert_allclose(loss, runs["autodiff"], rtol=1e-12, err_msg=name)
    fused = training.train(params, x, y, opt, 2, grad_source="pallas")[1]["loss"]  # interpreted on a CPU
    np.testing.assert_allclose(fused, runs["autodiff"], rtol=1e-9)
    assert grads.resolve_grad_source("blocked") is ga.blocked_loss_and_grads
    assert grads.resolve_grad_source("dense") is ga.dense_loss_and_grads
    # "auto" runs whatever the backend table names, read when traced.
    calls = []
    monkeypatch.setitem(grads.GRAD_SOURCES, "spy", ("gradattn.grads.dense", "dense_loss_and_grads"))
    monkeypatch.setattr(grads, "backend_choices", lambda: _backend.CPU._replace(grad_source="spy"))
    monkeypatch.setattr(grads, "_load", lambda name: (calls.append(name), ga.dense_loss_and_grads)[1])
    grads.auto_loss_and_grads(params, x, y)
    assert calls == ["spy"]
    calls = []
    training.train(params, x, y, opt, 2, grad_source=lambda *a: calls.append(1) or ga.dense_loss_and_grads(*a))
    assert calls  # any callable of the same signature plugs in
    with pytest.raises(ValueError, match=r"grad_source\b.*'auto', 'blocked', 'dense', 'autodiff', 'pallas'.*'analytic'"):
        training.make_step(opt, grad_source="analytic")


def test_scan_steps_passes_the_step_index_and_probes_segment_starts():
    step = lambda c, t: (c + t, c * 10)  # noqa: E731
    final, outs, none = training.scan_steps(step, jnp.asarray(0), 6)
    assert none is None and int(final) == 15
    np.testing.assert_array_equal(outs, 10 * np.array([0, 0, 1, 3, 6, 10]))
    final2, outs2, rec = training.scan_steps(step, jnp.asarray(0), 6, 3, lambda b, a, t: jnp.stack([b, a, t]))
    assert int(final2) == 15
    np.testing.assert_array_equal(outs2, outs)
    np.testing.assert_array_equal(rec, [[0, 0, 0], [3, 6, 3]])


def test_train_arms_equals_each_arm_trained_alone():
    """train_arms on one fixed sequence is train of each arm alone: same losses, same final
    parameters, same checkpoints (to float32 rounding); a fresh sequence per step is the same data
    for every arm. Bad arguments are refused naming them."""
    from gradattn.training import train_arms

    x = jax.random.normal(jax.random.key(1), (12, 5), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (12,), 0, 4)
    params = ga.init_head(jax.random.key(0), 5, 3, 3, 4, dtype=jnp.float32)
    arms = {"sgd": ga.sgd(0.05), "em": ga.em_like(0.2, 0.05)}
    final, losses, ck = jax.jit(lambda p: train_arms(p, arms, lambda t: (x, y), 6, checkpoint_every=3))(params)
    for name, opt in arms.items():
        alone, hist = ga.train(params, x, y, opt, 6, checkpoint_every=3)
        np.testing.assert_allclose(losses[name], hist["loss"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves((final[name].params, ck[name])), jax.tree.leaves((alone.params, hist["checkpoints"]))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    seen = []
    train_arms(params, arms, lambda t: seen.append(t) or (x, y), 4)
    assert len(seen) == 1  # traced once per step of the scan body, shared by both arms
    with pytest.raises(TypeError, match=r"train_arms: optimizers\b.*got \{\}"):
        train_arms(params, {}, lambda t: (x, y), 4)
    with pytest.raises(ValueError, match=r"train_arms: checkpoint_every=3\b.*divide.*steps=4"):
        train_arms(params, arms, lambda t: (x, y), 4, checkpoint_every=3)
    with pytest.raises(TypeError, match=r"train_arms: data\b.*callable"):
        train_arms(params, arms, (x, y), 4)


PATHS = ("auto", "blocked", "dense", "autodiff", "pallas")  # pallas: interpreted on a CPU


def recording():
    """An optax transformation whose state is the last gradient it was given and whose update is
    zero: the gradient a step used, read without the rounding of params + update - params."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def batch_case(b, seed=20, n=7, d_in=4, d_k=3, d_v=5, c=3):
    params, _, _ = case(seed, n, d_in, d_k, d_v, c)
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    return params, jax.random.normal(kx, (b, n, d_in), jnp.float64), jax.random.randint(ky, (b, n), 0, c)


def rel_err(a, b):
    return max(float(np.linalg.norm(np.ravel(u - v)) / np.linalg.norm(np.ravel(v))) for u, v in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("grad_source", PATHS)
@pytest.mark.parametrize("b", [1, 3])
def test_batch_step_takes_the_mean_of_the_sequences_gradients(b, grad_source):
    """float64: on a batch of B sequences every path's step uses the gradient of the mean over the
    sequences of each one's mean loss (jax.grad of mean_b dense_loss(params, x_b, y_b)), to a
    relative error below 1e-9, reports that mean as its loss, and moves the parameters by the
    optimiser's update of that gradient."""
    params, xb, yb = batch_case(b)

    def mean_loss(p):
        return jnp.mean(jnp.stack([ga.dense_loss(p, xb[i], yb[i]) for i in range(b)]))

    want_loss, want = jax.value_and_grad(mean_loss)(params)
    step = jax.jit(training.make_step(recording(), grad_source))
    new, metrics = step(training.init_state(params, recording()), xb, yb)
    err = rel_err(new.opt_state, want)
    assert err < 1e-9, err
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-12)
    np.testing.assert_allclose(metrics["grad_norm_value"], np.linalg.norm(want.w_v), rtol=1e-9)
    opt = training.sgd(0.1)
    moved, _ = jax.jit(training.make_step(opt, grad_source))(training.init_state(params, opt), xb, yb)
    for name in ga.HeadParams._fields:
        np.testing.assert_allclose(getattr(moved.params, name) - getattr(params, name), -0.1 * getattr(want, name),
                                   rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("grad_source", PATHS)
def test_a_batch_of_one_is_the_single_sequence_step(grad_source):
    """x (1, N, d_in) steps as x (N, d_in) does: the same state and metrics (bit for bit on the
    blocked and Pallas paths here; the dense ones differ in the last bit, XLA's batched products)."""
    params, xb, yb = batch_case(1, seed=22)
    opt = training.em_like(0.1, 0.01, base=optax.adam)
    step = jax.jit(training.make_step(opt, grad_source))
    state = training.init_state(params, opt)
    one, m_one = step(state, xb, yb)
    single, m_single = step(state, xb[0], yb[0])
    for a, b in zip(jax.tree.leaves((one, m_one)), jax.tree.leaves((single, m_single))):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-16)


def test_batch_weights_shared_or_per_sequence_and_per_step():
    """Weights (N,) are shared by every sequence of a batch, (B, N) are each sequence's own; each
    sequence's loss is its own weighted mean. A step's weights replace make_step's."""
    params, xb, yb = batch_case(3, seed=24)
    shared = jnp.linspace(0.0, 1.0, xb.shape[1]).at[0].set(0.5)
    own = jax.random.uniform(jax.random.key(25), yb.shape, jnp.float64, 0.1, 1.0)
    for w, w_of in ((shared, lambda i: shared), (own, lambda i: own[i])):
        def mean_loss(p, w_of=w_of):
            return jnp.mean(jnp.stack([ga.dense_loss(p, xb[i], yb[i], w_of(i)) for i in range(3)]))

        want = jax.grad(mean_loss)(params)
        for grad_source in ("blocked", "autodiff"):
            fixed, _ = training.make_step(recording(), grad_source, weights=w)(
                training.init_state(params, recording()), xb, yb)
            given, _ = training.make_step(recording(), grad_source, weights=jnp.ones(xb.shape[1]))(
                training.init_state(params, recording()), xb, yb, w)
            assert rel_err(fixed.opt_state, want) < 1e-9 and rel_err(given.opt_state, want) < 1e-9, grad_source


@pytest.mark.parametrize(
    "x_shape, y_shape, w_shape, match",
    [
        ((3, 7, 4), (2, 7), None, r"step: y\b.*\(B, N\) = \(3, 7\).*\(3, 7, 4\).*\(2, 7\)"),
        ((3, 7, 4), (3, 6), None, r"step: y\b.*\(B, N\) = \(3, 7\).*\(3, 6\)"),
        ((7, 4), (3, 7), None, r"step: y\b.*\(N,\) = \(7,\).*\(7, 4\).*\(3, 7\)"),
        ((7,), (7,), None, r"step: x\b.*\(N, d_in\).*\(B, N, d_in\).*\(7,\)"),
        ((2, 3, 7, 4), (2, 3, 7), None, r"step: x\b.*\(N, d_in\).*\(2, 3, 7, 4\)"),
        ((3, 7, 4), (3, 7), (2, 7), r"step: weights\b.*\(N,\) = \(7,\).*\(B, N\) = \(3, 7\).*\(2, 7\)"),
        ((7, 4), (7,), (1, 7), r"step: weights\b.*\(N,\) = \(7,\).*\(7, 4\).*\(1, 7\)"),
        ((0, 7, 4), (0, 7), None, r"step: .*batch.*at least one.*\(0, 7, 4\)"),
    ],
)
def test_step_checks_shapes_at_the_door(x_shape, y_shape, w_shape, match):
    """Each message names the function (step, or train when train is called), the argument, the
    shape it must have and the shape it got."""
    params, _, _ = case(0, d_in=4)
    opt = training.sgd(0.1)
    state = training.init_state(params, opt)
    x, y = jnp.ones(x_shape), jnp.zeros(y_shape, jnp.int32)
    w = None if w_shape is None else jnp.ones(w_shape)
    for grad_source in ("blocked", "autodiff", lambda *a: ga.dense_loss_and_grads(*a)):
        with pytest.raises(ValueError, match=match):
            training.make_step(opt, grad_source)(state, x, y, w)
        with pytest.raises(ValueError, match=match):  # traced, too: the shapes decide
            jax.jit(training.make_step(opt, grad_source))(state, x, y, w)
    with pytest.raises(ValueError, match=match.replace("step: ", "train: ")):
        training.train(params, x, y, opt, 2, weights=w)


def test_a_concrete_batch_is_checked_sequence_by_sequence():
    params, xb, yb = batch_case(3, seed=26)
    opt = training.sgd(0.1)
    state = training.init_state(params, opt)
    with pytest.raises(ValueError, match=r"^step\b.*sequence 1\b.*: y\b.*outside \[0, 3\)"):
        training.make_step(opt)(state, xb, yb.at[1, 2].set(3))
    with pytest.raises(ValueError, match=r"^step\b.*sequence 2\b.*: x\b.*non-finite"):
        training.make_step(opt, "autodiff")(state, xb.at[2, 0, 0].set(jnp.nan), yb)
    with pytest.raises(ValueError, match=r"^step\b.*: x\b.*\(7, 3\).*d_in = 4"):
        training.make_step(opt)(state, xb[..., :3], yb)
    with pytest.raises(TypeError, match=r"^\w+: y\b.*integer.*float64"):
        jax.jit(training.make_step(opt))(state, xb, yb.astype(jnp.float64))


def test_optimizer_step_is_update_then_apply():
    params, x, y = case(27)
    grads = ga.blocked_loss_and_grads(params, x, y)[1]
    opt = optax.adam(1e-2)
    s0 = opt.init(params)
    new, s1 = training.optimizer_step(opt, grads, s0, params)
    updates, want_s = opt.update(grads, s0, params)
    for a, b in zip(jax.tree.leaves((new, s1)), jax.tree.leaves((optax.apply_updates(params, updates), want_s))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"optimizer_step: grads\b.*params\b.*structure"):
        training.optimizer_step(opt, grads[:3], s0, params)
    with pytest.raises(TypeError, match=r"optimizer_step: optimizer\b.*optax GradientTransformation.*got object"):
        training.optimizer_step(object(), grads, s0, params)


def test_train_on_a_data_function_draws_fresh_data_every_step():
    """train(params, data, None, ...) takes step t on data(t), as train_arms does (one arm of
    train_arms gives the same losses bit for bit) and as a loop of make_step does; the probe sees
    the checkpoint step's data; a fixed batch trains as a data function returning it."""
    params, _, _ = batch_case(1, seed=28)
    n, d_in, c = 7, 4, 3

    def data(t):
        k = jax.random.fold_in(jax.random.key(29), t)
        return jax.random.normal(k, (2, n, d_in), jnp.float64), jax.random.randint(k, (2, n), 0, c)

    opt = training.em_like(0.1, 0.01)

    def probe(before, after, x_, y_):
        return x_

    final, hist = jax.jit(lambda p: training.train(p, data, None, opt, 6, checkpoint_every=3, probe=probe))(params)
    state, step, losses = training.init_state(params, opt), jax.jit(training.make_step(opt)), []
    for t in range(6):
        state, m = step(state, *data(t))
        losses.append(m["loss"])
    np.testing.assert_allclose(hist["loss"], losses, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
    np.testing.assert_array_equal(hist["checkpoints"], np.stack([data(0)[0], data(3)[0]]))
    _, arm, _ = jax.jit(lambda p: training.train_arms(p, {"em": opt}, data, 6))(params)
    np.testing.assert_array_equal(arm["em"], jax.jit(lambda p: training.train(p, data, None, opt, 6))(params)[1]["loss"])
    xb, yb = data(0)
    _, fixed = training.train(params, xb, yb, opt, 3)
    _, as_fn = training.train(params, lambda t: (xb, yb), None, opt, 3)
    np.testing.assert_array_equal(fixed["loss"], as_fn["loss"])
    with pytest.raises(TypeError, match=r"train: y\b.*None.*data function.*got \w+"):
        training.train(params, data, yb, opt, 3)
    with pytest.raises(TypeError, match=r"train: y\b.*None.*targets.*data function"):
        training.train(params, xb, None, opt, 3)
    with pytest.raises(ValueError, match=r"train: y\b.*\(B, N\).*\(2, 7\).*\(1, 7\)"):
        training.train(params, lambda t: (xb, yb[:1]), None, opt, 3)
