"""Probes of a trained token model's geometry: the measurements behind the geometric claims of
Agarwal, Dalal & Misra, *The Bayesian Geometry of Transformer Attention* (arXiv 2512.22471), read
off a :class:`~gradattn.nn.TinyGPT` (and, where it makes sense, the deep
:class:`~gradattn.nn.Transformer`).

Each definition below was taken from the authors' public analysis scripts (repository
``vishalmisra/bayesian-wind-tunnel``) and is restated here in our words; where a script is
ambiguous, or two scripts disagree, the docstring says which one is followed and what the other
does. Every function is pure (no state, no host callbacks); the ones over plain arrays are jit- and
vmap-able and compute in their inputs' floating dtype (float32 by default; float64 arrays give
float64 results, which the tests compare with numpy at 1e-12).

One forward pass, read whole::

    probe_forward(model, x)          ProbeOutputs of one sequence: the residual stream entering
                                     every block and leaving the last, the same after each
                                     block's first norm (and LN_f for the last), every head's
                                     queries, keys, values, scores, weights and contexts, logits
    probe_batch(model, xs)           the same for a batch (B, ...), compiled once per model shape

The value manifold (positions: the supervised ones; covariate: the entropy of the exact posterior)::

    supervised_points(reps, posterior, positions)    rows z (M, D) (or (K, M, D) per layer),
                                                     entropies (M,), position index (M,)
    manifold_stats(z, c, split_key)                  PC1's share of variance, |r| of PC1..PC5 with
                                                     c, dimensions for 90%, linear R^2 of c (80/20)
    split_indices(m, key), split_r2(x, c, split_key) the split, and the R^2 of any features
    shuffled_control(z, c, split_key, shuffle_key)   the same with c permuted across the points
    position_r2(position, c, split_key, n)           R^2 of c from a one-hot of the position alone

The untrained control is no function of its own: it is any probe of the same model at its initial
parameters (build the model from the same key without training it, and call the same probe).

Keys, queries and attention::

    cosine_matrix(vectors)                           pairwise cosines of rows
    key_orthogonality(model, token_ids)              cosines of the keys of the raw token embeddings
    qk_alignment(queries, keys, positions)           cos(query at a supervised position, key at
                                                     each earlier supervised position)
    attention_posterior(alpha, tokens, posterior, positions, value_range)
                                                     a head's attention over value tokens read as a
                                                     distribution over values, against the exact one

Ablations (KL(exact || model) in bits, mean over sequences and supervised positions)::

    posterior_kl_bits(logits, posterior)             the KL per position
    head_ablation(model, xs, posterior, positions)   one head's context zeroed, every (layer, head)
    layer_ablation(model, xs, posterior, positions)  one block bypassed, or its attention or its
                                                     feed-forward output dropped, every layer
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradattn._checks import check_array, check_int, check_number, check_prng_key, concrete
from gradattn._math import LN2, entropy_bits
from gradattn._vmap import grouped_vmap
from gradattn.deep.laws import pure_apply
from gradattn.geometry import explained_variance_ratio, pc_covariate_correlation, pca_spectrum
from gradattn.nn import HeadTaps, TinyGPT, Transformer

NORM_EPS = 1e-12
"""Vectors are divided by max(||v||, 1e-12) before cosines are taken (PyTorch's
``F.normalize`` default, which the authors' scripts call): a zero vector has cosine 0 with
everything instead of NaN."""

TEST_FRACTION = 0.2
"""The held-out share of the points in the linear read-out (the authors' 80/20 split)."""

N_COMPONENTS = 5
"""Principal components whose correlation with the covariate is reported (the authors' PC1..PC5)."""

LAYER_ABLATIONS = ("bypass", "zero_attention", "zero_ffn")
"""The rows of :attr:`LayerAblation.ablated_bits`, in this order."""

# One least-squares solve at a time under vmap (see gradattn._vmap: a batched LAPACK call can
# deadlock XLA's thread pool on a 2-core CPU).
_least_squares = grouped_vmap(lambda a, b: jnp.linalg.lstsq(a, b)[0], 1)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _shape(a) -> tuple:
    return tuple(np.shape(a))


def _check_model(model, fn: str) -> None:
    if not isinstance(model, (TinyGPT, Transformer)):
        raise TypeError(f"{fn}: model must be a gradattn.nn.TinyGPT or Transformer, got {type(model).__name__}")


def _check_inputs(model, inputs, fn: str, *, batched: bool) -> int:
    """Token ids ``(T,)`` (``(B, T)`` batched) for a TinyGPT, or inputs ``(N, d_in)`` (``(B, N,
    d_in)``) for a Transformer; returns the sequence length."""
    check_array("inputs", inputs, fn)
    shape, dtype = _shape(inputs), jnp.result_type(inputs)
    lead = "(B, " if batched else "("
    if isinstance(model, TinyGPT):
        if len(shape) != (2 if batched else 1) or not 1 <= shape[-1] <= model.max_len:
            raise ValueError(f"{fn}: inputs must be token ids of shape {lead}T) with 1 <= T <= max_len = "
                             f"{model.max_len} for this TinyGPT, got shape {shape}")
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"{fn}: inputs must be integer token ids, got dtype {dtype}")
        ic = concrete(inputs)
        if ic is not None and ic.size and (ic.min() < 0 or ic.max() >= model.vocab_size):
            raise ValueError(f"{fn}: inputs (shape {shape}) hold token ids in [{ic.min()}, {ic.max()}], outside "
                             f"[0, vocab_size) = [0, {model.vocab_size})")
        return shape[-1]
    if len(shape) != (3 if batched else 2) or shape[-1] != model.d_in or shape[-2] < 1:
        raise ValueError(f"{fn}: inputs must have shape {lead}N, d_in) with N >= 1 and d_in = {model.d_in} for this "
                         f"Transformer, got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn}: inputs must be floating point for a Transformer, got dtype {dtype}")
    return shape[-2]


def _check_floating(name: str, a, ndims: tuple[int, ...], fn: str, what: str) -> None:
    check_array(name, a, fn)
    if np.ndim(a) not in ndims:
        raise ValueError(f"{fn}: {name} must be {what}, got shape {_shape(a)}")
    if not jnp.issubdtype(jnp.result_type(a), jnp.floating):
        raise TypeError(f"{fn}: {name} must be floating point, got dtype {jnp.result_type(a)}")


def _check_positions(positions, n: int, fn: str) -> tuple[int, ...]:
    """``positions`` as a tuple of ints, strictly increasing, in [0, n), at least one."""
    if isinstance(positions, (str, bytes)) or not isinstance(positions, (Sequence, np.ndarray, jax.Array)):
        raise TypeError(f"{fn}: positions must be a sequence of ints (e.g. task.supervised), got {type(positions).__name__}")
    arr = concrete(positions)
    if arr is None:
        raise TypeError(f"{fn}: positions must be concrete ints (they fix the shapes), not a traced array")
    arr = np.asarray(arr)
    if arr.ndim != 1 or arr.size == 0 or not (np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{fn}: positions must be a non-empty 1-D sequence of ints, got shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n or (np.diff(arr) <= 0).any():
        raise ValueError(f"{fn}: positions must be strictly increasing in [0, {n}) (sequence length {n}), "
                         f"got {arr.tolist()}")
    return tuple(int(p) for p in arr)


def _check_covariate(c, m: int, fn: str, name: str = "c") -> None:
    check_array(name, c, fn)
    if _shape(c) != (m,):
        raise ValueError(f"{fn}: {name} must have shape ({m},), one value per point, got shape {_shape(c)}")
    if not jnp.issubdtype(jnp.result_type(c), jnp.floating):
        raise TypeError(f"{fn}: {name} must be floating point, got dtype {jnp.result_type(c)}")


def _check_points(z, fn: str) -> tuple[int, int]:
    """``z`` (M, D) or (K, M, D), floating; returns (M, D)."""
    _check_floating("z", z, (2, 3), fn, "(M, D) points or (K, M, D), K layers of them")
    return _shape(z)[-2], _shape(z)[-1]


# --------------------------------------------------------------------------------------------
# One forward pass, read whole
# --------------------------------------------------------------------------------------------


class ProbeOutputs(NamedTuple):
    """Everything a probe reads from one forward pass (leading axes: layers, then heads; a batch from
    :func:`probe_batch` has a leading ``B`` before them). L layers, H heads of size d_h, T positions.

    Attributes:
      residuals: (L+1, T, D) the raw residual stream: row l enters block l (row 0 is the embedding,
        token plus position for a TinyGPT, ``x W_in + b_in`` for a Transformer), row L leaves the last
        block. These are the layer-by-layer representations of the authors' ``layerwise_analysis.py``
        and ``manifold_visualization.py`` (unnormalised; their row 0 is the embedding).
      normed: (L+1, T, D) the same after the norm that reads it: row l < L is block l's first norm
        ``ln_1`` applied to ``residuals[l]`` (what that block's attention reads: the authors'
        ``get_block_inputs`` in ``qkv_analysis.py``), row L is the final norm ``ln_f`` applied to
        ``residuals[L]`` (what the output head reads: the representation the authors' PCA in
        ``geometric_analysis.py`` and the value-manifold command of ``qkv_analysis.py``).
      queries, keys, values: (L, H, T, d_h) each head's slice of ``normed[l] W_Q`` (``W_K``, ``W_V``;
        biases included where the model has them).
      scores: (L, H, T, T) q_i . k_j / sqrt(d_h), before the causal mask.
      alpha: (L, H, T, T) attention weights (rows sum to 1 over j <= i).
      contexts: (L, H, T, d_h) g_i = sum_j alpha_ij v_j, what the output projection reads.
      logits: (T, C) the model's output, the very array ``model(x)`` returns.
    """

    residuals: jax.Array
    normed: jax.Array
    queries: jax.Array
    keys: jax.Array
    values: jax.Array
    scores: jax.Array
    alpha: jax.Array
    contexts: jax.Array
    logits: jax.Array


def _forward(model, inputs) -> ProbeOutputs:
    logits, taps, stream = model(inputs, return_taps=True, return_residuals=True)
    blocks = list(model.blocks)
    n, d, h = stream.shape[1], model.d_model, model.n_heads

    def heads(t):  # (T, D) -> (H, T, d_h), the blocks' own split
        return t.reshape(n, h, d // h).transpose(1, 0, 2)

    normed = jnp.stack([*(b.ln_1(stream[i]) for i, b in enumerate(blocks)), model.ln_f(stream[-1])])
    q = jnp.stack([heads(b.q_proj(normed[i])) for i, b in enumerate(blocks)])
    k = jnp.stack([heads(b.k_proj(normed[i])) for i, b in enumerate(blocks)])
    return ProbeOutputs(residuals=stream, normed=normed, queries=q, keys=k, values=taps.values, scores=taps.scores,
                        alpha=taps.alpha, contexts=taps.contexts, logits=logits)


def probe_forward(model: TinyGPT | Transformer, inputs: jax.Array) -> ProbeOutputs:
    """Every intermediate of one forward pass of ``model`` (evaluation mode) on one sequence.

    Args:
      model: a :class:`~gradattn.nn.TinyGPT` or :class:`~gradattn.nn.Transformer`.
      inputs: token ids ``(T,)`` for a TinyGPT, inputs ``(N, d_in)`` for a Transformer.
    Returns:
      :class:`ProbeOutputs`. Its ``logits`` are the model's own output (one call of the model with
      ``return_taps`` and ``return_residuals``), so they equal ``model(inputs)``; the queries and
      keys are recomputed from ``normed`` with the blocks' own projections, and their scaled dot
      products are the ``scores`` the model used. Use ``jax.vmap`` over a batch, or
      :func:`probe_batch`.
    """
    fn = "probe_forward"
    _check_model(model, fn)
    _check_inputs(model, inputs, fn, batched=False)
    return _forward(model, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _probe_batch(graphdef, params, inputs):
    return jax.vmap(lambda x: _forward(nnx.merge(graphdef, params), x))(inputs)


def probe_batch(model: TinyGPT | Transformer, inputs: jax.Array) -> ProbeOutputs:
    """:func:`probe_forward` of every sequence of a batch ``inputs`` (``(B, T)`` token ids, or
    ``(B, N, d_in)``), compiled (once per model structure and shape); every field of the result has
    a leading axis B. The logits are those of the compiled model, equal to ``model(x)`` to rounding."""
    fn = "probe_batch"
    _check_model(model, fn)
    _check_inputs(model, inputs, fn, batched=True)
    graphdef, params = nnx.split(model, nnx.Param)
    return _probe_batch(graphdef, params, jnp.asarray(inputs))


# --------------------------------------------------------------------------------------------
# Points at the supervised positions
# --------------------------------------------------------------------------------------------


class Points(NamedTuple):
    """Representations at the supervised positions of a batch, one row per (sequence, position),
    sequence-major (row ``b S + s`` is sequence b at its s-th supervised position).

    Attributes:
      z: (M, D), or (K, M, D) for K layers of representations; M = B S.
      entropy_bits: (M,) the entropy of the exact posterior at that position, in bits (0 log 0 = 0).
      position: (M,) int32, s: which supervised position (0 .. S-1) the row comes from.
    """

    z: jax.Array
    entropy_bits: jax.Array
    position: jax.Array


def supervised_points(reps: jax.Array, posterior: jax.Array, positions: Sequence[int]) -> Points:
    """The rows of ``reps`` at the supervised ``positions``, with the exact posterior's entropy there.

    The authors take, for the bijection, the final representation (after ``ln_f``) at the position
    where the model predicts a value, paired with the entropy of the exact posterior of that
    prediction (``geometric_analysis.py``; the value-manifold command of ``qkv_analysis.py`` takes
    the last position of each prefix ending on a key, the same position in this library's layout,
    where the targets sit at the keys); for the HMM the positions of the observed symbols with the
    filtering posterior's entropy (``hmm_geometric_analysis.py``). Both are a task's
    ``supervised`` positions and its ``posterior``. Pure; jit-able (``positions`` static).

    Args:
      reps: (B, T, D), e.g. ``probe_batch(...).normed[:, -1]``, or (B, K, T, D) for K layers, e.g.
        ``probe_batch(...).normed`` or ``.residuals``.
      posterior: (B, T, C) the exact posterior (a batch of :class:`~gradattn.tasks.tokens.TokenSample`'s
        ``posterior``).
      positions: the S supervised positions (``task.supervised``), strictly increasing.
    Returns:
      :class:`Points` with M = B S rows.
    """
    fn = "supervised_points"
    _check_floating("reps", reps, (3, 4), fn, "(B, T, D) or (B, K, T, D)")
    _check_floating("posterior", posterior, (3,), fn, "(B, T, C)")
    b, n = _shape(reps)[0], _shape(reps)[-2]
    if _shape(posterior)[:2] != (b, n):
        raise ValueError(f"{fn}: posterior must have shape ({b}, {n}, C) to match reps {_shape(reps)} (B, ..., T, D), "
                         f"got shape {_shape(posterior)}")
    return _points(jnp.asarray(reps), jnp.asarray(posterior), _check_positions(positions, n, fn))


@functools.partial(jax.jit, static_argnums=2)
def _points(reps, posterior, positions: tuple[int, ...]) -> Points:
    idx = jnp.asarray(positions)
    b, s = reps.shape[0], len(positions)
    if reps.ndim == 3:
        z = reps[:, idx, :].reshape(b * s, reps.shape[-1])
    else:
        z = jnp.moveaxis(reps[:, :, idx, :], 1, 0).reshape(reps.shape[1], b * s, reps.shape[-1])
    h = entropy_bits(posterior[:, idx, :], axis=-1).reshape(b * s)
    return Points(z=z, entropy_bits=h, position=jnp.tile(jnp.arange(s, dtype=jnp.int32), b))


# --------------------------------------------------------------------------------------------
# The split and the linear read-out
# --------------------------------------------------------------------------------------------


class SplitR2(NamedTuple):
    """R^2 of a least-squares linear read-out (with intercept) fitted on the training rows.

    Attributes:
      train: R^2 on the training rows.
      test: R^2 on the held-out rows, 1 - sum (c - c_hat)^2 / sum (c - mean c)^2 with the mean of the
        held-out c (scikit-learn's ``score``, which the authors report); it can be negative (a fit
        worse than the held-out mean), and it is NaN when the held-out c is constant.
    """

    train: jax.Array
    test: jax.Array


def split_indices(m: int, key: jax.Array, test_fraction: float = TEST_FRACTION) -> tuple[jax.Array, jax.Array]:
    """A random train/test split of ``m`` points: ``(train, test)`` sorted int32 index arrays.

    The rule: ``perm = jax.random.permutation(key, m)``; the first ``ceil(test_fraction m)`` entries
    are held out (the size scikit-learn's ``train_test_split`` holds out, which the authors call with
    ``test_size=0.2``; the draw itself is JAX's, not numpy's ``random_state=42``). A given key gives
    the same split for every layer and for every control, so they differ only in what is measured.
    Pure and jit-able (``m`` static).

    Raises:
      ValueError: fewer than 2 points on either side.
    """
    fn = "split_indices"
    m = check_int("m", m, fn, minimum=4)
    check_prng_key("key", key, fn)
    return _split(key, m, _check_n_test(m, test_fraction, fn))


def _check_n_test(m: int, test_fraction, fn: str) -> int:
    """The number of held-out points, checked: at least 2 on either side."""
    test_fraction = check_number("test_fraction", test_fraction, fn, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                                 exclusive_maximum=True)
    n_test = math.ceil(test_fraction * m)
    if n_test < 2 or m - n_test < 2:
        raise ValueError(f"{fn}: {m} points with test_fraction={test_fraction} hold out {n_test} and keep {m - n_test}; "
                         "each side needs at least 2")
    return n_test


def _split(key, m: int, n_test: int):
    perm = jax.random.permutation(key, m).astype(jnp.int32)
    return jnp.sort(perm[n_test:]), jnp.sort(perm[:n_test])


def _fit_r2(x, c, train, test) -> SplitR2:
    """Least squares of c on x with an intercept over the ``train`` rows; R^2 on both sides."""
    xt, ct = x[train], c[train]
    mx, mc = jnp.mean(xt, axis=0), jnp.mean(ct)
    coef = _least_squares(xt - mx, ct - mc)

    def r2(rows):
        y = c[rows]
        resid = jnp.sum((y - ((x[rows] - mx) @ coef + mc)) ** 2)
        total = jnp.sum((y - jnp.mean(y)) ** 2)
        return jnp.where(total > 0, 1.0 - resid / jnp.where(total > 0, total, 1.0), jnp.nan)

    return SplitR2(train=r2(train), test=r2(test))


def split_r2(features: jax.Array, c: jax.Array, split_key: jax.Array, test_fraction: float = TEST_FRACTION) -> SplitR2:
    """R^2 of the least-squares linear read-out of ``c`` from ``features`` with an intercept, fitted
    on the training rows of :func:`split_indices` ``(M, split_key, test_fraction)`` and scored on both
    sides (the authors' ``LinearRegression`` on an 80/20 ``train_test_split``). Rank-deficient
    features are solved in the minimum-norm sense (``jnp.linalg.lstsq``). Pure; jit-able.

    Args:
      features: (M, F) floating; ``c``: (M,) floating (cast to the features' dtype).
    Returns:
      :class:`SplitR2`. The fit means little unless the training rows outnumber F + 1.
    """
    fn = "split_r2"
    _check_floating("features", features, (2,), fn, "(M, F): one row of features per point")
    m = _shape(features)[0]
    _check_covariate(c, m, fn)
    check_prng_key("split_key", split_key, fn)
    return _split_r2(jnp.asarray(features), jnp.asarray(c), split_key, _check_n_test(m, test_fraction, fn))


@functools.partial(jax.jit, static_argnums=3)
def _split_r2(x, c, key, n_test: int) -> SplitR2:
    train, test = _split(key, x.shape[0], n_test)
    return _fit_r2(x, c.astype(x.dtype), train, test)


# --------------------------------------------------------------------------------------------
# The value manifold and its controls
# --------------------------------------------------------------------------------------------


class ManifoldStats(NamedTuple):
    """The authors' per-layer statistics of a cloud of representations against a covariate (from
    ``analyze_layer`` of ``layerwise_analysis.py`` / ``hmm_geometric_analysis.py`` and
    ``analyze_manifold`` of ``geometric_analysis.py``). With K layers every field has a leading K.

    Attributes:
      explained: (k,) the variance share of the k leading principal components (of the total
        variance of the centred points, all components counted).
      pc1_share: PC1's share, ``explained[0]``.
      dims_90: the number of leading components whose shares first reach 0.9 in total (int32; the
        whole spectrum is searched, where the authors search their first 10 components).
      pc_abs_corr: (k,) |Pearson r| between each leading component's scores and the covariate (0 for
        a component of zero variance).
      max_abs_corr: the largest of them (the authors' "entropy correlation": the PC among the first
        five most correlated with the entropy).
      best_pc: its index in ``pc_abs_corr`` (0 is PC1), int32.
      r2_train, r2_test: the linear read-out of the covariate from all D dimensions (:class:`SplitR2`).
    """

    explained: jax.Array
    pc1_share: jax.Array
    dims_90: jax.Array
    pc_abs_corr: jax.Array
    max_abs_corr: jax.Array
    best_pc: jax.Array
    r2_train: jax.Array
    r2_test: jax.Array


def _manifold_one(z, c, train, test, k: int) -> ManifoldStats:
    ratio = explained_variance_ratio(pca_spectrum(z))
    dims_90 = jnp.minimum(jnp.sum(jnp.cumsum(ratio) < 0.9) + 1, ratio.shape[0]).astype(jnp.int32)
    corr = pc_covariate_correlation(z, c, k)
    r2 = _fit_r2(z, c, train, test)
    return ManifoldStats(explained=ratio[:k], pc1_share=ratio[0], dims_90=dims_90, pc_abs_corr=corr,
                         max_abs_corr=jnp.max(corr), best_pc=jnp.argmax(corr).astype(jnp.int32),
                         r2_train=r2.train, r2_test=r2.test)


def manifold_stats(z: jax.Array, c: jax.Array, split_key: jax.Array, n_components: int = N_COMPONENTS,
                   test_fraction: float = TEST_FRACTION) -> ManifoldStats:
    """How a cloud of representations lines up with a covariate, layer by layer when given layers.

    PCA is of the centred points (:func:`gradattn.geometry.pca_spectrum`,
    :func:`gradattn.geometry.pc_covariate_correlation`); the read-out is :func:`split_r2` of ``c``
    from all D coordinates on the split of ``split_key`` (the same split for every layer). Pure;
    jit-able (vmapped over layers).

    Args:
      z: (M, D) points, or (K, M, D): K layers of the same M points (:func:`supervised_points`).
      c: (M,) the covariate, e.g. the exact posterior's entropy in bits.
      split_key: the PRNG key of the train/test split (:func:`split_indices`).
      n_components: k, the leading components reported (5, the authors' PC1..PC5); at most
        min(M, D) are used.
    Returns:
      :class:`ManifoldStats`; a representation that is an exact affine function of c has
      ``pc1_share`` 1, ``max_abs_corr`` 1 and R^2 1.
    """
    fn = "manifold_stats"
    m, d = _check_points(z, fn)
    _check_covariate(c, m, fn)
    k = min(check_int("n_components", n_components, fn), m, d)
    check_prng_key("split_key", split_key, fn)
    return _manifold(jnp.asarray(z), jnp.asarray(c), split_key, None, _check_n_test(m, test_fraction, fn), k)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _manifold(z, c, split_key, shuffle_key, n_test: int, k: int) -> ManifoldStats:
    """:func:`manifold_stats` compiled (``c`` permuted first under ``shuffle_key`` unless it is None)."""
    m = z.shape[-2]
    c = c.astype(z.dtype)
    if shuffle_key is not None:
        c = c[jax.random.permutation(shuffle_key, m)]
    train, test = _split(split_key, m, n_test)
    one = functools.partial(_manifold_one, c=c, train=train, test=test, k=k)
    return one(z) if z.ndim == 2 else jax.vmap(one)(z)


def shuffled_control(z: jax.Array, c: jax.Array, split_key: jax.Array, shuffle_key: jax.Array,
                     n_components: int = N_COMPONENTS, test_fraction: float = TEST_FRACTION) -> ManifoldStats:
    """:func:`manifold_stats` with the covariate permuted across the M points
    (``jax.random.permutation(shuffle_key, M)``), the split the same as the real measurement's when
    ``split_key`` is. Whatever survives the shuffle is not about c: correlations near 0 and a held-out
    R^2 near 0 (or below it) are what a representation that tracks c should lose."""
    fn = "shuffled_control"
    m, d = _check_points(z, fn)
    _check_covariate(c, m, fn)
    k = min(check_int("n_components", n_components, fn), m, d)
    check_prng_key("split_key", split_key, fn)
    check_prng_key("shuffle_key", shuffle_key, fn)
    return _manifold(jnp.asarray(z), jnp.asarray(c), split_key, shuffle_key, _check_n_test(m, test_fraction, fn), k)


def position_r2(position: jax.Array, c: jax.Array, split_key: jax.Array, n_positions: int,
                test_fraction: float = TEST_FRACTION) -> SplitR2:
    """R^2 of ``c`` read out from the position alone: :func:`split_r2` on the one-hot of ``position``
    (so the fit predicts each position's mean c over the training rows).

    The control for a covariate that the position already determines: without replacement the
    bijection's exact entropy is log2(V - t + 1) at the t-th key, a function of the position alone,
    and this predictor's R^2 is 1 there; a representation's R^2 says more than the position only
    where it exceeds this one (with replacement, or on the HMM, where c varies within a position).

    Args:
      position: (M,) integers in [0, n_positions) (:attr:`Points.position`).
      c: (M,) floating.   split_key: as in :func:`manifold_stats` (use the same key).
      n_positions: the number of distinct positions.
    """
    fn = "position_r2"
    check_array("position", position, fn)
    if np.ndim(position) != 1:
        raise ValueError(f"{fn}: position must have shape (M,), got shape {_shape(position)}")
    if not jnp.issubdtype(jnp.result_type(position), jnp.integer):
        raise TypeError(f"{fn}: position must hold integers, got dtype {jnp.result_type(position)}")
    m = _shape(position)[0]
    _check_covariate(c, m, fn)
    n_positions = check_int("n_positions", n_positions, fn)
    pc = concrete(position)
    if pc is not None and pc.size and (pc.min() < 0 or pc.max() >= n_positions):
        raise ValueError(f"{fn}: position (shape {_shape(position)}) holds values in [{pc.min()}, {pc.max()}], outside "
                         f"[0, n_positions) = [0, {n_positions})")
    c = jnp.asarray(c)
    return split_r2(jax.nn.one_hot(position, n_positions, dtype=c.dtype), c, split_key, test_fraction)


# --------------------------------------------------------------------------------------------
# Keys and queries
# --------------------------------------------------------------------------------------------


def _unit(v):
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), NORM_EPS)


def cosine_matrix(vectors: jax.Array) -> jax.Array:
    """Pairwise cosines of the rows of ``vectors (..., n, d)``: ``(..., n, n)``, each row divided by
    max(||row||, 1e-12) first (:data:`NORM_EPS`). Pure; jit/vmap-able."""
    _check_floating("vectors", vectors, tuple(range(2, 33)), "cosine_matrix", "(..., n, d) with at least 2 axes")
    u = _unit(jnp.asarray(vectors))
    return jnp.einsum("...id,...jd->...ij", u, u)


class KeyOrthogonality(NamedTuple):
    """The keys of a set of token embeddings, per layer and head (leading axes (L, H)).

    Attributes:
      cosine: (L, H, n, n) the cosines between the n tokens' keys.
      offdiag_mean: (L, H) the mean of the n (n - 1) off-diagonal cosines, signed: the statistic of
        the orthogonality command of the authors' ``qkv_analysis.py`` (0 for orthogonal keys).
      offdiag_abs_mean: (L, H) the mean of their absolute values: the statistic of
        ``measure_key_orthogonality`` in the authors' ``src/utils/geometry.py`` (which also floors
        the norm at 1e-8, not 1e-12); opposite signs cannot cancel in it.
      offdiag_std: (L, H) their standard deviation (population, numpy's default, as the authors).
    """

    cosine: jax.Array
    offdiag_mean: jax.Array
    offdiag_abs_mean: jax.Array
    offdiag_std: jax.Array


def _offdiag(cos):
    n = cos.shape[-1]
    mask = ~jnp.eye(n, dtype=bool)
    count = n * (n - 1)
    mean = jnp.sum(jnp.where(mask, cos, 0.0), axis=(-2, -1)) / count
    abs_mean = jnp.sum(jnp.where(mask, jnp.abs(cos), 0.0), axis=(-2, -1)) / count
    dev = jnp.where(mask, cos - mean[..., None, None], 0.0)
    std = jnp.sqrt(jnp.sum(dev * dev, axis=(-2, -1)) / count)
    return mean, abs_mean, std


def key_orthogonality(model: TinyGPT, token_ids: jax.Array | None = None, *, through_norm: bool = False) -> KeyOrthogonality:
    """Cosines between the keys that every head of every layer gives a set of token embeddings.

    The authors' definition (the orthogonality command of ``qkv_analysis.py``): the key of token
    ``t`` for head h of layer l is ``E[t] W_K^l`` restricted to the head's slice, where ``E[t]`` is
    the raw token embedding: no position embedding, no norm, no bias; the keys are normalised and
    their cosine matrix summarised by its off-diagonal mean (and standard deviation). Only layer 0
    sees the embeddings, so ``[0]`` is the claim ("orthogonal key bases"); the later layers apply
    their W_K to the same raw embeddings, as the authors' loop does, which is a property of the
    matrices rather than of keys the model computes.

    Args:
      model: a :class:`~gradattn.nn.TinyGPT` (a Transformer has no token embeddings).
      token_ids: the n >= 2 tokens, integers in [0, vocab_size); ``None`` (default): every token id,
        as the authors (whose bijection model shares one set of ids between keys and values). For
        :class:`~gradattn.tasks.bijection_tokens.BijectionTokens`, ``jnp.arange(task.V)`` takes the
        key tokens only.
      through_norm: apply the layer's first norm ``ln_1`` to the embeddings first (its learned
        scale changes the directions; the authors do not).
    Returns:
      :class:`KeyOrthogonality`, in the model's dtype.
    """
    fn = "key_orthogonality"
    if not isinstance(model, TinyGPT):
        raise TypeError(f"{fn}: model must be a gradattn.nn.TinyGPT (keys of token embeddings), got {type(model).__name__}")
    if not isinstance(through_norm, (bool, np.bool_)):
        raise TypeError(f"{fn}: through_norm must be a bool, got {through_norm!r}")
    if token_ids is None:
        token_ids = jnp.arange(model.vocab_size)
    check_array("token_ids", token_ids, fn)
    if np.ndim(token_ids) != 1 or _shape(token_ids)[0] < 2:
        raise ValueError(f"{fn}: token_ids must have shape (n,) with n >= 2, got shape {_shape(token_ids)}")
    if not jnp.issubdtype(jnp.result_type(token_ids), jnp.integer):
        raise TypeError(f"{fn}: token_ids must hold integers, got dtype {jnp.result_type(token_ids)}")
    tc = concrete(token_ids)
    if tc is not None and (tc.min() < 0 or tc.max() >= model.vocab_size):
        raise ValueError(f"{fn}: token_ids (shape {_shape(token_ids)}) hold ids in [{tc.min()}, {tc.max()}], outside "
                         f"[0, vocab_size) = [0, {model.vocab_size})")
    e = model.tok.embedding[...][jnp.asarray(token_ids)]
    n, h = e.shape[0], model.n_heads
    keys = []
    for block in model.blocks:
        a = block.ln_1(e) if through_norm else e
        keys.append((a @ block.k_proj.kernel[...]).reshape(n, h, model.head_size).transpose(1, 0, 2))
    return _key_stats(jnp.stack(keys))


@jax.jit
def _key_stats(keys) -> KeyOrthogonality:
    u = _unit(keys)
    cos = jnp.einsum("...id,...jd->...ij", u, u)
    mean, abs_mean, std = _offdiag(cos)
    return KeyOrthogonality(cosine=cos, offdiag_mean=mean, offdiag_abs_mean=abs_mean, offdiag_std=std)


class QKAlignment(NamedTuple):
    """Query-key alignment between supervised positions (S of them), per layer.

    Attributes:
      cosine: (L, H, S, S) at [l, h, i, j]: the cosine between head h's query at the i-th supervised
        position and its key at the j-th, for j < i; NaN for j >= i.
      head_mean: (L, S, S) its mean over the heads (the authors' matrix, one per layer).
      layer_mean: (L,) the mean of ``head_mean`` over its S (S - 1) / 2 defined entries (NaN for S = 1).
    """

    cosine: jax.Array
    head_mean: jax.Array
    layer_mean: jax.Array


def qk_alignment(queries: jax.Array, keys: jax.Array, positions: Sequence[int]) -> QKAlignment:
    """The Q-K alignment of the authors' ``qkv_analysis.py`` (its ``qk-align`` command).

    For the bijection in the authors' layout ``[k_1, v_1, ..., k_t]``, they take at each layer the
    query of the last position (the key k_t, where the value is predicted) and the keys of the earlier
    key positions k_1 .. k_{t-1}, both as the block computes them from its normed input, normalise
    each, and average the cosines over the heads: row t of their matrix. With ``positions`` the
    supervised positions (the key positions here too) row i of :attr:`QKAlignment.head_mean` is their
    row i + 1: a causal model's queries and keys at those positions are the same whether the
    sequence stops at k_t or goes on, so one pass over the whole sequence gives every row.
    Pure; jit/vmap-able (``positions`` static).

    Args:
      queries, keys: (L, H, T, d_h), e.g. :attr:`ProbeOutputs.queries` and ``.keys``.
      positions: S strictly increasing positions in [0, T) (``task.supervised``).
    """
    fn = "qk_alignment"
    _check_floating("queries", queries, (4,), fn, "(L, H, T, d_h)")
    _check_floating("keys", keys, (4,), fn, "(L, H, T, d_h)")
    if _shape(keys) != _shape(queries):
        raise ValueError(f"{fn}: keys must have the shape of queries {_shape(queries)}, got shape {_shape(keys)}")
    return _qk(jnp.asarray(queries), jnp.asarray(keys), _check_positions(positions, _shape(queries)[2], fn))


@functools.partial(jax.jit, static_argnums=2)
def _qk(queries, keys, positions: tuple[int, ...]) -> QKAlignment:
    idx = jnp.asarray(positions)
    q, k = _unit(queries[:, :, idx]), _unit(keys[:, :, idx])
    s = idx.shape[0]
    earlier = jnp.tril(jnp.ones((s, s), dtype=bool), k=-1)
    cos = jnp.where(earlier, jnp.einsum("lhid,lhjd->lhij", q, k), jnp.nan)
    head_mean = jnp.mean(cos, axis=1)
    count = s * (s - 1) // 2
    total = jnp.sum(jnp.where(earlier, head_mean, 0.0), axis=(-2, -1))
    layer_mean = total / count if count else jnp.full_like(total, jnp.nan)
    return QKAlignment(cosine=cos, head_mean=head_mean, layer_mean=layer_mean)


# --------------------------------------------------------------------------------------------
# Attention read as a posterior (the bijection)
# --------------------------------------------------------------------------------------------


class AttentionPosterior(NamedTuple):
    """Each head's attention at the supervised positions read as a distribution over the values
    (leading axes (L, H, S); n values).

    Attributes:
      distribution: (L, H, S, n) q(v): the attention on the context positions holding value v,
        divided by the attention on all context positions holding a value (all 0 where none is
        attended).
      value_mass: (L, H, S) the attention on context positions holding a value, of the row's 1.
      possible_mass: (L, H, S) the part of it on positions whose value is still possible (the exact
        posterior gives it mass).
      kl_bits: (L, H, S) KL(exact || q) in bits over the values, +inf where the exact posterior puts
        mass on a value that q does not (a value no attended position holds).
    """

    distribution: jax.Array
    value_mass: jax.Array
    possible_mass: jax.Array
    kl_bits: jax.Array


def attention_posterior(alpha: jax.Array, tokens: jax.Array, posterior: jax.Array, positions: Sequence[int],
                        value_range: tuple[int, int]) -> AttentionPosterior:
    """Whether a head's attention, where the model predicts a value, is a posterior over the values.

    The authors' listed scripts hold no such computation (their attention appears only as raw dumps
    and in the ablations), so the definition is ours. At a supervised position i, every context
    position j < i whose token is a value token (an id in ``value_range``) holds one candidate
    answer: the value that token names. The head's weights alpha_ij on those positions, summed per
    value and divided by their total, are a distribution q over the values; it is compared with the
    exact posterior p over the same values by KL(p || q), and the mass on values that p still allows
    is reported beside the total mass on values.

    What the task must provide: value tokens whose ids are also the class ids of the answers they
    name (``tokens[j]`` indexes ``posterior``'s last axis), answers confined to ``value_range``, and
    an exact posterior over them. :class:`~gradattn.tasks.bijection_tokens.BijectionTokens` does:
    ``value_range = task.class_range = (V, 2V)``, the supervised positions are the keys. Without
    replacement every value in context is already taken by another key, so p gives none of them mass:
    ``possible_mass`` is 0 and ``kl_bits`` +inf by construction, and ``value_mass`` is the attention on
    ruled-out answers (elimination). With replacement, at a key seen before, p is a point mass on the
    value that key revealed, and ``kl_bits = -log2 q(that value)``: 0 for a head that retrieves it.
    Pure; jit/vmap-able (``positions`` and ``value_range`` static).

    Args:
      alpha: (L, H, T, T) attention weights (:attr:`ProbeOutputs.alpha`).
      tokens: (T,) the token ids.   posterior: (T, C) the exact posterior.
      positions: S strictly increasing positions in [0, T) (``task.supervised``).
      value_range: (lo, hi), 0 <= lo < hi <= C: the value tokens' ids, and the classes of the answers.
    """
    fn = "attention_posterior"
    _check_floating("alpha", alpha, (4,), fn, "(L, H, T, T)")
    n = _shape(alpha)[-1]
    if _shape(alpha)[-2] != n:
        raise ValueError(f"{fn}: alpha must have shape (L, H, T, T), got shape {_shape(alpha)}")
    check_array("tokens", tokens, fn)
    if _shape(tokens) != (n,):
        raise ValueError(f"{fn}: tokens must have shape ({n},) to match alpha {_shape(alpha)}, got shape {_shape(tokens)}")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise TypeError(f"{fn}: tokens must hold integer token ids, got dtype {jnp.result_type(tokens)}")
    _check_floating("posterior", posterior, (2,), fn, f"({n}, C): one row per position")
    if _shape(posterior)[0] != n:
        raise ValueError(f"{fn}: posterior must have shape ({n}, C) to match alpha {_shape(alpha)}, got shape "
                         f"{_shape(posterior)}")
    n_classes = _shape(posterior)[1]
    if (not isinstance(value_range, (tuple, list)) or len(value_range) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value_range)):
        raise TypeError(f"{fn}: value_range must be a pair of ints (lo, hi), got {value_range!r}")
    lo, hi = int(value_range[0]), int(value_range[1])
    if not 0 <= lo < hi <= n_classes:
        raise ValueError(f"{fn}: value_range must satisfy 0 <= lo < hi <= C = {n_classes} (posterior {_shape(posterior)}), "
                         f"got {value_range!r}")
    pos = _check_positions(positions, n, fn)
    return _attention_posterior(jnp.asarray(alpha), jnp.asarray(tokens), jnp.asarray(posterior), pos, lo, hi)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _attention_posterior(alpha, tokens, posterior, positions: tuple[int, ...], lo: int, hi: int) -> AttentionPosterior:
    n = alpha.shape[-1]
    idx = jnp.asarray(positions)
    dtype = alpha.dtype
    p = posterior.astype(dtype)[idx, lo:hi]  # (S, n_values)
    holds = (tokens[:, None] == jnp.arange(lo, hi)[None, :]).astype(dtype)  # (T, n_values): position j holds value v
    before = (jnp.arange(n)[None, :] < idx[:, None]).astype(dtype)  # (S, T): j is context of i
    mass = jnp.einsum("lhsj,sj,jv->lhsv", alpha[:, :, idx, :], before, holds)  # (L, H, S, n_values)
    value_mass = jnp.sum(mass, axis=-1)
    possible_mass = jnp.sum(jnp.where(p > 0, mass, 0.0), axis=-1)
    q = mass / jnp.where(value_mass > 0, value_mass, 1.0)[..., None]
    support = p > 0
    log_p = jnp.log(jnp.where(support, p, 1.0))
    log_q = jnp.log(q)  # -inf where q is 0: an infinite KL wherever p has mass there
    kl = jnp.sum(jnp.where(support, p * (log_p - log_q), 0.0), axis=-1) / LN2
    return AttentionPosterior(distribution=q, value_mass=value_mass, possible_mass=possible_mass, kl_bits=kl)


# --------------------------------------------------------------------------------------------
# Ablations
# --------------------------------------------------------------------------------------------


def posterior_kl_bits(logits: jax.Array, posterior: jax.Array) -> jax.Array:
    """KL(exact || model) in bits per position: sum_c p_c (ln p_c - ln softmax(logits)_c) / ln 2
    over the classes where p_c > 0 (mass the model puts on a class p rules out counts against it).
    ``logits`` and ``posterior`` are ``(..., C)``; returns ``(...)``. Pure; jit/vmap-able."""
    fn = "posterior_kl_bits"
    _check_floating("logits", logits, tuple(range(1, 33)), fn, "(..., C)")
    check_array("posterior", posterior, fn)
    if _shape(posterior) != _shape(logits):
        raise ValueError(f"{fn}: posterior must have the shape of logits {_shape(logits)}, got shape {_shape(posterior)}")
    logits = jnp.asarray(logits)
    p = jnp.asarray(posterior, logits.dtype)
    support = p > 0
    log_q = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.where(support, p * (jnp.log(jnp.where(support, p, 1.0)) - log_q), 0.0), axis=-1) / LN2


