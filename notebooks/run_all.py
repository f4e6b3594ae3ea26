"""Execute the notebooks, with this interpreter as the kernel; save them only at full size, or when asked.

    python notebooks/run_all.py                      # full size: the outputs are saved in place
    GRADATTN_NB_SMALL=1 python notebooks/run_all.py  # tiny sizes, seconds to minutes: nothing saved
    GRADATTN_NB_SMALL=1 python notebooks/run_all.py --out-dir /tmp/nb  # tiny sizes, copies saved in /tmp/nb
    python notebooks/run_all.py dynamics.ipynb       # just one

Sizes are read by each notebook's first code cell from environment variables
(GRADATTN_NB_SMALL, GRADATTN_NB_SEEDS, GRADATTN_NB_STEPS, GRADATTN_NB_SEQ_LEN, GRADATTN_NB_CHUNK,
GRADATTN_NB_RATIO_SEEDS); the kernel inherits this process's environment.

Where the executed notebooks go: ``--out-dir DIR`` writes them into DIR and leaves the committed
files alone; ``--write`` overwrites the notebooks in place, ``--no-write`` saves nothing. With none
of the three, a full-size run overwrites them in place (the committed outputs are full-size ones)
and a run at other sizes (GRADATTN_NB_SMALL=1, or GRADATTN_NB_SEEDS, _STEPS, _SEQ_LEN or
_RATIO_SEEDS set) saves nothing, so that a quick check never replaces the committed outputs.

The kernel is started from a kernelspec written on the fly whose argv is ``sys.executable``, so
the notebooks run in the same environment as this script (the installed ``python3`` spec would
run whatever ``python`` is first on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = ("laws.ipynb", "em_vs_sgd.ipynb", "dynamics.ipynb", "deep.ipynb")
KERNEL_NAME = "gradattn-current-python"
# The variables that change what a notebook computes (GRADATTN_NB_CHUNK changes only the memory it uses).
SIZE_VARS = ("GRADATTN_NB_SMALL", "GRADATTN_NB_SEEDS", "GRADATTN_NB_STEPS", "GRADATTN_NB_SEQ_LEN",
             "GRADATTN_NB_RATIO_SEEDS")


def size_overrides(environ=None) -> list[str]:
    """The size variables set in ``environ`` (default ``os.environ``): empty for a full-size run."""
    environ = os.environ if environ is None else environ
    return [f"{name}={environ[name]}" for name in SIZE_VARS
            if environ.get(name, "") != "" and not (name == "GRADATTN_NB_SMALL" and environ[name] != "1")]


def execute(path, *, timeout: int = 3600, write: bool = True):
    """Run every cell of the notebook at ``path`` (cwd: its folder); returns the executed notebook.

    Raises ``nbclient.exceptions.CellExecutionError`` on the first cell that fails. With ``write``,
    the executed notebook (outputs included) replaces the file.
    """
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    path = pathlib.Path(path)
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as kernels:
        spec_dir = pathlib.Path(kernels) / KERNEL_NAME
        spec_dir.mkdir()
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (gradattn)",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        ksm = KernelSpecManager(kernel_dirs=[kernels], ensure_native_kernel=False)
        km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
        client = NotebookClient(
            nb,
            km=km,
            kernel_name=KERNEL_NAME,
            timeout=timeout,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    # Keep the generic kernelspec in the file, not the temporary one.
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if write:
        nbformat.write(nb, path)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help=f"notebooks to run (default: {', '.join(NOTEBOOKS)})")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--write", dest="write", action="store_true", default=None,
                       help="overwrite the notebooks in place with the outputs (the default at full size only)")
    where.add_argument("--no-write", dest="write", action="store_false",
                       help="execute without saving the outputs (the default when a size variable is set)")
    where.add_argument("--out-dir", type=pathlib.Path, metavar="DIR",
                       help="save the executed notebooks into DIR, leaving the originals untouched")
    parser.set_defaults(write=None)
    args = parser.parse_args(argv)
    overrides = size_overrides()
    in_place = args.write if args.write is not None else (args.out_dir is None and not overrides)
    names = args.notebooks or list(NOTEBOOKS)
    paths = []
    for name in names:
        path = pathlib.Path(name)
        if not path.is_absolute() and not path.exists():
            path = HERE / name
        if not path.exists():
            print(f"run_all: no notebook {name}", file=sys.stderr)
            return 2
        paths.append(path)
    if args.write is None and args.out_dir is None and overrides:
        print(f"run_all: sizes from {' '.join(overrides)}: the executed notebooks are not saved "
              "(--out-dir DIR saves copies there, --write overwrites the notebooks)")
    for path in paths:
        t0 = time.perf_counter()
        nb = execute(path, timeout=args.timeout, write=in_place)
        if args.out_dir is not None:
            import nbformat

            args.out_dir.mkdir(parents=True, exist_ok=True)
            target = args.out_dir / path.name
            nbformat.write(nb, target)
            saved = f"saved to {target}"
        elif in_place:
            saved = "saved in place"
        else:
            saved = "not saved"
        print(f"{path.name}: executed in {time.perf_counter() - t0:.0f} s, {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
