"""gradattn: the gradient dynamics of one attention head, as exact, compiled JAX functions.

Agarwal, Dalal & Misra, "Gradient Dynamics of Attention: How Cross-Entropy Sculpts Bayesian
Manifolds" (arXiv 2512.22473). Module map:

  head      HeadParams, init_head, forward, loss_fn            (SPEC §1)
  laws      upstream_grad, routing_grad, value_grad, ...      (SPEC §2)
"""

from gradattn.head import (
    HeadOutputs,
    HeadParams,
    causal_mask,
    dense_loss,
    forward,
    init_head,
    token_losses,
)
from gradattn.laws import (
    advantage,
    autodiff_loss_and_grads,
    compatibility,
    dense_loss_and_grads,
    key_grad,
    output_error,
    output_weight_grad,
    projection_grads,
    query_grad,
    routing_grad,
    upstream_grad,
    value_grad,
)

__version__ = "0.1.0"

from gradattn import experiments, sweeps, tasks, training  # noqa: E402
from gradattn.sweeps import sweep  # noqa: E402
from gradattn.tasks import StickyMarkov  # noqa: E402
from gradattn.training import (  # noqa: E402
    TrainState,
    alternating,
    em_like,
    init_state,
    make_step,
    param_labels,
    sgd,
    train,
)

# Dynamics, geometry and the exact Bayes predictor (issue 5).
from gradattn.bayes import (  # noqa: E402
    BayesLoss,
    bayes_entropy,
    bayes_filter_entropy,
    bayes_log_filter,
    bayes_log_predictive,
    bayes_loss,
    bayes_predictive,
)
from gradattn.dynamics import (  # noqa: E402
    FeedbackRecord,
    FeedbackStats,
    FirstOrderReport,
    FrameBeforePrecision,
    Snapshots,
    distance_to_final,
    feedback_probe,
    feedback_stats,
    first_order_report,
    frame_before_precision,
    make_feedback_probe,
    settling_step,
    settling_steps,
    snapshots,
)
from gradattn.geometry import (  # noqa: E402
    attention_entropy_bits,
    covariate_r2,
    decoding_r2,
    explained_variance_ratio,
    participation_ratio,
    pc_covariate_correlation,
    pca_spectrum,
    principal_components,
)
from gradattn.blocked import (  # noqa: E402
    analytic_grads,
    analytic_loss_and_grads,
    blocked_loss,
    blocked_loss_and_grads,
    blocked_pass,
    default_block_size,
    loss_fn,
)
