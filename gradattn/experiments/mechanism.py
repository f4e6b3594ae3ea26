"""Where the EM-like speed-up comes from: the values (the M-step) moving faster, or a larger step.

The paper's EM-like schedule gives ``W_V`` ten times the rate of ``W_Q``, ``W_K``, ``W_O`` and reaches
plain SGD's final loss in about 430 of 1000 steps. That arm also takes a larger step than SGD at the
same base rate, so the speed-up alone does not say which of the two it is. Here every seed trains,
from one initial head on one sequence of the task (full batch, as in :func:`gradattn.em_vs_sgd`;
seed s there is seed s here: the same key split), in one :func:`gradattn.training.train_arms` scan:

* at each base rate ``b`` of ``base_rates``: plain SGD at ``b``; the **value split** (``W_V`` at
  ``ratio * b``, ``W_Q``, ``W_K``, ``W_O`` at ``b``: the paper's EM-like arm at ``b = 0.01``); the
  **reverse split** (``W_Q``, ``W_K`` at ``ratio * b``, ``W_V`` and ``W_O`` at ``b``); and SGD at the
  value split's **mean rate per parameter** (:func:`mean_rate`: the rates averaged over the head's
  entries, the same total step size taken uniformly). At the paper's sizes the value split's mean
  rate is 4.29 b and the reverse split's 5.39 b: the reverse split takes the larger total step;
* a grid of ``(value rate, routing rate)`` pairs, ``W_V`` at one rate of ``grid`` and ``W_Q``,
  ``W_K``, ``W_O`` at another; its diagonal is plain SGD at each single rate.

Each trained head is measured on the training sequence (after the last update) and on fresh
sequences of the same chain drawn inside the run from the seed's key: a **selection** set, on which
the best single rate and the best pair are picked (by the mean over seeds), and a **test** set, the
held-out loss every comparison uses. Arms with equal rates are trained once.

The decision rule's thresholds are config fields, fixed before the run (:class:`MechanismConfig`):
at base rate ``b`` the values-first reading holds when the value split's held-out loss is below
the reverse split's and below that of SGD at the same total step size, each by a mean paired
difference above ``min_difference`` with a two-sided paired t-test p below ``p_threshold``; with
fewer than ``min_seeds`` seeds there is no verdict. The summary states the verdict of that rule
and every number it reads, so it can be recomputed from the JSON (:func:`rule_holds`).
"""

# No `from __future__ import annotations`: the NamedTuples' field annotations must be objects for pdoc to
# resolve them (their generated __new__ has no module to look names up in).

import dataclasses
import math
import os
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradattn._config import nested, option
from gradattn.experiments._base import Experiment, ExperimentConfig, HeadSpec, json_floats, seed_std
from gradattn.experiments.em_sgd import steps_to_threshold
from gradattn.grads import GRAD_SOURCE_NAMES, resolve_grad_source
from gradattn.grads.blocked import blocked_loss
from gradattn.head import HeadParams
from gradattn.plotting import atomic_savefig, fmt_pm, fmt_steps, h_min_definition, missing, pm_phrase, seeds_phrase
from gradattn.tasks import StickyMarkov, Task
from gradattn.training import sgd, train_arms

MAX_RATES = 8
"""The most rates in ``base_rates`` or ``grid``."""
MAX_RATE = 100.0
"""The largest learning rate a list may hold."""
MATCHED = ("sgd", "value_split", "reverse_split", "sgd_matched")
"""The arms of each base rate, in the reports' order."""
ARM_LABELS = {"sgd": "SGD at b", "value_split": "value split", "reverse_split": "reverse split",
              "sgd_matched": "SGD matched"}
"""Short names of the arms of a base rate; "SGD matched" is SGD at the value split's mean rate per parameter."""


# ---------------------------------------------------------------------------------------------
# Rates per parameter group
# ---------------------------------------------------------------------------------------------


class GroupRates(NamedTuple):
    """Plain gradient-descent rates per parameter group: ``value`` on W_V, ``frame`` on W_Q and
    W_K (the queries and keys), ``output`` on W_O. A rate of 0 freezes its group."""

    value: float
    frame: float
    output: float


