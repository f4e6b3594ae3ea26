"""The choices that depend on the backend a computation compiles for, in one table.

Each entry was chosen by measurement on that backend (see benchmarks/README.md and, for the trials behind each, benchmarks/TRIALS.md):

* ``grad_source``: what ``grad_source="auto"`` in :func:`gradattn.training.make_step` runs. On CPU
  the blocked pass (never N x N, cache sized); on GPU/TPU the dense laws, which there run faster
  per step than the blocked pass and compile in a fraction of its time.
* ``block_size`` / ``max_blocks``: rows per query block, and the most blocks a sequence is cut into
  (the blocks are unrolled at trace time, so compile time grows with their number).
* ``blocks_in_flight``: how many query blocks may run at once (0: no ordering imposed).
* ``seed_group_bytes``: under ``vmap`` over seeds, how many bytes of (block x N) scores one group
  of seeds inside the blocked pass may hold (``None``: no groups; every seed runs in one vmap).
* ``chunk_size``: seeds vmapped per device per call of :func:`gradattn.sweep` (and so of every
  experiment) when none is given. On a CPU one sequence of the paper's size already keeps every core
  busy and more seeds per call only multiply the working set: 1. On an accelerator a call should hold
  many seeds: 256 (1000 seeds are four calls, the last padded).

The backend is read with ``jax.default_backend()`` when a function is traced.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class BackendChoices(NamedTuple):
    """The per-backend settings of the gradient paths (see the module docstring)."""

    grad_source: str
    block_size: int
    max_blocks: int
    blocks_in_flight: int
    seed_group_bytes: int | None
    chunk_size: int


CPU = BackendChoices(grad_source="blocked", block_size=256, max_blocks=16, blocks_in_flight=3, seed_group_bytes=2 << 20,
                     chunk_size=1)
ACCELERATOR = BackendChoices(grad_source="dense", block_size=256, max_blocks=16, blocks_in_flight=3, seed_group_bytes=None,
                             chunk_size=256)

CHOICES: dict[str, BackendChoices] = {"cpu": CPU, "gpu": ACCELERATOR, "cuda": ACCELERATOR, "rocm": ACCELERATOR,
                                      "tpu": ACCELERATOR}


def backend_choices(backend: str | None = None) -> BackendChoices:
    """The :class:`BackendChoices` of ``backend`` (default: ``jax.default_backend()``); an
    unlisted backend gets the accelerator's."""
    return CHOICES.get(backend or jax.default_backend(), ACCELERATOR)
