"""The documentation stands alone: the API reference builds, docs/theory.md states every law and the
task's numbers as the code computes them, the licence and citation files are complete, and no file
cites material that is not in the repository."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

import gradattn
from gradattn.tasks import StickyMarkov

ROOT = pathlib.Path(__file__).resolve().parent.parent
THEORY = ROOT / "docs" / "theory.md"

LAWS = (
    "output_error",
    "upstream_grad",
    "output_weight_grad",
    "compatibility",
    "advantage",
    "routing_grad",
    "value_grad",
    "query_grad",
    "key_grad",
    "projection_grads",
)

CORE_PAGES = ("head", "laws", "grads", "grads.blocked", "grads.dense", "training", "sweeps", "experiments", "dynamics", "geometry", "tasks",
              "tasks.base", "tasks.sticky_markov")

# pdoc's messages when a module cannot be imported or is documented twice.
IMPORT_PROBLEMS = ("Cannot find spec", "Error importing", "Error loading", "Couldn't import", "ModuleNotFoundError",
                   "ImportError", "adds a module named")


def _public_modules() -> list[str]:
    """Every module file of the package whose dotted name has no _private part."""
    pkg = ROOT / "gradattn"
    names = []
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return names


@pytest.fixture(scope="module")
def api_reference(tmp_path_factory):
    """``make docs`` into a temporary directory, with this interpreter (and no reinstall)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    tmp = tmp_path_factory.mktemp("api")
    stamp = tmp / "stamp"  # newer than pyproject.toml, so make does not reinstall the environment
    stamp.touch()
    out = tmp / "docs"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        ["make", "--no-print-directory", "docs", f"PY={sys.executable}", f"STAMP={stamp}", f"DOCS_DIR={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    return proc, out


@pytest.mark.slow
def test_make_docs_builds_a_page_for_every_public_module(api_reference):
    proc, out = api_reference
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "index.html").is_file()
    assert (out / "gradattn.html").is_file()
    expected = ["gradattn." + name for name in CORE_PAGES] + _public_modules()
    missing = [m for m in expected if not (out / (m.replace(".", "/") + ".html")).is_file()]
    assert not missing, f"no page for {missing}; pages: {sorted(str(p.relative_to(out)) for p in out.rglob('*.html'))}"
    private = sorted(str(p.relative_to(out)) for p in out.rglob("_*.html"))
    assert not private, f"private modules documented: {private}"


@pytest.mark.slow
def test_make_docs_reports_no_missing_module(api_reference):
    proc, _ = api_reference
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if any(p in line for p in IMPORT_PROBLEMS)]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_law_pages_carry_the_docstrings(api_reference):
    proc, out = api_reference
    assert proc.returncode == 0
    page = (out / "gradattn" / "laws.html").read_text(encoding="utf-8")
    for name in LAWS:
        assert f'id="{name}"' in page, f"{name} has no entry on the laws page"
    assert "routing law" in page.lower()


def test_theory_states_every_law_by_its_name():
    text = THEORY.read_text(encoding="utf-8")
    for name in LAWS:
        assert callable(getattr(gradattn, name, None)), f"gradattn.{name} is not a public function"
        assert f"`{name}`" in text, f"docs/theory.md does not name the law {name}"
    lower = text.lower()
    for phrase in ("output error", "upstream gradient", "compatibility", "advantage", "routing law", "value law",
                   "query", "key", "projection", "row of `dl/ds` sums to zero", "masked", "two-timescale",
                   "forward algorithm",
                   "u_i . g_i", "per-head laws"):
        assert phrase in lower, f"docs/theory.md does not mention {phrase!r}"


