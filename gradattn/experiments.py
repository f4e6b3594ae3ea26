"""The experiments over seeds: one skeleton, and the paper's EM-vs-SGD experiment on it.

An experiment is a pure function ``run(key) -> dict`` of one PRNG key (made from its config) and a
``summarise(per_seed, seeds, config) -> dict``; :func:`run_experiment` does the rest once for every
experiment: the seeds (an int n or distinct integers), the estimated memory of one call against
what a device holds (:mod:`gradattn.memory`), the sweep over them
(:func:`gradattn.sweep`; seeds per call from the backend unless given), the wall time, the device
count, the chunk size and the provenance of the run. The deep experiment
(:func:`gradattn.deep.deep_experiment`) is the other one on this skeleton.

``em_vs_sgd`` is the paper's Sec. 5.2 experiment (docs/theory.md): on the sticky Markov chain, plain
SGD (one learning rate on all four matrices) against the EM-like two-timescale schedule (a larger
rate on W_V), paired per seed (same sequence, same initial parameters), full batch, ``steps``
updates.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradattn import tasks as task_classes
from gradattn._checks import check_int
from gradattn._config import check_fields, option
from gradattn._io import finite_json
from gradattn._version import __version__
from gradattn.cluster import cluster_sweep
from gradattn.grads import GRAD_SOURCE_NAMES, resolve_grad_source
from gradattn.head import forward, init_head, token_losses
from gradattn.memory import check_memory
from gradattn.provenance import finish, provenance
from gradattn.sweeps import check_devices, default_chunk_size, experiment_seeds, sweep
from gradattn.tasks import StickyMarkov, Task
from gradattn.training import em_like, sgd, train

# ---------------------------------------------------------------------------------------------
# The skeleton
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment over seeds: its ``name``, the ``config_type`` it takes, ``make_run(config)``
    giving the pure ``run(key) -> dict`` of one seed, and ``summarise(per_seed, seeds, config)``
    giving the JSON-ready summary of the stacked per-seed results.

    ``memory(config, chunk_size)``, optional: the estimated bytes one device needs for one call of
    ``chunk_size`` seeds, which :func:`run_experiment` checks before compiling
    (:func:`gradattn.memory.check_memory`). Without it the library's own estimate of the config
    type is used (:mod:`gradattn.memory`: every experiment of the library), or none."""

    name: str
    config_type: type
    make_run: Callable[[Any], Callable[[jax.Array], dict]]
    summarise: Callable[[dict, list, Any], dict]
    memory: Callable[[Any, int], int] | None = None


RESULT_FORMAT = 2
"""The version of the result dicts (and their JSON) that :func:`run_experiment` returns, in their
``format`` field. 2: every standard deviation over seeds is the sample standard deviation (ddof 1;
null for one seed), ``config`` rebuilds the run's config (:func:`config_from_dict`), and the per-seed
training curves are kept on request (``per_seed_curves``). Results without the field (format 1) give
the population standard deviation (ddof 0)."""


def seed_std(values, axis: int = 0) -> np.ndarray:
    """The sample standard deviation (ddof 1) over seeds along ``axis``; NaN (JSON null through
    :func:`json_floats`) where there are fewer than two seeds."""
    a = np.asarray(values, np.float64)
    if a.shape[axis] < 2:
        return np.full(np.delete(a.shape, axis), np.nan)
    return np.std(a, axis=axis, ddof=1)


def is_curve(name: str) -> bool:
    """Whether the per-seed output ``name`` is a training curve (one value per step)."""
    return name == "curve" or name.endswith("_curve")


