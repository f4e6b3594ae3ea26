"""How much memory an experiment needs, estimated from its configuration before anything compiles.

Every size of an experiment has its own upper bound, but sizes within their bounds can still be far
too big together (a sequence of 65,537 with 4096-wide heads; a million held-out samples; one seed
padded to a chunk of 65,536). Compiled, such a run ends in a long ``RESOURCE_EXHAUSTED`` traceback,
often after minutes of compilation. :func:`check_memory`, which
:func:`gradattn.experiments.run_experiment` calls after its other checks and before anything is
traced, estimates the peak memory of one call of the sweep on one device and refuses, with a
:class:`MemoryEstimateError` of one line naming the sizes and the estimate, a run that needs more
than the device holds.

What one call holds. A sweep runs ``chunk_size`` seeds vmapped together on each device per call,
the last call padded to that size with copies of its last seed (:mod:`gradattn.sweeps`), so the
estimate is that of ``chunk_size`` seeds, however few seeds are left. It counts the dominant live
arrays, all float32 (or int32, or the two uint32 words of a key: 4 bytes an entry):

* the parameters of every arm with their gradients, updates and optimiser state, and the
  parameters kept at checkpoints;
* one training step's work in the gradient path the run resolves (``"auto"`` as the backend
  chooses it, :mod:`gradattn._backend`): the N x N matrices of the dense and autodiff paths; for
  the blocked pass the (block x N) matrices of the query blocks in flight
  (:mod:`gradattn.grads._rows`), for one group of seeds at a time where the backend groups them
  (:func:`gradattn.grads.blocked.seed_group`); O(N d) for the Pallas kernels;
* the N x N attention of every evaluation pass (every experiment ends with dense forward passes of
  the trained heads), times the held-out sequences or samples evaluated together;
* held-out sets, snapshots of attention rows and values, per-position measurements, loss curves.

Training and evaluation run one after the other, so the larger of their working sets counts, on top
of what lives throughout. The multipliers of each part were measured against XLA's own buffer
assignment (``jax.jit(...).lower(...).compile().memory_analysis()``: temporaries, arguments and
outputs) on CPU: at every configuration tested the estimate is above XLA's figure and at most
:data:`TESTED_FACTOR` times it (``tests/test_memory.py``). It is an estimate of the program's arrays,
not of the runtime's own overhead.

What a device holds (:func:`device_memory`): on a GPU or TPU the limit its runtime reports
(``device.memory_stats()["bytes_limit"]``); on CPU, and on an accelerator that reports no limit, the
host's physical memory (``os.sysconf``), shared by the CPU devices of the process. Before a
multi-process run joins, when no device can be asked yet, :func:`check_memory_before_start` checks
the least estimate of any backend against the host's physical memory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

from gradattn._backend import CHOICES, BackendChoices, backend_choices
from gradattn._checks import check_int

BYTES = 4
"""Bytes of one entry: float32, int32, or one uint32 word of a PRNG key."""

TESTED_FACTOR = 4.0
"""The estimate is at least XLA's figure and at most this many times it at every configuration of
``tests/test_memory.py``."""

# Multipliers, each measured (see the module docstring): how many arrays of a part's shape XLA
# keeps live at once, rounded up.
EVAL_SQUARES = 4
"""N x N arrays live in one dense forward pass of the head (XLA keeps 2 to 3: the scores, the masked
scores, alpha)."""
DENSE_SQUARES = 5
"""N x N arrays live in one step of the dense laws."""
AUTODIFF_SQUARES = 4
"""N x N arrays live in one step of autodiff through the dense loss."""
BLOCK_MATRICES = 5
"""(block x keys) arrays live per query block in flight in the blocked pass."""
ROW_VECTORS = 6
"""Arrays of N x (d_in + 2 d_k + 2 d_v + C) live in a training step of the head (the projections,
their gradients, the contexts, the logits)."""
FORWARD_ROW_VECTORS = 3
"""The same in a forward pass alone."""
PARAM_COPIES = 2
"""Copies of the head's parameters per arm beside the initial ones (XLA keeps about 3 in all for two
arms of plain or two-timescale SGD, which keeps no state)."""
SNAPSHOT_COPIES = 5
"""Copies per arm of the plateau study's stacked snapshots (attention rows and values at every
checkpoint) live while its settling statistics are computed."""
MEASURE_SQUARES = 8
"""(k x k) arrays per held-out sample in the bijection study's measurements (the exact
predictive, the model's log-softmax and probabilities, the per-position terms)."""
MANIFOLD_HEADS_LIVE = 2
"""Of the manifold study's three heads, how many forward passes over the held-out set XLA keeps at once."""
DEEP_STEP_SQUARES = 9
"""(N x N) arrays per head live in a training step of the deep model."""
DEEP_LAWS_SQUARES = 15
"""(N x N) arrays per head live while the deep run takes the laws of every head at a checkpoint."""
DEEP_ACTIVATIONS = 56
"""Arrays of N x d_model live per layer in a training step of the deep model (the feed-forward's
four-fold width included)."""
DEEP_FORWARD_ACTIVATIONS = 20
"""The same in a forward pass alone."""
DEEP_PARAM_COPIES = 6
"""Copies of the deep model's parameters (parameters, gradient, AdamW's two moments, the update, the
clipped gradient), plus one per checkpoint."""


