"""The skeleton every experiment stands on: the :class:`Experiment` record, :func:`run_experiment`,
the specs configs share, and the helpers of their summaries.

An experiment is a pure function ``run(key) -> dict`` of one PRNG key (made from its config) and a
``summarise(per_seed, seeds, config) -> dict``; :func:`run_experiment` does the rest once for every
experiment: the config's type, the seeds (an int n or distinct integers), the estimated memory of
one call against what a device holds (:mod:`gradattn.memory`), the one cache of runs, the sweep
over the seeds (:func:`gradattn.sweep`; seeds per call from the backend unless given), the fields
every summary has, the wall time, the device count, the chunk size and the provenance of the run.

Configs share two specs, each a nested field whose options stay flat on the command line and in
JSON (:func:`gradattn._config.nested`): :class:`HeadSpec`, the single head's sizes and its
initialisation, and :class:`ArmRates`, the rates of the paper's two arms (plain SGD and the
EM-like schedule).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradattn import tasks as task_classes
from gradattn._checks import MAX_HEAD_SIZE, check_int
from gradattn._config import check_fields, flat_fields, flat_get, nest, option
from gradattn._io import check_directory, finite_json
from gradattn._version import __version__
from gradattn.cluster import cluster_sweep
from gradattn.head import HeadParams, init_head, token_losses
from gradattn.memory import check_memory
from gradattn.provenance import finish, provenance
from gradattn.sweeps import check_devices, default_chunk_size, experiment_seeds, sweep
from gradattn.tasks import check_task
from gradattn.training import em_like, sgd

# ---------------------------------------------------------------------------------------------
# The skeleton
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
    """An experiment over seeds: everything the library, the command line and a rerun need of it.

    Attributes:
      name: the name it goes by in messages and as a function (``em_vs_sgd``, ``plateau_study``).
      config_type: the frozen dataclass of its configuration (its defaults are the experiment's).
      make_run: ``make_run(config)``, the pure ``run(key) -> dict`` of one seed (jit/vmap-able).
      summarise: ``summarise(per_seed, seeds, config)``, the JSON-ready summary of the stacked
        per-seed results (without the fields :func:`run_experiment` adds to every summary).
      command: its command on the command line (``gradattn <command>``); None: none.
      result: the ``experiment`` field of its results (default: ``name``).
      help: one line on what it measures (the command's help).
      format: ``format(results) -> str``, the command line's text report (default: none).
      plot: ``plot(results, path)``, its figure (default: none).
      curves: per-seed training curves of ``steps`` values each (bounds what a result may hold).
      save: ``save(per_seed, seeds, config, directory)``, optional: writes what a run keeps beyond its
        summary (trained parameters, say) under ``directory`` (:func:`run_experiment`'s ``save_dir``).
      presets: named configurations (``name -> config``, a function of nothing), e.g. ``"small"``
        and ``"paper"``; the command line's ``--preset`` starts from one, its flags override it.
      memory: ``memory(config, chunk_size)``, optional: the estimated bytes one device needs for
        one call of ``chunk_size`` seeds, which :func:`run_experiment` checks before compiling
        (:func:`gradattn.memory.check_memory`). Without it the library's own estimate of the config
        type is used (:mod:`gradattn.memory`: every experiment of the library), or none.

    Records compare by identity (two records are two experiments), so each is one key of the one
    cache of compiled runs.
    """

    name: str
    config_type: type
    make_run: Callable[[Any], Callable[[jax.Array], dict]]
    summarise: Callable[[dict, list, Any], dict]
    command: str | None = None
    result: str | None = None
    help: str = ""
    format: Callable[[dict], str] | None = None
    plot: Callable[..., Any] | None = None
    curves: int = 1
    presets: dict[str, Callable[[], Any]] = dataclasses.field(default_factory=dict)
    save: Callable[[dict, list, Any, str], None] | None = None
    memory: Callable[[Any, int], int] | None = None

    @property
    def tag(self) -> str:
        """The ``experiment`` field of its results."""
        return self.result or self.name

    def __call__(self, seeds, config=None, **options) -> dict[str, Any]:
        """:func:`run_experiment` of this experiment (``options`` as there)."""
        return run_experiment(self, seeds, config, **options)


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
                   per_seed_curves: bool = False, save_dir: str | os.PathLike | None = None) -> dict[str, Any]:
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

    ``save_dir``: for an experiment with a ``save`` (the wind tunnels: trained parameters), where
    it writes what it keeps; the summary names it under ``saved_to``.

    ``per_seed_curves``: keep every seed's training curves (the per-seed outputs named ``curve``
    or ``*_curve``) under ``per_seed_curves`` (float32 values as JSON numbers: about 20 bytes a
    step per curve), beside the summary's mean and standard deviation over seeds.

    The run of a config is made once (``experiment.make_run`` of a copy checked again, cached per
    experiment and config: :func:`compiled_run`), so sweeping one config again reuses its compiled
    program.

    Returns ``format`` (:data:`RESULT_FORMAT`), ``experiment`` (its :attr:`Experiment.tag`),
    ``seeds``, ``steps`` (when the config has them), the experiment's summary, ``config``
    (``config.to_dict()``, when the config has one), then
    ``wall_time_s`` (the sweep), ``n_devices`` (over all processes), ``n_processes``,
    ``chunk_size`` and ``provenance`` (:func:`gradattn.provenance.provenance`, finished at the end).
    """
    if not isinstance(experiment, Experiment):
        raise TypeError(f"run_experiment: experiment must be a gradattn.experiments.Experiment, got {type(experiment).__name__}")
    fn = experiment.name
    config = experiment.config_type() if config is None else config
    check_config_type(config, experiment.config_type, fn)
    if save_dir is not None:
        if experiment.save is None:
            raise ValueError(f"{fn}: save_dir is for experiments that keep something beyond their summary; {fn} keeps nothing")
        try:  # checked as the OS resolves it, before any work
            save_dir = check_directory(os.fspath(save_dir))
        except ValueError as err:
            raise ValueError(f"{fn}: save_dir: {err}") from None
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
    run = compiled_run(experiment, config)
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
    seeds = [int(s) for s in seeds]
    summary = {"format": RESULT_FORMAT, "experiment": experiment.tag, "seeds": seeds}
    if hasattr(config, "steps"):
        summary["steps"] = config.steps
    summary.update(experiment.summarise(per_seed, seeds, config))
    if callable(to_dict):
        summary["config"] = to_dict()
    if per_seed_curves:
        summary["per_seed_curves"] = {name: json_floats(v) for name, v in per_seed.items() if is_curve(name)}
    if save_dir is not None:
        experiment.save(per_seed, seeds, config, os.fspath(save_dir))  # type: ignore[misc]
        summary["saved_to"] = os.fspath(save_dir)
    summary.update(wall_time_s=wall, n_devices=n_devices, n_processes=jax.process_count(), chunk_size=chunk_size,
                   provenance=finish(prov))
    return summary


def check_config_type(config, config_type: type, fn: str) -> None:
    """TypeError naming ``fn`` unless ``config`` is a ``config_type``."""
    if not isinstance(config, config_type):
        article = "an" if config_type.__name__[:1] in "AEIOU" else "a"
        raise TypeError(f"{fn}: config must be {article} {config_type.__name__}, got {type(config).__name__}")


def compiled_run(experiment: Experiment, config):
    """``experiment.make_run(config)``, made once per experiment and config (the one cache of runs:
    a second sweep of the same config reuses the same function, so jax's compiled program).

    The config is checked again first (rebuilt by ``dataclasses.replace``, which reruns its
    checks), so a config altered after construction raises here and never leaves a cached run
    that would fail inside the sweep."""
    check_config_type(config, experiment.config_type, experiment.name)
    return _compiled_run(experiment, dataclasses.replace(config))


@functools.lru_cache(maxsize=32)
def _compiled_run(experiment: Experiment, config):
    return experiment.make_run(config)


def check_config(config, fn: str) -> None:
    """An experiment config's ``__post_init__``: every field against the bounds it declares
    (normalised in place), and its ``task`` a :class:`~gradattn.tasks.Task` (or what the config's
    ``task_check`` accepts, e.g. a token task) whose own fields hold theirs (the command line's
    bounds)."""
    check_fields(config, fn)
    getattr(config, "task_check", check_task)(config.task, fn)  # names every member a task lacks
    check_fields(config.task, fn, store=False)


class ExperimentConfig:
    """The base of the experiments' configs (frozen dataclasses with a ``task`` and :func:`option`
    and :func:`~gradattn._config.nested` fields): ``__post_init__`` checks every option against
    the bounds it declares, the nested specs' types and the task (:func:`check_config`; a config
    with checks of its own calls it first), ``to_dict`` is :func:`config_dict`, and
    :meth:`require` refuses a config of another type."""

    def __post_init__(self):
        check_config(self, type(self).__name__)

    def to_dict(self) -> dict:
        """The config as JSON (:func:`config_dict`); :func:`config_from_dict` rebuilds it."""
        return config_dict(self)

    @classmethod
    def require(cls, config, fn: str) -> None:
        """TypeError naming ``fn`` unless ``config`` is a ``cls``."""
        check_config_type(config, cls, fn)


def config_dict(config) -> dict:
    """A config as JSON: its options by their flat names (those of its nested specs included, as
    on the command line), the task by its ``to_dict`` (with its class name), the dtype."""
    d: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name == "task":
            d["task"] = {"name": type(config.task).__name__, **config.task.to_dict()}
        elif "nested" not in f.metadata:
            d[f.name] = getattr(config, f.name)
    d.update({flat.name: flat_get(config, flat) for flat in flat_fields(type(config)) if len(flat.path) > 1})
    d["dtype"] = "float32"
    return d


def config_from_dict(config_type: type, d: dict):
    """The ``config_type`` instance that :func:`config_dict` described as ``d`` (e.g. the ``config``
    of a result JSON): its options (nested specs rebuilt from their flat names), and the task
    rebuilt by its class's ``from_dict``."""
    if not isinstance(d, dict) or not isinstance(d.get("task"), dict):
        raise ValueError(f"config_from_dict: not a {config_type.__name__} description (no task): {d!r}")
    d = dict(d)
    d.pop("dtype", None)
    task_d = d.pop("task")
    task_type = getattr(task_classes, str(task_d.get("name")), None)
    from_dict = getattr(task_type, "from_dict", None) if isinstance(task_type, type) else None
    if not callable(from_dict):
        raise ValueError(f"config_from_dict: unknown task {task_d.get('name')!r} in the {config_type.__name__} description")
    names = {f.name for f in dataclasses.fields(config_type) if f.init and "nested" not in f.metadata}
    names |= {flat.name for flat in flat_fields(config_type)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"config_from_dict: {config_type.__name__} has no field(s) {', '.join(unknown)}")
    return config_type(task=from_dict(task_d), **nest(config_type, d))


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
# The specs configs share
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """The single head's sizes and initialisation (d_in and C come from the task).

    Attributes:
      d_k, d_v: query/key and value sizes.
      init_scale: every parameter is N(0, init_scale^2); must be > 0 (at 0 every score is 0 and
        the gradients of W_Q and W_K vanish for good).
    """

    d_k: int = option(10, help="query/key size", minimum=1, maximum=MAX_HEAD_SIZE)
    d_v: int = option(15, help="value size", minimum=1, maximum=MAX_HEAD_SIZE)
    init_scale: float = option(0.1, help="std of the N(0, s^2) initial weights (> 0)", minimum=0.0,
                               exclusive_minimum=True)

    def __post_init__(self):
        check_fields(self, "HeadSpec")

    def init(self, key: jax.Array, task, dtype=jnp.float32) -> HeadParams:
        """A head for ``task`` (its ``d_in`` and ``n_classes``) drawn from ``key``
        (:func:`gradattn.head.init_head`)."""
        return init_head(key, task.d_in, self.d_k, self.d_v, task.n_classes, self.init_scale, dtype)


@dataclasses.dataclass(frozen=True)
class ArmRates:
    """The rates of the paper's two arms: plain SGD, and the EM-like two-timescale schedule (its
    defaults are the paper's).

    Attributes:
      sgd_lr: SGD's learning rate on all four matrices.
      value_lr, routing_lr: the EM-like rates on W_V and on W_Q, W_K, W_O.
    """

    sgd_lr: float = option(0.01, help="SGD's learning rate on all four matrices", minimum=0.0)
    value_lr: float = option(0.1, help="EM-like learning rate on W_V", minimum=0.0)
    routing_lr: float = option(0.01, help="EM-like learning rate on W_Q, W_K, W_O", minimum=0.0)

    def __post_init__(self):
        check_fields(self, "ArmRates")

    def optimizers(self) -> dict[str, optax.GradientTransformation]:
        """``{"sgd": sgd(sgd_lr), "em": em_like(value_lr, routing_lr)}`` (:mod:`gradattn.training`)."""
        return {"sgd": sgd(self.sgd_lr), "em": em_like(self.value_lr, self.routing_lr)}