def group_sgd(rates: GroupRates) -> optax.GradientTransformation:
    """Plain gradient descent with one rate per group (:class:`GroupRates`), as an
    ``optax.multi_transform``: ``W <- W - rate * dL/dW`` for each of the four matrices with its
    group's rate; a group at rate 0 gets ``optax.set_to_zero()`` (its update is exactly zero)."""
    rates = GroupRates(*(float(r) for r in rates))
    labels = HeadParams(w_q="frame", w_k="frame", w_v="value", w_o="output")  # type: ignore[arg-type]
    return optax.multi_transform({name: optax.set_to_zero() if lr == 0 else sgd(lr)
                                  for name, lr in rates._asdict().items()}, labels)


def parameter_counts(task, head: HeadSpec) -> GroupRates:
    """Entries per group of a head for ``task``: W_V (d_in d_v), W_Q and W_K (2 d_in d_k), W_O (d_v C)."""
    return GroupRates(task.d_in * head.d_v, 2 * task.d_in * head.d_k, head.d_v * task.n_classes)


def mean_rate(rates: GroupRates, counts: GroupRates) -> float:
    """The rates averaged over the head's entries (each group weighted by its entries,
    :func:`parameter_counts`): plain SGD at this rate takes the same total step size, the sum of
    the rates over the entries."""
    return _round(sum(r * n for r, n in zip(rates, counts)) / sum(counts))


def _round(v: float) -> float:
    # 0.03 * 10 is 0.30000000000000004: rates are kept to 12 significant digits, so equal rates
    # reached two ways are one arm.
    return float(f"{v:.12g}")


# ---------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------


def parse_rates(name: str, text, fn: str) -> tuple[float, ...]:
    """The rates of a comma-separated list such as ``"0.01,0.03,0.1"`` (or a sequence of numbers),
    sorted: 1 to :data:`MAX_RATES` distinct numbers in (0, :data:`MAX_RATE`]; otherwise an error
    naming ``fn`` and ``name``."""
    if isinstance(text, str):
        parts = text.split(",")
    elif isinstance(text, (list, tuple)):
        parts = list(text)
    else:
        raise TypeError(f"{fn}: {name} must be comma-separated learning rates such as '0.01,0.03,0.1', got {text!r}")
    rates = []
    for part in parts:
        try:
            if isinstance(part, bool):
                raise ValueError
            v = float(part.strip() if isinstance(part, str) else part)
        except (TypeError, ValueError):
            raise ValueError(f"{fn}: {name} must be comma-separated learning rates such as 0.01,0.03,0.1, "
                             f"got {text!r}") from None
        if not (math.isfinite(v) and 0 < v <= MAX_RATE):
            raise ValueError(f"{fn}: {name} must hold learning rates in (0, {MAX_RATE:g}], got {part!r} in {text!r}")
        rates.append(_round(v))
    if len(set(rates)) != len(rates):
        raise ValueError(f"{fn}: {name} must hold distinct learning rates, got {text!r}")
    if len(rates) > MAX_RATES:
        raise ValueError(f"{fn}: {name} holds at most {MAX_RATES} learning rates, got {len(rates)} in {text!r}")
    return tuple(sorted(rates))


def _rates_text(rates) -> str:
    return ",".join(repr(r) for r in rates)


