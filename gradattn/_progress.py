"""Progress within a run: training steps counted from inside the compiled programs.

A seed's whole run is one compiled program, so a bar over seeds moves once per seed (every ~20
minutes for the deep model at its defaults). A sweep with progress on compiles its run with
*ticks*: while :func:`counting_steps` traces the run, every training scan
(:func:`gradattn.training.scan_steps`) adds its step count to a :class:`StepCount` and reports every
1 % of its steps to the host through ``jax.debug.callback``. The callback carries no data of the run
and changes none of its numbers (a test checks the results bit for bit against a run without
ticks); it goes to the :class:`StepBar` shown while the sweep runs, if any.

The bar is process-wide display state (like a terminal): one sweep shows one bar at a time.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

TICKS_PER_SCAN = 100
"""A training scan of ``steps`` steps reports every ``max(1, steps // TICKS_PER_SCAN)`` steps."""

_trace = threading.local()  # the StepCount of the run being traced with ticks (trace time only)
_bar_lock = threading.Lock()
_bar: StepBar | None = None  # the bar the ticks go to while a sweep runs


class StepCount:
    """Training steps per call of one compiled run, counted while it is traced with ticks."""

    def __init__(self) -> None:
        self.steps = 0


def counting_steps(fn: Callable, count: StepCount) -> Callable:
    """``fn`` traced with ticks: its training scans report to the bar and add their steps to ``count``."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        outer = getattr(_trace, "count", None)
        _trace.count = count
        try:
            return fn(*args, **kwargs)
        finally:
            _trace.count = outer

    return traced


def _tick(n: int) -> None:
    with _bar_lock:
        bar = _bar
    if bar is not None:
        bar.update(n)


def with_ticks(step: Callable, steps: int) -> Callable:
    """``step(carry, t) -> (carry, out)`` of a scan of ``steps`` steps, reporting every 1 % of them
    to the bar when traced inside :func:`counting_steps`; ``step`` itself otherwise."""
    count = getattr(_trace, "count", None)
    if count is None:
        return step
    count.steps += steps
    every = max(1, steps // TICKS_PER_SCAN)
    rest = steps % every

    def ticked(carry, t):
        carry, out = step(carry, t)
        jax.lax.cond((t + 1) % every == 0, lambda: jax.debug.callback(functools.partial(_tick, every)), lambda: None)
        if rest:
            jax.lax.cond(t + 1 == steps, lambda: jax.debug.callback(functools.partial(_tick, rest)), lambda: None)
        return carry, out

    return ticked


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class StepBar:
    """A tqdm bar of training steps across the calls of a sweep, with the run's estimated time.

    ``calls`` is the number of calls the sweep will make; the total is known once the run has
    been traced (``count``). After the second tick the bar prints one line with the estimated time
    of the whole sweep, from the measured time per step (the first interval holds the compilation).
    """

    def __init__(self, count: StepCount, calls: int, desc: str, **tqdm_kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.count, self.calls = count, calls
        self.bar = tqdm(total=None, desc=desc, unit="step", **tqdm_kwargs)
        self._first: tuple[float, int] | None = None
        self._estimated = False

    def update(self, n: int) -> None:
        bar = self.bar
        if bar.total is None and self.count.steps:
            bar.total = self.count.steps * self.calls
            bar.refresh()
        bar.update(n)
        now = time.perf_counter()
        if self._first is None:
            self._first = (now, bar.n)
        elif not self._estimated and bar.total:
            t0, n0 = self._first
            if bar.n > n0 and now > t0:
                per_step = (now - t0) / (bar.n - n0)
                left = per_step * (bar.total - bar.n)
                bar.write(f"estimated time left: {_duration(left)} ({bar.total} training steps, "
                          f"{per_step * 1e3:.3g} ms each as measured)", file=bar.fp)
                self._estimated = True

    def note(self, text: str) -> None:
        """Show ``text`` beside the count (e.g. the seeds done)."""
        self.bar.set_postfix_str(text)

    def __enter__(self) -> StepBar:
        global _bar
        with _bar_lock:
            _bar = self
        return self

    def __exit__(self, *exc) -> None:
        global _bar
        with _bar_lock:
            _bar = None
        self.bar.close()
