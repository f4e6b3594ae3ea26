"""The sticky Markov-chain task of the paper's Sec. 5.2.

A chain over C symbols with a sticky diagonal and transitions that fall off as 1 / circular
distance; the head sees a noisy embedding of the previous symbol and predicts the next one::

    y_0 ~ Uniform{0..C-1},   y_t ~ P[y_{t-1}, :]
    x_t = mu[y_{t-1}] + sigma eps_t,   eps_t ~ N(0, I_d),   target y_t,      t = 1 .. T-1

so one sequence of length T gives N = T - 1 positions. sigma = ``noise_std`` (1 in the paper).

The symbol means mu come from one of three sources, fixed per task and shared by every sample:

- ``"reference"``: the values the paper's reference code uses (PyTorch's ``torch.manual_seed(0);
  torch.randn(8, 20)``), shipped with the package as numbers; only for C = 8, d = 20.
- a seed: entries N(0, 1) drawn with ``numpy.random.default_rng(embed_seed)``.
- explicit values: any finite floating (C, d) array.

By default (neither ``embeddings`` nor ``embed_seed`` given) the means are the reference's when the
size is the paper's 8 x 20, so that ``StickyMarkov()`` is the paper's task exactly, and the draw of
seed 0 for any other size.

The exact Bayes predictor (module functions, for any chain P and means mu, and the task's methods,
for its own) is the forward algorithm of a hidden Markov model seen one step late: the hidden state
at position t is y_{t-1} and it emits x_t. In log space::

    prior_1(a)  = 1 / C                                               p(y_0 = a)
    beta_t(a)   = prior_t(a) N(x_t; mu_a, sigma^2 I) / Z_t             p(y_{t-1} = a | x_1..x_t)
    pred_t(c)   = sum_a beta_t(a) P[a, c]                              p(y_t = c | x_1..x_t)
    prior_{t+1} = pred_t

``pred_t`` is the predictive at position t: its cross-entropy on the targets y_t is the lowest loss
any causal model of x_1..x_t can reach in expectation, the floor a trained head is measured against.
Position t = 1..N of the task is row t - 1 of ``x (N, d)``. The recursion is
:func:`gradattn.tasks.base.forward_algorithm`, shared with :mod:`gradattn.tasks.hmm`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math
import os
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpy.lib import format as npy_format

from gradattn._checks import (
    FLOAT32_MAX,
    MAX_SEED,
    check_int,
    check_labels,
    check_prng_key,
    check_weights,
    concrete,
    is_traced,
)
from gradattn._config import check_field, check_fields, option
from gradattn._math import entropy_from_log, entropy_nats
from gradattn._parse import parse_int
from gradattn.tasks.base import (
    BayesLoss,
    TaskDataclass,
    description_fields,
    forward_algorithm,
    loss_from_log_predictive,
)

REFERENCE_FILE = "sticky_markov_reference_embeddings.txt"
REFERENCE_SHAPE = (8, 20)


def sticky_transition_matrix(n_symbols: int = 8, self_prob: float = 0.3) -> np.ndarray:
    """The authors' transition matrix P (C, C), float64, rows summing to 1.

    Row i starts from r_ii = self_prob and r_ij = 1 / d(i, j) elsewhere, with the circular distance
    d(i, j) = min(|i - j|, C - |i - j|); the row is scaled to sum to 1 - self_prob, then self_prob is
    added to the diagonal. (So the actual self-transition probability exceeds ``self_prob``: 0.3498
    for the defaults. This is the authors' construction and the reference figures depend on it.)
    """
    c = check_int("n_symbols", n_symbols, "sticky_transition_matrix", minimum=2)
    self_prob = check_field(StickyMarkov, "self_prob", self_prob, "sticky_transition_matrix")  # the task's bounds, [0, 1)
    i = np.arange(c)
    dist = np.abs(i[:, None] - i[None, :])
    dist = np.minimum(dist, c - dist)
    r = np.where(dist == 0, self_prob, 1.0 / np.maximum(dist, 1))
    r = r / r.sum(axis=1, keepdims=True) * (1.0 - self_prob)
    return r + self_prob * np.eye(c)


@functools.lru_cache(maxsize=1)
def reference_embeddings() -> np.ndarray:
    """The reference code's symbol means, (8, 20) float32, read-only.

    Exactly ``torch.manual_seed(0); torch.randn(8, 20)`` on PyTorch's CPU generator, stored as
    decimal text with enough digits to round-trip every float32, so no torch is needed.
    """
    # One name per joinpath: Python 3.10's Traversable.joinpath takes a single one.
    text = importlib.resources.files("gradattn").joinpath("data").joinpath(REFERENCE_FILE).read_text()
    mu = np.loadtxt(text.splitlines(), dtype=np.float32, ndmin=2)
    if mu.shape != REFERENCE_SHAPE:  # a damaged installation, not a user error
        raise RuntimeError(f"reference_embeddings: gradattn/data/{REFERENCE_FILE} holds shape {mu.shape}, expected {REFERENCE_SHAPE}")
    mu.setflags(write=False)
    return mu


def _means_array(value, fn: str, name: str) -> np.ndarray:
    """``value`` as a finite floating 2-D numpy array (its own dtype), or a TypeError/ValueError."""
    if is_traced(value):
        raise TypeError(f"{fn}: {name} must be a concrete array (the means are fixed per task), got a traced value")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:  # ragged lists and other non-arrays
        raise TypeError(f"{fn}: {name} must be a (C, d) floating array, 'reference' or None, got {type(value).__name__}") from err
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{fn}: {name} must be floating point (C, d), got dtype {arr.dtype} with shape {arr.shape}")
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"{fn}: {name} must have shape (C, d) with C, d >= 1, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{fn}: {name} (shape {arr.shape}) contains non-finite values")
    if np.abs(arr).max() > FLOAT32_MAX:
        raise ValueError(
            f"{fn}: {name} (shape {arr.shape}) has values beyond float32's finite range (|x| <= {FLOAT32_MAX:.4g}, "
            f"max |x| = {float(np.abs(arr).max()):.4g}); tasks are sampled in float32, where they would be inf"
        )
    return arr


def _npy_header(path: str, text: str, fn: str) -> tuple[tuple, np.dtype]:
    """The shape and dtype that the ``.npy`` file at ``path`` declares, checked against the task's
    bounds on C x d and against the file's size, before any array is allocated: a damaged header
    claiming (200000, 100000) float64 must be one line, not numpy's MemoryError."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            offset = f.tell()
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{fn}: {text!r}: not a readable .npy array ({err})") from None
    where = f"the array in {text!r}"
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{fn}: {where} must be floating point (C, d), got dtype {dtype} with shape {shape}")
    if len(shape) != 2:
        raise ValueError(f"{fn}: {where} must have shape (C, d) with C, d >= 1, got shape {shape}")
    bounds = {f.name: f.metadata for f in dataclasses.fields(StickyMarkov) if f.name in ("n_symbols", "d_embed")}
    for name, dim in (("n_symbols", shape[0]), ("d_embed", shape[1])):
        lo, hi = bounds[name]["minimum"], bounds[name]["maximum"]
        if not lo <= dim <= hi:
            what = "C (n_symbols)" if name == "n_symbols" else "d (d_embed)"
            raise ValueError(f"{fn}: {where} has shape {shape}: {what} = {dim} must be at least {lo} and at most {hi}")
    need = math.prod(shape) * dtype.itemsize
    if size < offset + need:
        raise ValueError(
            f"{fn}: {text!r}: the file is {size} bytes, but its header's {shape} {dtype} needs {need} bytes of data "
            f"after the {offset}-byte header (a truncated or damaged file)"
        )
    return shape, dtype


def embeddings_from_spec(text: str) -> dict[str, Any]:
    """Parse a command-line means spec into the keyword arguments :class:`StickyMarkov` takes.

    ``"reference"`` -> ``{"embeddings": "reference"}``; ``"seed:N"`` -> ``{"embed_seed": N}``
    (N in ASCII digits, 0 <= N < 2^64: the range of ``embed_seed``); a path ending in ``.npy`` ->
    ``{"embeddings": array}``, a finite floating (C, d) array read with ``numpy.load`` (no pickles).
    Use as ``StickyMarkov(**embeddings_from_spec(s))``; the array's shape is checked against the task's
    sizes there.

    The spec has no spaces around it, and none in ``seed:N`` (as every integer of the command line);
    a ``.npy`` file's header is read first, and its shape checked against the task's bounds on C and
    d and against the file's size, before the array is loaded.

    Raises:
      TypeError: ``text`` is not a string.
      ValueError: an unknown form, spaces, a bad seed, a missing or unreadable file, a header whose
        shape the task cannot take or that the file is too short for, an array that is not 2-D, not
        floating or not finite (in float32). Each message names the spec.
    """
    fn = "embeddings_from_spec"
    if not isinstance(text, str):
        raise TypeError(f"{fn}: the spec must be a string, got {type(text).__name__}")
    if text != text.strip():
        raise ValueError(f"{fn}: {text!r}: no spaces around the spec ('reference', 'seed:N' or a path to a .npy file)")
    spec = text
    if spec == "reference":
        return {"embeddings": "reference"}
    if spec.startswith("seed:"):
        body = spec[len("seed:"):]
        try:  # ASCII digits only: no sign, no spaces, no float, no empty seed; the bound of embed_seed
            if body[:1] in "+-":  # a sign, or nothing at all
                raise ValueError(body)
            seed = check_field(StickyMarkov, "embed_seed", parse_int(body), fn)
        except (TypeError, ValueError):
            raise ValueError(
                f"{fn}: {text!r}: the seed in seed:N must be a non-negative integer below 2^64 in ASCII digits "
                f"with no sign and no spaces, got {body!r}"
            ) from None
        return {"embed_seed": seed}
    if spec.lower().endswith(".npy"):
        if not os.path.exists(spec):
            raise ValueError(f"{fn}: {text!r}: no such file")
        if not os.path.isfile(spec):
            raise ValueError(f"{fn}: {text!r}: not a regular file")
        _npy_header(spec, text, fn)
        try:
            arr = np.load(spec, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"{fn}: {text!r}: not a readable .npy array ({err})") from None
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"{fn}: {text!r}: expected one array, got {type(arr).__name__}")
        try:
            arr = _means_array(arr, fn, f"the array in {text!r}")
        except TypeError as err:
            raise ValueError(str(err)) from None
        return {"embeddings": arr}
    raise ValueError(f"{fn}: {text!r}: expected 'reference', 'seed:N' (N >= 0) or a path to a .npy file")


