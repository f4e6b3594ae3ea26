"""Shared plumbing for the benchmarks: the paper's head, worker subprocesses, alternating rounds,
timing, the PyTorch peer of the head, machine facts, JSON.

Each variant under test lives in its own worker process (its own JAX or torch runtime, its own
compiled code, its own memory), started once. The parent then runs rounds; in each round it asks
every worker in turn to time a few steps, so slow drifts of a shared machine hit all variants
alike. Figures are medians over rounds.

Failure policy: a worker that dies, or answers with an error, stops the whole benchmark with a
non-zero exit status (:class:`BenchmarkError`); no variant is ever replaced by another or dropped
without being named in the output. The parent process never initialises a JAX backend itself (on a
GPU that would reserve memory the workers need); machine facts come from a probe subprocess.

Importing this module imports neither JAX, gradattn nor torch (``torch_reference.py`` is timed
from process start against the library and must not pay for JAX); each is imported where used.
The paper's head (``HEAD``, ``LR``, ``INIT_SCALE``, ``N_POSITIONS``) is the library's EM-vs-SGD
default configuration, read on first use: that imports gradattn (and JAX, without starting a
backend), which is why ``torch_reference.py`` states its protocol itself.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT_DIR = os.path.join(HERE, "results")
PLATFORMS = ("cpu", "gpu", "tpu")

PARAMS = ("w_q", "w_k", "w_v", "w_o")  # the parameters' names, as every check in the results JSON keys them
CHECK_TOL = 1e-4  # a variant whose loss or gradients are off by this much (relative) is not timed
SDPA_HEAD_SIZE = 16  # q, k and v zero-padded to one head size, as torch's fused attention needs


class BenchmarkError(RuntimeError):
    """A worker failed or a check did not hold: the benchmark stops with a non-zero exit status."""


# ----------------------------------------------------------------------------------------------- the head


@functools.cache
def _paper() -> dict:
    """The paper's head and training step, from the library's defaults (``EmVsSgdConfig()`` and its
    task): every benchmark measures this configuration."""
    from gradattn.experiments import EmVsSgdConfig

    config = EmVsSgdConfig()
    task = config.task
    head = config.head
    return {"HEAD": {"d_in": task.d_in, "d_k": head.d_k, "d_v": head.d_v, "n_classes": task.n_classes},
            "LR": config.rates.sgd_lr, "INIT_SCALE": head.init_scale, "N_POSITIONS": task.n_positions}


def __getattr__(name: str):
    """``HEAD`` (d_in, d_k, d_v, n_classes), ``LR`` (SGD's rate), ``INIT_SCALE`` (std of the initial
    weights) and ``N_POSITIONS`` (N of the paper's sequence), read from the library on first use."""
    if name in ("HEAD", "LR", "INIT_SCALE", "N_POSITIONS"):
        value = _paper()[name]
        return dict(value) if isinstance(value, dict) else value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def head_shapes(head: dict | None = None) -> list[tuple[int, int]]:
    """The shapes of W_Q, W_K, W_V, W_O (of the paper's head by default)."""
    head = _paper()["HEAD"] if head is None else head
    d_in, d_k, d_v, c = head["d_in"], head["d_k"], head["d_v"], head["n_classes"]
    return [(d_in, d_k), (d_in, d_k), (d_in, d_v), (d_v, c)]


def head_data(n: int, seeds: int | None = None, seed: int = 0):
    """Random data and initial parameters of the paper's head, numpy float32 (int32 targets).

    x ~ N(0, I) of shape (N, d_in), uniform targets y (N,), and W_Q, W_K, W_V, W_O with entries
    N(0, INIT_SCALE^2), drawn in that order from ``numpy.random.default_rng(seed)``. With ``seeds``,
    every array gets a leading axis of that length (each seed its own sequence and parameters).
    """
    lead = () if seeds is None else (seeds,)
    head, init_scale = _paper()["HEAD"], _paper()["INIT_SCALE"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, n, head["d_in"])).astype(np.float32)
    y = rng.integers(0, head["n_classes"], (*lead, n)).astype(np.int32)
    weights = [(init_scale * rng.standard_normal((*lead, *s))).astype(np.float32) for s in head_shapes(head)]
    return x, y, weights


def rel_err(a, ref) -> float:
    """``max |a - ref| / max |ref|`` over all entries (the error measure of every check).

    The formula of ``gradattn.verify.relative_error``, but in float64 numpy: that one computes in
    JAX at the arrays' dtype (float32 outside x64, which would round the float64 reference before
    comparing) and starts a JAX backend, which the parent process must not. Arrays of different
    shapes are infinitely far apart.
    """
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), np.finfo(np.float64).tiny))


# ----------------------------------------------------------------------------------------------- PyTorch


def torch_device(backend: dict) -> str:
    """Where PyTorch runs: CUDA when JAX runs on a GPU, else the CPU."""
    return "cuda" if backend["jax_backend"] in ("gpu", "cuda", "rocm") else "cpu"


