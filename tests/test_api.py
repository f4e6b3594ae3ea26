"""The public surface: __all__ is exactly the package's public names, each defined where the
module map says, and a name that moved or was retired does not exist at all."""

import subprocess
import sys
import types

import pytest

import gradattn as ga


def test_all_is_exactly_the_public_names():
    # Every public non-module name of the package is listed, and nothing else (submodules that
    # importing the package loads on the way, such as gradattn.head, are not names of its own).
    public = {n for n, v in vars(ga).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    listed = {n for n in ga.__all__ if not isinstance(getattr(ga, n), types.ModuleType)}
    assert len(ga.__all__) == len(set(ga.__all__))
    assert listed == public, (sorted(public - listed), sorted(listed - public))


@pytest.mark.parametrize("name, module", [
    ("blocked_loss_and_grads", "gradattn.grads.blocked"), ("loss_fn", "gradattn.grads.blocked"),
    ("dense_loss_and_grads", "gradattn.grads.dense"), ("autodiff_loss_and_grads", "gradattn.grads.dense"),
    ("train", "gradattn.training"), ("em_vs_sgd", "gradattn.experiments.em_sgd"),
    ("plateau_study", "gradattn.experiments.plateau"), ("HeadSpec", "gradattn.experiments._base"),
    ("laws_check_errors", "gradattn.verify"), ("sweep", "gradattn.sweeps"), ("init_head", "gradattn.head"),
])
def test_each_name_is_defined_in_its_module(name, module):
    # The name at the top is the very object its module (the module map's path) defines: a
    # function or class by its __module__, an experiment record by identity.
    import importlib

    obj = getattr(ga, name)
    assert obj is getattr(importlib.import_module(module), name)
    assert getattr(obj, "__module__", module) == module or isinstance(obj, ga.experiments.Experiment)


@pytest.mark.parametrize("name", ["analytic_grads", "analytic_loss_and_grads", "feedback_stats", "pca_spectrum",
                                  "bayes", "bayes_loss", "blocked_pass", "pallas_loss_and_grads", "nonsense"])
def test_retired_and_moved_names_do_not_exist(name):
    with pytest.raises(AttributeError, match=f"has no attribute '{name}'"):
        getattr(ga, name)
    assert not hasattr(ga.head, "__getattr__")


def test_import_is_light_and_heavy_modules_load_on_first_use():
    # `import gradattn` brings in neither flax nor matplotlib; the modules that need them load on
    # first attribute access, and only those names are resolved lazily.
    code = (
        "import sys, types\n"
        "import gradattn as ga\n"
        "assert 'flax' not in sys.modules and 'matplotlib' not in sys.modules, "
        "[m for m in ('flax', 'matplotlib') if m in sys.modules]\n"
        "assert ga.head.forward is ga.forward\n"
        "ga.plotting.fmt_pm(1.0, 0.5)\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert ga.experiments.plateau_study.name == 'plateau_study' and 'flax' not in sys.modules\n"
        "assert isinstance(ga.experiments.deep.DeepConfig, type) and 'flax' in sys.modules\n"
        "assert set(dir(ga)) >= {'deep', 'nn', 'plotting', 'experiments', 'forward'}\n"
        "assert set(dir(ga.experiments)) >= {'deep', 'bijection', 'em_sgd'}\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_modules_are_modules():
    for name in ("deep", "dynamics", "geometry", "nn", "grads", "plotting", "tasks", "training", "verify"):
        assert isinstance(getattr(ga, name), types.ModuleType) and name in ga.__all__


def test_pallas_is_imported_only_when_its_path_is_resolved():
    code = (
        "import sys, jax, gradattn as ga, jax.numpy as jnp\n"
        "assert 'gradattn.grads.pallas' not in sys.modules\n"
        "p, x, y = ga.init_head(jax.random.key(0), 3, 2, 2, 2), jnp.ones((4, 3)), jnp.zeros(4, int)\n"
        "ga.train(p, x, y, ga.sgd(0.1), 2, grad_source='blocked')\n"
        "assert 'gradattn.grads.pallas' not in sys.modules\n"
        "ga.grads.resolve_grad_source('pallas')\n"
        "assert 'gradattn.grads.pallas' in sys.modules\n"
        # Pallas's Triton backend (deprecated since jax 0.11) only when a kernel is compiled for a GPU.
        "assert 'jax.experimental.pallas.triton' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_command_line_imports_matplotlib_only_to_draw():
    # `gradattn --help` and every refusal before a run come without matplotlib's import.
    code = ("import sys\nimport gradattn.cli, gradattn.experiments.bijection, gradattn.experiments.deep\n"
            "assert 'matplotlib' not in sys.modules\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_module_has_a_public_unchecked_twin():
    # Each function is public once, with its checks; what the library calls after validating at its
    # door is private.
    import importlib
    import pkgutil

    public = []
    for info in pkgutil.walk_packages(ga.__path__, "gradattn."):
        if info.name in ("gradattn.__main__",):
            continue
        module = importlib.import_module(info.name)
        public += [f"{info.name}.{n}" for n in vars(module) if n.endswith("_unchecked") and not n.startswith("_")]
    assert not public, public
