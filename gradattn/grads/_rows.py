"""Query rows in blocks: the one tiling shared by the blocked pass, the blocked loss, the feedback
statistics and the snapshots.

Every row of alpha (and of b, dL/ds) belongs to one query, so a block of query rows R = r0:r1 can
be computed whole against the keys it can see: 0:r1 when causal (future key blocks are skipped),
0:N otherwise. Blocks are static Python slices, so XLA compiles one straight-line program in which
no matrix is larger than ``block_size x N``.

The blocks are unrolled at trace time. Left to itself, XLA:CPU schedules them breadth first (every
block's scores, then every block's exponentials, ...) and keeps all their (|R|, keys) matrices
alive at once, about N^2 floats. :class:`RowBlocks` therefore lets at most ``blocks_in_flight``
blocks run at a time: block i starts only after block i - blocks_in_flight has finished.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradattn._backend import backend_choices
from gradattn._checks import check_int
from gradattn.head import causal_visible


def default_block_size(n: int) -> int:
    """The default query-block size for a sequence of N positions.

    The backend's block size (256 rows on every backend today) up to N = max_blocks * block_size;
    beyond that, the smallest multiple of it that covers N in ``max_blocks`` blocks, so that compile
    time stays bounded (N = 8192: 512 rows; N = 16384: 1024 rows). Measured; see benchmarks/TRIALS.md.
    """
    choices = backend_choices()
    multiple = -(-n // (choices.max_blocks * choices.block_size))
    return choices.block_size * max(1, multiple)


def query_blocks(n: int, block_size: int | None = None) -> list[tuple[int, int]]:
    """The static row ranges ``[(r0, r1), ...]`` that tile 0:n in blocks of ``block_size`` (the last
    one shorter). ``None`` means :func:`default_block_size`."""
    block_size = default_block_size(n) if block_size is None else check_int("block_size", block_size, "query_blocks")
    return [(r0, min(r0 + block_size, n)) for r0 in range(0, n, block_size)]


class RowBlock(NamedTuple):
    """One block of query rows: ``index``, the rows ``start:stop``, and ``keys``, the number of keys
    those rows can see (``stop`` when causal, N otherwise)."""

    index: int  # type: ignore[assignment]  # a field named index shadows tuple.index, on purpose
    start: int
    stop: int
    keys: int


def ordered_after(arrays: tuple, scalars: tuple) -> tuple:
    """``arrays`` unchanged in value, but computed after ``scalars`` (values of an earlier block).

    ``jax.lax.optimization_barrier`` would say this, but XLA:CPU drops it before scheduling, so the
    order is written as a data dependence: adding 0 * (a value of the earlier block). XLA never
    folds 0 * s for floats (s may be NaN), and a NaN there means that block's result was NaN already.
    """
    zero = 0.0 * sum(scalars)
    return tuple(a + zero.astype(a.dtype) for a in arrays)


class RowBlocks:
    """The query blocks of a sequence of N positions, with at most ``blocks_in_flight`` at a time.

    Iterate to get each :class:`RowBlock`; call :meth:`gate` on the arrays a block reads before it
    reads them, and :meth:`finish` with a few scalars of its results once it is done::

        blocks = RowBlocks(n, block_size, causal)
        for blk in blocks:
            q, k = blocks.gate(blk, (q, k))
            ...
            blocks.finish(blk, loss_r[0])

    ``block_size=None``: :func:`default_block_size`; ``blocks_in_flight=None``: the backend's
    choice (0: no ordering).
    """

    def __init__(self, n: int, block_size: int | None = None, causal: bool = True, blocks_in_flight: int | None = None):
        self.n = n
        self.causal = causal
        self.ranges = query_blocks(n, block_size)
        self.in_flight = backend_choices().blocks_in_flight if blocks_in_flight is None else blocks_in_flight
        self._finished: list[tuple] = []

    def __iter__(self):
        for i, (r0, r1) in enumerate(self.ranges):
            yield RowBlock(index=i, start=r0, stop=r1, keys=r1 if self.causal else self.n)

    def gate(self, block: RowBlock, arrays: tuple) -> tuple:
        """``arrays``, ordered after block ``index - blocks_in_flight`` has finished."""
        if self.in_flight and block.index >= self.in_flight:
            return ordered_after(arrays, self._finished[block.index - self.in_flight])
        return arrays

    def finish(self, block: RowBlock, *scalars) -> None:
        """Record scalars that exist only once ``block`` is done (for :meth:`gate` of later blocks)."""
        assert len(self._finished) == block.index, "finish the blocks in order"
        self._finished.append(scalars)


def masked_scores(q_r: jax.Array, k: jax.Array, r0: int, causal: bool) -> jax.Array:
    """S_R (|R|, keys) = Q_R K^T for query rows r0:r0+|R|, future keys set to -inf.

    ``q_r`` arrives already divided by sqrt(d_k). When causal, ``k`` holds keys 0:r1, so only the
    last |R| columns (the diagonal block) can hold a future key. The mask is one elementwise
    ``where`` against two iotas, which XLA fuses into the product's output; writing only the
    diagonal corner (``s.at[:, r0:r1].set``) made XLA:CPU copy the whole block (measured slower;
    see benchmarks/TRIALS.md).
    """
    s = q_r @ k.T
    if causal:
        s = jnp.where(causal_visible(s.shape[0], s.shape[1], r0), s, -jnp.inf)
    return s
