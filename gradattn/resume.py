"""The directory of finished sweep chunks that lets a stopped sweep resume where it stopped.

A checkpoint directory holds one manifest and one file per finished call:

* ``manifest.json``: the sweep's *fingerprint* (a JSON dict from the caller naming everything the
  experiment depends on: its config, task, library version) together with what the engine itself
  knows changes results: the chunk size, the PRNG implementation, the shapes and dtypes of one
  seed's output, the jax and jaxlib versions, the backend and the x64 flag. A directory whose
  manifest differs in anything is refused with a :class:`SweepRefused` (a ValueError) naming the
  differences: results of another configuration are never mixed in.
* ``chunk-<hash>.npz``: the per-seed results of one finished call (each seed's raw key data and
  its output leaves), written whole or not at all (a temp file beside it, then ``os.replace``),
  behind a one-line header carrying the SHA-256 of the payload and of the manifest. A file that
  cannot be read, whose checksum does not match, or whose arrays do not have the manifest's
  shapes (a disk error, a truncated copy) is reported with a warning, removed and its seeds
  recomputed. A chunk carrying another manifest's hash (copied in from another directory) is
  refused like a foreign manifest.

Results are keyed by each seed's key data, not by position, so a rerun with more seeds reuses
every seed already on disk. Temp files that a killed run leaves behind (``.<name>.gradattn-tmp-*``)
are never read; the next run on the same host removes those whose process is gone.

A write that fails (a full disk, a file system that turned read-only, a permission taken away)
stops the sweep at once with a :class:`CheckpointWriteError` (an OSError carrying the cause's
``errno``) whose message is one line naming the directory and the cause. Every chunk written before
stays valid: a chunk or the manifest is on disk whole or not at all, and the temp file of the failed
write is removed (where the file system still allows it; otherwise the next run removes it). No
results are returned for the incomplete sweep, so the command line writes no ``--out`` or ``--plot``
for it (they would hold only some of the seeds) and exits with status 1: rerunning the same command
with the same directory once it can be written computes only the missing seeds and writes the
results of the whole sweep, equal to an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import re
import secrets
import socket
import warnings
import zipfile
from typing import Any

import numpy as np

from gradattn._io import process_alive, replace_whole

FORMAT = "gradattn-sweep-chunks 1"
MANIFEST = "manifest.json"
_CHUNK_PREFIX = "chunk-"
_CHUNK_SUFFIX = ".npz"
_MAGIC = b"gradattn-sweep-chunk 1"
_TMP = ".gradattn-tmp-"


class SweepRefused(ValueError):
    """A sweep refused before it computed anything: its checkpoint directory holds another
    configuration's results (or cannot be used), or the processes of one run were given different
    sweeps. The message is one line saying what differs and what to do."""


class CheckpointWriteError(OSError):
    """A checkpoint directory could not be written (a full disk, a read-only file system): the sweep
    stopped there. The chunks already in the directory are valid, and a rerun with the same
    directory computes only the missing seeds (see the module docstring).

    An OSError with the cause's ``errno`` and ``strerror``; ``directory`` is the checkpoint
    directory and ``filename`` the file that could not be written. ``str()`` is one line naming the
    directory and the cause.
    """

    def __init__(self, message: str, directory: str, cause: OSError, filename: str | None = None):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.message = message
        self.directory = directory
        self.cause = cause
        self.filename = filename

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return type(self), (self.message, self.directory, self.cause, self.filename)


def _write_error(action: str, directory: str, err: OSError, path: str | None, kept: int | None) -> CheckpointWriteError:
    """The :class:`CheckpointWriteError` of a failed change to ``directory`` (``action``: what could
    not be done, ending in the directory's role); ``kept``: the chunk files still there, None when
    they cannot be counted, -1 before the sweep started (nothing computed)."""
    reason = " ".join((err.strerror or str(err) or type(err).__name__).split())
    code = errno.errorcode.get(err.errno) if isinstance(err.errno, int) else None
    cause = f"{reason} ({code})" if code else reason
    if kept == -1:
        after = "nothing was computed"
    else:
        there = (
            "the chunks finished before are kept"
            if kept is None
            else f"the {kept} finished chunk file{'' if kept == 1 else 's'} already there {'is' if kept == 1 else 'are'} kept"
        )
        after = f"{there}, and a rerun of the same sweep with this directory, once it can be written, computes only the missing seeds"
    return CheckpointWriteError(f"cluster_sweep: cannot {action} {directory!r}: {cause}; {after}", directory, err, path)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def _write_replace(path: str, data: bytes) -> None:
    """``data`` to ``path`` whole or not at all: a temp file beside it, fsync, ``os.replace``
    (:func:`gradattn._io.replace_whole`).

    The temp name carries the host and the pid (``.<name>.gradattn-tmp-<host>-<pid>-<random>``),
    so that processes of several hosts sharing one directory never take each other's temp files for
    stale ones (:func:`_remove_stale_temps` only removes this host's, of processes that are gone).
    """
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}{_TMP}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")
    replace_whole(path, tmp, lambda f: f.write(data), binary=True)


def _remove_stale_temps(directory: str) -> None:
    """Remove the temp files that killed processes of this host left in ``directory``."""
    prefix = f"{_TMP}{_host()}-"
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".*{_TMP}*")):
        rest = os.path.basename(tmp).split(prefix, 1)
        if len(rest) != 2 or not rest[1].split("-", 1)[0].isdigit():
            continue
        if process_alive(int(rest[1].split("-", 1)[0])):
            continue
        try:
            os.unlink(tmp)
        except OSError:  # gone already, or a read-only directory: never read either way
            pass


def canonical(obj: Any, name: str = "fingerprint", fn: str = "cluster_sweep") -> Any:
    """``obj`` through a JSON round trip (tuples become lists), so it compares as it will read back.

    Raises:
      TypeError: ``obj`` is not JSON-able (a set, an array, an object), or holds a non-finite float.
    """
    try:
        return json.loads(json.dumps(obj, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{fn}: {name} must be a JSON-able dict (str keys; str, number, bool, None, list, dict values), got {obj!r}: {e}") from None


def digest(manifest: dict) -> str:
    """The SHA-256 of a manifest's canonical JSON (what every chunk file carries)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": leaf}``."""
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def _differences(old: dict, new: dict, limit: int = 6) -> str:
    a, b = _flat(old), _flat(new)
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {a.get(k, '(absent)')!r} on disk, {b.get(k, '(absent)')!r} now" for k in keys if a.get(k, "(absent)") != b.get(k, "(absent)")]
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


class ChunkStore:
    """An opened, validated checkpoint directory (see the module docstring). Made by :func:`open_store`."""

    def __init__(self, directory: str, manifest: dict):
        self.directory = directory
        self.manifest = manifest
        self.digest = digest(manifest)

    def chunk_paths(self) -> list[str]:
        """The chunk files now in the directory, sorted by name."""
        pattern = os.path.join(glob.escape(self.directory), f"{_CHUNK_PREFIX}*{_CHUNK_SUFFIX}")
        return sorted(glob.glob(pattern))

    def write(self, keys: np.ndarray, leaves: list[np.ndarray]) -> str:
        """Write one finished call: ``keys`` (m, key_width) uint32 key data, ``leaves`` each (m, ...).

        The file name is the hash of the keys, so a recomputed chunk replaces its own old file.
        Returns the path.

        Raises:
          CheckpointWriteError: the file could not be written (a full disk, a read-only file
            system); nothing of it is left in the directory.
        """
        keys = np.ascontiguousarray(keys, dtype=np.uint32)
        buf = io.BytesIO()
        arrays = {"manifest": np.array(self.digest), "keys": keys}
        arrays.update({f"out_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
        np.savez(buf, allow_pickle=False, **arrays)  # no pickles: load() reads with allow_pickle=False
        payload = buf.getvalue()
        header = _MAGIC + b" " + hashlib.sha256(payload).hexdigest().encode() + b"\n"
        name = f"{_CHUNK_PREFIX}{hashlib.sha256(keys.tobytes()).hexdigest()[:32]}{_CHUNK_SUFFIX}"
        path = os.path.join(self.directory, name)
        try:
            _write_replace(path, header + payload)
        except OSError as err:
            raise self._failed(f"write the chunk {name} in", err, path) from err
        return path

    def _failed(self, action: str, err: OSError, path: str) -> CheckpointWriteError:
        try:
            kept: int | None = len(self.chunk_paths())
        except OSError:
            kept = None
        return _write_error(f"{action} checkpoint_dir", self.directory, err, path, kept)

    def _read(self, path: str, leaf_specs: list[tuple[tuple, str]], key_width: int):
        """(keys, leaves) of one chunk file, or None with a reason when it is unusable."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return None, f"unreadable ({e})"
        head, sep, payload = data.partition(b"\n")
        parts = head.split(b" ")
        if not sep or len(parts) != 3 or b" ".join(parts[:2]) != _MAGIC:
            return None, "no valid header (truncated or not a chunk file)"
        if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
            return None, "checksum mismatch (truncated or damaged)"
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            return None, f"unreadable payload ({e})"
        if str(arrays.get("manifest")) != self.digest:
            raise SweepRefused(
                f"cluster_sweep: {path} was written by another configuration (manifest hash {arrays.get('manifest')!s}, "
                f"this directory's is {self.digest}); refusing to mix it in: remove it or use another checkpoint directory"
            )
        keys = arrays.get("keys")
        if keys is None or keys.dtype != np.uint32 or keys.ndim != 2 or keys.shape[1] != key_width or keys.shape[0] == 0:
            return None, "bad key array"
        m = keys.shape[0]
        leaves = []
        for i, (shape, dtype) in enumerate(leaf_specs):
            a = arrays.get(f"out_{i}")
            if a is None or a.shape != (m, *shape) or str(a.dtype) != dtype:
                return None, f"output {i} missing or of the wrong shape/dtype"
            leaves.append(a)
        if len(arrays) != 2 + len(leaf_specs):
            return None, "unexpected arrays"
        return (keys, leaves), None

    def load(self) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Every usable chunk as ``(keys, leaves)``; unusable ones are warned about and removed.

        Raises:
          SweepRefused: a chunk carries another manifest's hash.
          CheckpointWriteError: an unusable chunk cannot be removed (a read-only file system).
        """
        specs = [(tuple(s), d) for s, d in self.manifest["sweep"]["outputs"]["leaves"]]
        width = self.manifest["sweep"]["key_width"]
        chunks = []
        for path in self.chunk_paths():
            chunk, why = self._read(path, specs, width)
            if chunk is None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    raise self._failed(f"remove the damaged chunk {os.path.basename(path)} ({why}) from", err, path) from err
                warnings.warn(f"cluster_sweep: checkpoint chunk {path} is {why}; removed, its seeds will be recomputed", RuntimeWarning, stacklevel=3)
                continue
            chunks.append(chunk)
        return chunks


def open_store(directory: str | os.PathLike, manifest: dict) -> ChunkStore:
    """Open ``directory`` as the checkpoint of the sweep described by ``manifest`` (create it if need be).

    ``manifest`` must be canonical (:func:`canonical`) with the keys ``format``, ``fingerprint`` and
    ``sweep`` (``sweep.outputs.leaves``: ``[[shape, dtype], ...]``; ``sweep.key_width``).

    Raises:
      SweepRefused (a ValueError): ``directory`` is not a directory; its manifest differs from
        ``manifest`` (the message lists the differing fields); it holds chunk files but no
        manifest; its manifest cannot be read.
      CheckpointWriteError (an OSError): ``directory`` cannot be created, or its manifest cannot
        be written (a full disk, a read-only file system).
    """
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SweepRefused(f"cluster_sweep: checkpoint_dir {directory!r} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise _write_error("create checkpoint_dir", directory, err, directory, -1) from err
    _remove_stale_temps(directory)
    store = ChunkStore(directory, manifest)
    path = os.path.join(directory, MANIFEST)
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise SweepRefused(f"cluster_sweep: cannot read the checkpoint manifest {path} ({e}); remove the directory or use another") from None
        if old != manifest:
            raise SweepRefused(
                f"cluster_sweep: checkpoint_dir {directory!r} holds a sweep of another configuration; refusing to mix it in "
                f"({_differences(old, manifest)}). Use another directory, or remove this one to start over."
            )
        return store
    if store.chunk_paths():
        raise SweepRefused(
            f"cluster_sweep: checkpoint_dir {directory!r} holds chunk files but no {MANIFEST}; their configuration is unknown, "
            "refusing to mix them in (use another directory)"
        )
    try:
        _write_replace(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    except OSError as err:
        raise _write_error(f"write {MANIFEST} in checkpoint_dir", directory, err, path, -1) from err
    return store
