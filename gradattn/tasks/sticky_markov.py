"""The sticky Markov-chain task of the paper's Sec. 5.2 (SPEC §3).

A chain over C symbols with a sticky diagonal and transitions that fall off as 1 / circular
distance; the head sees a noisy embedding of the previous symbol and predicts the next one::

    y_0 ~ Uniform{0..C-1},   y_t ~ P[y_{t-1}, :]
    x_t = mu[y_{t-1}] + eps_t,   eps_t ~ N(0, I_d),   target y_t,      t = 1 .. T-1

so one sequence of length T gives N = T - 1 positions.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np


def sticky_transition_matrix(n_symbols: int = 8, self_prob: float = 0.3) -> np.ndarray:
    """The authors' transition matrix P (C, C), float64, rows summing to 1.

    Row i starts from r_ii = self_prob and r_ij = 1 / d(i, j) elsewhere, with the circular distance
    d(i, j) = min(|i - j|, C - |i - j|); the row is scaled to sum to 1 - self_prob, then self_prob is
    added to the diagonal. (So the actual self-transition probability exceeds ``self_prob``: 0.3498
    for the defaults. This is the authors' construction and the reference figures depend on it.)
    """
    c = n_symbols
    i = np.arange(c)
    dist = np.abs(i[:, None] - i[None, :])
    dist = np.minimum(dist, c - dist)
    with np.errstate(divide="ignore"):
        r = np.where(dist == 0, self_prob, 1.0 / np.maximum(dist, 1))
    r = r / r.sum(axis=1, keepdims=True) * (1.0 - self_prob)
    return r + self_prob * np.eye(c)


@dataclasses.dataclass(frozen=True)
class StickyMarkov:
    """The sticky Markov-chain task (SPEC §3), with the paper's defaults.

    Attributes:
      n_symbols: C, the number of symbols (classes).
      d_embed: d, the embedding (input) dimension.
      self_prob: the stickiness parameter of :func:`sticky_transition_matrix`.
      seq_len: T, the length of the symbol sequence; a sample has N = T - 1 positions.
      embed_seed: seed of the symbol embeddings mu, shared by every sample and every run.
    """

    n_symbols: int = 8
    d_embed: int = 20
    self_prob: float = 0.3
    seq_len: int = 2000
    embed_seed: int = 0

    def __post_init__(self):
        for name in ("n_symbols", "d_embed", "seq_len", "embed_seed"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
                raise TypeError(f"StickyMarkov: {name} must be an integer, got {val!r}")
            object.__setattr__(self, name, int(val))  # numpy ints stored as ints: equal, hashable, JSON-able
        if self.n_symbols < 2:
            raise ValueError(f"StickyMarkov: n_symbols must be >= 2, got {self.n_symbols}")
        if self.d_embed < 1:
            raise ValueError(f"StickyMarkov: d_embed must be >= 1, got {self.d_embed}")
        if self.seq_len < 2:
            raise ValueError(f"StickyMarkov: seq_len must be >= 2 (N = seq_len - 1 positions), got {self.seq_len}")
        if self.embed_seed < 0:
            raise ValueError(f"StickyMarkov: embed_seed must be non-negative, got {self.embed_seed}")
        if isinstance(self.self_prob, bool) or not isinstance(self.self_prob, (int, float)) or not 0.0 <= self.self_prob < 1.0:
            raise ValueError(f"StickyMarkov: self_prob must be a number in [0, 1), got {self.self_prob!r}")

    @property
    def n_positions(self) -> int:
        """N = T - 1, the number of (x, y) positions in one sample."""
        return self.seq_len - 1

    @cached_property
    def transition_matrix(self) -> np.ndarray:
        """P (C, C) float64; P[a, c] = p(y_t = c | y_{t-1} = a)."""
        p = sticky_transition_matrix(self.n_symbols, self.self_prob)
        p.setflags(write=False)
        return p

    @cached_property
    def embeddings(self) -> np.ndarray:
        """mu (C, d) float64, entries N(0, 1) from ``numpy.random.default_rng(embed_seed)``.

        Drawn with numpy so they do not depend on JAX's x64 mode or version.
        """
        mu = np.random.default_rng(self.embed_seed).standard_normal((self.n_symbols, self.d_embed))
        mu.setflags(write=False)
        return mu

    @cached_property
    def h_min(self) -> float:
        """Mean over rows of the entropy of P (nats): the loss of an oracle that knows y_{t-1}."""
        p = self.transition_matrix
        return float(np.mean(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)))

    def sample(self, key: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """One sequence: ``x (T-1, d)`` in ``dtype`` and targets ``y (T-1,)`` int32. Pure; jit/vmap-able.

        y_0 is uniform, y_t ~ P[y_{t-1}] (``jax.random.categorical`` in a ``lax.scan``), and
        x_t = mu[y_{t-1}] + eps_t with eps_t ~ N(0, I); the target at x_t is y_t. The symbols are
        drawn in float32 whatever ``dtype`` is, so a key gives the same chain in every x64 mode.
        """
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"StickyMarkov.sample: dtype must be floating point, got {dtype}")
        k_first, k_chain, k_noise = jax.random.split(key, 3)
        log_p = jnp.asarray(np.log(self.transition_matrix), jnp.float32)
        y0 = jax.random.randint(k_first, (), 0, self.n_symbols, dtype=jnp.int32)

        def next_symbol(prev, k):
            nxt = jax.random.categorical(k, log_p[prev]).astype(jnp.int32)
            return nxt, nxt

        _, rest = jax.lax.scan(next_symbol, y0, jax.random.split(k_chain, self.seq_len - 1))
        symbols = jnp.concatenate([y0[None], rest])
        mu = jnp.asarray(self.embeddings, dtype)
        x = mu[symbols[:-1]] + jax.random.normal(k_noise, (self.seq_len - 1, self.d_embed), dtype)
        return x, symbols[1:]

    def bayes_predictive(self, x: jax.Array) -> jax.Array:
        """The exact Bayes predictive p(y_t | x_1..x_t), (N, C); see :mod:`gradattn.bayes`."""
        from gradattn.bayes import bayes_predictive

        return bayes_predictive(jnp.asarray(self.transition_matrix, x.dtype), jnp.asarray(self.embeddings, x.dtype), x)
