"""The experiments' text reports and figures (figures written atomically: a temp file in the same
directory, then ``os.replace``).

EM-like vs SGD: :func:`format_em_vs_sgd`, :func:`plot_em_vs_sgd`; the deep experiment:
:func:`format_deep`, :func:`plot_deep`. Each takes the result dict of its experiment, or the same
dict read back from its JSON.

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

SIGN_AGREEMENT_RANGE = (0.4, 0.6)
"""The fixed colour scale of the deep figure's sign-agreement heat map, centred at chance (0.5)."""


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


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def fmt_steps(v) -> str:
    """A (mean) number of steps: ``"6"`` when it is an integer, else one decimal (``"5.5"``);
    ``"n/a"`` for ``None``/NaN."""
    if _missing(v):
        return "n/a"
    v = float(v)
    return f"{v:.0f}" if v.is_integer() else f"{v:.1f}"


def fmt_pm(mean, sd, spec: str = ".4f", fmt=None) -> str:
    """``"mean ± sd"``, or the mean alone when ``sd`` is ``None``/NaN (one seed); ``fmt`` (a
    function of one number) overrides ``spec``."""
    f = fmt or (lambda v: "n/a" if _missing(v) else format(v, spec))
    return f(mean) if _missing(sd) else f"{f(mean)} ± {f(sd)}"


_ORACLE = {
    "StickyMarkov": "knows the previous symbol",
    "DirichletHMM": "knows the hidden state",
    "BijectionElimination": "knows the bijection",
}


def h_min_definition(results: dict) -> str:
    """``"H_min = 1.8292 nats, the loss of an oracle that knows the previous symbol"`` (the oracle
    by the results' task; ``"H_min n/a"`` without one)."""
    h_min = results.get("h_min")
    if _missing(h_min):
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


# ----------------------------------------------------------------------------------------------
# EM-like vs SGD


def _never_reached(results: dict) -> str:
    """``"; 2 seeds never fell below it (counted as 1000 steps)"`` when some seed's EM-like curve
    never fell below the threshold (:func:`gradattn.experiments.steps_to_threshold` counts them as
    ``steps``), else ``""``."""
    per_seed = (results.get("per_seed") or {}).get("em_steps_to_sgd_final") or []
    n = sum(1 for v in per_seed if v is not None and v >= results["steps"])
    return "" if n == 0 else f"; {seeds_phrase(n)} never fell below it (counted as {results['steps']} steps)"


