"""Verification: each first-order law against autodiff, in float64, on a random instance.

:func:`law_pairs` gives, for every law of docs/theory.md, the law's value and the autodiff value it
must equal; :func:`laws_check_errors` reduces them to relative errors (what ``gradattn laws-check``
prints and what the tests hold below 1e-9). The deep model's per-head check is
:func:`gradattn.deep.deep_law_errors`, built on :func:`relative_error`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradattn import laws
from gradattn._checks import MAX_HEAD_SIZE, check_bool, check_int, check_prng_key
from gradattn.grads.blocked import blocked_loss_and_grads
from gradattn.head import causal_mask, dense_loss, forward, init_head, normalised_weights, token_losses


def relative_error(a, r, floor=None) -> float:
    """``max |a - r| / max |r|`` as a Python float, the denominator kept above ``floor`` (default:
    the tiny of ``r``'s dtype; a larger floor measures an all-zero ``r`` on that scale)."""
    floor = jnp.finfo(jnp.result_type(r)).tiny if floor is None else floor
    return float(jnp.max(jnp.abs(a - r)) / jnp.maximum(jnp.max(jnp.abs(r)), floor))


def random_instance(key, *, n, d_in, d_k, d_v, n_classes):
    """A random float64 head problem ``(params, x, y, weights)`` (weights in [0.1, 1]; call under x64)."""
    f64 = jnp.float64
    k_p, k_x, k_y, k_w = jax.random.split(key, 4)
    params = init_head(k_p, d_in, d_k, d_v, n_classes, scale=0.7, dtype=f64)
    x = jax.random.normal(k_x, (n, d_in), f64)
    y = jax.random.randint(k_y, (n,), 0, n_classes)
    w = jax.random.uniform(k_w, (n,), f64, 0.1, 1.0)
    return params, x, y, w


def law_pairs(params, x, y, w=None, causal: bool = True) -> dict:
    """``{law name: (law value, autodiff value)}`` on one problem.

    Each law is paired with ``jax.grad`` of the loss written as a function of exactly the quantity
    it differentiates with respect to (logits, contexts, alpha, scores, values, queries, keys, W_O),
    so a wrong law cannot hide behind a right total; the weight gradients of the blocked pass are
    paired with ``jax.grad(gradattn.head.dense_loss)``. Entries j > i of the (N, N) pairs are zeroed
    when causal (they are not part of the loss). Pure and jit-able (``causal`` static).
    """
    n, d_k = x.shape[0], params.w_q.shape[1]
    wn = normalised_weights(w, n, x.dtype)
    out = forward(params, x, causal)
    mask = causal_mask(n) if causal else jnp.ones((n, n), bool)
    sqrt_dk = jnp.sqrt(jnp.asarray(d_k, x.dtype))

    def from_logits(z):
        return jnp.sum(wn * token_losses(z, y))

    def from_alpha(a, v):
        return from_logits((a @ v) @ params.w_o)

    def from_scores(s):
        return from_alpha(jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1), out.v)

    def from_qk(q, k):
        return from_scores(q @ k.T / sqrt_dk)

    e = laws.output_error(out, y, w)
    u = laws.upstream_grad(params, out, y, w)
    b = laws.compatibility(u, out.v)
    ds = laws.routing_grad(out.alpha, b)
    ds_auto = jnp.where(mask, jax.grad(from_scores)(out.scores), 0)
    law = {
        "output_error e = dL/dz": (e, jax.grad(from_logits)(out.logits)),
        "upstream u = dL/dg": (u, jax.grad(lambda g: from_logits(g @ params.w_o))(out.context)),
        "compatibility b = dL/dalpha": (jnp.where(mask, b, 0), jnp.where(mask, jax.grad(from_alpha)(out.alpha, out.v), 0)),
        "routing dL/ds": (ds, ds_auto),
        "value dL/dv": (laws.value_grad(out.alpha, u), jax.grad(from_alpha, argnums=1)(out.alpha, out.v)),
        "query dL/dq": (laws.query_grad(ds, out.k), jax.grad(from_qk, argnums=0)(out.q, out.k)),
        "key dL/dk": (laws.key_grad(ds, out.q), jax.grad(from_qk, argnums=1)(out.q, out.k)),
        "advantage -alpha a = dL/ds": (jnp.where(mask, -out.alpha * laws.advantage(out.alpha, b), 0), ds_auto),
        "output weight dL/dW_O = G^T e": (laws.output_weight_grad(out.context, e),
                                          jax.grad(lambda wo: from_logits(out.context @ wo))(params.w_o)),
    }
    auto = jax.grad(dense_loss)(params, x, y, w, causal)
    _, blocked = blocked_loss_and_grads(params, x, y, w, causal)
    for name in ("w_q", "w_k", "w_v", "w_o"):
        law[f"dL/d{name.upper()}"] = (getattr(blocked, name), getattr(auto, name))
    return law


def laws_check_errors(key=None, n: int = 37, d_in: int = 6, d_k: int = 4, d_v: int = 5, n_classes: int = 3, causal: bool = True):
    """Worst relative error of each first-order law against autodiff, in float64, on a random instance.

    For each law, ``max |law - autodiff| / max |autodiff|``, where autodiff differentiates the loss
    with respect to that intermediate (logits, contexts, alpha, scores, V, Q, K) or, for the weight
    gradients, ``jax.grad(gradattn.head.dense_loss)`` (:func:`law_pairs` on :func:`random_instance`).
    Random position weights are used.
    Returns ``{law name: relative error}`` (Python floats). ``n`` and the head sizes are positive
    integers of at most 4096 (``n_classes`` at least 2), ``causal`` a bool, ``key`` a PRNG key.
    """
    fn = "laws_check_errors"
    key = jax.random.key(0) if key is None else key
    check_prng_key("key", key, fn)
    n, d_in, d_k, d_v = (check_int(name, val, fn, minimum=1, maximum=MAX_HEAD_SIZE)
                         for name, val in (("n", n), ("d_in", d_in), ("d_k", d_k), ("d_v", d_v)))
    n_classes = check_int("n_classes", n_classes, fn, minimum=2, maximum=MAX_HEAD_SIZE)
    causal = check_bool("causal", causal, fn)
    with jax.enable_x64(True):
        instance = random_instance(key, n=n, d_in=d_in, d_k=d_k, d_v=d_v, n_classes=n_classes)
        pairs = jax.jit(law_pairs, static_argnames="causal")(*instance, causal=causal)
        return {name: relative_error(a, r) for name, (a, r) in pairs.items()}
