"""Geometry on constructed data of known rank and spectrum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradattn import geometry
from gradattn.geometry import (
    attention_entropy_bits,
    covariate_r2,
    decoding_r2,
    explained_variance_ratio,
    participation_ratio,
    pc_covariate_correlation,
    pca_spectrum,
    principal_components,
)


def rotated_data(variances, m=4000, d=None, seed=0):
    """Points whose covariance has exactly the given eigenvalues (whitened draw, random rotation)."""
    rng = np.random.default_rng(seed)
    d = d or len(variances)
    g = rng.standard_normal((m, len(variances)))
    g -= g.mean(0)
    # Exact whitening: the sample covariance of g becomes I.
    evals, evecs = np.linalg.eigh(g.T @ g / m)
    g = g @ evecs @ np.diag(evals ** -0.5) @ evecs.T
    z = g * np.sqrt(np.asarray(variances))
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return z @ rot[: len(variances)] + 3.0, rot[: len(variances)]


def test_attention_entropy_known_rows():
    alpha = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], jnp.float32)
    h = attention_entropy_bits(alpha)
    assert h.dtype == jnp.float32
    np.testing.assert_allclose(h, [0.0, 1.0, 2.0], atol=1e-6)
    causal = jnp.tril(jnp.ones((5, 5))) / jnp.arange(1, 6)[:, None]
    np.testing.assert_allclose(attention_entropy_bits(causal), np.log2(np.arange(1, 6)), atol=1e-12)


def test_spectrum_and_participation_ratio_of_known_covariance():
    variances = [4.0, 2.0, 1.0, 0.0, 0.0, 0.0]
    z, _ = rotated_data(variances, d=6)
    spec = np.asarray(pca_spectrum(jnp.asarray(z)))
    np.testing.assert_allclose(spec, variances, atol=1e-9)
    np.testing.assert_allclose(explained_variance_ratio(spec), np.array(variances) / 7.0, atol=1e-10)
    np.testing.assert_allclose(participation_ratio(spec), 49.0 / 21.0, rtol=1e-9)
    # Equal variances on r directions give PR = r; rank 1 gives 1.
    np.testing.assert_allclose(participation_ratio(jnp.array([1.0, 1.0, 1.0, 0.0])), 3.0)
    np.testing.assert_allclose(participation_ratio(jnp.array([5.0, 0.0])), 1.0)
    assert float(participation_ratio(jnp.zeros(3))) == 0.0


def test_low_rank_values_have_small_participation_ratio():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((500, 2)) @ rng.standard_normal((2, 15))  # rank 2 in 15 dims
    spec = np.asarray(pca_spectrum(jnp.asarray(z)))
    assert spec.shape == (15,) and np.all(spec[2:] < 1e-20 * spec[0] + 1e-12)
    assert 1.0 <= float(participation_ratio(spec)) <= 2.0


def test_principal_components_recover_directions():
    z, rot = rotated_data([9.0, 1.0, 0.25], d=5, seed=2)
    scores, dirs = principal_components(jnp.asarray(z), 2)
    assert scores.shape == (4000, 2) and dirs.shape == (2, 5)
    np.testing.assert_allclose(np.abs(np.asarray(dirs) @ rot[:2].T), np.eye(2), atol=1e-9)
    np.testing.assert_allclose(np.var(np.asarray(scores), axis=0), [9.0, 1.0], rtol=1e-9)


def test_covariate_correlation_known_answer():
    rng = np.random.default_rng(3)
    m = 5000
    t = rng.standard_normal(m)  # the leading coordinate
    noise = rng.standard_normal(m)
    z = np.stack([3.0 * t, 1.0 * rng.standard_normal(m), 0.3 * rng.standard_normal(m)], 1)
    z = z @ np.linalg.qr(rng.standard_normal((3, 3)))[0]
    cov = t + noise  # corr(t, cov) = 1/sqrt(2)
    r = np.asarray(pc_covariate_correlation(jnp.asarray(z), jnp.asarray(cov), 3))
    expected = abs(np.corrcoef(t, cov)[0, 1])
    np.testing.assert_allclose(r[0], expected, atol=0.02)
    assert np.all(r[1:] < 0.05)
    np.testing.assert_allclose(covariate_r2(jnp.asarray(z), jnp.asarray(cov), 3), np.sum(r**2), rtol=1e-12)
    # An exact linear function of the first coordinate: R^2 = 1.
    np.testing.assert_allclose(covariate_r2(jnp.asarray(z), jnp.asarray(2 * t - 1), 1), 1.0, atol=1e-3)


def test_jit_vmap_and_float32():
    z = jax.random.normal(jax.random.PRNGKey(0), (6, 50, 4), jnp.float32)
    c = jax.random.normal(jax.random.PRNGKey(1), (6, 50), jnp.float32)
    pr = jax.jit(jax.vmap(lambda a: participation_ratio(pca_spectrum(a))))(z)
    r = jax.jit(jax.vmap(lambda a, b: pc_covariate_correlation(a, b, 2)))(z, c)
    assert pr.shape == (6,) and pr.dtype == jnp.float32 and np.all((pr >= 1) & (pr <= 4))
    assert r.shape == (6, 2) and r.dtype == jnp.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"pca_spectrum: z\b.*2-D.*\(5,\)"):
        pca_spectrum(jnp.ones(5))
    with pytest.raises(ValueError, match=r"pca_spectrum: z\b.*at least 2.*\(1, 3\)"):
        pca_spectrum(jnp.ones((1, 3)))
    with pytest.raises(TypeError, match=r"pca_spectrum: z\b.*floating"):
        pca_spectrum(jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"principal_components: n_components\b.*\[1, 3\].*got 4"):
        principal_components(jnp.ones((4, 3)), 4)
    with pytest.raises(ValueError, match=r"pc_covariate_correlation: covariate\b.*\(4,\).*\(3,\)"):
        pc_covariate_correlation(jnp.ones((4, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"attention_entropy_bits: alpha\b.*floating.*int32"):
        attention_entropy_bits(jnp.ones(3, jnp.int32))


def test_decoding_r2_known_answer():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((3000, 4))
    exact = z @ rng.standard_normal((4, 3)) + 5.0
    np.testing.assert_allclose(decoding_r2(jnp.asarray(z), jnp.asarray(exact)), 1.0, atol=1e-10)
    # One column linear, one pure noise of equal variance: pooled R^2 = 1/2.
    t = np.stack([z[:, 0], rng.standard_normal(3000)], 1)
    t[:, 1] *= t[:, 0].std() / t[:, 1].std()
    np.testing.assert_allclose(decoding_r2(jnp.asarray(z), jnp.asarray(t)), 0.5, atol=0.01)
    assert float(decoding_r2(jnp.asarray(z), jnp.ones(3000))) == 0.0
    with pytest.raises(ValueError, match=r"decoding_r2: targets\b.*\(3000,\).*\(5,\)"):
        decoding_r2(jnp.asarray(z), jnp.ones(5))


def test_vmapped_lapack_calls_take_one_matrix_at_a_time():
    # A batched LAPACK call can deadlock XLA:CPU's thread pool when two run at once (see
    # geometry._one_matrix_at_a_time): under vmap every LAPACK custom call must see one matrix.
    import re

    z = jax.ShapeDtypeStruct((4, 30, 5), jnp.float32)
    t = jax.ShapeDtypeStruct((4, 30, 2), jnp.float32)
    cases = {
        "pca_spectrum": (jax.vmap(geometry.pca_spectrum), (z,)),
        "principal_components": (jax.vmap(lambda a: geometry.principal_components(a, 2)), (z,)),
        "decoding_r2": (jax.vmap(geometry.decoding_r2), (z, t)),
        "nested": (jax.vmap(jax.vmap(geometry.pca_spectrum)), (jax.ShapeDtypeStruct((3, 4, 30, 5), jnp.float32),)),
    }
    for name, (fn, args) in cases.items():
        text = jax.jit(fn).lower(*args).compile().as_text()
        calls = [line for line in text.splitlines() if 'custom_call_target="lapack_' in line]
        assert calls, name
        for line in calls:
            operands = re.search(r"operand_layout_constraints=\{(.*?)\}\}?,", line).group(1)
            for shape in re.findall(r"f32\[([\d,]*)\]", operands):
                assert len(shape.split(",")) <= 2, f"{name}: batched LAPACK operand f32[{shape}] in {line[:120]}"


def test_vmapped_values_equal_unbatched_calls():
    """The one-matrix-at-a-time rule changes the schedule only: vmapped values equal a loop of
    unbatched calls (each compiled once and called per matrix, rather than dispatched op by op)."""
    z = jax.random.normal(jax.random.PRNGKey(3), (4, 30, 5), jnp.float64)
    c = jax.random.normal(jax.random.PRNGKey(4), (4, 30), jnp.float64)
    t = jax.random.normal(jax.random.PRNGKey(5), (4, 30, 2), jnp.float64)
    fns = {
        "pca_spectrum": (lambda a, b, s: geometry.pca_spectrum(a)),
        "principal_components": (lambda a, b, s: geometry.principal_components(a, 2)),
        "pc_covariate_correlation": (lambda a, b, s: geometry.pc_covariate_correlation(a, b, 2)),
        "decoding_r2": (lambda a, b, s: geometry.decoding_r2(a, s)),
    }
    for name, fn in fns.items():
        batched = jax.jit(jax.vmap(fn))(z, c, t)
        unbatched = jax.jit(fn)
        for i in range(z.shape[0]):
            one = unbatched(z[i], c[i], t[i])
            for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
                np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-12, err_msg=name)
    nested = jax.vmap(jax.vmap(geometry.pca_spectrum))(z.reshape(2, 2, 30, 5))
    np.testing.assert_allclose(nested.reshape(4, 5), jax.vmap(geometry.pca_spectrum)(z), rtol=1e-12)


def test_derivatives_through_the_lapack_calls():
    """d/dz of participation_ratio(pca_spectrum(z)) and of decoding_r2, batched and not, against
    central finite differences in float64."""
    z = jax.random.normal(jax.random.PRNGKey(6), (20, 4), jnp.float64) * jnp.array([3.0, 2.0, 1.0, 0.5])
    t = jax.random.normal(jax.random.PRNGKey(7), (20,), jnp.float64)
    fns = {
        "pr": lambda a: participation_ratio(pca_spectrum(a)),
        "r2": lambda a: geometry.decoding_r2(a, t),
    }
    direction = jax.random.normal(jax.random.PRNGKey(8), z.shape, jnp.float64)
    h = 1e-6

    # Each function's derivatives in one compiled program (eager dispatch of the LAPACK
    # derivatives was most of this test's time); the same quantities as computed one by one.
    def derivatives(f, z):
        g, g2 = jax.grad(f)(z), jax.grad(f)(2 * z)
        fd = (f(z + h * direction) - f(z - h * direction)) / (2 * h)
        gb = jax.vmap(jax.grad(f))(jnp.stack([z, 2 * z]))
        gv = jax.grad(lambda a: jnp.sum(jax.vmap(f)(a)))(jnp.stack([z, 2 * z]))
        return g, g2, fd, gb, gv

    for name, f in fns.items():
        g, g2, fd, gb, gv = jax.jit(derivatives, static_argnums=0)(f, z)
        np.testing.assert_allclose(jnp.sum(g * direction), fd, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(gb[0], g, rtol=1e-10, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(gb[1], g2, rtol=1e-10, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(gv[0], g, rtol=1e-10, atol=1e-14, err_msg=name)
