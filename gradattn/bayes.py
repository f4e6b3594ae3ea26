"""The exact Bayes predictor of the sticky Markov-chain task, and the forward algorithm it runs on.

The task is a hidden Markov model seen one step late. With symbols y_0 .. y_{T-1} (y_0 uniform, then
the chain P) and inputs x_t = mu[y_{t-1}] + sigma eps_t, eps_t ~ N(0, I), the hidden state at
position t is y_{t-1} and it emits x_t. The forward algorithm, in log space::

    prior_1(a)  = 1 / C                                               p(y_0 = a)
    beta_t(a)   = prior_t(a) N(x_t; mu_a, sigma^2 I) / Z_t             p(y_{t-1} = a | x_1..x_t)
    pred_t(c)   = sum_a beta_t(a) P[a, c]                              p(y_t = c | x_1..x_t)
    prior_{t+1} = pred_t

``pred_t`` is the predictive at position t: its cross-entropy on the targets y_t is the lowest loss
any causal model of x_1..x_t can reach in expectation, the floor a trained head is measured against.
Position t = 1..N of the task is row t - 1 of ``x (N, d)``. sigma is ``noise_std`` (1 by default).

:func:`forward_algorithm` is the same recursion for any hidden Markov model given its per-position
log-likelihoods; :mod:`gradattn.tasks.hmm` uses it with discrete emissions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_labels, check_number, check_weights, concrete, is_traced
from gradattn._math import LN2, entropy_from_log


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


def _check_noise_std(noise_std, fn: str):
    """A concrete ``noise_std`` must be a finite number > 0; a traced one is trusted."""
    if is_traced(noise_std):
        return noise_std
    return check_number("noise_std", noise_std, fn, minimum=0.0, exclusive_minimum=True)


def forward_algorithm(log_initial, log_transition, log_likelihood):
    """The forward (filtering) recursion of a hidden Markov model, in log space, as one ``lax.scan``.

    For hidden states s_t with p(s_1) = initial, p(s_{t+1} = b | s_t = a) = A[a, b] and per-position
    evidence l_t(a) = log p(obs_t | s_t = a) (up to a constant per position)::

        log beta_t  = log prior_t + l_t - logsumexp(.)      beta_t(a) = p(s_t = a | obs_1..obs_t)
        log prior_{t+1}(b) = logsumexp_a(log beta_t(a) + log A[a, b])

    Args:
      log_initial: (S,) log p(s_1).   log_transition: (S, S) log A (-inf entries allowed).
      log_likelihood: (N, S) l_t(a).
    Returns:
      ``(log_beta (N, S), log_next (N, S))`` with log_next[t] = log p(s_{t+1} | obs_1..obs_t).
    No input checks (callers validate); jit- and vmap-compatible.
    """

    def step(log_prior, ll):
        log_post = log_prior + ll
        log_post = log_post - jax.nn.logsumexp(log_post)
        log_next = jax.nn.logsumexp(log_post[:, None] + log_transition, axis=0)
        return log_next, (log_post, log_next)

    _, (log_beta, log_next) = jax.lax.scan(step, log_initial, log_likelihood)
    return log_beta, log_next


def _forward_algorithm(transition_matrix, embeddings, x, noise_std, fn: str):
    """(log beta (N, C), log pred (N, C)) of the sticky chain; see the module docstring."""
    _check_model(transition_matrix, embeddings, x, fn)
    noise_std = _check_noise_std(noise_std, fn)
    dtype = jnp.result_type(x)
    x = jnp.asarray(x, dtype)
    mu = jnp.asarray(embeddings, dtype)
    log_p = jnp.log(jnp.asarray(transition_matrix, dtype))  # log 0 = -inf is fine under logsumexp
    c = mu.shape[0]
    # log N(x_t; mu_a, sigma^2 I) up to terms constant in a, which cancel in the normalisation.
    log_lik = (x @ mu.T - 0.5 * jnp.sum(mu * mu, axis=-1)) / jnp.asarray(noise_std, dtype) ** 2  # (N, C)
    init = jnp.full((c,), -jnp.log(jnp.asarray(c, dtype)), dtype)
    # The hidden state of position t + 1 is the target y_t, so the next-state predictive is pred_t.
    return forward_algorithm(init, log_p, log_lik)


def bayes_log_filter(transition_matrix, embeddings, x, *, noise_std=1.0) -> jax.Array:
    """(N, C) log beta_t(a) = log p(y_{t-1} = a | x_1..x_t), the filtered posterior over the hidden
    symbol (the hypothesis the head must infer). Same arguments, dtype rules and cost as
    :func:`bayes_log_predictive`."""
    return _forward_algorithm(transition_matrix, embeddings, x, noise_std, "bayes_log_filter")[0]


def bayes_log_predictive(transition_matrix, embeddings, x, *, noise_std=1.0) -> jax.Array:
    """(N, C) log p(y_t = c | x_1..x_t) by the forward algorithm in log space (see module docstring).

    Args:
      transition_matrix: (C, C) row-stochastic P, P[a, c] = p(y_t = c | y_{t-1} = a).
      embeddings: (C, d) emission means mu; emissions are N(mu_a, noise_std^2 I).
      x: (N, d) inputs of one sequence, floating point.
      noise_std: sigma > 0, the emission noise's standard deviation (1 in the paper).
    Returns:
      (N, C) log-probabilities in the dtype of ``x`` (P and mu are cast to it). One ``lax.scan``
      over positions; jit- and vmap-compatible (vmap over ``x`` for many sequences).
    """
    return _forward_algorithm(transition_matrix, embeddings, x, noise_std, "bayes_log_predictive")[1]


def bayes_predictive(transition_matrix, embeddings, x, *, noise_std=1.0) -> jax.Array:
    """(N, C) p(y_t = c | x_1..x_t): the exact Bayes predictive of the sticky chain; rows sum to 1.

    The hidden state at position t is y_{t-1} (prior of y_0 uniform), emitting x_t ~ N(mu[y_{t-1}], sigma^2 I);
    the filter beta_t(a) = p(y_{t-1} = a | x_1..x_t) is propagated in log space under ``lax.scan``
    and the predictive is beta_t @ P. Shapes and dtype as :func:`bayes_log_predictive`.
    """
    return jnp.exp(bayes_log_predictive(transition_matrix, embeddings, x, noise_std=noise_std))


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


def bayes_loss(transition_matrix, embeddings, x, y, weights=None, *, noise_std=1.0) -> BayesLoss:
    """The Bayes predictor's cross-entropy on targets ``y (N,)``: per position, mean (nats) and bits.

    L_Bayes = sum_t w_t (-log pred_t(y_t)) / sum_t w_t, w_t = 1 by default. This is the best loss
    any causal model can reach on the sequence in expectation; a head's gap to it is
    ``loss_fn(...) - bayes_loss(...).mean``.
    """
    n, c, _ = _check_model(transition_matrix, embeddings, x, "bayes_loss")
    check_labels(y, n, c, "bayes_loss")
    check_weights(weights, n, "bayes_loss")
    log_pred = bayes_log_predictive(transition_matrix, embeddings, x, noise_std=noise_std)
    return loss_from_log_predictive(log_pred, y, weights)


def loss_from_log_predictive(log_pred, y, weights=None) -> BayesLoss:
    """The cross-entropy of a log-predictive ``(N, C)`` on targets ``y (N,)`` (checked by the caller)."""
    n = log_pred.shape[0]
    per_pos = -jnp.take_along_axis(log_pred, jnp.asarray(y)[:, None], axis=-1)[:, 0]
    w = jnp.full((n,), 1.0 / n, per_pos.dtype) if weights is None else jnp.asarray(weights, per_pos.dtype) / jnp.sum(
        jnp.asarray(weights, per_pos.dtype)
    )
    mean = jnp.sum(w * per_pos)
    return BayesLoss(per_position=per_pos, mean=mean, bits=mean / LN2)


def bayes_entropy(transition_matrix, embeddings, x, *, noise_std=1.0) -> jax.Array:
    """(N,) entropy in nats of the Bayes predictive at each position, H_t = -sum_c pred_t(c) log pred_t(c).

    Low where the filter is confident about y_{t-1} (the chain's row entropy, about H_min), high
    where x_t is ambiguous. Divide by ln 2 for bits.
    """
    log_pred = bayes_log_predictive(transition_matrix, embeddings, x, noise_std=noise_std)
    return entropy_from_log(log_pred)


def bayes_filter_entropy(transition_matrix, embeddings, x, *, noise_std=1.0) -> jax.Array:
    """(N,) entropy in nats of the filtered posterior beta_t over y_{t-1}: 0 where the input x_t
    identifies the previous symbol, up to log C where it says nothing."""
    return entropy_from_log(bayes_log_filter(transition_matrix, embeddings, x, noise_std=noise_std))
