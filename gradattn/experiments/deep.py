"""The deep experiment: the reference code's deep variant, and the laws of every head inside it.

The protocol: the :class:`~gradattn.nn.Transformer` (4 pre-norm layers of 4 heads, d_model 64)
trained full batch on one sequence of the task (T = 2000) by AdamW (lr 3e-4, weight decay 0.01)
with the rate annealed to 0 along a cosine over the run and the gradient clipped to global norm
1.0, dropout on (:class:`DeepConfig`, :func:`deep_optimizer`, :func:`init_model`).

Evaluation is with dropout off, on a held-out sequence from another key: loss, mean predictive
entropy, accuracy, and the gaps to H_min and to the exact Bayes loss of that held-out sequence
(the task's own ``bayes_loss``, at its own noise level). Each x_t carries its own noise, so x_t
alone identifies y_t on the training sequence: the model can memorise it, and with one fixed
sequence it does. ``fresh_data=True`` samples a new training sequence at every step instead, so the
held-out gap to Bayes measures what was learnt.

Every run is one ``lax.scan`` over the steps (:func:`gradattn.training.scan_steps`); at
checkpoints inside it, per head: the attention entropy and the feedback-loop statistics
(:func:`gradattn.dynamics.step_feedback`: does sign(a_ij) predict sign(Delta alpha_ij)? does each
value move against its responsibility-weighted error?) and, after the run, when attention and
values settle. :data:`deep_experiment` runs it over seeds
(:func:`gradattn.experiments.run_experiment`); its text report and figure are :func:`format_deep`
and :func:`plot_deep`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradattn._checks import check_divides_steps, check_float32
from gradattn._config import check_unused_option, option
from gradattn.deep.laws import deep_law_errors, laws_of, mean_loss, pure_apply
from gradattn.dynamics import StepFeedback, settling_step, step_feedback
from gradattn.experiments._base import (
    Experiment,
    ExperimentConfig,
    json_floats,
    logit_metrics,
    seed_std,
)
from gradattn.head import token_losses
from gradattn.nn import Transformer
from gradattn.plotting import (
    atomic_savefig,
    fmt_pm,
    fmt_steps,
    h_min_definition,
    integer_ticks,
    missing,
    pm_phrase,
    seeds_phrase,
    std_array,
)
from gradattn.tasks import StickyMarkov, Task
from gradattn.training import optimizer_step, scan_steps

SIGN_AGREEMENT_RANGE = (0.4, 0.6)
"""The fixed colour scale of the deep figure's sign-agreement heat map, centred at chance (0.5)."""

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
class DeepConfig(ExperimentConfig):
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
        super().__post_init__()
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
    DeepConfig.require(config, "deep_optimizer")

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


