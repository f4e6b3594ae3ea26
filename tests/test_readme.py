"""The README's code examples run as written (so the README stays true)."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(python_blocks()) >= 2


def test_readme_examples_run():
    for block in python_blocks():
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
        if "losses" in namespace:  # the seed sweep example
            losses = np.asarray(namespace["losses"])
            assert losses.shape == (16,) and np.all(np.isfinite(losses))
        if "history" in namespace:
            assert namespace["history"]["loss"].shape == (100,)
