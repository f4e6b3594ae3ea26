"""What a task must offer to be trained on, diagnosed and compared with its Bayes predictor, and the
pieces every task's exact Bayes filter shares.

A task is any object with the members of :class:`Task` (a structural protocol: no base class to
inherit). One sample is one sequence of ``N = n_positions`` positions::

    x, y = task.sample(key)              x (N, d_in) floating, y (N,) int32 in [0, n_classes)
    task.bayes_log_predictive(x)         (N, C) log p(y_t = c | x_1..x_t)
    task.bayes_predictive(x)             (N, C) p(y_t = c | x_1..x_t), rows summing to 1
    task.bayes_loss(x, y).mean           the Bayes predictor's cross-entropy (nats), a BayesLoss
    task.bayes_entropy(x)                (N,) entropy of the Bayes predictive
    task.bayes_filter_entropy(x)         (N,) entropy of the posterior over the hidden state
    task.h_min                           loss of an oracle that knows the hidden state (or None)
    task.to_dict()                       JSON-ready description that rebuilds the task
    type(task).from_dict(d)              the task that description names

Tasks are frozen and hashable, so they can sit in a cached experiment configuration.

The library's own tasks are built on one template: a frozen dataclass whose fields are declared
with :func:`gradattn._config.option` (help and bounds, so that the command line can build the task),
checked by :func:`gradattn._config.check_fields` in ``__post_init__``, and inheriting
:class:`TaskDataclass` for the members they share. Their filters share :func:`forward_algorithm`,
:func:`check_sequence` and :func:`loss_from_log_predictive`, whose result is a :class:`BayesLoss`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._math import LN2

TASK_MEMBERS = (
    "d_in",
    "n_classes",
    "seq_len",
    "n_positions",
    "h_min",
    "sample",
    "bayes_log_predictive",
    "bayes_predictive",
    "bayes_loss",
    "bayes_entropy",
    "bayes_filter_entropy",
    "to_dict",
    "from_dict",
)


@runtime_checkable
class Task(Protocol):
    """The members every task provides (see the module docstring for the shapes).

    Attributes:
      d_in: input dimension of one position.
      n_classes: C, the number of target classes.
      seq_len: T, the length of the underlying sequence.
      n_positions: N, the number of (x, y) positions in one sample.
      h_min: expected loss of an oracle that knows the hidden state, nats; ``None`` when the task
        has no such state.

    Optional members, which only some tasks have and only some experiments read:
      noise_std: the emission noise of :class:`~gradattn.tasks.StickyMarkov`; the experiments
        record it when present (``None`` otherwise).
      bayes_log_filter(x): (N, S) log-posterior over the hidden state, where it is a table
        (the sticky chain, the HMM).
      n_symbols, encode, entropy_profile, bayes_loss_value: those of
        :class:`~gradattn.tasks.BijectionElimination`, which the bijection study (a study of that
        task only) reads.
    """

    @property
    def d_in(self) -> int: ...

    @property
    def n_classes(self) -> int: ...

    @property
    def seq_len(self) -> int: ...

    @property
    def n_positions(self) -> int: ...

    @property
    def h_min(self) -> float | None: ...

    def sample(self, key: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
        """One sequence: ``x (N, d_in)`` in ``dtype`` and targets ``y (N,)`` int32. Pure; jit/vmap-able."""
        ...

    def bayes_log_predictive(self, x: jax.Array) -> jax.Array:
        """(N, C) log p(y_t = c | x_1..x_t) of the exact Bayes predictor, in the dtype of ``x``."""
        ...

    def bayes_predictive(self, x: jax.Array) -> jax.Array:
        """(N, C) exact posterior predictive p(y_t = c | x_1..x_t); rows sum to 1."""
        ...

    def bayes_loss(self, x: jax.Array, y: jax.Array, weights=None) -> BayesLoss:
        """The Bayes predictor's cross-entropy on ``(x, y)``: a :class:`BayesLoss`."""
        ...

    def bayes_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the Bayes predictive at each position."""
        ...

    def bayes_filter_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the filtered posterior over the hidden state at each position."""
        ...

    def to_dict(self) -> dict:
        """A JSON-ready description of the task (its class name under ``"name"``)."""
        ...

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        """The task that :meth:`to_dict` described as ``d``."""
        ...


def check_task(task, fn: str) -> None:
    """Raise ``TypeError`` naming ``fn`` and every missing member unless ``task`` satisfies :class:`Task`."""
    missing = [name for name in TASK_MEMBERS if not hasattr(task, name)]
    if missing:
        raise TypeError(
            f"{fn}: task must provide the Task members {', '.join(TASK_MEMBERS)}; "
            f"{type(task).__name__} lacks {', '.join(missing)}"
        )


