"""Submodules of a package imported on first attribute access (PEP 562), for those that pull in
flax: ``import gradattn`` stays light."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_submodules(package: str, names: frozenset[str], namespace: dict) -> tuple[Callable, Callable]:
    """The module ``__getattr__`` and ``__dir__`` of ``package`` (whose globals are ``namespace``)
    that import its submodules ``names`` on first access."""

    def __getattr__(name: str):
        if name in names:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | names)

    return __getattr__, __dir__
