"""The positive feedback loop over many steps: does routing keep specialising with the values?

The paper reads the routing law and the value law together as a positive feedback loop: attention
moves toward the values that lower a query's loss more than its current average does (positive
advantage), and each value moves along the error of the queries that use it, which makes those
values better still for exactly those queries. One step of the loop is an identity in aggregate
(docs/theory.md); this study measures what it builds over training, on the seed's probe sequence
(the training sequence; with ``fresh_data``, the seed's first sequence) at every checkpoint.

The statistics, with ``alpha`` the attention, causal keys ``j <= i``, ``n_i = i + 1`` visible keys,
and the compatibility and advantage of the laws in per-position units
(``b_ij = (p_i - onehot(y_i)) . (v_j W_O)``, N times the law's ``dL/dalpha_ij``;
``a_ij = sum_k alpha_ik b_ik - b_ij``):

* ``gain``, the alpha-weighted compatibility measured against uniform attention:
  ``G_i = sum_j (1/n_i - alpha_ij) b_ij``, the compatibility query i would have under uniform
  attention minus the one it has, averaged over the queries with at least two keys (logit units).
  Since ``sum_j alpha_ij a_ij = 0`` for every query, ``G_i`` is also minus the uniform mean of the
  advantage over the visible keys. It is positive when attention sits on values whose logits favour
  the target more than the average visible value's do.
* ``row_corr``: the Pearson correlation of ``alpha_ij`` and ``a_ij`` over the visible keys of each
  query, averaged over the queries where both vary (scale free, in [-1, 1]; its covariance is
  ``G_i / n_i``).
* ``pooled_corr``: the same correlation over every visible entry of the queries with at least two
  keys pooled.

Four arms from the same head on the same data, in one :func:`gradattn.training.train_arms` scan,
a 2 x 2 design of which loop halves may move (a frozen group has rate 0: ``optax.set_to_zero``):
``full`` (W_V at ``value_lr``, W_Q and W_K at ``routing_lr``), ``routing_only`` (W_V frozen),
``values_only`` (W_Q and W_K frozen) and ``output_only`` (both frozen). W_O trains at
``routing_lr`` in every arm (``freeze_output`` freezes it in all four), so the arms differ only in
the loop's halves. A statistic's growth is its value after the last step (``growth="end"``) or
its largest value at any checkpoint (``growth="peak"``) minus its value at the start (the same head
in every arm).

The decision rule's thresholds are config fields, fixed before the run (:class:`FeedbackLoopConfig`):
the loop is *supported* on the statistic ``decide_on`` when the full arm's growth exceeds the
routing-only and the values-only arm's, each by a mean paired difference above ``min_difference``
with a two-sided paired t-test p below ``p_threshold``, over at least ``min_seeds`` seeds; it is
*superadditive* when the interaction ``full - routing_only - values_only + output_only`` is above
``min_difference`` by the same test. The summary states both verdicts for every statistic and
the numbers they read (:func:`gradattn.experiments.mechanism.rule_holds`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._checks import check_divides_steps
from gradattn._config import nested, option
from gradattn.experiments._base import Experiment, ExperimentConfig, HeadSpec, json_floats, seed_std
from gradattn.experiments.mechanism import GroupRates, group_sgd, paired_difference, rule_holds
from gradattn.grads import GRAD_SOURCE_NAMES, resolve_grad_source
from gradattn.grads.blocked import blocked_loss
from gradattn.head import HeadParams, forward
from gradattn.laws import advantage
from gradattn.plotting import (
    atomic_savefig,
    fmt_pm,
    fmt_steps,
    integer_ticks,
    missing,
    pm_phrase,
    seeds_phrase,
    std_array,
)
from gradattn.tasks import StickyMarkov, Task
from gradattn.training import train_arms

ARMS = ("full", "routing_only", "values_only", "output_only")
"""The arms: which halves of the loop train (W_O trains in all, unless ``freeze_output``)."""
ARM_LABELS = {"full": "full", "routing_only": "routing only (W_V frozen)", "values_only": "values only (W_Q, W_K frozen)",
              "output_only": "output only (W_Q, W_K, W_V frozen)"}
GROWTHS = ("end", "peak")
"""How a statistic's growth is read: after the last step, or at its largest."""
STATISTICS = ("row_corr", "pooled_corr", "gain")
"""The loop's statistics (module docstring)."""
STAT_LABELS = {"row_corr": "corr(alpha, a) per query, mean", "pooled_corr": "corr(alpha, a) over entries",
               "gain": "routing gain G (logit units)"}
