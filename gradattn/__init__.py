"""gradattn: the gradient dynamics of one attention head, as exact, compiled JAX functions.

Agarwal, Dalal & Misra, "Gradient Dynamics of Attention: How Cross-Entropy Sculpts Bayesian
Manifolds" (arXiv 2512.22473). docs/theory.md states the model and every law.

The surface, from the bottom up:

* the head (:mod:`gradattn.head`): ``HeadParams``, ``init_head``, ``forward``, ``dense_loss``;
* the first-order laws, each under its own name (:mod:`gradattn.laws`): ``output_error``,
  ``upstream_grad``, ``compatibility``, ``advantage``, ``routing_grad``, ``value_grad``, ...;
* whole gradients, one name per path: ``dense_loss_and_grads`` (the laws on N x N matrices),
  ``blocked_loss_and_grads`` (the laws over blocks of query rows, :mod:`gradattn.blocked`),
  ``pallas_loss_and_grads`` (a fused kernel, :mod:`gradattn.pallas`), ``autodiff_loss_and_grads``
  (``jax.value_and_grad`` of the dense loss); ``loss_fn`` differentiates by the blocked pass;
* training (:mod:`gradattn.training`): optax transformations (``sgd``, ``em_like``,
  ``alternating``) and ``train``, a whole run as one ``lax.scan``;
* tasks (:mod:`gradattn.tasks`): ``StickyMarkov``, ``DirichletHMM``, any ``Task``;
* seeds: ``sweep(fn, seeds)``; the paper's experiment: ``em_vs_sgd(seeds, EmVsSgdConfig(...))``;
* diagnostics as modules: ``gradattn.dynamics``, ``gradattn.geometry``, ``gradattn.bayes``;
* deep models (flax NNX): ``gradattn.nn`` and the deep experiment ``gradattn.deep``.
"""

from gradattn._version import __version__
from gradattn import bayes, deep, dynamics, geometry, nn, pallas, provenance, tasks, training
from gradattn.blocked import analytic_grads, analytic_loss_and_grads, blocked_loss_and_grads, loss_fn
from gradattn.checking import checked
from gradattn.experiments import EmVsSgdConfig, em_vs_sgd, laws_check_errors
from gradattn.head import HeadOutputs, HeadParams, dense_loss, forward, init_head, token_losses
from gradattn.laws import (
    advantage,
    autodiff_loss_and_grads,
    compatibility,
    dense_loss_and_grads,
    key_grad,
    output_error,
    output_weight_grad,
    projection_grads,
    query_grad,
    routing_grad,
    upstream_grad,
    value_grad,
)
from gradattn.pallas import pallas_loss_and_grads
from gradattn.sweeps import seed_keys, sweep
from gradattn.tasks import BijectionElimination, DirichletHMM, StickyMarkov, Task
from gradattn.training import TrainState, alternating, em_like, init_state, make_step, param_labels, sgd, train

__all__ = [
    # the head
    "HeadParams",
    "HeadOutputs",
    "init_head",
    "forward",
    "dense_loss",
    "token_losses",
    "loss_fn",
    # the laws
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
    # whole gradients
    "dense_loss_and_grads",
    "blocked_loss_and_grads",
    "pallas_loss_and_grads",
    "autodiff_loss_and_grads",
    "analytic_loss_and_grads",
    "analytic_grads",
    "checked",
    # training
    "TrainState",
    "sgd",
    "em_like",
    "alternating",
    "param_labels",
    "init_state",
    "make_step",
    "train",
    # tasks, seeds, experiments
    "Task",
    "StickyMarkov",
    "DirichletHMM",
    "BijectionElimination",
    "sweep",
    "seed_keys",
    "EmVsSgdConfig",
    "em_vs_sgd",
    "laws_check_errors",
    # modules
    "bayes",
    "deep",
    "dynamics",
    "geometry",
    "nn",
    "pallas",
    "provenance",
    "tasks",
    "training",
]

_MOVED = {
    **{name: "dynamics" for name in dynamics.__all__},
    **{name: "geometry" for name in (
        "attention_entropy_bits", "covariate_r2", "decoding_r2", "explained_variance_ratio",
        "participation_ratio", "pc_covariate_correlation", "pca_spectrum", "principal_components",
    )},
    **{name: "bayes" for name in (
        "BayesLoss", "bayes_entropy", "bayes_filter_entropy", "bayes_log_filter", "bayes_log_predictive",
        "bayes_loss", "bayes_predictive",
    )},
    **{name: "blocked" for name in ("blocked_loss", "blocked_pass", "default_block_size")},
}


def __getattr__(name):
    # The diagnostics used to be flat names of the package; say where each one lives now.
    if name in _MOVED:
        raise AttributeError(f"gradattn.{name} is now gradattn.{_MOVED[name]}.{name}")
    raise AttributeError(f"module 'gradattn' has no attribute {name!r}")