def run_experiment(experiment: Experiment, seeds, config=None, *, chunk_size: int | None = None, devices=None,
                   progress: bool = False, checkpoint_dir: str | os.PathLike | None = None,
                   per_seed_curves: bool = False) -> dict[str, Any]:
    """``experiment`` over ``seeds`` (a positive int n: seeds 0..n-1; or distinct integer seeds in
    [0, 2^64)), with ``config`` (default: the config type's defaults).

    ``chunk_size`` seeds are vmapped per device per call (default: the backend's,
    :func:`gradattn.sweeps.default_chunk_size`; a seed's result is bit-reproducible for a given
    chunk size). With ``devices`` (a list of this process's devices) the seeds are sharded over
    those, by :func:`gradattn.sweeps.sweep`. By default (``devices=None``) they run through
    :func:`gradattn.cluster.cluster_sweep`: over the local devices of every process of a
    multi-process run (:func:`gradattn.cluster.initialize`; every process gets the whole result),
    or, in a plain process, over all its devices with the same results as ``sweep``.

    ``checkpoint_dir`` (only with ``devices=None``): keep every finished chunk there and, on a
    rerun, compute only the seeds not yet there (:mod:`gradattn.resume`); the results equal an
    uninterrupted run's bit for bit. The directory is tied to the experiment, ``config.to_dict()``
    (required then) and the library version (and the chunk size, jax version, backend): another
    configuration's directory is refused with :class:`gradattn.resume.SweepRefused`.

    Before anything is traced, the estimated memory of one call (``chunk_size`` seeds per device,
    however few seeds are left) is checked against what a device holds
    (:func:`gradattn.memory.check_memory`): a run that cannot fit raises
    :class:`gradattn.memory.MemoryEstimateError` (a ValueError) with one line naming the sizes and
    the estimate, instead of failing in the compiler or the allocator.

    ``per_seed_curves``: keep every seed's training curves (the per-seed outputs named ``curve``
    or ``*_curve``) under ``per_seed_curves`` (float32 values as JSON numbers: about 20 bytes a
    step per curve), beside the summary's mean and standard deviation over seeds.

    Returns the experiment's summary plus ``format`` (:data:`RESULT_FORMAT`), ``wall_time_s`` (the
    sweep), ``n_devices`` (over all processes), ``n_processes``, ``chunk_size`` and ``provenance``
    (:func:`gradattn.provenance.provenance`, finished at the end).
    """
    fn = experiment.name
    config = experiment.config_type() if config is None else config
    if not isinstance(config, experiment.config_type):
        raise TypeError(f"{fn}: config must be a {experiment.config_type.__name__}, got {type(config).__name__}")
    seeds = experiment_seeds(seeds, fn)
    chunk_size = default_chunk_size() if chunk_size is None else check_int("chunk_size", chunk_size, fn)
    if devices is not None:
        if checkpoint_dir is not None:
            raise ValueError(f"{fn}: checkpoint_dir runs the seeds over every process's local devices; give it without devices")
        if jax.process_count() > 1:
            raise ValueError(
                f"{fn}: devices picks devices of one process; in a run of {jax.process_count()} processes leave it None "
                "(the seeds then run over every process's local devices)"
            )
        devices = check_devices(devices, fn)
    to_dict = getattr(config, "to_dict", None)
    if checkpoint_dir is not None and not callable(to_dict):
        raise TypeError(f"{fn}: a checkpoint_dir needs a config with a to_dict() method (a JSON-able description of "
                        f"everything the run depends on); {type(config).__name__} has none")
    # What the checkpoint directory is tied to, and what every process of a run must agree on.
    fingerprint = {"experiment": fn, "config": to_dict() if callable(to_dict) else repr(config), "version": __version__}
    # One call's estimated memory against what a device holds, before anything is traced.
    check_memory(experiment, config, chunk_size, n_seeds=len(seeds),
                 devices=jax.local_devices() if devices is None else devices)
    run = experiment.make_run(config)
    prov = provenance()
    t0 = time.perf_counter()
    if devices is None:
        per_seed = cluster_sweep(run, seeds, chunk_size=chunk_size,
                                 checkpoint_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir),
                                 fingerprint=fingerprint, progress=progress)
        n_devices = jax.device_count()
    else:
        per_seed = sweep(run, seeds, chunk_size=chunk_size, devices=devices, progress=progress)
        n_devices = len(devices)
    wall = time.perf_counter() - t0
    summary = {"format": RESULT_FORMAT, **experiment.summarise(per_seed, seeds, config)}
    if per_seed_curves:
        summary["per_seed_curves"] = {name: json_floats(v) for name, v in per_seed.items() if is_curve(name)}
    summary.update(wall_time_s=wall, n_devices=n_devices, n_processes=jax.process_count(), chunk_size=chunk_size,
                   provenance=finish(prov))
    return summary


def check_config(config, fn: str) -> None:
    """An experiment config's ``__post_init__``: every field against the bounds it declares
    (normalised in place), and its ``task`` a :class:`~gradattn.tasks.Task` whose own fields hold
    theirs (the command line's bounds)."""
    check_fields(config, fn)
    if not isinstance(config.task, Task):
        raise TypeError(
            f"{fn}: task must provide sample(key, dtype), bayes_loss(x, y) and its size fields "
            f"(a gradattn.tasks.Task such as StickyMarkov), got {type(config.task).__name__}"
        )
    check_fields(config.task, fn, store=False)


def config_dict(config) -> dict:
    """A config as JSON: its fields, the task by its ``to_dict`` (with its class name), the dtype."""
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d["task"] = {"name": type(config.task).__name__, **config.task.to_dict()}
    d["dtype"] = "float32"
    return d


