"""Run a pure experiment ``fn(key) -> pytree`` over many seeds: vmap, chunks, devices.

An experiment is a pure function of a PRNG key (PureJaxRL style); seeds, memory and devices are
handled here, once. ``sweep(fn, seeds)`` evaluates ``jit(vmap(fn))`` over the keys
:func:`seed_key` of each seed, and shards each call over a 1-D mesh of all visible devices.

Reproducibility. XLA may round differently when the *shape* of a vmapped computation changes (a
batch of 1 and a batch of 5 can differ in the last bit of a float32 matmul), but never with a
seed's position inside a batch of a given shape. So every call has the same shape: ``chunk_size``
seeds per device, ``chunk_size * n_devices`` per call, the last call padded with copies of its last
key (the padding is computed and dropped). A seed's result then depends only on ``fn``, its key and
``chunk_size``: it is bit-identical whether it runs alone, among any other seeds, in any order, or
on any number of devices (the tests check this). Changing ``chunk_size`` may change the last bits.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import reprlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradattn._backend import backend_choices
from gradattn._checks import MAX_SEED, check_int
from gradattn._progress import StepBar, StepCount, counting_steps

SEED_AXIS = "seeds"




def seed_ints(seeds, fn: str = "sweep") -> list[int]:
    """``seeds`` as a list of Python ints: any 1-D integer array-like of seeds in ``[0, 2^64)`` (a
    sequence of Python/numpy/0-d jax integers, a numpy or jax integer array).

    Floats (even integral ones), bools, 2-D arrays, seeds outside ``[0, 2^64)`` and empty seeds are
    ValueErrors naming ``fn``; a non-iterable is a TypeError.
    """
    if isinstance(seeds, (jax.Array, np.ndarray)):
        if seeds.ndim != 1:
            raise ValueError(f"{fn}: an array of integer seeds must be 1-D (n,), got shape {seeds.shape}")
        if seeds.size and not jnp.issubdtype(seeds.dtype, jnp.integer):  # bool is not an integer dtype
            raise ValueError(f"{fn}: every seed must be a non-negative integer, got an array of dtype {seeds.dtype} for seeds")
        seeds = np.asarray(seeds).tolist()
    else:
        try:
            seeds = list(seeds)
        except TypeError:
            raise TypeError(f"{fn}: seeds must be a sequence of integers or a key array, got {type(seeds).__name__}") from None
    ints = []
    for s in seeds:
        try:
            i = None if isinstance(s, (bool, np.bool_)) else operator.index(s)  # ints, numpy and 0-d jax ints
        except TypeError:
            i = None
        if i is None or i < 0:
            raise ValueError(f"{fn}: every seed must be a non-negative integer, got {s!r}")
        if i > MAX_SEED:
            raise ValueError(f"{fn}: seeds must be below 2^64 = {MAX_SEED + 1}, got {i}")
        ints.append(i)
    if not ints:
        raise ValueError(f"{fn}: seeds is empty; give at least one seed")
    return ints


def experiment_seeds(seeds, fn: str) -> list[int]:
    """The seeds of an experiment: a positive int n means 0..n-1, anything else :func:`seed_ints`;
    they must be distinct (a repeated seed would be a repeated run, counted twice in every mean)."""
    if isinstance(seeds, (bool, np.bool_)):
        raise TypeError(f"{fn}: seeds must be a positive int or a sequence of non-negative ints, got a bool")
    if isinstance(seeds, (int, np.integer)):
        seeds = list(range(check_int("seeds", seeds, fn)))
    seeds = seed_ints(seeds, fn)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{fn}: seeds must be distinct, got {seeds}")
    return seeds


def default_chunk_size(backend: str | None = None) -> int:
    """Seeds vmapped per device per call when none is given: the backend's choice (1 on CPU, 256 on
    GPU/TPU; see :mod:`gradattn._backend`)."""
    return backend_choices(backend).chunk_size


def _threefry_default() -> bool:
    return jax.random.key_data(jax.random.key(0)).shape == (2,)


def _keys_from_ints(ints: list[int], fn: str) -> jax.Array:
    """Typed keys (n,) for validated integer seeds; distinct seeds give distinct keys.

    With JAX's default threefry keys, seed s gets the key data ``[s >> 32, s & 0xFFFFFFFF]``: for
    s < 2^32 that is exactly ``jax.random.key(s)``, and for larger seeds it is what
    ``jax.random.key(s)`` gives with 64-bit integers enabled (without them JAX would keep only the
    low 32 bits, so 0 and 2^32 would share a key). Built with numpy in one go, so a million seeds
    take milliseconds.
    """
    if _threefry_default():
        data = np.asarray(ints, dtype=np.uint64)
        pairs = np.stack([data >> np.uint64(32), data & np.uint64(0xFFFFFFFF)], axis=-1).astype(np.uint32)
        return jax.random.wrap_key_data(jnp.asarray(pairs))
    big = [i for i in ints if i >= 2**32]
    if big:
        impl = jax.config.jax_default_prng_impl  # type: ignore[attr-defined]  # jax < 0.11 types no flag attributes
        raise ValueError(f"{fn}: with the PRNG implementation {impl!r} seeds must be below 2^32, got {big[0]}")
    return jnp.stack([jax.random.key(i) for i in ints])


def seed_key(seed: int) -> jax.Array:
    """The typed PRNG key of one integer seed in ``[0, 2^64)``, as every sweep builds it."""
    return _keys_from_ints(seed_ints([seed], "seed_key"), "seed_key")[0]


def seed_keys(seeds) -> jax.Array:
    """Typed PRNG keys (n,) from integer seeds (see :func:`seed_key`) or from keys.

    ``seeds`` may be any 1-D integer array-like of seeds in ``[0, 2^64)`` (a sequence of Python/numpy
    integers, a numpy or jax integer array), a 1-D typed key array, or a raw ``uint32`` key array of
    shape (n, 2). Floats (even integral ones), bools, other 2-D arrays and empty seeds are rejected.
    No two distinct integer seeds share a key.
    """
    if isinstance(seeds, jax.Array) and jnp.issubdtype(seeds.dtype, jax.dtypes.prng_key):
        if seeds.ndim != 1:
            raise ValueError(f"sweep: a key array for seeds must be 1-D (n,), got shape {seeds.shape}")
        return seeds
    if isinstance(seeds, (jax.Array, np.ndarray)) and np.ndim(seeds) == 2 and np.asarray(seeds).dtype == np.uint32:
        return jax.random.wrap_key_data(jnp.asarray(seeds))
    if isinstance(seeds, (jax.Array, np.ndarray)) and np.ndim(seeds) != 1:
        raise ValueError(
            f"sweep: an array of integer seeds must be 1-D (n,), got shape {seeds.shape} "
            "(raw keys are uint32 of shape (n, 2); typed keys a key array (n,))"
        )
    return _keys_from_ints(seed_ints(seeds), "sweep")


def check_devices(devices, fn: str = "sweep") -> list:
    """``devices`` as a list: distinct ``jax.Device`` objects of this process and of one platform
    (``jax.devices()`` when None). A TypeError or ValueError naming ``devices`` and what was given
    otherwise, before anything is traced."""
    if devices is None:
        return jax.devices()
    if isinstance(devices, (str, bytes, jax.Device)) or not isinstance(devices, Iterable):
        raise TypeError(
            f"{fn}: devices must be a list of jax.Device objects (such as jax.local_devices()), "
            f"got {reprlib.repr(devices)} of type {type(devices).__name__}"
        )
    devices = list(devices)
    if not devices:
        raise ValueError(f"{fn}: devices is empty; give at least one jax.Device (such as jax.local_devices())")
    for d in devices:
        if not isinstance(d, jax.Device):
            raise TypeError(
                f"{fn}: devices must hold jax.Device objects (such as jax.local_devices()), "
                f"got {reprlib.repr(d)} of type {type(d).__name__} in devices"
            )
    if len(set(devices)) != len(devices):
        twice = next(d for i, d in enumerate(devices) if d in devices[:i])
        raise ValueError(f"{fn}: devices must be distinct, got {twice!r} twice")
    me = jax.process_index()
    for d in devices:
        if d.process_index != me:
            raise ValueError(
                f"{fn}: devices must be devices of this process (jax.local_devices()); {d!r} belongs to process "
                f"{d.process_index}, this is process {me}"
            )
    platforms = sorted({d.platform for d in devices})
    if len(platforms) > 1:
        raise ValueError(f"{fn}: devices must all be of one platform, got devices of {', '.join(platforms)}")
    return devices


def _check_distinct(keys: jax.Array) -> None:
    """A ValueError naming the first two positions of ``keys`` that hold the same key."""
    data = np.asarray(jax.random.key_data(keys)).reshape(keys.shape[0], -1)
    _, first, counts = np.unique(data, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        i = int(first[counts > 1].min())
        j = int(np.flatnonzero((data == data[i]).all(axis=1))[1])
        raise ValueError(
            f"sweep: seeds must be distinct, but seeds[{i}] and seeds[{j}] give the same key "
            "(the same run twice, counted twice in any statistic over seeds)"
        )


@functools.lru_cache(maxsize=32)
def _compiled(fn, devices: tuple, ticks: bool = False):
    """``jit(vmap(fn))`` sharded along the seed axis over ``devices`` (cached: one trace per fn),
    and the :class:`gradattn._progress.StepCount` of its training steps per call (counted when it
    is traced with ``ticks``: the program then reports its steps to the progress bar)."""
    mesh = Mesh(np.asarray(devices), (SEED_AXIS,))
    sharding = NamedSharding(mesh, PartitionSpec(SEED_AXIS))
    count = StepCount()
    body = counting_steps(jax.vmap(fn), count) if ticks else jax.vmap(fn)
    return jax.jit(body, in_shardings=sharding, out_shardings=sharding), sharding, count


def ticked_step_count(fn, devices) -> StepCount:
    """The training steps per call of ``fn`` compiled with step reports over ``devices`` (what
    :func:`sweep` with ``progress`` or ``ticks`` runs); counted once the program is traced."""
    return _compiled(fn, tuple(devices), True)[2]


def sweep(
    fn: Callable[[jax.Array], Any],
    seeds: Sequence[int] | jax.Array,
    *,
    chunk_size: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = False,
    ticks: bool = False,
):
    """``fn`` over every seed: ``out[i] = fn(seed_key(seeds[i]))``, stacked along axis 0.

    Args:
      fn: a pure function of one PRNG key returning a pytree of arrays. It is traced and compiled
        once, as ``jit(vmap(fn))`` over ``chunk_size * len(devices)`` keys.
      seeds: distinct integers in ``[0, 2^64)`` (a sequence, or a 1-D numpy or jax integer array),
        or a key array (n,) / raw uint32 keys (n, 2) of distinct keys. Distinct seeds never share a
        key; a repeated seed (or key) is a ValueError, since it would only compute the same run twice
        and count it twice in any statistic over seeds.
      chunk_size: seeds vmapped together on each device in one call (memory grows with it); the
        unit of bit-reproducibility (see the module docstring). Default :func:`default_chunk_size`
        (1 on CPU, 256 on GPU/TPU).
      devices: devices to shard each call over (1-D mesh along the seed axis): a list of distinct
        ``jax.Device`` objects of this process, of one platform; default: all visible devices,
        ``jax.devices()``. Anything else (device names such as ``"cpu"``, one device not in a list)
        is a TypeError or ValueError naming ``devices``.
      progress: show a tqdm bar of the training steps done (every training scan of ``fn`` reports
        every 1 % of its steps, :mod:`gradattn._progress`) and, once measured, the estimated time.
      ticks: compile ``fn`` with those step reports without showing a bar here (a caller that
        shows its own bar across several sweeps, :func:`gradattn.cluster.cluster_sweep`).
    Returns:
      the pytree of ``fn``'s output with numpy leaves of shape ``(n_seeds, ...)``.
    """
    if not callable(fn):
        raise TypeError(f"sweep: fn must be a callable key -> pytree, got {fn!r}")
    keys = seed_keys(seeds)
    n = keys.shape[0]
    _check_distinct(keys)
    chunk_size = default_chunk_size() if chunk_size is None else check_int("chunk_size", chunk_size, "sweep")
    devices = check_devices(devices)
    per_call = chunk_size * len(devices)

    run, sharding, count = _compiled(fn, tuple(devices), progress or ticks)

    starts = range(0, n, per_call)
    bar = StepBar(count, len(starts), f"{n} seeds, {per_call} per call") if progress else contextlib.nullcontext()
    with bar:
        return _run_calls(run, sharding, keys, starts, per_call)


def _run_calls(run, sharding, keys, starts, per_call):
    """``run`` on the keys in calls of ``per_call`` starting at ``starts`` (the last call padded
    with copies of its last key), the outputs as numpy arrays stacked over the keys."""
    pieces = []
    for start in starts:
        chunk = keys[start : start + per_call]
        m = chunk.shape[0]
        if m < per_call:
            chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], per_call - m, axis=0)])
        out = run(jax.device_put(chunk, sharding))
        pieces.append(jax.tree.map(lambda a, m=m: np.asarray(jax.device_get(a))[:m], out))
    if len(pieces) == 1:
        return pieces[0]
    return jax.tree.map(lambda *a: np.concatenate(a, axis=0), *pieces)
