"""Cross-entropy against hard labels or soft targets, with positions weighted or ignored, and its
gradient with respect to the logits written out.

One family for every model and task: at position i of a sequence with logits z_i (C,), the target is
either a class label y_i or a distribution p_i over the C classes (the exact posterior of a task,
as the wind-tunnel tasks train against), and the loss is the weighted mean

    L = sum_i w_i l_i / sum_i w_i,   l_i = -sum_c p_ic log softmax(z_i)_c

(a label is the one-hot p_i; w_i = 0 ignores position i, ``weights=None`` is the plain mean). Its
gradient is the output error of :mod:`gradattn.laws`, with the target's distribution in place of
the one-hot:

    dL/dz_i = w_i (softmax(z_i) - p_i) / sum_k w_k          (:func:`cross_entropy_error`)

Against a soft target, L exceeds the mean entropy of the targets by the mean KL(p_i || q_i); the
loss is minimal (its gradient 0) exactly where the model's q_i equal the p_i.

A batch of sequences is ``jax.vmap`` over these (the mean over sequences of each one's loss, as
:func:`gradattn.training.make_step` averages).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_array, check_labels, check_weights
from gradattn.head import label_factor, normalised_weights, token_losses


def soft_token_losses(logits: jax.Array, p: jax.Array) -> jax.Array:
    """(N,) per-position cross-entropy -sum_c p_ic log softmax(z_i)_c in nats against target
    distributions ``p (N, C)`` (a zero-probability class contributes 0, whatever the model's log)."""
    logq = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.where(p > 0, p * logq, 0.0), axis=-1)


def _check(logits, targets, weights, fn: str) -> bool:
    """Validate ``logits (N, C)``, ``targets`` (labels (N,) or distributions (N, C)) and ``weights``;
    returns whether the targets are soft."""
    check_array("logits", logits, fn)
    if np.ndim(logits) != 2 or not jnp.issubdtype(jnp.result_type(logits), jnp.floating):
        raise ValueError(f"{fn}: logits must be a floating (N, C) array (one sequence; jax.vmap for batches), "
                         f"got shape {tuple(np.shape(logits))} and dtype {jnp.result_type(logits)}")
    n, n_classes = np.shape(logits)
    check_array("targets", targets, fn)
    soft = jnp.issubdtype(jnp.result_type(targets), jnp.floating)
    if soft:
        if tuple(np.shape(targets)) != (n, n_classes):
            raise ValueError(f"{fn}: soft targets must have the logits' shape ({n}, {n_classes}), got shape "
                             f"{tuple(np.shape(targets))}")
    else:
        check_labels(targets, n, n_classes, fn.replace("targets", "y"))
    check_weights(weights, n, fn)
    return soft


def cross_entropy(logits: jax.Array, targets: jax.Array, weights=None) -> jax.Array:
    """The weighted mean cross-entropy of one sequence (scalar, nats; see the module docstring).

    Args:
      logits: (N, C) floating.
      targets: (N,) integer labels in [0, C), or (N, C) floating distributions (rows summing to 1,
        as the caller's exact posterior gives them: not checked, they may be traced).
      weights: optional (N,) non-negative position weights; 0 ignores a position.
    """
    soft = _check(logits, targets, weights, "cross_entropy")
    n = np.shape(logits)[0]
    losses = soft_token_losses(logits, targets) if soft else token_losses(logits, targets)
    return jnp.sum(normalised_weights(weights, n, jnp.result_type(logits)) * losses)


def cross_entropy_error(logits: jax.Array, targets: jax.Array, weights=None) -> jax.Array:
    """(N, C) dL/dz of :func:`cross_entropy`: w_i (softmax(z_i) - p_i) / sum_k w_k, with p_i the
    target distribution (the one-hot of a label; a label outside [0, C) gives a NaN row)."""
    soft = _check(logits, targets, weights, "cross_entropy_error")
    n, n_classes = np.shape(logits)
    dtype = jnp.result_type(logits)
    w = normalised_weights(weights, n, dtype)
    if soft:
        p = jnp.asarray(targets, dtype)
    else:
        p = jax.nn.one_hot(targets, n_classes, dtype=dtype)
        w = w * label_factor(targets, n_classes, dtype)
    return w[:, None] * (jax.nn.softmax(logits, axis=-1) - p)
