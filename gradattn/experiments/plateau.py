"""Frame before precision, decided on runs trained to their plateau.

The paper reads its two-timescale dynamics as "frame before precision": the attention pattern (the
frame) settles first, then the values refine. Measured against the last state of a run that has not
converged, the distance to that state goes to 0 at the end by construction, so the reading is
decided here on long runs, and by two criteria:

* against the converged state: the first checkpoint after which attention (the rows of alpha at
  evenly spaced queries) and the values stay within ``settle_tol`` of their total change from the
  start (:func:`gradattn.dynamics.settling_step`, scale "change"); the run's plateau
  (:func:`gradattn.dynamics.plateau_step`) says whether the last state is converged;
* with no endpoint: the first checkpoint after which each one's change per step stays below
  ``peak_fraction`` of its peak (:func:`gradattn.dynamics.quiet_step`).

Beside them, how far the attention is from uniform: the mean entropy (bits) of the attention rows
on the snapshot sequence, untrained and at the end of each arm, against the entropy of uniform causal
attention, mean_i log2(i + 1). A frame that has formed is far below the uniform entropy; a head
whose attention stays near uniform has no frame to settle first.

Both arms of the paper's experiment (SGD, and the EM-like schedule with a larger rate on W_V) run
from the same sequence and initial head, as in :func:`gradattn.em_vs_sgd` (seed s there is seed s
here: the same key split).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_divides_steps
from gradattn._config import nested, option
from gradattn._math import entropy_bits
from gradattn.dynamics import change_per_step, plateau_step, quiet_step, settling_step
from gradattn.experiments._base import (
    ArmRates,
    Experiment,
    ExperimentConfig,
    HeadSpec,
    json_floats,
    seed_std,
)
from gradattn.grads import GRAD_SOURCE_NAMES, resolve_grad_source
from gradattn.head import forward, token_losses
from gradattn.plotting import fmt_pm, pm_phrase
from gradattn.tasks import StickyMarkov, Task
from gradattn.training import train_arms

ARMS = ("sgd", "em")
TOLERANCES = (0.05, 0.1, 0.2)
"""Tolerances of settling against the converged state reported beside ``settle_tol``."""
FRACTIONS = (0.1, 0.25, 0.5)
"""Fractions of the peak rate of the endpoint-free criterion reported beside ``peak_fraction``."""


@dataclasses.dataclass(frozen=True)
class PlateauConfig(ExperimentConfig):
    """One frame-before-precision study: both arms trained for ``steps`` updates on one sequence.

    Attributes:
      steps: full-batch updates per arm (long enough to reach the plateau).
      checkpoint_every: attention and values are snapshotted every this many steps (must divide
        ``steps``), and at the end.
      task: the data (the sticky chain at T = 500 by default: N = 499 positions).
      fresh_data: train on a fresh sequence at every step (the default), so that the run converges
        to a plateau of the task's loss. On one fixed sequence (off; the paper's protocol) the head
        memorises it and the loss keeps falling far below the Bayes loss: at T = 500 after 20,000
        steps, 0.78 (SGD) and 0.35 nats (EM-like) against a Bayes loss near 1.84, with the values
        still growing, so such a run has no plateau to settle to. Attention and values are always
        snapshotted on the seed's first sequence (with fresh data, one the head never trains on).
      head, rates, grad_source: as in :class:`~gradattn.experiments.EmVsSgdConfig` (the paper's values).
      plateau_window, plateau_tol: the plateau criterion (:func:`gradattn.dynamics.plateau_step`);
        ``plateau_tol`` is a relative change, in (0, 1].
      settle_tol: settling against the converged state: the fraction of the total change left, in (0, 1].
      peak_fraction: the endpoint-free criterion: the change per step stays below this fraction of
        its peak.
      settle_rows: attention rows (evenly spaced queries) compared.
    """

    steps: int = option(20_000, help="full-batch updates per arm", minimum=2, maximum=10_000_000)
    checkpoint_every: int = option(100, help="steps between snapshots of attention and values (divides --steps)",
                                   minimum=1, maximum=10_000_000)
    task: Task = dataclasses.field(default_factory=lambda: StickyMarkov(seq_len=500))
    fresh_data: bool = option(True, help="train on one fixed sequence (the paper's protocol) instead of a fresh one per step",
                              flag="--one-sequence", const=False)
    head: HeadSpec = nested(HeadSpec)
    rates: ArmRates = nested(ArmRates)
    plateau_window: int = option(1000, help="steps per window of the plateau criterion", minimum=1,
                                 maximum=10_000_000)
    plateau_tol: float = option(5e-3, help="relative change of the mean loss between windows on the plateau",
                                minimum=0.0, exclusive_minimum=True, maximum=1.0)
    settle_tol: float = option(0.1, help="settling vs the converged state: fraction of the total change left",
                               minimum=0.0, exclusive_minimum=True, maximum=1.0)
    peak_fraction: float = option(0.25, help="endpoint-free settling: change per step below this fraction of its peak",
                                  minimum=0.0, exclusive_minimum=True, maximum=1.0)
    settle_rows: int = option(64, help="attention rows compared", minimum=1, maximum=65_536)
    grad_source: str = option("auto", help="gradient path", choices=GRAD_SOURCE_NAMES)

    def __post_init__(self):
        fn = "PlateauConfig"
        super().__post_init__()
        resolve_grad_source(self.grad_source)
        check_divides_steps("checkpoint_every", self.checkpoint_every, self.steps, fn)
        if self.steps // self.checkpoint_every < 2:
            raise ValueError(f"{fn}: steps={self.steps} / checkpoint_every={self.checkpoint_every} gives fewer than 2 snapshots")
        if 2 * self.plateau_window > self.steps:
            raise ValueError(f"{fn}: plateau_window={self.plateau_window} needs steps >= 2 windows, got steps={self.steps}")

    @property
    def checkpoint_steps(self) -> np.ndarray:
        """(K + 1,) steps of the snapshots: 0, k, 2k, ..., steps (the final state)."""
        return np.arange(0, self.steps + 1, self.checkpoint_every)



def make_plateau_run(config: PlateauConfig):
    """``run(key) -> dict`` of one seed (pure, jit/vmap-able). Per arm (``sgd``, ``em``):

      ``{arm}_loss`` (K,): the mean training loss over each interval between snapshots; ``{arm}_final_loss``
      (on the snapshot sequence);
      ``{arm}_plateau_step``; ``{arm}_attention_distance`` and ``{arm}_value_distance`` (K + 1,):
      Frobenius distance to the final state; ``{arm}_attention_rate`` and ``{arm}_value_rate``
      (K,): change per step between snapshots; ``{arm}_{attention,value}_settle_{tol}`` (settling
      against the final state, tolerances :data:`TOLERANCES` and ``settle_tol``) and
      ``{arm}_{attention,value}_quiet_{fraction}`` (the endpoint-free criterion, fractions
      :data:`FRACTIONS` and ``peak_fraction``); NaN where a series never settles;
      ``{arm}_attention_entropy_bits`` and ``init_attention_entropy_bits``: the mean entropy of the
      attention rows on the snapshot sequence at the end and before training.
    """
    PlateauConfig.require(config, "make_plateau_run")
    task = config.task
    arms = config.rates.optimizers()
    n = task.n_positions
    rows = jnp.linspace(0, n - 1, min(config.settle_rows, n)).astype(jnp.int32)
    ck_steps = jnp.asarray(config.checkpoint_steps, jnp.float32)
    k = config.checkpoint_every
    tolerances, fractions = _tolerances(config), _fractions(config)

    def run(key):
        data_key, init_key = jax.random.split(key)  # as gradattn.experiments.em_vs_sgd's
        x, y = task.sample(data_key, jnp.float32)
        params = config.head.init(init_key, task)

        def snapshot(p):
            out = forward(p, x, causal=True)
            return out.alpha[rows], out.v

        def data(t):
            if config.fresh_data:
                return task.sample(jax.random.fold_in(data_key, t), jnp.float32)
            return x, y

        # Both arms in one scan: with fresh data they see the same sequence at every step.
        final, losses, checkpoints = train_arms(params, arms, data, config.steps, grad_source=config.grad_source,
                                                checkpoint_every=k)
        # The rows are softmax outputs, in [0, 1] by construction: entropy_bits is
        # geometry.attention_entropy_bits without the check of the weights, whose extra reduction
        # over the rows makes XLA fuse and round the compiled entropies differently (by an ulp).
        out = {"bayes_loss": task.bayes_loss(x, y).mean,
               "init_attention_entropy_bits": jnp.mean(entropy_bits(forward(params, x, causal=True).alpha))}
        for name in arms:
            series = jax.tree.map(lambda s, f: jnp.concatenate([s, f[None]]), checkpoints[name], final[name].params)
            alpha, values = jax.lax.map(snapshot, series)
            curve = losses[name]
            out[f"{name}_loss"] = jnp.mean(curve.reshape(-1, k), axis=1)
            last = forward(final[name].params, x, causal=True)
            out[f"{name}_final_loss"] = jnp.mean(token_losses(last.logits, y))
            out[f"{name}_attention_entropy_bits"] = jnp.mean(entropy_bits(last.alpha))
            out[f"{name}_plateau_step"] = plateau_step(curve, config.plateau_window, config.plateau_tol)
            for what, s in (("attention", alpha), ("value", values)):
                flat = s.reshape(s.shape[0], -1)
                out[f"{name}_{what}_distance"] = jnp.linalg.norm(flat - flat[-1], axis=-1)
                out[f"{name}_{what}_rate"] = change_per_step(ck_steps, flat)
                for tol in tolerances:
                    out[f"{name}_{what}_settle_{tol:g}"] = settling_step(ck_steps, flat, tol, "change")
                for frac in fractions:
                    out[f"{name}_{what}_quiet_{frac:g}"] = quiet_step(ck_steps, flat, frac)
        return out

    return run


def _tolerances(config: PlateauConfig) -> list[float]:
    return sorted({*TOLERANCES, config.settle_tol})


def _fractions(config: PlateauConfig) -> list[float]:
    return sorted({*FRACTIONS, config.peak_fraction})


def _compare(attention: np.ndarray, values: np.ndarray) -> dict:
    """Attention vs values settling steps over seeds (NaN: never settled within the run)."""
    from scipy import stats

    both = np.isfinite(attention) & np.isfinite(values)
    a, v = attention[both], values[both]
    diff = v - a
    p = stats.wilcoxon(diff).pvalue if np.count_nonzero(diff) > 0 else float("nan")
    return {
        "attention_mean": json_floats(np.mean(a)) if a.size else None,
        "attention_std": json_floats(seed_std(a)) if a.size else None,
        "values_mean": json_floats(np.mean(v)) if v.size else None,
        "values_std": json_floats(seed_std(v)) if v.size else None,
        "n_compared": int(both.sum()),
        "attention_never": int(np.count_nonzero(~np.isfinite(attention))),
        "values_never": int(np.count_nonzero(~np.isfinite(values))),
        "frac_attention_first": json_floats(np.mean(a < v)) if a.size else None,
        "frac_tie": json_floats(np.mean(a == v)) if a.size else None,
        "frac_values_first": json_floats(np.mean(a > v)) if a.size else None,
        "lag_mean": json_floats(np.mean(diff)) if a.size else None,
        "wilcoxon_p": json_floats(p),
    }


def summarise_plateau(per_seed: dict[str, np.ndarray], seeds: list[int], config: PlateauConfig) -> dict[str, Any]:
    """The JSON-ready summary of a sweep of :func:`make_plateau_run`: per arm, the plateau, and
    attention-vs-values settling by both criteria (``lag`` = values - attention; > 0: frame first;
    the Wilcoxon signed-rank p of the paired lags; std over seeds: the sample std, ddof 1); the attention
    entropy in bits (``attention_entropy_bits``: per arm and ``init``, mean and std over seeds) against
    ``uniform_attention_entropy_bits``, that of uniform causal attention over the same positions."""
    out: dict[str, Any] = {
        "h_min": getattr(config.task, "h_min", None),
        "checkpoint_steps": [int(s) for s in config.checkpoint_steps],
        "bayes_loss_mean": json_floats(np.mean(per_seed["bayes_loss"])),
        "uniform_attention_entropy_bits": float(np.mean(np.log2(np.arange(1, config.task.n_positions + 1)))),
        "attention_entropy_bits": {},
    }
    per = {"seed": [int(s) for s in seeds]}
    for head in ("init", *ARMS):
        h = np.asarray(per_seed[f"{head}_attention_entropy_bits"], np.float64)
        out["attention_entropy_bits"][head] = {"mean": json_floats(np.mean(h)), "std": json_floats(seed_std(h))}
        per[f"{head}_attention_entropy_bits"] = json_floats(h)
    for arm in ARMS:
        plateau = np.asarray(per_seed[f"{arm}_plateau_step"], np.float64)
        res: dict[str, Any] = {
            "final_loss_mean": json_floats(np.mean(per_seed[f"{arm}_final_loss"])),
            "final_loss_std": json_floats(seed_std(per_seed[f"{arm}_final_loss"])),
            "plateau_reached": int(np.isfinite(plateau).sum()),
            "plateau_step_mean": json_floats(np.nanmean(plateau)) if np.isfinite(plateau).any() else None,
            "plateau_step_max": json_floats(np.nanmax(plateau)) if np.isfinite(plateau).any() else None,
            "against_converged": {},
            "endpoint_free": {},
            "loss_mean": json_floats(np.mean(per_seed[f"{arm}_loss"], axis=0)),
        }
        for what in ("attention", "value"):
            res[f"{what}_distance_mean"] = json_floats(np.mean(per_seed[f"{arm}_{what}_distance"], axis=0))
            res[f"{what}_rate_mean"] = json_floats(np.mean(per_seed[f"{arm}_{what}_rate"], axis=0))
        for key, grid, chosen, crit in (("against_converged", _tolerances(config), config.settle_tol, "settle"),
                                        ("endpoint_free", _fractions(config), config.peak_fraction, "quiet")):
            for val in grid:
                a = np.asarray(per_seed[f"{arm}_attention_{crit}_{val:g}"], np.float64)
                v = np.asarray(per_seed[f"{arm}_value_{crit}_{val:g}"], np.float64)
                res[key][f"{val:g}"] = _compare(a, v)
                if val == chosen:
                    per[f"{arm}_attention_{crit}"], per[f"{arm}_values_{crit}"] = json_floats(a), json_floats(v)
        per[f"{arm}_plateau_step"] = json_floats(plateau)
        per[f"{arm}_final_loss"] = json_floats(per_seed[f"{arm}_final_loss"])
        out[arm] = res
    out["per_seed"] = per
    return out


def format_plateau(results: dict) -> str:
    """The command line's summary: per arm, the plateau and both settling criteria at every
    tolerance and fraction reported (``*`` marks the configured one), and the attention entropy
    against uniform attention's."""
    cfg = results["config"]
    n_seeds = len(results["seeds"])
    h, uniform = results["attention_entropy_bits"], results["uniform_attention_entropy_bits"]
    lines = [f"frame before precision: {n_seeds} seeds, {results['steps']} steps, "
             f"T = {cfg['task']['seq_len']}, {'fresh sequence per step' if cfg['fresh_data'] else 'one sequence'}, "
             f"snapshots every {cfg['checkpoint_every']} steps",
             f"attention entropy (bits, mean over rows; {pm_phrase(results, n_seeds)}): untrained "
             f"{fmt_pm(h['init']['mean'], h['init']['std'], '.3f')}, SGD {fmt_pm(h['sgd']['mean'], h['sgd']['std'], '.3f')}, "
             f"EM-like {fmt_pm(h['em']['mean'], h['em']['std'], '.3f')}; uniform causal attention {uniform:.3f}"]
    for arm, label in (("sgd", "SGD"), ("em", "EM-like")):
        r = results[arm]
        lines.append(f"{label}: final loss {fmt_pm(r['final_loss_mean'], r['final_loss_std'], '.4f')}; plateau reached in "
                     f"{r['plateau_reached']}/{n_seeds} seeds"
                     + (f" (mean step {r['plateau_step_mean']:.0f})" if r["plateau_step_mean"] is not None else ""))
        for crit, key, chosen in (("vs converged state, tol", "against_converged", cfg["settle_tol"]),
                                  ("endpoint-free, fraction of peak", "endpoint_free", cfg["peak_fraction"])):
            for val, c in r[key].items():
                mark = "*" if float(val) == chosen else " "
                head = f"  {mark}{crit} {val}:"
                if c["n_compared"] == 0:
                    lines.append(f"{head} no seed settled")
                    continue
                p = "n/a" if c["wilcoxon_p"] is None else format(c["wilcoxon_p"], ".2g")
                lines.append(f"{head} attention {c['attention_mean']:.0f}, values {c['values_mean']:.0f} (mean step); "
                             f"attention first in {100 * c['frac_attention_first']:.0f}% of {c['n_compared']} seeds "
                             f"settled in both, values first in {100 * c['frac_values_first']:.0f}% (Wilcoxon p = {p}); "
                             f"never settled: attention {c['attention_never']}, values {c['values_never']}")
    return "\n".join(lines)


plateau_study = Experiment(
    "plateau_study", PlateauConfig, make_plateau_run, summarise_plateau, command="plateau", result="plateau",
    help="frame before precision: attention vs values settling, on runs trained to a plateau",
    format=format_plateau, curves=2)
"""The frame-before-precision study: ``plateau_study(seeds, config=None, **options)`` is
:func:`gradattn.experiments.run_experiment` of it (wall time, devices, provenance; resumable with
``checkpoint_dir``)."""
