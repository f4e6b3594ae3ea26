"""Tasks: data generators for training one head, each with its exact Bayes predictor.

  base            Task (the protocol every task satisfies), check_task
  sticky_markov   StickyMarkov, the sticky Markov chain of the paper's Sec. 5.2
  hmm             DirichletHMM, next-observation prediction on a random discrete hidden Markov model
  bijection       BijectionElimination, a random bijection revealed pair by pair in context
"""

from gradattn.tasks.base import Task, check_task
from gradattn.tasks.bijection import BijectionElimination
from gradattn.tasks.hmm import DirichletHMM
from gradattn.tasks.sticky_markov import (
    StickyMarkov,
    embeddings_from_spec,
    reference_embeddings,
    sticky_transition_matrix,
)

__all__ = [
    "BijectionElimination",
    "DirichletHMM",
    "StickyMarkov",
    "Task",
    "check_task",
    "embeddings_from_spec",
    "reference_embeddings",
    "sticky_transition_matrix",
]