class HeadAblation(NamedTuple):
    """KL(exact || model) in bits, mean over the sequences and the supervised positions.

    Attributes:
      baseline_bits: the intact model's.
      ablated_bits: (L, H) with head h of layer l's context zeroed.
      delta_bits: (L, H) ``ablated_bits - baseline_bits``: what the head is worth.
    """

    baseline_bits: jax.Array
    ablated_bits: jax.Array
    delta_bits: jax.Array


class LayerAblation(NamedTuple):
    """KL(exact || model) in bits, mean over the sequences and the supervised positions.

    Attributes:
      baseline_bits: the intact model's.
      ablated_bits: (3, L), rows :data:`LAYER_ABLATIONS`: block l bypassed (its output is its input),
        its attention output dropped, its feed-forward output dropped.
      delta_bits: (3, L) ``ablated_bits - baseline_bits``.
    """

    baseline_bits: jax.Array
    ablated_bits: jax.Array
    delta_bits: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _ablations(graphdef, params, inputs, posterior, positions: tuple[int, ...], kind: str):
    """The baseline mean KL and, per ablation, the ablated one; one compiled program per model
    structure, shapes, positions and kind. The ablations run in turn (``lax.map``), each vmapped
    over the batch."""
    apply = pure_apply(graphdef)
    idx = jnp.asarray(positions)

    def mean_kl(logits):  # (B, T, C)
        return jnp.mean(posterior_kl_bits(logits[:, idx], posterior[:, idx]))

    logits, taps = jax.vmap(lambda x: apply(params, x, return_taps=True))(inputs)
    n_layers, n_heads = taps.contexts.shape[1:3]
    if kind == "head":
        # Adding -g to one head's context zeroes it exactly (g + (-g) = 0), the authors' head mask
        # set to 0; the other heads get -0.0 added, which leaves them exactly as they were.
        g = taps.contexts  # (B, L, H, T, d_h)
        select = jnp.eye(n_layers * n_heads, dtype=g.dtype).reshape(n_layers * n_heads, n_layers, n_heads)

        def one(sel):
            minus_g = -g * sel[None, :, :, None, None]
            return mean_kl(jax.vmap(lambda x, p: apply(params, x, perturb=HeadTaps(contexts=p)))(inputs, minus_g))

        ablated = jax.lax.map(one, select).reshape(n_layers, n_heads)
    else:
        keep = np.ones((len(LAYER_ABLATIONS), n_layers, n_layers, 2), np.int32)
        for layer in range(n_layers):
            keep[0, layer, layer, :] = 0  # bypass: neither output added
            keep[1, layer, layer, 0] = 0  # the attention output dropped
            keep[2, layer, layer, 1] = 0  # the feed-forward output dropped

        def one(mask):
            return mean_kl(jax.vmap(lambda x: apply(params, x, sublayer_mask=mask))(inputs))

        masks = jnp.asarray(keep.reshape(-1, n_layers, 2))
        ablated = jax.lax.map(one, masks).reshape(len(LAYER_ABLATIONS), n_layers)
    base = mean_kl(logits)
    return base, ablated