class MemoryEstimateError(ValueError):
    """A run whose estimated memory exceeds what the device holds; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The estimated memory of one call of an experiment's sweep on one device.

    Attributes:
      bytes: the estimate.
      sizes: the sizes it depends on, as ``name=value`` (the config's field names).
      parts: bytes by part (``"a training step"``, ``"the evaluation's N x N attention"``, ...),
        largest first.
      path: the gradient path the estimate assumed (``grad_source="auto"`` resolved).
    """

    bytes: int
    sizes: str
    parts: dict[str, int]
    path: str | None = None

    @property
    def largest(self) -> str:
        """The largest part, in words."""
        name, size = max(self.parts.items(), key=lambda kv: kv[1])
        return f"{name}, {format_bytes(size)}"


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, three significant digits: ``'2.1 TiB'``, ``'512 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# The parts shared by the experiments: one head, its gradient paths, its evaluation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Head:
    n: int
    d_in: int
    d_k: int
    d_v: int
    c: int

    @property
    def params(self) -> int:
        return 2 * self.d_in * self.d_k + self.d_in * self.d_v + self.d_v * self.c

    @property
    def row(self) -> int:
        """Floats per position of the projections, contexts and logits."""
        return self.d_in + 2 * self.d_k + 2 * self.d_v + self.c


def _resolve(grad_source: str, choices: BackendChoices) -> str:
    return choices.grad_source if grad_source == "auto" else grad_source