def torch_setup(device):
    """On the CPU, every core for torch's threads. Returns ``sync()``: wait for the device."""
    import torch

    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
        return lambda: None
    return torch.cuda.synchronize


def sdpa_backends(device) -> list:
    """Only fused kernels: if none applies, torch raises instead of falling back to the unfused math path."""
    from torch.nn.attention import SDPBackend

    if device.type == "cpu":
        return [SDPBackend.FLASH_ATTENTION]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def torch_logits(x, w_q, w_k, w_v, w_o, future=None):
    """The causal head's logits in PyTorch, scores scaled by 1/sqrt(d_k).

    With ``future`` (the (N, N) bool mask of the positions j > i): eager, the N x N softmax built
    explicitly as the reference code does. Without: torch's fused ``scaled_dot_product_attention``
    (``is_causal``), q, k, v zero-padded to ``SDPA_HEAD_SIZE`` (padding changes neither the scores
    nor the context); run it under ``sdpa_kernel(sdpa_backends(device))``. Leading axes of ``x``
    and the weights (seeds) are batch axes: (S, N, d_in) with (S, d_in, d_k), ... gives (S, N, C).
    """
    import torch
    import torch.nn.functional as F

    d_k, d_v = w_q.shape[-1], w_v.shape[-1]
    scale = 1.0 / math.sqrt(d_k)
    q, k, v = x @ w_q, x @ w_k, x @ w_v
    if future is not None:
        alpha = torch.softmax((q @ k.transpose(-2, -1) * scale).masked_fill(future, float("-inf")), dim=-1)
        return (alpha @ v) @ w_o
    n, lead = x.shape[-2], x.shape[:-2]

    def heads(a):  # (..., N, d) -> (batch, 1 head, N, SDPA_HEAD_SIZE)
        return F.pad(a, (0, SDPA_HEAD_SIZE - a.shape[-1])).reshape(-1, 1, n, SDPA_HEAD_SIZE)

    g = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True, scale=scale)[:, 0, :, :d_v]
    return g.reshape(*lead, n, d_v) @ w_o


def torch_loss(x, y, weights, future=None):
    """Mean cross-entropy of :func:`torch_logits` over every position (of every seed)."""
    import torch.nn.functional as F

    logits = torch_logits(x, *weights, future=future)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def causal_future(n: int, device):
    """The (N, N) bool mask of the positions j > i, for the eager :func:`torch_logits`."""
    import torch

    return torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)


# ----------------------------------------------------------------------------------------------- timing


def timed(fn, calls: int = 1, carry=None, sync=None) -> tuple[float, object]:
    """``calls`` calls ``carry = fn(carry)``, then ``sync(carry)`` (e.g. ``jax.block_until_ready``).

    Returns (wall seconds per call, the last ``carry``). ``fn`` may ignore its argument.
    """
    t = time.perf_counter()
    for _ in range(calls):
        carry = fn(carry)
    if sync is not None:
        sync(carry)
    return (time.perf_counter() - t) / calls, carry


def median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


# ----------------------------------------------------------------------------------------------- workers


def add_out_dir(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"where the results JSON goes (default {DEFAULT_OUT_DIR})")


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """``--platform``, ``--out-dir`` and the hidden ``--worker`` option shared by the worker-based scripts."""
    ap.add_argument("--platform", choices=PLATFORMS, default=None,
                    help="JAX backend to run on (default: JAX's default backend on this machine)")
    add_out_dir(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)


def worker_env(platform_name: str | None, extra: dict | None = None) -> dict:
    """The environment of a worker: the chosen JAX platform (none pinned by default), no GPU preallocation.

    Several workers share one accelerator, so none may reserve most of its memory up front.
    """
    env = dict(os.environ)
    if platform_name is not None:
        env["JAX_PLATFORMS"] = "cuda" if platform_name == "gpu" else platform_name
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.update(extra or {})
    return env


