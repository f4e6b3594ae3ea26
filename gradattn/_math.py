"""Small numerical pieces used in more than one module: log 2, entropy in bits, the norm of a pytree."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

LN2 = math.log(2.0)
"""ln 2: nats per bit."""


def entropy_bits(p: jax.Array, axis: int = -1) -> jax.Array:
    """H = -sum p log2 p along ``axis``, with 0 log 0 = 0 (and a zero gradient there, not NaN)."""
    positive = p > 0
    safe = jnp.where(positive, p, 1.0)
    return -jnp.sum(jnp.where(positive, p * jnp.log(safe), 0.0), axis=axis) / LN2


def tree_norm(tree, squared: bool = False) -> jax.Array:
    """The Euclidean norm of all the leaves of a pytree together (``optax.tree_utils.tree_norm``)."""
    return optax.tree_utils.tree_norm(tree, squared=squared)