def block_rows(n: int, choices: BackendChoices) -> int:
    """Rows per query block of the blocked pass at N = ``n`` (:func:`gradattn.grads._rows.default_block_size`
    for the backend of ``choices``, at most N)."""
    multiple = -(-n // (choices.max_blocks * choices.block_size))
    return min(n, choices.block_size * max(1, multiple))


def seeds_per_group(n: int, chunk: int, choices: BackendChoices) -> int:
    """Of ``chunk`` vmapped seeds, how many run the blocked pass at once at N = ``n``: the backend's
    seed groups (:func:`gradattn.grads.blocked.seed_group`), or all of them where it has none."""
    if choices.seed_group_bytes is None:
        return chunk
    return min(chunk, max(1, choices.seed_group_bytes // (BYTES * block_rows(n, choices) * n)))


def _step(path: str, head: _Head, chunk: int, choices: BackendChoices) -> int:
    """Floats of one training step of ``chunk`` seeds' heads (the gradient path's work)."""
    n = head.n
    rows_vectors = chunk * ROW_VECTORS * n * head.row
    if path == "blocked":
        rows = block_rows(n, choices)
        blocks = -(-n // rows)
        in_flight = min(blocks, choices.blocks_in_flight or blocks)
        live = min(n, in_flight * rows)
        group = seeds_per_group(n, chunk, choices)
        # the (block x keys) matrices, and the transposes the pass builds as identity products
        # (d_in x d_in, d_k x d_k, rows x rows), which are not batched over seeds
        return group * BLOCK_MATRICES * live * n + rows_vectors + head.d_in ** 2 + head.d_k ** 2 + in_flight * rows * rows
    if path == "pallas":  # O(N d) between the kernels (head sizes padded to powers of two >= 16), and the tiles
        lanes = 2 * _lanes(head.d_k) + 2 * _lanes(head.d_v) + 2 * _lanes(head.c)
        return chunk * (ROW_VECTORS * n * (head.d_in + lanes) + 8 * 64 * 64) + head.d_in ** 2
    if path == "autodiff":
        return chunk * AUTODIFF_SQUARES * n * n + rows_vectors
    return chunk * DENSE_SQUARES * n * n + rows_vectors  # the dense laws, and any other path taken to be as large


def _lanes(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _forward(head: _Head, sequences: int) -> int:
    """Floats of dense forward passes of the head over ``sequences`` sequences at once."""
    return sequences * (EVAL_SQUARES * head.n * head.n + FORWARD_ROW_VECTORS * head.n * head.row)


def _sample(n: int, d_in: int) -> int:
    """Floats of sampling one sequence of the sticky chain: the keys of the chain (two words a
    step), the symbols, the noise, the gathered means and x."""
    return n * (3 * d_in + 4)


def _task_sizes(task) -> str:
    """The task's own sizes (its field names) and the N, d_in and C they give."""
    own = [f"{f}={getattr(task, f)}" for f in ("seq_len", "n_symbols", "d_embed", "n_states", "n_obs") if hasattr(task, f)]
    derived = f"N={task.n_positions}, d_in={task.d_in}, C={task.n_classes}"
    return f"{', '.join(own)} ({derived})" if own else derived


def _head_sizes(config, path: str) -> str:
    shown = path if config.grad_source == path else f"{config.grad_source!r} ({path})"
    return f"d_k={config.head.d_k}, d_v={config.head.d_v}, steps={config.steps}, grad_source={shown}"


def _estimate(throughout: dict[str, int], phases: dict[str, int], sizes: str, path: str | None = None) -> Estimate:
    """An :class:`Estimate` from its parts in floats: what lives ``throughout`` the run, and the
    ``phases`` that run one after the other (of which the largest counts)."""
    floats = sum(throughout.values()) + max(phases.values(), default=0)
    parts = {**throughout, **phases}
    as_bytes = {k: BYTES * v for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
    return Estimate(bytes=BYTES * floats, sizes=sizes, parts=as_bytes, path=path)


# ---------------------------------------------------------------------------------------------
# The experiments
# ---------------------------------------------------------------------------------------------


def _head_of(config) -> _Head:
    task = config.task
    return _Head(task.n_positions, task.d_in, config.head.d_k, config.head.d_v, task.n_classes)


def em_vs_sgd_estimate(config, chunk_size: int, choices: BackendChoices) -> Estimate:
    """:func:`gradattn.experiments.em_sgd.make_em_vs_sgd`: two arms trained on one sequence, then a dense
    forward pass of each."""
    head, chunk = _head_of(config), chunk_size
    path = _resolve(config.grad_source, choices)
    throughout = {
        "parameters and optimiser state": chunk * (1 + 2 * PARAM_COPIES) * head.params,
        "training data": chunk * _sample(head.n, head.d_in),
        "loss curves": chunk * 2 * 2 * config.steps,
    }
    phases = {
        "a training step": _step(path, head, chunk, choices),
        "the evaluation's N x N attention": _forward(head, chunk),
    }
    return _estimate(throughout, phases, f"{_task_sizes(config.task)}, {_head_sizes(config, path)}", path)


def plateau_estimate(config, chunk_size: int, choices: BackendChoices) -> Estimate:
    """:func:`gradattn.experiments.plateau.make_plateau_run`: two arms trained in one scan (a fresh
    sequence per step), their parameters kept every ``checkpoint_every`` steps, then per arm a
    dense forward pass at every checkpoint keeping ``settle_rows`` attention rows and the values,
    and the settling statistics over those snapshots."""
    head, chunk = _head_of(config), chunk_size
    path = _resolve(config.grad_source, choices)
    k = config.steps // config.checkpoint_every + 1
    snapshot = min(config.settle_rows, head.n) * head.n + head.n * head.d_v
    throughout = {
        "parameters, optimiser state and checkpoints": chunk * (1 + 2 * PARAM_COPIES + 2 * 2 * k) * head.params,
        "training data": chunk * 2 * _sample(head.n, head.d_in),
        "loss curves": chunk * 2 * 2 * config.steps,
    }
    phases = {
        "a training step": _step(path, head, chunk, choices) + chunk * _sample(head.n, head.d_in),
        "the snapshots of attention and values": chunk * (2 * SNAPSHOT_COPIES * k * snapshot
                                                          + EVAL_SQUARES * head.n * head.n),
        "the evaluation's N x N attention": _forward(head, chunk * 3),
    }
    sizes = (f"{_task_sizes(config.task)}, {_head_sizes(config, path)}, checkpoint_every={config.checkpoint_every}, "
             f"settle_rows={config.settle_rows}")
    return _estimate(throughout, phases, sizes, path)


def manifold_estimate(config, chunk_size: int, choices: BackendChoices) -> Estimate:
    """:func:`gradattn.experiments.manifold.make_manifold_run`: two arms trained on fresh sequences,
    then three heads' forward passes over ``heldout`` sequences at once, and the geometry (principal
    components, least squares) of their values and contexts pooled over those sequences."""
    head, chunk = _head_of(config), chunk_size
    path = _resolve(config.grad_source, choices)
    pooled = config.heldout * head.n
    throughout = {
        "parameters and optimiser state": chunk * (1 + 2 * PARAM_COPIES) * head.params,
        "loss curves": chunk * 2 * 2 * config.steps,
    }
    phases = {
        "a training step": _step(path, head, chunk, choices) + chunk * _sample(head.n, head.d_in),
        # the held-out inputs (and [x_t, x_t-1] for the ceiling), the filter's (N, C) arrays, and
        # the pooled values and contexts with their centred copies and factors
        "the held-out evaluation (heldout x N x N attention)": chunk * (
            MANIFOLD_HEADS_LIVE * _forward(head, config.heldout)
            + pooled * (10 * head.d_in + 6 * head.c + 8 * head.d_v + 16)),
    }
    sizes = f"{_task_sizes(config.task)}, {_head_sizes(config, path)}, heldout={config.heldout}"
    return _estimate(throughout, phases, sizes, path)


def _deep_floats(d_in: int, d_model: int, n_layers: int, n_heads: int, c: int, n: int) -> dict[str, int]:
    """Floats of the deep model on one sequence: ``params``; ``step``, one training step (the
    attention and activations its backward pass keeps); ``laws``, the per-head laws at a checkpoint;
    ``forward``, one forward pass keeping every head's attention."""
    d, layers = d_model, n_layers
    params = layers * (12 * d * d + 13 * d) + d_in * d + 3 * d + d * c + c
    attention = layers * n_heads * n * n
    activations = layers * n * d
    io = n * (d_in + 3 * c)
    return {"params": params, "step": DEEP_STEP_SQUARES * attention + DEEP_ACTIVATIONS * activations + io,
            "laws": DEEP_LAWS_SQUARES * attention + DEEP_ACTIVATIONS * activations + io,
            "forward": EVAL_SQUARES * attention + DEEP_FORWARD_ACTIVATIONS * activations + io}


def deep_estimate(config, chunk_size: int, choices: BackendChoices) -> Estimate:
    """:func:`gradattn.experiments.deep.make_deep_run`: AdamW on the transformer, the per-head laws at every
    checkpoint, and the settling snapshots (``settle_rows`` attention rows and the values of every
    head at every checkpoint)."""
    task, chunk = config.task, chunk_size
    n = task.n_positions
    deep = _deep_floats(task.d_in, config.d_model, config.n_layers, config.n_heads, task.n_classes, n)
    k = config.n_checkpoints or 0
    throughout = {
        "parameters, optimiser state and checkpoints": chunk * (DEEP_PARAM_COPIES + k) * deep["params"],
        "training data and loss curve": chunk * (2 * _sample(n, task.d_in) + 2 * config.steps),
    }
    step = max(deep["step"], deep["laws"]) if k else deep["step"]
    phases = {"a training step (n_layers x n_heads x N x N attention)": chunk * (step + _sample(n, task.d_in))}
    if k:
        rows, heads = min(config.settle_rows, n), config.n_layers * config.n_heads
        snapshots = 2 * (k + 1) * heads * (rows * n + n * (config.d_model // config.n_heads))
        phases["the settling snapshots"] = chunk * (snapshots + deep["forward"])
    sizes = (f"{_task_sizes(task)}, d_model={config.d_model}, n_layers={config.n_layers}, n_heads={config.n_heads}, "
             f"steps={config.steps}, n_checkpoints={k}, settle_rows={config.settle_rows}")
    return _estimate(throughout, phases, sizes)


def bijection_estimate(config, chunk_size: int, choices: BackendChoices) -> Estimate:
    """:func:`gradattn.experiments.bijection.make_bijection_run`: the head (autodiff of its dense loss)
    and the deep model (AdamW) each trained on ``batch`` fresh samples per step, then four models
    measured on ``heldout`` samples at once (the exact predictive, each model's logits and the
    per-position measures, (heldout, k, k) arrays each)."""
    task, chunk = config.task, chunk_size
    k = task.n_symbols
    head = _Head(k, task.d_in, config.head.d_k, config.head.d_v, k)
    deep = _deep_floats(task.d_in, config.d_model, config.n_layers, config.n_heads, k, k)
    sample = k * (task.d_in + 4)
    head_step = config.batch * (AUTODIFF_SQUARES * k * k + ROW_VECTORS * k * head.row + sample)
    deep_step = config.batch * (deep["step"] + sample)
    throughout = {
        "parameters and optimiser state": chunk * DEEP_PARAM_COPIES * (head.params + deep["params"]),
        "loss curves": chunk * 2 * 2 * config.steps,
    }
    phases = {
        "a training step": chunk * max(head_step, deep_step),
        "the held-out evaluation (heldout samples at once)": chunk * config.heldout * (
            sample + MEASURE_SQUARES * k * k + max(_forward(head, 1), deep["forward"])),
    }
    sizes = (f"n_symbols={k} (N={k}, d_in={task.d_in}, C={k}), batch={config.batch}, heldout={config.heldout}, "
             f"d_k={config.head.d_k}, d_v={config.head.d_v}, d_model={config.d_model}, n_layers={config.n_layers}, "
             f"n_heads={config.n_heads}, steps={config.steps}")
    return _estimate(throughout, phases, sizes)


ESTIMATORS: dict[str, Callable[[Any, int, BackendChoices], Estimate]] = {
    "gradattn.experiments.em_sgd.EmVsSgdConfig": em_vs_sgd_estimate,
    "gradattn.experiments.plateau.PlateauConfig": plateau_estimate,
    "gradattn.experiments.manifold.ManifoldConfig": manifold_estimate,
    "gradattn.experiments.bijection.BijectionConfig": bijection_estimate,
    "gradattn.experiments.deep.DeepConfig": deep_estimate,
}
"""The library's estimators, by the qualified name of the config type they read (this module
imports none of the experiments, which import it)."""


def _type_name(config) -> str:
    t = type(config)
    return f"{t.__module__}.{t.__qualname__}"


def estimator(config) -> Callable[[Any, int, BackendChoices], Estimate] | None:
    """The library's estimator for ``config``'s experiment, or None for a config type it does not know."""
    return ESTIMATORS.get(_type_name(config))


# ---------------------------------------------------------------------------------------------
# The estimate, the bound, the check
# ---------------------------------------------------------------------------------------------


def estimate(config, chunk_size: int | None = None, *, backend: str | None = None) -> Estimate:
    """The estimated memory of one call of ``config``'s experiment on one device of ``backend``
    (default ``jax.default_backend()``; ``"cpu"``, ``"gpu"``, ``"tpu"``): ``chunk_size`` seeds
    vmapped together (default: the backend's, :func:`gradattn.sweeps.default_chunk_size`), a
    short last call padded to it. ``config``: an :class:`~gradattn.experiments.EmVsSgdConfig`,
    :class:`~gradattn.experiments.deep.DeepConfig`, or the config of a study (plateau, manifold, bijection).

    Raises:
      TypeError: for a config of another type (its experiment may give its own estimate, the
        ``memory`` field of :class:`gradattn.experiments.Experiment`).
    """
    fn = estimator(config)
    if fn is None:
        known = ", ".join(name.rpartition(".")[2] for name in ESTIMATORS)
        raise TypeError(f"estimate: no memory estimate for a {type(config).__name__}; the library estimates {known}")
    choices = backend_choices(backend)
    chunk = choices.chunk_size if chunk_size is None else check_int("chunk_size", chunk_size, "estimate")
    return fn(config, chunk, choices)


def estimate_bytes(config, chunk_size: int | None = None, *, backend: str | None = None) -> int:
    """:func:`estimate` in bytes."""
    return estimate(config, chunk_size, backend=backend).bytes


def physical_memory() -> int | None:
    """The host's physical memory in bytes (``os.sysconf``), or None where the system does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


def _bytes_limit(device) -> int | None:
    """The memory limit ``device``'s runtime reports, or None."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001  (a runtime without memory statistics raises its own error types)
        return None
    limit = stats.get("bytes_limit")
    return limit if isinstance(limit, int) and limit > 0 else None


def device_memory(devices: Sequence[jax.Device] | None = None) -> tuple[int | None, str]:
    """``(bytes, description)``: what each of ``devices`` (default: this process's local devices)
    may hold of one call.

    On a GPU or TPU the smallest limit its runtime reports (``memory_stats()["bytes_limit"]``). On
    CPU, and for an accelerator that reports no limit, the host's physical memory, divided among
    the CPU devices of the call (they share it). None where no figure is known (no check then).
    """
    devices = list(jax.local_devices() if devices is None else devices)
    host = physical_memory()
    accelerators = [d for d in devices if d.platform != "cpu"]
    if accelerators:
        limits = [_bytes_limit(d) for d in accelerators]
        known = [(v, d) for v, d in zip(limits, accelerators) if v is not None]
        if len(known) == len(accelerators):
            limit, d = min(known, key=lambda vd: vd[0])
            return limit, f"the memory of {d.device_kind} {d.id} ({format_bytes(limit)})"
        if host is None:
            return None, "unknown"
        return host, f"the host's physical memory ({format_bytes(host)}; the device reports no limit)"
    if host is None:
        return None, "unknown"
    if len(devices) > 1:
        return host // len(devices), (f"a share of the host's physical memory ({format_bytes(host)} for "
                                      f"{len(devices)} CPU devices)")
    return host, f"the host's physical memory ({format_bytes(host)})"


def _seeds_text(chunk: int, n_seeds: int | None) -> str:
    text = f"chunk_size={chunk} seed{'s' if chunk != 1 else ''} vmapped per device per call"
    if n_seeds is not None and n_seeds < chunk:
        text += f" ({n_seeds} seed{'s' if n_seeds != 1 else ''}, padded to the chunk)"
    return text


def _refusal(fn: str, sizes: str | None, chunk: int, n_seeds: int | None, need: str, largest: str | None, where: str) -> str:
    what = f"{sizes}, {_seeds_text(chunk, n_seeds)}" if sizes else _seeds_text(chunk, n_seeds)
    most = f" (largest part: {largest})" if largest else ""
    advice = "use a smaller chunk_size or smaller sizes" if chunk > 1 else "use smaller sizes"
    return f"{fn}: {what}: needs {need} per device{most}, more than {where}: {advice}"


def check_memory(experiment, config, chunk_size: int, *, n_seeds: int | None = None,
                 devices: Sequence[jax.Device] | None = None) -> int | None:
    """Refuse a run of ``experiment`` (a :class:`gradattn.experiments.Experiment`) with ``config``
    whose estimated memory per device exceeds what ``devices`` hold (:func:`device_memory`;
    default: this process's local devices). Returns the estimate in bytes (None when there is none:
    an experiment without a ``memory`` callable whose config type the library does not estimate).

    The estimate is ``experiment.memory(config, chunk_size)`` when the experiment gives one, else
    the library's (:func:`estimate`, for the backend the run is traced for). Called by
    :func:`gradattn.experiments.run_experiment` before anything is traced or compiled; ``n_seeds``
    (the seeds of the run) only words the message when they are fewer than a chunk.

    Raises:
      MemoryEstimateError: one line naming the sizes, the chunk, the estimate and the bound.
    """
    fn = experiment.name
    chunk = check_int("chunk_size", chunk_size, fn)
    own = getattr(experiment, "memory", None)
    if own is not None:
        need, sizes, largest = int(own(config, chunk)), None, None
    else:
        estimate_of = estimator(config)
        if estimate_of is None:
            return None
        est = estimate_of(config, chunk, backend_choices())
        need, sizes, largest = est.bytes, est.sizes, est.largest
    limit, where = device_memory(devices)
    if limit is not None and need > limit:
        raise MemoryEstimateError(_refusal(fn, sizes, chunk, n_seeds, f"an estimated {format_bytes(need)}", largest, where))
    return need


def check_memory_before_start(fn: str, config, chunk_size: int | None = None, *, n_seeds: int | None = None) -> int | None:
    """What can be checked before JAX starts a backend (before a multi-process run joins, for
    example): the least estimate of any backend (:func:`estimate` for each, at ``chunk_size`` or
    each backend's default) against the host's physical memory. A run refused here would be refused
    by :func:`check_memory` on any device no larger than its host's memory. Returns the least
    estimate (None for a config type the library does not estimate); ``fn`` names the caller in the
    message. Nothing here asks JAX for a device or a backend.

    Raises:
      MemoryEstimateError: one line naming the sizes, the chunk, the estimate and the bound.
    """
    estimate_of = estimator(config)
    if estimate_of is None:
        return None
    least = None
    for choices in dict.fromkeys(CHOICES.values()):
        chunk = choices.chunk_size if chunk_size is None else check_int("chunk_size", chunk_size, fn)
        est = estimate_of(config, chunk, choices)
        if least is None or est.bytes < least[0].bytes:
            least = (est, chunk)
    host = physical_memory()
    assert least is not None
    est, chunk = least
    if host is not None and est.bytes > host:
        raise MemoryEstimateError(_refusal(fn, est.sizes, chunk, n_seeds, f"at least {format_bytes(est.bytes)}",
                                           est.largest, f"the host's physical memory ({format_bytes(host)})"))
    return est.bytes
