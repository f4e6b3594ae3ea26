"""gradattn: the gradient dynamics of one attention head, as exact, compiled JAX functions.

Agarwal, Dalal & Misra, "Gradient Dynamics of Attention: How Cross-Entropy Sculpts Bayesian
Manifolds" (arXiv 2512.22473). docs/theory.md states the model and every law.

The surface, from the bottom up:

* the head (:mod:`gradattn.head`): ``HeadParams``, ``init_head``, ``forward``, ``dense_loss``;
* the first-order laws, each under its own name (:mod:`gradattn.laws`): ``output_error``,
  ``upstream_grad``, ``compatibility``, ``advantage``, ``routing_grad``, ``value_grad``, ...;
* whole gradients, one name per path: ``dense_loss_and_grads`` (the laws on N x N matrices),
  ``blocked_loss_and_grads`` (the laws over blocks of query rows, :mod:`gradattn.grads.blocked`),
  ``gradattn.grads.pallas.pallas_loss_and_grads`` (fused kernels; imported only when used), ``autodiff_loss_and_grads``
  (``jax.value_and_grad`` of the dense loss); ``loss_fn`` differentiates by the blocked pass;
  the paths by name, and ``"auto"``, the backend's choice: :mod:`gradattn.grads`;
* training (:mod:`gradattn.training`): optax transformations (``sgd``, ``em_like``,
  ``alternating``) and ``train``, a whole run as one ``lax.scan``;
* tasks (:mod:`gradattn.tasks`): ``StickyMarkov``, ``DirichletHMM``, ``BijectionElimination``, any ``Task``;
* seeds: ``sweep(fn, seeds)``; experiments, each one record on one skeleton (:mod:`gradattn.experiments`):
  the paper's ``em_vs_sgd(seeds, EmVsSgdConfig(...))``, ``plateau_study``, ``manifold_study``, and
  (with flax) ``experiments.deep.deep_experiment`` and ``experiments.bijection.bijection_study``;
  the shared specs ``HeadSpec`` and ``ArmRates``; the laws against autodiff: ``laws_check_errors``
  (:mod:`gradattn.verify`); reports and figures: :mod:`gradattn.plotting`;
* diagnostics as modules: ``gradattn.dynamics``, ``gradattn.geometry``; each task's exact Bayes
  predictor is its own (``task.bayes_loss``, ...; :mod:`gradattn.tasks`);
* deep models (flax NNX): ``gradattn.nn``, and the laws of every head inside one, ``gradattn.deep``.

``import gradattn`` imports neither flax nor matplotlib: the modules that need flax
(``gradattn.nn``, ``gradattn.deep``, ``gradattn.experiments.deep``, ``gradattn.experiments.bijection``)
are imported on first use (``gradattn.deep`` or ``import gradattn.deep``), and the functions that
draw a figure import matplotlib when they draw.

Every public module, one line each (the names that ``import gradattn`` brings in are above; the
others are imported by name, e.g. ``from gradattn.sweeps import sweep``):

* `gradattn.head`: one attention head, its forward pass and its cross-entropy loss, written densely.
* `gradattn.laws`: the first-order laws of one head, each under its own name.
* `gradattn.losses`: cross-entropy against labels or soft targets, positions weighted or ignored, and its gradient.
* `gradattn.grads`: the gradient paths of one head (one contract, ``GradPath``), by name, and the backend's choice:
    * `gradattn.grads.dense`: the laws on whole N x N matrices, and autodiff of the dense loss (the reference);
    * `gradattn.grads.blocked`: the laws over blocks of query rows: exact, causal, never N x N;
    * `gradattn.grads.pallas`: the head and its laws as two fused Pallas kernels, tiled like flash attention.
* `gradattn.checking`: a checked mode: invalid input inside compiled code becomes an error, not a NaN.
* `gradattn.training`: optax optimisers, a pure step, and a whole run as one ``lax.scan``.
* `gradattn.sweeps`: a pure experiment ``fn(key) -> pytree`` over many seeds: vmap, chunks, devices.
* `gradattn.cluster`: seed sweeps over several processes (hosts), and sweeps that resume after a stop.
* `gradattn.resume`: the directory of finished sweep chunks that lets a stopped sweep resume.
* `gradattn.experiments`: the experiments over seeds, one module each, on one skeleton:
    * `gradattn.experiments.em_sgd`: the paper's EM-like vs SGD experiment on the sticky Markov chain;
    * `gradattn.experiments.plateau`: frame before precision, decided on runs trained to their plateau;
    * `gradattn.experiments.manifold`: the manifold claim, where the head cannot memorise its data;
    * `gradattn.experiments.deep`: the deep transformer on the sticky chain, and the laws of its heads;
    * `gradattn.experiments.bijection`: one head and the deep model against the exact posterior.
    * `gradattn.experiments.windtunnel`: the companion paper's wind tunnels: token models against the exact posterior;
    * `gradattn.experiments.windtunnel_probe`: the geometry of saved wind-tunnel models, with controls;
    * `gradattn.experiments.mechanism`: the EM-like speed-up taken apart (value split, reverse split, step size);
    * `gradattn.experiments.feedback_loop`: the feedback loop over training, full against frozen halves.
* `gradattn.memory`: how much memory an experiment needs, estimated before it compiles, and what a device holds.
* `gradattn.verify`: each first-order law against autodiff, in float64, on a random instance.
* `gradattn.tasks`: data generators for training one head, each with its exact Bayes predictor:
    * `gradattn.tasks.base`: what a task must offer to be trained on, diagnosed and compared, and
      what the tasks' Bayes filters share (the forward algorithm, ``BayesLoss``);
    * `gradattn.tasks.sticky_markov`: the paper's sticky Markov chain and its exact Bayes predictor;
    * `gradattn.tasks.hmm`: next-observation prediction of a random discrete hidden Markov model;
    * `gradattn.tasks.bijection`: bijection elimination, a random bijection revealed pair by pair.
    * `gradattn.tasks.tokens`: what a token task (a wind tunnel) offers: tokens, labels, exact posterior, mask;
    * `gradattn.tasks.bijection_tokens`: the bijection as tokens for a language model, the authors' layout;
    * `gradattn.tasks.incontext_hmm`: a fresh random HMM per sequence, its parameters in context.
* `gradattn.dynamics`: the paper's mechanism, measured:
    * `gradattn.dynamics.first_order`: one gradient step against what the laws predict;
    * `gradattn.dynamics.feedback`: the positive feedback loop along training;
    * `gradattn.dynamics.settling`: when attention, and when the values, reach their final pattern.
* `gradattn.geometry`: attention entropy, value and context spectra, and what their leading
  directions encode.
* `gradattn.nn`: flax NNX modules: one attention head, a deep pre-norm transformer, and the small GPT over tokens.
* `gradattn.baselines`: the wind tunnels' baselines over tokens: a per-position MLP and an LSTM.
* `gradattn.probes`: the geometry of a trained token model: every layer's representation, the value
  manifold against the exact entropy with its controls, key orthogonality, query-key alignment,
  attention read over the values, head and layer ablations.
* `gradattn.deep`: the laws of every head inside a deep transformer:
    * `gradattn.deep.laws`: the laws of every head inside the model, and their check against autodiff.
* `gradattn.plotting`: what the experiments' reports and figures share (wording, formats, atomic figures).
* `gradattn.provenance`: where a result came from: code and library versions, machine and time.
* `gradattn.cli`: the ``gradattn`` command (``gradattn --help``).
"""

