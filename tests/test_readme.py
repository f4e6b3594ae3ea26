"""The README's code examples run as written (so the README stays true).

Each ```python block is its own test, run exactly as printed. The two that train for real (the
16-seed sweep with the 2-seed experiment, and the deep model) are end-to-end runs, marked slow: they
run in `make test-all`; the others (the laws and a training step and scan, the checked wrapper) run
in `make test` too.
"""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# A block that contains one of these trains end to end.
SLOW_MARKS = ("ga.sweep(", "nnx.Optimizer(")


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _params():
    return [pytest.param(block, id=f"block{i}", marks=[pytest.mark.slow] if any(m in block for m in SLOW_MARKS) else [])
            for i, block in enumerate(python_blocks())]


def test_readme_has_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2
    # Every example is tested, the slow ones by test-all: at least one runs in the quick suite.
    assert any(not any(m in b for m in SLOW_MARKS) for b in blocks)


@pytest.mark.parametrize("block", _params())
def test_readme_example_runs(block):
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    if "losses" in namespace:  # the seed sweep example
        losses = np.asarray(namespace["losses"])
        assert losses.shape == (16,) and np.all(np.isfinite(losses))
    if "history" in namespace:
        assert namespace["history"]["loss"].shape == (100,)