def test_theory_states_the_task_numbers_the_code_computes():
    text = THEORY.read_text(encoding="utf-8")
    task = StickyMarkov()
    p = np.asarray(task.transition_matrix)
    assert f"{task.h_min:.4f} nats" in text
    assert f"{p[0, 0]:.4f}" in text
    assert "  ".join(f"{v:.4f}" for v in p[0]) in text  # row 0, as printed in the doc
    assert f"N = T - 1 = {task.n_positions}" in text
    assert "torch.manual_seed(0); torch.randn(8, 20)" in text
    # The cost model: N^2 (3 d_k + 3 d_v) multiply-adds at N = 1999, d_k = 10, d_v = 15.
    assert f"{task.n_positions ** 2 / 1e6:.3f}e6 x 75" in text
    assert round(task.n_positions ** 2 * 75 / 1e8) == 3  # "about 300 million"


def test_install_notes_cover_x64_and_accelerators():
    text = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    for needle in ("jax.enable_x64", "JAX_ENABLE_X64", 'jax[cuda12]', 'jax[cuda13]', 'jax[tpu]',
                   'grad_source="auto"', "torch==2.13.0", "pip install -e '.[dev]'"):
        assert needle in text, needle


def test_licence_and_citation():
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert licence.startswith("MIT License") and "The gradattn authors" in licence
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(rf'^version = "{re.escape(str(cff["version"]))}"$', pyproject, re.M), "CITATION.cff version != pyproject"
    paper = cff["preferred-citation"]
    assert [a["family-names"] for a in paper["authors"]] == ["Agarwal", "Dalal", "Misra"]
    assert "Cross-Entropy Sculpts Bayesian Manifolds" in paper["title"]
    assert any("2512.22473" in str(i["value"]) for i in paper["identifiers"])
    assert paper["year"] == 2025


# What the project must not cite: a specification, its section numbers, tracker numbers or how the
# project was built. Each pattern is assembled so that this file does not match it.
_FORBIDDEN = [
    ("specification", re.compile(r"\b" + "SP" + r"EC\b")),
    ("section sign", re.compile("\u00a7" + r"\s*\d")),
    ("tracker number", re.compile(r"\b" + "iss" + r"ues?(\s+#?|\s*#)\d+", re.I)),
    ("numbered session", re.compile(r"\b" + "sess" + r"ions?(\s+#?|\s*#)\d+", re.I)),
    ("build history", re.compile(r"\bdevelopment\s+" + "sess" + "ions?", re.I)),
    ("ordinal session", re.compile(r"\b(first|second|third|earlier|previous|later|next|last)\s+" + "sess" + r"ion\b", re.I)),
]


def _repository_files() -> list[pathlib.Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err})")
    names = [n for n in listed.decode("utf-8", "surrogateescape").split("\0") if n]
    return [ROOT / n for n in names if not n.startswith(("shared/", ".git/")) and (ROOT / n).is_file()]


