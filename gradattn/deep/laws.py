"""The first-order laws of every head inside the deep model, and their check against autodiff.

For head h of layer l (dropout off), with alpha^h its attention weights, v^h_j its values and
u^h_i = dL/dg^h_i the gradient of the whole model's loss at its context (``jax.vjp`` through the
output projection, the residual stream and every later layer)::

    b^h_ij = u^h_i . v^h_j                        compatibility      (gradattn.laws.compatibility)
    a^h_ij = sum_k alpha^h_ik b^h_ik - b^h_ij     advantage          (gradattn.laws.advantage)
    dL/ds^h_ij = -alpha^h_ij a^h_ij               routing law        (gradattn.laws.routing_grad)
    dL/dv^h_j  = sum_i alpha^h_ij u^h_i           value law          (gradattn.laws.value_grad)

hold unchanged (:func:`head_laws`; :func:`deep_law_errors` checks them against autodiff).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gradattn import laws
from gradattn._checks import check_array, check_int, check_labels, check_prng_key, check_weights
from gradattn.head import causal_mask, normalised_weights, token_losses
from gradattn.nn import HeadTaps, TinyGPT, Transformer
from gradattn.verify import relative_error


class HeadLaws(NamedTuple):
    """The first-order laws of every head of a model on one sequence, leading axes ``(L, H)``.

    Attributes:
      loss: scalar, the model's weighted mean cross-entropy (dropout off).
      alpha: (L, H, N, N) attention weights.
      values: (L, H, N, d_h) v_j.
      u: (L, H, N, d_h) u_i = dL/dg_i at the head's context, through the rest of the network.
      compatibility: (L, H, N, N) b_ij = u_i . v_j.
      advantage: (L, H, N, N) a_ij = sum_k alpha_ik b_ik - b_ij.
      routing_grad: (L, H, N, N) dL/ds_ij = -alpha_ij a_ij.
      value_grad: (L, H, N, d_h) dL/dv_j = sum_i alpha_ij u_i.
    """

    loss: jax.Array
    alpha: jax.Array
    values: jax.Array
    u: jax.Array
    compatibility: jax.Array
    advantage: jax.Array
    routing_grad: jax.Array
    value_grad: jax.Array

    def at(self, layer: int, head: int) -> HeadLaws:
        """The laws of one head (leaves without the (L, H) axes; ``loss`` unchanged)."""
        return HeadLaws(self.loss, *(a[layer, head] for a in self[1:]))


def mean_loss(logits, y, weights):
    return jnp.sum(normalised_weights(weights, logits.shape[0], logits.dtype) * token_losses(logits, y))


def laws_of(apply, params, x, y, weights, shape) -> HeadLaws:
    """:func:`head_laws` on a pure ``apply(params, x, perturb=..., return_taps=...)`` (input trusted;
    ``shape`` is (L, H, N, d_h))."""

    def loss_at_contexts(dg):
        logits, taps = apply(params, x, perturb=HeadTaps(contexts=dg), return_taps=True)
        return mean_loss(logits, y, weights), taps

    dtype = jax.tree.leaves(params)[0].dtype  # the model's (x may hold token ids)
    loss, pullback, taps = jax.vjp(loss_at_contexts, jnp.zeros(shape, dtype), has_aux=True)
    (u,) = pullback(jnp.ones_like(loss))
    per_head = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731  (over layers, then heads)
    b = per_head(laws.compatibility)(u, taps.values)
    return HeadLaws(
        loss=loss,
        alpha=taps.alpha,
        values=taps.values,
        u=u,
        compatibility=b,
        advantage=per_head(laws.advantage)(taps.alpha, b),
        routing_grad=per_head(laws.routing_grad)(taps.alpha, b),
        value_grad=per_head(laws.value_grad)(taps.alpha, u),
    )


def pure_apply(graphdef):
    """``apply(params, x, **kw)``: the model of ``graphdef`` with ``params``, as a pure function."""

    def apply(params, x, **kw):
        return nnx.merge(graphdef, params)(x, **kw)

    return apply


def _check_xy(model, x, y, weights, fn):
    check_array("x", x, fn)
    if isinstance(model, TinyGPT):
        if jnp.ndim(x) != 1 or not 1 <= jnp.shape(x)[0] <= model.max_len or not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"{fn}: x must be token ids of shape (T,) with 1 <= T <= {model.max_len} for a TinyGPT, got "
                             f"shape {tuple(jnp.shape(x))} and dtype {jnp.result_type(x)}")
    elif isinstance(model, Transformer):
        if jnp.ndim(x) != 2 or jnp.shape(x)[1] != model.d_in or jnp.shape(x)[0] < 1:
            raise ValueError(f"{fn}: x must have shape (N, d_in) with N >= 1 and d_in = {model.d_in}, got shape {tuple(jnp.shape(x))}")
    else:
        raise TypeError(f"{fn}: model must be a gradattn.nn.Transformer or TinyGPT, got {type(model).__name__}")
    check_labels(y, jnp.shape(x)[0], model.n_classes, fn)
    check_weights(weights, jnp.shape(x)[0], fn)


def head_laws(model: Transformer | TinyGPT, x: jax.Array, y: jax.Array, weights=None) -> HeadLaws:
    """The laws of every head of ``model`` on one sequence ``x (N, d_in)`` (token ids ``(T,)`` for a
    :class:`~gradattn.nn.TinyGPT`), targets ``y (N,)``.

    Dropout is off. u^h_i = dL/dg^h_i comes from ``jax.vjp`` of the model's loss with respect to an
    additive zero perturbation of every head's context; the rest are the single-head laws of
    :mod:`gradattn.laws`, applied head by head (vmapped over layers and heads). ``weights``: optional
    (N,) position weights of the loss, as in :func:`gradattn.head.dense_loss`. Pure and jit-able.
    Use ``.at(layer, head)`` for one head.
    """
    _check_xy(model, x, y, weights, "head_laws")
    graphdef, params = nnx.split(model, nnx.Param)
    shape = (model.n_layers, model.n_heads, jnp.shape(x)[0], model.head_size)
    return laws_of(pure_apply(graphdef), params, jnp.asarray(x), jnp.asarray(y), weights, shape)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _laws_and_autodiff(graphdef, params, x, y, w, shape):
    """The laws of every head and autodiff's gradients with respect to every head's scores,
    attention weights and values (zero perturbations of the taps), in one compiled program; jitted
    at module level so that a second check of the same model shape reuses it."""
    apply = pure_apply(graphdef)
    lw = laws_of(apply, params, x, y, w, shape)
    n_layers, n_heads, n, hd = shape

    def loss_at(**perturb):
        return mean_loss(apply(params, x, perturb=HeadTaps(**perturb)), y, w)

    dtype = jax.tree.leaves(params)[0].dtype  # the model's (x may hold token ids)
    ds = jax.grad(lambda p: loss_at(scores=p))(jnp.zeros((n_layers, n_heads, n, n), dtype))
    da = jax.grad(lambda p: loss_at(alpha=p))(jnp.zeros((n_layers, n_heads, n, n), dtype))
    dv = jax.grad(lambda p: loss_at(values=p))(jnp.zeros((n_layers, n_heads, n, hd), dtype))
    return lw, ds, da, dv


def deep_law_errors(key=None, *, n: int = 13, d_in: int = 5, d_model: int = 8, n_layers: int = 2, n_heads: int = 2,
                    n_classes: int = 3) -> dict[str, float]:
    """Every head's laws against autodiff of the whole model, in float64, on a random small instance.

    For a random :class:`~gradattn.nn.Transformer` (float64, dropout off), random inputs, targets and
    position weights: ``routing`` compares :func:`head_laws`'s dL/ds with ``jax.grad`` of the loss
    with respect to every head's pre-softmax scores; ``value`` its dL/dv with the gradient with
    respect to every head's values; ``compatibility`` b with the gradient with respect to the
    attention weights. Each is ``max |law - autodiff| / max |autodiff|`` over all heads.
    ``masked`` is max |dL/ds_ij| over future entries j > i and ``row_sum`` max |sum_j dL/ds_ij|,
    both relative to max |dL/ds|. ``worst_rel_error`` is the largest of them. Python floats.
    """
    key = jax.random.key(0) if key is None else key
    check_prng_key("key", key, "deep_law_errors")
    n, d_in, d_model, n_layers, n_heads = (check_int(name, val, "deep_law_errors") for name, val in
                                           (("n", n), ("d_in", d_in), ("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)))
    if d_model % n_heads:
        raise ValueError(f"deep_law_errors: d_model={d_model} must be divisible by n_heads={n_heads}")
    n_classes = check_int("n_classes", n_classes, "deep_law_errors", minimum=2)
    with jax.enable_x64(True):
        f64 = jnp.float64
        k_m, k_x, k_y, k_w = jax.random.split(key, 4)
        model = Transformer(d_in, d_model, n_layers, n_heads, n_classes, 0.1, rngs=nnx.Rngs(k_m), dtype=f64)
        x = jax.random.normal(k_x, (n, d_in), f64)
        y = jax.random.randint(k_y, (n,), 0, n_classes)
        w = jax.random.uniform(k_w, (n,), f64, 0.1, 1.0)
        graphdef, params = nnx.split(model, nnx.Param)
        lw, ds, da, dv = _laws_and_autodiff(graphdef, params, x, y, w, (n_layers, n_heads, n, d_model // n_heads))
        scale = jnp.max(jnp.abs(lw.routing_grad))
        errors = {
            "routing": relative_error(lw.routing_grad, ds),
            "value": relative_error(lw.value_grad, dv),
            "compatibility": relative_error(lw.compatibility, da),
            "masked": float(jnp.max(jnp.where(causal_mask(n), 0.0, jnp.abs(lw.routing_grad))) / scale),
            "row_sum": float(jnp.max(jnp.abs(jnp.sum(lw.routing_grad, axis=-1))) / scale),
        }
    errors["worst_rel_error"] = max(errors.values())
    return errors