def plot_em_vs_sgd(results: dict, path: str | os.PathLike | None = None, *, ax=None, dpi: int = 150):
    """Mean loss curves of both arms of an EM-vs-SGD run with a ±1 sd band over seeds, H_min, and
    the crossing step: the mean over seeds of the first step at which the EM-like loss is below
    SGD's mean final loss (``results["em_steps_to_sgd_final"]``, ``results["threshold"]``), a
    vertical line with its value on the top axis and a marker at the threshold with a ±1 sd bar.

    ``results`` is the dict returned by :func:`gradattn.experiments.em_vs_sgd` (or read back from its
    JSON). The legend sits below the axes, off the data. Saves to ``path`` when given (atomically);
    returns the matplotlib Figure.
    """
    # A bare Figure renders with Agg and never touches pyplot's global state or GUI backends.
    from matplotlib.figure import Figure

    try:
        curves = results["curves"]
        h_min = results["h_min"]
        n_seeds = len(results["seeds"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"plot_em_vs_sgd: results must be an em_vs_sgd result dict with curves, h_min, seeds ({err})") from None
    if ax is None:
        fig = Figure(figsize=(7.5, 6.2), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    styles = {"sgd": ("SGD (lr 0.01 on all)", "tab:blue"), "em": ("EM-like (W_V lr 0.1, others 0.01)", "tab:orange")}
    cfg = results.get("config") or {}
    if cfg:
        styles["sgd"] = (f"SGD (lr {cfg['sgd_lr']:g})", "tab:blue")
        styles["em"] = (f"EM-like (W_V lr {cfg['value_lr']:g}, W_Q/W_K/W_O lr {cfg['routing_lr']:g})", "tab:orange")
    for arm, (label, color) in styles.items():
        mean = np.asarray(curves[f"{arm}_mean"], float)
        std = std_array(curves.get(f"{arm}_std"), mean)
        steps = np.arange(mean.shape[0])
        ax.plot(steps, mean, color=color, label=label)
        if std is not None:
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.25, linewidth=0)
    if not _missing(h_min):
        ax.axhline(h_min, color="k", linestyle="--", linewidth=1, label=h_min_definition(results))
    cross = results.get("em_steps_to_sgd_final") or {}
    at, sd, thr = cross.get("mean"), cross.get("std"), results.get("threshold")
    if not _missing(at):
        label = ("EM-like first below SGD's mean final loss"
                 + ("" if _missing(thr) else f" ({thr:.4f} nats)")
                 + f": step {fmt_pm(at, sd, fmt=fmt_steps)} ({pm_phrase(results, n_seeds)}{_never_reached(results)})")
        ax.axvline(at, color="tab:orange", linestyle=":", linewidth=1.5, label=label, gid="crossing_step")
        if not _missing(thr):
            marker = ax.errorbar([at], [thr], xerr=None if _missing(sd) else [[sd], [sd]], fmt="o", color="tab:orange",
                                 markeredgecolor="k", capsize=3, zorder=5)
            marker.lines[0].set_gid("crossing_marker")
        top = ax.secondary_xaxis("top")
        top.set_xticks([at], labels=[f"step {fmt_steps(at)}"], color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    integer_ticks(ax.xaxis)
    ax.set_title(f"Sticky Markov chain: EM-like vs SGD, {pm_phrase(results, n_seeds)}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8.5, frameon=False)
    ax.grid(alpha=0.3)
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig


def format_em_vs_sgd(results: dict) -> str:
    """A short text table of an EM-vs-SGD result (the dict of :func:`em_vs_sgd`)."""
    n = len(results["seeds"])
    pm = pm_phrase(results, n)
    lines = [f"EM-like vs SGD: {seeds_phrase(n)}, {results['steps']} steps"]
    if results.get("h_min") is not None:
        lines.append(h_min_definition(results))
    what = "final loss" if n == 1 else f"final loss ({pm}); entropy and accuracy: means"
    lines += [
        f"{what}; loss and predictive entropy in nats",
        f"{'arm':<8} {'final loss':>17} {'entropy':>9} {'accuracy':>9}",
    ]
    for arm, label in (("sgd", "SGD"), ("em", "EM-like")):
        r = results[arm]
        lines.append(
            f"{label:<8} {fmt_pm(r['final_loss_mean'], r.get('final_loss_std')):>17} "
            f"{r['final_entropy_mean']:>9.4f} {r['final_accuracy_mean']:>9.4f}"
        )
    s = results["em_steps_to_sgd_final"]
    speed, p, thr = results["speedup"], results["p_value"], results.get("threshold")
    if s["mean"] is None:
        lines.append("EM-like vs SGD's mean final loss: n/a (a seed diverged; see the per-seed losses)")
    else:
        target = "SGD's mean final loss" + ("" if _missing(thr) else f" ({thr:.4f} nats)")
        lines.append(
            f"EM-like first falls below {target} at step {fmt_pm(s['mean'], s.get('std'), fmt=fmt_steps)} "
            f"({pm}{_never_reached(results)}): "
            f"speed-up {'n/a' if speed is None else f'{speed:.2f}x'}"
            + ("" if speed is None else f" ({results['steps']} / {fmt_steps(s['mean'])} steps)")
            + f"; paired t-test of the final losses p = {'n/a' if _missing(p) else f'{p:.2g}'}"
        )
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s on {results.get('n_devices', 1)} device(s)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The deep experiment


def _fmt(v, spec=".4f"):
    return "n/a" if _missing(v) else format(v, spec)


def _grid(rows, fmt=lambda v: _fmt(v, ".3f")) -> list[str]:
    head = "          " + "".join(f"  head {h:<3d}" for h in range(len(rows[0])))
    return [head] + [f"  layer {i:<2d}" + "".join(f"  {fmt(v):>8}" for v in row) for i, row in enumerate(rows)]


def uniform_attention_bits(results: dict) -> float | None:
    """The mean over queries of the entropy (bits) of uniform causal attention over the deep run's
    N = T - 1 positions, log2(N!) / N: the most a head's attention entropy can be (``None`` when
    the results do not give T)."""
    seq_len = ((results.get("config") or {}).get("task") or {}).get("seq_len")
    if not isinstance(seq_len, int) or seq_len < 2:
        return None
    n = seq_len - 1
    return math.lgamma(n + 1) / n / math.log(2)


def _last_checkpoint_step(dyn: dict) -> int | None:
    steps, k = dyn.get("checkpoint_steps"), len(dyn.get("entropy_bits_mean") or [])
    return int(steps[k - 1]) if steps and 0 < k <= len(steps) else None


def format_deep(results: dict) -> str:
    """A plain-text report of :func:`gradattn.deep.deep_experiment`'s results (or the same dict read
    from JSON)."""
    try:
        cfg, ho, tr = results["config"], results["heldout"], results["train"]
        n_seeds = len(results["seeds"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"format_deep: results must be a deep_experiment result dict ({err})") from None
    data = "a fresh sequence per step" if cfg["fresh_data"] else "one fixed sequence"
    sched = "AdamW" if cfg["schedule"] == "adamw" else f"two-timescale AdamW (value projections x{cfg['value_lr_multiplier']:g})"
    over = "" if n_seeds == 1 else f" over {seeds_phrase(n_seeds)}"
    lines = [
        f"Deep transformer: {cfg['n_layers']} layers x {cfg['n_heads']} heads, d_model {cfg['d_model']}, "
        f"T = {cfg['task'].get('seq_len', 'n/a')}, {results['steps']} steps, {seeds_phrase(n_seeds)}",
        f"{sched}, lr {cfg['lr']:g} (cosine to 0), weight decay {cfg['weight_decay']:g}, clip {cfg['clip']:g}, "
        f"dropout {cfg['dropout']:g}; trained on {data}",
        h_min_definition(results),
        f"losses and predictive entropy in nats; loss: {pm_phrase(results, n_seeds)}, the rest: means{over}",
        f"training sequence (dropout off)  loss {fmt_pm(tr['loss_mean'], tr.get('loss_std'))}"
        f"   Bayes {_fmt(tr['bayes_loss_mean'])}",
        f"held-out sequence                loss {fmt_pm(ho['loss_mean'], ho.get('loss_std'))}"
        f"   Bayes {_fmt(ho['bayes_loss_mean'])}"
        f"   gap to Bayes {_fmt(ho['gap_to_bayes_mean'], '+.4f')}   gap to H_min {_fmt(ho['gap_to_h_min_mean'], '+.4f')}",
        f"                                 predictive entropy {_fmt(ho['entropy_mean'])}   accuracy {_fmt(ho['accuracy_mean'])}",
        f"per-head laws vs autodiff (float64, small model): worst relative error {results['law_check']['worst_rel_error']:.1e}",
    ]
    dyn = results.get("dynamics")
    if dyn:
        at = _last_checkpoint_step(dyn)
        uniform = uniform_attention_bits(results)
        lines.append(
            f"attention entropy (bits) at the last checkpoint{'' if at is None else f' (step {at})'}, mean{over}"
            + ("" if uniform is None else f"; uniform causal attention: {uniform:.3f} bits")
            + "; layer x head:"
        )
        lines += _grid(dyn["entropy_bits_mean"][-1])
        n_ck = len(dyn["sign_agreement_mean"])
        lines.append(f"sign agreement of the advantage and Δα (fraction of entries; chance 0.5), "
                     f"mean over {n_ck} checkpoint{'s' if n_ck != 1 else ''}{' and ' + seeds_phrase(n_seeds) if n_seeds > 1 else ''}:")
        lines += _grid(np.nanmean(np.asarray(dyn["sign_agreement_mean"], float), axis=0).tolist())
        if dyn.get("settle_attention_mean") is not None:
            seeds = "" if n_seeds == 1 else f", mean over the {seeds_phrase(n_seeds)} (diverged seeds left out)"
            lines.append(f"settling step of attention (tolerance {cfg['settle_tol']:g} of the total change){seeds}:")
            lines += _grid(dyn["settle_attention_mean"], fmt_steps)
            lines.append("settling step of values (the same):")
            lines += _grid(dyn["settle_values_mean"], fmt_steps)
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s")
    return "\n".join(lines)


def _heat_map(fig, ax, data: np.ndarray, norm, cmap: str, title: str, cbar_label: str, extend: str = "neither"):
    """One layer x head heat map on a fixed colour scale ``norm``, each cell annotated with its value
    (up to 64 cells); returns its colorbar."""
    im = ax.imshow(data, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(data.shape[1]))
    ax.set_yticks(range(data.shape[0]))
    ax.set_title(title, fontsize=10)
    cbar = fig.colorbar(im, ax=ax, extend=extend)
    cbar.set_label(cbar_label, fontsize=9)
    if data.size <= 64:
        rgba = im.cmap(im.norm(np.nan_to_num(data, nan=norm.vmin)))
        for (i, j), v in np.ndenumerate(data):
            r, g, b = rgba[i, j, :3]
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(j, i, "n/a" if not np.isfinite(v) else f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="w" if dark else "k")
    return cbar


def _extend(data: np.ndarray, lo: float, hi: float) -> str:
    finite = data[np.isfinite(data)]
    below, above = bool((finite < lo).any()), bool((finite > hi).any())
    return {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[(below, above)]


def plot_deep(results: dict, path=None, *, dpi: int = 150):
    """Training curve (mean ± sd over seeds) against H_min and the held-out losses, in nats; per-head
    heat maps (layer x head) on fixed colour scales: the attention entropy at the last checkpoint
    in bits on [0, uniform causal attention] (:func:`uniform_attention_bits`), and the sign
    agreement averaged over checkpoints on :data:`SIGN_AGREEMENT_RANGE`, a diverging map centred at
    chance (0.5). Saved atomically when ``path`` is given; returns the matplotlib Figure."""
    try:
        curve = np.asarray(results["curve"]["mean"], float)
        std = std_array(results["curve"].get("std"), curve)
        ho, h_min = results["heldout"], results["h_min"]
        n_seeds = len(results["seeds"])
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"plot_deep: results must be a deep_experiment result dict ({err})") from None
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.figure import Figure

    dyn = results.get("dynamics")
    fig = Figure(figsize=(16 if dyn else 7, 5.2), layout="constrained")
    axes = fig.subplots(1, 3 if dyn else 1, squeeze=False, width_ratios=[1.25, 1, 1] if dyn else None)[0]
    ax = axes[0]
    steps = np.arange(curve.shape[0])
    ax.plot(steps, curve, label="training loss (dropout on), " + ("1 seed" if std is None else pm_phrase(results, n_seeds)))
    if std is not None:
        ax.fill_between(steps, curve - std, curve + std, alpha=0.25, linewidth=0)
    if not _missing(h_min):
        ax.axhline(h_min, color="k", ls="--", lw=1, label=h_min_definition(results))
    over = "" if n_seeds == 1 else f", mean over {seeds_phrase(n_seeds)}"
    if ho["loss_mean"] is not None:
        ax.axhline(ho["loss_mean"], color="tab:red", lw=1, label=f"held-out loss = {ho['loss_mean']:.4f} nats{over}")
    if ho["bayes_loss_mean"] is not None:
        ax.axhline(ho["bayes_loss_mean"], color="tab:green", ls=":", lw=1.5,
                   label=f"exact Bayes loss on the held-out sequence = {ho['bayes_loss_mean']:.4f} nats{over}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    integer_ticks(ax.xaxis)
    cfg = results.get("config") or {}
    t = (cfg.get("task") or {}).get("seq_len")
    ax.set_title(f"Deep transformer{'' if t is None else f', T = {t}'}, {seeds_phrase(n_seeds)}", fontsize=11)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    if dyn:
        ent = np.asarray(dyn["entropy_bits_mean"][-1], float)
        uniform = uniform_attention_bits(results)
        top = uniform if uniform is not None else float(max(1.0, np.ceil(np.nanmax(ent)))) if np.isfinite(ent).any() else 1.0
        at = _last_checkpoint_step(dyn)
        mean = "" if n_seeds == 1 else "mean over seeds, "
        scale = (f"scale 0 to {top:.2f} bits = uniform causal attention" if uniform is not None
                 else f"scale 0 to {top:g} bits")
        _heat_map(
            fig, axes[1], ent, Normalize(0.0, top), "viridis",
            f"attention entropy, {mean}last checkpoint{'' if at is None else f' (step {at})'}\n{scale}",
            "attention entropy (bits)", _extend(ent, 0.0, top),
        )
        sign = np.nanmean(np.asarray(dyn["sign_agreement_mean"], float), axis=0)
        lo, hi = SIGN_AGREEMENT_RANGE
        n_ck = len(dyn["sign_agreement_mean"])
        cbar = _heat_map(
            fig, axes[2], sign, TwoSlopeNorm(0.5, lo, hi), "RdBu_r",
            f"sign agreement of advantage a and Δα, {mean}over {n_ck} checkpoints\n"
            f"scale {lo:g} to {hi:g}, white = chance (0.5)",
            "fraction with sign(a) = sign(Δα) (chance 0.5)", _extend(sign, lo, hi),
        )
        cbar.set_ticks(np.linspace(lo, hi, 5))
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig
