"""The blocked pass equals the dense laws and autodiff, never builds an N x N matrix, and backs loss_fn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from _cases import problem

import gradattn as ga
import gradattn.grads.pallas
from gradattn.grads.blocked import (
    blocked_loss,
    blocked_loss_and_grads,
    default_block_size,
    loss_fn,
    query_blocks,
)
from gradattn.grads.dense import dense_loss_and_grads
from gradattn.head import dense_loss, forward
from gradattn.laws import compatibility, output_error, routing_grad
from gradattn.verify import relative_error


def rel_err(a, b):
    """The largest verify.relative_error over the leaves (each relative to its own largest |b|, floor 1e-30)."""
    return max(relative_error(u, v, 1e-30) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def assert_close(a, b, tol):
    """Every entry within ``tol`` times the largest |entry| of ``b`` (over all leaves: a gradient
    that is exactly zero, like dL/dW_Q at N = 1, is compared on the scale of the whole gradient)."""
    scale = max(max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b)), 1e-300)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=tol * scale)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _blocked_dense_and_autodiff(params, x, y, w, causal, block_size):
    return (
        blocked_loss_and_grads(params, x, y, w, causal, block_size),
        blocked_loss(params, x, y, w, causal, block_size),
        dense_loss_and_grads(params, x, y, w, causal),
        jax.value_and_grad(dense_loss)(params, x, y, w, causal),
    )


# (N, block): N = 1; N below one block; several whole blocks; several blocks with a ragged last
# one. Each compiles the unrolled blocks again, so these few pairs are reused across examples.
LAYOUTS = [(1, 8), (7, 8), (16, 8), (23, 8)]
# Each layout causal and not, and across the eight cases every combination of causal, weighted
# and the pass's two forms: over V (C >= d_v: 6 classes, d_v = 4) and over V W_O (C < d_v: 3
# classes, d_v = 7; see gradattn.grads.blocked.attends_through_output).
CASES = [(n, b, causal, causal == (i % 2 == 0), causal == (i < 2)) for i, (n, b) in enumerate(LAYOUTS)
         for causal in (True, False)]


@pytest.mark.parametrize("n, block_size, causal, weighted, through_output", CASES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_blocked_equals_dense_laws_and_autodiff(n, block_size, causal, weighted, through_output, seed):
    """Blocked loss and gradients = dense laws = autodiff, and blocked_loss = autodiff's loss, on
    each layout (N = 1, N below a block, whole blocks, a ragged last block), causal and not,
    weighted and not, attending over V and over V W_O; three random draws of parameters and data
    per case (one compile per case)."""
    shape = dict(d_v=7, n_classes=3) if through_output else {}
    params, x, y, w = problem(n, seed=seed, weighted=weighted, **shape)
    assert ga.grads.blocked.attends_through_output(params) == through_output
    (loss, grads), loss_only, (dense_l, dense_g), (auto_l, auto_g) = _blocked_dense_and_autodiff(params, x, y, w, causal, block_size)
    assert_close(loss, auto_l, 1e-12)
    assert_close(dense_l, auto_l, 1e-12)
    assert_close(grads, dense_g, 1e-9)
    assert_close(grads, auto_g, 1e-9)
    assert_close(loss_only, auto_l, 1e-12)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _loss_fn_and_dense_grads(params, x, y, w, causal, block_size):
    f = lambda p, x_, w_: loss_fn(p, x_, y, w_, causal, block_size)  # noqa: E731
    g = lambda p, x_, w_: dense_loss(p, x_, y, w_, causal)  # noqa: E731
    return jax.value_and_grad(f, argnums=(0, 1, 2))(params, x, w), jax.value_and_grad(g, argnums=(0, 1, 2))(params, x, w)


@pytest.mark.parametrize("n,block_size", [(1, 8), (7, 8), (23, 8)])
@pytest.mark.parametrize("causal", [True, False])
def test_loss_fn_grad_matches_autodiff_of_dense_loss(n, block_size, causal):
    """jax.grad through loss_fn's custom VJP, w.r.t. params, x and weights, at N = 1, N below a
    block and several blocks with a ragged last one, causal (attending over V W_O, C < d_v) and
    not (over V); and the eager (unjitted) loss_fn equals it on the several-block layout."""
    params, x, y, w = problem(n, seed=n, weighted=True, **(dict(d_v=7, n_classes=3) if causal else {}))
    (got_l, got), (want_l, want) = _loss_fn_and_dense_grads(params, x, y, w, causal, block_size)
    assert_close(got_l, want_l, 1e-12)
    assert_close(got, want, 1e-9)
    if n == 23:  # eagerly, op by op: once is enough to prove the eager path
        assert_close(loss_fn(params, x, y, w, causal, block_size), want_l, 1e-12)


def test_loss_fn_default_weights_jit_and_scaled_cotangent():
    params, x, y, _ = problem(50, seed=3)
    got = jax.jit(jax.grad(lambda p: 3.0 * loss_fn(p, x, y)))(params)
    want = jax.jit(jax.grad(lambda p: 3.0 * dense_loss(p, x, y)))(params)
    assert_close(got, want, 1e-9)


def test_loss_fn_integer_weights_and_reverse_over_reverse():
    params, x, y, _ = problem(12, seed=4)
    w = jnp.arange(12) % 3  # integer weights: no cotangent, still a valid mask
    assert_close(jax.jit(jax.grad(loss_fn))(params, x, y, w), jax.jit(jax.grad(dense_loss))(params, x, y, w), 1e-9)
    # second derivatives: reverse over the custom VJP's own (differentiable) pass
    flat = lambda f: lambda wq: f(params._replace(w_q=wq), x, y)  # noqa: E731
    hess = jax.jit(jax.jacrev(jax.grad(flat(loss_fn))))(params.w_q)
    assert_close(hess, jax.jit(jax.hessian(flat(dense_loss)))(params.w_q), 1e-9)


def test_vmap_over_sequences_and_over_param_sets():
    params, _, _, _ = problem(20)
    xs = jax.random.normal(jax.random.PRNGKey(1), (3, 20, 5), jnp.float64)
    ys = jax.random.randint(jax.random.PRNGKey(2), (3, 20), 0, 6)
    got = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0)))(params, xs, ys)
    want = jax.jit(jax.vmap(jax.grad(dense_loss), in_axes=(None, 0, 0)))(params, xs, ys)
    assert_close(got, want, 1e-9)
    many = jax.jit(jax.vmap(lambda k: ga.init_head(k, 5, 3, 4, 6, scale=0.7, dtype=jnp.float64)))(jax.random.split(jax.random.PRNGKey(5), 4))
    got = jax.jit(jax.vmap(lambda p: blocked_loss_and_grads(p, xs[0], ys[0], None, True, 8)))(many)
    want = jax.jit(jax.vmap(lambda p: dense_loss_and_grads(p, xs[0], ys[0])))(many)
    assert_close(got, want, 1e-9)


def test_blocked_pass_at_the_default_block_equals_an_explicit_block():
    params, x, y, w = problem(300, seed=6, weighted=True)
    got = jax.jit(blocked_loss_and_grads)(params, x, y, w)
    assert_close(got, jax.jit(functools.partial(blocked_loss_and_grads, block_size=64))(params, x, y, w), 1e-12)
    assert_close(got, jax.jit(dense_loss_and_grads)(params, x, y, w), 1e-9)


def test_routing_identity_sum_alpha_b_is_u_dot_g():
    """sum_k alpha_ik b_ik = u_i . g_i, the identity the blocked routing law uses instead of a row sum."""
    params, x, y, _ = problem(30, seed=7)
    out = forward(params, x)
    u = output_error(out, y) @ params.w_o.T
    b = compatibility(u, out.v)
    np.testing.assert_allclose(jnp.sum(out.alpha * b, -1), jnp.sum(u * out.context, -1), rtol=1e-12, atol=1e-15)
    blocked_ds = out.alpha * (b - jnp.sum(u * out.context, -1, keepdims=True))
    np.testing.assert_allclose(blocked_ds, routing_grad(out.alpha, b), rtol=0, atol=1e-15)


def test_float32_at_paper_length_stays_float32_and_close():
    params, x, y, _ = problem(1999, d_in=20, d_k=10, d_v=15, n_classes=8, dtype=jnp.float32, scale=0.1)
    (loss, grads), g_fn, loss_only = jax.jit(
        lambda p, x_, y_: (blocked_loss_and_grads(p, x_, y_), jax.grad(loss_fn, argnums=(0, 1))(p, x_, y_),
                           loss_fn(p, x_, y_))
    )(params, x, y)
    want_l, want = dense_loss_and_grads(
        jax.tree.map(lambda a: a.astype(jnp.float64), params), x.astype(jnp.float64), y
    )
    assert loss.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
    assert rel_err(loss, want_l) < 1e-5
    assert rel_err(grads, want) < 2e-4
    assert rel_err(g_fn[0], want) < 2e-4
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g_fn)) and loss_only.dtype == jnp.float32


def test_compiled_step_holds_no_n_by_n_buffer():
    n, block = 4096, 256
    params, x, y, _ = problem(n, d_in=20, d_k=10, d_v=15, n_classes=8, dtype=jnp.float32, scale=0.1)
    compiled = jax.jit(lambda p, x_, y_: blocked_loss_and_grads(p, x_, y_, None, True, block)).lower(params, x, y).compile()
    assert f"[{n},{n}]" not in compiled.as_text()
    # A few (block x N) matrices alive at a time (4.2 MB each here; BLOCKS_IN_FLIGHT blocks), never
    # the N x N ones (67 MB) nor all blocks at once: measured 22.8 MB with 3 blocks in flight, 74 MB
    # with every block alive; the causal triangle alone is 33.6 MB.
    temp = compiled.memory_analysis().temp_size_in_bytes
    triangle = 4 * n * n / 2
    assert temp < triangle, f"temporary buffers {temp / 1e6:.1f} MB, the causal triangle is {triangle / 1e6:.1f} MB"


def test_block_layout_and_bad_block_size():
    assert query_blocks(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert query_blocks(10, np.int64(4)) == [(0, 4), (4, 8), (8, 10)]  # numpy sizes, as from arithmetic
    assert query_blocks(3, 256) == [(0, 3)]
    assert default_block_size(1999) == 256 and default_block_size(8192) == 512 and default_block_size(16384) == 1024
    params, x, y, _ = problem(8)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="block_size"):
            loss_fn(params, x, y, block_size=bad)
    for bad in (2.5, 2.0, True):  # one policy with the other sizes: a non-integer is a TypeError
        with pytest.raises(TypeError, match="block_size"):
            loss_fn(params, x, y, block_size=bad)


def test_loss_fn_still_validates_inputs_at_trace_time():
    params, x, y, _ = problem(8)
    with pytest.raises(ValueError, match="loss_fn"):
        jax.jit(loss_fn)(params, x[:, :3], y)
    with pytest.raises(ValueError, match="loss_fn"):
        jax.grad(loss_fn)(params, x, y[:5])


def test_vmap_over_many_seeds_runs_in_groups_with_identical_values(monkeypatch):
    """Past seed_group seeds, vmap runs lax.map over groups (here 3 seeds, 7 seeds: 3 + 3 + 1)."""
    from gradattn import _backend
    from gradattn.grads import blocked

    monkeypatch.setattr(blocked, "backend_choices", lambda: _backend.CPU._replace(seed_group_bytes=3 * 4 * 10 * 10))
    assert blocked.seed_group(10) == 3
    keys = jax.random.split(jax.random.PRNGKey(8), 7)
    many = jax.jit(jax.vmap(lambda k: ga.init_head(k, 5, 3, 4, 6, scale=0.7, dtype=jnp.float64)))(keys)
    xs = jax.random.normal(jax.random.PRNGKey(9), (7, 10, 5), jnp.float64)
    ys = jax.random.randint(jax.random.PRNGKey(10), (7, 10), 0, 6)
    # params batched, x and y shared; then everything batched
    got = jax.jit(jax.vmap(lambda p: ga.blocked_loss_and_grads(p, xs[0], ys[0])))(many)
    assert_close(got, jax.jit(jax.vmap(lambda p: dense_loss_and_grads(p, xs[0], ys[0])))(many), 1e-9)
    got = jax.jit(jax.vmap(jax.value_and_grad(loss_fn)))(many, xs, ys)
    assert_close(got, jax.jit(jax.vmap(jax.value_and_grad(dense_loss)))(many, xs, ys), 1e-9)
    # differentiating through the vmapped blocked gradient goes through the plain pass
    meta = lambda p: jnp.sum(jax.vmap(lambda p_, x_, y_: ga.blocked_loss_and_grads(p_, x_, y_)[1].w_v.sum())(p, xs, ys))  # noqa: E731
    meta_dense = lambda p: jnp.sum(jax.vmap(lambda p_, x_, y_: jax.grad(dense_loss)(p_, x_, y_).w_v.sum())(p, xs, ys))  # noqa: E731
    assert_close(jax.jit(jax.grad(meta))(many), jax.jit(jax.grad(meta_dense))(many), 1e-9)


def test_blocked_forms_are_the_named_laws_on_a_block():
    """The routing, key and value laws as the blocked pass writes them equal the named laws, over V
    and over V W_O (the logits' coordinates)."""
    from gradattn.grads.blocked import (
        key_grad_block_t,
        output_value_grad_block_t,
        routing_grad_block,
        value_grad_block_t,
    )
    from gradattn.laws import key_grad, value_grad

    params, x, y, _ = problem(11, weighted=True)
    out = forward(params, x)
    u = ga.upstream_grad(params, out, y)
    e = output_error(out, y)
    r0, r1 = 4, 9  # one block of query rows, keys 0:r1
    alpha_r = out.alpha[r0:r1, :r1]
    s_r = out.scores[r0:r1, :r1]
    s_r = jnp.where(jnp.arange(r1)[None, :] <= jnp.arange(r0, r1)[:, None], s_r, -jnp.inf)
    exp_s = jnp.exp(s_r - jnp.max(s_r, axis=-1, keepdims=True))
    inv_l = 1.0 / jnp.sum(exp_s, axis=-1, keepdims=True)
    b_r = compatibility(u[r0:r1], out.v[:r1])
    assert_close(routing_grad_block(exp_s, inv_l, b_r, u[r0:r1], out.context[r0:r1]), routing_grad(alpha_r, b_r), 1e-12)
    ds = routing_grad(alpha_r, b_r)
    q_t = out.q[r0:r1].T / jnp.sqrt(3.0)
    assert_close(key_grad_block_t(q_t, ds), key_grad(ds, out.q[r0:r1]).T, 1e-12)
    assert_close(value_grad_block_t(params.w_o, e[r0:r1], inv_l, exp_s), value_grad(alpha_r, u[r0:r1]).T, 1e-12)
    # attending over M = V W_O: the value law before W_O^T, b and the routing law in M's coordinates
    m, z = out.v @ params.w_o, out.context @ params.w_o
    assert_close(output_value_grad_block_t(e[r0:r1], inv_l, exp_s).T @ params.w_o.T, value_grad(alpha_r, u[r0:r1]), 1e-12)
    assert_close(compatibility(e[r0:r1], m[:r1]), b_r, 1e-12)
    assert_close(routing_grad_block(exp_s, inv_l, compatibility(e[r0:r1], m[:r1]), e[r0:r1], z[r0:r1]),
                 routing_grad(alpha_r, b_r), 1e-12)


def test_one_validation_per_eager_call(monkeypatch):
    """An eager gradient path validates its input once (it was three times, each copying x to host)."""
    from gradattn import _checks

    params, x, y, w = problem(9, weighted=True)
    calls = []
    real = _checks.check_params
    monkeypatch.setattr(_checks, "check_params", lambda *a, **k: calls.append(a[-1]) or real(*a, **k))
    for fn in (ga.blocked_loss_and_grads, ga.dense_loss_and_grads,
               ga.autodiff_loss_and_grads, ga.dense_loss, ga.loss_fn):
        calls.clear()
        fn(params, x, y, w)
        assert len(calls) == 1, (fn.__name__, calls)
    calls.clear()
    jax.grad(ga.loss_fn)(params, x, y, w)
    assert len(calls) == 1, calls


# Every gradient path, jitted once at module level so both bad labels reuse the compiled programs.
LABEL_PATHS = {
    "blocked": jax.jit(lambda *a: ga.blocked_loss_and_grads(*a, block_size=4)),
    "dense": jax.jit(ga.dense_loss_and_grads),
    "autodiff": jax.jit(ga.autodiff_loss_and_grads),
    "loss_fn_vjp": jax.jit(jax.value_and_grad(loss_fn)),
    "pallas": jax.jit(lambda *a: gradattn.grads.pallas.pallas_loss_and_grads(*a, block_q=16, block_k=16)),  # interpreted here
}


@pytest.mark.parametrize("bad", [-1, 6])
def test_invalid_labels_under_jit_give_nan_in_every_path(bad):
    """A label outside [0, C) reaching compiled code: NaN loss and NaN gradients everywhere, never a
    finite update; valid labels are unchanged."""
    params, x, y, w = problem(9, weighted=True)
    y_bad = y.at[3].set(bad)
    reference = LABEL_PATHS["autodiff"](params, x, y, w)
    for name, fn in LABEL_PATHS.items():
        loss, grads = fn(params, x, y_bad, w)
        assert np.isnan(loss), name
        for leaf in jax.tree.leaves(grads):
            assert np.isnan(np.asarray(leaf)).any(), name
        assert not np.isfinite(np.asarray(grads.w_o)).any(), name  # every row of E feeds dW_O
        assert_close(fn(params, x, y, w), reference, 1e-9)
    with pytest.raises(ValueError, match="outside"):  # eagerly it is still an error at the door
        ga.blocked_loss_and_grads(params, x, y_bad, w)


def test_checked_mode_raises_inside_jit():
    from jax.experimental import checkify

    from gradattn.checking import checked

    params, x, y, w = problem(9, weighted=True)
    safe = checked(ga.blocked_loss_and_grads)
    assert_close(safe(params, x, y, w), ga.autodiff_loss_and_grads(params, x, y, w), 1e-9)
    # checkify's messages name the argument (not the function), its bound and the offending value
    with pytest.raises(checkify.JaxRuntimeError, match=r"\by\b.*\[0, 6\).*-1"):
        safe(params, x, y.at[2].set(-1), w)
    with pytest.raises(checkify.JaxRuntimeError, match=r"weights\b.*non-negative.*-0\.5"):
        safe(params, x, y, w.at[1].set(-0.5))
    with pytest.raises(checkify.JaxRuntimeError, match=r"weights\b.*sum to zero"):
        safe(params, x, y, jnp.zeros_like(w))
    with pytest.raises(checkify.JaxRuntimeError, match=r"\bx\b.*non-finite"):
        checked(loss_fn)(params, x.at[0, 0].set(jnp.nan), y)
    batched = checked(jax.vmap(ga.dense_loss, in_axes=(None, 0, 0)))
    ys = jnp.stack([y, y.at[0].set(6)])
    with pytest.raises(checkify.JaxRuntimeError, match=r"\by\b.*\[0, 6\)"):
        batched(params, jnp.stack([x, x]), ys)


def test_backend_choices_table():
    from gradattn import _backend

    assert _backend.backend_choices("cpu").grad_source == "blocked"
    assert _backend.backend_choices("gpu").grad_source == "dense" and _backend.backend_choices("tpu").grad_source == "dense"
    assert _backend.backend_choices("gpu").seed_group_bytes is None
    assert _backend.backend_choices() == _backend.backend_choices(jax.default_backend())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_materialised_transpose_is_the_exact_transpose(dtype):
    """The identity-product transpose the pass uses for X^T, Q^T and the value law's factor equals
    ``a.T`` bit for bit, in float32 and float64, for square and non-square arrays."""
    from gradattn.grads.blocked import materialised_transpose

    with jax.enable_x64(dtype == jnp.float64):
        for shape in [(7, 3), (3, 7), (5, 5), (1, 4)]:
            a = jax.random.normal(jax.random.PRNGKey(sum(shape)), shape, dtype) * 1e3
            got = jax.jit(materialised_transpose)(a)
            assert got.shape == shape[::-1] and got.dtype == a.dtype
            np.testing.assert_array_equal(np.asarray(got), np.asarray(a).T)