from gradattn import dynamics, experiments, geometry, grads, losses, plotting, provenance, tasks, training, verify
from gradattn._lazy import lazy_submodules as _lazy_submodules
from gradattn._version import __version__ as __version__  # re-exported: gradattn.__version__
from gradattn.checking import checked
from gradattn.experiments import (
    ArmRates,
    EmVsSgdConfig,
    HeadSpec,
    ManifoldConfig,
    PlateauConfig,
    em_vs_sgd,
    manifold_study,
    plateau_study,
    run_experiment,
)
from gradattn.grads.blocked import blocked_loss_and_grads, loss_fn
from gradattn.grads.dense import autodiff_loss_and_grads, dense_loss_and_grads
from gradattn.head import HeadOutputs, HeadParams, dense_loss, forward, init_head, token_losses
from gradattn.laws import (
    advantage,
    compatibility,
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
from gradattn.training import (
    TrainState,
    alternating,
    em_like,
    init_state,
    make_step,
    optimizer_step,
    param_labels,
    sgd,
    train,
    train_arms,
)
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
    "optimizer_step",
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
    "PlateauConfig",
    "plateau_study",
    "ManifoldConfig",
    "manifold_study",
    "HeadSpec",
    "ArmRates",
    "run_experiment",
    "laws_check_errors",
    # modules
    "baselines",
    "deep",
    "dynamics",
    "geometry",
    "nn",
    "grads",
    "losses",
    "plotting",
    "provenance",
    "experiments",
    "tasks",
    "training",
    "verify",
]

_LAZY_MODULES = frozenset({"baselines", "deep", "nn", "probes"})
"""Submodules imported on first attribute access: they pull in flax (the deep models), which the
head, its laws, the sweeps and the single-head experiments never need."""

__getattr__, __dir__ = _lazy_submodules("gradattn", _LAZY_MODULES, globals())
