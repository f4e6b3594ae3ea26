"""Shared plumbing for the benchmarks: worker subprocesses, alternating rounds, atomic JSON.

Each variant under test lives in its own worker process (its own JAX or torch runtime, its own
compiled code, its own memory), started once. The parent then runs rounds; in each round it asks
every worker in turn to time a few steps, so slow drifts of a shared machine hit all variants
alike. Figures are medians over rounds.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class Worker:
    """A subprocess running ``python <script> --worker <spec as JSON>``, spoken to in JSON lines."""

    def __init__(self, script: str, spec: dict):
        self.spec = spec
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        self.proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1,
        )
        self.ready = self._read()  # the worker's first line: set-up facts (compile time, ...)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec} died (exit code {self.proc.wait()})")
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        finally:
            self.proc.wait(timeout=60)


def serve(setup, timed) -> None:
    """Worker side: ``setup() -> dict`` once, then answer each request with ``timed(**request)``."""
    print(json.dumps(setup()), flush=True)
    for line in sys.stdin:
        print(json.dumps(timed(**json.loads(line))), flush=True)


def alternate(workers: dict[str, Worker], rounds: int, **request) -> dict[str, list[dict]]:
    """``rounds`` rounds; in each, every worker answers ``request`` once (order rotates per round).

    Returns each worker's answers, one dict per round (each has at least ``seconds``).
    """
    names = list(workers)
    out = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            out[name].append(workers[name].ask(**request))
    return out


def median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=float)))


def machine() -> dict:
    """What the figures were measured on."""
    import jax

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(name: str, payload: dict) -> str:
    """Write ``results/<name>`` whole or not at all (temporary file, then rename)."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
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
