"""Tasks: data generators for training one head.

  sticky_markov   StickyMarkov, the sticky Markov chain of the paper's Sec. 5.2 (SPEC §3)
"""

from gradattn.tasks.sticky_markov import StickyMarkov, sticky_transition_matrix

__all__ = ["StickyMarkov", "sticky_transition_matrix"]
