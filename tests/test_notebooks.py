"""Execute every notebook at tiny sizes (GRADATTN_NB_SMALL=1) and fail on any cell error.

The kernel runs this interpreter (notebooks/run_all.py writes a kernelspec pointing at
``sys.executable``); each notebook prints ``python: <sys.executable>`` in its first code cell and
the test checks it, so the notebooks are tested against the installed package, not another one.
"""

import importlib.util
import os
import pathlib
import shutil
import sys

import ipykernel  # noqa: E402,F401
import nbclient  # noqa: E402,F401  (declared in the dev extra: a missing one fails, never skips)
import pytest

NB_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def _run_all():
    spec = importlib.util.spec_from_file_location("notebooks_run_all", NB_DIR / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RUN_ALL = _run_all()


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_ALL.NOTEBOOKS)
def test_notebook_runs_at_small_size(name, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADATTN_NB_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for var in ("GRADATTN_NB_SEEDS", "GRADATTN_NB_STEPS", "GRADATTN_NB_SEQ_LEN", "GRADATTN_NB_CHUNK", "GRADATTN_NB_RATIO_SEEDS"):
        monkeypatch.delenv(var, raising=False)
    # Run a copy: the committed notebook keeps its full-size outputs.
    copy = tmp_path / name
    shutil.copy(NB_DIR / name, copy)
    nb = RUN_ALL.execute(copy, timeout=900, write=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "stream"
    )
    assert f"python: {sys.executable}" in text or f"python: {os.path.realpath(sys.executable)}" in text, text[:500]
    n_figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert n_figures >= 3, f"{name} drew {n_figures} figures"
