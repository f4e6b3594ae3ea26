"""A random head problem shared by the tests of the fused passes (blocked and Pallas)."""

import jax
import jax.numpy as jnp

import gradattn as ga


def problem(n, d_in=5, d_k=3, d_v=4, n_classes=6, seed=0, dtype=jnp.float64, weighted=False, scale=0.7):
    """``(params, x, y, weights)`` of one random sequence of N positions (weights None unless ``weighted``)."""
    k_p, k_x, k_y, k_w = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = ga.init_head(k_p, d_in, d_k, d_v, n_classes, scale=scale, dtype=dtype)
    x = jax.random.normal(k_x, (n, d_in), dtype)
    y = jax.random.randint(k_y, (n,), 0, n_classes)
    w = jax.random.uniform(k_w, (n,), dtype) if weighted else None
    return params, x, y, w
