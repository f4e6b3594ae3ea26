"""Small numerical pieces used in more than one module: log 2, entropy in nats and in bits (of
probabilities or of log-probabilities)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)
"""ln 2: nats per bit."""


def _entropy(xp, p, log_p, positive, axis: int):
    """-sum p log p along ``axis`` over the entries where ``positive`` (``log_p`` finite there), 0 elsewhere."""
    return -xp.sum(xp.where(positive, p * log_p, 0.0), axis=axis)


def entropy_nats(p, axis: int = -1, *, xp=jnp):
    """H = -sum p ln p along ``axis``, with 0 log 0 = 0 (and a zero gradient there, not NaN).

    ``xp`` is the array module that computes it: ``jax.numpy`` (traceable, at ``p``'s dtype), or
    ``numpy`` for tables computed once in float64.
    """
    positive = p > 0
    return _entropy(xp, p, xp.log(xp.where(positive, p, 1.0)), positive, axis)


def entropy_bits(p: jax.Array, axis: int = -1) -> jax.Array:
    """H = -sum p log2 p along ``axis``, with 0 log 0 = 0 (and a zero gradient there, not NaN)."""
    return entropy_nats(p, axis) / LN2


def entropy_from_log(log_p: jax.Array, axis: int = -1) -> jax.Array:
    """H = -sum p ln p in nats along ``axis``, from log-probabilities (-inf allowed), with 0 log 0 = 0."""
    p = jnp.exp(log_p)
    positive = p > 0
    return _entropy(jnp, p, jnp.where(positive, log_p, 0.0), positive, axis)

