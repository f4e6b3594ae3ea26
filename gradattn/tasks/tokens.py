"""What a token task (a "wind tunnel" of the companion paper) offers: sequences of token ids for a
language model, the targets to train on, and the exact posterior at every supervised position.

A token task is any object with the members of :class:`TokenTask` (a structural protocol). One
sample is one sequence of ``T = seq_len`` tokens, drawn inside compiled code from a PRNG key::

    s = task.sample(key)             a TokenSample of arrays:
      s.tokens      (T,) int32       token ids in [0, vocab_size), the model's input
      s.labels      (T,) int32       a hard target in [0, n_classes) at each supervised position
                                     (0 elsewhere: not a target; ``mask`` says which)
      s.posterior   (T, C) floating  the exact posterior over the C output classes given the tokens
                                     up to and including position t (rows sum to 1 at supervised
                                     positions, 0 elsewhere); the soft target and the metrics' truth
      s.mask        (T,) floating    1 at the supervised positions, 0 elsewhere

    task.soft_targets                train on ``posterior`` (True) or on ``labels`` (False)
    task.class_range                 (lo, hi): the classes where the posterior can be non-zero (the
                                     entropy metric reads the model's softmax restricted to them)
    task.supervised                  (S,) int: the supervised positions (the same in every sample)
    task.to_dict(), from_dict(d)     as for :class:`gradattn.tasks.Task`

Samples are pure functions of the key (jit and vmap over keys), so a whole training run, data
included, is one ``lax.scan`` and seeds ``vmap``. Tasks are frozen and hashable.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import jax

TOKEN_TASK_MEMBERS = (
    "vocab_size",
    "n_classes",
    "seq_len",
    "class_range",
    "supervised",
    "soft_targets",
    "sample",
    "to_dict",
    "from_dict",
)


class TokenSample(NamedTuple):
    """One sequence of a token task (see the module docstring for the shapes)."""

    tokens: jax.Array
    labels: jax.Array
    posterior: jax.Array
    mask: jax.Array


@runtime_checkable
class TokenTask(Protocol):
    """The members every token task provides (see the module docstring).

    Attributes:
      vocab_size: the number of input token ids.
      n_classes: C, the model's output classes (the targets' and the posterior's last axis).
      seq_len: T, tokens per sequence.
      class_range: (lo, hi) with 0 <= lo < hi <= C, the classes the posterior can put mass on.
      supervised: the positions with a target, increasing, the same in every sample.
      soft_targets: whether training uses the exact posterior (True) or the sampled labels (False).
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def n_classes(self) -> int: ...

    @property
    def seq_len(self) -> int: ...

    @property
    def class_range(self) -> tuple[int, int]: ...

    @property
    def supervised(self) -> tuple[int, ...]: ...

    @property
    def soft_targets(self) -> bool: ...

    def sample(self, key: jax.Array) -> TokenSample:
        """One sequence (pure; jit/vmap-able over ``key``)."""
        ...

    def to_dict(self) -> dict:
        """A JSON-ready description of the task (its class name under ``"name"``)."""
        ...


def check_token_task(task, fn: str) -> None:
    """Raise ``TypeError`` naming ``fn`` and every missing member unless ``task`` is a :class:`TokenTask`."""
    missing = [name for name in TOKEN_TASK_MEMBERS if not hasattr(task, name)]
    if missing:
        raise TypeError(f"{fn}: task must provide the TokenTask members {', '.join(TOKEN_TASK_MEMBERS)}; "
                        f"{type(task).__name__} lacks {', '.join(missing)}")
