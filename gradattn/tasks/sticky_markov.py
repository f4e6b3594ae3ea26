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

from gradattn._checks import FLOAT32_MAX, MAX_SEED, check_int, check_number, check_prng_key, is_traced
from gradattn._config import check_fields, option
from gradattn._math import entropy_nats
from gradattn._parse import parse_int
from gradattn.bayes import bayes_entropy, bayes_filter_entropy, bayes_log_predictive, bayes_loss, bayes_predictive

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
    self_prob = check_number("self_prob", self_prob, "sticky_transition_matrix", minimum=0.0, maximum=1.0, exclusive_maximum=True)
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
            seed = parse_int(body) if body[:1] not in "+-" else None
            seed = check_int("embed_seed", seed, fn, minimum=0, maximum=MAX_SEED)
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
class StickyMarkov:
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
        set_ = functools.partial(object.__setattr__, self)
        if n_symbols is not None:
            n_symbols = check_int("n_symbols", n_symbols, fn, minimum=2)
        if d_embed is not None:
            d_embed = check_int("d_embed", d_embed, fn, minimum=1)
        if embed_seed is not None:
            embed_seed = check_int("embed_seed", embed_seed, fn, minimum=0, maximum=MAX_SEED)
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
            n_symbols, d_embed = shape
        else:
            n_symbols = REFERENCE_SHAPE[0] if n_symbols is None else n_symbols
            d_embed = REFERENCE_SHAPE[1] if d_embed is None else d_embed
            if embed_seed is None:
                if (n_symbols, d_embed) == REFERENCE_SHAPE:
                    source = "reference"
                else:
                    embed_seed = 0
        if n_symbols < 2:
            raise ValueError(f"{fn}: n_symbols must be >= 2, got {n_symbols} (from embeddings of shape ({n_symbols}, {d_embed}))")
        set_("n_symbols", n_symbols)
        set_("d_embed", d_embed)
        set_("self_prob", check_number("self_prob", self_prob, fn, minimum=0.0, maximum=1.0, exclusive_maximum=True))
        set_("seq_len", check_int("seq_len", seq_len, fn, minimum=2))
        set_("embed_seed", embed_seed)
        set_("noise_std", check_number("noise_std", noise_std, fn, minimum=0.0, exclusive_minimum=True))
        set_("embedding_source", source)
        check_fields(self, fn, store=False)  # the bounds declared with each field, as the command line takes

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

    # The Task protocol's names for the sizes.
    @property
    def d_in(self) -> int:
        """Input dimension: d = ``d_embed``."""
        return self.d_embed

    @property
    def n_classes(self) -> int:
        """Number of classes: C = ``n_symbols``."""
        return self.n_symbols

    @property
    def n_positions(self) -> int:
        """N = T - 1, the number of (x, y) positions in one sample."""
        return self.seq_len - 1

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
            "name": "StickyMarkov",
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
        d = dict(d)
        if d.pop("name", "StickyMarkov") != "StickyMarkov":
            raise ValueError(f"StickyMarkov.from_dict: not a StickyMarkov description: {d!r}")
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

    def bayes_log_predictive(self, x: jax.Array) -> jax.Array:
        """(N, C) log p(y_t | x_1..x_t) of the exact Bayes filter; see :mod:`gradattn.bayes`."""

        return bayes_log_predictive(*self._model(x), x, noise_std=self.noise_std)

    def bayes_predictive(self, x: jax.Array) -> jax.Array:
        """The exact Bayes predictive p(y_t | x_1..x_t), (N, C); see :mod:`gradattn.bayes`."""

        return bayes_predictive(*self._model(x), x, noise_std=self.noise_std)

    def bayes_loss(self, x: jax.Array, y: jax.Array, weights=None):
        """The Bayes predictor's cross-entropy on ``(x, y)``: a :class:`gradattn.bayes.BayesLoss`."""

        return bayes_loss(*self._model(x), x, y, weights, noise_std=self.noise_std)

    def bayes_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the Bayes predictive at each position."""

        return bayes_entropy(*self._model(x), x, noise_std=self.noise_std)

    def bayes_filter_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the posterior over the previous symbol y_{t-1} at each position."""

        return bayes_filter_entropy(*self._model(x), x, noise_std=self.noise_std)
