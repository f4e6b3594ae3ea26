"""What a task must offer to be trained on, diagnosed and compared with its Bayes predictor.

A task is any object with the members of :class:`Task` (a structural protocol: no base class to
inherit). One sample is one sequence of ``N = n_positions`` positions::

    x, y = task.sample(key)              x (N, d_in) floating, y (N,) int32 in [0, n_classes)
    task.bayes_predictive(x)             (N, C) p(y_t = c | x_1..x_t), rows summing to 1
    task.bayes_loss(x, y).mean           the Bayes predictor's cross-entropy (nats)
    task.bayes_filter_entropy(x)         (N,) entropy of the posterior over the hidden state
    task.h_min                           loss of an oracle that knows the hidden state (or None)
    task.to_dict()                       JSON-ready description that rebuilds the task

Tasks are frozen and hashable, so they can sit in a cached experiment configuration.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

TASK_MEMBERS = (
    "d_in",
    "n_classes",
    "seq_len",
    "n_positions",
    "h_min",
    "sample",
    "bayes_predictive",
    "bayes_loss",
    "bayes_filter_entropy",
    "to_dict",
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

    def bayes_predictive(self, x: jax.Array) -> jax.Array:
        """(N, C) exact posterior predictive p(y_t = c | x_1..x_t); rows sum to 1."""
        ...

    def bayes_loss(self, x: jax.Array, y: jax.Array, weights=None) -> Any:
        """The Bayes predictor's cross-entropy on ``(x, y)``: a :class:`gradattn.bayes.BayesLoss`."""
        ...

    def bayes_filter_entropy(self, x: jax.Array) -> jax.Array:
        """(N,) entropy (nats) of the filtered posterior over the hidden state at each position."""
        ...

    def to_dict(self) -> dict:
        """A JSON-ready description of the task (its class name under ``"name"``)."""
        ...


def check_task(task, fn: str) -> None:
    """Raise ``TypeError`` naming ``fn`` and every missing member unless ``task`` satisfies :class:`Task`."""
    missing = [name for name in TASK_MEMBERS if not hasattr(task, name)]
    if missing:
        raise TypeError(
            f"{fn}: task must provide the Task members {', '.join(TASK_MEMBERS)}; "
            f"{type(task).__name__} lacks {', '.join(missing)}"
        )
