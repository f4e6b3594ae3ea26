"""The README's code examples run as written (so the README stays true), pasted into the interpreter.

Each ```python block is fed line by line to ``code.InteractiveConsole``, as a user pasting it into
the Python REPL would (then one more Enter), and any SyntaxError or exception fails its test: a
block must leave a blank line after every indented body that a statement at the left margin
follows. Every block is pasted in the quick suite without running it (the syntax); and each block
is its own test that runs it. The two that train for real (the 16-seed sweep with the 2-seed
experiment, and the deep model) are end-to-end runs, marked slow: they run in `make test-all`; the
others (the laws and a training step and scan, the checked wrapper) run in `make test` too.
"""

import code
import pathlib
import re
import sys
import traceback

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

# A block that contains one of these trains end to end.
SLOW_MARKS = ("ga.sweep(", "nnx.Optimizer(")


class _Paste(code.InteractiveConsole):
    """The interactive interpreter; what it would print as an error is kept in ``errors``."""

    def __init__(self, namespace: dict, run: bool):
        super().__init__(locals=namespace, filename="<stdin>")
        self.run = run
        self.errors: list[str] = []

    def showsyntaxerror(self, *args, **kwargs):
        self.errors.append("".join(traceback.format_exception_only(*sys.exc_info()[:2])))

    def showtraceback(self):
        self.errors.append("".join(traceback.format_exception(*sys.exc_info())))

    def runcode(self, code_object):
        if self.run:
            super().runcode(code_object)


def paste(block: str, namespace: dict | None = None, run: bool = True) -> list[str]:
    """Feed ``block`` to the interactive interpreter line by line, then an empty line (the Enter
    after a paste); returns the errors it reported. With ``run=False`` each statement is compiled
    as the interpreter would, not run."""
    console = _Paste({} if namespace is None else namespace, run)
    waiting = False
    for line in block.splitlines() + [""]:
        waiting = console.push(line)
    if waiting:
        console.errors.append("the interpreter still waits for more input at the end of the block")
    return console.errors


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


@pytest.mark.parametrize("i, block", list(enumerate(python_blocks())))
def test_readme_example_pastes_into_the_interpreter(i, block):
    """Quick, for every block (the slow ones too): pasted line by line, each statement compiles."""
    errors = paste(block, run=False)
    assert not errors, f"README python block {i}, pasted into the interpreter:\n" + "\n".join(errors)


@pytest.mark.parametrize("block", _params())
def test_readme_example_runs(block):
    namespace: dict = {}
    errors = paste(block, namespace)
    assert not errors, "pasted into the interpreter:\n" + "\n".join(errors)
    if "losses" in namespace:  # the seed sweep example
        losses = np.asarray(namespace["losses"])
        assert losses.shape == (16,) and np.all(np.isfinite(losses))
    if "history" in namespace:
        assert namespace["history"]["loss"].shape == (100,)