@dataclasses.dataclass(frozen=True)
class MechanismConfig(ExperimentConfig):
    """One study of the EM-like speed-up's mechanism (module docstring).

    Attributes:
      steps: full-batch updates per arm on the seed's one training sequence.
      task: the data (the paper's sticky Markov chain, T = 2000).
      head: the head's sizes and initialisation (:class:`HeadSpec`, the paper's).
      base_rates: the base rates b (comma-separated; a sequence of numbers is accepted and stored
        as that text): at each, SGD at b, the value split, the reverse split and SGD at the value
        split's mean rate per parameter.
      ratio: the splits' factor: the fast group trains at ``ratio * b`` (> 1; the paper's 10).
      grid: the rates of the (value, routing) grid: W_V at one, W_Q, W_K, W_O at another (every
        pair, the diagonal being plain SGD at each single rate).
      heldout: fresh sequences per seed in each of the two held-out sets (selection and test).
      p_threshold: the rule's bound on the two-sided paired t-test p of a difference.
      min_difference: the rule's bound on the mean paired held-out loss difference, in nats.
      min_seeds: fewer seeds than this give no verdict (the numbers are still reported).
      grad_source: the gradient path (:func:`gradattn.grads.resolve_grad_source`).
    """

    steps: int = option(1000, help="full-batch updates per arm", minimum=1, maximum=10_000_000)
    task: Task = dataclasses.field(default_factory=StickyMarkov)
    head: HeadSpec = nested(HeadSpec)
    base_rates: str = option("0.01,0.03,0.1", help="base learning rates b, comma-separated: at each, SGD at b, the value "
                             "split (W_V at ratio x b), the reverse split (W_Q, W_K at ratio x b) and SGD at the value "
                             "split's mean rate per parameter")
    ratio: float = option(10.0, help="the splits' factor: the fast group trains at ratio x b (> 1)", minimum=1.0,
                          exclusive_minimum=True, maximum=1000.0)
    grid: str = option("0.01,0.03,0.1,0.3", help="rates of the (value, routing) grid, comma-separated: W_V at one, "
                       "W_Q/W_K/W_O at another; its diagonal is SGD at each single rate")
    heldout: int = option(2, help="fresh sequences per seed in each held-out set (one picks the best rates, one tests them)",
                          minimum=1, maximum=1024)
    p_threshold: float = option(0.01, help="decision rule: a difference counts when its two-sided paired t-test p is "
                                "below this", minimum=0.0, exclusive_minimum=True, maximum=1.0)
    min_difference: float = option(0.0, help="decision rule: ... and its mean paired held-out loss difference (nats) "
                                   "is above this", minimum=0.0)
    min_seeds: int = option(8, help="decision rule: fewer seeds give no verdict", minimum=2, maximum=1_000_000)
    grad_source: str = option("auto", help="gradient path", choices=GRAD_SOURCE_NAMES)

    def __post_init__(self):
        fn = type(self).__name__
        for name in ("base_rates", "grid"):  # a sequence of numbers is stored as its text
            if isinstance(getattr(self, name), (list, tuple)):
                object.__setattr__(self, name, _rates_text(parse_rates(name, getattr(self, name), fn)))
        super().__post_init__()
        resolve_grad_source(self.grad_source)
        for name in ("base_rates", "grid"):
            object.__setattr__(self, name, _rates_text(parse_rates(name, getattr(self, name), fn)))
        fast = max(self.base_rate_values) * self.ratio
        if fast > MAX_RATE:
            raise ValueError(f"{fn}: ratio={self.ratio:g} x the largest of base_rates={self.base_rates} is {fast:g}, "
                             f"above {MAX_RATE:g}")

    @property
    def base_rate_values(self) -> tuple[float, ...]:
        """``base_rates`` as numbers, ascending."""
        return parse_rates("base_rates", self.base_rates, type(self).__name__)

    @property
    def grid_values(self) -> tuple[float, ...]:
        """``grid`` as numbers, ascending."""
        return parse_rates("grid", self.grid, type(self).__name__)

    def rule(self) -> str:
        """The decision rule in words, with its thresholds."""
        return (f"at base rate b the value split's held-out loss is below the reverse split's and below that of SGD at "
                f"the value split's mean rate per parameter (the same total step size), each by a mean paired difference "
                f"above {self.min_difference:g} nats with a two-sided paired t-test p < {self.p_threshold:g}; "
                f"a split beats the best single rate when the best pair's held-out loss is below the best single "
                f"rate's by the same criterion (both picked on the selection set); at least {self.min_seeds} seeds")


