"""Spawning tests/_cluster_worker.py processes: a free local port, bounded waits, parsed reports."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_cluster_worker.py")
_LAUNCHER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                  "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS", "XLA_FLAGS")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    e.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONUNBUFFERED="1")
    return e


def start(args: dict, devices: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, json.dumps(args)], env=env(devices), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: list, timeout: float) -> list[dict]:
    """Wait for every process (``timeout`` seconds in all; then kill them all and raise)."""
    deadline = time.monotonic() + timeout
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            report = next((json.loads(line) for line in reversed(out.splitlines()) if line.startswith("{")), {})
            done.append({"rc": p.returncode, "out": out, "err": err, "report": report, "at": time.monotonic()})
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate(timeout=30)
        raise AssertionError(f"worker processes still running after {timeout} s") from None
    return done


def run_one(args: dict, devices: int = 1, timeout: float = 180) -> dict:
    (r,) = finish([start(args, devices)], timeout)
    assert r["rc"] == 0, r["err"][-3000:]
    return r


def run_cluster(args: dict, devices: list[int], timeout: float = 240) -> list[dict]:
    """``len(devices)`` processes of one run on 127.0.0.1, process i with ``devices[i]`` host devices."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        start(dict(args, coordinator=coordinator, num_processes=len(devices), process_id=i, out=f"{args['out']}.{i}.npz"), n)
        for i, n in enumerate(devices)
    ]
    return finish(procs, timeout)


def load(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


LOST = ("another process of the run has most likely died or been stopped", "died or was stopped (its connection",
        "left the run before the sweep ended", "process 0 stopped the run")
"""The phrases of gradattn.cluster's one-line messages for a process of the run that is gone."""


def says_a_process_was_lost(text: str) -> bool:
    return any(phrase in text for phrase in LOST)
