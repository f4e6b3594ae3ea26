"""The manifold claim, measured where the head cannot memorise its data.

The paper reads the trained values and contexts as lying along a low-dimensional manifold
parametrised by the posterior entropy. On one training sequence a head memorises it at higher noise,
so here each arm (SGD, and the EM-like schedule) trains on a fresh sequence of the task at every
step, and the geometry is measured on ``heldout`` held-out sequences pooled: the R^2 of the
posterior entropy (the task's ``bayes_filter_entropy``) on the ``n_components`` leading principal
components of the values v_j and of the contexts g_i (:func:`gradattn.geometry.covariate_r2`), and
its linear read-out from all of the contexts (:func:`gradattn.geometry.decoding_r2`). Two controls:
the untrained head (the same initial parameters) and the trained head against the entropy shuffled
over positions (what R^2 a covariate with no relation to the geometry gets).

A ceiling beside them: the values are linear in the inputs, v_j = x_j W_V, so the R^2 of the
entropy on any linear read-out of the values (their leading components included) is at most its
R^2 on x itself, whatever training does. :func:`linear_readout_ceiling` reports that R^2 on x_t,
and on [x_t, x_{t-1}], on the same pooled held-out positions: a value R^2 near it is all the single
head can show.
"""

from __future__ import annotations

import dataclasses
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
    seed_std,
)
from gradattn.geometry import covariate_r2, decoding_r2
from gradattn.grads import GRAD_SOURCE_NAMES, resolve_grad_source
from gradattn.head import forward, token_losses
from gradattn.plotting import fmt_pm, pm_phrase
from gradattn.tasks import StickyMarkov, Task
from gradattn.training import train_arms

ARMS = ("sgd", "em")
HEADS = ("init", "sgd", "em")
MEASURES = ("values_r2", "contexts_r2", "contexts_decoding_r2", "values_r2_shuffled", "contexts_r2_shuffled")
CEILINGS = ("x", "x_and_previous")
"""The linear read-outs of :func:`linear_readout_ceiling`: from x_t, and from [x_t, x_{t-1}]."""


def linear_readout_ceiling(xs: jax.Array, entropy: jax.Array) -> dict[str, jax.Array]:
    """The R^2 of the posterior entropy on the inputs themselves, pooled over sequences and positions.

    ``x``: the least-squares read-out (with intercept) of H_t from x_t; ``x_and_previous``: from
    [x_t, x_{t-1}] (zeros stand for x_{-1} at each sequence's first position). Since a head's values
    are v_t = x_t W_V, the R^2 of H on any linear function of the values is at most ``x``.

    Args:
      xs: (S, N, d_in) sequences.   entropy: (S, N) the posterior entropy at each position.
    Returns:
      ``{"x": R^2, "x_and_previous": R^2}``, scalars (:func:`gradattn.geometry.decoding_r2`).
    """
    if np.ndim(xs) != 3 or np.shape(entropy) != np.shape(xs)[:2]:
        raise ValueError(f"linear_readout_ceiling: xs must be (S, N, d_in) and entropy (S, N), got shapes "
                         f"{tuple(np.shape(xs))} and {tuple(np.shape(entropy))}")
    xs = jnp.asarray(xs)
    previous = jnp.concatenate([jnp.zeros_like(xs[:, :1]), xs[:, :-1]], axis=1)
    h = jnp.reshape(entropy, -1)
    return {"x": decoding_r2(xs.reshape(-1, xs.shape[-1]), h),
            "x_and_previous": decoding_r2(jnp.concatenate([xs, previous], -1).reshape(-1, 2 * xs.shape[-1]), h)}


@dataclasses.dataclass(frozen=True)
class ManifoldConfig(ExperimentConfig):
    """One manifold study: both arms trained on fresh sequences, measured on held-out ones.

    Attributes:
      steps: updates per arm, each on a fresh sequence of ``task``.
      task: the data (the sticky chain at T = 500 by default; its ``noise_std`` sets how uncertain
        the posterior is).
      heldout: held-out sequences whose positions are pooled for the geometry.
      n_components: leading principal components the entropy is regressed on.
      head, rates, grad_source: as in :class:`~gradattn.experiments.EmVsSgdConfig` (the paper's values).
    """

    steps: int = option(3000, help="updates per arm, each on a fresh sequence", minimum=1, maximum=10_000_000)
    task: Task = dataclasses.field(default_factory=lambda: StickyMarkov(seq_len=500))
    heldout: int = option(4, help="held-out sequences pooled for the geometry", minimum=1, maximum=4096)
    n_components: int = option(3, help="leading principal components the entropy is regressed on", minimum=1,
                               maximum=4096)
    head: HeadSpec = nested(HeadSpec)
    rates: ArmRates = nested(ArmRates)
    grad_source: str = option("auto", help="gradient path", choices=GRAD_SOURCE_NAMES)

    def __post_init__(self):
        fn = "ManifoldConfig"
        super().__post_init__()
        resolve_grad_source(self.grad_source)
        if self.n_components > self.head.d_v:
            raise ValueError(f"{fn}: n_components={self.n_components} exceeds d_v={self.head.d_v} (the values' dimension)")
        if not callable(getattr(self.task, "bayes_filter_entropy", None)):
            raise TypeError(f"{fn}: task {type(self.task).__name__} has no bayes_filter_entropy(x)")



