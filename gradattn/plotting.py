"""The experiments' text reports and figures (figures written atomically: a temp file in the same
directory, then ``os.replace``).

What every experiment's report shares: the wording of a mean over seeds and its spread, number
formats, the oracle floor, integer step ticks, and figures written whole. Each experiment's own
report and figure live beside it (:mod:`gradattn.experiments`), and take its result dict or the
same dict read back from its JSON.

Conventions: a "±" is always labelled with what it is (the standard deviation over seeds, the
sample sd in results of format 2 and later, the population sd in older ones); with one seed only
the value is printed (its sd is ``None``); a mean number of steps is printed as an integer when it
is one, else with one decimal; losses and predictive entropies are in nats, attention entropies in
bits, and every step axis has integer ticks.

matplotlib is imported by the functions that draw, not by this module, so the text reports cost
no matplotlib import.
"""

from __future__ import annotations

import math
import os

import numpy as np

from gradattn._io import atomic_write


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> None:
    """``fig.savefig`` to ``path`` whole or not at all; the format comes from the file suffix."""
    path = os.fspath(path)
    fmt = kwargs.pop("format", None) or (os.path.splitext(path)[1].lstrip(".").lower() or "png")
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs), binary=True)


# ----------------------------------------------------------------------------------------------
# Shared wording and number formats


def sd_name(results: dict) -> str:
    """What the results' ``*_std`` values are: ``"sd"`` (the sample standard deviation over seeds,
    ddof 1) for results of format 2 and later, ``"population sd"`` (ddof 0) for older results."""
    fmt = results.get("format", 1) if isinstance(results, dict) else 1
    return "sd" if isinstance(fmt, (int, float)) and fmt >= 2 else "population sd"


def seeds_phrase(n: int) -> str:
    """``"1 seed"``, ``"8 seeds"``."""
    return f"{n} seed{'' if n == 1 else 's'}"


def pm_phrase(results: dict, n_seeds: int) -> str:
    """What a "±" means in these results: ``"mean ± sd over 8 seeds"``; ``"1 seed"`` for one seed."""
    return seeds_phrase(n_seeds) if n_seeds == 1 else f"mean ± {sd_name(results)} over {seeds_phrase(n_seeds)}"


def missing(v) -> bool:
    """Whether ``v`` is a missing number: ``None`` or a non-finite float."""
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def fmt_steps(v) -> str:
    """A (mean) number of steps: ``"6"`` when it is an integer, else one decimal (``"5.5"``);
    ``"n/a"`` for ``None``/NaN."""
    if missing(v):
        return "n/a"
    v = float(v)
    return f"{v:.0f}" if v.is_integer() else f"{v:.1f}"


def fmt_pm(mean, sd, spec: str = ".4f", fmt=None) -> str:
    """``"mean ± sd"``, or the mean alone when ``sd`` is ``None``/NaN (one seed); ``fmt`` (a
    function of one number) overrides ``spec``."""
    f = fmt or (lambda v: "n/a" if missing(v) else format(v, spec))
    return f(mean) if missing(sd) else f"{f(mean)} ± {f(sd)}"


_ORACLE = {
    "StickyMarkov": "knows the previous symbol",
    "DirichletHMM": "knows the hidden state",
    "BijectionElimination": "knows the bijection",
}


def h_min_definition(results: dict) -> str:
    """``"H_min = 1.8292 nats, the loss of an oracle that knows the previous symbol"`` (the oracle
    by the results' task; ``"H_min n/a"`` without one)."""
    h_min = results.get("h_min")
    if missing(h_min):
        return "H_min n/a (the task has no oracle floor)"
    task = (results.get("config") or {}).get("task") or {}
    name = str(task.get("name") or ("StickyMarkov" if "self_prob" in task else ""))
    return f"H_min = {h_min:.4f} nats, the loss of an oracle that {_ORACLE.get(name, 'knows the hidden state')}"


def integer_ticks(axis) -> None:
    """Integer major ticks on ``axis`` (an ``ax.xaxis``): step and position axes (multiples of 1, 2
    or 5 times a power of ten, so 1000 steps read 0, 200, ..., 1000)."""
    from matplotlib.ticker import MaxNLocator  # matplotlib is imported only when a figure is drawn

    axis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def std_array(std, like: np.ndarray) -> np.ndarray | None:
    """A std list from JSON (entries may be ``None``) as floats, or ``None`` when there is none."""
    if std is None:
        return None
    a = np.array([np.nan if v is None else v for v in np.ravel(np.asarray(std, object))], float).reshape(like.shape)
    return None if not np.isfinite(a).any() else a
