"""gradattn: the gradient dynamics of one attention head, as exact, compiled JAX functions.

Agarwal, Dalal & Misra, "Gradient Dynamics of Attention: How Cross-Entropy Sculpts Bayesian
Manifolds" (arXiv 2512.22473). docs/theory.md states the model and every law.

The surface, from the bottom up:

* the head (:mod:`gradattn.head`): ``HeadParams``, ``init_head``, ``forward``, ``dense_loss``;
* the first-order laws, each under its own name (:mod:`gradattn.laws`): ``output_error``,
  ``upstream_grad``, ``compatibility``, ``advantage``, ``routing_grad``, ``value_grad``, ...;
* whole gradients, one name per path: ``dense_loss_and_grads`` (the laws on N x N matrices),
  ``blocked_loss_and_grads`` (the laws over blocks of query rows, :mod:`gradattn.blocked`),
  ``gradattn.pallas.pallas_loss_and_grads`` (fused kernels; imported only when used), ``autodiff_loss_and_grads``
  (``jax.value_and_grad`` of the dense loss); ``loss_fn`` differentiates by the blocked pass;
  the paths by name, and ``"auto"``, the backend's choice: :mod:`gradattn.paths`;
* training (:mod:`gradattn.training`): optax transformations (``sgd``, ``em_like``,
  ``alternating``) and ``train``, a whole run as one ``lax.scan``;
* tasks (:mod:`gradattn.tasks`): ``StickyMarkov``, ``DirichletHMM``, ``BijectionElimination``, any ``Task``;
* seeds: ``sweep(fn, seeds)``; experiments on one skeleton (:mod:`gradattn.experiments`), the paper's
  ``em_vs_sgd(seeds, EmVsSgdConfig(...))``; the laws against autodiff: ``laws_check_errors``
  (:mod:`gradattn.verify`); reports and figures: :mod:`gradattn.plotting`;
* diagnostics as modules: ``gradattn.dynamics``, ``gradattn.geometry``, ``gradattn.bayes``;
* deep models (flax NNX): ``gradattn.nn`` and the deep experiment ``gradattn.deep``.
"""

from gradattn._version import __version__
from gradattn import bayes, deep, dynamics, geometry, nn, paths, plotting, provenance, studies, tasks, training, verify
from gradattn.blocked import blocked_loss_and_grads, loss_fn
from gradattn.checking import checked
from gradattn.experiments import EmVsSgdConfig, em_vs_sgd
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
from gradattn.sweeps import seed_keys, sweep
from gradattn.tasks import BijectionElimination, DirichletHMM, StickyMarkov, Task
from gradattn.training import TrainState, alternating, em_like, init_state, make_step, param_labels, sgd, train, train_arms
from gradattn.verify import laws_check_errors

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
    "autodiff_loss_and_grads",
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
    "train_arms",
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
    "paths",
    "plotting",
    "provenance",
    "studies",
    "tasks",
    "training",
    "verify",
]

