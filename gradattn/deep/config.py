"""The deep experiment's protocol: its configuration, its optimiser and its model.

The reference code's deep variant: the :class:`~gradattn.nn.Transformer` (4 pre-norm layers of 4
heads, d_model 64) trained full batch on one sequence of the task (T = 2000) by AdamW (lr 3e-4,
weight decay 0.01) with the rate annealed to 0 along a cosine over the run and the gradient clipped
to global norm 1.0, dropout on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradattn._checks import check_divides_steps, check_float32
from gradattn._config import check_unused_option, option
from gradattn.experiments import check_config, config_dict
from gradattn.nn import Transformer
from gradattn.tasks import StickyMarkov, Task

VALUE = "value"
OTHER = "other"
SCHEDULES = ("adamw", "two_timescale")


MAX_DEEP_BYTES = 64 << 30


"""Largest estimated memory of one deep run (one seed, float32) that a config may need."""


MAX_DEEP_STEP_FLOPS = 1e14
"""Largest estimated floating-point operations of one training step of the deep model."""


def deep_model_estimate(d_in: int, d_model: int, n_layers: int, n_heads: int, n_classes: int, n_positions: int,
                        n_checkpoints: int = 0) -> dict:
    """Rough size of one deep run (one seed, float32): ``params``, ``attention`` (floats in the
    (n_layers, n_heads, N, N) attention weights), ``bytes`` and ``step_flops``.

    ``bytes`` counts the parameters with their gradient, AdamW's two moments, the update and one
    copy per dynamics checkpoint; eight float32 copies of the attention (scores, weights and what the
    backward pass and the laws at a checkpoint keep of them); and the activations (24 floats per
    position, layer and model dimension, the feed-forward's four-fold width included).
    ``step_flops`` is three forward passes' worth (forward and backward): the matmuls (2 N per
    parameter), scores and contexts (4 N^2 d_model per layer) and the softmax (5 N^2 per head).
    """
    d, L, n = d_model, n_layers, n_positions
    params = L * (12 * d * d + 13 * d) + d_in * d + 3 * d + d * n_classes + n_classes
    attention = L * n_heads * n * n
    floats = (5 + n_checkpoints) * params + 8 * attention + 24 * L * n * d + n * (d_in + 3 * n_classes)
    flops = 3 * (2 * n * params + 4 * L * n * n * d + 5 * attention)
    return {"params": params, "attention": attention, "bytes": 4 * floats, "step_flops": float(flops)}


def check_deep_model_size(fn: str, d_in: int, d_model: int, n_layers: int, n_heads: int, n_classes: int,
                          n_positions: int, n_checkpoints: int = 0) -> None:
    """The deep model of these sizes on ``n_positions`` positions must fit :data:`MAX_DEEP_BYTES` per
    seed and :data:`MAX_DEEP_STEP_FLOPS` per step (:func:`deep_model_estimate`).

    Each size can be within its own bound while the combination (wide, deep, many heads, long
    sequence) would need terabytes and compile for many minutes before failing.

    Raises:
      ValueError: naming the sizes, the estimate and the limits.
    """
    est = deep_model_estimate(d_in, d_model, n_layers, n_heads, n_classes, n_positions, n_checkpoints)
    if est["bytes"] > MAX_DEEP_BYTES or est["step_flops"] > MAX_DEEP_STEP_FLOPS:
        raise ValueError(
            f"{fn}: d_model={d_model}, n_layers={n_layers}, n_heads={n_heads} (d_in={d_in}, C={n_classes}) on "
            f"N={n_positions} positions would need about {est['bytes'] / 2**30:.3g} GiB per seed "
            f"({est['params']:.3g} parameters, attention n_layers x n_heads x N x N = {est['attention']:.3g} floats) "
            f"and {est['step_flops']:.3g} FLOPs per step; the limits are {MAX_DEEP_BYTES / 2**30:.0f} GiB and "
            f"{MAX_DEEP_STEP_FLOPS:.0e} FLOPs: use a smaller model or a shorter sequence"
        )


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
      task: any :class:`~gradattn.tasks.Task` (the sticky chain, T = 2000, by default); the model's
        d_in and C are the task's ``d_in`` and ``n_classes``, the Bayes losses its ``bayes_loss``.
      fresh_data: sample a fresh training sequence at every step (default: one fixed sequence).
      schedule: ``"adamw"`` (one rate) or ``"two_timescale"`` (the rate times ``value_lr_multiplier``
        on every value projection, weight and bias; the rest at ``lr``).
      value_lr_multiplier: the value projections' rate ratio under ``"two_timescale"`` (another value
        with ``"adamw"`` would be ignored, so it is a ValueError).
      n_checkpoints: per-head dynamics checkpoints (at steps 0, k, 2k, ...; k = steps / n_checkpoints
        must be whole); 0 records none; None (default) takes the largest divisor of ``steps`` up to 10.
      settle_tol: tolerance of the settling steps (fraction of each head's total change left), in (0, 1].
      settle_rows: attention rows (evenly spaced queries) compared for attention settling.

    The bounds of every field are declared with it (:func:`gradattn._config.option`); the command
    line takes the same. Rates (and the products a run forms, ``lr * value_lr_multiplier``,
    ``lr * weight_decay``) must be finite in float32. The model and its attention together must fit
    an estimated 64 GiB per seed and 1e14 FLOPs per training step (parameters and optimiser state, the
    n_layers x n_heads x N x N attention, activations), whatever each size's own bound; the error
    names the sizes and the estimate.
    """

    steps: int = option(1000, help="full-batch updates", minimum=1, maximum=10_000_000)
    lr: float = option(3e-4, help="peak AdamW learning rate (cosine decay to 0)", minimum=0.0)
    weight_decay: float = option(0.01, help="AdamW weight decay", minimum=0.0)
    clip: float = option(1.0, help="global-norm gradient clipping", minimum=0.0, exclusive_minimum=True)
    dropout: float = option(0.1, help="dropout rate during training", minimum=0.0, maximum=1.0, exclusive_maximum=True)
    d_model: int = option(64, help="model width", minimum=1, maximum=4096)
    n_layers: int = option(4, help="transformer blocks", minimum=1, maximum=64)
    n_heads: int = option(4, help="heads per block", minimum=1, maximum=256)
    task: Task = dataclasses.field(default_factory=StickyMarkov)
    fresh_data: bool = option(False, help="a fresh training sequence at every step (default: one fixed sequence)")
    schedule: str = option("adamw", help="a larger rate (--value-lr-multiplier) on every value projection",
                           choices=SCHEDULES, flag="--two-timescale", const="two_timescale")
    value_lr_multiplier: float = option(10.0, help="rate ratio on the value projections with --two-timescale",
                                        minimum=0.0)
    n_checkpoints: int | None = option(None, help="per-head dynamics checkpoints (must divide --steps)",
                                       minimum=0, maximum=10_000)
    settle_tol: float = option(0.1, help="tolerance of the settling steps (fraction of the total change left)",
                               minimum=0.0, exclusive_minimum=True, maximum=1.0)
    settle_rows: int = option(64, help="attention rows compared for the settling of attention", minimum=1,
                              maximum=65_536)

    def __post_init__(self):
        fn = "DeepConfig"
        check_config(self, fn)
        if self.n_checkpoints is None:
            k = min(10, self.steps)
            while self.steps % k:
                k -= 1
            object.__setattr__(self, "n_checkpoints", k)
        if self.d_model % self.n_heads:
            raise ValueError(f"{fn}: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_checkpoints:
            check_divides_steps("n_checkpoints", self.n_checkpoints, self.steps, fn)
        check_unused_option(fn, self, "value_lr_multiplier", active=self.schedule == "two_timescale",
                            needs='schedule="two_timescale"')
        two = self.schedule == "two_timescale"
        check_float32(fn, {"lr * weight_decay": self.lr * self.weight_decay,
                           "lr * value_lr_multiplier": self.lr * self.value_lr_multiplier if two else 0.0})
        check_deep_model_size(fn, self.task.d_in, self.d_model, self.n_layers, self.n_heads, self.task.n_classes,
                              self.task.n_positions, self.n_checkpoints)

    @property
    def checkpoint_steps(self) -> np.ndarray:
        """(K + 1,) the checkpoint steps 0, k, 2k, ... and the final state ``steps``."""
        if not self.n_checkpoints:
            return np.zeros((0,), np.int64)
        return np.append(np.arange(0, self.steps, self.steps // self.n_checkpoints), self.steps)

    def to_dict(self) -> dict:
        return config_dict(self)


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
    """The :class:`~gradattn.nn.Transformer` of ``config`` (d_in and C from its task) drawn from ``key``."""
    task = config.task
    return Transformer(task.d_in, config.d_model, config.n_layers, config.n_heads, task.n_classes, config.dropout,
                       rngs=nnx.Rngs(key), dtype=dtype)
