"""Execute the notebooks in place, with this interpreter as the kernel.

    python notebooks/run_all.py                    # full size (the committed outputs)
    GRADATTN_NB_SMALL=1 python notebooks/run_all.py  # tiny sizes, seconds to minutes
    python notebooks/run_all.py dynamics.ipynb     # just one

Sizes are read by each notebook's first code cell from environment variables
(GRADATTN_NB_SMALL, GRADATTN_NB_SEEDS, GRADATTN_NB_STEPS, GRADATTN_NB_SEQ_LEN, GRADATTN_NB_CHUNK,
GRADATTN_NB_RATIO_SEEDS); the kernel inherits this process's environment.

The kernel is started from a kernelspec written on the fly whose argv is ``sys.executable``, so
the notebooks run in the same environment as this script (the installed ``python3`` spec would
run whatever ``python`` is first on PATH).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = ("laws.ipynb", "em_vs_sgd.ipynb", "dynamics.ipynb", "deep.ipynb")
KERNEL_NAME = "gradattn-current-python"


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
    parser.add_argument("--no-write", action="store_true", help="execute without saving the outputs")
    args = parser.parse_args(argv)
    names = args.notebooks or list(NOTEBOOKS)
    for name in names:
        path = pathlib.Path(name)
        if not path.is_absolute() and not path.exists():
            path = HERE / name
        if not path.exists():
            print(f"run_all: no notebook {name}", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        execute(path, timeout=args.timeout, write=not args.no_write)
        print(f"{path.name}: executed in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