class ArmTable(NamedTuple):
    """The arms of a :class:`MechanismConfig`: their rates, and which arm plays each role."""

    rates: tuple[GroupRates, ...]
    """Every arm's rates, each arm once."""
    matched: dict[str, tuple[int, ...]]
    """Role (:data:`MATCHED`) -> the arm at each base rate (in ``base_rate_values`` order)."""
    grid: tuple[tuple[int, ...], ...]
    """``grid[i][j]``: the arm with W_V at ``grid_values[i]`` and W_Q, W_K, W_O at ``grid_values[j]``."""


def arm_table(config: MechanismConfig) -> ArmTable:
    """The arms of ``config``, each rate triple once (a grid pair equal to a matched arm is one arm)."""
    counts = parameter_counts(config.task, config.head)
    rates: list[GroupRates] = []

    def arm(r: GroupRates) -> int:
        r = GroupRates(*(_round(v) for v in r))
        if r not in rates:
            rates.append(r)
        return rates.index(r)

    matched: dict[str, list[int]] = {role: [] for role in MATCHED}
    for b in config.base_rate_values:
        fast = config.ratio * b
        value_split = GroupRates(fast, b, b)
        matched["sgd"].append(arm(GroupRates(b, b, b)))
        matched["value_split"].append(arm(value_split))
        matched["reverse_split"].append(arm(GroupRates(b, fast, b)))
        m = mean_rate(value_split, counts)
        matched["sgd_matched"].append(arm(GroupRates(m, m, m)))
    grid = tuple(tuple(arm(GroupRates(v, r, r)) for r in config.grid_values) for v in config.grid_values)
    return ArmTable(tuple(rates), {k: tuple(v) for k, v in matched.items()}, grid)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def make_mechanism_run(config: MechanismConfig):
    """The per-seed study as a pure ``run(key) -> dict`` (jit/vmap-able).

    ``key`` splits as in :func:`gradattn.em_vs_sgd` into a data key (the training sequence) and an
    init key (the head); ``jax.random.fold_in(key, 1)`` gives the ``2 * heldout`` held-out
    sequences (the first ``heldout`` the selection set, the rest the test set). Every arm of
    :func:`arm_table` trains from the same head on the same sequence in one scan. Returns, with A
    arms: ``curve`` (A, steps), the training loss before every update; ``final_loss`` (A,), the
    training loss after the last update; ``select_loss`` and ``heldout_loss`` (A,), the mean loss
    over the selection and the test sequences; ``heldout_bayes_loss``, the exact Bayes loss of the
    test sequences. Losses are computed by the blocked forward pass (nothing N x N).
    """
    MechanismConfig.require(config, "make_mechanism_run")
    task, h = config.task, config.heldout
    table = arm_table(config)
    names = [f"arm{i}" for i in range(len(table.rates))]
    optimizers = {name: group_sgd(r) for name, r in zip(names, table.rates)}

    def run(key: jax.Array) -> dict[str, jax.Array]:
        data_key, init_key = jax.random.split(key)  # as gradattn.experiments.em_sgd's
        x, y = task.sample(data_key, jnp.float32)
        params = config.head.init(init_key, task)
        xs, ys = jax.vmap(lambda k: task.sample(k, jnp.float32))(jax.random.split(jax.random.fold_in(key, 1), 2 * h))
        final, losses, _ = train_arms(params, optimizers, lambda t: (x, y), config.steps, grad_source=config.grad_source)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *(final[name].params for name in names))

        def measure(p):
            held = jax.lax.map(lambda xy: blocked_loss(p, *xy), (xs, ys))
            return blocked_loss(p, x, y), jnp.mean(held[:h]), jnp.mean(held[h:])

        train, select, test = jax.lax.map(measure, stacked)
        bayes = jax.vmap(lambda a, b: task.bayes_loss(a, b).mean)(xs[h:], ys[h:])
        return {"curve": jnp.stack([losses[name] for name in names]), "final_loss": train, "select_loss": select,
                "heldout_loss": test, "heldout_bayes_loss": jnp.mean(bayes)}

    return run


# ---------------------------------------------------------------------------------------------
# The summary and the rule
# ---------------------------------------------------------------------------------------------


