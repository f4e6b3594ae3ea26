"""Tasks: data generators for training one head, each with its exact Bayes predictor.

  base            Task (the protocol every task satisfies), check_task; what the tasks share:
                  TaskDataclass (their JSON description), forward_algorithm (the filtering
                  recursion of a hidden Markov model), BayesLoss and loss_from_log_predictive
  sticky_markov   StickyMarkov, the sticky Markov chain of the paper's Sec. 5.2, and its exact
                  Bayes filter for any chain and means (bayes_log_predictive, bayes_loss, ...)
  hmm             DirichletHMM, next-observation prediction on a random discrete hidden Markov model
  bijection       BijectionElimination, a random bijection revealed pair by pair in context
  tokens          TokenTask (the protocol of token tasks, the companion paper's wind tunnels), TokenSample
  bijection_tokens  BijectionTokens, the bijection as tokens for a language model (the authors'
                  production layout), with its exact posterior
  incontext_hmm   InContextHMM, a fresh random HMM per sequence with its parameters in context
"""

from gradattn.tasks.base import BayesLoss, Task, TaskDataclass, check_task, forward_algorithm, loss_from_log_predictive
from gradattn.tasks.bijection import BijectionElimination
from gradattn.tasks.bijection_tokens import BijectionTokens
from gradattn.tasks.hmm import DirichletHMM
from gradattn.tasks.incontext_hmm import InContextHMM, discretise_rows
from gradattn.tasks.sticky_markov import (
    StickyMarkov,
    embeddings_from_spec,
    reference_embeddings,
    sticky_transition_matrix,
)
from gradattn.tasks.tokens import TokenSample, TokenTask, check_token_task

__all__ = [
    "BayesLoss",
    "BijectionElimination",
    "BijectionTokens",
    "DirichletHMM",
    "InContextHMM",
    "StickyMarkov",
    "Task",
    "TaskDataclass",
    "TokenSample",
    "TokenTask",
    "check_task",
    "check_token_task",
    "discretise_rows",
    "embeddings_from_spec",
    "forward_algorithm",
    "loss_from_log_predictive",
    "reference_embeddings",
    "sticky_transition_matrix",
]
