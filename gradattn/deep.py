"""The deep-transformer experiment on the sticky chain, and the laws of every head inside it.

The protocol (the paper's reference code, deep variant): the :class:`~gradattn.nn.Transformer`
(4 pre-norm layers of 4 heads, d_model 64) is trained full batch on one sequence of the sticky
chain (T = 2000) by AdamW (lr 3e-4, weight decay 0.01) with the rate annealed to 0 along a cosine
over the run and the gradient clipped to global norm 1.0, dropout on. Evaluation is with dropout
off, on a held-out sequence from another key: loss, mean predictive entropy, accuracy, and the gaps
to H_min and to the exact Bayes loss of that held-out sequence (:func:`gradattn.bayes.bayes_loss`).
Each x_t carries its own noise, so x_t alone identifies y_t on the training sequence: the model can
memorise it, and with one fixed sequence it does. ``fresh_data=True`` samples a new training
sequence at every step instead, so the held-out gap to Bayes measures what was learnt.

Every run is a pure function of a PRNG key (:func:`make_deep_run`), one ``lax.scan`` over the
steps, so seeds run vmapped through :func:`gradattn.sweep`.

The laws inside the deep model. For head h of layer l (dropout off), with alpha^h its attention
weights, v^h_j its values and u^h_i = dL/dg^h_i the gradient of the whole model's loss at its
context (``jax.vjp`` through the output projection, the residual stream and every later layer)::

    b^h_ij = u^h_i . v^h_j                        compatibility      (gradattn.laws.compatibility)
    a^h_ij = sum_k alpha^h_ik b^h_ik - b^h_ij     advantage          (gradattn.laws.advantage)
    dL/ds^h_ij = -alpha^h_ij a^h_ij               routing law        (gradattn.laws.routing_grad)
    dL/dv^h_j  = sum_i alpha^h_ij u^h_i           value law          (gradattn.laws.value_grad)

hold unchanged (:func:`head_laws`; :func:`deep_law_errors` checks them against autodiff). Along
training, :func:`make_deep_run` records per head, at checkpoints inside the scan: the attention
entropy, the feedback-loop statistics (does sign(a_ij) predict sign(Delta alpha_ij)? does each value
move against its responsibility-weighted error?) and, after the run, when attention and values
settle.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure

from gradattn import laws
from gradattn._checks import (check_deep_model_size, check_float32, check_int, check_labels, check_number,
                              check_unused_option, check_weights)
from gradattn.bayes import bayes_loss
from gradattn.dynamics import settling_step
from gradattn.head import causal_mask, normalised_weights, token_losses
from gradattn.nn import HeadTaps, Transformer
from gradattn.plotting import atomic_savefig
from gradattn.sweeps import seed_ints, sweep
from gradattn.tasks import StickyMarkov

LN2 = math.log(2.0)
VALUE = "value"
OTHER = "other"
SCHEDULES = ("adamw", "two_timescale")


# --------------------------------------------------------------------------------------------
# Configuration and optimiser
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeepConfig:
    """Everything that defines one deep run (the reference protocol by default).

    Attributes:
      steps: full-batch updates.
      lr: peak AdamW rate, annealed to 0 along a cosine over ``steps``.
      weight_decay: AdamW's decoupled weight decay (on every parameter, as PyTorch's AdamW does).
      clip: global-norm gradient clipping threshold.
      dropout: dropout rate during training (off at evaluation).
      d_model, n_layers, n_heads: the :class:`~gradattn.nn.Transformer`'s sizes.
      task: the sticky chain (T = ``task.seq_len``, 2000 by default); d_in and C come from it.
      fresh_data: sample a fresh training sequence at every step (default: one fixed sequence).
      schedule: ``"adamw"`` (one rate) or ``"two_timescale"`` (the rate times ``value_lr_multiplier``
        on every value projection, weight and bias; the rest at ``lr``).
      value_lr_multiplier: the value projections' rate ratio under ``"two_timescale"`` (another value
        with ``"adamw"`` would be ignored, so it is a ValueError).
      n_checkpoints: per-head dynamics checkpoints (at steps 0, k, 2k, ...; k = steps / n_checkpoints
        must be whole); 0 records none; None (default) takes the largest divisor of ``steps`` up to 10.
      settle_tol: tolerance of the settling steps (fraction of each head's total change left).
      settle_rows: attention rows (evenly spaced queries) compared for attention settling.

    Rates (and the products a run forms, ``lr * value_lr_multiplier``, ``lr * weight_decay``) must be
    finite in float32. The model and its attention together must fit an estimated 64 GiB per seed
    and 1e14 FLOPs per training step (parameters and optimiser state, the n_layers x n_heads x N x N
    attention, activations), whatever each size's own bound; the error names the sizes and the
    estimate.
    """

    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 0.01
    clip: float = 1.0
    dropout: float = 0.1
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    task: StickyMarkov = dataclasses.field(default_factory=StickyMarkov)
    fresh_data: bool = False
    schedule: str = "adamw"
    value_lr_multiplier: float = 10.0
    n_checkpoints: int | None = None
    settle_tol: float = 0.1
    settle_rows: int = 64

    def __post_init__(self):
        fn = "DeepConfig"
        for name in ("steps", "d_model", "n_layers", "n_heads", "settle_rows"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), fn))
        if self.n_checkpoints is None:
            k = min(10, self.steps)
            while self.steps % k:
                k -= 1
            object.__setattr__(self, "n_checkpoints", k)
        object.__setattr__(self, "n_checkpoints", check_int("n_checkpoints", self.n_checkpoints, fn, minimum=0))
        for name, kw in (("lr", {}), ("weight_decay", {}), ("clip", {"exclusive_minimum": True}),
                         ("value_lr_multiplier", {}), ("settle_tol", {}),
                         ("dropout", {"maximum": 1.0, "exclusive_maximum": True})):
            object.__setattr__(self, name, float(check_number(name, getattr(self, name), fn, minimum=0.0, **kw)))
        if not isinstance(self.task, StickyMarkov):
            raise TypeError(f"{fn}: task must be a StickyMarkov, got {type(self.task).__name__}")
        if not isinstance(self.fresh_data, (bool, np.bool_)):
            raise TypeError(f"{fn}: fresh_data must be a bool, got {self.fresh_data!r}")
        object.__setattr__(self, "fresh_data", bool(self.fresh_data))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{fn}: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"{fn}: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_checkpoints and self.steps % self.n_checkpoints:
            raise ValueError(f"{fn}: n_checkpoints={self.n_checkpoints} must divide steps={self.steps}")
        check_unused_option(fn, self, "value_lr_multiplier", active=self.schedule == "two_timescale", needs='schedule="two_timescale"')
        check_float32(fn, {"lr": self.lr, "weight_decay": self.weight_decay, "clip": self.clip, "lr * weight_decay": self.lr * self.weight_decay,
                           "lr * value_lr_multiplier": self.lr * self.value_lr_multiplier if self.schedule == "two_timescale" else 0.0})
        check_deep_model_size(fn, self.task.d_in, self.d_model, self.n_layers, self.n_heads, self.task.n_classes, self.task.n_positions, self.n_checkpoints)

    @property
    def checkpoint_steps(self) -> np.ndarray:
        """(K + 1,) the checkpoint steps 0, k, 2k, ... and the final state ``steps``."""
        if not self.n_checkpoints:
            return np.zeros((0,), np.int64)
        return np.append(np.arange(0, self.steps, self.steps // self.n_checkpoints), self.steps)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["task"] = dataclasses.asdict(self.task)
        d["dtype"] = "float32"
        return d


def value_labels(params) -> Any:
    """The optax labels of the two timescales over a Transformer's parameter tree: ``"value"`` on
    every value projection (weight and bias), ``"other"`` on everything else."""

    def label(path, _):
        return VALUE if any(getattr(k, "key", None) == "v_proj" for k in path) else OTHER

    return jax.tree_util.tree_map_with_path(label, params)


def deep_optimizer(config: DeepConfig) -> optax.GradientTransformation:
    """The protocol's optimiser: global-norm clipping, then AdamW with a cosine decay of the rate to 0.

    ``schedule="two_timescale"`` is an ``optax.multi_transform`` over :func:`value_labels`: the value
    projections get AdamW at ``lr * value_lr_multiplier`` (same cosine), the rest AdamW at ``lr``.
    """
    if not isinstance(config, DeepConfig):
        raise TypeError(f"deep_optimizer: config must be a DeepConfig, got {type(config).__name__}")

    def adamw(peak):
        return optax.adamw(optax.cosine_decay_schedule(peak, config.steps, alpha=0.0), weight_decay=config.weight_decay)

    if config.schedule == "adamw":
        inner = adamw(config.lr)
    else:
        inner = optax.multi_transform({VALUE: adamw(config.lr * config.value_lr_multiplier), OTHER: adamw(config.lr)},
                                      value_labels)
    return optax.chain(optax.clip_by_global_norm(config.clip), inner)


def init_model(config: DeepConfig, key: jax.Array, dtype=jnp.float32) -> Transformer:
    """The :class:`~gradattn.nn.Transformer` of ``config`` with parameters drawn from ``key``."""
    task = config.task
    return Transformer(task.d_embed, config.d_model, config.n_layers, config.n_heads, task.n_symbols, config.dropout,
                       rngs=nnx.Rngs(key), dtype=dtype)


# --------------------------------------------------------------------------------------------
# The laws of every head
# --------------------------------------------------------------------------------------------


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

    def at(self, layer: int, head: int) -> "HeadLaws":
        """The laws of one head (leaves without the (L, H) axes; ``loss`` unchanged)."""
        return HeadLaws(self.loss, *(a[layer, head] for a in self[1:]))


def _mean_loss(logits, y, weights):
    return jnp.sum(normalised_weights(weights, logits.shape[0], logits.dtype) * token_losses(logits, y))


def _laws(apply, params, x, y, weights, shape) -> HeadLaws:
    """:func:`head_laws` on a pure ``apply(params, x, perturb=..., return_taps=...)``."""

    def loss_at_contexts(dg):
        logits, taps = apply(params, x, perturb=HeadTaps(contexts=dg), return_taps=True)
        return _mean_loss(logits, y, weights), taps

    loss, pullback, taps = jax.vjp(loss_at_contexts, jnp.zeros(shape, x.dtype), has_aux=True)
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


def _pure_apply(graphdef):
    def apply(params, x, **kw):
        return nnx.merge(graphdef, params)(x, **kw)

    return apply


def _check_xy(model, x, y, weights, fn):
    if not isinstance(model, Transformer):
        raise TypeError(f"{fn}: model must be a gradattn.nn.Transformer, got {type(model).__name__}")
    if jnp.ndim(x) != 2 or jnp.shape(x)[1] != model.d_in:
        raise ValueError(f"{fn}: x must have shape (N, d_in) with d_in = {model.d_in}, got shape {tuple(jnp.shape(x))}")
    check_labels(y, jnp.shape(x)[0], model.n_classes, fn)
    check_weights(weights, jnp.shape(x)[0], fn)


def head_laws(model: Transformer, x: jax.Array, y: jax.Array, weights=None) -> HeadLaws:
    """The laws of every head of ``model`` on one sequence ``x (N, d_in)``, targets ``y (N,)``.

    Dropout is off. u^h_i = dL/dg^h_i comes from ``jax.vjp`` of the model's loss with respect to an
    additive zero perturbation of every head's context; the rest are the single-head laws of
    :mod:`gradattn.laws`, applied head by head (vmapped over layers and heads). ``weights``: optional
    (N,) position weights of the loss, as in :func:`gradattn.head.dense_loss`. Pure and jit-able.
    Use ``.at(layer, head)`` for one head.
    """
    _check_xy(model, x, y, weights, "head_laws")
    graphdef, params = nnx.split(model, nnx.Param)
    shape = (model.n_layers, model.n_heads, jnp.shape(x)[0], model.head_size)
    return _laws(_pure_apply(graphdef), params, jnp.asarray(x), jnp.asarray(y), weights, shape)


def _relerr(a, r):
    return float(jnp.max(jnp.abs(a - r)) / jnp.maximum(jnp.max(jnp.abs(r)), jnp.finfo(r.dtype).tiny))


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
        apply = _pure_apply(graphdef)
        hd = d_model // n_heads

        @jax.jit
        def pairs(params, x, y, w):
            lw = _laws(apply, params, x, y, w, (n_layers, n_heads, n, hd))

            def loss_at(**perturb):
                return _mean_loss(apply(params, x, perturb=HeadTaps(**perturb)), y, w)

            ds = jax.grad(lambda p: loss_at(scores=p))(jnp.zeros((n_layers, n_heads, n, n), f64))
            da = jax.grad(lambda p: loss_at(alpha=p))(jnp.zeros((n_layers, n_heads, n, n), f64))
            dv = jax.grad(lambda p: loss_at(values=p))(jnp.zeros((n_layers, n_heads, n, hd), f64))
            return lw, ds, da, dv

        lw, ds, da, dv = pairs(params, x, y, w)
        scale = jnp.max(jnp.abs(lw.routing_grad))
        errors = {
            "routing": _relerr(lw.routing_grad, ds),
            "value": _relerr(lw.value_grad, dv),
            "compatibility": _relerr(lw.compatibility, da),
            "masked": float(jnp.max(jnp.where(causal_mask(n), 0.0, jnp.abs(lw.routing_grad))) / scale),
            "row_sum": float(jnp.max(jnp.abs(jnp.sum(lw.routing_grad, axis=-1))) / scale),
        }
    errors["worst_rel_error"] = max(errors.values())
    return errors


# --------------------------------------------------------------------------------------------
# Per-head dynamics
# --------------------------------------------------------------------------------------------


class HeadDynamics(NamedTuple):
    """Feedback-loop statistics of one step theta -> theta', per head (leaves (L, H)).

    The definitions of :class:`gradattn.dynamics.FeedbackStats`, applied to each head of the deep
    model with u^h from the whole network (dropout off, on the step's training sequence):
      entropy_bits: mean over queries of -sum_j alpha_ij log2 alpha_ij, before the step.
      sign_agreement: fraction of movable entries (j <= i, at least two visible keys, alpha_ij > 0,
        a_ij != 0) with sign(a_ij) = sign(Delta alpha_ij); ``sign_agreement_weighted`` weights each
        by alpha_ij.
      value_alignment: mean over j of cos(Delta v_j, -dL/dv_j); ``value_alignment_weighted`` weights
        by ||dL/dv_j||. Delta v_j is the measured move of value j (its layer's input moves too).
    """

    entropy_bits: jax.Array
    sign_agreement: jax.Array
    sign_agreement_weighted: jax.Array
    value_alignment: jax.Array
    value_alignment_weighted: jax.Array


def _xlogx(p):
    return jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)


def _one_head_dynamics(alpha0, adv, alpha1, dv, v0, v1) -> HeadDynamics:
    n = alpha0.shape[0]
    ok = causal_mask(n) & (alpha0 > 0) & (adv != 0) & (jnp.arange(n)[:, None] > 0)
    hit = ok & (jnp.sign(adv) == jnp.sign(alpha1 - alpha0))
    mass = jnp.sum(jnp.where(ok, alpha0, 0.0))
    move = v1 - v0
    dv_norm, mv_norm = jnp.linalg.norm(dv, axis=-1), jnp.linalg.norm(move, axis=-1)
    valid = (dv_norm > 0) & (mv_norm > 0)
    cos = jnp.where(valid, -jnp.sum(move * dv, axis=-1) / jnp.where(valid, dv_norm * mv_norm, 1.0), 0.0)
    total = jnp.sum(jnp.where(valid, dv_norm, 0.0))
    return HeadDynamics(
        entropy_bits=-jnp.sum(_xlogx(alpha0)) / LN2 / n,
        sign_agreement=jnp.sum(hit) / jnp.maximum(jnp.sum(ok), 1),
        sign_agreement_weighted=jnp.sum(jnp.where(hit, alpha0, 0.0)) / jnp.where(mass > 0, mass, 1.0),
        value_alignment=jnp.sum(cos) / jnp.maximum(jnp.sum(valid), 1),
        value_alignment_weighted=jnp.sum(cos * dv_norm) / jnp.where(total > 0, total, 1.0),
    )


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def _heldout(logits, y):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return {
        "loss": jnp.mean(token_losses(logits, y)),
        "entropy": jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1)),
        "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(logits.dtype)),
    }


def make_deep_run(config: DeepConfig = DeepConfig()):
    """``run(key) -> dict`` of one deep run under ``config``; pure, one ``lax.scan``, vmappable.

    The key splits into the training data, the initial parameters, the dropout masks and the
    held-out sequence. Returned leaves (float32):

      curve (steps,): training loss before every update (dropout on, as the optimiser sees it).
      train_loss, train_bayes_loss: the final model's loss (dropout off) and the Bayes loss on the
        (first) training sequence.
      heldout_loss, heldout_entropy, heldout_accuracy, heldout_bayes_loss: on the held-out sequence.
      with checkpoints (K = n_checkpoints): dyn_<field> (K, L, H) for every :class:`HeadDynamics`
        field, dyn_loss (K,) (dropout off, before the checkpoint's step), settle_attention and
        settle_values (L, H): :func:`gradattn.dynamics.settling_step` (scale "change", tolerance
        ``settle_tol``) of each head's attention rows and values on the training sequence over the
        checkpoints and the final state.

    Cached per config, so sweeping the same config twice compiles once.
    """
    if not isinstance(config, DeepConfig):
        raise TypeError(f"make_deep_run: config must be a DeepConfig, got {type(config).__name__}")
    return _make_deep_run(config)


@functools.lru_cache(maxsize=16)
def _make_deep_run(config: DeepConfig):
    task = config.task
    tx = deep_optimizer(config)
    p_mat = jnp.asarray(task.transition_matrix, jnp.float32)
    mu = jnp.asarray(task.embeddings, jnp.float32)
    n = task.n_positions
    shape = (config.n_layers, config.n_heads, n, config.d_model // config.n_heads)
    rows = jnp.linspace(0, n - 1, min(config.settle_rows, n)).astype(jnp.int32)
    k = config.steps // config.n_checkpoints if config.n_checkpoints else None

    def run(key):
        k_data, k_init, k_drop, k_test = jax.random.split(key, 4)
        graphdef, params = nnx.split(init_model(config, k_init), nnx.Param)
        apply = _pure_apply(graphdef)
        x0, y0 = task.sample(k_data, jnp.float32)

        def data(t):
            return task.sample(jax.random.fold_in(k_data, t), jnp.float32) if config.fresh_data else (x0, y0)

        def loss(p, x, y, drop_key):
            return _mean_loss(apply(p, x, dropout_key=drop_key), y, None)

        def step(carry, t):
            p, opt_state = carry
            x, y = data(t)
            value, grads = jax.value_and_grad(loss)(p, x, y, jax.random.fold_in(k_drop, t))
            updates, opt_state = tx.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), value

        carry = (params, tx.init(params))
        if k is None:
            (params, _), curve = jax.lax.scan(step, carry, jnp.arange(config.steps))
            out = {"curve": curve}
        else:
            def chunk(carry, t0):
                x, y = data(t0)
                before = carry[0]
                carry, first = step(carry, t0)
                lw = _laws(apply, before, x, y, None, shape)
                _, taps1 = apply(carry[0], x, return_taps=True)
                dyn = jax.vmap(jax.vmap(_one_head_dynamics))(lw.alpha, lw.advantage, taps1.alpha, lw.value_grad,
                                                             lw.values, taps1.values)
                carry, rest = jax.lax.scan(step, carry, t0 + 1 + jnp.arange(k - 1))
                return carry, (jnp.concatenate([first[None], rest]), dyn, lw.loss, before)

            (params, _), (curves, dyn, dyn_loss, series) = jax.lax.scan(chunk, carry, jnp.arange(0, config.steps, k))
            out = {"curve": curves.reshape(-1), "dyn_loss": dyn_loss}
            out.update({f"dyn_{name}": val for name, val in dyn._asdict().items()})
            out.update(_settling(apply, series, params, x0, rows, config))

        train_logits = apply(params, x0)
        out["train_loss"] = jnp.mean(token_losses(train_logits, y0))
        out["train_bayes_loss"] = bayes_loss(p_mat, mu, x0, y0).mean
        x_test, y_test = task.sample(k_test, jnp.float32)
        for name, val in _heldout(apply(params, x_test), y_test).items():
            out[f"heldout_{name}"] = val
        out["heldout_bayes_loss"] = bayes_loss(p_mat, mu, x_test, y_test).mean
        return out

    return run


def _settling(apply, series, final, x, rows, config: DeepConfig) -> dict:
    """Settling steps per head of attention rows and values over the checkpoints and the final state."""

    def snapshot(p):
        _, taps = apply(p, x, return_taps=True)
        return taps.alpha[:, :, rows, :], taps.values

    a_end, v_end = snapshot(final)

    def distance(p):
        a, v = snapshot(p)
        return (jnp.sqrt(jnp.sum(jnp.square(a - a_end), axis=(-2, -1))), jnp.sqrt(jnp.sum(jnp.square(v - v_end), axis=(-2, -1))))

    d_a, d_v = jax.lax.map(distance, series)
    zero = jnp.zeros((1,) + d_a.shape[1:], d_a.dtype)
    d_a, d_v = jnp.concatenate([d_a, zero]), jnp.concatenate([d_v, zero])
    steps = jnp.asarray(config.checkpoint_steps, jnp.float32)
    settle = jax.vmap(jax.vmap(lambda d: settling_step(steps, d, config.settle_tol, "change"), in_axes=1), in_axes=1)
    return {"settle_attention": settle(d_a), "settle_values": settle(d_v)}


# --------------------------------------------------------------------------------------------
# Over seeds
# --------------------------------------------------------------------------------------------


def _json(a):
    """Nested lists of Python floats with non-finite values as None (valid JSON)."""
    a = np.asarray(a, np.float64)
    if a.ndim == 0:
        v = float(a)
        return v if math.isfinite(v) else None
    return [_json(b) for b in a]


def summarise_deep(per_seed: dict[str, np.ndarray], seeds: list[int], config: DeepConfig, law_check: dict) -> dict[str, Any]:
    """The JSON-ready summary of a sweep of :func:`make_deep_run` (std over seeds with ddof=0)."""
    h_min = config.task.h_min
    gap = per_seed["heldout_loss"] - per_seed["heldout_bayes_loss"]
    mean = lambda name: _json(np.mean(per_seed[name], axis=0))  # noqa: E731
    out = {
        "experiment": "deep",
        "h_min": h_min,
        "steps": config.steps,
        "seeds": [int(s) for s in seeds],
        "heldout": {
            "loss_mean": mean("heldout_loss"),
            "loss_std": _json(np.std(per_seed["heldout_loss"])),
            "entropy_mean": mean("heldout_entropy"),
            "accuracy_mean": mean("heldout_accuracy"),
            "bayes_loss_mean": mean("heldout_bayes_loss"),
            "gap_to_bayes_mean": _json(np.mean(gap)),
            "gap_to_h_min_mean": _json(np.mean(per_seed["heldout_loss"]) - h_min),
            # What the reference code prints as its "gap" (there in nats, labelled bits).
            "entropy_minus_h_min_mean": _json(np.mean(per_seed["heldout_entropy"]) - h_min),
        },
        "train": {
            "loss_mean": mean("train_loss"),
            "loss_std": _json(np.std(per_seed["train_loss"])),
            "bayes_loss_mean": mean("train_bayes_loss"),
        },
        "per_seed": {
            "seed": [int(s) for s in seeds],
            **{name: _json(per_seed[name]) for name in ("train_loss", "train_bayes_loss", "heldout_loss",
                                                          "heldout_entropy", "heldout_accuracy", "heldout_bayes_loss")},
            "gap_to_bayes": _json(gap),
        },
        "curve": {"mean": mean("curve"), "std": _json(np.std(per_seed["curve"], axis=0))},
        "law_check": law_check,
        "config": config.to_dict(),
    }
    if config.n_checkpoints:
        dyn = {"checkpoint_steps": [int(s) for s in config.checkpoint_steps], "loss_mean": mean("dyn_loss")}
        for name in HeadDynamics._fields:
            dyn[f"{name}_mean"] = mean(f"dyn_{name}")
        for name in ("settle_attention", "settle_values"):
            dyn[f"{name}_mean"] = _json(np.nanmean(per_seed[name], axis=0)) if np.isfinite(per_seed[name]).any() else None
        out["dynamics"] = dyn
    return out


def deep_experiment(seeds, config: DeepConfig = DeepConfig(), *, chunk_size: int = 1, devices=None,
                    progress: bool = False) -> dict[str, Any]:
    """The deep experiment over ``seeds`` (an int n means seeds 0..n-1): JSON-ready results.

    Each seed is :func:`make_deep_run`'s ``run(jax.random.key(seed))``, run through
    :func:`gradattn.sweep` (``chunk_size`` seeds vmapped per device per call; a seed's result is the
    same alone or among others). ``law_check`` is :func:`deep_law_errors` of a small float64 model.
    Returns :func:`summarise_deep`'s dict plus ``wall_time_s``, ``n_devices`` and ``chunk_size``.
    """
    if not isinstance(config, DeepConfig):
        raise TypeError(f"deep_experiment: config must be a DeepConfig, got {type(config).__name__}")
    if isinstance(seeds, (bool, np.bool_)):
        raise TypeError("deep_experiment: seeds must be a positive int or a sequence of non-negative ints, got a bool")
    if isinstance(seeds, (int, np.integer)):
        seeds = list(range(check_int("seeds", seeds, "deep_experiment")))
    seeds = seed_ints(seeds, "deep_experiment")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"deep_experiment: seeds must be distinct, got {seeds}")
    chunk_size = check_int("chunk_size", chunk_size, "deep_experiment")
    law_check = deep_law_errors()
    t0 = time.perf_counter()
    per_seed = sweep(make_deep_run(config), seeds, chunk_size=chunk_size, devices=devices, progress=progress)
    wall = time.perf_counter() - t0
    out = summarise_deep(per_seed, seeds, config, law_check)
    out["wall_time_s"] = wall
    out["n_devices"] = len(jax.devices()) if devices is None else len(list(devices))
    out["chunk_size"] = chunk_size
    return out


# --------------------------------------------------------------------------------------------
# Text and figure
# --------------------------------------------------------------------------------------------


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _grid(rows) -> list[str]:
    head = "          " + "".join(f"  head {h:<3d}" for h in range(len(rows[0])))
    return [head] + [f"  layer {l:<2d}" + "".join(f"  {_fmt(v, '8.3f')}" for v in row) for l, row in enumerate(rows)]


def format_deep(results: dict) -> str:
    """A plain-text report of :func:`deep_experiment`'s results (or the same dict read from JSON)."""
    try:
        cfg, ho, tr = results["config"], results["heldout"], results["train"]
        n_seeds = len(results["seeds"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"format_deep: results must be a deep_experiment result dict ({err})") from None
    data = "a fresh sequence per step" if cfg["fresh_data"] else "one fixed sequence"
    sched = "AdamW" if cfg["schedule"] == "adamw" else f"two-timescale AdamW (value projections x{cfg['value_lr_multiplier']:g})"
    lines = [
        f"Deep transformer: {cfg['n_layers']} layers x {cfg['n_heads']} heads, d_model {cfg['d_model']}, "
        f"T = {cfg['task']['seq_len']}, {results['steps']} steps, {n_seeds} seed{'s' if n_seeds != 1 else ''}",
        f"{sched}, lr {cfg['lr']:g} (cosine to 0), weight decay {cfg['weight_decay']:g}, clip {cfg['clip']:g}, "
        f"dropout {cfg['dropout']:g}; trained on {data}",
        f"H_min                          {results['h_min']:.4f} nats",
        f"training sequence (dropout off) loss {_fmt(tr['loss_mean'])} ± {_fmt(tr['loss_std'])}   Bayes {_fmt(tr['bayes_loss_mean'])}",
        f"held-out sequence              loss {_fmt(ho['loss_mean'])} ± {_fmt(ho['loss_std'])}   Bayes {_fmt(ho['bayes_loss_mean'])}"
        f"   gap to Bayes {_fmt(ho['gap_to_bayes_mean'], '+.3f')}   gap to H_min {_fmt(ho['gap_to_h_min_mean'], '+.3f')}",
        f"                               entropy {_fmt(ho['entropy_mean'])} nats   accuracy {_fmt(ho['accuracy_mean'])}",
        f"per-head laws vs autodiff (float64, small model): worst relative error {results['law_check']['worst_rel_error']:.1e}",
    ]
    dyn = results.get("dynamics")
    if dyn:
        lines.append("attention entropy at the last checkpoint (bits), layer x head:")
        lines += _grid(dyn["entropy_bits_mean"][-1])
        lines.append("sign agreement of advantage and Delta alpha, mean over checkpoints (chance 0.5):")
        lines += _grid(np.nanmean(np.asarray(dyn["sign_agreement_mean"], float), axis=0).tolist())
        if dyn.get("settle_attention_mean") is not None:
            lines.append(f"settling step of attention (tolerance {cfg['settle_tol']:g} of the total change):")
            lines += _grid(dyn["settle_attention_mean"])
            lines.append("settling step of values:")
            lines += _grid(dyn["settle_values_mean"])
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s")
    return "\n".join(lines)


def plot_deep(results: dict, path=None, *, dpi: int = 150):
    """Training curve against H_min and the held-out losses; per-head heat maps (layer x head) of
    the final attention entropy and the mean sign agreement. Saved atomically when ``path`` is
    given; returns the matplotlib Figure."""
    try:
        curve = np.asarray(results["curve"]["mean"], float)
        std = np.asarray(results["curve"]["std"], float)
        ho, h_min = results["heldout"], float(results["h_min"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"plot_deep: results must be a deep_experiment result dict ({err})") from None
    dyn = results.get("dynamics")
    fig = Figure(figsize=(14 if dyn else 7, 4.2))
    axes = fig.subplots(1, 3 if dyn else 1, squeeze=False)[0]
    ax = axes[0]
    steps = np.arange(curve.shape[0])
    ax.plot(steps, curve, label="training loss (dropout on)")
    ax.fill_between(steps, curve - std, curve + std, alpha=0.25, linewidth=0)
    ax.axhline(h_min, color="k", ls="--", lw=1, label=f"H_min = {h_min:.3f}")
    if ho["loss_mean"] is not None:
        ax.axhline(ho["loss_mean"], color="tab:red", lw=1, label=f"held-out loss = {ho['loss_mean']:.3f}")
    if ho["bayes_loss_mean"] is not None:
        ax.axhline(ho["bayes_loss_mean"], color="tab:green", ls=":", lw=1.5, label=f"held-out Bayes = {ho['bayes_loss_mean']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"Deep transformer, {len(results['seeds'])} seed(s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if dyn:
        for ax, data, title in (
            (axes[1], np.asarray(dyn["entropy_bits_mean"][-1], float), "attention entropy (bits), last checkpoint"),
            (axes[2], np.nanmean(np.asarray(dyn["sign_agreement_mean"], float), axis=0), "sign agreement, mean over checkpoints"),
        ):
            im = ax.imshow(data, cmap="viridis", aspect="auto")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(data.shape[1]))
            ax.set_yticks(range(data.shape[0]))
            ax.set_title(title, fontsize=10)
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig
