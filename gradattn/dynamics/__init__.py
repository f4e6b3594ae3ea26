"""The paper's mechanism, measured: first-order checks, the feedback loop, and settling times.

Three subjects, one module each, every public name re-exported here:

* :mod:`~gradattn.dynamics.first_order`: :func:`first_order_report`, one gradient step of size eta
  against the first-order predictions of the laws; :func:`routing_feedback_identity`, the routing
  half of the feedback loop in aggregate (sum_ij a_ij Delta alpha_ij = eta ||dL/d(W_Q, W_K)||^2).
* :mod:`~gradattn.dynamics.feedback`: :func:`feedback_stats` / :func:`feedback_probe`, the positive
  feedback loop along training (advantage sign vs attention change, value moves vs the
  responsibility-weighted error), and :func:`snapshots` of attention, values and contexts.
* :mod:`~gradattn.dynamics.settling`: :func:`settling_step` / :func:`frame_before_precision`, when
  attention and the values reach their final state.
"""

from gradattn.dynamics.feedback import (
    FeedbackRecord,
    Snapshots,
    StepFeedback,
    feedback_probe,
    feedback_stats,
    make_feedback_probe,
    snapshots,
    step_feedback,
)
from gradattn.dynamics.first_order import (
    FirstOrderReport,
    RoutingFeedback,
    first_order_report,
    routing_feedback_identity,
)
from gradattn.dynamics.settling import (
    FrameBeforePrecision,
    change_per_step,
    distance_to_final,
    frame_before_precision,
    plateau_step,
    quiet_step,
    settling_step,
)

__all__ = [
    "FeedbackRecord",
    "FirstOrderReport",
    "FrameBeforePrecision",
    "RoutingFeedback",
    "Snapshots",
    "StepFeedback",
    "change_per_step",
    "distance_to_final",
    "feedback_probe",
    "feedback_stats",
    "first_order_report",
    "frame_before_precision",
    "make_feedback_probe",
    "plateau_step",
    "quiet_step",
    "routing_feedback_identity",
    "settling_step",
    "snapshots",
    "step_feedback",
]
