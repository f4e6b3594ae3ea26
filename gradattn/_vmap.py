"""One rule for how a function is batched under ``vmap``: in chunks, in turn.

:func:`chunked_vmap` wraps a function so that ``jax.vmap`` of it over a batch of S runs
``lax.map`` over chunks of ``chunk_size`` items, each chunk vmapped (``chunk_size=1``: one item at
a time, with no vmap inside). Values are identical to a plain ``vmap``; differentiation goes
through the plain function (a ``custom_jvp`` whose rule is ``jax.jvp`` of it), so only the
schedule of a vmap changes.

Two users, for two reasons:

* the blocked pass: a plain vmap over S seeds makes every (block x N) matrix S times larger, and
  past the caches that costs time per seed; chunks keep one chunk's working set in cache;
* the geometry's LAPACK calls (SVD, least squares) run one matrix at a time: on CPU, jaxlib runs a
  batched LAPACK kernel as a parallel map over XLA's intra-op thread pool and blocks its own worker
  while waiting for it; two such kernels scheduled at once on a pool of two threads wait for each
  other for ever (observed with jaxlib 0.10.2 on a 2-core machine, both pool threads in
  ``jax::ParallelBatchMap``). One matrix at a time never holds a batched LAPACK call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_vmap(fn, chunk_size: int | None):
    """``fn(*args)`` (positional pytree arguments; ``None`` allowed) whose ``vmap`` runs in chunks.

    ``chunk_size=None`` returns ``fn`` unchanged (a plain vmap). Otherwise the batch of S items is
    cut into ``S // chunk_size`` chunks run in turn by ``lax.map`` and a last, shorter chunk; the
    arguments that are not batched are shared by every chunk.
    """
    if chunk_size is None:
        return fn

    def plain(*args):
        return fn(*args)

    def vmap_rule(axis_size, in_batched, *args):
        leaves, tree = jax.tree.flatten(list(args))
        flags = jax.tree.leaves(list(in_batched))
        mapped = [a for a, b in zip(leaves, flags) if b]

        def on_mapped(*mapped_leaves, inner=plain):  # the unbatched leaves are closed over
            it = iter(mapped_leaves)
            return inner(*jax.tree.unflatten(tree, [next(it) if b else a for a, b in zip(leaves, flags)]))

        if chunk_size == 1:
            # One item at a time calls the wrapped function again, so that an outer vmap (a nested
            # batch) meets this rule too instead of batching the plain function.
            out = jax.lax.map(lambda m: on_mapped(*m, inner=with_jvp), mapped)
            return out, jax.tree.map(lambda _: True, out)
        per_chunk = jax.vmap(on_mapped)
        if axis_size <= chunk_size:
            out = per_chunk(*mapped)
        else:
            full = axis_size - axis_size % chunk_size
            groups = [a[:full].reshape((full // chunk_size, chunk_size) + a.shape[1:]) for a in mapped]
            out = jax.lax.map(lambda g: per_chunk(*g), groups)
            out = jax.tree.map(lambda a: a.reshape((full,) + a.shape[2:]), out)
            if full < axis_size:
                rest = per_chunk(*[a[full:] for a in mapped])
                out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)
        return out, jax.tree.map(lambda _: True, out)

    chunked = jax.custom_batching.custom_vmap(plain)
    chunked.def_vmap(vmap_rule)
    with_jvp = jax.custom_jvp(lambda *args: chunked(*args))
    with_jvp.defjvp(lambda primals, tangents: jax.jvp(plain, primals, tangents))
    return with_jvp
