"""Settling: from checkpoints of a run, when does attention reach (and stay within a tolerance of)
its final pattern, and when do the values? The paper's two-timescale reading predicts attention
first ("frame before precision").

Two readings of "settled": :func:`settling_step` measures the distance to the last snapshot (right
when the run has converged, trivially 0 at the end otherwise); :func:`quiet_step` needs no endpoint
(the change per step falls below a fraction of its peak and stays there). :func:`plateau_step` says
whether, and from when, a loss curve is converged."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_int, check_number, concrete, is_traced

__all__ = [
    "FrameBeforePrecision",
    "change_per_step",
    "distance_to_final",
    "frame_before_precision",
    "plateau_step",
    "quiet_step",
    "settling_step",
]


_SCALES = ("final", "change", None)


def _check_scale(scale, fn: str) -> None:
    if scale not in _SCALES:
        raise ValueError(f"{fn}: scale must be 'final', 'change' or None, got {scale!r}")


def distance_to_final(series: jax.Array, scale: str | None = "final") -> jax.Array:
    """(K,) d_k = ||s_k - s_{K-1}|| (Frobenius over all trailing axes), optionally normalised.

    ``series`` (K, ...) holds one snapshot per checkpoint, the last one being the final state.
    ``scale`` chooses the normaliser: ``"final"`` divides by ||s_{K-1}|| (relative to the final
    value); ``"change"`` by ||s_0 - s_{K-1}|| (the fraction of the run's total change still to go,
    1 at the start and 0 at the end: right for quantities such as attention that start near a large
    constant pattern, where "relative to the final value" is small from step 0); ``None`` leaves the
    distance absolute. A zero normaliser leaves the distance absolute.
    """
    _check_scale(scale, "distance_to_final")
    series = jnp.asarray(series)
    if series.ndim < 1 or series.shape[0] < 1:
        raise ValueError(f"distance_to_final: series must have a leading checkpoint axis (K, ...), got shape {series.shape}")
    flat = series.reshape(series.shape[0], -1)
    d = jnp.linalg.norm(flat - flat[-1], axis=-1)
    if scale is not None:
        ref = jnp.linalg.norm(flat[-1]) if scale == "final" else d[0]
        d = d / jnp.where(ref > 0, ref, 1.0)
    return d


def settling_step(checkpoint_steps, series, tol: float = 0.1, scale: str | None = "final") -> jax.Array:
    """The first checkpoint step after which ``series`` stays within ``tol`` of its final value.

    With d_k = :func:`distance_to_final` (``scale="final"``: relative to the size of the final
    value; ``"change"``: relative to the run's total change; ``None``: absolute), the answer is
    checkpoint_steps[k*] for the smallest k* such that d_k <= tol for every k >= k*. For a finite
    series the last checkpoint always qualifies (d = 0), so the answer is defined; it is
    checkpoint_steps[0] when the series never leaves the tolerance.

    A series with any non-finite value (a diverged run) never settles: it has no final value to
    settle to, and every comparison with NaN fails, which would otherwise read as "settled at the
    first checkpoint". Called eagerly, that is a ValueError naming ``series`` and the checkpoints
    concerned; traced (under ``jit``/``vmap``, e.g. in a sweep where one seed diverges), the result
    is NaN, so means over seeds show it instead of absorbing a plausible-looking step. Checkpoint
    steps that do not increase strictly are refused the same way: a ValueError eagerly, NaN traced.

    Args:
      checkpoint_steps: (K,) the step of each checkpoint, strictly increasing (e.g. 0, k, 2k, ...).
      series: (K, ...) a snapshot per checkpoint (attention rows, values, a scalar, ...).
      tol: tolerance on d_k.
      scale: the normaliser of d_k, as above.
    Returns:
      scalar, the settling step, floating (so that "never" can be NaN): the dtype of
      ``checkpoint_steps`` if it is floating, else JAX's default float. Pure and vmap-able over seeds.
    """
    return _settling_step(checkpoint_steps, series, tol, scale, "series", "settling_step")


def _check_increasing(steps, fn: str) -> None:
    """Concrete checkpoint steps must increase strictly: steps out of order would pair each snapshot
    with another's step (and make a rate per step negative or infinite)."""
    sc = concrete(steps)
    if sc is not None and sc.size > 1 and not (np.diff(sc) > 0).all():
        shown = sc[:10].tolist()
        raise ValueError(
            f"{fn}: checkpoint_steps must be increasing, got {shown}{' ...' if sc.size > 10 else ''} "
            f"(shape {sc.shape}); one step per snapshot, in order"
        )


def _increasing(steps) -> jax.Array:
    """Whether ``steps`` increase strictly (a traced check: the answers are NaN where they do not)."""
    return jnp.all(jnp.diff(steps) > 0)


def _settling_step(checkpoint_steps, series, tol, scale, name: str, fn: str) -> jax.Array:
    """:func:`settling_step`, with the argument and function names its errors should give."""
    _check_scale(scale, fn)
    steps = jnp.asarray(checkpoint_steps)
    series = jnp.asarray(series)
    if steps.ndim != 1:
        raise ValueError(f"{fn}: checkpoint_steps must be 1-D (K,), got shape {steps.shape}")
    _check_increasing(steps, fn)
    if series.ndim < 1 or series.shape[0] != steps.shape[0]:
        raise ValueError(
            f"{fn}: {name} must have shape (K, ...) with K = {steps.shape[0]} (from checkpoint_steps), "
            f"got shape {series.shape}"
        )
    if is_traced(tol):
        if np.ndim(tol) != 0:
            raise ValueError(f"{fn}: tol must be a non-negative scalar, got shape {np.shape(tol)}")
    else:
        check_number("tol", tol, fn, minimum=0.0)
    sc = concrete(series)
    if sc is not None and not np.isfinite(sc).all():
        bad = np.flatnonzero(~np.isfinite(sc.reshape(sc.shape[0], -1)).all(axis=1))
        raise ValueError(
            f"{fn}: {name} (shape {series.shape}) has non-finite values at checkpoints {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}; a non-finite series never settles"
        )
    within = distance_to_final(series, scale) <= tol
    stays = jnp.flip(jnp.cumprod(jnp.flip(within).astype(jnp.int32))).astype(bool)
    dtype = steps.dtype if jnp.issubdtype(steps.dtype, jnp.floating) else jnp.result_type(float)
    ok = jnp.all(jnp.isfinite(series)) & _increasing(steps)
    return jnp.where(ok, steps[jnp.argmax(stays)].astype(dtype), jnp.nan)


class FrameBeforePrecision(NamedTuple):
    """Settling steps of attention (the frame) and of the values (the precision) in one run.

    Attributes:
      attention_step: :func:`settling_step` of the attention snapshots (floating; NaN: never).
      value_step: :func:`settling_step` of the values.
      lag: value_step - attention_step (> 0: frame before precision).
    """

    attention_step: jax.Array
    value_step: jax.Array
    lag: jax.Array


def frame_before_precision(
    checkpoint_steps, attention_series, value_series, tol: float = 0.1, value_tol=None, scale: str | None = "change"
) -> FrameBeforePrecision:
    """When attention settles versus when the values settle (the paper's "frame before precision").

    Both settling steps are :func:`settling_step` with the same ``scale``. The default, ``"change"``,
    asks when each has covered all but ``tol`` of its total change over the run: attention starts
    near the uniform causal pattern, whose norm dwarfs what training changes, so a tolerance relative
    to the final attention would call it settled at step 0.

    Args:
      checkpoint_steps: (K,) steps of the checkpoints (include the final state as the last one).
      attention_series: (K, ...) attention at each checkpoint, e.g. ``snapshots(...).alpha``.
      value_series: (K, ...) the values at each checkpoint, e.g. ``snapshots(...).values``.
      tol: tolerance for attention; ``value_tol`` for the values (default: ``tol``).
      scale: ``"change"`` (default), ``"final"`` or ``None``, as in :func:`distance_to_final`.
    Returns:
      :class:`FrameBeforePrecision`; vmap over seeds for many runs. A non-finite series never
      settles (see :func:`settling_step`): a ValueError eagerly, NaN steps (and lag) when traced.
    """
    value_tol = tol if value_tol is None else value_tol
    a = _settling_step(checkpoint_steps, attention_series, tol, scale, "attention_series", "frame_before_precision")
    v = _settling_step(checkpoint_steps, value_series, value_tol, scale, "value_series", "frame_before_precision")
    return FrameBeforePrecision(attention_step=a, value_step=v, lag=v - a)


def _last_run_start(ok: jax.Array) -> jax.Array:
    """Index of the first entry from which ``ok`` holds to the end (len(ok) if the last entry fails)."""
    stays = jnp.flip(jnp.cumprod(jnp.flip(ok).astype(jnp.int32))).astype(bool)
    return jnp.where(stays[-1], jnp.argmax(stays), ok.shape[0])


def quiet_step(checkpoint_steps, series, fraction: float = 0.05) -> jax.Array:
    """An endpoint-free settling step: the first checkpoint after which the change per step of
    ``series`` stays below ``fraction`` of its peak.

    With c_k = ||s_{k+1} - s_k|| / (t_{k+1} - t_k) (Frobenius over the trailing axes) for the K - 1
    intervals between the K checkpoints, the answer is t_{k*} for the smallest k* such that
    c_k <= fraction * max_k c_k for every k >= k*. Unlike :func:`settling_step` it never compares
    with the last snapshot, so a run stopped early does not settle "by construction" at its end:
    the answer is NaN when the last interval is still above the threshold (the series is still
    moving), and NaN for a series with non-finite values. Checkpoint steps that do not increase
    strictly are a ValueError eagerly and give NaN traced.

    Args:
      checkpoint_steps: (K,) strictly increasing steps of the checkpoints, K >= 2.
      series: (K, ...) a snapshot per checkpoint.
      fraction: in (0, 1].
    Returns:
      scalar, floating (the dtype of ``checkpoint_steps`` if floating, else JAX's default float).
      Pure; jit- and vmap-able (``fraction`` static).
    """
    steps, series = _check_series(checkpoint_steps, series, "quiet_step")
    check_number("fraction", fraction, "quiet_step", minimum=0.0, exclusive_minimum=True, maximum=1.0)
    dtype = steps.dtype if jnp.issubdtype(steps.dtype, jnp.floating) else jnp.result_type(float)
    rate = _rate(steps, series)
    k = _last_run_start(rate <= fraction * jnp.max(rate))
    ok = jnp.all(jnp.isfinite(series)) & (k < rate.shape[0]) & _increasing(steps)
    return jnp.where(ok, steps[jnp.minimum(k, rate.shape[0] - 1)].astype(dtype), jnp.nan)


def change_per_step(checkpoint_steps, series) -> jax.Array:
    """(K - 1,) c_k = ||s_{k+1} - s_k|| / (t_{k+1} - t_k): how fast ``series`` moves between checkpoints.

    Args:
      checkpoint_steps: (K,) strictly increasing steps t_k, K >= 2 (a ValueError eagerly otherwise).
      series: (K, ...) a snapshot per checkpoint (Frobenius norm over the trailing axes).
    """
    steps, series = _check_series(checkpoint_steps, series, "change_per_step")
    return _rate(steps, series)


def _check_series(checkpoint_steps, series, fn: str):
    steps = jnp.asarray(checkpoint_steps)
    series = jnp.asarray(series)
    if steps.ndim != 1 or steps.shape[0] < 2:
        raise ValueError(f"{fn}: checkpoint_steps must be 1-D with at least 2 checkpoints, got shape {steps.shape}")
    if series.ndim < 1 or series.shape[0] != steps.shape[0]:
        raise ValueError(f"{fn}: series must have shape (K, ...) with K = {steps.shape[0]}, got shape {series.shape}")
    _check_increasing(steps, fn)
    return steps, series


def _rate(steps, series):
    flat = series.reshape(steps.shape[0], -1)
    return jnp.linalg.norm(jnp.diff(flat, axis=0), axis=-1) / jnp.diff(steps).astype(flat.dtype)


def plateau_step(curve, window: int, tol: float) -> jax.Array:
    """The step from which a loss curve is on its plateau: from there on, the mean loss of each window
    of ``window`` steps differs from the next window's by less than ``tol`` (relative).

    With m_j the mean of ``curve`` over steps [j w, (j + 1) w) (a trailing partial window is left
    out) and r_j = |m_{j+1} - m_j| / |m_j|, the answer is j* w for the smallest j* such that
    r_j < tol for every j >= j*; NaN when the last pair of windows still differs by ``tol`` or more
    (the run has not reached its plateau) or when the curve has non-finite values.

    Args:
      curve: (S,) loss per step, S >= 2 * window.
      window: steps per window (static).
      tol: relative change per window (static).
    Returns:
      scalar float (JAX's default float). Pure; jit- and vmap-able.
    """
    curve = jnp.asarray(curve)
    if curve.ndim != 1:
        raise ValueError(f"plateau_step: curve must be 1-D (S,), got shape {curve.shape}")
    window = check_int("window", window, "plateau_step")
    if curve.shape[0] < 2 * window:
        raise ValueError(f"plateau_step: curve (shape {curve.shape}) must hold at least two windows of {window} steps")
    check_number("tol", tol, "plateau_step", minimum=0.0)
    n = curve.shape[0] // window
    means = jnp.mean(curve[: n * window].reshape(n, window), axis=-1)
    rel = jnp.abs(jnp.diff(means)) / jnp.abs(means[:-1])
    j = _last_run_start(rel < tol)
    ok = jnp.all(jnp.isfinite(curve)) & (j < rel.shape[0])
    return jnp.where(ok, (j * window).astype(jnp.result_type(float)), jnp.nan)
