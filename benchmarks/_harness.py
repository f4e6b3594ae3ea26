"""Shared plumbing for the benchmarks: worker subprocesses, alternating rounds, machine facts, JSON.

Each variant under test lives in its own worker process (its own JAX or torch runtime, its own
compiled code, its own memory), started once. The parent then runs rounds; in each round it asks
every worker in turn to time a few steps, so slow drifts of a shared machine hit all variants
alike. Figures are medians over rounds.

Failure policy: a worker that dies, or answers with an error, stops the whole benchmark with a
non-zero exit status (:class:`BenchmarkError`); no variant is ever replaced by another or dropped
without being named in the output. The parent process never initialises a JAX backend itself (on a
GPU that would reserve memory the workers need); machine facts come from a probe subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata

import numpy as np

from gradattn.provenance import cpu_model, git_state

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT_DIR = os.path.join(HERE, "results")
PLATFORMS = ("cpu", "gpu", "tpu")


class BenchmarkError(RuntimeError):
    """A worker failed or a check did not hold: the benchmark stops with a non-zero exit status."""


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """``--platform``, ``--out-dir`` and the hidden ``--worker`` option shared by every script."""
    ap.add_argument("--platform", choices=PLATFORMS, default=None,
                    help="JAX backend to run on (default: JAX's default backend on this machine)")
    ap.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"where the results JSON goes (default {DEFAULT_OUT_DIR})")
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


def median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


def rel_err(a, ref) -> float:
    """``max |a - ref| / max |ref|`` over all entries (the error measure of every check)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape:
        return float("inf")
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), np.finfo(np.float64).tiny))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    state = git_state(REPO)
    if state["commit"] is None:
        return None
    return state["commit"] + ("+uncommitted changes" if state["dirty"] else "")


_PROBE = """
import json, jax
d = jax.devices()
print(json.dumps({"jax_backend": jax.default_backend(), "device_kind": d[0].device_kind,
                  "device_count": len(d), "platform": d[0].platform}))
"""


def probe_backend(env: dict) -> dict:
    """The JAX backend and devices a worker with ``env`` sees (run in a subprocess)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise BenchmarkError(f"JAX could not start with JAX_PLATFORMS={env.get('JAX_PLATFORMS')!r}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(backend: dict) -> dict:
    """What the figures were measured on: devices, CPU, versions, load, time, commit."""
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


def write_json(out_dir: str, name: str, payload: dict) -> str:
    """Write ``<out_dir>/<name>`` whole or not at all (temporary file, then rename)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def table(rows: list[list], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    line = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def run_main(main) -> None:
    """Run a benchmark's ``main``; a :class:`BenchmarkError` is one line on stderr and exit status 1."""
    try:
        main()
    except BenchmarkError as err:
        sys.stderr.write(f"{os.path.basename(sys.argv[0])}: FAILED: {err}\n")
        sys.exit(1)
