"""The paper's experiments, each a pure function of a PRNG key (run over seeds by :mod:`gradattn.sweeps`).

``em_vs_sgd`` is the paper's Sec. 5.2 experiment (docs/theory.md): on the sticky Markov chain, plain SGD (one learning rate
on all four matrices) against the EM-like two-timescale schedule (a larger rate on W_V), paired per
seed (same sequence, same initial parameters), full batch, ``steps`` updates.

``laws_check_errors`` compares each first-order law with autodiff on a random instance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradattn import laws
from gradattn._checks import check_float32, check_int, check_number
from gradattn.blocked import blocked_loss_and_grads
from gradattn.head import causal_mask, dense_loss, forward, init_head, normalised_weights, token_losses
from gradattn.sweeps import seed_ints, sweep
from gradattn.tasks import StickyMarkov, Task
from gradattn.training import em_like, resolve_grad_source, sgd, train


@dataclasses.dataclass(frozen=True)
class EmVsSgdConfig:
    """Everything that defines one EM-vs-SGD run; its defaults are the paper's.

    This is the one place the experiment's defaults live: :func:`em_vs_sgd` takes a config, and the
    command line exposes every field as a flag.

    Attributes:
      steps: full-batch updates per arm.
      task: the data (the paper's sticky Markov chain by default).
      sgd_lr: SGD's learning rate on all four matrices.
      value_lr, routing_lr: EM-like rates on W_V and on W_Q, W_K, W_O.
      d_k, d_v: head sizes; d_in and C come from the task.
      init_scale: every parameter is N(0, init_scale^2); must be > 0 (at 0 every score is 0 and
        the gradients of W_Q and W_K vanish for good).
      grad_source: how gradients are computed (:func:`gradattn.training.resolve_grad_source`):
        "auto" (the path measured fastest on the backend), "blocked", "dense", "autodiff", ...
    """

    steps: int = 1000
    task: StickyMarkov = dataclasses.field(default_factory=StickyMarkov)
    sgd_lr: float = 0.01
    value_lr: float = 0.1
    routing_lr: float = 0.01
    d_k: int = 10
    d_v: int = 15
    init_scale: float = 0.1
    grad_source: str = "auto"

    def __post_init__(self):
        # Sizes of any integral type are stored as Python ints and rates as Python numbers: a config
        # built from numpy scalars equals (and shares make_em_vs_sgd's cache entry with) the one
        # built from Python numbers, and to_dict is JSON.
        fn = "EmVsSgdConfig"
        for name in ("steps", "d_k", "d_v"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), fn))
        for name in ("sgd_lr", "value_lr", "routing_lr"):
            val = getattr(self, name)
            num = check_number(name, val, fn, minimum=0)
            object.__setattr__(self, name, int(val) if isinstance(val, (int, np.integer)) else num)
        object.__setattr__(self, "init_scale", check_number("init_scale", self.init_scale, fn, minimum=0, exclusive_minimum=True))
        check_float32(fn, {name: getattr(self, name) for name in ("sgd_lr", "value_lr", "routing_lr", "init_scale")})
        if not isinstance(self.task, Task):
            raise TypeError(
                f"{fn}: task must provide sample(key, dtype), bayes_predictive(x) and its size fields "
                f"(a gradattn.tasks.Task such as StickyMarkov), got {type(self.task).__name__}"
            )
        if not isinstance(self.grad_source, str):
            raise TypeError(f"{fn}: grad_source must be the name of a gradient path, got {self.grad_source!r}")
        resolve_grad_source(self.grad_source)  # raises ValueError naming the known paths

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["task"] = {"name": type(self.task).__name__, **self.task.to_dict()}
        d["dtype"] = "float32"
        return d


def end_metrics(params, x, y) -> dict:
    """Loss (nats), mean predictive entropy (nats) and argmax accuracy of the head on ``(x, y)``."""
    logits = forward(params, x, causal=True).logits
    logp = jax.nn.log_softmax(logits, axis=-1)
    return {
        "loss": jnp.mean(token_losses(logits, y)),
        "entropy": jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1)),
        "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(logits.dtype)),
    }


def make_em_vs_sgd(config: EmVsSgdConfig):
    """The per-seed experiment as a pure function ``run(key) -> dict`` (jit/vmap-able).

    ``key`` splits into a data key (one sequence of the task, float32) and an init key (one head,
    every entry N(0, init_scale^2)); both arms start from these same parameters on this same
    sequence. Returns, per arm (``sgd`` and ``em``): ``{arm}_curve`` (steps,), the loss before each
    update, and ``{arm}_final_loss``, ``{arm}_final_entropy``, ``{arm}_final_accuracy``, measured on
    the training sequence after the last update.

    Cached per config (configs are frozen and hashable), so repeated sweeps of one config reuse
    one compiled program. The config is validated again (rebuilt with ``dataclasses.replace``)
    before the cache is consulted, so a config altered after construction raises here and never
    leaves a cached closure that would fail inside the sweep.
    """
    if not isinstance(config, EmVsSgdConfig):
        raise TypeError(f"make_em_vs_sgd: config must be an EmVsSgdConfig, got {type(config).__name__}")
    return _make_em_vs_sgd(dataclasses.replace(config))


@functools.lru_cache(maxsize=16)
def _make_em_vs_sgd(config: EmVsSgdConfig):
    """:func:`make_em_vs_sgd` for a validated config (the cached part)."""
    task = config.task
    arms = {"sgd": sgd(config.sgd_lr), "em": em_like(config.value_lr, config.routing_lr)}

    def run(key: jax.Array) -> dict[str, jax.Array]:
        data_key, init_key = jax.random.split(key)
        x, y = task.sample(data_key, jnp.float32)
        params = init_head(init_key, task.d_in, config.d_k, config.d_v, task.n_classes, config.init_scale, jnp.float32)
        out = {}
        for name, optimizer in arms.items():
            final, history = train(params, x, y, optimizer, config.steps, grad_source=config.grad_source)
            out[f"{name}_curve"] = history["loss"]
            for metric, value in end_metrics(final.params, x, y).items():
                out[f"{name}_final_{metric}"] = value
        return out

    return run


# The cache stays inspectable and clearable under the public name, as when it was the decorated function.
make_em_vs_sgd.cache_info = _make_em_vs_sgd.cache_info
make_em_vs_sgd.cache_clear = _make_em_vs_sgd.cache_clear


def steps_to_threshold(curves: np.ndarray, threshold: float) -> np.ndarray:
    """Per row of ``curves`` (n, steps): the first step whose loss is below ``threshold`` (steps if never)."""
    curves = np.asarray(curves)
    below = curves < threshold
    return np.where(below.any(axis=1), below.argmax(axis=1), curves.shape[1])


def _finite_or_none(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def summarise_em_vs_sgd(per_seed: dict[str, np.ndarray], seeds: list[int], config: EmVsSgdConfig) -> dict[str, Any]:
    """The JSON-ready summary of a sweep of :func:`make_em_vs_sgd` (the paper's protocol).

    threshold = mean over seeds of SGD's final loss; for each seed, the first step at which the
    EM-like loss curve falls below it (``steps`` if never); speed-up = steps / mean of those. If
    any seed's final loss is not finite, the threshold, the steps to it and the speed-up are
    ``None`` (JSON null) and a RuntimeWarning names the seeds.
    ``p_value`` is scipy's paired t-test of the final losses (``None`` when undefined, e.g. 1 seed).
    Standard deviations are over seeds, with ``ddof=0``.
    """
    from scipy import stats

    steps = config.steps
    arm = {}
    for name in ("sgd", "em"):
        arm[name] = {
            "final_loss_mean": float(np.mean(per_seed[f"{name}_final_loss"])),
            "final_loss_std": float(np.std(per_seed[f"{name}_final_loss"])),
            "final_entropy_mean": float(np.mean(per_seed[f"{name}_final_entropy"])),
            "final_accuracy_mean": float(np.mean(per_seed[f"{name}_final_accuracy"])),
        }
    finals = np.concatenate([np.asarray(per_seed["sgd_final_loss"]), np.asarray(per_seed["em_final_loss"])])
    if np.isfinite(finals).all():
        threshold = arm["sgd"]["final_loss_mean"]
        to_thr = steps_to_threshold(per_seed["em_curve"], threshold)
        mean_steps = float(np.mean(to_thr))
        speedup = steps / mean_steps if mean_steps > 0 else None
        to_thr_summary = {"mean": mean_steps, "std": float(np.std(to_thr))}
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
        curves[f"{name}_std"] = c.std(axis=0).tolist()
    return {
        "experiment": "em_vs_sgd",
        "h_min": getattr(config.task, "h_min", None),
        "steps": steps,
        "seeds": [int(s) for s in seeds],
        "sgd": arm["sgd"],
        "em": arm["em"],
        "threshold": threshold,
        "em_steps_to_sgd_final": to_thr_summary,
        "speedup": speedup,
        "p_value": _finite_or_none(p),
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
        "config": config.to_dict(),
    }


def default_chunk_size(backend: str | None = None) -> int:
    """Seeds vmapped per device per call by :func:`em_vs_sgd` when ``chunk_size`` is not given.

    On a CPU one sequence of the paper's size already keeps every core busy and more seeds per call
    only multiply the working set, so seeds run one per call (1). On an accelerator a call should
    hold many seeds (:data:`ACCELERATOR_CHUNK`), so that a whole sweep runs in a few wide calls.
    """
    backend = jax.default_backend() if backend is None else backend
    return 1 if backend == "cpu" else ACCELERATOR_CHUNK


ACCELERATOR_CHUNK = 256
"""Seeds per call on GPU/TPU: 1000 seeds run as four calls (the last padded)."""


def em_vs_sgd(
    seeds,
    config: EmVsSgdConfig | None = None,
    *,
    chunk_size: int | None = None,
    devices=None,
    progress: bool = False,
) -> dict[str, Any]:
    """The paper's EM-vs-SGD experiment over ``seeds`` (an int n means seeds 0..n-1).

    Args:
      seeds: a positive int n (seeds 0..n-1) or distinct integer seeds in [0, 2^64).
      config: the experiment (:class:`EmVsSgdConfig`; default: the paper's).
      chunk_size: seeds vmapped per device per call (see :func:`gradattn.sweeps.sweep`; a seed's
        result is bit-reproducible for a given ``chunk_size``); default
        :func:`default_chunk_size` of the backend.
      devices: devices to shard each call over (default: all visible).
      progress: a progress bar over the calls.
    Returns:
      the summary of :func:`summarise_em_vs_sgd` plus ``wall_time_s``, ``n_devices`` and
      ``chunk_size``.
    """
    config = EmVsSgdConfig() if config is None else config
    if not isinstance(config, EmVsSgdConfig):
        raise TypeError(f"em_vs_sgd: config must be an EmVsSgdConfig, got {type(config).__name__}")
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, (bool, np.bool_)):
        seeds = list(range(check_int("seeds", seeds, "em_vs_sgd")))
    seeds = seed_ints(seeds, "em_vs_sgd")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"em_vs_sgd: seeds must be distinct, got {seeds}")
    chunk_size = default_chunk_size() if chunk_size is None else check_int("chunk_size", chunk_size, "em_vs_sgd")
    t0 = time.perf_counter()
    per_seed = sweep(make_em_vs_sgd(config), seeds, chunk_size=chunk_size, devices=devices, progress=progress)
    wall = time.perf_counter() - t0
    summary = summarise_em_vs_sgd(per_seed, seeds, config)
    summary["wall_time_s"] = wall
    summary["n_devices"] = len(jax.devices()) if devices is None else len(list(devices))
    summary["chunk_size"] = chunk_size
    return summary


def format_em_vs_sgd(results: dict) -> str:
    """A short text table of an EM-vs-SGD result (the dict of :func:`em_vs_sgd`)."""
    h_min = results.get("h_min")
    lines = [
        f"EM-like vs SGD: {len(results['seeds'])} seeds, {results['steps']} steps"
        + ("" if h_min is None else f", H_min = {h_min:.4f} nats"),
        f"{'arm':<8} {'final loss':>16} {'entropy':>9} {'accuracy':>9}",
    ]
    for arm, label in (("sgd", "SGD"), ("em", "EM-like")):
        r = results[arm]
        lines.append(
            f"{label:<8} {r['final_loss_mean']:>8.4f} ± {r['final_loss_std']:<5.3f} "
            f"{r['final_entropy_mean']:>9.4f} {r['final_accuracy_mean']:>9.4f}"
        )
    s = results["em_steps_to_sgd_final"]
    speed, p = results["speedup"], results["p_value"]
    if s["mean"] is None:
        lines.append("EM-like vs SGD's mean final loss: n/a (a seed diverged; see the per-seed losses)")
    else:
        lines.append(
            f"EM-like reaches SGD's mean final loss in {s['mean']:.0f} ± {s['std']:.0f} steps: "
            f"speed-up {'n/a' if speed is None else f'{speed:.2f}x'}; "
            f"paired t-test p = {'n/a' if p is None else f'{p:.2g}'}"
        )
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s on {results.get('n_devices', 1)} device(s)")
    return "\n".join(lines)


def _law_pairs(key, *, n, d_in, d_k, d_v, n_classes, causal):
    """``{law name: (law value, autodiff value)}`` on a random float64 instance (call under x64)."""
    f64 = jnp.float64
    k_p, k_x, k_y, k_w = jax.random.split(key, 4)
    params = init_head(k_p, d_in, d_k, d_v, n_classes, scale=0.7, dtype=f64)
    x = jax.random.normal(k_x, (n, d_in), f64)
    y = jax.random.randint(k_y, (n,), 0, n_classes)
    w = jax.random.uniform(k_w, (n,), f64, 0.1, 1.0)
    wn = normalised_weights(w, n, f64)
    out = forward(params, x, causal)
    mask = causal_mask(n) if causal else jnp.ones((n, n), bool)
    sqrt_dk = jnp.sqrt(jnp.asarray(d_k, f64))

    def from_logits(z):
        return jnp.sum(wn * token_losses(z, y))

    def from_alpha(a, v):
        return from_logits((a @ v) @ params.w_o)

    def from_scores(s):
        return from_alpha(jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1), out.v)

    def from_qk(q, k):
        return from_scores(q @ k.T / sqrt_dk)

    e = laws.output_error(out, y, w)
    u = laws.upstream_grad(params, out, y, w)
    b = laws.compatibility(u, out.v)
    ds = laws.routing_grad(out.alpha, b)
    law = {
        "output_error e = dL/dz": (e, jax.grad(from_logits)(out.logits)),
        "upstream u = dL/dg": (u, jax.grad(lambda g: from_logits(g @ params.w_o))(out.context)),
        "compatibility b = dL/dalpha": (jnp.where(mask, b, 0), jnp.where(mask, jax.grad(from_alpha)(out.alpha, out.v), 0)),
        "routing dL/ds": (ds, jnp.where(mask, jax.grad(from_scores)(out.scores), 0)),
        "value dL/dv": (laws.value_grad(out.alpha, u), jax.grad(from_alpha, argnums=1)(out.alpha, out.v)),
        "query dL/dq": (laws.query_grad(ds, out.k), jax.grad(from_qk, argnums=0)(out.q, out.k)),
        "key dL/dk": (laws.key_grad(ds, out.q), jax.grad(from_qk, argnums=1)(out.q, out.k)),
    }
    auto = jax.grad(dense_loss)(params, x, y, w, causal)
    _, analytic = blocked_loss_and_grads(params, x, y, w, causal)
    for name in ("w_q", "w_k", "w_v", "w_o"):
        law[f"dL/d{name.upper()}"] = (getattr(analytic, name), getattr(auto, name))
    return law


def laws_check_errors(key=None, n: int = 37, d_in: int = 6, d_k: int = 4, d_v: int = 5, n_classes: int = 3, causal: bool = True):
    """Worst relative error of each first-order law against autodiff, in float64, on a random instance.

    For each law, ``max |law - autodiff| / max |autodiff|``, where autodiff differentiates the loss
    with respect to that intermediate (logits, contexts, alpha, scores, V, Q, K) or, for the weight
    gradients, ``jax.grad(gradattn.head.dense_loss)``. Random position weights are used.
    Returns ``{law name: relative error}`` (Python floats).
    """
    key = jax.random.key(0) if key is None else key
    with jax.enable_x64(True):
        pairs = jax.jit(functools.partial(_law_pairs, n=n, d_in=d_in, d_k=d_k, d_v=d_v, n_classes=n_classes, causal=causal))(key)
        f64 = jnp.float64
        return {
            name: float(jnp.max(jnp.abs(a - r)) / jnp.maximum(jnp.max(jnp.abs(r)), jnp.finfo(f64).tiny))
            for name, (a, r) in pairs.items()
        }
