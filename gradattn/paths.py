"""The named gradient paths of one head, and the backend's own choice among them.

Every path is a function ``(params, x, y, weights, causal) -> (loss, grads)`` with the same numbers
(the laws of docs/theory.md, or autodiff of the dense loss); they differ in how they get there:

=============  =========================================================================
``blocked``    the laws over blocks of query rows, nothing N x N (:mod:`gradattn.blocked`)
``dense``      the laws on whole N x N matrices (:func:`gradattn.laws.dense_loss_and_grads`)
``autodiff``   ``jax.value_and_grad`` of the dense loss, the reference
``pallas``     fused kernels (:mod:`gradattn.pallas`): compiled on a GPU, interpreted elsewhere
``auto``       per backend, read when traced: ``blocked`` on CPU, ``dense`` on GPU/TPU
=============  =========================================================================

A path's module is imported when the path is first resolved, so a program that trains with the
blocked pass never imports the Pallas kernels (or Triton behind them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import jax

from gradattn._backend import backend_choices
from gradattn.head import HeadParams

GradSource = Callable[..., tuple[jax.Array, HeadParams]]

GRAD_SOURCES: dict[str, tuple[str, str]] = {
    "blocked": ("gradattn.blocked", "blocked_loss_and_grads"),
    "dense": ("gradattn.laws", "dense_loss_and_grads"),
    "autodiff": ("gradattn.laws", "autodiff_loss_and_grads"),
    "pallas": ("gradattn.pallas", "pallas_loss_and_grads"),
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