def make_manifold_run(config: ManifoldConfig):
    """``run(key) -> dict`` of one seed (pure, jit/vmap-able): for each head (``init``, ``sgd``,
    ``em``) on the pooled held-out positions, ``{head}_{measure}`` for the measures
    :data:`MEASURES`, ``{head}_heldout_loss``; ``{arm}_curve`` (steps,) training losses;
    ``heldout_bayes_loss``; ``entropy_mean`` and ``uncertain_fraction`` (posterior entropy > 0.1
    nats) of the held-out positions; ``ceiling_{name}`` for the read-outs :data:`CEILINGS` of
    :func:`linear_readout_ceiling` on the same positions."""
    ManifoldConfig.require(config, "make_manifold_run")
    task = config.task
    arms = config.rates.optimizers()
    m = config.n_components

    def run(key):
        data_key, init_key, test_key, shuffle_key = jax.random.split(key, 4)
        params = config.head.init(init_key, task)
        final, curves, _ = train_arms(  # both arms on the same fresh sequence at every step
            params, arms, lambda t: task.sample(jax.random.fold_in(data_key, t), jnp.float32), config.steps,
            grad_source=config.grad_source)

        xs, ys = jax.vmap(lambda k: task.sample(k, jnp.float32))(jax.random.split(test_key, config.heldout))
        entropy = jax.vmap(task.bayes_filter_entropy)(xs).reshape(-1)
        shuffled = jax.random.permutation(shuffle_key, entropy)
        out = {f"{name}_curve": curves[name] for name in arms}
        out["heldout_bayes_loss"] = jnp.mean(jax.vmap(lambda x, y: task.bayes_loss(x, y).mean)(xs, ys))
        out["entropy_mean"] = jnp.mean(entropy)
        out["uncertain_fraction"] = jnp.mean(entropy > 0.1)
        ceiling = linear_readout_ceiling(xs, entropy.reshape(xs.shape[:2]))
        out.update({f"ceiling_{name}": ceiling[name] for name in CEILINGS})
        for head, p in (("init", params), *((name, final[name].params) for name in arms)):
            o = jax.vmap(lambda x, p=p: forward(p, x, causal=True))(xs)
            values, contexts = o.v.reshape(-1, o.v.shape[-1]), o.context.reshape(-1, o.context.shape[-1])
            out[f"{head}_heldout_loss"] = jnp.mean(jax.vmap(token_losses)(o.logits, ys))
            out[f"{head}_values_r2"] = covariate_r2(values, entropy, m)
            out[f"{head}_contexts_r2"] = covariate_r2(contexts, entropy, m)
            out[f"{head}_contexts_decoding_r2"] = decoding_r2(contexts, entropy)
            out[f"{head}_values_r2_shuffled"] = covariate_r2(values, shuffled, m)
            out[f"{head}_contexts_r2_shuffled"] = covariate_r2(contexts, shuffled, m)
        return out

    return run


