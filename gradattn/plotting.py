"""The experiments' text reports and figures (figures written atomically: a temp file in the same
directory, then ``os.replace``).

EM-like vs SGD: :func:`format_em_vs_sgd`, :func:`plot_em_vs_sgd`; the deep experiment:
:func:`format_deep`, :func:`plot_deep`. Each takes the result dict of its experiment, or the same
dict read back from its JSON.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from gradattn._io import atomic_write


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> None:
    """``fig.savefig`` to ``path`` whole or not at all; the format comes from the file suffix."""
    path = os.fspath(path)
    fmt = kwargs.pop("format", None) or (os.path.splitext(path)[1].lstrip(".").lower() or "png")
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs), binary=True)


def plot_em_vs_sgd(results: dict, path: str | os.PathLike | None = None, *, ax=None, dpi: int = 150):
    """Mean loss curves of both arms of an EM-vs-SGD run with a +-1 std band over seeds, and H_min.

    ``results`` is the dict returned by :func:`gradattn.experiments.em_vs_sgd` (or read back from its
    JSON). Saves to ``path`` when given (atomically); returns the matplotlib Figure.
    """
    # A bare Figure renders with Agg and never touches pyplot's global state or GUI backends.
    try:
        curves = results["curves"]
        h_min = float(results["h_min"])
        n_seeds = len(results["seeds"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"plot_em_vs_sgd: results must be an em_vs_sgd result dict with curves, h_min, seeds ({err})") from None
    if ax is None:
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    styles = {"sgd": ("SGD (lr 0.01 on all)", "tab:blue"), "em": ("EM-like (W_V lr 0.1, others 0.01)", "tab:orange")}
    cfg = results.get("config", {})
    if cfg:
        styles["sgd"] = (f"SGD (lr {cfg['sgd_lr']:g})", "tab:blue")
        styles["em"] = (f"EM-like (W_V lr {cfg['value_lr']:g}, W_Q/W_K/W_O lr {cfg['routing_lr']:g})", "tab:orange")
    for arm, (label, color) in styles.items():
        mean = np.asarray(curves[f"{arm}_mean"])
        std = np.asarray(curves[f"{arm}_std"])
        steps = np.arange(mean.shape[0])
        ax.plot(steps, mean, color=color, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.25, linewidth=0)
    ax.axhline(h_min, color="k", linestyle="--", linewidth=1, label=f"H_min = {h_min:.4f} nats")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title(f"Sticky Markov chain: EM-like vs SGD, mean ± std over {n_seeds} seed{'s' if n_seeds != 1 else ''}")
    ax.legend()
    ax.grid(alpha=0.3)
    if path is not None:
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=dpi)
    return fig


def format_em_vs_sgd(results: dict) -> str:
    """A short text table of an EM-vs-SGD result (the dict of :func:`em_vs_sgd`)."""
    h_min = results.get("h_min")
    lines = [
        f"EM-like vs SGD: {len(results['seeds'])} seeds, {results['steps']} steps"
        + ("" if h_min is None else f", H_min = {h_min:.4f} nats"),
        f"{'arm':<8} {'final loss':>16} {'entropy':>9} {'accuracy':>9}",
    ]
    for arm, label in (("sgd", "SGD"), ("em", "EM-like")):
        r = results[arm]
        lines.append(
            f"{label:<8} {r['final_loss_mean']:>8.4f} ± {r['final_loss_std']:<5.3f} "
            f"{r['final_entropy_mean']:>9.4f} {r['final_accuracy_mean']:>9.4f}"
        )
    s = results["em_steps_to_sgd_final"]
    speed, p = results["speedup"], results["p_value"]
    if s["mean"] is None:
        lines.append("EM-like vs SGD's mean final loss: n/a (a seed diverged; see the per-seed losses)")
    else:
        lines.append(
            f"EM-like reaches SGD's mean final loss in {s['mean']:.0f} ± {s['std']:.0f} steps: "
            f"speed-up {'n/a' if speed is None else f'{speed:.2f}x'}; "
            f"paired t-test p = {'n/a' if p is None else f'{p:.2g}'}"
        )
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s on {results.get('n_devices', 1)} device(s)")
    return "\n".join(lines)


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _grid(rows) -> list[str]:
    head = "          " + "".join(f"  head {h:<3d}" for h in range(len(rows[0])))
    return [head] + [f"  layer {l:<2d}" + "".join(f"  {_fmt(v, '8.3f')}" for v in row) for l, row in enumerate(rows)]


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
    lines = [
        f"Deep transformer: {cfg['n_layers']} layers x {cfg['n_heads']} heads, d_model {cfg['d_model']}, "
        f"T = {cfg['task'].get('seq_len', 'n/a')}, {results['steps']} steps, {n_seeds} seed{'s' if n_seeds != 1 else ''}",
        f"{sched}, lr {cfg['lr']:g} (cosine to 0), weight decay {cfg['weight_decay']:g}, clip {cfg['clip']:g}, "
        f"dropout {cfg['dropout']:g}; trained on {data}",
        f"H_min                          {_fmt(results['h_min'], '.4f')} nats",
        f"training sequence (dropout off) loss {_fmt(tr['loss_mean'])} ± {_fmt(tr['loss_std'])}   Bayes {_fmt(tr['bayes_loss_mean'])}",
        f"held-out sequence              loss {_fmt(ho['loss_mean'])} ± {_fmt(ho['loss_std'])}   Bayes {_fmt(ho['bayes_loss_mean'])}"
        f"   gap to Bayes {_fmt(ho['gap_to_bayes_mean'], '+.3f')}   gap to H_min {_fmt(ho['gap_to_h_min_mean'], '+.3f')}",
        f"                               entropy {_fmt(ho['entropy_mean'])} nats   accuracy {_fmt(ho['accuracy_mean'])}",
        f"per-head laws vs autodiff (float64, small model): worst relative error {results['law_check']['worst_rel_error']:.1e}",
    ]
    dyn = results.get("dynamics")
    if dyn:
        lines.append("attention entropy at the last checkpoint (bits), layer x head:")
        lines += _grid(dyn["entropy_bits_mean"][-1])
        lines.append("sign agreement of advantage and Delta alpha, mean over checkpoints (chance 0.5):")
        lines += _grid(np.nanmean(np.asarray(dyn["sign_agreement_mean"], float), axis=0).tolist())
        if dyn.get("settle_attention_mean") is not None:
            lines.append(f"settling step of attention (tolerance {cfg['settle_tol']:g} of the total change):")
            lines += _grid(dyn["settle_attention_mean"])
            lines.append("settling step of values:")
            lines += _grid(dyn["settle_values_mean"])
    if "wall_time_s" in results:
        lines.append(f"wall time {results['wall_time_s']:.1f} s")
    return "\n".join(lines)


def plot_deep(results: dict, path=None, *, dpi: int = 150):
    """Training curve against H_min and the held-out losses; per-head heat maps (layer x head) of
    the final attention entropy and the mean sign agreement. Saved atomically when ``path`` is
    given; returns the matplotlib Figure."""
    try:
        curve = np.asarray(results["curve"]["mean"], float)
        std = np.asarray(results["curve"]["std"], float)
        ho, h_min = results["heldout"], results["h_min"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"plot_deep: results must be a deep_experiment result dict ({err})") from None
    dyn = results.get("dynamics")
    fig = Figure(figsize=(14 if dyn else 7, 4.2))
    axes = fig.subplots(1, 3 if dyn else 1, squeeze=False)[0]
    ax = axes[0]
    steps = np.arange(curve.shape[0])
    ax.plot(steps, curve, label="training loss (dropout on)")
    ax.fill_between(steps, curve - std, curve + std, alpha=0.25, linewidth=0)
    if h_min is not None:
        ax.axhline(h_min, color="k", ls="--", lw=1, label=f"H_min = {h_min:.3f}")
    if ho["loss_mean"] is not None:
        ax.axhline(ho["loss_mean"], color="tab:red", lw=1, label=f"held-out loss = {ho['loss_mean']:.3f}")
    if ho["bayes_loss_mean"] is not None:
        ax.axhline(ho["bayes_loss_mean"], color="tab:green", ls=":", lw=1.5, label=f"held-out Bayes = {ho['bayes_loss_mean']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"Deep transformer, {len(results['seeds'])} seed(s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if dyn:
        for ax, data, title in (
            (axes[1], np.asarray(dyn["entropy_bits_mean"][-1], float), "attention entropy (bits), last checkpoint"),
            (axes[2], np.nanmean(np.asarray(dyn["sign_agreement_mean"], float), axis=0), "sign agreement, mean over checkpoints"),
        ):
            im = ax.imshow(data, cmap="viridis", aspect="auto")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            ax.set_xticks(range(data.shape[1]))
            ax.set_yticks(range(data.shape[0]))
            ax.set_title(title, fontsize=10)
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    if path is not None:
        atomic_savefig(fig, path, dpi=dpi)
    return fig
