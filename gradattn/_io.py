"""Result files are written whole or not at all: a temp file in the same directory, then a rename.

Temp files are named ``.<target name>.gradattn-<pid>-<random>.tmp``, so they are recognisably
ours and name the process that wrote them. A process killed during its final write (SIGKILL leaves
no chance to clean up) leaves one behind; the next write to the same target removes those whose
process is gone, and never one whose writer is still running (concurrent runs to one path each
finish whole).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from typing import IO

_TAG = ".gradattn-"


_MAX_LINKS = 40
"""Most symlinks followed in a row (Linux's limit); one more is a loop."""


def _follow_links(path: str) -> str:
    """``path`` with the symlinks at its end followed one by one as the operating system follows
    them: a relative link's text is joined to the directory of the link as given, and nothing is
    tidied as text (``a/..`` is left for the OS to resolve), so the result opens the same file."""
    for _ in range(_MAX_LINKS):
        try:
            link = os.readlink(path)
        except OSError:  # not a link, or not there: os.stat tells which
            return path
        path = os.path.join(os.path.dirname(path), link)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)


def resolve_target(path: str | os.PathLike) -> str:
    """The regular file that a write to ``path`` replaces, as an absolute path whose directory has
    every symlink and ``..`` resolved on disk: ``path`` itself, or, for a symlink, the file it
    points to (so the link stays a link).

    ``..`` is resolved by the operating system, never as text: ``missing/../r.json`` and
    ``file/../r.json`` name no file (the OS cannot pass through a missing directory or a regular
    file), and ``link/../r.json`` is beside the link's target. The result names the same file from
    any working directory, so two results are one file exactly when they are equal (or, for files
    that exist, hard links of one another: :func:`same_file`).

    Raises:
      ValueError: ``path`` is empty or ends in a path separator; the target exists and is not a
        regular file (a directory, a device node, a FIFO, a socket); the directory it would be
        created in does not exist or is not a directory (a symlink dangling into a missing
        directory included); or the operating system refuses to look the path up (a symlink loop,
        a name longer than it allows, a directory it may not search). The message is one line
        naming the path and the reason.
    """
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path:
        raise ValueError("'' is an empty path; give the path of a file")
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise ValueError(f"{path!r} ends in a path separator, so it names a directory; give the path of a file")
    try:
        target = _follow_links(path)
        directory, name = os.path.split(target)
        directory = directory or os.curdir
        try:
            mode = os.stat(target).st_mode
        except (FileNotFoundError, NotADirectoryError):
            mode = None
            try:
                is_dir = stat.S_ISDIR(os.stat(directory).st_mode)
            except FileNotFoundError:
                raise ValueError(f"{path!r}: directory {directory!r} does not exist") from None
            except NotADirectoryError:
                is_dir = False
            if not is_dir:
                raise ValueError(f"{path!r}: {directory!r} is not a directory") from None
            if not name:  # a symlink whose text ends in a separator
                raise ValueError(f"{path!r} leads to {target!r}, which names a directory; give the path of a file") from None
        real_directory = os.path.realpath(directory)  # the OS resolved it above, so this is its place
    except OSError as err:  # ELOOP, ENAMETOOLONG, EACCES, ...
        raise ValueError(f"{path!r}: {err.strerror or err}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"{path!r} is {kind}; refusing to replace it (give the path of a regular file)")
    return os.path.join(real_directory, name)


def same_file(a: str, b: str) -> bool:
    """Whether two results of :func:`resolve_target` name one file: the same path, or files that
    exist and share device and inode (hard links)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them not there yet: then only the same path is the same file
        return False


def _existing_part(text: str) -> tuple[str, list[str], os.stat_result]:
    """The longest leading part of path ``text`` that exists as the operating system resolves it
    (``..`` included, never tidied as text), the names after it, and its ``os.stat``."""
    head = text
    rest: list[str] = []
    while True:
        try:
            return head, rest, os.stat(head or os.curdir)
        except (FileNotFoundError, NotADirectoryError):
            parent, name = os.path.split(head)
            if parent == head:
                raise
            if name:
                rest.insert(0, name)
            head = parent


def _directory_parts(text: str) -> tuple[str, list[str]]:
    """:func:`_existing_part` of a directory path, checked: ValueError (one line) if a part of it
    exists and is not a directory, or a ``..`` follows a directory not there yet."""
    if not text:
        raise ValueError("'' is an empty path; give the path of a directory")
    try:
        head, rest, st = _existing_part(text)
    except OSError as err:  # ELOOP, ENAMETOOLONG, EACCES, ...
        raise ValueError(f"{text!r}: {err.strerror or err}") from None
    if not stat.S_ISDIR(st.st_mode):
        what = "exists and is not a directory" if not rest else f"cannot be created: {head or os.curdir!r} is not a directory"
        raise ValueError(f"{text!r} {what}")
    if os.pardir in rest:
        missing = os.path.join(head, rest[0])
        raise ValueError(f"{text!r}: {missing!r} does not exist, so the '..' after it names no directory")
    return head, rest


def directory_place(text: str) -> str:
    """The absolute path, every symlink and ``..`` resolved on disk, of the directory ``text`` names
    or would name once created.

    Raises:
      ValueError: one line, if it cannot be one: a part of it exists and is not a directory, a
        ``..`` follows a directory not there yet (the OS cannot resolve it), or the OS refuses to
        look it up.
    """
    return _place(*_directory_parts(text))


def _place(head: str, rest: list[str]) -> str:
    return os.path.normpath(os.path.join(os.path.realpath(head or os.curdir), *rest))


def check_directory(text: str) -> str:
    """:func:`directory_place` of ``text``, after making sure files can be created where it is (or
    where its missing part would be created): a probe file is created there and removed at once.

    Raises:
      ValueError: one line naming ``text`` and the reason.
    """
    head, rest = _directory_parts(text)
    where = head or os.curdir
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".gradattn-probe-")
    except OSError as err:
        inside = "" if not rest else f" (in {where!r}, where it would be created)"
        raise ValueError(f"{text!r}: cannot create files{inside}: {err.strerror or err}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return _place(head, rest)


def check_output_path(path: str | os.PathLike) -> str:
    """The file a later :func:`atomic_write` to ``path`` will replace (:func:`resolve_target`),
    after making sure it can: a temp file is created beside the target, by the same path that the
    write will use, and removed at once.

    This is the up-front check of a command's output paths, so that a run is not started whose
    results could not be saved. Creating the probe is the only reliable test: permission bits do
    not tell (``/proc`` and ``/sys`` look writable to root, a read-only mount looks writable to its
    owner). Pass the returned path to the write.

    Raises:
      ValueError: one line naming ``path`` and the reason (see :func:`resolve_target`; a directory
        in which no file can be created).
    """
    target = resolve_target(path)
    directory = os.path.dirname(target)
    probe = _temp_path(target)
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise ValueError(f"{os.fspath(path)!r}: cannot create a file in directory {directory!r}: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)
    return target


def _temp_path(target: str) -> str:
    """A new temp file name beside ``target``: ``.<name>.gradattn-<pid>-<random>.tmp``."""
    directory, name = os.path.split(target)
    return os.path.join(directory, f".{name}{_TAG}{os.getpid()}-{secrets.token_hex(4)}.tmp")


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (someone else's included)."""
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
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            try:
                os.unlink(tmp)
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def replace_whole(target: str, tmp: str, write: Callable[[IO], object], *, binary: bool = False) -> None:
    """Replace ``target`` whole or not at all: create the new file ``tmp`` beside it, call
    ``write(f)`` on it, fsync it, then rename it to ``target`` (``os.replace``).

    ``tmp`` gets the ordinary permissions of the process umask. On any error after it was created,
    ``tmp`` is removed where the file system still allows it (one that turned read-only does not:
    the caller's stale-temp removal takes it later) and the error is raised; ``target`` is left as
    it was. The one place in the library that renames a file onto a result.
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it to ``path``
    (:func:`replace_whole`).

    ``path`` must be a regular file or not exist yet; a symlink is followed and its target replaced
    (:func:`resolve_target`). On any error the temp file is removed and ``path`` is left as it was.
    The file gets the ordinary permissions of the process umask. Stale temp files of the same
    target are removed first (:func:`remove_stale_temps`).
    """
    target = resolve_target(path)
    remove_stale_temps(target)
    replace_whole(target, _temp_path(target), write, binary=binary)


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
