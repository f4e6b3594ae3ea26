"""A hidden Markov model filtering task: predict the next observation of a random discrete HMM.

K hidden states with transition rows A[k] ~ Dirichlet(alpha 1_K) and emission rows
B[k] ~ Dirichlet(beta 1_V) over V observed symbols, drawn once from ``task_seed`` and shared by
every sample. One sequence::

    z_0 ~ pi (the stationary distribution of A),   z_t ~ A[z_{t-1}],   o_t ~ B[z_t],   t = 0 .. T-1
    x_t = onehot(o_t) (V,),   target y_t = o_{t+1},                                      t = 0 .. T-2

so one sequence of length T gives N = T - 1 positions. Unlike the sticky chain, whose inputs nearly
name the hidden state, one observation says little about z_t here: the posterior stays uncertain
and the exact predictive depends on the whole history through the forward algorithm::

    beta_t(k)   = p(z_t = k | o_0..o_t)                       (filter)
    pred_t(c)   = sum_{k, k'} beta_t(k) A[k, k'] B[k', c]      p(o_{t+1} = c | o_0..o_t)

Starting from the stationary distribution makes every position's marginal the same, so ``h_min``
(the loss of an oracle that knows z_t) is the expected loss per position of that oracle.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import MAX_SEED, check_labels, check_prng_key, check_weights, concrete
from gradattn._config import check_fields, option
from gradattn._math import entropy_from_log, entropy_nats
from gradattn.tasks.base import BayesLoss, TaskDataclass, check_sequence, forward_algorithm, loss_from_log_predictive


def stationary_distribution(transition_matrix: np.ndarray) -> np.ndarray:
    """pi (K,) float64 with pi A = pi and sum pi = 1, by least squares on the stacked system."""
    a = np.asarray(transition_matrix, np.float64)
    k = a.shape[0]
    system = np.vstack([a.T - np.eye(k), np.ones((1, k))])
    rhs = np.concatenate([np.zeros(k), [1.0]])
    pi = np.linalg.lstsq(system, rhs, rcond=None)[0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


@dataclasses.dataclass(frozen=True)
class DirichletHMM(TaskDataclass):
    """Next-observation prediction on a random discrete hidden Markov model (see the module docstring).

    Attributes:
      n_states: K, the number of hidden states, in [1, 1024].
      n_obs: V, the number of observed symbols (the input dimension and the number of classes), in
        [2, 1024].
      seq_len: T, the length of the sequence, in [2, 65537]; a sample has N = T - 1 positions.
      task_seed: seed of the transition and emission matrices (``numpy.random.default_rng``), in
        [0, 2^64) as every seed.
      transition_concentration: alpha > 0 of the Dirichlet transition rows (small: near-deterministic
        transitions; large: near-uniform ones).
      emission_concentration: beta > 0 of the Dirichlet emission rows (small: observations that
        nearly name the state; large: observations that say little).
    """

    n_states: int = option(5, help="number of hidden states K", minimum=1, maximum=1024)
    n_obs: int = option(8, help="number of observed symbols V (the input size and the number of classes)",
                        minimum=2, maximum=1024)
    seq_len: int = option(500, help="sequence length T (N = T - 1 positions)", minimum=2, maximum=65_537)
    task_seed: int = option(0, help="numpy seed of the transition and emission matrices", minimum=0, maximum=MAX_SEED)
    transition_concentration: float = option(1.0, help="Dirichlet concentration alpha of the transition rows",
                                             minimum=0.0, exclusive_minimum=True)
    emission_concentration: float = option(1.0, help="Dirichlet concentration beta of the emission rows",
                                           minimum=0.0, exclusive_minimum=True)

    def __post_init__(self):
        fn = "DirichletHMM"
        check_fields(self, fn)  # the bounds declared with each field; then what they cannot say:
        for name, m in (("transition_matrix", self.transition_matrix), ("emission_matrix", self.emission_matrix)):
            if not np.isfinite(m).all() or not np.allclose(m.sum(axis=1), 1.0):
                raise ValueError(f"{fn}: the Dirichlet draw of {name} is degenerate at these concentrations; raise them")

    @cached_property
    def _matrices(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.task_seed)
        a = rng.dirichlet(np.full(self.n_states, self.transition_concentration), size=self.n_states)
        b = rng.dirichlet(np.full(self.n_obs, self.emission_concentration), size=self.n_states)
        for m in (a, b):
            m.setflags(write=False)
        return a, b

    @property
    def transition_matrix(self) -> np.ndarray:
        """A (K, K) float64, read-only; A[k, k'] = p(z_t = k' | z_{t-1} = k)."""
        return self._matrices[0]

    @property
    def emission_matrix(self) -> np.ndarray:
        """B (K, V) float64, read-only; B[k, c] = p(o_t = c | z_t = k)."""
        return self._matrices[1]

    @cached_property
    def initial_distribution(self) -> np.ndarray:
        """pi (K,) float64, the stationary distribution of A (the law of z_0)."""
        pi = stationary_distribution(self.transition_matrix)
        pi.setflags(write=False)
        return pi

    @property
    def d_in(self) -> int:
        """V, both the input dimension (one-hot observations) and the number of classes (the next observation)."""
        return self.n_obs

    n_classes = d_in

    @cached_property
    def h_min(self) -> float:
        """sum_k pi(k) H((A B)[k]) in nats: the expected loss per position of an oracle that knows
        the hidden state z_t (its predictive of o_{t+1} is row z_t of A B). A floor below the Bayes
        predictor's loss, which must infer z_t from the observations."""
        return float(self.initial_distribution @ entropy_nats(self.transition_matrix @ self.emission_matrix, xp=np))

    def sample(self, key: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """One sequence: one-hot ``x (T-1, V)`` in ``dtype`` and targets ``y (T-1,)`` int32. Pure; jit/vmap-able.

        The states and observations are drawn in float32 whatever ``dtype`` is, so a key gives the
        same sequence in every x64 mode.
        """
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"DirichletHMM.sample: dtype must be floating point, got {dtype}")
        check_prng_key("key", key, "DirichletHMM.sample")
        k_first, k_chain, k_obs = jax.random.split(key, 3)
        with np.errstate(divide="ignore"):
            log_a = jnp.asarray(np.log(self.transition_matrix), jnp.float32)
            log_b = jnp.asarray(np.log(self.emission_matrix), jnp.float32)
            log_pi = jnp.asarray(np.log(self.initial_distribution), jnp.float32)
        z0 = jax.random.categorical(k_first, log_pi).astype(jnp.int32)

        def next_state(prev, k):
            nxt = jax.random.categorical(k, log_a[prev]).astype(jnp.int32)
            return nxt, nxt

        _, rest = jax.lax.scan(next_state, z0, jax.random.split(k_chain, self.seq_len - 1))
        states = jnp.concatenate([z0[None], rest])
        obs = jax.random.categorical(k_obs, log_b[states], axis=-1).astype(jnp.int32)
        return jax.nn.one_hot(obs[:-1], self.n_obs, dtype=dtype), obs[1:]

    def _check_x(self, x, fn: str) -> int:
        """Validate one-hot ``x (N, V)``, N >= 1. Returns N."""
        n = check_sequence(x, self.n_obs, fn, what="one-hot observations")
        xc = concrete(x)
        if xc is not None and not (np.isin(xc, (0.0, 1.0)).all() and (xc.sum(axis=1) == 1).all()):
            raise ValueError(f"{fn}: x (shape {xc.shape}) must be one-hot rows (the task's inputs)")
        return n

    def _forward(self, x, fn: str):
        """(log beta (N, K), log pred (N, V)) for one-hot ``x``."""

        self._check_x(x, fn)
        dtype = jnp.result_type(x)
        log_a = jnp.log(jnp.asarray(self.transition_matrix, dtype))
        log_b = jnp.log(jnp.asarray(self.emission_matrix, dtype))
        log_pi = jnp.log(jnp.asarray(self.initial_distribution, dtype))
        obs = jnp.argmax(x, axis=-1)
        log_beta, log_next = forward_algorithm(log_pi, log_a, log_b.T[obs])
        log_pred = jax.nn.logsumexp(log_next[:, :, None] + log_b[None, :, :], axis=1)
        return log_beta, log_pred

    def bayes_log_predictive(self, x: jax.Array) -> jax.Array:
        """(N, V) log p(o_{t+1} = c | o_0..o_t) by the forward algorithm, in the dtype of ``x``."""
        return self._forward(x, "DirichletHMM.bayes_log_predictive")[1]

    def bayes_predictive(self, x: jax.Array) -> jax.Array:
        """(N, V) exact predictive p(o_{t+1} = c | o_0..o_t); rows sum to 1. jit/vmap-able."""
        return jnp.exp(self._forward(x, "DirichletHMM.bayes_predictive")[1])

    def bayes_log_filter(self, x: jax.Array) -> jax.Array:
        """(N, K) log beta_t(k) = log p(z_t = k | o_0..o_t)."""
        return self._forward(x, "DirichletHMM.bayes_log_filter")[0]

    def bayes_loss(self, x: jax.Array, y: jax.Array, weights=None) -> BayesLoss:
        """The Bayes predictor's cross-entropy on ``(x, y)``: a :class:`~gradattn.tasks.base.BayesLoss`."""

        fn = "DirichletHMM.bayes_loss"
        n = self._check_x(x, fn)
        check_labels(y, n, self.n_obs, fn)
        check_weights(weights, n, fn)
        return loss_from_log_predictive(self._forward(x, fn)[1], y, weights)

    def bayes_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the Bayes predictive at each position."""

        return entropy_from_log(self._forward(x, "DirichletHMM.bayes_entropy")[1])

    def bayes_filter_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the posterior over the hidden state z_t at each position."""

        return entropy_from_log(self._forward(x, "DirichletHMM.bayes_filter_entropy")[0])
