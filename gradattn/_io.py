"""Result files are written whole or not at all: a temp file in the same directory, then a rename."""

from __future__ import annotations

import os
import tempfile
from typing import Callable, IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False, suffix: str = "") -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it, then rename it to ``path``.

    On any error the temp file is removed and ``path`` is left as it was. The file gets the
    ordinary permissions of the process umask (``mkstemp`` alone would leave it 0600).
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=suffix)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