def paired_difference(worse, better) -> dict[str, Any]:
    """Over seeds, ``worse - better``: its mean, its sample std and the two-sided paired t-test p
    (``scipy.stats.ttest_rel(worse, better)``; null with fewer than two seeds, a non-finite value,
    or every difference 0; 0 when every difference is the same non-zero number)."""
    from scipy import stats

    a, b = np.asarray(worse, np.float64), np.asarray(better, np.float64)
    d = a - b
    p = float("nan")
    if d.size > 1 and np.isfinite(d).all():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no spread: scipy's NaN or 0, said above
            p = float(stats.ttest_rel(a, b).pvalue)
    return {"mean": json_floats(np.mean(d)), "std": json_floats(seed_std(d)), "p_value": json_floats(p)}


def rule_holds(difference: dict, p_threshold: float, min_difference: float) -> bool:
    """Whether a :func:`paired_difference` (``worse - better``) counts: its mean above
    ``min_difference`` and its p below ``p_threshold`` (a null mean or p never counts)."""
    mean, p = difference.get("mean"), difference.get("p_value")
    return mean is not None and p is not None and mean > min_difference and p < p_threshold


def _stats(v) -> dict:
    v = np.asarray(v, np.float64)
    return {"mean": json_floats(np.mean(v)), "std": json_floats(seed_std(v))}


def _best(means: np.ndarray, arms: list[int]) -> int | None:
    """Of ``arms``, the one with the least finite mean (None if none is finite)."""
    finite = [a for a in arms if np.isfinite(means[a])]
    return min(finite, key=lambda a: means[a]) if finite else None


