"""JAX's persistent compilation cache, switched on so that a full disk cannot spoil it.

JAX writes each cache entry in place, ``<module>-<hash>-cache`` in the cache directory (the
compressed executable: zstd where JAX has it, else zlib), with no temp file and rename. A disk that
fills up, or a process killed mid-write, leaves a 0-byte or truncated entry behind; JAX never
rewrites an entry that exists and fails to read this one on every later run, with one warning of
two lines per program (22 for a run of ``gradattn em-vs-sgd``).

:func:`enable` therefore

* first removes the entries that JAX could not read back: empty files, and files whose compressed
  stream does not decompress whole (truncated or damaged; decompressed with JAX's own
  decompressor, so with the format JAX itself writes). Only entries written since the previous
  check are read (the check leaves a stamp file, ``.gradattn-checked``, whose time is that of its
  start), so a large cache costs a directory listing; a new entry another process is writing at
  that moment may be taken for a partial one and removed, which only costs compiling it again;
* then turns the cache on in that directory (every program kept, however quick to compile);
* and keeps the cache's errors to one line per process: JAX's first "Error reading/writing
  persistent compilation cache entry" warning is shown as one line on stderr (the directory and
  the cause), and every later one is dropped. Programs whose entry cannot be read or written are
  compiled as usual, so results never change.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
import warnings

import jax

_SUFFIX = "-cache"  # JAX's entry file suffix (jax/_src/lru_cache.py)
_ATIME_SUFFIX = "-atime"  # its access-time companion, written only when JAX evicts by size
STAMP = ".gradattn-checked"
"""The file in the cache directory whose modification time is when the last check of its entries began."""
_SLACK_NS = 10 * 60 * 10**9  # entries up to 10 minutes older than the stamp are checked again (clock skew)
_CACHE_ERROR = re.compile(r"Error (reading|writing) persistent compilation cache entry")
_MAX_LINE = 300

_lock = threading.Lock()
_hook: dict = {"installed": None, "previous": None, "shown": False, "path": None}


def _readable(data: bytes) -> bool:
    """Whether JAX could read ``data`` back as an entry: its compressed stream decompresses whole."""
    try:
        from jax._src import compilation_cache
    except ImportError:  # another jax layout: only empty entries are detected
        return bool(data)
    decompress = getattr(compilation_cache, "decompress_executable", None)
    if decompress is None:
        return bool(data)
    try:
        return len(decompress(data)) >= 4  # a 4-byte compile time, then the executable
    except Exception:  # zlib.error, a zstd error: truncated or damaged
        return False


def remove_partial_entries(path: str | os.PathLike) -> list[str]:
    """Remove the entries of the cache in ``path`` that JAX could not read back (empty, truncated
    or damaged), with their access-time files; returns the removed entry paths.

    Only entries modified since the previous check (the time of :data:`STAMP`, less 10 minutes
    for clock skew) are read; the stamp is then advanced to the start of this check. A file that
    cannot be removed (a read-only directory) is left; nothing here raises for the file system.
    """
    path = os.fspath(path)
    stamp = os.path.join(path, STAMP)
    try:
        since: int | None = os.stat(stamp).st_mtime_ns - _SLACK_NS
    except OSError:
        since = None
    started = time.time_ns()
    removed: list[str] = []
    try:
        entries = list(os.scandir(path))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.endswith(_SUFFIX):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            if st.st_size and since is not None and st.st_mtime_ns < since:
                continue  # checked before
            if st.st_size:
                with open(entry.path, "rb") as f:
                    data = f.read()
                if _readable(data):
                    continue
        except OSError:
            pass  # unreadable: JAX could not read it either
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.path)
        with contextlib.suppress(OSError):
            os.unlink(entry.path[: -len(_SUFFIX)] + _ATIME_SUFFIX)
    with contextlib.suppress(OSError):
        with open(stamp, "ab"):
            pass
        os.utime(stamp, ns=(started, started))
    return removed


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_LINE else text[: _MAX_LINE - 3] + "..."


def _showwarning(message, category, filename, lineno, file=None, line=None):
    """``warnings.showwarning`` with JAX's cache errors cut to one line, the first one only."""
    text = str(message)
    if _CACHE_ERROR.search(text) is None:
        return _hook["previous"](message, category, filename, lineno, file, line)
    with _lock:
        first, _hook["shown"] = not _hook["shown"], True
    if first:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            print(
                f"gradattn: warning: compilation cache {_hook['path']!r}: {_one_line(text)}; compiling as usual "
                "(further cache errors of this run are not shown)",
                file=file if file is not None else sys.stderr,
            )
    return None


def quiet_cache_errors(path: str) -> None:
    """Show JAX's persistent-cache error warnings of this process as one line, the first one only
    (installed once per process; ``path`` is the directory the line names)."""
    with _lock:
        _hook["path"] = path
        if warnings.showwarning is _hook["installed"]:
            return
        _hook["previous"] = warnings.showwarning
        _hook["installed"] = _showwarning
        warnings.showwarning = _showwarning


def enable(path: str | os.PathLike) -> bool:
    """Turn JAX's persistent compilation cache on in ``path`` (created if need be), after removing
    the entries a full disk or a killed process left partial (:func:`remove_partial_entries`), with
    its errors shown as one line per process (:func:`quiet_cache_errors`).

    Returns False, leaving the cache off, when ``path`` cannot be created or written to; True
    otherwise. The cache is process-wide: every later compilation of this process uses it.
    """
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    remove_partial_entries(path)
    quiet_cache_errors(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _reset_jax_cache()
    return True


def _reset_jax_cache() -> None:
    """Make JAX open the cache afresh at its next compilation (it opens it once per process and
    remembers whether it was on), so that enabling it takes effect after earlier compilations too."""
    try:
        from jax.experimental.compilation_cache import compilation_cache
    except ImportError:
        return
    reset = getattr(compilation_cache, "reset_cache", None)
    if reset is not None:
        reset()