def _canonical_source(value, fn: str):
    """``"reference"`` or a tuple of row tuples of floats for the given means (equal values, equal form)."""
    if isinstance(value, str):
        if value != "reference":
            raise ValueError(
                f"{fn}: embeddings must be 'reference', a (C, d) floating array or None, got the string {value!r} "
                "(draw from a seed with embed_seed=N)"
            )
        return "reference"
    arr = _means_array(value, fn, "embeddings").astype(np.float64)
    if arr.shape == REFERENCE_SHAPE and np.array_equal(arr, reference_embeddings()):
        return "reference"  # the same numbers give the same task, however they were passed
    return tuple(tuple(row) for row in arr.tolist())


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class StickyMarkov(TaskDataclass):
    """The sticky Markov-chain task, with the paper's defaults.

    ``StickyMarkov(n_symbols=None, d_embed=None, self_prob=0.3, seq_len=2000, embed_seed=None,
    embeddings=None, noise_std=1.0)``.

    Attributes:
      n_symbols: C, the number of symbols (classes); default 8, or the rows of ``embeddings``.
      d_embed: d, the embedding (input) dimension; default 20, or the columns of ``embeddings``.
      self_prob: the stickiness parameter of :func:`sticky_transition_matrix`, in [0, 1).
      seq_len: T, the length of the symbol sequence; a sample has N = T - 1 positions.
      embed_seed: seed of the drawn means, in [0, 2^64) as every seed (``None`` when the means are
        the reference's or explicit).
      noise_std: sigma > 0, the standard deviation of the emission noise.
      embedding_source: how the means were given, in a hashable form: ``None`` (drawn from
        ``embed_seed``), ``"reference"``, or the explicit values as a tuple of row tuples.
    Constructor-only argument:
      embeddings: ``"reference"``, a finite floating (C, d) array of means, or ``None``. Given
        together with ``embedding_source`` (as ``dataclasses.replace`` does), ``embeddings`` wins.

    Equality and hashing go by the fields, so two tasks with the same means compare equal however
    the means were passed (the reference's values passed as an array give ``"reference"``).
    The means as an array: :attr:`embeddings`.

    The constructor settles where the means come from and the sizes they give; then
    ``__post_init__`` checks every field against the bounds it declares, as for every task.
    """

    n_symbols: int = option(help="number of symbols C", minimum=2, maximum=1024)
    d_embed: int = option(help="input size d_in of the symbol means", minimum=1, maximum=4096)
    self_prob: float = option(help="self-transition mass added to the diagonal", minimum=0.0, maximum=1.0,
                              exclusive_maximum=True)
    seq_len: int = option(help="sequence length T (N = T - 1 positions)", minimum=2, maximum=65_537)
    embed_seed: int | None = option(help="draw the symbol means from this numpy seed instead of the reference's",
                                    minimum=0, maximum=MAX_SEED)
    noise_std: float = option(help="std of the emission noise", minimum=0.0, exclusive_minimum=True)
    # mypy takes option(...) for a default (it knows only dataclasses.field); this class writes its own __init__.
    embedding_source: str | tuple | None  # type: ignore[misc]

    def __init__(
        self,
        n_symbols: int | None = None,
        d_embed: int | None = None,
        self_prob: float = 0.3,
        seq_len: int = 2000,
        embed_seed: int | None = None,
        embeddings=None,
        noise_std: float = 1.0,
        *,
        embedding_source=None,
    ):
        fn = "StickyMarkov"
        # The sizes and the seed given are checked first (against their declared bounds), as they
        # are compared with the means' shape below.
        n_symbols, d_embed, embed_seed = (
            None if val is None else check_field(StickyMarkov, name, val, fn)
            for name, val in (("n_symbols", n_symbols), ("d_embed", d_embed), ("embed_seed", embed_seed))
        )
        source = embeddings if embeddings is not None else embedding_source
        if source is not None:
            if embed_seed is not None:
                raise ValueError(
                    f"{fn}: give embeddings or embed_seed, not both (got embed_seed={embed_seed} and embeddings); "
                    "embed_seed only seeds drawn means"
                )
            source = _canonical_source(source, fn)
            shape = REFERENCE_SHAPE if source == "reference" else (len(source), len(source[0]))
            for name, given, size in (("n_symbols", n_symbols, shape[0]), ("d_embed", d_embed, shape[1])):
                if given is not None and given != size:
                    what = "the reference means" if source == "reference" else "embeddings"
                    hint = "" if embeddings is not None else " (for drawn means of another size pass embedding_source=None)"
                    raise ValueError(f"{fn}: {name}={given} does not match {what} of shape {shape}{hint}")
            n_symbols, d_embed = (check_field(StickyMarkov, name, size, f"{fn}: embeddings of shape {shape}")
                                  for name, size in (("n_symbols", shape[0]), ("d_embed", shape[1])))
        else:
            n_symbols = REFERENCE_SHAPE[0] if n_symbols is None else n_symbols
            d_embed = REFERENCE_SHAPE[1] if d_embed is None else d_embed
            if embed_seed is None:
                if (n_symbols, d_embed) == REFERENCE_SHAPE:
                    source = "reference"
                else:
                    embed_seed = 0
        fields = dict(n_symbols=n_symbols, d_embed=d_embed, self_prob=self_prob, seq_len=seq_len, embed_seed=embed_seed,
                      noise_std=noise_std, embedding_source=source)
        for name, val in fields.items():
            object.__setattr__(self, name, val)
        self.__post_init__()

    def __post_init__(self):
        check_fields(self, "StickyMarkov")

    @classmethod
    def reference(cls, **kwargs) -> StickyMarkov:
        """The task with the reference code's means (C = 8, d = 20); other fields as keywords."""
        return cls(embeddings="reference", **kwargs)

    def __repr__(self) -> str:
        src = self.embedding_source
        means = f"seed {self.embed_seed}" if src is None else ("reference" if src == "reference" else "explicit")
        return (
            f"StickyMarkov(n_symbols={self.n_symbols}, d_embed={self.d_embed}, self_prob={self.self_prob!r}, "
            f"seq_len={self.seq_len}, noise_std={self.noise_std!r}, embeddings={means})"
        )

    # The Task protocol's names for the sizes (N = T - 1 positions: TaskDataclass.n_positions).
    @property
    def d_in(self) -> int:
        """Input dimension: d = ``d_embed``."""
        return self.d_embed

    @property
    def n_classes(self) -> int:
        """Number of classes: C = ``n_symbols``."""
        return self.n_symbols

    @property
    def embeddings_spec(self) -> str | None:
        """``"reference"``, ``"seed:N"``, or ``None`` for explicit means (the CLI's ``--embeddings`` form)."""
        if self.embedding_source is None:
            return f"seed:{self.embed_seed}"
        return "reference" if self.embedding_source == "reference" else None

    @cached_property
    def transition_matrix(self) -> np.ndarray:
        """P (C, C) float64; P[a, c] = p(y_t = c | y_{t-1} = a)."""
        p = sticky_transition_matrix(self.n_symbols, self.self_prob)
        p.setflags(write=False)
        return p

    @cached_property
    def embeddings(self) -> np.ndarray:
        """mu (C, d) float64, read-only: the reference's values, the seed's draw or the explicit values.

        A seed's draw is ``numpy.random.default_rng(embed_seed).standard_normal((C, d))``, made with
        numpy so that it depends neither on JAX's x64 mode nor on its version.
        """
        src = self.embedding_source
        if src is None:
            mu = np.random.default_rng(self.embed_seed).standard_normal((self.n_symbols, self.d_embed))
        elif src == "reference":
            mu = reference_embeddings().astype(np.float64)
        else:
            mu = np.array(src, np.float64)
        mu.setflags(write=False)
        return mu

    @cached_property
    def h_min(self) -> float:
        """Mean over rows of the entropy of P (nats): the loss of an oracle that knows y_{t-1}.

        (P is circulant, so its stationary distribution is uniform and this is the oracle's
        expected loss per position.)
        """
        return float(np.mean(entropy_nats(self.transition_matrix, xp=np)))

    def to_dict(self) -> dict:
        """JSON-ready: the sizes, ``noise_std`` and ``embeddings`` as ``"reference"``, ``"seed:N"`` or
        the explicit values (a list of rows). :meth:`from_dict` rebuilds an equal task."""
        src = self.embedding_source
        return {
            "name": type(self).__name__,
            "n_symbols": self.n_symbols,
            "d_embed": self.d_embed,
            "self_prob": self.self_prob,
            "seq_len": self.seq_len,
            "noise_std": self.noise_std,
            "embeddings": [list(r) for r in src] if isinstance(src, tuple) else self.embeddings_spec,
        }

    @classmethod
    def from_dict(cls, d: dict) -> StickyMarkov:
        """The task described by :meth:`to_dict`'s output."""
        d = description_fields(cls, d)
        spec = d.pop("embeddings", None)
        if isinstance(spec, str):
            d.update(embeddings_from_spec(spec))
        elif spec is not None:
            d["embeddings"] = np.asarray(spec, np.float64)
        return cls(**d)

    def sample(self, key: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """One sequence: ``x (T-1, d)`` in ``dtype`` and targets ``y (T-1,)`` int32. Pure; jit/vmap-able.

        y_0 is uniform, y_t ~ P[y_{t-1}] (``jax.random.categorical`` in a ``lax.scan``), and
        x_t = mu[y_{t-1}] + sigma eps_t with eps_t ~ N(0, I); the target at x_t is y_t. The symbols
        are drawn in float32 whatever ``dtype`` is, so a key gives the same chain in every x64 mode.
        """
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"StickyMarkov.sample: dtype must be floating point, got {dtype}")
        check_prng_key("key", key, "StickyMarkov.sample")
        k_first, k_chain, k_noise = jax.random.split(key, 3)
        p = self.transition_matrix  # zeros on the diagonal at self_prob = 0: log 0 = -inf, without numpy's warning
        log_p = jnp.asarray(np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), -np.inf), jnp.float32)
        y0 = jax.random.randint(k_first, (), 0, self.n_symbols, dtype=jnp.int32)

        def next_symbol(prev, k):
            nxt = jax.random.categorical(k, log_p[prev]).astype(jnp.int32)
            return nxt, nxt

        _, rest = jax.lax.scan(next_symbol, y0, jax.random.split(k_chain, self.seq_len - 1))
        symbols = jnp.concatenate([y0[None], rest])
        mu = jnp.asarray(self.embeddings, dtype)
        eps = jax.random.normal(k_noise, (self.seq_len - 1, self.d_embed), dtype)
        x = mu[symbols[:-1]] + jnp.asarray(self.noise_std, dtype) * eps
        return x, symbols[1:]

    def _model(self, x) -> tuple[jax.Array, jax.Array]:
        dtype = jnp.result_type(x)
        return jnp.asarray(self.transition_matrix, dtype), jnp.asarray(self.embeddings, dtype)

    def bayes_log_filter(self, x: jax.Array) -> jax.Array:
        """(N, C) log p(y_{t-1} = a | x_1..x_t), the filtered posterior over the previous symbol;
        see :func:`bayes_log_filter`."""

        return bayes_log_filter(*self._model(x), x, noise_std=self.noise_std)

    def bayes_log_predictive(self, x: jax.Array) -> jax.Array:
        """(N, C) log p(y_t | x_1..x_t) of the exact Bayes filter; see :func:`bayes_log_predictive`."""

        return bayes_log_predictive(*self._model(x), x, noise_std=self.noise_std)

    def bayes_predictive(self, x: jax.Array) -> jax.Array:
        """The exact Bayes predictive p(y_t | x_1..x_t), (N, C); see :func:`bayes_predictive`."""

        return bayes_predictive(*self._model(x), x, noise_std=self.noise_std)

    def bayes_loss(self, x: jax.Array, y: jax.Array, weights=None) -> BayesLoss:
        """The Bayes predictor's cross-entropy on ``(x, y)``: a :class:`~gradattn.tasks.base.BayesLoss`."""

        return bayes_loss(*self._model(x), x, y, weights, noise_std=self.noise_std)

    def bayes_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the Bayes predictive at each position."""

        return bayes_entropy(*self._model(x), x, noise_std=self.noise_std)

    def bayes_filter_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the posterior over the previous symbol y_{t-1} at each position."""

        return bayes_filter_entropy(*self._model(x), x, noise_std=self.noise_std)