def summarise_manifold(per_seed: dict[str, np.ndarray], seeds: list[int], config: ManifoldConfig) -> dict[str, Any]:
    """JSON-ready: per head, each measure's mean and std over seeds (the sample std, ddof 1), and the paired
    differences trained - untrained and trained - shuffled with their paired t-test p;
    ``readout_ceiling``: the mean and std over seeds of :func:`linear_readout_ceiling`."""
    from scipy import stats

    out: dict[str, Any] = {
        "noise_std": getattr(config.task, "noise_std", None),
        "h_min": getattr(config.task, "h_min", None),
        "heldout_bayes_loss_mean": json_floats(np.mean(per_seed["heldout_bayes_loss"])),
        "entropy_mean": json_floats(np.mean(per_seed["entropy_mean"])),
        "uncertain_fraction_mean": json_floats(np.mean(per_seed["uncertain_fraction"])),
        "readout_ceiling": {name: {"mean": json_floats(np.mean(per_seed[f"ceiling_{name}"])),
                                   "std": json_floats(seed_std(per_seed[f"ceiling_{name}"]))} for name in CEILINGS},
    }
    for head in HEADS:
        res = {"heldout_loss_mean": json_floats(np.mean(per_seed[f"{head}_heldout_loss"])),
               "heldout_loss_std": json_floats(seed_std(per_seed[f"{head}_heldout_loss"]))}
        for measure in MEASURES:
            v = np.asarray(per_seed[f"{head}_{measure}"], np.float64)
            res[measure] = {"mean": json_floats(np.mean(v)), "std": json_floats(seed_std(v))}
        out[head] = res
    for arm in ARMS:
        cmp = {}
        for measure in ("values_r2", "contexts_r2", "contexts_decoding_r2"):
            trained = np.asarray(per_seed[f"{arm}_{measure}"], np.float64)
            for label, other in (("vs_init", per_seed[f"init_{measure}"]),
                                 ("vs_shuffled", per_seed.get(f"{arm}_{measure}_shuffled"))):
                if other is None:
                    continue
                d = trained - np.asarray(other, np.float64)
                p = stats.ttest_rel(trained, other).pvalue if len(seeds) > 1 and np.any(d != 0) else float("nan")
                cmp[f"{measure}_{label}"] = {"diff_mean": json_floats(np.mean(d)), "diff_std": json_floats(seed_std(d)),
                                            "p_value": json_floats(p)}
        out[arm]["compared"] = cmp
    out["curves"] = {f"{arm}_mean": json_floats(np.mean(per_seed[f"{arm}_curve"], axis=0)) for arm in ARMS}
    out["per_seed"] = {"seed": [int(s) for s in seeds],
                       **{f"{h}_{m}": json_floats(per_seed[f"{h}_{m}"]) for h in HEADS for m in MEASURES},
                       **{f"{h}_heldout_loss": json_floats(per_seed[f"{h}_heldout_loss"]) for h in HEADS},
                       **{f"ceiling_{name}": json_floats(per_seed[f"ceiling_{name}"]) for name in CEILINGS}}
    return out


def format_manifold(results: dict) -> str:
    """The command line's summary: R^2 per head against both controls and the linear-readout ceiling."""
    cfg = results["config"]
    m = cfg["n_components"]
    columns = (("values_r2", f"values PC1-{m}"), ("contexts_r2", f"contexts PC1-{m}"),
               ("contexts_decoding_r2", "contexts all"), ("values_r2_shuffled", f"values PC1-{m} shuf"),
               ("contexts_r2_shuffled", f"contexts PC1-{m} shuf"))
    lines = [f"manifold: {len(results['seeds'])} seeds, {results['steps']} steps on fresh sequences, "
             f"T = {cfg['task']['seq_len']}, noise {results['noise_std']}, {cfg['heldout']} held-out sequences; "
             f"posterior entropy {results['entropy_mean']:.3f} nats, {100 * results['uncertain_fraction_mean']:.1f}% "
             f"of positions above 0.1 nats; held-out Bayes loss {results['heldout_bayes_loss_mean']:.4f}",
             f"R^2 of the posterior entropy ({pm_phrase(results, len(results['seeds']))}) on: the {m} leading principal components of "
             f"the values or contexts (PC1-{m}); a linear read-out from all context dimensions (contexts all); "
             "the same PCs against the entropy shuffled over positions (shuf)",
             f"{'head':8s} {'held-out loss':>14s} " + " ".join(f"{label:>20s}" for _, label in columns)]
    for head in HEADS:
        r = results[head]
        cells = [fmt_pm(r[key]["mean"], r[key]["std"], '.3f') for key, _ in columns]
        lines.append(f"{head:8s} {r['heldout_loss_mean']:14.4f} " + " ".join(f"{c:>20s}" for c in cells))
    ceiling = results.get("readout_ceiling")
    if ceiling is not None:
        lines.append(f"linear-readout ceiling (R^2 of the entropy on the inputs; the values are linear in x_t, so no "
                     f"value R^2 can exceed the first): x_t {fmt_pm(ceiling['x']['mean'], ceiling['x']['std'], '.3f')}, "
                     f"[x_t, x_t-1] {fmt_pm(ceiling['x_and_previous']['mean'], ceiling['x_and_previous']['std'], '.3f')}")
    return "\n".join(lines)


manifold_study = Experiment(
    "manifold_study", ManifoldConfig, make_manifold_run, summarise_manifold, command="manifold", result="manifold",
    help="the manifold claim: posterior entropy vs the geometry of values and contexts, held out",
    format=format_manifold, curves=2)
"""The manifold study: ``manifold_study(seeds, config=None, **options)`` is
:func:`gradattn.experiments.run_experiment` of it (wall time, devices, provenance; resumable)."""
