"""The ``gradattn`` console script's entry point: Ctrl-C stops it cleanly from the very first moment.

It lives outside the ``gradattn`` package on purpose: importing any ``gradattn`` module first runs
the package's ``__init__`` (jax, optax, flax: over a second), and an interrupt during that import
would end in a traceback. Here the handler is in place before anything heavy is imported.

On SIGINT the command prints one line and exits with status 130 (128 + SIGINT), whatever it is
doing: importing, compiling, running or writing. The handler must not wait for the main thread,
which may be inside XLA's compiler for many seconds (raising KeyboardInterrupt there has ended in a
segmentation fault at interpreter shutdown), so Python's own signal handler only wakes a watcher
thread (``signal.set_wakeup_fd``), which exits at once with ``os._exit``. Result files are written
through a temp file and a rename, so an exit mid-write leaves the target as it was; the next write
to it removes the stale temp file.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


def _exit_on_interrupt() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, lambda signum, frame: None)  # the watcher below does the work

    def watch():
        while True:
            data = os.read(read_end, 1)
            if not data or data[0] == signal.SIGINT:
                break
        os.write(2, b"gradattn: interrupted\n")
        os._exit(130)

    threading.Thread(target=watch, name="gradattn-interrupt", daemon=True).start()


def main() -> int:
    """Install the interrupt handling, then run :func:`gradattn.cli.main`."""
    _exit_on_interrupt()
    from gradattn.cli import main as cli_main  # after the handler: this import takes over a second

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
