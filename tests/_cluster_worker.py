"""One process of a test sweep, run as a script by tests/test_cluster.py and tests/test_resume.py.

``python tests/_cluster_worker.py '<json>'`` with the keys:
  mode: "ref" (gradattn.sweeps.sweep in this one process) or "cluster" (gradattn.cluster.cluster_sweep);
  seeds, chunk_size, out (an .npz path this process writes its whole result to);
  seeds_by_process (optional): {"<process id>": seeds} overriding seeds for some processes;
  coordinator, num_processes, process_id (optional: join a multi-process run);
  checkpoint_dir, fingerprint (optional); checkpoint_dir_by_process (optional): {"<process id>": dir};
  pause (seconds each call sleeps on the host);
  exit_before_sweep: "crash" (os._exit(3)) or "exit" (a clean sys.exit(0)) before the sweep;
  crash_after_calls: k (os._exit(3) in the middle of its (k+1)-th call); both in process exit_process (1);
  kill: "sigkill" to die by SIGKILL instead of os._exit(3).
It prints one JSON line: the process id, the sweep's wall time and the process's.
"""

import json
import os
import signal
import sys
import time

T0 = time.perf_counter()
ARGS = json.loads(sys.argv[1])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gradattn import cluster  # noqa: E402
from gradattn.sweeps import sweep  # noqa: E402

if ARGS.get("coordinator"):
    cluster.initialize(
        ARGS["coordinator"], ARGS["num_processes"], ARGS["process_id"],
        initialization_timeout=60, heartbeat_timeout=5, shutdown_timeout=10,
    )

PAUSE = float(ARGS.get("pause", 0.0))
CRASH_AFTER = ARGS.get("crash_after_calls") if ARGS.get("process_id") == ARGS.get("exit_process", 1) else None
CALLS = [0]


def _die():
    if ARGS.get("kill") == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


def _pause():
    CALLS[0] += 1
    if CRASH_AFTER is not None and CALLS[0] > CRASH_AFTER:
        _die()  # a node lost in the middle of the sweep
    time.sleep(PAUSE)


def fn(key):
    """Random numbers, a matmul, a nonlinearity, an integer count and a bool: cheap to compile."""
    k1, k2 = jax.random.split(key)
    a = jax.random.normal(k1, (6, 6))
    b = jax.random.uniform(k2, (6,))
    jax.debug.callback(_pause)
    h = jnp.tanh(a @ a.T + b)
    return {"h": h.sum(0), "norm": jnp.sqrt((h * h).sum()), "pos": (a > 0).sum(), "big": h.max() > 0.99}


if ARGS.get("exit_before_sweep") and ARGS.get("process_id") == ARGS.get("exit_process", 1):
    print(json.dumps({"process": ARGS.get("process_id"), "exiting": ARGS["exit_before_sweep"]}), flush=True)
    if ARGS["exit_before_sweep"] == "crash":
        _die()
    sys.exit(0)

SEEDS = ARGS.get("seeds_by_process", {}).get(str(ARGS.get("process_id")), ARGS["seeds"])
t = time.perf_counter()
if ARGS["mode"] == "ref":
    out = sweep(fn, SEEDS, chunk_size=ARGS["chunk_size"])
else:
    out = cluster.cluster_sweep(
        fn, SEEDS, chunk_size=ARGS["chunk_size"],
        checkpoint_dir=ARGS.get("checkpoint_dir_by_process", {}).get(str(ARGS.get("process_id")), ARGS.get("checkpoint_dir")),
        fingerprint=ARGS.get("fingerprint"),
    )
sweep_s = time.perf_counter() - t
np.savez(ARGS["out"], **out)
print(json.dumps({
    "process": jax.process_index(), "processes": jax.process_count(), "local_devices": jax.local_device_count(),
    "primary": cluster.is_primary(), "sweep_s": sweep_s, "process_s": time.perf_counter() - T0,
}), flush=True)
