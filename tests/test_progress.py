"""Progress within a run: every training scan reports its steps to the bar from inside the compiled
program, without changing a number of the run."""

import jax
import jax.numpy as jnp
import numpy as np

from gradattn import EmVsSgdConfig, _progress, em_vs_sgd, sweep
from gradattn.tasks import StickyMarkov
from gradattn.training import scan_steps

CONFIG = EmVsSgdConfig(steps=7, task=StickyMarkov(seq_len=16))


def _run(key):
    def step(c, t):
        c = c * 0.5 + jax.random.normal(jax.random.fold_in(key, t), (), jnp.float32)
        return c, c

    return scan_steps(step, jnp.float32(0.0), 250)[1]


def test_ticks_count_every_step_and_change_no_number(capsys):
    """A sweep of 5 seeds, 2 per call (3 calls), with progress: each call reports the 250 steps of
    its scan once (the seeds of a call step together), every 2 steps, and the numbers are the
    same as without progress."""
    seen = []
    original = _progress.StepBar.update

    def update(self, n):
        seen.append(n)
        original(self, n)

    try:
        _progress.StepBar.update = update
        with_bar = sweep(_run, range(5), chunk_size=2, progress=True)
    finally:
        _progress.StepBar.update = original
    plain = sweep(_run, range(5), chunk_size=2)
    np.testing.assert_array_equal(with_bar, plain)
    assert sum(seen) == 3 * 250 and set(seen) == {2}  # every 250 // 100 = 2 steps; 250 is a multiple
    err = capsys.readouterr().err
    assert "750/750" in err and "estimated time left" in err


def test_a_scan_that_is_not_a_multiple_reports_its_remainder():
    count = _progress.StepCount()
    ticks = []
    original = _progress._tick
    _progress._tick = ticks.append
    try:
        fn = _progress.counting_steps(lambda: scan_steps(lambda c, t: (c + 1, c), 0, 205)[0], count)
        assert int(jax.jit(fn)()) == 205
    finally:
        _progress._tick = original
    # every 205 // 100 = 2 steps, then the last step alone
    assert count.steps == 205 and sum(ticks) == 205 and ticks[-1] == 1 and set(ticks[:-1]) == {2}


def test_experiment_results_are_the_same_with_and_without_progress():
    a = em_vs_sgd([4, 9], CONFIG, progress=True, per_seed_curves=True)
    b = em_vs_sgd([4, 9], CONFIG, progress=False, per_seed_curves=True)
    assert a["per_seed"] == b["per_seed"] and a["per_seed_curves"] == b["per_seed_curves"]
