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
    loss_fn,
    token_losses,
)
from gradattn.laws import (
    advantage,
    analytic_grads,
    analytic_loss_and_grads,
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