def _check_ablation_inputs(model, inputs, posterior, positions, fn: str) -> tuple[int, ...]:
    _check_model(model, fn)
    n = _check_inputs(model, inputs, fn, batched=True)
    b = _shape(inputs)[0]
    _check_floating("posterior", posterior, (3,), fn, f"(B, T, C) = ({b}, {n}, {model.n_classes})")
    if _shape(posterior) != (b, n, model.n_classes):
        raise ValueError(f"{fn}: posterior must have shape (B, T, C) = ({b}, {n}, {model.n_classes}) to match inputs "
                         f"{_shape(inputs)} and the model's {model.n_classes} classes, got shape {_shape(posterior)}")
    return _check_positions(positions, n, fn)


def head_ablation(model: TinyGPT | Transformer, inputs: jax.Array, posterior: jax.Array,
                  positions: Sequence[int]) -> HeadAblation:
    """What each head is worth: the change of the mean KL(exact || model) when its output is zeroed.

    Ablating head h of layer l sets its context g^h (the attention-weighted values, before the
    output projection) to 0 at every position, the authors' head mask in ``head_ablation.py`` (which
    multiplies the head's output by 0 before the heads are merged); here it is the model's
    ``perturb=HeadTaps(contexts=-g)`` on that head. The measure is this library's wind-tunnel metric,
    KL(exact || model) in bits at the supervised positions (:func:`posterior_kl_bits`), averaged over
    the batch and the positions; the authors report the change of accuracy and of the entropy error
    at the query instead. Dropout is off.

    Args:
      model: a :class:`~gradattn.nn.TinyGPT` or :class:`~gradattn.nn.Transformer`.
      inputs: a batch, ``(B, T)`` token ids (or ``(B, N, d_in)``).
      posterior: (B, T, C) the exact posterior, C the model's classes.
      positions: the supervised positions (``task.supervised``).
    Returns:
      :class:`HeadAblation`, in the model's dtype; compiled once per model structure and shapes.
    """
    pos = _check_ablation_inputs(model, inputs, posterior, positions, "head_ablation")
    graphdef, params = nnx.split(model, nnx.Param)
    base, ablated = _ablations(graphdef, params, jnp.asarray(inputs), jnp.asarray(posterior), pos, "head")
    return HeadAblation(baseline_bits=base, ablated_bits=ablated, delta_bits=ablated - base)


def layer_ablation(model: TinyGPT | Transformer, inputs: jax.Array, posterior: jax.Array,
                   positions: Sequence[int]) -> LayerAblation:
    """What each block is worth: the change of the mean KL(exact || model) under the three
    single-layer ablations of the authors' ``layer_ablation.py``, each applied to one layer at a time:

    * ``bypass``: the block returns its input unchanged (neither its attention nor its feed-forward
      output is added to the residual stream);
    * ``zero_attention``: the attention module's output (after the output projection, its bias
      included where there is one) is replaced by 0; the feed-forward still runs;
    * ``zero_ffn``: the feed-forward module's output is replaced by 0.

    Implemented with the model's ``sublayer_mask``. Measure and arguments as :func:`head_ablation`
    (the authors report accuracy and the entropy error at the query).

    Returns:
      :class:`LayerAblation`, in the model's dtype.
    """
    pos = _check_ablation_inputs(model, inputs, posterior, positions, "layer_ablation")
    graphdef, params = nnx.split(model, nnx.Param)
    base, ablated = _ablations(graphdef, params, jnp.asarray(inputs), jnp.asarray(posterior), pos, "layer")
    return LayerAblation(baseline_bits=base, ablated_bits=ablated, delta_bits=ablated - base)