def make_deep_run(config: DeepConfig):
    """``run(key) -> dict`` of one deep run under ``config``; pure, one ``lax.scan``, vmappable.

    The key splits into the training data, the initial parameters, the dropout masks and the
    held-out sequence. Returned leaves (float32):

      curve (steps,): training loss before every update (dropout on, as the optimiser sees it).
      train_loss, train_bayes_loss: the final model's loss (dropout off) and the Bayes loss on the
        (first) training sequence.
      heldout_loss, heldout_entropy, heldout_accuracy, heldout_bayes_loss: on the held-out sequence.
      with checkpoints (K = n_checkpoints): dyn_<field> (K, L, H) for every
        :class:`gradattn.dynamics.StepFeedback` field, dyn_loss (K,) (dropout off, before the
        checkpoint's step), settle_attention and settle_values (L, H):
        :func:`gradattn.dynamics.settling_step` (scale "change", tolerance ``settle_tol``) of each
        head's attention rows and values on the training sequence over the checkpoints and the
        final state.
    """
    DeepConfig.require(config, "make_deep_run")
    task = config.task
    tx = deep_optimizer(config)
    n = task.n_positions
    shape = (config.n_layers, config.n_heads, n, config.d_model // config.n_heads)
    rows = jnp.linspace(0, n - 1, min(config.settle_rows, n)).astype(jnp.int32)
    k = config.steps // config.n_checkpoints if config.n_checkpoints else None
    per_head = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731  (over layers, then heads)

    def run(key):
        k_data, k_init, k_drop, k_test = jax.random.split(key, 4)
        graphdef, params = nnx.split(init_model(config, k_init), nnx.Param)
        apply = pure_apply(graphdef)
        x0, y0 = task.sample(k_data, jnp.float32)

        def data(t):
            return task.sample(jax.random.fold_in(k_data, t), jnp.float32) if config.fresh_data else (x0, y0)

        def loss(p, x, y, drop_key):
            return mean_loss(apply(p, x, dropout_key=drop_key), y, None)

        def step(carry, t):
            p, opt_state = carry
            x, y = data(t)
            value, grads = jax.value_and_grad(loss)(p, x, y, jax.random.fold_in(k_drop, t))
            return optimizer_step(tx, grads, opt_state, p), value

        def probe(before, after, t0):
            x, y = data(t0)
            lw = laws_of(apply, before[0], x, y, None, shape)
            _, taps1 = apply(after[0], x, return_taps=True)
            dyn = per_head(step_feedback)(lw.alpha, lw.advantage, taps1.alpha, lw.value_grad, lw.values, taps1.values)
            return dyn, lw.loss, before[0]

        (params, _), curve, records = scan_steps(step, (params, tx.init(params)), config.steps, k, probe)
        out = {"curve": curve}
        if records is not None:
            dyn, out["dyn_loss"], series = records
            out.update({f"dyn_{name}": val for name, val in dyn._asdict().items()})
            out.update(_settling(apply, series, params, x0, rows, config))

        out["train_loss"] = jnp.mean(token_losses(apply(params, x0), y0))
        out["train_bayes_loss"] = task.bayes_loss(x0, y0).mean
        x_test, y_test = task.sample(k_test, jnp.float32)
        for name, val in logit_metrics(apply(params, x_test), y_test).items():
            out[f"heldout_{name}"] = val
        out["heldout_bayes_loss"] = task.bayes_loss(x_test, y_test).mean
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


def summarise_deep(per_seed: dict[str, np.ndarray], seeds: list[int], config: DeepConfig) -> dict[str, Any]:
    """The JSON-ready summary of a sweep of :func:`make_deep_run` (std over seeds: the sample std, ddof 1);
    ``law_check`` is :func:`gradattn.deep.deep_law_errors` of a small float64 model."""
    h_min = config.task.h_min
    gap = per_seed["heldout_loss"] - per_seed["heldout_bayes_loss"]
    mean = lambda name: json_floats(np.mean(per_seed[name], axis=0))  # noqa: E731
    minus_h_min = lambda name: None if h_min is None else json_floats(np.mean(per_seed[name]) - h_min)  # noqa: E731
    out = {
        "h_min": h_min,
        "heldout": {
            "loss_mean": mean("heldout_loss"),
            "loss_std": json_floats(seed_std(per_seed["heldout_loss"])),
            "entropy_mean": mean("heldout_entropy"),
            "accuracy_mean": mean("heldout_accuracy"),
            "bayes_loss_mean": mean("heldout_bayes_loss"),
            "gap_to_bayes_mean": json_floats(np.mean(gap)),
            "gap_to_h_min_mean": minus_h_min("heldout_loss"),
            # What the reference code prints as its "gap" (there in nats, labelled bits).
            "entropy_minus_h_min_mean": minus_h_min("heldout_entropy"),
        },
        "train": {
            "loss_mean": mean("train_loss"),
            "loss_std": json_floats(seed_std(per_seed["train_loss"])),
            "bayes_loss_mean": mean("train_bayes_loss"),
        },
        "per_seed": {
            "seed": [int(s) for s in seeds],
            **{name: json_floats(per_seed[name]) for name in ("train_loss", "train_bayes_loss", "heldout_loss",
                                                               "heldout_entropy", "heldout_accuracy", "heldout_bayes_loss")},
            "gap_to_bayes": json_floats(gap),
        },
        "curve": {"mean": mean("curve"), "std": json_floats(seed_std(per_seed["curve"]))},
        "law_check": deep_law_errors(),
    }
    if config.n_checkpoints:
        dyn = {"checkpoint_steps": [int(s) for s in config.checkpoint_steps], "loss_mean": mean("dyn_loss")}
        for name in StepFeedback._fields:
            dyn[f"{name}_mean"] = mean(f"dyn_{name}")
        for name in ("settle_attention", "settle_values"):
            finite = np.isfinite(per_seed[name]).any()
            dyn[f"{name}_mean"] = json_floats(np.nanmean(per_seed[name], axis=0)) if finite else None
        out["dynamics"] = dyn
    return out


def _fmt(v, spec=".4f"):
    return "n/a" if missing(v) else format(v, spec)


def _grid(rows, fmt=lambda v: _fmt(v, ".3f")) -> list[str]:
    head = "          " + "".join(f"  head {h:<3d}" for h in range(len(rows[0])))
    return [head] + [f"  layer {i:<2d}" + "".join(f"  {fmt(v):>8}" for v in row) for i, row in enumerate(rows)]


def uniform_attention_bits(results: dict) -> float | None:
    """The mean over queries of the entropy (bits) of uniform causal attention over the deep run's
    N = T - 1 positions, log2(N!) / N: the most a head's attention entropy can be (``None`` when
    the results do not give T)."""
    seq_len = ((results.get("config") or {}).get("task") or {}).get("seq_len")
    if not isinstance(seq_len, int) or seq_len < 2:
        return None
    n = seq_len - 1
    return math.lgamma(n + 1) / n / math.log(2)


def _last_checkpoint_step(dyn: dict) -> int | None:
    steps, k = dyn.get("checkpoint_steps"), len(dyn.get("entropy_bits_mean") or [])
    return int(steps[k - 1]) if steps and 0 < k <= len(steps) else None


def format_deep(results: dict) -> str:
    """A plain-text report of :func:`gradattn.deep.deep_experiment`'s results (or the same dict read
    from JSON)."""
    try:
        cfg, ho, tr = results["config"], results["heldout"], results["train"]
        n_seeds = len(results["seeds"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"format_deep: results must be a deep_experiment result dict ({err})") from None
    data = "a fresh sequence per step" if cfg["fresh_data"] else "one fixed sequence"
    sched = "AdamW" if cfg["schedule"] == "adamw" else f"two-timescale AdamW (value projections x{cfg['value_lr_multiplier']:g})"
    over = "" if n_seeds == 1 else f" over {seeds_phrase(n_seeds)}"
    lines = [
        f"Deep transformer: {cfg['n_layers']} layers x {cfg['n_heads']} heads, d_model {cfg['d_model']}, "
        f"T = {cfg['task'].get('seq_len', 'n/a')}, {results['steps']} steps, {seeds_phrase(n_seeds)}",
        f"{sched}, lr {cfg['lr']:g} (cosine to 0), weight decay {cfg['weight_decay']:g}, clip {cfg['clip']:g}, "
        f"dropout {cfg['dropout']:g}; trained on {data}",
        h_min_definition(results),
        f"losses and predictive entropy in nats; loss: {pm_phrase(results, n_seeds)}, the rest: means{over}",
        f"training sequence (dropout off)  loss {fmt_pm(tr['loss_mean'], tr.get('loss_std'))}"
        f"   Bayes {_fmt(tr['bayes_loss_mean'])}",
        f"held-out sequence                loss {fmt_pm(ho['loss_mean'], ho.get('loss_std'))}"
        f"   Bayes {_fmt(ho['bayes_loss_mean'])}"
        f"   gap to Bayes {_fmt(ho['gap_to_bayes_mean'], '+.4f')}   gap to H_min {_fmt(ho['gap_to_h_min_mean'], '+.4f')}",
        f"                                 predictive entropy {_fmt(ho['entropy_mean'])}   accuracy {_fmt(ho['accuracy_mean'])}",
        f"per-head laws vs autodiff (float64, small model): worst relative error {results['law_check']['worst_rel_error']:.1e}",
    ]
    dyn = results.get("dynamics")
    if dyn:
        at = _last_checkpoint_step(dyn)
        uniform = uniform_attention_bits(results)
        lines.append(
            f"attention entropy (bits) at the last checkpoint{'' if at is None else f' (step {at})'}, mean{over}"
            + ("" if uniform is None else f"; uniform causal attention: {uniform:.3f} bits")
            + "; layer x head:"
        )
        lines += _grid(dyn["entropy_bits_mean"][-1])
        n_ck = len(dyn["sign_agreement_mean"])
        lines.append(f"sign agreement of the advantage and Δα (fraction of entries; chance 0.5), "
                     f"mean over {n_ck} checkpoint{'s' if n_ck != 1 else ''}{' and ' + seeds_phrase(n_seeds) if n_seeds > 1 else ''}:")
        lines += _grid(np.nanmean(np.asarray(dyn["sign_agreement_mean"], float), axis=0).tolist())
        if dyn.get("settle_attention_mean") is not None:
            seeds = "" if n_seeds == 1 else f", mean over the {seeds_phrase(n_seeds)} (diverged seeds left out)"
            lines.append(f"settling step of attention (tolerance {cfg['settle_tol']:g} of the total change){seeds}:")
            lines += _grid(dyn["settle_attention_mean"], fmt_steps)
            lines.append("settling step of values (the same):")
            lines += _grid(dyn["settle_values_mean"], fmt_steps)
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s")
    return "\n".join(lines)


def _heat_map(fig, ax, data: np.ndarray, norm, cmap: str, title: str, cbar_label: str, extend: str = "neither"):
    """One layer x head heat map on a fixed colour scale ``norm``, each cell annotated with its value
    (up to 64 cells); returns its colorbar."""
    im = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, extend=extend)
    cbar.set_label(cbar_label, fontsize=9)
    if data.size <= 64:
        rgba = im.cmap(im.norm(np.nan_to_num(data, nan=norm.vmin)))
        for (i, j), v in np.ndenumerate(data):
            r, g, b = rgba[i, j, :3]
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, "n/a" if not np.isfinite(v) else f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="w" if dark else "k")
    return cbar


