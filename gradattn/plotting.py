"""Figures, written atomically (a temp file in the same directory, then ``os.replace``)."""

from __future__ import annotations

import os

import numpy as np

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
    from matplotlib.figure import Figure

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
