"""The first-order laws of every head inside a deep transformer (:class:`gradattn.nn.Transformer`).

* :mod:`~gradattn.deep.laws`: :func:`head_laws`, the laws of every head with u^h from the whole
  network, and :func:`deep_law_errors`, their check against autodiff.

The deep experiment that trains such a model and measures its heads is
:mod:`gradattn.experiments.deep`.
"""

from gradattn.deep.laws import HeadLaws, deep_law_errors, head_laws

__all__ = ["HeadLaws", "deep_law_errors", "head_laws"]
