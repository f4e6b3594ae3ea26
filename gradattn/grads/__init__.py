"""The named gradient paths of one head, and the backend's own choice among them.

Every path is a function ``(params, x, y, weights, causal) -> (loss, grads)`` with the same numbers
(the laws of docs/theory.md, or autodiff of the dense loss); they differ in how they get there:

=============  =========================================================================
``blocked``    the laws over blocks of query rows, nothing N x N (:mod:`gradattn.grads.blocked`)
``dense``      the laws on whole N x N matrices (:func:`gradattn.grads.dense.dense_loss_and_grads`)
``autodiff``   ``jax.value_and_grad`` of the dense loss, the reference
``pallas``     fused kernels (:mod:`gradattn.grads.pallas`): compiled on a GPU, interpreted elsewhere
``auto``       per backend, read when traced: ``blocked`` on CPU, ``dense`` on GPU/TPU
=============  =========================================================================

A path's module is imported when the path is first resolved, so a program that trains with the
blocked pass never imports the Pallas kernels (or Triton behind them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from gradattn._backend import backend_choices
from gradattn.head import HeadParams, dense_loss


class GradPath(Protocol):
    """The contract of a gradient path: one sequence ``x (N, d_in)``, labels ``y (N,)``, optional
    per-token ``weights (N,)`` and a static bool ``causal`` give ``(loss, grads)``: the weighted
    mean cross-entropy of :func:`gradattn.head.dense_loss` and its gradient with respect to the
    :class:`~gradattn.head.HeadParams`, equal (to rounding) on every path. Public paths validate
    their input at the door, so that checks run when a step is traced."""

    def __call__(self, params: HeadParams, x: jax.Array, y: jax.Array, weights: jax.Array | None = None,
                 causal: bool = True) -> tuple[jax.Array, HeadParams]: ...


GradSource = Callable[..., tuple[jax.Array, HeadParams]]
"""Any callable meeting the :class:`GradPath` contract."""


class BlockedPass(NamedTuple):
    """What one fused pass returns: the loss and the gradient at every position (a pytree).

    Attributes:
      loss: scalar L.
      token_losses: (N,) CE_i = -log softmax(z_i)[y_i].
      dq: (N, d_k) dL/dQ.    dk: (N, d_k) dL/dK.    dv: (N, d_v) dL/dV.
      dw_o: (d_v, C) dL/dW_O.
    """

    loss: jax.Array
    token_losses: jax.Array
    dq: jax.Array
    dk: jax.Array
    dv: jax.Array
    dw_o: jax.Array

GRAD_SOURCES: dict[str, tuple[str, str]] = {
    "blocked": ("gradattn.grads.blocked", "blocked_loss_and_grads"),
    "dense": ("gradattn.grads.dense", "dense_loss_and_grads"),
    "autodiff": ("gradattn.grads.dense", "autodiff_loss_and_grads"),
    "pallas": ("gradattn.grads.pallas", "pallas_loss_and_grads"),
}
"""The named paths: name -> (module, function), imported on first use by :func:`resolve_grad_source`."""

GRAD_SOURCE_NAMES: tuple[str, ...] = ("auto", *GRAD_SOURCES)
"""Every name :func:`resolve_grad_source` accepts."""


def _load(name: str) -> GradSource:
    module, attr = GRAD_SOURCES[name]
    return getattr(importlib.import_module(module), attr)


def auto_loss_and_grads(params, x, y, weights=None, causal=True):
    """The backend's own choice of path, read when traced (``jax.default_backend()``): the blocked
    pass on CPU, the dense laws on GPU and TPU (measured; see benchmarks/README.md)."""
    return _load(backend_choices().grad_source)(params, x, y, weights, causal)


def resolve_grad_source(grad_source) -> GradSource:
    """A gradient path by name (:data:`GRAD_SOURCE_NAMES`) or as a callable
    ``(params, x, y, weights, causal) -> (loss, grads)``, returned as it is."""
    if callable(grad_source):
        return grad_source
    if grad_source == "auto":
        return auto_loss_and_grads
    if isinstance(grad_source, str) and grad_source in GRAD_SOURCES:
        return _load(grad_source)
    names = ", ".join(repr(k) for k in GRAD_SOURCE_NAMES)
    raise ValueError(
        f"grad_source must be one of {names} or a callable (params, x, y, weights, causal) -> (loss, grads), "
        f"got {grad_source!r}"
    )


def batch_loss_and_grads(path: GradSource, params: HeadParams, x, y, weights, causal: bool):
    """The mean over a batch (x (B, N, d_in), y (B, N)) of each sequence's loss and gradients from
    ``path``, vmapped over the sequences; weights (N,) shared or (B, N), or None.

    The autodiff path differentiates the batch's mean loss itself (``jax.value_and_grad`` of the
    mean of the sequences' dense losses), the reference the laws are held to; by linearity that is
    the mean of the sequences' gradients, to rounding. Input is trusted (checked by the caller)."""
    w_axis = None if weights is None or np.ndim(weights) == 1 else 0
    if path is _load("autodiff"):

        def batch_loss(p):
            losses = jax.vmap(lambda xb, yb, wb: dense_loss(p, xb, yb, wb, causal), in_axes=(0, 0, w_axis))(x, y, weights)
            return jnp.mean(losses)

        return jax.value_and_grad(batch_loss)(params)
    losses, grads = jax.vmap(lambda xb, yb, wb: path(params, xb, yb, wb, causal), in_axes=(0, 0, w_axis))(x, y, weights)
    return jnp.mean(losses), jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
