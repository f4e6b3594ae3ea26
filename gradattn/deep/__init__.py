"""The deep-transformer experiment on a task, and the laws of every head inside it.

* :mod:`~gradattn.deep.config`: :class:`DeepConfig` (the protocol), :func:`deep_optimizer`,
  :func:`init_model`;
* :mod:`~gradattn.deep.laws`: :func:`head_laws`, the first-order laws of every head with u^h from
  the whole network, and :func:`deep_law_errors`, their check against autodiff;
* :mod:`~gradattn.deep.run`: :func:`make_deep_run` (one run, a pure function of a key),
  :func:`summarise_deep` and :func:`deep_experiment` (over seeds).

The text report and the figure are :func:`gradattn.plotting.format_deep` and
:func:`gradattn.plotting.plot_deep`.
"""

from gradattn.deep.config import SCHEDULES, DeepConfig, deep_optimizer, init_model, value_labels
from gradattn.deep.laws import HeadLaws, deep_law_errors, head_laws
from gradattn.deep.run import deep_experiment, make_deep_run, summarise_deep

__all__ = [
    "SCHEDULES",
    "DeepConfig",
    "HeadLaws",
    "deep_experiment",
    "deep_law_errors",
    "deep_optimizer",
    "head_laws",
    "init_model",
    "make_deep_run",
    "summarise_deep",
    "value_labels",
]