def description_fields(cls: type, d: dict) -> dict:
    """The fields in ``d``, a description of a ``cls`` task (``to_dict``'s output), without its
    ``"name"``; a ValueError naming ``cls.from_dict`` when the name is another class's."""
    name = cls.__name__
    d = dict(d)
    if d.pop("name", name) != name:
        raise ValueError(f"{name}.from_dict: not a {name} description: {d!r}")
    return d


class TaskDataclass:
    """What the library's tasks (frozen dataclasses of :func:`~gradattn._config.option` fields)
    share: their JSON description, and ``N = T - 1`` positions (each position predicts the next
    symbol) unless the task says otherwise. A task of one's own need not inherit it: :class:`Task`
    is structural."""

    @property
    def n_positions(self) -> int:
        """N = T - 1, the number of (x, y) positions in one sample."""
        return self.seq_len - 1  # type: ignore[attr-defined]

    def to_dict(self) -> dict:
        """JSON-ready fields under the class name; :meth:`from_dict` rebuilds an equal task."""
        return {"name": type(self).__name__, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict):
        """The task described by :meth:`to_dict`'s output."""
        return cls(**description_fields(cls, d))


def check_sequence(x, d_in: int, fn: str, *, what: str, max_positions: int | None = None) -> int:
    """One sequence ``x (N, d_in)`` given to a task's Bayes filter: 2-D, 1 <= N (<= ``max_positions``
    when given), floating point; ``what`` says what x holds. Returns N; the task checks the values."""
    shape = tuple(np.shape(x))
    n_ok = len(shape) == 2 and shape[0] >= 1 and (max_positions is None or shape[0] <= max_positions)
    if not n_ok or shape[1] != d_in:
        positions = "N >= 1" if max_positions is None else f"1 <= N <= {max_positions}"
        raise ValueError(f"{fn}: x must have shape (N, {d_in}) with {positions} ({what}), got shape {shape}; use jax.vmap for batches")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{fn}: x must be floating point, got dtype {jnp.result_type(x)}")
    return shape[0]


def forward_algorithm(log_initial, log_transition, log_likelihood):
    """The forward (filtering) recursion of a hidden Markov model, in log space, as one ``lax.scan``.

    For hidden states s_t with p(s_1) = initial, p(s_{t+1} = b | s_t = a) = A[a, b] and per-position
    evidence l_t(a) = log p(obs_t | s_t = a) (up to a constant per position)::

        log beta_t  = log prior_t + l_t - logsumexp(.)      beta_t(a) = p(s_t = a | obs_1..obs_t)
        log prior_{t+1}(b) = logsumexp_a(log beta_t(a) + log A[a, b])

    Args:
      log_initial: (S,) log p(s_1).   log_transition: (S, S) log A (-inf entries allowed).
      log_likelihood: (N, S) l_t(a).
    Returns:
      ``(log_beta (N, S), log_next (N, S))`` with log_next[t] = log p(s_{t+1} | obs_1..obs_t).
    No input checks (callers validate); jit- and vmap-compatible.
    """

    def step(log_prior, ll):
        log_post = log_prior + ll
        log_post = log_post - jax.nn.logsumexp(log_post)
        log_next = jax.nn.logsumexp(log_post[:, None] + log_transition, axis=0)
        return log_next, (log_post, log_next)

    _, (log_beta, log_next) = jax.lax.scan(step, log_initial, log_likelihood)
    return log_beta, log_next


class BayesLoss(NamedTuple):
    """Cross-entropy of the Bayes predictive on one sequence (a pytree).

    Attributes:
      per_position: (N,) -log p(y_t | x_1..x_t) in nats.
      mean: scalar weighted mean over positions, nats.
      bits: the same mean in bits (mean / ln 2).
    """

    per_position: jax.Array
    mean: jax.Array
    bits: jax.Array


def loss_from_log_predictive(log_pred, y, weights=None) -> BayesLoss:
    """The cross-entropy of a log-predictive ``(N, C)`` on targets ``y (N,)`` (checked by the caller):
    L = sum_t w_t (-log pred_t(y_t)) / sum_t w_t, w_t = 1 by default."""
    n = log_pred.shape[0]
    per_pos = -jnp.take_along_axis(log_pred, jnp.asarray(y)[:, None], axis=-1)[:, 0]
    w = jnp.full((n,), 1.0 / n, per_pos.dtype) if weights is None else jnp.asarray(weights, per_pos.dtype) / jnp.sum(
        jnp.asarray(weights, per_pos.dtype)
    )
    mean = jnp.sum(w * per_pos)
    return BayesLoss(per_position=per_pos, mean=mean, bits=mean / LN2)