class Worker:
    """A subprocess running ``python <script> --worker <spec as JSON>``, spoken to in JSON lines.

    The worker's stderr goes to ours, so its traceback is visible when it fails.
    """

    def __init__(self, script: str, spec: dict, env: dict):
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1,
        )
        self.ready = self._read()  # the worker's first line: set-up facts (compile time, checks, ...)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise BenchmarkError(f"worker {self.spec} died (exit status {self.proc.wait()}); see its error above")
        answer = json.loads(line)
        if "error" in answer:
            raise BenchmarkError(f"worker {self.spec} failed: {answer['error']}")
        return answer

    def ask(self, **request) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BenchmarkError(f"worker {self.spec} died (exit status {self.proc.wait()})") from None
        return self._read()

    def close(self) -> None:
        """End the worker; a non-zero exit status is a failure."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        code = self.proc.wait(timeout=120)
        if code:
            raise BenchmarkError(f"worker {self.spec} exited with status {code}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_workers(script: str, specs: dict[str, dict], env_of) -> dict[str, Worker]:
    """Start one worker per ``{name: spec}`` (``env_of(name) -> env``); if one fails, end those started."""
    workers: dict[str, Worker] = {}
    try:
        for name, spec in specs.items():
            workers[name] = Worker(script, spec, env_of(name))
    except BaseException:
        kill_all(workers)
        raise
    return workers


def kill_all(workers: dict[str, Worker]) -> None:
    for w in workers.values():
        w.kill()


def close_all(workers: dict[str, Worker]) -> None:
    for w in workers.values():
        w.close()


def serve(setup, timed) -> None:
    """Worker side: ``setup() -> dict`` once, then answer each request with ``timed(**request)``.

    An exception is printed to stderr and the worker exits with status 1 (the parent then stops).
    """
    print(json.dumps(setup()), flush=True)
    for line in sys.stdin:
        print(json.dumps(timed(**json.loads(line))), flush=True)


def alternate(workers: dict[str, Worker], rounds: int, request_of=None, **request) -> dict[str, list[dict]]:
    """``rounds`` rounds; in each, every worker answers one request (the order rotates per round).

    ``request_of(name) -> dict`` gives a per-worker request; otherwise every worker gets ``request``.
    Returns each worker's answers, one dict per round (each has at least ``seconds``).
    """
    names = list(workers)
    out = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            out[name].append(workers[name].ask(**(request_of(name) if request_of else request)))
    return out


# ----------------------------------------------------------------------------------------------- machine facts


def _git_commit() -> str | None:
    from gradattn.provenance import git_state

    state = git_state(REPO)
    if state["commit"] is None:
        return None
    return state["commit"] + ("+uncommitted changes" if state["dirty"] else "")


def local_backend() -> dict:
    """The JAX backend and devices this process sees (initialises the backend)."""
    import jax

    d = jax.devices()
    return {"jax_backend": jax.default_backend(), "device_kind": d[0].device_kind, "device_count": len(d),
            "platform": d[0].platform}


_PROBE = f"""
import json, sys
sys.path.insert(0, {HERE!r})
import _harness
print(json.dumps(_harness.local_backend()))
"""


def probe_backend(env: dict) -> dict:
    """The JAX backend and devices a worker with ``env`` sees (run in a subprocess)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise BenchmarkError(f"JAX could not start with JAX_PLATFORMS={env.get('JAX_PLATFORMS')!r}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(backend: dict) -> dict:
    """What the figures were measured on: devices (``backend``, from :func:`probe_backend` or
    :func:`local_backend`), CPU, versions, load, time, commit.

    Built from ``gradattn.provenance``'s parts rather than its ``provenance()``: that one starts a
    JAX backend in this process (the parent must not: on a GPU it would reserve memory the workers
    need), and its record has other fields than the ``machine`` of the committed results.
    """
    from gradattn.provenance import _version, cpu_model

    return {
        **backend,
        "cpu_model": cpu_model() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "os": platform.platform(),
        "loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("jax", "jaxlib", "torch", "numpy", "optax", "gradattn")},
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def describe(m: dict) -> str:
    """One line naming the machine of a result."""
    v = m["versions"]
    return (f"{m['device_count']} x {m['device_kind']} ({m['jax_backend']}); CPU {m['cpu_model']}, "
            f"{m['cpu_count']} cores; jax {v['jax']}, jaxlib {v['jaxlib']}, torch {v['torch']}, "
            f"python {m['python']}; load average {' '.join(f'{x:.1f}' for x in m['loadavg_at_end'] or [])}")


# ----------------------------------------------------------------------------------------------- output


def _atomic_io():
    """The library's atomic writer, ``gradattn._io``.

    Where the ``gradattn`` package is not imported yet, the module is loaded from the package's
    own file without running the package's ``__init__``: ``import gradattn._io`` imports the
    package, and with it JAX (over a second), which the PyTorch reference, timed from process start
    to exit, must not be charged. ``gradattn._io`` itself imports only the standard library.
    """
    if "gradattn" in sys.modules:
        import gradattn._io

        return gradattn._io
    spec = importlib.util.find_spec("gradattn")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkError("the gradattn package is not importable (pip install -e . or set PYTHONPATH)")
    io_spec = importlib.util.spec_from_file_location(
        "gradattn._io", os.path.join(list(spec.submodule_search_locations)[0], "_io.py"))
    module = importlib.util.module_from_spec(io_spec)
    io_spec.loader.exec_module(module)
    return module


def write_json(path: str, payload: dict) -> str:
    """Write ``payload`` to ``path`` whole or not at all (``gradattn._io``: a temporary file, then a
    rename; NaN and inf become null); the directory is made if missing. Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_io().write_json(payload, path)
    return path


def table(rows: list[list], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def run_main(main) -> None:
    """Run a benchmark's ``main`` and exit with its status (None is 0); a :class:`BenchmarkError` is
    one line on stderr and exit status 1."""
    try:
        code = main()
    except BenchmarkError as err:
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: FAILED: {err}\n")
        sys.exit(1)
    sys.exit(code or 0)
