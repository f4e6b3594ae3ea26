"""The bijection-elimination study: how close one head and the deep transformer get to the exact
posterior of :class:`~gradattn.tasks.BijectionElimination`, position by position.

The task (docs/theory.md) draws a fresh bijection pi of k symbols per sample and reveals it pair by
pair; the exact predictive at position t is uniform over the k - t + 1 outputs not yet revealed
(entropy log(k - t + 1)). A model trained on one sample would memorise pi (the query symbol is in
x), so both models train on ``batch`` fresh samples at every step and are measured on ``heldout``
other samples. Per model (the single head untrained and trained, the deep model untrained and
trained) and per position t, over the held-out samples:

* ``kl``: KL(p_t || q_t), p_t the exact predictive, q_t the model's softmax (0 log 0 = 0: the
  revealed outputs, where p = 0, contribute nothing); the gap to the exact posterior;
* ``entropy``: the entropy of q_t;
* ``revealed_mass``: the mass q_t puts on the outputs already revealed (0 for the exact posterior);
* ``loss``: the cross-entropy -log q_t(y_t), whose mean exceeds the Bayes loss log(k - t + 1) by
  the mean KL.

Per model and seed, the companion paper's summary statistic as well: the entropy MAE in bits, the mean
over positions of |mean model entropy - exact entropy| / ln 2 (:func:`entropy_mae_bits`). It is a
weaker statistic than the KL: a model can match the entropy at every position with the wrong support.

The single head (:func:`gradattn.head.init_head`, the paper's N(0, s^2) initialisation) trains by
Adam, SGD or the EM-like two-timescale SGD (:func:`gradattn.training.em_like`), its rates constant
or annealed to 0 along a cosine, through :func:`gradattn.training.train` on a fresh batch at every
step, its gradients from the path ``head_grad_source``; the deep model
(:class:`gradattn.nn.Transformer`) by the deep protocol's clipped AdamW with a cosine rate and
dropout (:func:`gradattn.experiments.deep.deep_optimizer`), vmapped over the samples of a batch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradattn._config import check_unused_option, nested, option
from gradattn.deep.laws import mean_loss, pure_apply
from gradattn.experiments._base import (
    Experiment,
    ExperimentConfig,
    HeadSpec,
    json_floats,
    seed_std,
)
from gradattn.experiments.deep import DeepConfig, deep_optimizer, init_model
from gradattn.grads import GRAD_SOURCE_NAMES
from gradattn.head import _forward_unchecked
from gradattn.plotting import atomic_savefig, integer_ticks, pm_phrase, std_array
from gradattn.tasks import BijectionElimination
from gradattn.training import em_like, optimizer_step, scan_steps, sgd, train

HEAD_OPTIMIZERS = ("adam", "sgd", "em_like")
HEAD_SCHEDULES = ("cosine", "constant")
MODELS = ("head_init", "head", "deep_init", "deep")
"""The models measured: the single head before and after training, the deep model before and after."""
METRICS = ("kl", "entropy", "revealed_mass", "loss")
"""The per-position measurements of every model (see the module docstring)."""
MODEL_LABELS = {"head_init": "head (untrained)", "head": "head (trained)", "deep_init": "deep (untrained)",
                "deep": "deep (trained)"}


@dataclasses.dataclass(frozen=True)
class BijectionConfig(ExperimentConfig):
    """Everything that defines one seed of the bijection-elimination study.

    Attributes:
      task: the :class:`~gradattn.tasks.BijectionElimination` (k = 8 by default).
      steps: training steps of each model; every step draws ``batch`` fresh samples.
      batch: fresh samples per step (the loss is the mean over samples and positions).
      heldout: held-out samples every model is measured on (shared by the four models of a seed).
      head: the single head's sizes and the std of its N(0, s^2) initial weights (:class:`HeadSpec`;
        d_k 8, d_v 16, init_scale 0.1).
      head_optimizer: ``"adam"`` (optax.adam at ``head_lr``), ``"sgd"`` (at ``head_lr``) or
        ``"em_like"`` (SGD at ``head_value_lr`` on W_V and ``head_lr`` on W_Q, W_K, W_O).
      head_lr: the single head's rate (its routing rate under ``"em_like"``).
      head_value_lr: W_V's rate under ``"em_like"`` (another value with another optimiser is a
        ValueError: it would be ignored).
      head_schedule: ``"cosine"`` (every rate of the head annealed to 0 along a cosine over
        ``steps``, as the deep model's) or ``"constant"``. With a constant rate the fresh-sample
        gradient noise keeps the head's read-out jittering, a floor under its gap.
      head_grad_source: the gradient path of the head's steps (:func:`gradattn.training.make_step`
        on each batch): ``"autodiff"`` (the default: ``jax.value_and_grad`` of the batch's mean
        dense loss) or a path of the laws, ``"blocked"``, ``"dense"``, ``"pallas"``, ``"auto"``
        (the mean of the samples' gradients, each from the laws); the same numbers to rounding.
      d_model, n_layers, n_heads: the deep model's sizes.
      deep_lr, deep_weight_decay, deep_clip, deep_dropout: its AdamW protocol (peak rate annealed
        to 0 along a cosine over ``steps``, decoupled weight decay, global-norm clipping, dropout
        during training only).

    The bounds of every field are declared with it (:func:`gradattn._config.option`).
    """

    task: BijectionElimination = dataclasses.field(default_factory=BijectionElimination)
    steps: int = option(3000, help="training steps of each model (fresh samples every step)", minimum=1,
                        maximum=10_000_000)
    batch: int = option(32, help="fresh training samples per step", minimum=1, maximum=65_536)
    heldout: int = option(512, help="held-out samples every model is measured on", minimum=1, maximum=1_000_000)
    head: HeadSpec = nested(HeadSpec, help="single head: ", d_k=8, d_v=16)
    head_optimizer: str = option("adam", help="single head: optimiser", choices=HEAD_OPTIMIZERS)
    head_lr: float = option(0.02, help="single head: learning rate (routing rate under em_like)", minimum=0.0)
    head_value_lr: float = option(0.2, help="single head: W_V's rate under em_like", minimum=0.0)
    head_schedule: str = option("cosine", help="single head: rates annealed to 0 along a cosine over the steps, "
                                "or constant", choices=HEAD_SCHEDULES)
    head_grad_source: str = option("autodiff", help="single head: gradient path of its training steps",
                                   choices=GRAD_SOURCE_NAMES)
    d_model: int = option(32, help="deep model: width", minimum=1, maximum=4096)
    n_layers: int = option(2, help="deep model: transformer blocks", minimum=1, maximum=64)
    n_heads: int = option(2, help="deep model: heads per block", minimum=1, maximum=256)
    deep_lr: float = option(3e-3, help="deep model: peak AdamW rate (cosine decay to 0)", minimum=0.0)
    deep_weight_decay: float = option(0.01, help="deep model: AdamW weight decay", minimum=0.0)
    deep_clip: float = option(1.0, help="deep model: global-norm gradient clipping", minimum=0.0,
                              exclusive_minimum=True)
    deep_dropout: float = option(0.1, help="deep model: dropout rate during training", minimum=0.0, maximum=1.0,
                                 exclusive_maximum=True)

    def __post_init__(self):
        fn = "BijectionConfig"
        if not isinstance(self.task, BijectionElimination):
            raise TypeError(f"{fn}: task must be a BijectionElimination, got {type(self.task).__name__}")
        super().__post_init__()
        check_unused_option(fn, self, "head_value_lr", active=self.head_optimizer == "em_like",
                            needs='head_optimizer="em_like"')
        try:
            _ = self.deep_config  # the deep protocol's own checks (d_model divisible by n_heads, size)
        except ValueError as err:
            raise ValueError(f"{fn}: {err}") from None

    @property
    def deep_config(self) -> DeepConfig:
        """The :class:`~gradattn.experiments.deep.DeepConfig` of the deep model (fresh data, no checkpoints)."""
        return DeepConfig(steps=self.steps, lr=self.deep_lr, weight_decay=self.deep_weight_decay, clip=self.deep_clip,
                          dropout=self.deep_dropout, d_model=self.d_model, n_layers=self.n_layers,
                          n_heads=self.n_heads, task=self.task, fresh_data=True, n_checkpoints=0)

    def head_tx(self) -> optax.GradientTransformation:
        """The single head's optimiser."""

        def rate(lr):
            return optax.cosine_decay_schedule(lr, self.steps, alpha=0.0) if self.head_schedule == "cosine" else lr

        if self.head_optimizer == "adam":
            return optax.adam(rate(self.head_lr))
        if self.head_optimizer == "sgd":
            return sgd(rate(self.head_lr))
        return em_like(rate(self.head_value_lr), rate(self.head_lr))



def position_metrics(log_p: jax.Array, logits: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """Per-position measurements of one sample: ``log_p (N, C)`` the exact log predictive (-inf where
    p = 0), ``logits (N, C)`` the model's, ``y (N,)`` the targets. Returns (N,) ``kl`` (KL(p || q),
    0 log 0 = 0), ``entropy`` (of q), ``revealed_mass`` (q's mass where p = 0), ``loss``
    (-log q(y)) and ``exact_entropy`` (of p). Input trusted; pure, jit/vmap-able."""
    log_q = jax.nn.log_softmax(logits, axis=-1)
    q = jnp.exp(log_q)
    support = log_p > -jnp.inf
    p = jnp.where(support, jnp.exp(log_p), 0.0)
    safe_log_p = jnp.where(support, log_p, 0.0)
    return {
        "kl": jnp.sum(jnp.where(support, p * (safe_log_p - log_q), 0.0), axis=-1),
        "entropy": jnp.sum(jnp.where(q > 0, -q * log_q, 0.0), axis=-1),
        "revealed_mass": jnp.sum(jnp.where(support, 0.0, q), axis=-1),
        "loss": -jnp.take_along_axis(log_q, y[:, None], axis=-1)[:, 0],
        "exact_entropy": jnp.sum(jnp.where(support, -p * safe_log_p, 0.0), axis=-1),
    }


def entropy_mae_bits(model_entropy, exact_entropy) -> np.ndarray:
    """The mean over positions of |model entropy - exact entropy|, converted from nats to bits.

    Args:
      model_entropy: (..., N) a model's mean predictive entropy at each position, in nats.
      exact_entropy: (N,) the exact posterior's entropy there, in nats.
    Returns:
      (...,) the entropy MAE in bits (float64).
    """
    model_entropy, exact_entropy = np.asarray(model_entropy, np.float64), np.asarray(exact_entropy, np.float64)
    if exact_entropy.ndim != 1 or model_entropy.shape[-1:] != exact_entropy.shape:
        raise ValueError(f"entropy_mae_bits: model_entropy must be (..., N) and exact_entropy (N,), got shapes "
                         f"{model_entropy.shape} and {exact_entropy.shape}")
    return np.mean(np.abs(model_entropy - exact_entropy), axis=-1) / np.log(2.0)


def make_bijection_run(config: BijectionConfig):
    """The per-seed study as a pure function ``run(key) -> dict`` of float32 arrays (jit/vmap-able).

    ``key`` splits into a data key, a held-out key, the head's init key, the deep model's init key
    and its dropout key. Training step t of either model draws ``batch`` samples from keys folded
    from ``fold_in(data_key, t)`` (the same samples for both models). Returns ``head_curve`` and
    ``deep_curve`` (steps,), the training loss before every update (the deep one with dropout on);
    for every model m of :data:`MODELS` and metric of :data:`METRICS`, ``{m}_{metric}`` (N,), the
    mean over the held-out samples per position; and ``exact_entropy`` (N,), the exact predictive's
    entropy there (log(k - t + 1)).
    """
    BijectionConfig.require(config, "make_bijection_run")
    task = config.task
    head_tx = config.head_tx()
    deep_cfg = config.deep_config
    deep_tx = deep_optimizer(deep_cfg)
    samples = jax.vmap(lambda k: task.sample(k, jnp.float32))

    def batch_at(data_key, t):
        return samples(jax.random.split(jax.random.fold_in(data_key, t), config.batch))

    def measure(logits_fn, x, y):
        log_p = jax.vmap(task.bayes_log_predictive)(x)
        per = jax.vmap(position_metrics)(log_p, jax.vmap(logits_fn)(x), y)
        return {name: jnp.mean(v, axis=0) for name, v in per.items()}

    def run(key):
        k_data, k_test, k_head, k_deep, k_drop = jax.random.split(key, 5)
        x_test, y_test = samples(jax.random.split(k_test, config.heldout))

        # The single head.
        head0 = config.head.init(k_head, task)

        final, history = train(head0, lambda t: batch_at(k_data, t), None, head_tx, config.steps,
                               grad_source=config.head_grad_source)
        head, head_curve = final.params, history["loss"]

        # The deep model.
        graphdef, deep0 = nnx.split(init_model(deep_cfg, k_deep), nnx.Param)
        apply = pure_apply(graphdef)

        def deep_loss(p, x, y, drop_key):
            keys = jax.random.split(drop_key, x.shape[0])
            losses = jax.vmap(lambda xi, yi, ki: mean_loss(apply(p, xi, dropout_key=ki), yi, None))(x, y, keys)
            return jnp.mean(losses)

        def deep_step(carry, t):
            p, s = carry
            x, y = batch_at(k_data, t)
            value, grads = jax.value_and_grad(deep_loss)(p, x, y, jax.random.fold_in(k_drop, t))
            return optimizer_step(deep_tx, grads, s, p), value

        (deep, _), deep_curve, _ = scan_steps(deep_step, (deep0, deep_tx.init(deep0)), config.steps)

        out = {"head_curve": head_curve, "deep_curve": deep_curve}
        models = {
            "head_init": lambda x: _forward_unchecked(head0, x).logits,
            "head": lambda x: _forward_unchecked(head, x).logits,
            "deep_init": lambda x: apply(deep0, x),
            "deep": lambda x: apply(deep, x),
        }
        for name, logits_fn in models.items():
            m = measure(logits_fn, x_test, y_test)
            out["exact_entropy"] = m.pop("exact_entropy")
            out.update({f"{name}_{metric}": v for metric, v in m.items()})
        return {name: v.astype(jnp.float32) for name, v in out.items()}

    return run


def summarise_bijection(per_seed: dict[str, np.ndarray], seeds: list[int], config: BijectionConfig) -> dict[str, Any]:
    """The JSON-ready summary of a sweep of :func:`make_bijection_run` (std over seeds: the sample std, ddof 1).

    ``positions`` 1..k and ``exact_entropy`` (the closed form log(k - t + 1)) and
    ``exact_entropy_measured`` (the held-out mean of the exact predictive's entropy; equal);
    ``models[m][metric]`` ``{"mean": (N,), "std": (N,)}`` per position, plus ``models[m]["gap"]``,
    the KL averaged over positions (mean and std over seeds, and per seed), and ``loss`` averaged
    over positions against ``bayes_loss`` (log(k!)/k), and ``models[m]["entropy_mae_bits"]``
    (:func:`entropy_mae_bits` per seed: mean, std and per seed); ``curves`` the mean and std training
    curves.
    """
    task = config.task
    out: dict[str, Any] = {
        "n_symbols": task.n_symbols,
        "positions": list(range(1, task.n_positions + 1)),
        "exact_entropy": json_floats(task.entropy_profile),
        "exact_entropy_measured": json_floats(np.mean(per_seed["exact_entropy"], axis=0)),
        "bayes_loss": task.bayes_loss_value,
        "models": {},
    }
    for m in MODELS:
        entry: dict[str, Any] = {}
        for metric in METRICS:
            v = np.asarray(per_seed[f"{m}_{metric}"], np.float64)
            entry[metric] = {"mean": json_floats(v.mean(axis=0)), "std": json_floats(seed_std(v))}
        gap = np.asarray(per_seed[f"{m}_kl"], np.float64).mean(axis=1)
        loss = np.asarray(per_seed[f"{m}_loss"], np.float64).mean(axis=1)
        entry["gap"] = {"mean": json_floats(gap.mean()), "std": json_floats(seed_std(gap)), "per_seed": json_floats(gap)}
        entry["mean_loss"] = {"mean": json_floats(loss.mean()), "std": json_floats(seed_std(loss))}
        mae = entropy_mae_bits(per_seed[f"{m}_entropy"], task.entropy_profile)
        entry["entropy_mae_bits"] = {"mean": json_floats(mae.mean()), "std": json_floats(seed_std(mae)),
                                     "per_seed": json_floats(mae)}
        out["models"][m] = entry
    out["curves"] = {
        name: {"mean": json_floats(np.mean(per_seed[f"{name}_curve"], axis=0)),
               "std": json_floats(seed_std(per_seed[f"{name}_curve"]))}
        for name in ("head", "deep")
    }
    return out


def _check_results(results, fn: str):
    try:
        models, positions = results["models"], results["positions"]
        return models, positions, results["exact_entropy"], len(results["seeds"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{fn}: results must be a bijection_study result dict ({err})") from None


def _f(v, spec="8.4f"):
    return f"{'n/a':>8}" if v is None else format(v, spec)


def format_bijection(results: dict) -> str:
    """A short text table of :data:`bijection_study`'s results (or the same dict read from JSON):
    per position, the exact entropy and every model's mean KL gap to the exact posterior."""
    models, positions, exact, n_seeds = _check_results(results, "format_bijection")
    names = [m for m in MODELS if m in models]
    lines = [
        f"Bijection elimination, k = {results['n_symbols']}: {results['steps']} steps, {n_seeds} seed"
        f"{'s' if n_seeds != 1 else ''}; KL(exact || model) per position (nats), mean over seeds",
        f"{'t':>3} {'H exact':>8} " + " ".join(f"{MODEL_LABELS[m]:>17}" for m in names),
    ]
    for i, t in enumerate(positions):
        lines.append(f"{t:>3} {_f(exact[i])} " + " ".join(f"{_f(models[m]['kl']['mean'][i], '17.4f')}" for m in names))
    lines.append(f"{'mean':>3} {'':>8} " + " ".join(f"{_f(models[m]['gap']['mean'], '17.4f')}" for m in names))
    if all("entropy_mae_bits" in models[m] for m in names):
        lines.append("entropy MAE, bits (mean over seeds of the mean over positions of |model - exact entropy|)")
        lines.append(f"{'':>12} " + " ".join(f"{_f(models[m]['entropy_mae_bits']['mean'], '17.4f')}" for m in names))
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s on {results.get('n_devices', 1)} device(s)")
    return "\n".join(lines)


def plot_bijection(results: dict, path: str | os.PathLike | None = None, *, dpi: int = 150):
    """Per-position KL gap (symlog scale) and model entropy against the exact entropy, one line per
    model, mean ± 1 sd over seeds (the mean alone for one seed); one legend below both panels, off
    the data; integer position ticks. Saved atomically when ``path`` is given; returns the Figure."""
    models, positions, exact, n_seeds = _check_results(results, "plot_bijection")
    t = np.asarray(positions)
    from matplotlib.figure import Figure  # matplotlib only when a figure is drawn

    fig = Figure(figsize=(12, 5.2), layout="constrained")
    ax_kl, ax_h = fig.subplots(1, 2)
    colors = {"head_init": "tab:gray", "head": "tab:blue", "deep_init": "tab:olive", "deep": "tab:red"}
    for m in (m for m in MODELS if m in models):
        for ax, metric in ((ax_kl, "kl"), (ax_h, "entropy")):
            mean = np.asarray(models[m][metric]["mean"], float)
            std = std_array(models[m][metric].get("std"), mean)
            ax.plot(t, mean, "o-", color=colors[m], label=MODEL_LABELS[m], ms=3)
            if std is not None:
                ax.fill_between(t, mean - std, mean + std, color=colors[m], alpha=0.2, linewidth=0)
    ax_h.plot(t, np.asarray(exact, float), "k--", lw=1.5, label="exact entropy log(k - t + 1)")
    ax_kl.set_yscale("symlog", linthresh=1e-3)
    ax_kl.set_ylabel("KL(exact || model) (nats; log scale, linear below 1e-3)")
    ax_h.set_ylabel("predictive entropy (nats)")
    for ax in (ax_kl, ax_h):
        ax.set_xlabel("position t")
        integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    handles, labels = ax_h.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8.5, frameon=False)
    ax_kl.set_title(f"Gap to the exact posterior, k = {results['n_symbols']}, {pm_phrase(results, n_seeds)}", fontsize=11)
    ax_h.set_title("Model entropy against the exact entropy", fontsize=11)
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig


bijection_study = Experiment(
    "bijection_study", BijectionConfig, make_bijection_run, summarise_bijection, command="bijection",
    help="one head and the deep transformer on bijection elimination: the gap to the exact posterior per position",
    format=format_bijection, plot=plot_bijection, curves=2)
"""The bijection-elimination study: ``bijection_study(seeds, config=None, **options)`` is
:func:`gradattn.experiments.run_experiment` of it (``chunk_size``, ``devices``, ``progress``,
``checkpoint_dir`` and ``per_seed_curves`` as there)."""
