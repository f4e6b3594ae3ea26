"""The exact Bayes predictor of the sticky Markov-chain task (SPEC §3, last paragraph).

The task is a hidden Markov model seen one step late. With symbols y_0 .. y_{T-1} (y_0 uniform, then
the chain P) and inputs x_t = mu[y_{t-1}] + eps_t, eps_t ~ N(0, I), the hidden state at position t is
y_{t-1} and it emits x_t. The forward algorithm, in log space::

    prior_1(a)  = 1 / C                                               p(y_0 = a)
    beta_t(a)   = prior_t(a) N(x_t; mu_a, I) / Z_t                     p(y_{t-1} = a | x_1..x_t)
    pred_t(c)   = sum_a beta_t(a) P[a, c]                              p(y_t = c | x_1..x_t)
    prior_{t+1} = pred_t

``pred_t`` is the predictive at position t: its cross-entropy on the targets y_t is the lowest loss
any causal model of x_1..x_t can reach in expectation, the floor a trained head is measured against.
Position t = 1..N of the task is row t - 1 of ``x (N, d)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_labels, check_weights, concrete

LN2 = math.log(2.0)


def _check_model(transition_matrix, embeddings, x, fn: str):
    """Validate ``P (C, C)``, ``mu (C, d)`` and ``x (N, d)``; returns ``(N, C, d)``."""
    if np.ndim(transition_matrix) != 2 or np.shape(transition_matrix)[0] != np.shape(transition_matrix)[1]:
        raise ValueError(f"{fn}: transition_matrix must be square (C, C), got shape {tuple(np.shape(transition_matrix))}")
    c = np.shape(transition_matrix)[0]
    if np.ndim(embeddings) != 2 or np.shape(embeddings)[0] != c:
        raise ValueError(
            f"{fn}: embeddings must have shape (C, d) with C = {c} (from transition_matrix {tuple(np.shape(transition_matrix))}), "
            f"got shape {tuple(np.shape(embeddings))}"
        )
    d = np.shape(embeddings)[1]
    if np.ndim(x) != 2 or np.shape(x)[1] != d:
        raise ValueError(
            f"{fn}: x must have shape (N, d) with d = {d} (from embeddings {tuple(np.shape(embeddings))}), "
            f"got shape {tuple(np.shape(x))}; use jax.vmap for batches"
        )
    if np.shape(x)[0] < 1:
        raise ValueError(f"{fn}: x must have at least one position, got shape {tuple(np.shape(x))}")
    for name, a in (("transition_matrix", transition_matrix), ("embeddings", embeddings), ("x", x)):
        if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
            raise TypeError(f"{fn}: {name} must be floating point, got dtype {jnp.result_type(a)}")
    pc = concrete(transition_matrix)
    if pc is not None:
        if not np.isfinite(pc).all() or (pc < 0).any():
            raise ValueError(f"{fn}: transition_matrix must be finite and non-negative")
        rows = pc.sum(axis=1)
        if not np.allclose(rows, 1.0, atol=1e-5):
            raise ValueError(f"{fn}: every row of transition_matrix must sum to 1, got row sums {np.round(rows, 6).tolist()}")
    return np.shape(x)[0], c, d


def _dtype(x):
    return jnp.result_type(x)


def _forward_algorithm(transition_matrix, embeddings, x, fn: str):
    """(log beta (N, C), log pred (N, C)) by one ``lax.scan``; see the module docstring."""
    _check_model(transition_matrix, embeddings, x, fn)
    dtype = _dtype(x)
    x = jnp.asarray(x, dtype)
    mu = jnp.asarray(embeddings, dtype)
    log_p = jnp.log(jnp.asarray(transition_matrix, dtype))  # log 0 = -inf is fine under logsumexp
    c = mu.shape[0]
    # log N(x_t; mu_a, I) up to terms constant in a, which cancel in the normalisation.
    log_lik = x @ mu.T - 0.5 * jnp.sum(mu * mu, axis=-1)  # (N, C)

    def step(log_prior, ll):
        log_post = log_prior + ll
        log_post = log_post - jax.nn.logsumexp(log_post)
        log_pred = jax.nn.logsumexp(log_post[:, None] + log_p, axis=0)
        return log_pred, (log_post, log_pred)

    init = jnp.full((c,), -jnp.log(jnp.asarray(c, dtype)), dtype)
    _, (log_beta, log_pred) = jax.lax.scan(step, init, log_lik)
    return log_beta, log_pred


def bayes_log_filter(transition_matrix, embeddings, x) -> jax.Array:
    """(N, C) log beta_t(a) = log p(y_{t-1} = a | x_1..x_t), the filtered posterior over the hidden
    symbol (the hypothesis the head must infer). Same arguments, dtype rules and cost as
    :func:`bayes_log_predictive`."""
    return _forward_algorithm(transition_matrix, embeddings, x, "bayes_log_filter")[0]


def bayes_log_predictive(transition_matrix, embeddings, x) -> jax.Array:
    """(N, C) log p(y_t = c | x_1..x_t) by the forward algorithm in log space (see module docstring).

    Args:
      transition_matrix: (C, C) row-stochastic P, P[a, c] = p(y_t = c | y_{t-1} = a).
      embeddings: (C, d) emission means mu; emissions are N(mu_a, I).
      x: (N, d) inputs of one sequence, floating point.
    Returns:
      (N, C) log-probabilities in the dtype of ``x`` (P and mu are cast to it). One ``lax.scan``
      over positions; jit- and vmap-compatible (vmap over ``x`` for many sequences).
    """
    return _forward_algorithm(transition_matrix, embeddings, x, "bayes_log_predictive")[1]


def bayes_predictive(transition_matrix, embeddings, x) -> jax.Array:
    """(N, C) p(y_t = c | x_1..x_t): the exact Bayes predictive of the sticky chain; rows sum to 1.

    The hidden state at position t is y_{t-1} (prior of y_0 uniform), emitting x_t ~ N(mu[y_{t-1}], I);
    the filter beta_t(a) = p(y_{t-1} = a | x_1..x_t) is propagated in log space under ``lax.scan``
    and the predictive is beta_t @ P. Shapes and dtype as :func:`bayes_log_predictive`.
    """
    return jnp.exp(bayes_log_predictive(transition_matrix, embeddings, x))


class BayesLoss(NamedTuple):
    """Cross-entropy of the Bayes predictive on one sequence (a pytree).

    Attributes:
      per_position: (N,) -log p(y_t | x_1..x_t) in nats.
      mean: scalar weighted mean over positions, nats.
      bits: the same mean in bits (mean / ln 2).
    """

    per_position: jax.Array
    mean: jax.Array
    bits: jax.Array


def bayes_loss(transition_matrix, embeddings, x, y, weights=None) -> BayesLoss:
    """The Bayes predictor's cross-entropy on targets ``y (N,)``: per position, mean (nats) and bits.

    L_Bayes = sum_t w_t (-log pred_t(y_t)) / sum_t w_t, w_t = 1 by default. This is the best loss
    any causal model can reach on the sequence in expectation; a head's gap to it is
    ``loss_fn(...) - bayes_loss(...).mean``.
    """
    n, c, _ = _check_model(transition_matrix, embeddings, x, "bayes_loss")
    check_labels(y, n, c, "bayes_loss")
    check_weights(weights, n, "bayes_loss")
    log_pred = bayes_log_predictive(transition_matrix, embeddings, x)
    per_pos = -jnp.take_along_axis(log_pred, jnp.asarray(y)[:, None], axis=-1)[:, 0]
    w = jnp.full((n,), 1.0 / n, per_pos.dtype) if weights is None else jnp.asarray(weights, per_pos.dtype) / jnp.sum(
        jnp.asarray(weights, per_pos.dtype)
    )
    mean = jnp.sum(w * per_pos)
    return BayesLoss(per_position=per_pos, mean=mean, bits=mean / LN2)


def bayes_entropy(transition_matrix, embeddings, x) -> jax.Array:
    """(N,) entropy in nats of the Bayes predictive at each position, H_t = -sum_c pred_t(c) log pred_t(c).

    Low where the filter is confident about y_{t-1} (the chain's row entropy, about H_min), high
    where x_t is ambiguous. Divide by ln 2 for bits.
    """
    log_pred = bayes_log_predictive(transition_matrix, embeddings, x)
    return _entropy(log_pred)


def _entropy(log_p):
    p = jnp.exp(log_p)
    return -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, log_p, 0.0), 0.0), axis=-1)


def bayes_filter_entropy(transition_matrix, embeddings, x) -> jax.Array:
    """(N,) entropy in nats of the filtered posterior beta_t over y_{t-1}: 0 where the input x_t
    identifies the previous symbol, up to log C where it says nothing."""
    return _entropy(bayes_log_filter(transition_matrix, embeddings, x))
