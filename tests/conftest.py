"""Test configuration: float64 is enabled so laws can be compared to autodiff at 1e-9.

Library code must never rely on this: float32 tests pass float32 arrays explicitly and assert the
dtype of what comes back.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
