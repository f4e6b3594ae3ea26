"""One rule for how a function is batched under ``vmap``: in groups, in turn.

:func:`grouped_vmap` wraps a function so that ``jax.vmap`` of it over a batch of S runs
``lax.map`` over groups of ``group_size`` items, each group vmapped (``group_size=1``: one item at
a time, with no vmap inside). Values are identical to a plain ``vmap``; differentiation goes
through the plain function (a ``custom_jvp`` whose rule is ``jax.jvp`` of it), so only the
schedule of a vmap changes.

Two users, for two reasons:

* the blocked pass: a plain vmap over S seeds makes every (block x N) matrix S times larger, and
  past the caches that costs time per seed; groups keep one group's working set in cache;
* the geometry's LAPACK calls (SVD, least squares) run one matrix at a time: on CPU, jaxlib runs a
  batched LAPACK kernel as a parallel map over XLA's intra-op thread pool and blocks its own worker
  while waiting for it; two such kernels scheduled at once on a pool of two threads wait for each
  other for ever (observed with jaxlib 0.10.2 on a 2-core machine, both pool threads in
  ``jax::ParallelBatchMap``). One matrix at a time never holds a batched LAPACK call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_vmap(fn, group_size: int | None):
    """``fn(*args)`` (positional pytree arguments; ``None`` allowed) whose ``vmap`` runs in groups.

    ``group_size=None`` returns ``fn`` unchanged (a plain vmap). Otherwise the batch of S items is
    cut into ``S // group_size`` groups run in turn by ``lax.map`` and a last, shorter group; the
    arguments that are not batched are shared by every group.
    """
    if group_size is None:
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

        if group_size == 1:
            # One item at a time calls the wrapped function again, so that an outer vmap (a nested
            # batch) meets this rule too instead of batching the plain function.
            out = jax.lax.map(lambda m: on_mapped(*m, inner=with_jvp), mapped)
            return out, jax.tree.map(lambda _: True, out)
        per_group = jax.vmap(on_mapped)
        if axis_size <= group_size:
            out = per_group(*mapped)
        else:
            full = axis_size - axis_size % group_size
            groups = [a[:full].reshape((full // group_size, group_size) + a.shape[1:]) for a in mapped]
            out = jax.lax.map(lambda g: per_group(*g), groups)
            out = jax.tree.map(lambda a: a.reshape((full,) + a.shape[2:]), out)
            if full < axis_size:
                rest = per_group(*[a[full:] for a in mapped])
                out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)
        return out, jax.tree.map(lambda _: True, out)

    grouped = jax.custom_batching.custom_vmap(plain)
    grouped.def_vmap(vmap_rule)
    with_jvp = jax.custom_jvp(lambda *args: grouped(*args))
    with_jvp.defjvp(lambda primals, tangents: jax.jvp(plain, primals, tangents))
    return with_jvp