GROUPS = ("w_q", "w_k", "w_v", "w_o")


@dataclasses.dataclass(frozen=True)
class FeedbackLoopConfig(ExperimentConfig):
    """One feedback-loop study (module docstring).

    Attributes:
      steps: updates per arm.
      checkpoint_every: the statistics are measured every this many steps (must divide ``steps``)
        and after the last.
      task: the data (the sticky chain at T = 500: N = 499 positions).
      fresh_data: train on a fresh sequence per step (off: the paper's protocol, one sequence).
      head: the head's sizes and initialisation (:class:`HeadSpec`).
      value_lr: W_V's rate where it trains (the paper's EM-like 0.1).
      routing_lr: the rate of W_Q, W_K (where they train) and W_O (the paper's 0.01).
      freeze_output: freeze W_O in every arm too.
      decide_on: the statistic the verdict is about.
      growth: ``"end"`` (after the last step) or ``"peak"`` (the largest at any checkpoint), minus
        the start.
      p_threshold, min_difference, min_seeds: the decision rule's thresholds (module docstring).
      grad_source: the gradient path.
    """

    steps: int = option(1000, help="updates per arm", minimum=1, maximum=10_000_000)
    checkpoint_every: int = option(100, help="steps between measurements of the statistics (divides --steps)",
                                   minimum=1, maximum=10_000_000)
    task: Task = dataclasses.field(default_factory=lambda: StickyMarkov(seq_len=500))
    fresh_data: bool = option(False, help="train on a fresh sequence per step (the statistics stay on the seed's first "
                              "sequence) instead of one sequence")
    head: HeadSpec = nested(HeadSpec)
    value_lr: float = option(0.1, help="W_V's learning rate where it trains", minimum=0.0, exclusive_minimum=True)
    routing_lr: float = option(0.01, help="learning rate of W_Q, W_K where they train, and of W_O", minimum=0.0,
                               exclusive_minimum=True)
    freeze_output: bool = option(False, help="freeze W_O in every arm too")
    decide_on: str = option("row_corr", help="the statistic the verdict is about", choices=STATISTICS)
    growth: str = option("end", help="a statistic's growth: its value after the last step (end) or its largest at "
                         "any checkpoint (peak), minus its value at the start", choices=GROWTHS)
    p_threshold: float = option(0.01, help="decision rule: a difference counts when its two-sided paired t-test p is "
                                "below this", minimum=0.0, exclusive_minimum=True, maximum=1.0)
    min_difference: float = option(0.0, help="decision rule: ... and its mean paired difference (in the statistic's "
                                   "units) is above this", minimum=0.0)
    min_seeds: int = option(8, help="decision rule: fewer seeds give no verdict", minimum=2, maximum=1_000_000)
    grad_source: str = option("auto", help="gradient path", choices=GRAD_SOURCE_NAMES)

    def __post_init__(self):
        super().__post_init__()
        resolve_grad_source(self.grad_source)
        check_divides_steps("checkpoint_every", self.checkpoint_every, self.steps, type(self).__name__)

    @property
    def checkpoint_steps(self) -> np.ndarray:
        """(K + 1,) the steps at which the statistics are measured: 0, k, 2k, ..., steps."""
        return np.arange(0, self.steps + 1, self.checkpoint_every)

    def arm_rates(self) -> dict[str, GroupRates]:
        """Each arm's rates (:class:`~gradattn.experiments.mechanism.GroupRates`; 0 freezes)."""
        v, r = self.value_lr, self.routing_lr
        o = 0.0 if self.freeze_output else r
        return {"full": GroupRates(v, r, o), "routing_only": GroupRates(0.0, r, o),
                "values_only": GroupRates(v, 0.0, o), "output_only": GroupRates(0.0, 0.0, o)}

    def rule(self) -> str:
        """The decision rule in words, with its thresholds."""
        return (f"on {self.decide_on}, growth = its value at the {self.growth} minus at the start; the loop is supported "
                f"when the full arm's growth exceeds the routing-only and "
                f"the values-only arm's, each by a mean paired difference above {self.min_difference:g} with a "
                f"two-sided paired t-test p < {self.p_threshold:g}; superadditive when full - routing_only - "
                f"values_only + output_only is above {self.min_difference:g} by the same test; at least "
                f"{self.min_seeds} seeds")


