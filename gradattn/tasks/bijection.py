"""Bijection elimination: a random bijection of k symbols, revealed pair by pair in context.

Each sample draws its own bijection pi of {0..k-1} and its own order s_1..s_k of the k inputs (two
independent uniform permutations). Position t = 1..k queries s_t and shows the pair revealed at the
previous position::

    x_t = [ onehot(s_t) | onehot(s_{t-1}) | onehot(pi(s_{t-1})) ]     (3k,), the pair blocks zero at t = 1
    y_t = pi(s_t)

so one sample has N = k positions and d_in = 3k; the last pair (s_k, pi(s_k)) is never shown.

Nothing in x_1..x_t says anything about pi(s_t) except which outputs are taken: s_t has not been
queried before, and given the t - 1 revealed pairs the rest of pi is a uniform bijection between the
k - t + 1 unrevealed inputs and the k - t + 1 unrevealed outputs. The exact predictive is therefore

    p(y_t = c | x_1..x_t) = 1 / (k - t + 1)   for c not among pi(s_1..s_{t-1}),   0 otherwise,

with entropy log(k - t + 1) at position t (1-based): log k at the first position, 0 at the last. The
Bayes loss of every sample is the same number, log(k!) / k.

No channel beyond the three blocks is needed for one causal head to express the elimination: the
query block sums to 1 at every position (a constant feature), the pair blocks sum to 0 exactly at
t = 1 (a start marker), and attending uniformly over the prefix and reading the output block through
a large negative W_O gives logits that push the revealed outputs down; their probability goes to 0
and the others' to 1 / (k - t + 1) as the read-out grows.

The hidden state is the bijection pi itself. Given x_1..x_t the posterior over pi is uniform over the
(k - t + 1)! bijections that agree with the revealed pairs, so its entropy, the filter entropy, is
log((k - t + 1)!); the predictive entropy log(k - t + 1) is that of one of its outputs.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from gradattn._checks import check_labels, check_prng_key, check_weights, concrete
from gradattn._config import check_fields, option
from gradattn.tasks.base import BayesLoss, TaskDataclass, check_sequence, loss_from_log_predictive

MAX_SYMBOLS = 1024


def _check_permutation(name: str, a, k: int, fn: str) -> None:
    """``a`` must be an integer array of shape (k,); a concrete one must be a permutation of 0..k-1."""
    if np.shape(a) != (k,):
        raise ValueError(f"{fn}: {name} must have shape ({k},), got shape {tuple(np.shape(a))}")
    if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
        raise TypeError(f"{fn}: {name} must hold integers, got dtype {jnp.result_type(a)}")
    ac = concrete(a)
    if ac is not None and not np.array_equal(np.sort(ac), np.arange(k)):
        raise ValueError(f"{fn}: {name} must be a permutation of 0..{k - 1}, got {ac.tolist()}")


@dataclasses.dataclass(frozen=True)
class BijectionElimination(TaskDataclass):
    """Predict pi(s_t) for a random bijection pi revealed pair by pair (see the module docstring).

    Attributes:
      n_symbols: k, the number of symbols (inputs and outputs of pi), in [2, 1024]. One sample has
        N = k positions, d_in = 3k inputs and k classes.
    """

    n_symbols: int = option(8, help="number of symbols k (N = k positions, d_in = 3k)", minimum=2, maximum=MAX_SYMBOLS)

    def __post_init__(self):
        check_fields(self, "BijectionElimination")

    @property
    def d_in(self) -> int:
        """Input dimension: 3k (query symbol, previous input, previous output; each one-hot)."""
        return 3 * self.n_symbols

    @property
    def n_classes(self) -> int:
        """k, which is also the number of classes (the outputs of pi), the sequence length T (one
        sample queries every input once) and the number N of (x, y) positions in one sample."""
        return self.n_symbols

    seq_len = n_positions = n_classes

    @property
    def h_min(self) -> float:
        """0: an oracle that knows pi reads y_t = pi(s_t) off the query symbol in x_t."""
        return 0.0

    @cached_property
    def entropy_profile(self) -> np.ndarray:
        """(k,) float64, read-only: log(k - t + 1) for t = 1..k, the exact predictive entropy per
        position (nats); also the Bayes predictor's loss at each position of every sample."""
        h = np.log(np.arange(self.n_symbols, 0, -1, dtype=np.float64))
        h.setflags(write=False)
        return h

    @property
    def bayes_loss_value(self) -> float:
        """log(k!) / k in nats: the Bayes loss of every sample (the mean of :attr:`entropy_profile`)."""
        return math.lgamma(self.n_symbols + 1) / self.n_symbols

    def encode(self, order: jax.Array, bijection: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """The sample of a given query order and bijection: ``x (k, 3k)`` in ``dtype``, ``y (k,)`` int32.

        Args:
          order: (k,) integer permutation, ``order[t - 1] = s_t``, the input queried at position t.
          bijection: (k,) integer permutation, ``bijection[a] = pi(a)``.
          dtype: floating dtype of ``x``.
        Pure and jit/vmap-able; concrete arguments are checked to be permutations.
        """
        fn = "BijectionElimination.encode"
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{fn}: dtype must be floating point, got {dtype}")
        k = self.n_symbols
        _check_permutation("order", order, k, fn)
        _check_permutation("bijection", bijection, k, fn)
        s = jnp.asarray(order, jnp.int32)
        y = jnp.asarray(bijection, jnp.int32)[s]
        shown = (jnp.arange(k) > 0)[:, None].astype(dtype)  # the pair blocks are zero at t = 1
        prev_in = jnp.roll(jax.nn.one_hot(s, k, dtype=dtype), 1, axis=0) * shown
        prev_out = jnp.roll(jax.nn.one_hot(y, k, dtype=dtype), 1, axis=0) * shown
        x = jnp.concatenate([jax.nn.one_hot(s, k, dtype=dtype), prev_in, prev_out], axis=1)
        return x, y

    def sample(self, key: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """One sample: ``x (k, 3k)`` in ``dtype`` and targets ``y (k,)`` int32. Pure; jit/vmap-able.

        ``key`` splits in two: ``jax.random.permutation`` of ``arange(k)`` (int32) under the first
        gives the query order, under the second the bijection; then :meth:`encode`. The draws do not
        depend on ``dtype`` or on the x64 mode.
        """
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"BijectionElimination.sample: dtype must be floating point, got {dtype}")
        check_prng_key("key", key, "BijectionElimination.sample")
        k_order, k_pi = jax.random.split(key)
        symbols = jnp.arange(self.n_symbols, dtype=jnp.int32)
        return self.encode(jax.random.permutation(k_order, symbols), jax.random.permutation(k_pi, symbols), dtype)

    def _check_x(self, x, fn: str) -> int:
        """Validate ``x (N, 3k)``, 1 <= N <= k; a concrete one must be (a prefix of) a sample. Returns N."""
        k = self.n_symbols
        n = check_sequence(x, 3 * k, fn, what="one sample of the task", max_positions=k)
        xc = concrete(x)
        if xc is not None:
            query, prev_in, prev_out = xc[:, :k], xc[:, k : 2 * k], xc[:, 2 * k :]
            shown = np.arange(len(xc)) > 0

            def one_hot_rows(block, rows):
                return (block.sum(axis=1) == np.where(rows, 1, 0)).all()

            problem = None
            if not np.isin(xc, (0.0, 1.0)).all():
                problem = "entries other than 0 and 1"
            elif not (one_hot_rows(query, np.ones(len(xc), bool)) and one_hot_rows(prev_in, shown) and one_hot_rows(prev_out, shown)):
                problem = "a query block that is not one-hot, or a pair block that is not one-hot (zero at the first position)"
            elif not np.array_equal(prev_in[1:], query[:-1]):
                problem = "a revealed input that is not the previous position's query"
            elif (query.sum(axis=0) > 1).any() or (prev_out.sum(axis=0) > 1).any():
                problem = "an input queried twice or an output revealed twice"
            if problem is not None:
                raise ValueError(f"{fn}: x (shape {xc.shape}) is not a sample of the task: {problem}")
        return n

    def _log_predictive(self, x):
        """(N, k) log of the uniform predictive over the outputs not revealed in x_1..x_t."""
        k = self.n_symbols
        revealed = jnp.cumsum(x[:, 2 * k :], axis=0)  # (N, k): 1 where the output was shown at or before t
        remaining = k - jnp.sum(revealed, axis=1, keepdims=True)  # k - t + 1
        return jnp.where(revealed > 0.5, -jnp.inf, -jnp.log(remaining))

    def bayes_log_predictive(self, x: jax.Array) -> jax.Array:
        """(N, k) log p(y_t = c | x_1..x_t): -log(k - t + 1) for unrevealed c, -inf for revealed c."""
        self._check_x(x, "BijectionElimination.bayes_log_predictive")
        return self._log_predictive(x)

    def bayes_predictive(self, x: jax.Array) -> jax.Array:
        """(N, k) exact predictive, uniform over the outputs not revealed in x_1..x_t; rows sum to 1.
        Computed from the output block of ``x`` alone, in its dtype. jit/vmap-able."""
        self._check_x(x, "BijectionElimination.bayes_predictive")
        return jnp.exp(self._log_predictive(x))

    def bayes_loss(self, x: jax.Array, y: jax.Array, weights=None) -> BayesLoss:
        """The Bayes predictor's cross-entropy on ``(x, y)``: a :class:`~gradattn.tasks.base.BayesLoss`.
        On a sample of the task ``per_position`` is log(k - t + 1) (a revealed target would give inf)."""
        fn = "BijectionElimination.bayes_loss"
        n = self._check_x(x, fn)
        check_labels(y, n, self.n_symbols, fn)
        check_weights(weights, n, fn)
        return loss_from_log_predictive(self._log_predictive(x), y, weights)

    def _remaining(self, x, fn: str):
        self._check_x(x, fn)
        k = self.n_symbols
        return k - jnp.sum(jnp.cumsum(x[:, 2 * k :], axis=0), axis=1)

    def bayes_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the Bayes predictive: log(k - t + 1) at position t."""
        return jnp.log(self._remaining(x, "BijectionElimination.bayes_entropy"))

    def bayes_filter_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the posterior over the bijection pi: log((k - t + 1)!) at position t,
        the posterior being uniform over the bijections that agree with the revealed pairs."""
        return gammaln(self._remaining(x, "BijectionElimination.bayes_filter_entropy") + 1)
