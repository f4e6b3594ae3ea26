"""Training one head: optax optimisers, a pure step, and a whole run as one ``lax.scan``.

Every update rule is an optax ``GradientTransformation`` acting on a :class:`~gradattn.head.HeadParams`
pytree, so any optax optimiser plugs in. The paper's two readings of "EM-like" training:

* :func:`em_like` (the paper's): one gradient step on all four matrices at once, but with
  two learning rates, ``value_lr`` on ``W_V`` (the M-step: values are responsibility-weighted
  prototypes) and ``routing_lr`` on ``W_Q, W_K, W_O`` (the routing and read-out)::

      W_V <- W_V - value_lr * dL/dW_V          W_{Q,K,O} <- W_{Q,K,O} - routing_lr * dL/dW_{Q,K,O}

* :func:`alternating`: strictly alternating value-only and routing-only steps (a block-coordinate
  reading of EM): for ``period`` steps only ``W_V`` moves, then for ``period`` steps only
  ``W_Q, W_K, W_O`` move, and so on, starting with the values at step 0.

:func:`make_step` builds ``step(state, x, y) -> (state, metrics)`` from an optimiser and a gradient
source (``"auto"`` by default: the laws, on the path fastest on the backend), on one sequence or a
batch of sequences (the mean of their gradients); :func:`optimizer_step` is its update, the one every
training loop of the library takes. :func:`train` runs ``steps`` of them as one ``lax.scan``
(PureJaxRL style), on fixed data or a fresh draw per step, so a whole run jit-compiles and vmaps
over parameters and data.
"""

# No `from __future__ import annotations` here: the NamedTuples' field annotations must be objects,
# not strings, for pdoc to resolve them (their generated __new__ has no module to look names up in).
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradattn._checks import (
    check_array,
    check_divides_steps,
    check_float32,
    check_head_inputs,
    check_int,
    check_number,
    concrete,
    is_traced,
)
from gradattn._progress import with_ticks
from gradattn.grads import batch_loss_and_grads, resolve_grad_source
from gradattn.head import HeadParams

VALUE = "value"
ROUTING = "routing"

Probe = Callable[["TrainState", "TrainState", jax.Array, jax.Array], Any]


class TrainState(NamedTuple):
    """The state of a run (a pytree).

    Attributes:
      params: HeadParams, the current parameters.
      opt_state: the optax state of the optimiser.
      step: int32 scalar, the number of updates applied so far.
    """

    params: HeadParams
    opt_state: Any
    step: jax.Array


def param_labels() -> HeadParams:
    """The optax labels of the two timescales: ``w_v`` is ``"value"``, ``w_q, w_k, w_o`` ``"routing"``."""
    # The same pytree with a string at each leaf (optax's labels), where HeadParams declares arrays.
    return HeadParams(w_q=ROUTING, w_k=ROUTING, w_v=VALUE, w_o=ROUTING)  # type: ignore[arg-type]


def _check_lr(name: str, lr, fn: str) -> None:
    """A learning rate is an optax schedule, a traced scalar (e.g. vmapped over), or a finite number >= 0.

    Anything else (a string such as ``"0.1"``, a bool, a list) is a TypeError here, at construction:
    optax would accept it and fail only inside the first update. A number must also be finite in
    float32, where the head's updates are computed, and non-zero there unless it is 0: ``1e39``
    would be inf (every loss NaN) and ``1e-50`` would be 0 (a run that never moves).
    """
    if callable(lr) or is_traced(lr):
        return
    try:
        val = check_number(name, lr, fn, minimum=0.0)
    except TypeError:
        raise TypeError(
            f"{fn}: {name} must be a number or an optax schedule (a callable step -> rate), "
            f"got {lr!r} of type {type(lr).__name__}"
        ) from None
    check_float32(fn, {name: val})


def sgd(lr) -> optax.GradientTransformation:
    """Plain gradient descent, ``theta <- theta - lr * dL/dtheta`` on all four matrices."""
    _check_lr("lr", lr, "sgd")
    return optax.sgd(lr)


