"""Where a result came from: code version, library versions, machine and time, as a JSON-ready dict.

    prov = provenance()          # at the start of a run
    ...                          # the run
    finish(prov)                 # adds the end time and the wall time
    results["provenance"] = prov
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
import time

import jax

from gradattn._version import __version__

_PACKAGES = ("gradattn", "jax", "jaxlib", "optax", "flax", "numpy")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(path: str | None = None) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git checkout holding ``path``.

    ``path`` defaults to the installed ``gradattn`` package's directory; both are ``None`` when it
    is not inside a git work tree (an installed wheel) or git is not available. ``dirty`` is True
    when tracked files differ from the commit (untracked files do not count).
    """
    if path is None:
        path = os.path.dirname(os.path.abspath(__file__))
    commit = _git(["rev-parse", "HEAD"], path)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], path)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_model() -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()`` or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def provenance(start_time: float | None = None) -> dict:
    """A JSON-ready record of what produced a result.

    Args:
      start_time: the run's start as ``time.time()`` seconds; now by default.
    Returns:
      ``{"versions": {gradattn, jax, jaxlib, optax, flax, numpy, python}, "git": {"commit", "dirty"},
      "backend": jax's default backend, "devices": {"platform", "kind", "count"}, "cpu": model name,
      "cpus": logical CPU count, "host_platform": platform.platform(), "command": sys.argv,
      "start_time": ISO 8601 UTC, "start_timestamp": seconds since the epoch}``. Versions are
      ``None`` for packages not installed. Pass it to :func:`finish` when the run ends.
    """
    start = time.time() if start_time is None else float(start_time)
    devices = jax.devices()
    versions = {name: _version(name) for name in _PACKAGES}
    if versions["gradattn"] is None:  # running from a source tree that is not installed
        versions["gradattn"] = __version__
    versions["python"] = platform.python_version()
    return {
        "versions": versions,
        "git": git_state(),
        "backend": jax.default_backend(),
        "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices)},
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "host_platform": platform.platform(),
        "command": list(sys.argv),
        "start_time": _dt.datetime.fromtimestamp(start, _dt.UTC).isoformat(timespec="seconds"),
        "start_timestamp": start,
    }


def finish(prov: dict, end_time: float | None = None) -> dict:
    """Add ``end_time`` (ISO 8601 UTC) and ``wall_time_s`` (seconds since the start) to ``prov``, in
    place, and return it. ``end_time`` as ``time.time()`` seconds; now by default."""
    end = time.time() if end_time is None else float(end_time)
    prov["end_time"] = _dt.datetime.fromtimestamp(end, _dt.UTC).isoformat(timespec="seconds")
    prov["wall_time_s"] = end - prov["start_timestamp"]
    return prov