def _extend(data: np.ndarray, lo: float, hi: float) -> str:
    finite = data[np.isfinite(data)]
    below, above = bool((finite < lo).any()), bool((finite > hi).any())
    return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[(below, above)]


def plot_deep(results: dict, path=None, *, dpi: int = 150):
    """Training curve (mean ± sd over seeds) against H_min and the held-out losses, in nats; per-head
    heat maps (layer x head) on fixed colour scales: the attention entropy at the last checkpoint
    in bits on [0, uniform causal attention] (:func:`uniform_attention_bits`), and the sign
    agreement averaged over checkpoints on :data:`SIGN_AGREEMENT_RANGE`, a diverging map centred at
    chance (0.5). Saved atomically when ``path`` is given; returns the matplotlib Figure."""
    try:
        curve = np.asarray(results["curve"]["mean"], float)
        std = std_array(results["curve"].get("std"), curve)
        ho, h_min = results["heldout"], results["h_min"]
        n_seeds = len(results["seeds"])
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"plot_deep: results must be a deep_experiment result dict ({err})") from None
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.figure import Figure

    dyn = results.get("dynamics")
    fig = Figure(figsize=(16 if dyn else 7, 5.2), layout="constrained")
    axes = fig.subplots(1, 3 if dyn else 1, squeeze=False, width_ratios=[1.25, 1, 1] if dyn else None)[0]
    ax = axes[0]
    steps = np.arange(curve.shape[0])
    ax.plot(steps, curve, label="training loss (dropout on), " + ("1 seed" if std is None else pm_phrase(results, n_seeds)))
    if std is not None:
        ax.fill_between(steps, curve - std, curve + std, alpha=0.25, linewidth=0)
    if not missing(h_min):
        ax.axhline(h_min, color="k", ls="--", lw=1, label=h_min_definition(results))
    over = "" if n_seeds == 1 else f", mean over {seeds_phrase(n_seeds)}"
    if ho["loss_mean"] is not None:
        ax.axhline(ho["loss_mean"], color="tab:red", lw=1, label=f"held-out loss = {ho['loss_mean']:.4f} nats{over}")
    if ho["bayes_loss_mean"] is not None:
        ax.axhline(ho["bayes_loss_mean"], color="tab:green", ls=":", lw=1.5,
                   label=f"exact Bayes loss on the held-out sequence = {ho['bayes_loss_mean']:.4f} nats{over}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    integer_ticks(ax.xaxis)
    cfg = results.get("config") or {}
    t = (cfg.get("task") or {}).get("seq_len")
    ax.set_title(f"Deep transformer{'' if t is None else f', T = {t}'}, {seeds_phrase(n_seeds)}", fontsize=11)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    if dyn:
        ent = np.asarray(dyn["entropy_bits_mean"][-1], float)
        uniform = uniform_attention_bits(results)
        top = uniform if uniform is not None else float(max(1.0, np.ceil(np.nanmax(ent)))) if np.isfinite(ent).any() else 1.0
        at = _last_checkpoint_step(dyn)
        mean = "" if n_seeds == 1 else "mean over seeds, "
        scale = (f"scale 0 to {top:.2f} bits = uniform causal attention" if uniform is not None
                 else f"scale 0 to {top:g} bits")
        _heat_map(
            fig, axes[1], ent, Normalize(0.0, top), "viridis",
            f"attention entropy, {mean}last checkpoint{'' if at is None else f' (step {at})'}\n{scale}",
            "attention entropy (bits)", _extend(ent, 0.0, top),
        )
        sign = np.nanmean(np.asarray(dyn["sign_agreement_mean"], float), axis=0)
        lo, hi = SIGN_AGREEMENT_RANGE
        n_ck = len(dyn["sign_agreement_mean"])
        cbar = _heat_map(
            fig, axes[2], sign, TwoSlopeNorm(0.5, lo, hi), "RdBu_r",
            f"sign agreement of advantage a and Δα, {mean}over {n_ck} checkpoints\n"
            f"scale {lo:g} to {hi:g}, white = chance (0.5)",
            "fraction with sign(a) = sign(Δα) (chance 0.5)", _extend(sign, lo, hi),
        )
        cbar.set_ticks(np.linspace(lo, hi, 5))
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig


deep_experiment = Experiment(
    "deep_experiment", DeepConfig, make_deep_run, summarise_deep, command="deep", result="deep",
    help="the deep transformer on the sticky Markov chain, and the laws of each of its heads",
    format=format_deep, plot=plot_deep, curves=1)
"""The deep experiment: ``deep_experiment(seeds, config=None, **options)`` is
:func:`gradattn.experiments.run_experiment` of it (``chunk_size`` seeds vmapped per device per call;
``devices``, ``progress``, ``checkpoint_dir`` and ``per_seed_curves`` as there)."""
