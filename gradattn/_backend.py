"""The choices that depend on the backend a computation compiles for, in one table.

Each entry was chosen by measurement on that backend (see benchmarks/README.md):

* ``grad_source``: what ``grad_source="auto"`` in :func:`gradattn.training.make_step` runs. On CPU
  the blocked pass (never N x N, cache sized); on GPU/TPU the dense laws, which there run faster
  per step than the blocked pass and compile in a fraction of its time.
* ``block_size`` / ``max_blocks``: rows per query block, and the most blocks a sequence is cut into
  (the blocks are unrolled at trace time, so compile time grows with their number).
* ``blocks_in_flight``: how many query blocks may run at once (0: no ordering imposed).
* ``seed_chunk_bytes``: under ``vmap`` over seeds, how many bytes of (block x N) scores one chunk
  of seeds may hold (``None``: no chunking; every seed runs in one vmap).

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
    seed_chunk_bytes: int | None


CPU = BackendChoices(grad_source="blocked", block_size=256, max_blocks=16, blocks_in_flight=3, seed_chunk_bytes=2 << 20)
ACCELERATOR = BackendChoices(grad_source="dense", block_size=256, max_blocks=16, blocks_in_flight=3, seed_chunk_bytes=None)

CHOICES: dict[str, BackendChoices] = {"cpu": CPU, "gpu": ACCELERATOR, "cuda": ACCELERATOR, "rocm": ACCELERATOR,
                                      "tpu": ACCELERATOR}


def backend_choices(backend: str | None = None) -> BackendChoices:
    """The :class:`BackendChoices` of ``backend`` (default: ``jax.default_backend()``); an
    unlisted backend gets the accelerator's."""
    return CHOICES.get(backend or jax.default_backend(), ACCELERATOR)
