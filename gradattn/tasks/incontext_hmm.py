"""A fresh random hidden Markov model per sequence, its parameters written in the context: the
companion paper's HMM "wind tunnel" as a token task (:class:`~gradattn.tasks.tokens.TokenTask`).

Each sequence draws its own HMM with S hidden states and O observed symbols. Every row of the
transition matrix T (S, S) and of the emission matrix E (S, O) is drawn as::

    raw ~ Dirichlet(1, ..., 1);   raw = max(raw, min_prob);   row = raw / sum(raw)

and then put on the 0.01 grid (:func:`discretise_rows`), so that every probability is a whole
number of cents, at least ``m = 100 min_prob`` of them, and every row holds exactly 100. The
initial distribution is uniform (1/S, not written in the context), and K = ``length`` steps follow::

    s_0 ~ uniform,   o_0 ~ E[s_0];        s_t ~ T[s_{t-1}],   o_t ~ E[s_t],     t = 1 .. K-1

Tokens (with m = 5, the default, these are the authors' ids)::

    probability of c cents   c - m                0 .. 100-m     (0 .. 95: 0.05 .. 1.00)
    [TRANS] [EMIT] [SEP] [OBS]                    101-m .. 104-m  (96, 97, 98, 99)
    observed symbol o                             105-m + o       (100 + o)
    vocab_size = 105 - m + O                                      (105 at O = 5)

    [TRANS] T[0,0] .. T[0,S-1] T[1,0] .. T[S-1,S-1]   [EMIT] E[0,0] .. E[S-1,O-1]   [SEP]
    [OBS] o_0 [OBS] o_1 .. [OBS] o_{K-1}

so ``seq_len = 3 + S^2 + S O + 2K`` (53 + 2K at S = O = 5). The supervised positions are those of
the symbols o_t, ``4 + S^2 + S O + 2t``; the target there is the exact filtering posterior
``p(s_t | o_0 .. o_t)`` (which includes o_t) over the S states, by the forward algorithm on the
discretised T and E; the hard label is the true state s_t.

``min_prob`` is an option, restricted to the cent grid (0.01 .. 0.5 in steps of 0.01) with
``min_prob * max(S, O) <= 1``; the probability ids start at its number of cents m, so the special
and symbol ids move with it (they are the authors' at the default 0.05).

Keys: ``sample`` splits its key in two; the first draws the HMM, the second the path, step t from
``fold_in(path_key, t)``. A task with another ``length`` draws the same HMM from the same key, and
its first steps are the same path: a model trained at K = 20 is evaluated at K = 50 on the same
HMMs, the first 20 steps included.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_array, check_int, check_prng_key, concrete, is_traced
from gradattn._config import check_fields, option
from gradattn.tasks.base import TaskDataclass, forward_algorithm
from gradattn.tasks.tokens import TokenSample

CENTS = 100
"""The grid: every probability is a whole number of hundredths."""


def discretise_rows(rows: jax.Array, min_cents: int = 5) -> jax.Array:
    """Rows of probabilities ``(..., C)`` put on the 0.01 grid, as integer cents (int32, each row
    summing to exactly 100, every entry at least ``min_cents``, an integer in [0, 100 // C]).
    Pure; jit/vmap-able.

    Per row, the authors' procedure: round to 2 decimals; ``cents = rint(100 row)``; ``cents =
    max(cents, min_cents)``; then ``diff = 100 - sum(cents)`` is made 0 by walking cyclically over
    the entries, from the smallest up (``diff > 0``: add 1 to each entry below 100) or from the
    largest down (``diff < 0``: subtract 1 from each entry above ``min_cents``), in the order of the
    entries after the floor, computed once. Ties in that order go to the lower index (a stable
    argsort; numpy's default argsort, which the authors call, leaves the order of ties to the
    platform: with numpy 2.4 on an AVX-512 CPU it differs from the stable order in rows of 4 or
    more entries, and so can the cents).

    The walk is computed in closed form, without a loop: with ``diff > 0`` the cap never binds (an
    entry of a row summing to less than 100 is below 100, and stays below it while the other
    entries hold at least 1 cent between them), so the entry of rank r gets
    ``diff // C + (r < diff % C)``. With ``diff = -D < 0``, entry j has ``e_j = cents_j - min_cents``
    to give; P complete passes take ``R(P) = sum_j min(e_j, P)``; the walk ends in pass
    ``P* = max {P : R(P) <= D}``, in which the first ``D - R(P*)`` entries (in the order) with
    ``e_j > P*`` give one more.

    The rounding runs in the rows' dtype: on float64 rows the result is the authors' procedure
    bit for bit; :class:`InContextHMM` rounds float32 draws in float32, where a product ``100 x``
    within a float32 rounding of a half-cent may round the other way than in float64.
    """
    fn = "discretise_rows"
    check_array("rows", rows, fn)
    n = np.shape(rows)[-1] if np.ndim(rows) else 0
    if n < 2 or not jnp.issubdtype(jnp.result_type(rows), jnp.floating):
        raise ValueError(f"{fn}: rows must be a floating array (..., C) with C >= 2, got shape {np.shape(rows)} "
                         f"and dtype {jnp.result_type(rows)}")
    if not is_traced(min_cents):
        check_int("min_cents", min_cents, fn, minimum=0, maximum=CENTS // n)
    rows = jnp.asarray(rows)
    cents = jnp.rint(jnp.round(rows, 2) * CENTS).astype(jnp.int32)
    cents = jnp.maximum(cents, min_cents)
    diff = CENTS - jnp.sum(cents, axis=-1, keepdims=True)
    rank_up = jnp.argsort(jnp.argsort(cents, axis=-1, stable=True), axis=-1, stable=True)
    down = jnp.argsort(-cents, axis=-1, stable=True)
    rank_down = jnp.argsort(down, axis=-1, stable=True)
    # diff >= 0: every entry gains diff // n, the first diff % n in ascending order one more.
    gain = diff // n + (rank_up < diff % n).astype(jnp.int32)
    # diff < 0: passes over the descending order; R(P) for P = 0 .. 100.
    need = jnp.maximum(-diff, 0)
    excess = cents - min_cents
    passes = jnp.arange(CENTS + 1, dtype=jnp.int32)
    taken = jnp.sum(jnp.minimum(excess[..., None, :], passes[:, None]), axis=-1)  # (..., 101) R(P)
    full = jnp.sum(taken <= need, axis=-1, keepdims=True) - 1  # P*, R nondecreasing and R(0) = 0
    rest = need - jnp.take_along_axis(taken, full, axis=-1)
    eligible = excess > full
    eligible_sorted = jnp.take_along_axis(eligible, down, axis=-1).astype(jnp.int32)
    before = jnp.cumsum(eligible_sorted, axis=-1) - eligible_sorted  # eligible entries ahead in the order
    extra_sorted = (eligible_sorted == 1) & (before < rest)
    extra = jnp.take_along_axis(extra_sorted, rank_down, axis=-1).astype(jnp.int32)
    loss = jnp.minimum(excess, full) + extra
    return jnp.where(diff >= 0, cents + gain, cents - loss).astype(jnp.int32)


def _draw_from_cents(key: jax.Array, cents: jax.Array) -> jax.Array:
    """One index drawn with probability ``cents / 100`` exactly (an integer uniform on [0, 100))."""
    u = jax.random.randint(key, (), 0, CENTS, dtype=jnp.int32)
    return jnp.sum(jnp.cumsum(cents) <= u).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class InContextHMM(TaskDataclass):
    """Filtering on a random HMM drawn per sequence and given in the context (see the module docstring).

    Attributes:
      n_states: S, the number of hidden states (and of output classes), in [2, 16].
      n_obs: O, the number of observed symbols, in [2, 16].
      length: K, the number of observations (and supervised positions) per sequence, in [1, 4096].
      min_prob: the floor of every probability, on the 0.01 grid, in [0.01, 0.5] with
        ``min_prob * max(S, O) <= 1``; 0.05 (the authors' value) by default.
    """

    n_states: int = option(5, help="number of hidden states S (the number of output classes)", minimum=2, maximum=16)
    n_obs: int = option(5, help="number of observed symbols O", minimum=2, maximum=16)
    length: int = option(20, help="observations K per sequence (the supervised positions)", minimum=1, maximum=4096)
    min_prob: float = option(0.05, help="floor of every transition and emission probability, on the 0.01 grid",
                             minimum=0.01, maximum=0.5)

    def __post_init__(self):
        fn = "InContextHMM"
        check_fields(self, fn)  # the bounds declared with each field; then what they cannot say:
        cents = self.min_prob * CENTS
        if abs(cents - round(cents)) > 1e-9:
            raise ValueError(f"{fn}: min_prob must lie on the 0.01 grid (a whole number of cents), got {self.min_prob!r}")
        widest = max(self.n_states, self.n_obs)
        if round(cents) * widest > CENTS:
            raise ValueError(f"{fn}: min_prob * max(n_states, n_obs) must be <= 1 (a row of {widest} entries of at least "
                             f"{self.min_prob!r} must sum to 1), got min_prob={self.min_prob!r} with n_states={self.n_states}, "
                             f"n_obs={self.n_obs}")

    # ---- token ids ------------------------------------------------------------------------------

    @property
    def min_cents(self) -> int:
        """m = 100 min_prob, the least number of cents of any probability (5 by default)."""
        return round(self.min_prob * CENTS)

    @property
    def trans_token(self) -> int:
        """The id of [TRANS], 101 - m (96 by default); the probability ids are 0 .. 100 - m."""
        return CENTS + 1 - self.min_cents

    # The other markers follow [TRANS]; observed symbol o is first_symbol_token + o.
    emit_token = property(lambda self: self.trans_token + 1, doc="The id of [EMIT], 102 - m (97 by default).")
    sep_token = property(lambda self: self.trans_token + 2, doc="The id of [SEP], 103 - m (98 by default).")
    obs_token = property(lambda self: self.trans_token + 3, doc="The id of [OBS], 104 - m (99 by default).")
    first_symbol_token = property(lambda self: self.trans_token + 4,
                                  doc="The id of observed symbol 0, 105 - m (100 by default).")

    # ---- the TokenTask members ------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """105 - m + O token ids (105 by default)."""
        return self.first_symbol_token + self.n_obs

    @property
    def n_classes(self) -> int:
        """S: the output classes are the hidden states."""
        return self.n_states

    @property
    def header_len(self) -> int:
        """3 + S^2 + S O: the tokens before the first [OBS] (53 at S = O = 5)."""
        return 3 + self.n_states * self.n_states + self.n_states * self.n_obs

    @property
    def seq_len(self) -> int:
        """T = 3 + S^2 + S O + 2K tokens."""
        return self.header_len + 2 * self.length

    @property
    def n_positions(self) -> int:
        """K, the supervised positions per sequence (not T - 1: this is a token task)."""
        return self.length

    @property
    def class_range(self) -> tuple[int, int]:
        """(0, S): the posterior can put mass on every class."""
        return (0, self.n_states)

    @cached_property
    def supervised(self) -> tuple[int, ...]:
        """The positions of the observed symbols o_t, ``3 + S^2 + S O + 1 + 2t`` for t < K."""
        return tuple(self.header_len + 1 + 2 * t for t in range(self.length))

    @property
    def soft_targets(self) -> bool:
        """True: training targets are the exact filtering posteriors."""
        return True

    # ---- drawing and encoding -------------------------------------------------------------------

    def draw_parameters(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The HMM of one sequence: ``(trans_cents (S, S), emit_cents (S, O))``, int32 cents, each
        row summing to 100. Every row is Dirichlet(1, ..., 1) in float32 (independent Exp(1) draws,
        normalised: that law exactly, and cheaper to compile than a Gamma sampler), floored at
        ``min_prob``, renormalised and put on the grid by :func:`discretise_rows` (in float32, so a
        key gives the same HMM in both x64 modes). The transition rows come from the first half of
        ``key``, the emission rows from the second. Pure; jit/vmap-able."""
        check_prng_key("key", key, "InContextHMM.draw_parameters")
        k_trans, k_emit = jax.random.split(key)
        rows = []
        for k, n in ((k_trans, self.n_states), (k_emit, self.n_obs)):
            gaps = jax.random.exponential(k, (self.n_states, n), jnp.float32)
            dirichlet = gaps / jnp.sum(gaps, axis=-1, keepdims=True)
            raw = jnp.maximum(dirichlet, jnp.float32(self.min_prob))
            rows.append(discretise_rows(raw / jnp.sum(raw, axis=-1, keepdims=True), self.min_cents))
        return rows[0], rows[1]

    def draw_path(self, key: jax.Array, trans_cents: jax.Array, emit_cents: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(states (K,), observations (K,))`` int32 of the HMM given as cents: step t is drawn from
        ``fold_in(key, t)`` (split into the state's key and the symbol's), s_0 uniformly, so the
        first steps do not depend on K. Each draw is exact: an integer uniform on [0, 100) against
        the row's cumulative cents. Pure; jit/vmap-able."""
        fn = "InContextHMM.draw_path"
        check_prng_key("key", key, fn)
        trans, emit = self._check_cents(trans_cents, emit_cents, fn)
        step_keys = jax.vmap(lambda t: jax.random.split(jax.random.fold_in(key, t)))(jnp.arange(self.length))
        s0 = jax.random.randint(step_keys[0, 0], (), 0, self.n_states, dtype=jnp.int32)

        def step(prev, k):
            nxt = _draw_from_cents(k, trans[prev])
            return nxt, nxt

        _, rest = jax.lax.scan(step, s0, step_keys[1:, 0])
        states = jnp.concatenate([s0[None], rest])
        observations = jax.vmap(_draw_from_cents)(step_keys[:, 1], emit[states])
        return states, observations

    def sample(self, key: jax.Array, dtype=jnp.float32) -> TokenSample:
        """One sequence: its HMM from the first half of ``key`` (:meth:`draw_parameters`), its path
        from the second (:meth:`draw_path`), then :meth:`encode` with the posterior in ``dtype``.
        Pure; jit/vmap-able over ``key``. The tokens and labels do not depend on ``dtype`` or the
        x64 mode."""
        fn = "InContextHMM.sample"
        _check_dtype(dtype, fn)
        check_prng_key("key", key, fn)
        k_params, k_path = jax.random.split(key)
        trans, emit = self.draw_parameters(k_params)
        states, observations = self.draw_path(k_path, trans, emit)
        return self.encode(trans, emit, states, observations, dtype)

    def encode(self, trans_cents: jax.Array, emit_cents: jax.Array, states: jax.Array, observations: jax.Array,
               dtype=jnp.float32) -> TokenSample:
        """The sample of a given HMM and path.

        Args:
          trans_cents: (S, S) integer, ``T[i, j]`` in cents; each row in [m, 100] summing to 100.
          emit_cents: (S, O) integer, ``E[i, o]`` in cents; each row likewise.
          states: (K,) integer hidden states in [0, S).
          observations: (K,) integer symbols in [0, O).
          dtype: the floating dtype of ``posterior`` and ``mask``.
        Returns the :class:`~gradattn.tasks.tokens.TokenSample`; the posterior is the forward
        algorithm's in ``dtype`` on ``cents / 100``. Pure and jit/vmap-able; shapes and dtypes are
        checked always, values when concrete.
        """
        fn = "InContextHMM.encode"
        _check_dtype(dtype, fn)
        trans, emit = self._check_cents(trans_cents, emit_cents, fn)
        s = _check_path("states", states, self.length, self.n_states, fn)
        o = _check_path("observations", observations, self.length, self.n_obs, fn)
        m = self.min_cents

        def mark(token):
            return jnp.full((1,), token, jnp.int32)

        obs_pairs = jnp.stack([jnp.full_like(o, self.obs_token), o + self.first_symbol_token], axis=1).reshape(-1)
        tokens = jnp.concatenate([mark(self.trans_token), trans.reshape(-1) - m, mark(self.emit_token),
                                  emit.reshape(-1) - m, mark(self.sep_token), obs_pairs])
        log_trans = jnp.log(trans.astype(dtype) / CENTS)
        log_emit = jnp.log(emit.astype(dtype) / CENTS)
        log_initial = jnp.full((self.n_states,), -np.log(self.n_states), dtype)
        log_beta, _ = forward_algorithm(log_initial, log_trans, log_emit.T[o])
        beta = jnp.exp(log_beta)
        beta = beta / jnp.sum(beta, axis=-1, keepdims=True)
        where = jnp.asarray(self.supervised, jnp.int32)
        n = self.seq_len
        return TokenSample(
            tokens=tokens,
            labels=jnp.zeros((n,), jnp.int32).at[where].set(s),
            posterior=jnp.zeros((n, self.n_states), dtype).at[where].set(beta),
            mask=jnp.zeros((n,), dtype).at[where].set(1),
        )

    def _check_cents(self, trans_cents, emit_cents, fn: str) -> tuple[jax.Array, jax.Array]:
        """The two tables of cents, checked (shapes and integer dtype; values when concrete), as int32."""
        out = []
        for name, a, cols in (("trans_cents", trans_cents, self.n_states), ("emit_cents", emit_cents, self.n_obs)):
            check_array(name, a, fn)
            shape = tuple(np.shape(a))
            if shape != (self.n_states, cols):
                raise ValueError(f"{fn}: {name} must have shape ({self.n_states}, {cols}), got shape {shape}")
            if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
                raise TypeError(f"{fn}: {name} must hold integer cents, got dtype {jnp.result_type(a)}")
            ac = concrete(a)
            if ac is not None:
                m = self.min_cents
                if ac.min() < m or ac.max() > CENTS:
                    raise ValueError(f"{fn}: {name} (shape {shape}) has entries in [{ac.min()}, {ac.max()}], outside "
                                     f"[{m}, {CENTS}] (min_prob={self.min_prob!r} is {m} cents)")
                sums = ac.astype(np.int64).sum(axis=1)
                if (sums != CENTS).any():
                    raise ValueError(f"{fn}: every row of {name} must sum to {CENTS} cents, got row sums {sums.tolist()}")
            out.append(jnp.asarray(a).astype(jnp.int32))
        return out[0], out[1]


def _check_dtype(dtype, fn: str) -> None:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: dtype must be floating point, got {dtype}")


def _check_path(name: str, a, length: int, n: int, fn: str) -> jax.Array:
    """A path ``(K,)`` of integers in [0, n) (values checked when concrete), as int32."""
    check_array(name, a, fn)
    shape = tuple(np.shape(a))
    if shape != (length,):
        raise ValueError(f"{fn}: {name} must have shape ({length},) (length K = {length}), got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(a), jnp.integer):
        raise TypeError(f"{fn}: {name} must hold integers, got dtype {jnp.result_type(a)}")
    ac = concrete(a)
    if ac is not None and (ac.min() < 0 or ac.max() >= n):
        raise ValueError(f"{fn}: {name} (shape {shape}) has values in [{ac.min()}, {ac.max()}], outside [0, {n})")
    return jnp.asarray(a).astype(jnp.int32)