def em_like(value_lr=0.1, routing_lr=0.01, base: Callable[..., optax.GradientTransformation] = optax.sgd):
    """The paper's two-timescale (EM-like) optimiser, as an ``optax.multi_transform``.

    ``base(value_lr)`` updates ``w_v`` and ``base(routing_lr)`` updates ``w_q, w_k, w_o`` (labels from
    :func:`param_labels`). With the default ``base=optax.sgd`` one step is::

        W_V <- W_V - value_lr * dL/dW_V,    W_{Q,K,O} <- W_{Q,K,O} - routing_lr * dL/dW_{Q,K,O}

    Any optax optimiser factory taking the learning rate as its first argument works as ``base``
    (``optax.adam``, ``optax.sgd`` with momentum via ``functools.partial``, ...).
    """
    _check_lr("value_lr", value_lr, "em_like")
    _check_lr("routing_lr", routing_lr, "em_like")
    if not callable(base):
        raise TypeError(f"em_like: base must be an optax optimiser factory such as optax.sgd, got {base!r}")
    return optax.multi_transform({VALUE: base(value_lr), ROUTING: base(routing_lr)}, param_labels())


def alternating(value_lr=0.1, routing_lr=0.01, period: int = 1, base: Callable[..., optax.GradientTransformation] = optax.sgd):
    """Strictly alternating value-only and routing-only steps (block-coordinate EM).

    Step ``t`` (counted from 0) is a value step when ``(t // period) % 2 == 0``: only ``w_v`` moves,
    by ``base(value_lr)``; otherwise it is a routing step: only ``w_q, w_k, w_o`` move, by
    ``base(routing_lr)``. With ``period=1``: value, routing, value, routing, ...

    Each group's optimiser is wrapped in ``optax.transforms.conditionally_mask``, which counts the
    steps itself: on the other group's steps its update is exactly zero and its own state (momenta,
    Adam's step count) is left untouched, so it sees only the steps on which it acts.
    """
    _check_lr("value_lr", value_lr, "alternating")
    _check_lr("routing_lr", routing_lr, "alternating")
    period = check_int("period", period, "alternating")
    if not callable(base):
        raise TypeError(f"alternating: base must be an optax optimiser factory such as optax.sgd, got {base!r}")
    phase = lambda t: (t // period) % 2  # noqa: E731
    return optax.multi_transform(
        {
            VALUE: optax.transforms.conditionally_mask(base(value_lr), lambda t: phase(t) == 0),
            ROUTING: optax.transforms.conditionally_mask(base(routing_lr), lambda t: phase(t) == 1),
        },
        param_labels(),
    )


def init_state(params: HeadParams, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState` at step 0."""
    _check_optimizer(optimizer, "init_state")
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def _check_optimizer(optimizer, fn: str) -> None:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"{fn}: optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}")


def optimizer_step(optimizer: optax.GradientTransformation, grads, opt_state, params):
    """One optimiser step on a gradient: ``(new_params, new_opt_state)``.

    ``updates, new_opt_state = optimizer.update(grads, opt_state, params)``, then
    ``new_params = optax.apply_updates(params, updates)``. ``params`` and ``grads`` are any pytrees
    of one structure (a :class:`~gradattn.head.HeadParams`, a flax ``nnx.State``); pure, jit- and
    vmap-able. :func:`make_step` (gradients from a law path), the deep run and the studies
    (gradients from ``jax.value_and_grad``) all take their steps through it.
    """
    _check_optimizer(optimizer, "optimizer_step")
    grads_tree, params_tree = str(jax.tree.structure(grads)), str(jax.tree.structure(params))
    if grads_tree != params_tree:
        raise ValueError(
            f"optimizer_step: grads and params must be pytrees of one structure, got {grads_tree} and {params_tree}"
        )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _check_data(params, x, y, weights, fn: str) -> bool:
    """The data of one step: one sequence (x (N, d_in), y (N,)) or a batch (x (B, N, d_in),
    y (B, N)), told apart by the rank of x; weights (N,), or (B, N) for a batch. Returns whether it
    is a batch. Each sequence's own checks (sizes against params, dtypes, labels in range) are the
    gradient path's; a concrete batch has them here, sequence by sequence, since under ``vmap``
    its values are no longer concrete."""
    check_array("x", x, fn)
    check_array("y", y, fn)
    xs, ys = tuple(np.shape(x)), tuple(np.shape(y))
    if len(xs) not in (2, 3):
        raise ValueError(
            f"{fn}: x must be (N, d_in) for one sequence or (B, N, d_in) for a batch of B sequences, got shape {xs}"
        )
    batch = len(xs) == 3
    if ys != xs[:-1]:
        want = f"(B, N) = {xs[:-1]}" if batch else f"(N,) = {xs[:-1]}"
        raise ValueError(f"{fn}: y must have shape {want} to match x of shape {xs}, got y of shape {ys}")
    if weights is not None:
        check_array("weights", weights, fn)
        ws = tuple(np.shape(weights))
        if ws != xs[-2:-1] and not (batch and ws == xs[:-1]):
            want = f"(N,) = {xs[-2:-1]} or (B, N) = {xs[:-1]}" if batch else f"(N,) = {xs[-2:-1]}"
            raise ValueError(f"{fn}: weights must have shape {want} to match x of shape {xs}, got shape {ws}")
    if not batch:
        return False
    if xs[0] < 1:
        raise ValueError(f"{fn}: a batch must hold at least one sequence, got x of shape {xs}")
    xc, yc, wc = concrete(x), concrete(y), None if weights is None else concrete(weights)
    if xc is not None and yc is not None and (weights is None or wc is not None):
        for b in range(xs[0]):
            w_b = None if wc is None else (wc[b] if wc.ndim == 2 else wc)
            check_head_inputs(params, xc[b], yc[b], w_b, fn=f"{fn} (sequence {b} of the batch)")
    return True


def make_step(optimizer: optax.GradientTransformation, grad_source="auto", weights=None, causal: bool = True):
    """A pure training step ``step(state, x, y, weights=None) -> (new_state, metrics)``.

    One step: ``(L, g) = grad_source(params, x, y, weights, causal)``, then
    ``(params, opt_state) = optimizer_step(optimizer, g, opt_state, params)`` (:func:`optimizer_step`).

    ``x`` is one sequence (N, d_in) with ``y`` (N,), or a batch of B sequences (B, N, d_in) with
    ``y`` (B, N); the rank of ``x`` decides, and shapes that do not match are a ValueError naming
    them. For a batch, ``L`` is the mean over the sequences of each one's (weighted) mean loss and
    ``g`` its gradient: the mean of the B sequences' gradients, each from ``grad_source`` (vmapped
    over the batch), so every path serves batches; under ``"autodiff"``, ``jax.value_and_grad`` of
    the batch's mean loss itself (the same to rounding).

    Args:
      optimizer: any optax GradientTransformation over HeadParams.
      grad_source: ``"auto"`` (default: the blocked pass on CPU, the dense laws on GPU/TPU),
        ``"blocked"``, ``"dense"``, ``"autodiff"``, ``"pallas"``, or a callable
        ``(params, x, y, weights, causal) -> (loss, grads)`` of one sequence (see
        :func:`gradattn.grads.resolve_grad_source`).
      weights: optional position weights, fixed for the run: (N,), shared by every sequence of a
        batch, or (B, N) for a batch. A ``weights`` given to ``step`` replaces them for that step.
      causal: mask future keys.
    Returns:
      ``step``; its metrics are scalars: ``loss`` (before the update), ``grad_norm_value``
      (||dL/dW_V||) and ``grad_norm_routing`` (||(dL/dW_Q, dL/dW_K, dL/dW_O)||).
    """
    _check_optimizer(optimizer, "make_step")
    return _make_step(optimizer, resolve_grad_source(grad_source), weights, causal, "step")


def _make_step(optimizer, loss_and_grads, default_weights, causal, fn: str):
    """:func:`make_step` with the gradient path resolved; ``fn`` names the data's errors."""

    def step(state: TrainState, x: jax.Array, y: jax.Array, weights=None):
        weights = default_weights if weights is None else weights
        if _check_data(state.params, x, y, weights, fn):
            loss, grads = batch_loss_and_grads(loss_and_grads, state.params, x, y, weights, causal)
        else:
            loss, grads = loss_and_grads(state.params, x, y, weights, causal)
        params, opt_state = optimizer_step(optimizer, grads, state.opt_state, state.params)
        metrics = {
            "loss": loss,
            "grad_norm_value": optax.tree_utils.tree_norm(grads.w_v),
            "grad_norm_routing": optax.tree_utils.tree_norm((grads.w_q, grads.w_k, grads.w_o)),
        }
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return step


def params_probe(state_before: TrainState, state_after: TrainState, x: jax.Array, y: jax.Array) -> HeadParams:
    """The default checkpoint probe: the parameters at the checkpoint (before its step)."""
    del state_after, x, y
    return state_before.params


def train(
    params: HeadParams,
    x,
    y,
    optimizer: optax.GradientTransformation,
    steps: int,
    *,
    grad_source="auto",
    weights=None,
    causal: bool = True,
    checkpoint_every: int | None = None,
    probe: Probe | None = None,
):
    """``steps`` updates of :func:`make_step`, as one ``lax.scan``: on one sequence or one batch
    throughout (full-batch training), or on fresh data at every step from ``data(t) -> (x, y)``.

    Pure and jit-compatible (``optimizer``, ``steps``, ``grad_source``, ``causal``,
    ``checkpoint_every``, ``probe`` and a data function are static Python values; close over them),
    and vmap-able over ``params``, ``x`` and ``y``.

    Args:
      params: HeadParams at step 0.
      x, y: the data of every step: x (N, d_in) and integer targets y (N,) for one sequence, or
        x (B, N, d_in) and y (B, N) for a batch (as in :func:`make_step`). Or ``x`` a callable
        ``data(t) -> (x, y)`` and ``y`` None: the data of step t (an int32 scalar), called once per
        step inside the scan, as in :func:`train_arms` (e.g. a batch sampled from a key folded with t).
      optimizer: an optax GradientTransformation (e.g. :func:`sgd`, :func:`em_like`).
      steps: number of updates (a positive integer of any integral type, e.g. ``np.int64``).
      grad_source, weights, causal: as in :func:`make_step`.
      checkpoint_every: ``k`` dividing ``steps``; if given, ``probe(state_before, state_after, x, y)``
        is recorded for the first step of each segment of ``k`` steps, i.e. at steps 0, k, 2k, ...
        (``steps // k`` checkpoints), by :func:`scan_steps`, with that step's data (a data
        function is called once more there, for the probe).
      probe: any pure function of ``(state_before, state_after, x, y)`` returning a pytree; by
        default :func:`params_probe` (the parameters before the checkpoint's step).
    Returns:
      ``(final_state, history)`` where history holds ``loss`` (steps,), the loss before every
      update, ``grad_norm_value`` and ``grad_norm_routing`` (steps,), and, with checkpoints,
      ``checkpoints``: the probe's pytree with a leading axis of ``steps // k``.
    """
    steps = check_int("steps", steps, "train")
    _check_optimizer(optimizer, "train")
    if checkpoint_every is not None:
        checkpoint_every = check_int("checkpoint_every", checkpoint_every, "train")
        check_divides_steps("checkpoint_every", checkpoint_every, steps, "train")
    if probe is not None and checkpoint_every is None:
        raise ValueError("train: probe is given but checkpoint_every is None; pass checkpoint_every=k to record it")
    if probe is not None and not callable(probe):
        raise TypeError(f"train: probe must be a callable (state_before, state_after, x, y) -> pytree, got {probe!r}")
    probe = params_probe if probe is None else probe
    if callable(x):
        if y is not None:
            raise TypeError(f"train: y must be None when x is a data function t -> (x, y), got {type(y).__name__}")
        data = x
    else:
        if y is None:
            raise TypeError("train: y is None; give the targets y, or a data function t -> (x, y) as x with y None")
        _check_data(params, x, y, weights, "train")
        data = lambda t: (x, y)  # noqa: E731

    step = _make_step(optimizer, resolve_grad_source(grad_source), weights, causal, "train")
    final, history, checkpoints = _scan_on_data(
        step, init_state(params, optimizer), data, steps, checkpoint_every,
        lambda before, after, t: probe(before, after, *data(t)),
    )
    if checkpoints is not None:
        history["checkpoints"] = checkpoints
    return final, history


def _scan_on_data(step, carry, data, steps: int, every: int | None = None, probe=None):
    """:func:`scan_steps` of ``step(carry, x, y)`` on ``(x, y) = data(t)``, called once per step t
    of the scan body (shared by every arm of :func:`train_arms`); ``probe(before, after, t)``."""

    def body(carry, t):
        x, y = data(t)
        return step(carry, x, y)

    return scan_steps(body, carry, steps, every, probe)


def scan_steps(step, carry, steps: int, every: int | None = None, probe=None):
    """``steps`` calls of ``step(carry, t) -> (carry, out)``, t = 0, 1, ..., as one ``lax.scan``.

    With ``every = k`` (dividing ``steps``) the scan is nested, segments of k steps outside and the
    steps inside, and ``probe(carry_before, carry_after, t)`` is recorded for the first step of
    each segment, t = 0, k, 2k, ... Returns ``(final carry, outs (steps, ...), records)``, with
    ``records`` the probe's pytree with a leading axis of ``steps // k`` (``None`` without ``every``).
    Callers validate ``steps`` and ``every``; :func:`train` and the deep run both run on this.
    Traced by a sweep with progress on, the scan reports its steps to the progress bar
    (:mod:`gradattn._progress`; the numbers are the same).
    """
    step = with_ticks(step, steps)
    if every is None:
        final, outs = jax.lax.scan(step, carry, jnp.arange(steps))
        return final, outs, None

    def segment(carry, t0):
        after, first = step(carry, t0)
        record = probe(carry, after, t0)
        end, rest = jax.lax.scan(step, after, t0 + 1 + jnp.arange(every - 1))
        return end, (jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest), record)

    final, (outs, records) = jax.lax.scan(segment, carry, jnp.arange(0, steps, every))
    return final, jax.tree.map(lambda a: a.reshape((steps,) + a.shape[2:]), outs), records


def train_arms(params: HeadParams, optimizers: dict, data: Callable[[jax.Array], tuple], steps: int, *,
               grad_source="auto", checkpoint_every: int | None = None):
    """Several arms trained from the same ``params`` in one ``lax.scan``, paired step by step.

    Every arm (``name -> optax transformation``) takes its step t on the same ``data(t) -> (x, y)``,
    which is called once per step: with a fresh sequence per step (``data`` sampling from a key
    folded with t) the arms still see the same sequences, as they would on one fixed sequence.
    Pure and jit/vmap-able (``optimizers``, ``data``, ``steps``, ``grad_source`` and
    ``checkpoint_every`` are static).

    Args:
      params: HeadParams at step 0, shared by every arm.
      optimizers: a non-empty dict of optax GradientTransformations, by arm name.
      data: ``t -> (x, y)``, the data of step t (an int32 scalar): one sequence, x (N, d_in) and
        y (N,), or a batch, x (B, N, d_in) and y (B, N) (as in :func:`make_step`).
      steps: number of updates per arm.
      grad_source: as in :func:`make_step`.
      checkpoint_every: ``k`` dividing ``steps``: the parameters of every arm before steps 0, k, 2k, ...
    Returns:
      ``(final, losses, checkpoints)``: ``{name: TrainState}``, ``{name: (steps,)}`` the loss before
      every update, and ``{name: HeadParams}`` with a leading axis of ``steps // k`` (``None``
      without ``checkpoint_every``).
    """
    steps = check_int("steps", steps, "train_arms")
    if not isinstance(optimizers, dict) or not optimizers:
        raise TypeError(f"train_arms: optimizers must be a non-empty dict of optax transformations by arm name, got {optimizers!r}")
    for optimizer in optimizers.values():
        _check_optimizer(optimizer, "train_arms")
    if not callable(data):
        raise TypeError(f"train_arms: data must be a callable t -> (x, y), got {data!r}")
    if checkpoint_every is not None:
        checkpoint_every = check_int("checkpoint_every", checkpoint_every, "train_arms")
        check_divides_steps("checkpoint_every", checkpoint_every, steps, "train_arms")
    loss_and_grads = resolve_grad_source(grad_source)
    step_of = {name: _make_step(optimizer, loss_and_grads, None, True, "train_arms")
               for name, optimizer in optimizers.items()}

    def step(states, x, y):
        new = {name: step_of[name](states[name], x, y) for name in optimizers}
        return {name: s for name, (s, _) in new.items()}, {name: m["loss"] for name, (_, m) in new.items()}

    start = {name: init_state(params, optimizer) for name, optimizer in optimizers.items()}
    return _scan_on_data(step, start, data, steps, checkpoint_every,
                         lambda before, after, t: {name: s.params for name, s in before.items()})
