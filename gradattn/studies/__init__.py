"""Studies of the paper's open claims, each an experiment on the skeleton of gradattn.experiments"""

from gradattn.studies import bijection  # noqa: F401
