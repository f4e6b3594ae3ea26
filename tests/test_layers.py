"""The house's layering: the import graph of gradattn/ has no cycle, and no module imports the
library inside a function (every dependency is visible at the top of its file)."""

import ast
import functools
import pathlib

import pytest

import gradattn

PACKAGE = pathlib.Path(gradattn.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_imports(node, package: str) -> set[str]:
    """The gradattn modules one import statement names (``from gradattn import x`` names
    gradattn.x when x is a module, else the package itself)."""
    names = set()
    if isinstance(node, ast.Import):
        names = {a.name for a in node.names if a.name.split(".")[0] == "gradattn"}
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
        if base.split(".")[0] == "gradattn":
            for a in node.names:
                sub = f"{base}.{a.name}"
                names.add(sub if sub in MODULES else base)
    return names


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p): p for p in FILES}


@functools.cache
def graph():
    edges = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges[name] = set()
        for node in tree.body:  # top level only; nested imports are checked separately
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[name] |= library_imports(node, package)
        edges[name].discard(name)
    return edges


def test_graph_is_parsed():
    edges = graph()
    assert "gradattn.head" in edges["gradattn.laws"]
    assert "gradattn.laws" in edges["gradattn.grads.blocked"]
    assert "gradattn.grads" in edges["gradattn.training"]
    assert {"gradattn.experiments._base", "gradattn.training", "gradattn.deep.laws"} <= edges["gradattn.experiments.deep"]
    for name, deps in edges.items():  # every edge names a real module of the package
        assert deps <= set(MODULES), (name, deps - set(MODULES))


PATHS = {"gradattn.grads", "gradattn.grads.dense", "gradattn.grads.blocked", "gradattn.grads.pallas", "gradattn.grads._rows"}
CORE = {"gradattn._checks", "gradattn._backend", "gradattn._math", "gradattn._vmap", "gradattn.head", "gradattn.laws",
        *PATHS, "gradattn.training", "gradattn.sweeps"}
ENGINE = {"gradattn.sweeps", "gradattn.cluster", "gradattn.resume"}
EXPERIMENTS = {m for m in MODULES if m.startswith("gradattn.experiments")}
UPPER = {*EXPERIMENTS, "gradattn.cli"}
MODELS = {"gradattn.nn", "gradattn.deep", "gradattn.deep.laws"}


@pytest.mark.parametrize("layer,forbidden", [
    ("gradattn.head", {"gradattn.laws", *PATHS}),
    ("gradattn.laws", PATHS),  # the laws only; the paths assemble them
    # training reaches the gradient paths only through the registry, which imports them when used
    ("gradattn.training", {"gradattn.laws", *(PATHS - {"gradattn.grads"})}),
    # the skeleton knows no experiment, no model and no command line; an experiment module knows the
    # skeleton (and the one it builds on), never the package that lists them all, nor the command line
    ("gradattn.experiments._base", (UPPER - {"gradattn.experiments._base"}) | MODELS),
    *((m, {"gradattn.experiments", "gradattn.cli"}) for m in sorted(EXPERIMENTS - {"gradattn.experiments"})),
    # the experiments' shared wording and the memory estimate sit below every experiment
    ("gradattn.plotting", UPPER | MODELS),
    ("gradattn.memory", UPPER | MODELS),
    *((m, UPPER) for m in sorted(MODELS)),
    *((core, UPPER) for core in sorted(CORE)),
    # a task is data and its exact predictor: no sweep engine, no experiments
    *((task, ENGINE | UPPER) for task in sorted(m for m in MODULES if m.startswith("gradattn.tasks"))),
    # the checks are the floor: array and scalar checks know nothing of configs or text
    ("gradattn._checks", {"gradattn._config", "gradattn._parse", "gradattn.head", "gradattn.sweeps"}),
])
def test_lower_layers_do_not_import_upper_ones(layer, forbidden):
    assert not graph()[layer] & forbidden


def test_nothing_imports_the_pallas_kernels_at_the_top():
    assert not [m for m, deps in graph().items() if "gradattn.grads.pallas" in deps]


def test_import_graph_has_no_cycle():
    # A package's __init__ importing its own submodules is how re-exports work, not a layer cycle:
    # drop the edges from a module to the packages that contain it.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph().items()}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_no_library_import_inside_a_function():
    offenders = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import) and any(a.name.startswith("gradattn") for a in inner.names):
                        offenders.append(f"{name}:{inner.lineno}")
                    if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("gradattn")):
                        offenders.append(f"{name}:{inner.lineno}")
    assert not offenders, offenders


def test_every_gradient_path_lives_in_grads():
    from gradattn import grads

    assert all(module.startswith("gradattn.grads.") for module, _ in grads.GRAD_SOURCES.values())
    defined = {name for name, path in MODULES.items() if "_loss_and_grads" in path.read_text()
               and any(f"def {fn}(" in path.read_text() for _, fn in grads.GRAD_SOURCES.values())}
    assert defined <= PATHS, defined - PATHS
