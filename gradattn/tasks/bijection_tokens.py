"""Bijection tokens: a random bijection revealed pair by pair, as a token sequence for a language
model (the companion paper's authors' production format of their bijection "wind tunnel").

The vocabulary has 2V tokens: the keys are tokens 0..V-1 and the values tokens V..2V-1. Each sample
draws its own uniform random permutation pi of {0..V-1} and L keys k_1..k_L, uniform and distinct
(without replacement, the default) or independent and uniform (``with_replacement=True``, so that a
key can come back). The tokens are the keys each followed by its value token V + pi(k), the last
value dropped, so that the sequence (T = 2L - 1 tokens) ends on a key::

    [k_1, V + pi(k_1), k_2, V + pi(k_2), ..., k_{L-1}, V + pi(k_{L-1}), k_L]

The supervised positions are the L key positions 0, 2, ..., 2L - 2: at the key of k_t the target is
the next token, the value token V + pi(k_t) (a hard label; the class ids are the token ids, so there
are C = 2V classes, of which only the values V..2V-1 can be targets).

The exact posterior at the key of k_t, given the tokens up to and including it: the revealed pairs
say nothing about pi(k_t) beyond which values are taken (the rest of pi is a uniform bijection
between the keys and the values not yet revealed), so

  - k_t was not seen before: uniform over the values not yet revealed, V - d of them where d is the
    number of distinct keys seen before it; without replacement d = t - 1, so V - t + 1 values and
    an entropy of log2(V - t + 1) bits, the same in every sample;
  - k_t was seen before (with replacement only): a point mass on the value it revealed, entropy 0
    (the "sawtooth" of the with-replacement entropy curve).

Without replacement the Bayes predictor's cross-entropy is the same in every sample, the mean over
t of ln(V - t + 1): 2.2282 nats (3.2146 bits) at the default V = 20, L = 19.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_array, check_prng_key, concrete
from gradattn._config import check_fields, option
from gradattn._math import entropy_bits
from gradattn.tasks.base import TaskDataclass
from gradattn.tasks.tokens import TokenSample

MAX_KEYS = 1024
"""The largest V (number of keys, and of values)."""

MAX_PAIRS = 4096
"""The largest L with replacement (without replacement L <= V)."""


def _check_floating_dtype(dtype, fn: str) -> None:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: dtype must be floating point, got {dtype}")


def _check_int_vector(name: str, a, n: int, fn: str) -> None:
    """``a`` must be an integer array (numpy or jax) of shape (n,)."""
    check_array(name, a, fn)
    if np.shape(a) != (n,):
        raise ValueError(f"{fn}: {name} must have shape ({n},), got shape {tuple(np.shape(a))}")
    if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
        raise TypeError(f"{fn}: {name} must hold integers, got dtype {jnp.result_type(a)}")


@dataclasses.dataclass(frozen=True)
class BijectionTokens(TaskDataclass):
    """Predict the value token of each key of a random bijection revealed pair by pair, as tokens
    (see the module docstring). A :class:`~gradattn.tasks.tokens.TokenTask`.

    Attributes:
      V: the number of keys and of values, in [2, 1024]; the vocabulary (and the classes) are 2V.
      L: the number of keys in a sample, in [1, V] without replacement, [1, 4096] with; a sample
        has T = 2L - 1 tokens and L supervised positions.
      with_replacement: draw the keys independently (a key can repeat) instead of distinct.
    """

    V: int = option(20, help="number of keys and of values V (vocabulary and classes 2V)", minimum=2, maximum=MAX_KEYS)
    L: int = option(19, help="keys per sample L (T = 2L - 1 tokens); at most V without replacement",
                    minimum=1, maximum=MAX_PAIRS)
    with_replacement: bool = option(False, help="draw the keys independently, so that a key can repeat (default: distinct keys)")

    def __post_init__(self):
        check_fields(self, "BijectionTokens")
        if not self.with_replacement and self.L > self.V:
            raise ValueError(f"BijectionTokens: L must be an integer in [1, V] = [1, {self.V}] without replacement "
                             f"(the keys are distinct), got {self.L}; pass with_replacement=True for more keys than V")

    # -- the TokenTask members -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """2V: the keys 0..V-1 and the values V..2V-1."""
        return 2 * self.V

    @property
    def n_classes(self) -> int:
        """2V: the class ids are the token ids (only the values V..2V-1 are ever targets)."""
        return 2 * self.V

    @property
    def seq_len(self) -> int:
        """T = 2L - 1 tokens per sample (L keys, L - 1 values)."""
        return 2 * self.L - 1

    @property
    def n_positions(self) -> int:
        """T: every token is a position of the model (the targets sit at :attr:`supervised`)."""
        return self.seq_len

    @property
    def class_range(self) -> tuple[int, int]:
        """(V, 2V): the value tokens, where the posterior can put mass."""
        return (self.V, 2 * self.V)

    @property
    def supervised(self) -> tuple[int, ...]:
        """The key positions 0, 2, ..., 2L - 2 (L of them)."""
        return tuple(range(0, self.seq_len, 2))

    @property
    def soft_targets(self) -> bool:
        """False: training uses the hard labels (the value tokens), as the authors' format does."""
        return False

    # -- samples ---------------------------------------------------------------------------------

    def encode(self, perm: jax.Array, keys: jax.Array, dtype=jnp.float32) -> TokenSample:
        """The sample of a given bijection and keys: a :class:`~gradattn.tasks.tokens.TokenSample`
        with ``tokens (T,)`` and ``labels (T,)`` int32, ``posterior (T, 2V)`` and ``mask (T,)`` in
        ``dtype``.

        Args:
          perm: (V,) integer permutation of 0..V-1, ``perm[k] = pi(k)``.
          keys: (L,) integers in [0, V), ``keys[t - 1] = k_t``; distinct without replacement.
          dtype: floating dtype of the posterior and the mask.
        Pure and jit/vmap-able; concrete arguments are checked (a permutation; keys in range, and
        distinct without replacement).
        """
        fn = "BijectionTokens.encode"
        _check_floating_dtype(dtype, fn)
        V, L, T = self.V, self.L, self.seq_len
        _check_int_vector("perm", perm, V, fn)
        _check_int_vector("keys", keys, L, fn)
        pc, kc = concrete(perm), concrete(keys)
        if pc is not None and not np.array_equal(np.sort(pc), np.arange(V)):
            raise ValueError(f"{fn}: perm must be a permutation of 0..{V - 1}, got {pc.tolist()}")
        if kc is not None:
            if kc.min() < 0 or kc.max() >= V:
                raise ValueError(f"{fn}: keys must lie in [0, V) = [0, {V}), got {kc.tolist()}")
            if not self.with_replacement and len(np.unique(kc)) != L:
                raise ValueError(f"{fn}: keys must be distinct without replacement, got {kc.tolist()}")
        keys = jnp.asarray(keys, jnp.int32)
        values = jnp.asarray(perm, jnp.int32)[keys]  # pi(k_t), in 0..V-1
        tokens = jnp.stack([keys, V + values], axis=1).reshape(2 * L)[:T]
        labels = jnp.zeros((T,), jnp.int32).at[0::2].set(V + values)
        mask = jnp.zeros((T,), dtype).at[0::2].set(1)
        posterior = jnp.zeros((T, 2 * V), dtype).at[0::2, V:].set(self._value_posterior(keys, values, dtype))
        return TokenSample(tokens=tokens, labels=labels, posterior=posterior, mask=mask)

    def _value_posterior(self, keys, values, dtype):
        """(L, V): p(pi(k_t) = v | the pairs revealed before k_t), for every t at once."""
        V = self.V
        key_hot = jax.nn.one_hot(keys, V, dtype=jnp.int32)  # (L, V)
        value_hot = jax.nn.one_hot(values, V, dtype=jnp.int32)
        seen_before = jnp.cumsum(key_hot, axis=0) - key_hot  # times each key came before t
        repeat = jnp.sum(seen_before * key_hot, axis=1) > 0  # k_t came before
        # The values revealed before t: one per distinct key seen (pi is a bijection).
        revealed = (jnp.cumsum(value_hot, axis=0) - value_hot) > 0
        n_left = V - jnp.sum(revealed, axis=1, keepdims=True)  # >= 1 wherever k_t is new
        uniform = jnp.where(revealed, 0, 1).astype(dtype) / jnp.maximum(n_left, 1).astype(dtype)
        return jnp.where(repeat[:, None], value_hot.astype(dtype), uniform)

    def sample(self, key: jax.Array, dtype=jnp.float32) -> TokenSample:
        """One sample (see :meth:`encode` for its arrays). Pure; jit/vmap-able over ``key``.

        ``key`` splits in two: ``jax.random.permutation`` of ``arange(V)`` (int32) under the first
        gives pi; under the second the first L entries of another such permutation give the keys
        (without replacement), or ``jax.random.randint`` in [0, V) draws them (with). The draws do
        not depend on ``dtype`` or on the x64 mode.
        """
        fn = "BijectionTokens.sample"
        _check_floating_dtype(dtype, fn)
        check_prng_key("key", key, fn)
        k_pi, k_keys = jax.random.split(key)
        symbols = jnp.arange(self.V, dtype=jnp.int32)
        perm = jax.random.permutation(k_pi, symbols)
        if self.with_replacement:
            keys = jax.random.randint(k_keys, (self.L,), 0, self.V, dtype=jnp.int32)
        else:
            keys = jax.random.permutation(k_keys, symbols)[: self.L]
        return self.encode(perm, keys, dtype)

    # -- the Bayes predictor ---------------------------------------------------------------------

    def entropy_bits(self, posterior: jax.Array) -> jax.Array:
        """(..., L) entropies in bits (0 log 0 = 0) of ``posterior (..., T, 2V)`` (a sample's, or a
        batch's) at the supervised positions, in its dtype. With replacement the exact ones depend on
        the sample (0 at a repeated key); without, they are :attr:`exact_entropy_bits`. jit/vmap-able.
        """
        fn = "BijectionTokens.entropy_bits"
        check_array("posterior", posterior, fn)
        want = (self.seq_len, self.n_classes)
        shape = tuple(np.shape(posterior))
        if len(shape) < 2 or shape[-2:] != want:
            raise ValueError(f"{fn}: posterior must have shape (..., {want[0]}, {want[1]}) (..., T, 2V), got shape {shape}")
        if not jnp.issubdtype(jnp.result_type(posterior), jnp.floating):
            raise TypeError(f"{fn}: posterior must be floating point, got dtype {jnp.result_type(posterior)}")
        return entropy_bits(jnp.asarray(posterior)[..., 0::2, :], axis=-1)

    def _without_replacement(self, name: str) -> None:
        if self.with_replacement:
            raise ValueError(f"BijectionTokens.{name}: with replacement the entropy depends on the sample (0 at a "
                             f"repeated key); use entropy_bits(sample.posterior)")

    @cached_property
    def exact_entropy_bits(self) -> np.ndarray:
        """(L,) float64, read-only: log2(V - t + 1) for t = 1..L, the exact posterior's entropy in bits
        at each supervised position, the same in every sample. Without replacement only (a
        ValueError with replacement: use :meth:`entropy_bits`)."""
        self._without_replacement("exact_entropy_bits")
        h = np.log2(np.arange(self.V, self.V - self.L, -1, dtype=np.float64))
        h.setflags(write=False)
        return h

    @property
    def bayes_loss_nats(self) -> float:
        """The mean over t of ln(V - t + 1), nats: the Bayes predictor's hard-label cross-entropy per
        supervised position, the same in every sample. Without replacement only (a ValueError with)."""
        self._without_replacement("bayes_loss_nats")
        return float(np.mean(np.log(np.arange(self.V, self.V - self.L, -1, dtype=np.float64))))
