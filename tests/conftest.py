"""Test configuration: float64 is enabled so laws can be compared to autodiff at 1e-9.

Library code must never rely on this: float32 tests pass float32 arrays explicitly and assert the
dtype of what comes back.

Two suites: ``make test`` runs ``-m "not slow"`` (the quick one, for every change) and
``make test-all`` runs everything, the ``slow`` end-to-end runs included (CI runs this one). A test
is slow either by its own ``@pytest.mark.slow`` or by being named in ``SLOW`` below (for files whose
tests are marked here rather than in place). Tests that compare with the PyTorch reference need the
``bench`` extra (``make test-all`` installs it); without torch they are skipped, saying so.
"""

import functools
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The command keeps compiled programs in a cache under the user's home; tests never write there
# (tests of the cache give it a directory of their own).
os.environ["GRADATTN_NO_COMPILATION_CACHE"] = "1"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

# file -> test functions (every parametrization of each) that are end-to-end runs: the deep
# protocol run end to end, the CLI training a deep model, float32 at the paper's length N = 1999.
SLOW = {
    "test_deep.py": (
        "test_head_laws_of_a_model",
        "test_one_seed_one_result_and_run_contents",
        "test_protocol_dropout_off_at_evaluation_and_fresh_data",
        "test_two_timescale_scales_every_value_projection",
    ),
    "test_cli.py": ("test_deep_writes_json_with_the_heldout_table",),
    "test_laws.py": ("test_float32_at_paper_size",),
    "test_blocked.py": ("test_float32_at_paper_length_stays_float32_and_close",),
}

# Tests that compare with the PyTorch reference (torch comes with the bench extra).
TORCH = {
    "test_deep.py": ("test_optimizer_is_pytorch_adamw_with_cosine_annealing_and_clipping",),
    "test_nn.py": ("test_same_model_as_pytorch",),
    "test_tasks.py": ("test_reference_means_are_torchs_seed_zero_draw",),
}
TORCH_SKIP_REASON = ("PyTorch is not installed: this comparison with the PyTorch reference needs the bench "
                     "extra (pip install -e '.[bench]'); `make test-all` installs it and runs it")


def _named(table, item):
    return getattr(item, "originalname", item.name) in table.get(item.path.name, ())


def pytest_collection_modifyitems(config, items):
    # A name in SLOW or TORCH that its (collected) module no longer defines is an error, so a
    # renamed test cannot silently move into the quick suite.
    modules = {item.path.name: item.module for item in items if getattr(item, "module", None) is not None}
    for table in (SLOW, TORCH):
        for file, names in table.items():
            if file in modules:
                missing = [n for n in names if not hasattr(modules[file], n)]
                if missing:
                    raise pytest.UsageError(f"tests/conftest.py names {missing} in {file}, which defines no such test")
    for item in items:
        if _named(SLOW, item):
            item.add_marker(pytest.mark.slow)
        if _named(TORCH, item) and not _has_torch():
            item.add_marker(pytest.mark.skip(reason=TORCH_SKIP_REASON))


@functools.cache
def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True
