"""Result files are written whole or not at all: a temp file in the same directory, then a rename.

Temp files are named ``.<target name>.gradattn-<pid>-<random>.tmp``, so they are recognisably
ours and name the process that wrote them. A process killed during its final write (SIGKILL leaves
no chance to clean up) leaves one behind; the next write to the same target removes those whose
process is gone, and never one whose writer is still running (concurrent runs to one path each
finish whole).
"""

from __future__ import annotations

import glob
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable
from typing import IO

_TAG = ".gradattn-"


def resolve_target(path: str | os.PathLike) -> str:
    """The regular file that a write to ``path`` replaces: ``path`` itself, or, for a symlink, the
    file it points to (so the link stays a link).

    Raises:
      ValueError: ``path`` is empty or ends in a path separator; the target exists and is not a
        regular file (a directory, a device node, a FIFO, a socket), or is a symlink whose target is
        one of those or dangles into a missing directory; or the operating system refuses to look
        the path up (a symlink loop, a name longer than it allows, a directory it may not search).
        The message is one line naming the path and the reason.
    """
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("'' is an empty path; give the path of a file")
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise ValueError(f"{path!r} ends in a path separator, so it names a directory; give the path of a file")
    try:
        real = os.path.realpath(path) if os.path.islink(path) else path
        try:
            mode = os.stat(real).st_mode
        except (FileNotFoundError, NotADirectoryError):
            directory = os.path.dirname(os.path.abspath(real))
            if not os.path.isdir(directory):
                raise ValueError(f"{path!r}: directory {directory!r} does not exist") from None
            return real
    except OSError as err:  # ELOOP, ENAMETOOLONG, EACCES, ...
        raise ValueError(f"{path!r}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"{path!r} is {kind}; refusing to replace it (give the path of a regular file)")
    return real


def check_output_path(path: str | os.PathLike) -> str:
    """The file a later :func:`atomic_write` to ``path`` will replace (:func:`resolve_target`),
    after making sure it can: a temp file is created beside the target and removed at once.

    This is the up-front check of a command's output paths, so that a run is not started whose
    results could not be saved. Creating the probe is the only reliable test: permission bits do
    not tell (``/proc`` and ``/sys`` look writable to root, a read-only mount looks writable to its
    owner).

    Raises:
      ValueError: one line naming ``path`` and the reason (see :func:`resolve_target`; a directory
        in which no file can be created).
    """
    target = resolve_target(path)
    directory, name = os.path.split(os.path.abspath(target))
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=f".{name}{_TAG}{os.getpid()}-", suffix=".tmp")
    except OSError as err:
        raise ValueError(f"{os.fspath(path)!r}: cannot create a file in directory {directory!r}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Remove the temp files of earlier writes to ``path`` whose writing process no longer exists.

    Returns the removed paths.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}{_TAG}*.tmp")):
        pid_text = os.path.basename(tmp)[len(name) + 1 + len(_TAG):].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            try:
                os.unlink(tmp)
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it to ``path``.

    ``path`` must be a regular file or not exist yet; a symlink is followed and its target replaced
    (:func:`resolve_target`). On any error the temp file is removed and ``path`` is left as it was.
    The file gets the ordinary permissions of the process umask (``mkstemp`` alone would leave it
    0600). Stale temp files of the same target are removed first (:func:`remove_stale_temps`).
    """
    target = resolve_target(path)
    remove_stale_temps(target)
    directory, name = os.path.split(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}{_TAG}{os.getpid()}-", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def finite_json(obj):
    """``obj`` with every non-finite float (a diverged run) replaced by None, i.e. JSON null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` whole or not at all (NaN and inf written as null)."""

    def write(f):
        json.dump(finite_json(obj), f, indent=1, allow_nan=False)
        f.write("\n")

    atomic_write(path, write)