def summarise_mechanism(per_seed: dict[str, np.ndarray], seeds: list[int], config: MechanismConfig) -> dict[str, Any]:
    """The JSON-ready summary of a sweep of :func:`make_mechanism_run`.

    ``arms``: every arm's rates and mean rate per parameter, its final training loss and held-out
    (test) loss, mean and std over seeds. ``base_rates``: per base rate b, each role of
    :data:`MATCHED` (its arm, training and held-out loss, the paired difference from SGD at b on
    both, and the paper's speed-up: threshold = SGD at b's mean final training loss; per seed the
    first step whose training loss is below it, ``steps`` if never; speed-up = steps / their
    mean; null when a final loss of one of that base rate's arms is not finite), the rule's two
    differences (``reverse_minus_value`` and ``matched_minus_value``, held-out loss, positive when
    the value split is better) and ``rule_holds``. ``best``: the best single rate
    and the best pair, each picked by its mean selection loss, and ``single_minus_pair`` on the test
    set. ``verdict``: what the rule says (null fields with fewer than ``min_seeds`` seeds).
    Standard deviations are the sample std over seeds (ddof 1); p values two-sided paired t-tests.
    """
    table = arm_table(config)
    final = np.asarray(per_seed["final_loss"], np.float64)
    held = np.asarray(per_seed["heldout_loss"], np.float64)
    select = np.asarray(per_seed["select_loss"], np.float64)
    curves = np.asarray(per_seed["curve"])
    counts = parameter_counts(config.task, config.head)
    n_seeds = len(seeds)
    decided = n_seeds >= config.min_seeds
    holds = lambda d: rule_holds(d, config.p_threshold, config.min_difference)  # noqa: E731

    arms = [{"value_lr": r.value, "frame_lr": r.frame, "output_lr": r.output, "mean_rate": mean_rate(r, counts),
             "final_loss": _stats(final[:, i]), "heldout_loss": _stats(held[:, i]), "select_loss": _stats(select[:, i])}
            for i, r in enumerate(table.rates)]
    bases = []
    for j, b in enumerate(config.base_rate_values):
        idx = {role: table.matched[role][j] for role in MATCHED}
        sgd_i = idx["sgd"]
        sgd_final = final[:, sgd_i]
        threshold = float(np.mean(sgd_final)) if np.isfinite(final[:, list(idx.values())]).all() else None
        roles = {}
        for role, i in idx.items():
            res: dict[str, Any] = {"arm": i, "final_loss": _stats(final[:, i]), "heldout_loss": _stats(held[:, i])}
            if role != "sgd":
                res["minus_sgd_final"] = paired_difference(final[:, i], sgd_final)
                res["minus_sgd_heldout"] = paired_difference(held[:, i], held[:, sgd_i])
            if threshold is not None:
                to_thr = steps_to_threshold(curves[:, i], threshold)
                mean_steps = float(np.mean(to_thr))
                res["steps_to_threshold"] = {"mean": mean_steps, "std": json_floats(seed_std(to_thr)),
                                             "per_seed": [int(v) for v in to_thr]}
                res["speedup"] = config.steps / mean_steps if mean_steps > 0 else None
            else:
                res["steps_to_threshold"], res["speedup"] = None, None
            roles[role] = res
        reverse = paired_difference(held[:, idx["reverse_split"]], held[:, idx["value_split"]])
        matched = paired_difference(held[:, idx["sgd_matched"]], held[:, idx["value_split"]])
        bases.append({"base_rate": b, "threshold": threshold, "arms": roles,
                      "reverse_minus_value": reverse, "matched_minus_value": matched,
                      "rule_holds": (holds(reverse) and holds(matched)) if decided else None})

    grid = config.grid_values
    singles = [table.grid[i][i] for i in range(len(grid))]
    pairs = [a for row in table.grid for a in row]
    select_means = np.mean(select, axis=0)
    best_single, best_pair = _best(select_means, singles), _best(select_means, pairs)
    best: dict[str, Any] = {"selected_on": "select_loss"}
    for name, chosen in (("single", best_single), ("pair", best_pair)):
        best[name] = None if chosen is None else {
            "arm": chosen, "value_lr": table.rates[chosen].value, "routing_lr": table.rates[chosen].frame,
            "select_loss": _stats(select[:, chosen]), "heldout_loss": _stats(held[:, chosen])}
    best["single_minus_pair"] = (paired_difference(held[:, best_single], held[:, best_pair])
                                 if best_single is not None and best_pair is not None else None)
    pair_wins = (best["single_minus_pair"] is not None and holds(best["single_minus_pair"])) if decided else None

    supported = [e["base_rate"] for e in bases if e["rule_holds"]]
    if not decided:
        text = f"undecided: {seeds_phrase(n_seeds)}, fewer than min_seeds = {config.min_seeds}"
    elif len(supported) == len(bases):
        text = "the values moving faster: supported at every base rate"
    elif supported:
        text = f"the values moving faster: supported at {len(supported)} of {len(bases)} base rates"
    else:
        text = "the values moving faster: not supported at any base rate"
    return {
        "h_min": getattr(config.task, "h_min", None),
        "heldout_bayes_loss_mean": json_floats(np.mean(per_seed["heldout_bayes_loss"])),
        "rule": config.rule(),
        "arms": arms,
        "base_rates": bases,
        "grid": {"rates": list(grid), "arm": [list(row) for row in table.grid],
                 "select_loss_mean": json_floats(select_means[np.asarray(table.grid)]),
                 "heldout_loss_mean": json_floats(np.mean(held, axis=0)[np.asarray(table.grid)])},
        "best": best,
        "verdict": {"decided": decided, "supported_at": supported if decided else None,
                    "values_faster_everywhere": (len(supported) == len(bases)) if decided else None,
                    "pair_beats_single": pair_wins, "text": text},
        "per_seed": {"seed": [int(s) for s in seeds], "final_loss": json_floats(final),
                     "select_loss": json_floats(select), "heldout_loss": json_floats(held),
                     "heldout_bayes_loss": json_floats(per_seed["heldout_bayes_loss"])},
    }


# ---------------------------------------------------------------------------------------------
# The report and the figure
# ---------------------------------------------------------------------------------------------


def _p(d: dict | None) -> str:
    return "n/a" if d is None or d.get("p_value") is None else f"{d['p_value']:.2g}"


def _rates_label(arm: dict) -> str:
    v, f, o = arm["value_lr"], arm["frame_lr"], arm["output_lr"]
    if v == f == o:
        return f"all {v:.4g}"
    return f"V {v:.4g}, QK {f:.4g}, O {o:.4g}"


