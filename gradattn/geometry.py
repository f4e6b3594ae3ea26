"""The geometry that training sculpts: attention entropy, value/context spectra, and what the
leading directions encode.

All functions are pure, jit- and vmap-able (vmap over checkpoints or seeds), and take plain arrays::

    attention_entropy_bits(alpha)             H_i = -sum_j alpha_ij log2 alpha_ij              (N,)
    pca_spectrum(z)                           eigenvalues of Cov(z), descending                  (D,)
    participation_ratio(spectrum)             PR = (sum lambda)^2 / sum lambda^2, in [1, D]
    principal_components(z, k)                scores (M, k) and directions (k, D)
    pc_covariate_correlation(z, c, k)         |corr(score_m, c)| for the k leading components   (k,)
    covariate_r2(z, c, k)                     R^2 of c regressed on the k leading scores
    decoding_r2(z, targets)                   R^2 of a linear read-out of targets (M, T) from z

The companion paper's claim is that values and contexts of a trained head lie near a
low-dimensional manifold whose leading coordinate tracks the posterior uncertainty; for the sticky
chain, the per-position covariate is the Bayes predictive entropy (the task's ``bayes_entropy``,
:func:`gradattn.tasks.sticky_markov.bayes_entropy`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_array, check_int, concrete
from gradattn._math import entropy_bits
from gradattn._vmap import grouped_vmap


def _one_matrix_at_a_time(fn):
    """``fn`` (a call into LAPACK) whose ``vmap`` runs one matrix at a time: on CPU a batched LAPACK
    call can deadlock XLA's thread pool (see :mod:`gradattn._vmap`). The matrices here are small
    (N x d), so running them in turn costs little; values and derivatives are unchanged."""
    return grouped_vmap(fn, 1)


_singular_values = _one_matrix_at_a_time(lambda a: jnp.linalg.svd(a, compute_uv=False))
_right_singular_vectors = _one_matrix_at_a_time(lambda a: jnp.linalg.svd(a, full_matrices=False)[2])
_least_squares = _one_matrix_at_a_time(lambda a, b: jnp.linalg.lstsq(a, b)[0])


def _check_rows(name: str, z, fn: str) -> None:
    check_array(name, z, fn)
    if np.ndim(z) != 2:
        raise ValueError(f"{fn}: {name} must be 2-D (M points, D dims), got shape {tuple(np.shape(z))}")
    if np.shape(z)[0] < 2:
        raise ValueError(f"{fn}: {name} needs at least 2 points (rows), got shape {tuple(np.shape(z))}")
    if not jnp.issubdtype(jnp.result_type(z), jnp.floating):
        raise TypeError(f"{fn}: {name} must be floating point, got dtype {jnp.result_type(z)}")


def _check_k(k, d: int, fn: str) -> int:
    return check_int("n_components", k, fn, minimum=1, maximum=d)


def attention_entropy_bits(alpha: jax.Array) -> jax.Array:
    """Entropy in bits of each attention row: H_i = -sum_j alpha_ij log2 alpha_ij, with 0 log 0 = 0.

    A weight outside [0, 1] (negative, above 1, infinite) is no attention weight, and its row's
    "entropy" can be negative: called eagerly that is a ValueError naming the extremes; traced
    (under ``jit``/``vmap``, where values cannot be inspected) that row's entropy is NaN. A row with
    a NaN weight (a diverged run) has NaN entropy, eagerly or traced, not the entropy of its other
    weights. Valid rows give :func:`gradattn._math.entropy_bits`'s values (the same bits eagerly;
    compiled, XLA may fuse the check with the sum and round the last bit otherwise).

    Args:
      alpha: (..., N_keys) attention weights, rows summing to 1 (e.g. (N, N) for one head).
    Returns:
      (...,) entropies; 0 for a one-hot row, log2(m) for a row uniform over m keys.
    """
    fn = "attention_entropy_bits"
    alpha = jnp.asarray(alpha)
    if alpha.ndim < 1 or not jnp.issubdtype(alpha.dtype, jnp.floating):
        raise ValueError(f"{fn}: alpha must be a floating array (..., N_keys), got shape {alpha.shape}, dtype {alpha.dtype}")
    ac = concrete(alpha)
    if ac is not None:
        outside = (ac < 0) | (ac > 1)  # False for NaN: those rows are NaN below
        if outside.any():
            raise ValueError(
                f"{fn}: alpha (shape {alpha.shape}) has weights outside [0, 1] (min {ac[outside].min()!r}, "
                f"max {ac[outside].max()!r} among them); attention weights are probabilities"
            )
    weights = (alpha >= 0) & (alpha <= 1)  # False for NaN too
    return jnp.where(jnp.all(weights, axis=-1), entropy_bits(alpha, axis=-1), jnp.nan)


def _centred(z, center: bool):
    z = jnp.asarray(z)
    return z - jnp.mean(z, axis=0, keepdims=True) if center else z


def pca_spectrum(z: jax.Array, center: bool = True) -> jax.Array:
    """Eigenvalues of the covariance of the rows of ``z``, in descending order.

    lambda = svd(z - mean)^2 / M, the variance along each principal direction (the 1/M normalisation;
    ratios and the participation ratio do not depend on it).

    Args:
      z: (M, D) points (values v_j, contexts g_i, ...).
      center: subtract the mean point first (default True).
    Returns:
      (min(M, D),) variances, descending, non-negative.
    """
    _check_rows("z", z, "pca_spectrum")
    zc = _centred(z, center)
    s = _singular_values(zc)
    return s * s / zc.shape[0]


def explained_variance_ratio(spectrum: jax.Array) -> jax.Array:
    """lambda_m / sum_m lambda_m for a spectrum from :func:`pca_spectrum`."""
    spectrum = jnp.asarray(spectrum)
    total = jnp.sum(spectrum)
    return spectrum / jnp.where(total > 0, total, 1.0)


def participation_ratio(spectrum: jax.Array) -> jax.Array:
    """PR = (sum_m lambda_m)^2 / sum_m lambda_m^2: the effective number of dimensions.

    1 when one direction holds all the variance, r for r equal eigenvalues (the rest zero).
    Takes a spectrum (..., D) (vmap-friendly along leading axes); 0 for an all-zero spectrum.
    """
    spectrum = jnp.asarray(spectrum)
    if spectrum.ndim < 1:
        raise ValueError(f"participation_ratio: spectrum must be at least 1-D (..., D), got shape {spectrum.shape}")
    num = jnp.sum(spectrum, axis=-1) ** 2
    den = jnp.sum(spectrum * spectrum, axis=-1)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def principal_components(z: jax.Array, n_components: int = 2, center: bool = True):
    """The ``n_components`` leading principal directions of the rows of ``z`` and the scores on them.

    Args:
      z: (M, D) points.   n_components: k, 1 <= k <= min(M, D).
    Returns:
      ``(scores (M, k), directions (k, D))`` with scores = (z - mean) @ directions.T; directions are
      orthonormal rows, ordered by variance. Each direction's sign is fixed so that its largest
      |entry| is positive (deterministic output for a given z).
    """
    _check_rows("z", z, "principal_components")
    n_components = _check_k(n_components, min(np.shape(z)), "principal_components")
    zc = _centred(z, center)
    vt = _right_singular_vectors(zc)
    dirs = vt[:n_components]
    pivot = jnp.take_along_axis(dirs, jnp.argmax(jnp.abs(dirs), axis=-1)[:, None], axis=-1)
    dirs = dirs * jnp.where(pivot < 0, -1.0, 1.0).astype(dirs.dtype)
    return zc @ dirs.T, dirs


def _check_covariate(z, covariate, fn: str):
    if np.ndim(covariate) != 1 or np.shape(covariate)[0] != np.shape(z)[0]:
        raise ValueError(
            f"{fn}: covariate must have shape ({np.shape(z)[0]},), one value per row of z {tuple(np.shape(z))}, "
            f"got shape {tuple(np.shape(covariate))}"
        )


def _pearson(a, b):
    a = a - jnp.mean(a, axis=0)
    b = b - jnp.mean(b, axis=0)
    den = jnp.sqrt(jnp.sum(a * a, axis=0) * jnp.sum(b * b, axis=0))
    return jnp.where(den > 0, jnp.sum(a * b, axis=0) / jnp.where(den > 0, den, 1.0), 0.0)


def pc_covariate_correlation(z: jax.Array, covariate: jax.Array, n_components: int = 3, center: bool = True) -> jax.Array:
    """|Pearson correlation| between each of the k leading principal scores of ``z`` and ``covariate``.

    A principal direction's sign is arbitrary, so the absolute value is returned.

    Args:
      z: (M, D) points, e.g. contexts g_i.   covariate: (M,) one number per point, e.g. the
      Bayes predictive entropy at position i.   n_components: k.
    Returns:
      (k,) values in [0, 1].
    """
    _check_rows("z", z, "pc_covariate_correlation")
    _check_covariate(z, covariate, "pc_covariate_correlation")
    scores, _ = principal_components(z, n_components, center)
    c = jnp.asarray(covariate, scores.dtype)
    return jnp.abs(_pearson(scores, c[:, None]))


def covariate_r2(z: jax.Array, covariate: jax.Array, n_components: int = 3, center: bool = True) -> jax.Array:
    """R^2 of the least-squares fit of ``covariate`` on the k leading principal scores of ``z``.

    With ``center=True`` the principal scores are centred and uncorrelated, so R^2 = sum_m corr(score_m, c)^2 over the k components
    (with components of zero variance contributing nothing). Shapes as :func:`pc_covariate_correlation`.
    """
    r = pc_covariate_correlation(z, covariate, n_components, center)
    return jnp.sum(r * r)


def decoding_r2(z: jax.Array, targets: jax.Array) -> jax.Array:
    """R^2 of the least-squares linear read-out (with intercept) of ``targets`` from ``z``.

    R^2 = 1 - sum ||t_m - t_hat_m||^2 / sum ||t_m - mean t||^2, pooled over the target columns (so
    columns count by their variance). How much of a per-position quantity, e.g. the Bayes
    log-predictive (N, C), is linearly readable from the contexts g_i (N, d_v).

    Args:
      z: (M, D) points.   targets: (M,) or (M, T), one row per point.
    Returns:
      scalar R^2 in [0, 1] (0 when the targets are constant).
    """
    _check_rows("z", z, "decoding_r2")
    t = jnp.asarray(targets)
    if t.ndim not in (1, 2) or t.shape[0] != np.shape(z)[0]:
        raise ValueError(
            f"decoding_r2: targets must have shape ({np.shape(z)[0]},) or ({np.shape(z)[0]}, T), one row per row of z "
            f"{tuple(np.shape(z))}, got shape {t.shape}"
        )
    t = t.reshape(t.shape[0], -1).astype(jnp.result_type(z))
    zc = jnp.asarray(z) - jnp.mean(z, axis=0)
    tc = t - jnp.mean(t, axis=0)
    coef = _least_squares(zc, tc)
    resid = jnp.sum((tc - zc @ coef) ** 2)
    total = jnp.sum(tc * tc)
    return jnp.where(total > 0, 1.0 - resid / jnp.where(total > 0, total, 1.0), 0.0)