def loop_statistics(params: HeadParams, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """The loop's statistics (module docstring) of the causal head ``params`` on one sequence:
    ``gain``, ``row_corr`` and ``pooled_corr`` (scalars; NaN where no query qualifies).

    Dense: builds alpha, b and a as N x N matrices (for a checkpoint, not a training step)."""
    out = forward(params, x, causal=True)
    n, c = out.logits.shape
    alpha = out.alpha
    err = jax.nn.softmax(out.logits, axis=-1) - jax.nn.one_hot(y, c, dtype=alpha.dtype)  # N e_i
    b = err @ (out.v @ params.w_o).T  # N b_ij = N u_i . v_j
    adv = advantage(alpha, b)
    visible = jnp.tril(jnp.ones((n, n), bool))
    n_keys = jnp.arange(1, n + 1, dtype=alpha.dtype)
    rows = n_keys >= 2
    n_rows = jnp.sum(rows)

    uniform = jnp.where(visible, 1.0 / n_keys[:, None], 0.0)
    gain_i = jnp.sum(jnp.where(visible, (uniform - alpha) * b, 0.0), axis=1)
    gain = jnp.where(n_rows > 0, jnp.sum(jnp.where(rows, gain_i, 0.0)) / jnp.maximum(n_rows, 1), jnp.nan)

    d_alpha = jnp.where(visible, alpha - 1.0 / n_keys[:, None], 0.0)
    adv_mean = jnp.sum(jnp.where(visible, adv, 0.0), axis=1) / n_keys
    d_adv = jnp.where(visible, adv - adv_mean[:, None], 0.0)
    var_alpha, var_adv = jnp.sum(d_alpha ** 2, axis=1), jnp.sum(d_adv ** 2, axis=1)
    ok = rows & (var_alpha > 0) & (var_adv > 0)
    r_i = jnp.where(ok, jnp.sum(d_alpha * d_adv, axis=1) / jnp.sqrt(jnp.where(ok, var_alpha * var_adv, 1.0)), 0.0)
    n_ok = jnp.sum(ok)
    row_corr = jnp.where(n_ok > 0, jnp.sum(r_i) / jnp.maximum(n_ok, 1), jnp.nan)

    pooled = visible & rows[:, None]
    count = jnp.maximum(jnp.sum(pooled), 1)
    pa = jnp.where(pooled, alpha - jnp.sum(jnp.where(pooled, alpha, 0.0)) / count, 0.0)
    pb = jnp.where(pooled, adv - jnp.sum(jnp.where(pooled, adv, 0.0)) / count, 0.0)
    denom = jnp.sum(pa ** 2) * jnp.sum(pb ** 2)
    pooled_corr = jnp.where(denom > 0, jnp.sum(pa * pb) / jnp.sqrt(jnp.where(denom > 0, denom, 1.0)), jnp.nan)
    return {"gain": gain, "row_corr": row_corr, "pooled_corr": pooled_corr}


def _flat(params: HeadParams) -> jax.Array:
    """W_Q, W_K, W_V, W_O raveled and joined (the order of :data:`GROUPS`)."""
    return jnp.concatenate([jnp.ravel(getattr(params, g)) for g in GROUPS])


def moved(per_seed: dict[str, np.ndarray], arm: str, config: FeedbackLoopConfig) -> np.ndarray:
    """(seeds, 4): how far W_Q, W_K, W_V, W_O moved in ``arm``, the Frobenius norm of final -
    initial, from the run's ``{arm}_params`` and ``init_params`` (float64 here: a frozen group's is
    exactly 0; computed inside the compiled run, XLA may recompute the initial head in another
    fusion, a last bit away)."""
    d_in, c = config.task.d_in, config.task.n_classes
    sizes = [d_in * config.head.d_k, d_in * config.head.d_k, d_in * config.head.d_v, config.head.d_v * c]
    diff = np.asarray(per_seed[f"{arm}_params"], np.float64) - np.asarray(per_seed["init_params"], np.float64)
    return np.stack([np.linalg.norm(part, axis=-1) for part in np.split(diff, np.cumsum(sizes)[:-1], axis=-1)], axis=-1)


def make_feedback_loop_run(config: FeedbackLoopConfig):
    """The per-seed study as a pure ``run(key) -> dict`` (jit/vmap-able).

    ``key`` splits as in :func:`gradattn.em_vs_sgd` (data, init); with ``fresh_data`` the sequence
    of step t is drawn from ``fold_in(data key, t)``, as in the plateau study. Per arm of
    :data:`ARMS`: ``{arm}_{statistic}`` (K + 1,) for each of :data:`STATISTICS` at
    ``config.checkpoint_steps`` on the probe sequence; ``{arm}_curve`` (steps,), the training
    loss before every update; ``{arm}_final_loss``, the probe sequence's loss after the last
    update; ``{arm}_params``, its final W_Q, W_K, W_V, W_O raveled and joined, and ``init_params``,
    the initial head's (:func:`moved` reads them).
    """
    FeedbackLoopConfig.require(config, "make_feedback_loop_run")
    task = config.task
    optimizers = {name: group_sgd(r) for name, r in config.arm_rates().items()}

    def run(key: jax.Array) -> dict[str, jax.Array]:
        data_key, init_key = jax.random.split(key)  # as gradattn.experiments.em_sgd's
        x, y = task.sample(data_key, jnp.float32)
        params = config.head.init(init_key, task)

        def data(t):
            if config.fresh_data:
                return task.sample(jax.random.fold_in(data_key, t), jnp.float32)
            return x, y

        final, losses, checkpoints = train_arms(params, optimizers, data, config.steps, grad_source=config.grad_source,
                                                checkpoint_every=config.checkpoint_every)
        out = {"init_params": _flat(params)}
        for name in ARMS:
            last = final[name].params
            series = jax.tree.map(lambda s, f: jnp.concatenate([s, f[None]]), checkpoints[name], last)
            stats = jax.lax.map(lambda p: loop_statistics(p, x, y), series)
            out.update({f"{name}_{s}": stats[s] for s in STATISTICS})
            out[f"{name}_curve"] = losses[name]
            out[f"{name}_final_loss"] = blocked_loss(last, x, y)
            out[f"{name}_params"] = _flat(last)
        return out

    return run


def growth_of(series: np.ndarray, config: FeedbackLoopConfig) -> np.ndarray:
    """Per seed, the growth of a statistic from its series (seeds, K + 1): its value after the last
    step (``config.growth == "end"``) or its largest (``"peak"``), minus its value at the start."""
    series = np.asarray(series, np.float64)
    top = series[:, -1] if config.growth == "end" else np.max(series, axis=1)
    return top - series[:, 0]


def summarise_feedback_loop(per_seed: dict[str, np.ndarray], seeds: list[int], config: FeedbackLoopConfig) -> dict[str, Any]:
    """The JSON-ready summary of a sweep of :func:`make_feedback_loop_run`.

    Per statistic: per arm its mean and std over seeds at every checkpoint, its growth
    (:func:`growth`: mean, std, and the two-sided paired t-test p against the start), and
    ``peak_step_mean``, the mean over seeds of the checkpoint step where it is largest; the paired growth
    differences ``full_minus_routing_only`` and ``full_minus_values_only`` and the interaction
    ``interaction`` (full - routing_only - values_only + output_only), each with its two-sided
    paired t-test p; ``supported`` and ``superadditive`` by the rule (null with fewer than
    ``min_seeds`` seeds). ``verdict``: those of ``decide_on``. Per arm: its rates, the final loss
    and how far each matrix moved. Standard deviations: the sample std over seeds (ddof 1).
    """
    n_seeds = len(seeds)
    decided = n_seeds >= config.min_seeds
    holds = lambda d: rule_holds(d, config.p_threshold, config.min_difference)  # noqa: E731
    rates = config.arm_rates()
    out: dict[str, Any] = {"checkpoint_steps": [int(s) for s in config.checkpoint_steps], "rule": config.rule(),
                           "decide_on": config.decide_on, "arms": {}, "statistics": {}}
    per: dict[str, Any] = {"seed": [int(s) for s in seeds]}
    for arm in ARMS:
        dist = moved(per_seed, arm, config)
        final = np.asarray(per_seed[f"{arm}_final_loss"], np.float64)
        out["arms"][arm] = {"value_lr": rates[arm].value, "frame_lr": rates[arm].frame, "output_lr": rates[arm].output,
                            "final_loss_mean": json_floats(np.mean(final)), "final_loss_std": json_floats(seed_std(final)),
                            "moved_mean": {g: json_floats(np.mean(dist[:, i])) for i, g in enumerate(GROUPS)}}
        per[f"{arm}_final_loss"] = json_floats(final)
    for stat in STATISTICS:
        growth = {}
        res: dict[str, Any] = {"arms": {}}
        for arm in ARMS:
            series = np.asarray(per_seed[f"{arm}_{stat}"], np.float64)
            growth[arm] = growth_of(series, config)
            res["arms"][arm] = {"mean": json_floats(np.mean(series, axis=0)), "std": json_floats(seed_std(series)),
                                "growth": paired_difference(growth[arm] + series[:, 0], series[:, 0]),
                                "peak_step_mean": json_floats(np.mean(config.checkpoint_steps[np.argmax(series, axis=1)]))}
            per[f"{arm}_{stat}"] = json_floats(series)
        res["full_minus_routing_only"] = paired_difference(growth["full"], growth["routing_only"])
        res["full_minus_values_only"] = paired_difference(growth["full"], growth["values_only"])
        res["interaction"] = paired_difference(growth["full"] + growth["output_only"],
                                               growth["routing_only"] + growth["values_only"])
        res["supported"] = (holds(res["full_minus_routing_only"]) and holds(res["full_minus_values_only"])
                            if decided else None)
        res["superadditive"] = holds(res["interaction"]) if decided else None
        out["statistics"][stat] = res
    chosen = out["statistics"][config.decide_on]
    if not decided:
        text = f"undecided: {seeds_phrase(n_seeds)}, fewer than min_seeds = {config.min_seeds}"
    else:
        text = (f"the feedback loop on {config.decide_on}: {'supported' if chosen['supported'] else 'not supported'}; "
                f"{'superadditive' if chosen['superadditive'] else 'not superadditive'}")
    out["verdict"] = {"decided": decided, "statistic": config.decide_on, "supported": chosen["supported"],
                      "superadditive": chosen["superadditive"], "text": text}
    out["per_seed"] = per
    return out


def _p(d: dict) -> str:
    return "n/a" if d.get("p_value") is None else f"{d['p_value']:.2g}"


def _signed_pm(d: dict, spec: str = ".4f") -> str:
    mean, sd = d["mean"], d["std"]
    m = "n/a" if missing(mean) else format(mean, "+" + spec)
    return m if missing(sd) else f"{m} ± {format(sd, spec)}"


def format_feedback_loop(results: dict) -> str:
    """The command line's report: per statistic, each arm at the start and the end and its growth;
    the full arm against each control and the interaction, with p; the verdicts."""
    n = len(results["seeds"])
    cfg = results.get("config") or {}
    lines = [f"feedback loop: {seeds_phrase(n)}, {results['steps']} steps, T = {(cfg.get('task') or {}).get('seq_len', '?')}, "
             f"{'fresh sequence per step' if cfg.get('fresh_data') else 'one sequence'}, measured every "
             f"{cfg.get('checkpoint_every', '?')} steps on the probe sequence; {pm_phrase(results, n)}"]
    lines.append("arms: " + "; ".join(
        f"{arm}: W_V {a['value_lr']:g}, W_Q/W_K {a['frame_lr']:g}, W_O {a['output_lr']:g}, final loss "
        f"{fmt_pm(a['final_loss_mean'], a['final_loss_std'])}" for arm, a in results["arms"].items()))
    for stat, res in results["statistics"].items():
        mark = "*" if stat == results["decide_on"] else " "
        lines.append(f"{mark}{STAT_LABELS[stat]} ({stat})")
        lines.append(f"  {'arm':<36} {'start':>8} {'end':>17} {'growth (' + cfg.get('growth', 'end') + ')':>17} {'p':>7} "
                     f"{'peak at':>8}")
        for arm, a in res["arms"].items():
            end_sd = a["std"][-1] if a["std"] is not None else None
            lines.append(f"  {ARM_LABELS[arm]:<36} {fmt_pm(a['mean'][0], None):>8} {fmt_pm(a['mean'][-1], end_sd):>17} "
                         f"{_signed_pm(a['growth']):>17} {_p(a['growth']):>7} {fmt_steps(a['peak_step_mean']):>8}")
        fr, fv, ia = res["full_minus_routing_only"], res["full_minus_values_only"], res["interaction"]
        word = {None: "no verdict", True: "yes", False: "no"}
        lines.append(f"  growth, full - routing only {_signed_pm(fr)} (p {_p(fr)}); full - values only {_signed_pm(fv)} "
                     f"(p {_p(fv)}): supported: {word[res['supported']]}; interaction {_signed_pm(ia)} (p {_p(ia)}): "
                     f"superadditive: {word[res['superadditive']]}")
    lines.append(f"rule: {results['rule']}")
    lines.append(f"verdict: {results['verdict']['text']}")
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s on {results.get('n_devices', 1)} device(s)")
    return "\n".join(lines)


def plot_feedback_loop(results: dict, path: str | os.PathLike | None = None, *, dpi: int = 150):
    """One panel per statistic: each arm's mean over seeds against the step, with a ±1 sd band.
    Saves to ``path`` when given; returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    try:
        steps, stats = np.asarray(results["checkpoint_steps"]), results["statistics"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"plot_feedback_loop: results must be a feedback_loop result dict ({err})") from None
    n = len(results["seeds"])
    fig = Figure(figsize=(14, 4.6), layout="constrained")
    axes = fig.subplots(1, len(stats))
    colors = {"full": "tab:red", "routing_only": "tab:blue", "values_only": "tab:orange", "output_only": "tab:gray"}
    for ax, (stat, res) in zip(np.atleast_1d(axes), stats.items()):
        for arm, a in res["arms"].items():
            mean = np.asarray([np.nan if missing(v) else v for v in a["mean"]], float)
            ax.plot(steps, mean, color=colors[arm], label=ARM_LABELS[arm])
            std = std_array(a["std"], mean)
            if std is not None:
                ax.fill_between(steps, mean - std, mean + std, color=colors[arm], alpha=0.2, linewidth=0)
        verdict = {None: "no verdict", True: "supported", False: "not supported"}[res["supported"]]
        ax.set_title(f"{STAT_LABELS[stat]}: {verdict}", fontsize=10)
        ax.set_xlabel("step")
        integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    axes_list = list(np.atleast_1d(axes))
    axes_list[0].legend(fontsize=8)
    fig.suptitle(f"the feedback loop over training, {pm_phrase(results, n)}")
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig


feedback_loop_study = Experiment(
    "feedback_loop_study", FeedbackLoopConfig, make_feedback_loop_run, summarise_feedback_loop, command="feedback-loop",
    result="feedback_loop",
    help="the feedback loop over training: alpha against the advantage, full training vs frozen routing or values",
    format=format_feedback_loop, plot=plot_feedback_loop, curves=len(ARMS))
"""The feedback-loop study: ``feedback_loop_study(seeds, config=None, **options)`` is
:func:`gradattn.experiments.run_experiment` of it."""