def config_from_dict(config_type: type, d: dict):
    """The ``config_type`` instance that :func:`config_dict` described as ``d`` (e.g. the ``config``
    of a result JSON): its fields, and the task rebuilt by its class's ``from_dict``."""
    if not isinstance(d, dict) or not isinstance(d.get("task"), dict):
        raise ValueError(f"config_from_dict: not a {config_type.__name__} description (no task): {d!r}")
    d = dict(d)
    d.pop("dtype", None)
    task_d = d.pop("task")
    task_type = getattr(task_classes, str(task_d.get("name")), None)
    from_dict = getattr(task_type, "from_dict", None) if isinstance(task_type, type) else None
    if not callable(from_dict):
        raise ValueError(f"config_from_dict: unknown task {task_d.get('name')!r} in the {config_type.__name__} description")
    names = {f.name for f in dataclasses.fields(config_type) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"config_from_dict: {config_type.__name__} has no field(s) {', '.join(unknown)}")
    return config_type(task=from_dict(task_d), **d)


def logit_metrics(logits, y) -> dict:
    """Loss (nats), mean predictive entropy (nats) and argmax accuracy of ``logits (N, C)`` on ``y``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return {
        "loss": jnp.mean(token_losses(logits, y)),
        "entropy": jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1)),
        "accuracy": jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(logits.dtype)),
    }


def json_floats(a):
    """``a`` as a Python float, or nested lists of them, with non-finite values as None (valid JSON)."""
    return finite_json(np.asarray(a, np.float64).tolist())


# ---------------------------------------------------------------------------------------------
# EM-like vs SGD
# ---------------------------------------------------------------------------------------------


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
      grad_source: how gradients are computed (:func:`gradattn.grads.resolve_grad_source`):
        "auto" (the path measured fastest on the backend), "blocked", "dense", "autodiff", "pallas".

    The bounds of every field are declared with it (:func:`gradattn._config.option`); the command
    line takes the same.
    """

    steps: int = option(1000, help="full-batch updates per arm", minimum=1, maximum=10_000_000)
    task: Task = dataclasses.field(default_factory=StickyMarkov)
    sgd_lr: float = option(0.01, help="SGD's learning rate on all four matrices", minimum=0.0)
    value_lr: float = option(0.1, help="EM-like learning rate on W_V", minimum=0.0)
    routing_lr: float = option(0.01, help="EM-like learning rate on W_Q, W_K, W_O", minimum=0.0)
    d_k: int = option(10, help="query/key size", minimum=1, maximum=4096)
    d_v: int = option(15, help="value size", minimum=1, maximum=4096)
    init_scale: float = option(0.1, help="std of the N(0, s^2) initial weights (> 0)", minimum=0.0,
                               exclusive_minimum=True)
    grad_source: str = option("auto", help="gradient path", choices=GRAD_SOURCE_NAMES)

    def __post_init__(self):
        # Sizes of any integral type are stored as Python ints and rates as Python floats: a config
        # built from numpy scalars equals (and shares make_em_vs_sgd's cache entry with) the one
        # built from Python numbers, and to_dict is JSON.
        fn = "EmVsSgdConfig"
        if not isinstance(self.grad_source, str):
            raise TypeError(f"{fn}: grad_source must be the name of a gradient path, got {self.grad_source!r}")
        resolve_grad_source(self.grad_source)  # raises ValueError naming the known paths
        check_config(self, fn)

    def to_dict(self) -> dict:
        return config_dict(self)


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
        "experiment": "em_vs_sgd",
        "h_min": getattr(config.task, "h_min", None),
        "steps": steps,
        "seeds": [int(s) for s in seeds],
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
        "config": config.to_dict(),
    }


EM_VS_SGD = Experiment("em_vs_sgd", EmVsSgdConfig, make_em_vs_sgd, summarise_em_vs_sgd)


def em_vs_sgd(seeds, config: EmVsSgdConfig | None = None, *, chunk_size: int | None = None, devices=None,
              progress: bool = False, checkpoint_dir: str | os.PathLike | None = None,
              per_seed_curves: bool = False) -> dict[str, Any]:
    """The paper's EM-vs-SGD experiment over ``seeds`` (an int n means seeds 0..n-1).

    :func:`run_experiment` of :func:`make_em_vs_sgd` and :func:`summarise_em_vs_sgd`: the summary
    plus ``wall_time_s``, ``n_devices``, ``n_processes``, ``chunk_size`` and ``provenance``.
    ``config`` defaults to the paper's (:class:`EmVsSgdConfig`); ``chunk_size``, ``devices``,
    ``progress``, ``checkpoint_dir`` (resume a stopped sweep) and ``per_seed_curves`` as there.
    """
    return run_experiment(EM_VS_SGD, seeds, config, chunk_size=chunk_size, devices=devices, progress=progress,
                          checkpoint_dir=checkpoint_dir, per_seed_curves=per_seed_curves)
