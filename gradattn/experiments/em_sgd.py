"""The paper's EM-vs-SGD experiment (docs/theory.md): on the sticky Markov chain, plain SGD (one
learning rate on all four matrices) against the EM-like two-timescale schedule (a larger rate on
W_V), paired per seed (same sequence, same initial parameters), full batch, ``steps`` updates.

:data:`em_vs_sgd` runs it over seeds (:func:`gradattn.experiments.run_experiment`); its text report
and its figure are :func:`format_em_vs_sgd` and :func:`plot_em_vs_sgd`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._config import nested, option
from gradattn.experiments._base import (
    ArmRates,
    Experiment,
    ExperimentConfig,
    HeadSpec,
    json_floats,
    logit_metrics,
    seed_std,
)
from gradattn.grads import GRAD_SOURCE_NAMES, resolve_grad_source
from gradattn.head import forward
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
from gradattn.training import train


@dataclasses.dataclass(frozen=True)
class EmVsSgdConfig(ExperimentConfig):
    """Everything that defines one EM-vs-SGD run; its defaults are the paper's.

    This is the one place the experiment's defaults live: :data:`em_vs_sgd` takes a config, and the
    command line exposes every option as a flag (those of the nested specs too: ``--d-k``,
    ``--sgd-lr``).

    Attributes:
      steps: full-batch updates per arm.
      task: the data (the paper's sticky Markov chain by default).
      head: the head's sizes and initialisation (:class:`HeadSpec`: d_k 10, d_v 15, init_scale 0.1).
      rates: both arms' rates (:class:`ArmRates`: SGD 0.01; EM-like 0.1 on W_V, 0.01 on the rest).
      grad_source: how gradients are computed (:func:`gradattn.grads.resolve_grad_source`):
        "auto" (the path measured fastest on the backend), "blocked", "dense", "autodiff", "pallas".

    The bounds of every option are declared with it (:func:`gradattn._config.option`); the command
    line takes the same.
    """

    steps: int = option(1000, help="full-batch updates per arm", minimum=1, maximum=10_000_000)
    task: Task = dataclasses.field(default_factory=StickyMarkov)
    head: HeadSpec = nested(HeadSpec)
    rates: ArmRates = nested(ArmRates)
    grad_source: str = option("auto", help="gradient path", choices=GRAD_SOURCE_NAMES)

    def __post_init__(self):
        # Sizes of any integral type are stored as Python ints and rates as Python floats: a config
        # built from numpy scalars equals (and shares a cached run with) the one built from Python
        # numbers, and to_dict is JSON.
        super().__post_init__()
        resolve_grad_source(self.grad_source)  # a path this backend cannot run is refused here



def end_metrics(params, x, y) -> dict:
    """:func:`logit_metrics` of the head on ``(x, y)``."""
    return logit_metrics(forward(params, x, causal=True).logits, y)


def make_em_vs_sgd(config: EmVsSgdConfig):
    """The per-seed experiment as a pure function ``run(key) -> dict`` (jit/vmap-able).

    ``key`` splits into a data key (one sequence of the task, float32) and an init key (one head,
    every entry N(0, init_scale^2)); both arms start from these same parameters on this same
    sequence. Returns, per arm (``sgd`` and ``em``): ``{arm}_curve`` (steps,), the loss before each
    update, and ``{arm}_final_loss``, ``{arm}_final_entropy``, ``{arm}_final_accuracy``, measured on
    the training sequence after the last update.
    """
    EmVsSgdConfig.require(config, "make_em_vs_sgd")
    task = config.task
    arms = config.rates.optimizers()

    def run(key: jax.Array) -> dict[str, jax.Array]:
        data_key, init_key = jax.random.split(key)
        x, y = task.sample(data_key, jnp.float32)
        params = config.head.init(init_key, task)
        out = {}
        for name, optimizer in arms.items():
            final, history = train(params, x, y, optimizer, config.steps, grad_source=config.grad_source)
            out[f"{name}_curve"] = history["loss"]
            for metric, value in end_metrics(final.params, x, y).items():
                out[f"{name}_final_{metric}"] = value
        return out

    return run


def steps_to_threshold(curves: np.ndarray, threshold: float) -> np.ndarray:
    """Per row of ``curves`` (n, steps): the first step whose loss is below ``threshold`` (steps if never)."""
    curves = np.asarray(curves)
    below = curves < threshold
    return np.where(below.any(axis=1), below.argmax(axis=1), curves.shape[1])


def summarise_em_vs_sgd(per_seed: dict[str, np.ndarray], seeds: list[int], config: EmVsSgdConfig) -> dict[str, Any]:
    """The JSON-ready summary of a sweep of :func:`make_em_vs_sgd` (the paper's protocol).

    threshold = mean over seeds of SGD's final loss; for each seed, the first step at which the
    EM-like loss curve falls below it (``steps`` if never); speed-up = steps / mean of those. If
    any seed's final loss is not finite, the threshold, the steps to it and the speed-up are
    ``None`` (JSON null) and a RuntimeWarning names the seeds.
    ``p_value`` is scipy's paired t-test of the final losses (``None`` when undefined, e.g. 1 seed).
    Standard deviations are over seeds, the sample standard deviation (:func:`seed_std`, ddof 1).
    """
    from scipy import stats

    steps = config.steps
    arm = {}
    for name in ("sgd", "em"):
        arm[name] = {
            "final_loss_mean": float(np.mean(per_seed[f"{name}_final_loss"])),
            "final_loss_std": json_floats(seed_std(per_seed[f"{name}_final_loss"])),
            "final_entropy_mean": float(np.mean(per_seed[f"{name}_final_entropy"])),
            "final_accuracy_mean": float(np.mean(per_seed[f"{name}_final_accuracy"])),
        }
    finals = np.concatenate([np.asarray(per_seed["sgd_final_loss"]), np.asarray(per_seed["em_final_loss"])])
    per_seed_steps: list[int | None]
    if np.isfinite(finals).all():
        threshold = arm["sgd"]["final_loss_mean"]
        to_thr = steps_to_threshold(per_seed["em_curve"], threshold)
        mean_steps = float(np.mean(to_thr))
        speedup = steps / mean_steps if mean_steps > 0 else None
        to_thr_summary = {"mean": mean_steps, "std": json_floats(seed_std(to_thr))}
        per_seed_steps = [int(v) for v in to_thr]
    else:
        # A diverged seed makes the threshold (a mean over seeds) NaN, and every comparison with
        # NaN false: the "speed-up" would be steps / steps = 1.0, a plausible number that is wrong.
        bad = [int(s) for s, a, b in zip(seeds, per_seed["sgd_final_loss"], per_seed["em_final_loss"])
               if not (np.isfinite(a) and np.isfinite(b))]
        warnings.warn(
            f"em_vs_sgd: the final loss of seed(s) {bad} is not finite (the run diverged); "
            "threshold, steps to threshold and speed-up are reported as null",
            RuntimeWarning,
            stacklevel=2,
        )
        threshold, speedup = None, None
        to_thr_summary = {"mean": None, "std": None}
        per_seed_steps = [None] * len(seeds)
    if len(seeds) > 1:
        p = stats.ttest_rel(per_seed["sgd_final_loss"], per_seed["em_final_loss"]).pvalue
    else:
        p = float("nan")
    curves = {}
    for name in ("sgd", "em"):
        c = np.asarray(per_seed[f"{name}_curve"], np.float64)
        curves[f"{name}_mean"] = c.mean(axis=0).tolist()
        curves[f"{name}_std"] = json_floats(seed_std(c))
    return {
        "h_min": getattr(config.task, "h_min", None),
        "sgd": arm["sgd"],
        "em": arm["em"],
        "threshold": threshold,
        "em_steps_to_sgd_final": to_thr_summary,
        "speedup": speedup,
        "p_value": json_floats(p),
        "per_seed": {
            "seed": [int(s) for s in seeds],
            "sgd_final_loss": [float(v) for v in per_seed["sgd_final_loss"]],
            "em_final_loss": [float(v) for v in per_seed["em_final_loss"]],
            "sgd_final_entropy": [float(v) for v in per_seed["sgd_final_entropy"]],
            "em_final_entropy": [float(v) for v in per_seed["em_final_entropy"]],
            "sgd_final_accuracy": [float(v) for v in per_seed["sgd_final_accuracy"]],
            "em_final_accuracy": [float(v) for v in per_seed["em_final_accuracy"]],
            "em_steps_to_sgd_final": per_seed_steps,
        },
        "curves": curves,
    }


def _never_reached(results: dict) -> str:
    """``"; 2 seeds never fell below it (counted as 1000 steps)"`` when some seed's EM-like curve
    never fell below the threshold (:func:`gradattn.experiments.steps_to_threshold` counts them as
    ``steps``), else ``""``."""
    per_seed = (results.get("per_seed") or {}).get("em_steps_to_sgd_final") or []
    n = sum(1 for v in per_seed if v is not None and v >= results["steps"])
    return "" if n == 0 else f"; {seeds_phrase(n)} never fell below it (counted as {results['steps']} steps)"


def plot_em_vs_sgd(results: dict, path: str | os.PathLike | None = None, *, ax=None, dpi: int = 150):
    """Mean loss curves of both arms of an EM-vs-SGD run with a ±1 sd band over seeds, H_min, and
    the crossing step: the mean over seeds of the first step at which the EM-like loss is below
    SGD's mean final loss (``results["em_steps_to_sgd_final"]``, ``results["threshold"]``), a
    vertical line with its value on the top axis and a marker at the threshold with a ±1 sd bar.

    ``results`` is the dict returned by :func:`gradattn.experiments.em_vs_sgd` (or read back from its
    JSON). The legend sits below the axes, off the data. Saves to ``path`` when given (atomically);
    returns the matplotlib Figure.
    """
    # A bare Figure renders with Agg and never touches pyplot's global state or GUI backends.
    from matplotlib.figure import Figure

    try:
        curves = results["curves"]
        h_min = results["h_min"]
        n_seeds = len(results["seeds"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"plot_em_vs_sgd: results must be an em_vs_sgd result dict with curves, h_min, seeds ({err})") from None
    if ax is None:
        fig = Figure(figsize=(7.5, 6.2), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    styles = {"sgd": ("SGD (lr 0.01 on all)", "tab:blue"), "em": ("EM-like (W_V lr 0.1, others 0.01)", "tab:orange")}
    cfg = results.get("config") or {}
    if cfg:
        styles["sgd"] = (f"SGD (lr {cfg['sgd_lr']:g})", "tab:blue")
        styles["em"] = (f"EM-like (W_V lr {cfg['value_lr']:g}, W_Q/W_K/W_O lr {cfg['routing_lr']:g})", "tab:orange")
    for arm, (label, color) in styles.items():
        mean = np.asarray(curves[f"{arm}_mean"], float)
        std = std_array(curves.get(f"{arm}_std"), mean)
        steps = np.arange(mean.shape[0])
        ax.plot(steps, mean, color=color, label=label)
        if std is not None:
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.25, linewidth=0)
    if not missing(h_min):
        ax.axhline(h_min, color="k", linestyle="--", linewidth=1, label=h_min_definition(results))
    cross = results.get("em_steps_to_sgd_final") or {}
    at, sd, thr = cross.get("mean"), cross.get("std"), results.get("threshold")
    if not missing(at):
        label = ("EM-like first below SGD's mean final loss"
                 + ("" if missing(thr) else f" ({thr:.4f} nats)")
                 + f": step {fmt_pm(at, sd, fmt=fmt_steps)} ({pm_phrase(results, n_seeds)}{_never_reached(results)})")
        ax.axvline(at, color="tab:orange", linestyle=":", linewidth=1.5, label=label, gid="crossing_step")
        if not missing(thr):
            marker = ax.errorbar([at], [thr], xerr=None if missing(sd) else [[sd], [sd]], fmt="o", color="tab:orange",
                                 markeredgecolor="k", capsize=3, zorder=5)
            marker.lines[0].set_gid("crossing_marker")
        top = ax.secondary_xaxis("top")
        top.set_xticks([at], labels=[f"step {fmt_steps(at)}"], color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    integer_ticks(ax.xaxis)
    ax.set_title(f"Sticky Markov chain: EM-like vs SGD, {pm_phrase(results, n_seeds)}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8.5, frameon=False)
    ax.grid(alpha=0.3)
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig


def format_em_vs_sgd(results: dict) -> str:
    """A short text table of an EM-vs-SGD result (the dict of :func:`em_vs_sgd`)."""
    n = len(results["seeds"])
    pm = pm_phrase(results, n)
    lines = [f"EM-like vs SGD: {seeds_phrase(n)}, {results['steps']} steps"]
    if results.get("h_min") is not None:
        lines.append(h_min_definition(results))
    what = "final loss" if n == 1 else f"final loss ({pm}); entropy and accuracy: means"
    lines += [
        f"{what}; loss and predictive entropy in nats",
        f"{'arm':<8} {'final loss':>17} {'entropy':>9} {'accuracy':>9}",
    ]
    for arm, label in (("sgd", "SGD"), ("em", "EM-like")):
        r = results[arm]
        lines.append(
            f"{label:<8} {fmt_pm(r['final_loss_mean'], r.get('final_loss_std')):>17} "
            f"{r['final_entropy_mean']:>9.4f} {r['final_accuracy_mean']:>9.4f}"
        )
    s = results["em_steps_to_sgd_final"]
    speed, p, thr = results["speedup"], results["p_value"], results.get("threshold")
    if s["mean"] is None:
        lines.append("EM-like vs SGD's mean final loss: n/a (a seed diverged; see the per-seed losses)")
    else:
        target = "SGD's mean final loss" + ("" if missing(thr) else f" ({thr:.4f} nats)")
        lines.append(
            f"EM-like first falls below {target} at step {fmt_pm(s['mean'], s.get('std'), fmt=fmt_steps)} "
            f"({pm}{_never_reached(results)}): "
            f"speed-up {'n/a' if speed is None else f'{speed:.2f}x'}"
            + ("" if speed is None else f" ({results['steps']} / {fmt_steps(s['mean'])} steps)")
            + f"; paired t-test of the final losses p = {'n/a' if missing(p) else f'{p:.2g}'}"
        )
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s on {results.get('n_devices', 1)} device(s)")
    return "\n".join(lines)


em_vs_sgd = Experiment(
    "em_vs_sgd", EmVsSgdConfig, make_em_vs_sgd, summarise_em_vs_sgd, command="em-vs-sgd",
    help="the paper's EM-like vs SGD experiment on the sticky Markov chain",
    format=format_em_vs_sgd, plot=plot_em_vs_sgd, curves=2)
"""The paper's EM-vs-SGD experiment: ``em_vs_sgd(seeds, config=None, **options)`` is
:func:`gradattn.experiments.run_experiment` of it (``config`` defaults to the paper's
:class:`EmVsSgdConfig`; ``chunk_size``, ``devices``, ``progress``, ``checkpoint_dir`` and
``per_seed_curves`` as there)."""