def _signed_pm(d: dict) -> str:
    """``"+0.0123 ± 0.0045"`` of a :func:`paired_difference` (the mean signed; the mean alone for one seed)."""
    mean, sd = d["mean"], d["std"]
    m = "n/a" if missing(mean) else f"{mean:+.4f}"
    return m if missing(sd) else f"{m} ± {sd:.4f}"


def format_mechanism(results: dict) -> str:
    """The command line's report: per base rate the four arms (rates, final training and held-out
    loss, the held-out difference from SGD at b with its p, steps to SGD's final loss and the
    speed-up), the rule's two differences and whether it holds; the best single rate and pair; the
    verdict."""
    n = len(results["seeds"])
    pm = pm_phrase(results, n)
    cfg = results.get("config") or {}
    lines = [f"EM-like speed-up, values or step size: {seeds_phrase(n)}, {results['steps']} steps, ratio "
             f"{cfg.get('ratio', '?')}, {cfg.get('heldout', '?')} + {cfg.get('heldout', '?')} held-out sequences "
             f"(selection + test); losses in nats, {pm}"]
    if results.get("h_min") is not None:
        lines.append(f"{h_min_definition(results)}; exact Bayes loss of the test sequences "
                     f"{results['heldout_bayes_loss_mean']:.4f}")
    lines.append("SGD matched: SGD at the value split's mean rate per parameter (the same total step size); "
                 "rates V on W_V, QK on W_Q and W_K, O on W_O")
    arms = results["arms"]
    for base in results["base_rates"]:
        thr = base["threshold"]
        lines.append(f"base rate {base['base_rate']:g} (threshold: SGD's mean final loss "
                     f"{'n/a' if thr is None else f'{thr:.4f}'})")
        lines.append(f"  {'arm':<14} {'rates':<24} {'final loss':>17} {'held-out loss':>17} {'held-out - SGD':>17} "
                     f"{'p':>7} {'steps to thr.':>13} {'speed-up':>8}")
        for role in MATCHED:
            r = base["arms"][role]
            diff = r.get("minus_sgd_heldout")
            s = r.get("steps_to_threshold")
            steps = "n/a" if s is None else fmt_steps(s["mean"])
            speed = "n/a" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
            lines.append(f"  {ARM_LABELS[role]:<14} {_rates_label(arms[r['arm']]):<24} "
                         f"{fmt_pm(r['final_loss']['mean'], r['final_loss']['std']):>17} "
                         f"{fmt_pm(r['heldout_loss']['mean'], r['heldout_loss']['std']):>17} "
                         f"{'' if diff is None else _signed_pm(diff):>17} {'' if diff is None else _p(diff):>7} "
                         f"{steps:>13} {speed:>8}")
        rv, mv = base["reverse_minus_value"], base["matched_minus_value"]
        verdict = {None: "no verdict", True: "holds", False: "does not hold"}[base["rule_holds"]]
        lines.append(f"  held-out loss, reverse split - value split {_signed_pm(rv)} (p {_p(rv)}); "
                     f"SGD matched - value split {_signed_pm(mv)} (p {_p(mv)}): rule {verdict}")
    best = results["best"]
    if best["single"] is not None and best["pair"] is not None:
        s, p, d = best["single"], best["pair"], best["single_minus_pair"]
        lines.append(f"best single rate (picked on the selection set): {s['value_lr']:g}, held-out "
                     f"{fmt_pm(s['heldout_loss']['mean'], s['heldout_loss']['std'])}; best pair: W_V {p['value_lr']:g}, "
                     f"W_Q/W_K/W_O {p['routing_lr']:g}, held-out {fmt_pm(p['heldout_loss']['mean'], p['heldout_loss']['std'])}; "
                     f"single - pair {_signed_pm(d)} (p {_p(d)})")
    else:
        lines.append("best single rate vs best pair: n/a (every arm of the grid diverged)")
    v = results["verdict"]
    lines.append(f"rule: {results['rule']}")
    pair = {None: "no verdict", True: "yes", False: "no"}[v["pair_beats_single"]]
    lines.append(f"verdict: {v['text']}; a pair beats the best single rate: {pair}")
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s on {results.get('n_devices', 1)} device(s)")
    return "\n".join(lines)


