"""Studies of the paper's open claims, each an experiment on the skeleton of :mod:`gradattn.experiments`."""

from gradattn.studies import bijection, manifold, plateau

__all__ = ["bijection", "manifold", "plateau"]
