"""The gradattn command run in the test's own process, shared by the command-line tests."""

from gradattn import cli

TINY = ["--steps", "4", "--seq-len", "24", "--no-progress"]
"""Flags that make any experiment command a run of seconds."""


def cli_run(argv, capsys):
    """``cli.main(argv)`` -> (exit code, stdout, stderr), whether it returns or raises SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
