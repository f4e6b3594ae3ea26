"""The experiments over seeds, each one module holding its config, its run, its summary, its report
and its figure, and one :class:`Experiment` record that the library, the command line and
``gradattn rerun`` all read.

  _base        the skeleton: Experiment, run_experiment, compiled_run, the shared specs (HeadSpec,
               ArmRates), config_dict / config_from_dict, the summaries' helpers
  em_sgd       the paper's EM-like vs SGD experiment on the sticky Markov chain
  plateau      frame before precision, decided on runs trained to their plateau
  manifold     the manifold claim, where the head cannot memorise its data
  deep         the deep transformer on the sticky chain, and the laws of each of its heads
  bijection    one head and the deep transformer against the exact posterior of bijection elimination
  windtunnel   the companion paper's wind tunnels: token models against the exact posterior

:data:`REGISTRY` names the modules in the command line's order; :func:`registry` gives their
records. Adding an experiment is one module with a record and one row here. ``deep``,
``bijection`` and ``windtunnel`` build flax models, so they (and flax) are imported on first use: ``import
gradattn.experiments`` stays light.
"""

import importlib as _importlib

from gradattn._lazy import lazy_submodules as _lazy_submodules
from gradattn.experiments import em_sgd, manifold, plateau
from gradattn.experiments._base import (
    RESULT_FORMAT,
    ArmRates,
    Experiment,
    HeadSpec,
    compiled_run,
    config_dict,
    config_from_dict,
    run_experiment,
    seed_std,
)
from gradattn.experiments.em_sgd import EmVsSgdConfig, em_vs_sgd, make_em_vs_sgd, summarise_em_vs_sgd
from gradattn.experiments.manifold import ManifoldConfig, manifold_study
from gradattn.experiments.plateau import PlateauConfig, plateau_study

REGISTRY = ("em_sgd", "deep", "plateau", "manifold", "bijection", "windtunnel", "mechanism", "feedback_loop")
"""The experiments' modules (under :mod:`gradattn.experiments`), in the command line's order; each
holds one :class:`Experiment` record."""

_LAZY_MODULES = frozenset({"deep", "bijection", "windtunnel", "windtunnel_probe", "mechanism", "feedback_loop"})


def registry() -> tuple[Experiment, ...]:
    """The record of every experiment of :data:`REGISTRY` (importing the modules not yet imported)."""
    out = []
    for name in REGISTRY:
        module = _importlib.import_module(f"gradattn.experiments.{name}")
        out += [v for v in vars(module).values() if isinstance(v, Experiment) and v.make_run.__module__ == module.__name__]
    return tuple(out)


__getattr__, __dir__ = _lazy_submodules("gradattn.experiments", _LAZY_MODULES, globals())


__all__ = [
    "REGISTRY",
    "RESULT_FORMAT",
    "ArmRates",
    "EmVsSgdConfig",
    "Experiment",
    "HeadSpec",
    "ManifoldConfig",
    "PlateauConfig",
    "compiled_run",
    "config_dict",
    "config_from_dict",
    "em_sgd",
    "em_vs_sgd",
    "make_em_vs_sgd",
    "manifold",
    "manifold_study",
    "plateau",
    "plateau_study",
    "registry",
    "run_experiment",
    "seed_std",
    "summarise_em_vs_sgd",
]