def test_no_file_cites_outside_material():
    hits = []
    files = _repository_files()
    assert any(f.name == "theory.md" for f in files)
    for path in files:
        data = path.read_bytes()
        if b"\0" in data:  # a binary file (a figure, an archive): its bytes are not prose
            continue
        text = data.decode("utf-8", "replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            found = [(what, m) for what, pattern in _FORBIDDEN if (m := pattern.search(line))]
            if found:
                start = min(m.start() for _, m in found)
                what = ", ".join(w for w, _ in found)
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {what}: ...{line[max(0, start - 40):start + 80]}...")
    assert not hits, f"{len(hits)} citation(s) of material outside the repository:\n" + "\n".join(hits[:200])


VERDICTS = ("supported", "partly", "not supported", "not tested in the paper's setting", "our observation")


def _claims_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What the paper claims, what we measured"):]
    section = section[:section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[1:]]  # after the header


def test_claims_table_names_the_papers_setting_and_cites_committed_files():
    """Every claim row has the paper's setting beside ours, a verdict from the fixed vocabulary, and
    cites files that are in the repository; a row whose verdict says 'supported' or 'partly' without
    qualification is not one measured outside the paper's setting."""
    rows = [r for r in _claims_rows() if not set("".join(r)) <= set("-")]
    assert len(rows) >= 10
    for claim, setting, ours, verdict, source in rows:
        assert setting and ours, claim
        assert verdict.startswith(VERDICTS), (claim, verdict)
        if verdict.startswith(("supported", "partly", "not supported")):
            assert not ours.startswith("our observation"), (claim, verdict)
        links = re.findall(r"\]\(([^)#]+)", source)
        files = re.findall(r"`((?:notebooks|tests|docs)/[^`]+)`", source)
        assert links or files, claim
        for path in links + files:
            assert (ROOT / path).is_file(), (claim, path)


def _index_page(out: pathlib.Path) -> pathlib.Path:
    """The page a reader of index.html sees: index.html itself, or the page it redirects to."""
    index = out / "index.html"
    redirect = re.search(r'http-equiv="refresh"\s+content="\d+;\s*url=([^"]+)"', index.read_text(encoding="utf-8"))
    return (out / redirect.group(1)).resolve() if redirect else index


@pytest.mark.slow
def test_make_docs_index_links_every_public_module(api_reference):
    """A reader who opens index.html reaches every public module's page in one click."""
    proc, out = api_reference
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = _index_page(out)
    hrefs = re.findall(r'href="([^"#]+)', page.read_text(encoding="utf-8"))
    linked = {(page.parent / href).resolve() for href in hrefs if "://" not in href}
    modules = [m for m in _public_modules() if m != "gradattn"]
    assert len(modules) > 20
    missing = [m for m in modules if (out / (m.replace(".", "/") + ".html")).resolve() not in linked]
    assert not missing, f"{page.name} links no page for {missing}"


@pytest.mark.slow
def test_make_docs_prints_no_warning(api_reference):
    proc, _ = api_reference
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "warn" in line.lower()]
    assert not warnings, "\n".join(warnings)


def _load_run_all():
    import importlib.util

    spec = importlib.util.spec_from_file_location("notebooks_run_all_docs", ROOT / "notebooks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "env, args, in_place, copied",
    [
        ({}, [], True, False),                                      # full size: the committed outputs
        ({"GRADATTN_NB_SMALL": "1"}, [], False, False),             # the documented quick recipe
        ({"GRADATTN_NB_STEPS": "5"}, [], False, False),             # any size variable
        ({"GRADATTN_NB_CHUNK": "1"}, [], True, False),              # memory only: still full size
        ({"GRADATTN_NB_SMALL": "1"}, ["--write"], True, False),
        ({}, ["--no-write"], False, False),
        ({"GRADATTN_NB_SMALL": "1"}, ["--out-dir", "OUT"], False, True),
    ],
)
def test_notebook_recipe_saves_only_full_size_runs_unless_asked(env, args, in_place, copied, tmp_path, monkeypatch, capsys):
    """notebooks/run_all.py (its docstring and notebooks/README.md): a run at other sizes never
    replaces the committed outputs unless --write says so; --out-dir saves copies elsewhere."""
    run_all = _load_run_all()
    for name in run_all.SIZE_VARS + ("GRADATTN_NB_CHUNK",):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    notebook = tmp_path / "nb.ipynb"
    notebook.write_text("{}")
    calls = []

    def fake_execute(path, *, timeout, write):
        calls.append((pathlib.Path(path), write))
        return {"cells": []}

    monkeypatch.setattr(run_all, "execute", fake_execute)
    written = []
    monkeypatch.setitem(sys.modules, "nbformat", type(sys)("nbformat"))
    sys.modules["nbformat"].write = lambda nb, target: written.append(pathlib.Path(target))
    out = tmp_path / "out"
    argv = [str(notebook)] + [str(out) if a == "OUT" else a for a in args]
    assert run_all.main(argv) == 0
    assert calls == [(notebook, in_place)]
    assert written == ([out / "nb.ipynb"] if copied else [])
    printed = capsys.readouterr().out
    assert ("saved in place" in printed) == in_place
    if env and not args and not in_place:
        assert "not saved" in printed and "--write" in printed