# ---------------------------------------------------------------------------------------------
# The exact Bayes predictor of a sticky chain: any P (C, C) and means mu (C, d), given explicitly
# (the task's methods above pass its own).
# ---------------------------------------------------------------------------------------------


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
    """A concrete ``noise_std`` must be within the bounds of the task's field (a finite number > 0);
    a traced one is trusted."""
    if is_traced(noise_std):
        return noise_std
    return check_field(StickyMarkov, "noise_std", noise_std, fn)


def _filter(transition_matrix, embeddings, x, noise_std, fn: str):
    """(log beta (N, C), log pred (N, C)) of the chain by the forward algorithm; see the module docstring."""
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
    return _filter(transition_matrix, embeddings, x, noise_std, "bayes_log_filter")[0]


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
    return _filter(transition_matrix, embeddings, x, noise_std, "bayes_log_predictive")[1]


def bayes_predictive(transition_matrix, embeddings, x, *, noise_std=1.0) -> jax.Array:
    """(N, C) p(y_t = c | x_1..x_t): the exact Bayes predictive of the sticky chain; rows sum to 1.

    The hidden state at position t is y_{t-1} (prior of y_0 uniform), emitting x_t ~ N(mu[y_{t-1}], sigma^2 I);
    the filter beta_t(a) = p(y_{t-1} = a | x_1..x_t) is propagated in log space under ``lax.scan``
    and the predictive is beta_t @ P. Shapes and dtype as :func:`bayes_log_predictive`.
    """
    return jnp.exp(bayes_log_predictive(transition_matrix, embeddings, x, noise_std=noise_std))


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