def plot_mechanism(results: dict, path: str | os.PathLike | None = None, *, dpi: int = 150):
    """Left: the held-out loss of the four arms against the base rate (mean ± 1 sd over seeds).
    Right: the grid's mean held-out loss, W_V's rate against W_Q/W_K/W_O's, the best single rate
    and the best pair (picked on the selection set) marked. Saves to ``path`` when given; returns
    the matplotlib Figure."""
    from matplotlib.figure import Figure

    try:
        bases, grid, best = results["base_rates"], results["grid"], results["best"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"plot_mechanism: results must be an em_mechanism result dict ({err})") from None
    n = len(results["seeds"])
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax, hm = fig.subplots(1, 2)
    b = [e["base_rate"] for e in bases]
    styles = {"sgd": ("o-", "tab:blue"), "value_split": ("s-", "tab:orange"), "reverse_split": ("^-", "tab:green"),
              "sgd_matched": ("D--", "tab:purple")}
    for role, (marker, color) in styles.items():
        mean = np.asarray([np.nan if missing(m) else m for m in (e["arms"][role]["heldout_loss"]["mean"] for e in bases)],
                          float)
        std = [e["arms"][role]["heldout_loss"]["std"] for e in bases]
        bars = None if any(missing(s) for s in std) else np.asarray(std, float)
        label = "SGD at the value split's mean rate" if role == "sgd_matched" else ARM_LABELS[role]
        ax.errorbar(b, mean, yerr=bars, fmt=marker, color=color, capsize=3, label=label)
    if not missing(results.get("heldout_bayes_loss_mean")):
        ax.axhline(results["heldout_bayes_loss_mean"], color="gray", linestyle=":", linewidth=1, label="exact Bayes loss")
    ax.set_xscale("log")
    ax.set_xlabel("base learning rate b")
    ax.set_ylabel(f"held-out loss after {results['steps']} steps (nats)")
    ax.set_title(f"held-out loss, {pm_phrase(results, n)}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    rates = grid["rates"]
    z = np.asarray([[np.nan if missing(v) else v for v in row] for row in grid["heldout_loss_mean"]], float)
    im = hm.imshow(z, origin="lower", cmap="viridis")
    hm.set_xticks(range(len(rates)), labels=[f"{r:g}" for r in rates])
    hm.set_yticks(range(len(rates)), labels=[f"{r:g}" for r in rates])
    hm.set_xlabel("W_Q, W_K, W_O rate")
    hm.set_ylabel("W_V rate")
    for i in range(len(rates)):
        for j in range(len(rates)):
            if np.isfinite(z[i, j]):
                hm.text(j, i, f"{z[i, j]:.3f}", ha="center", va="center", fontsize=7, color="w")
    for name, marker in (("single", "o"), ("pair", "*")):
        if best.get(name) is not None:
            i, j = rates.index(best[name]["value_lr"]), rates.index(best[name]["routing_lr"])
            hm.plot([j], [i], marker, markersize=16, markerfacecolor="none", markeredgecolor="r",
                    label=f"best {name} (selection set)")
    hm.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=2, frameon=False)
    hm.set_title("mean held-out loss of the (value, routing) grid")
    fig.colorbar(im, ax=hm, label="nats")
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig


mechanism_study = Experiment(
    "mechanism_study", MechanismConfig, make_mechanism_run, summarise_mechanism, command="em-mechanism",
    result="em_mechanism",
    help="the EM-like speed-up: value split vs reverse split vs SGD at the same step size, on held-out loss",
    format=format_mechanism, plot=plot_mechanism, curves=len(arm_table(MechanismConfig()).rates))
"""The mechanism study: ``mechanism_study(seeds, config=None, **options)`` is
:func:`gradattn.experiments.run_experiment` of it."""
