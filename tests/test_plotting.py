"""The experiments' text reports and figures, and the shared formats of gradattn.plotting, on small constructed
result dicts: what they print and what the figures mark, on fixed scales and integer step ticks."""

import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.ticker import MaxNLocator

from gradattn.experiments.bijection import plot_bijection
from gradattn.experiments.deep import SIGN_AGREEMENT_RANGE, format_deep, plot_deep, uniform_attention_bits
from gradattn.experiments.em_sgd import format_em_vs_sgd, plot_em_vs_sgd
from gradattn.plotting import fmt_pm, fmt_steps

H_MIN = 1.829188059467207
TASK = {"name": "StickyMarkov", "n_symbols": 8, "seq_len": 16}


def em_results(steps=7, n_seeds=2, fmt=2, cross=(5.5, 0.7071), threshold=2.05):
    one = n_seeds == 1
    sgd = np.linspace(2.08, 2.05, steps)
    em = np.linspace(2.08, 2.0, steps)
    return {
        "format": fmt,
        "experiment": "em_vs_sgd",
        "h_min": H_MIN,
        "steps": steps,
        "seeds": list(range(n_seeds)),
        "sgd": {"final_loss_mean": 2.05, "final_loss_std": None if one else 0.0213,
                "final_entropy_mean": 2.07, "final_accuracy_mean": 0.19},
        "em": {"final_loss_mean": 2.0, "final_loss_std": None if one else 0.0266,
               "final_entropy_mean": 1.98, "final_accuracy_mean": 0.25},
        "threshold": threshold,
        "em_steps_to_sgd_final": {"mean": cross[0], "std": None if one else cross[1]},
        "speedup": None if cross[0] is None else steps / cross[0],
        "p_value": None if one else 1.5e-3,
        "curves": {"sgd_mean": sgd.tolist(), "sgd_std": [None if one else 0.01] * steps,
                   "em_mean": em.tolist(), "em_std": [None if one else 0.02] * steps},
        "config": {"sgd_lr": 0.01, "value_lr": 0.1, "routing_lr": 0.01, "task": TASK},
    }


def deep_results(n_seeds=2, sign=0.51, entropy=1.5, settle=14.0, fmt=2, n_ck=2, steps=8):
    one = n_seeds == 1
    grid = lambda v: [[v, v + 0.001], [v - 0.001, v]]  # noqa: E731
    return {
        "format": fmt,
        "experiment": "deep",
        "h_min": H_MIN,
        "steps": steps,
        "seeds": list(range(n_seeds)),
        "heldout": {"loss_mean": 1.85, "loss_std": None if one else 0.015, "entropy_mean": 1.83,
                    "accuracy_mean": 0.34, "bayes_loss_mean": 1.84, "gap_to_bayes_mean": 0.0066,
                    "gap_to_h_min_mean": 0.0169, "entropy_minus_h_min_mean": 0.005},
        "train": {"loss_mean": 0.0016, "loss_std": None if one else 6.6e-5, "bayes_loss_mean": 1.83},
        "curve": {"mean": np.linspace(2.2, 1.9, steps).tolist(), "std": [None if one else 0.02] * steps},
        "law_check": {"worst_rel_error": 1.6e-16},
        "config": {"n_layers": 2, "n_heads": 2, "d_model": 8, "task": TASK, "fresh_data": True,
                   "schedule": "adamw", "value_lr_multiplier": 10.0, "lr": 3e-4, "weight_decay": 0.01,
                   "clip": 1.0, "dropout": 0.1, "settle_tol": 0.1},
        "dynamics": {
            "checkpoint_steps": list(range(0, steps + 1, steps // n_ck)),
            "entropy_bits_mean": [grid(entropy)] * n_ck,
            "sign_agreement_mean": [grid(sign)] * n_ck,
            "settle_attention_mean": [[settle, 412.5], [settle, settle]],
            "settle_values_mean": [[settle, settle], [settle, settle]],
        },
    }


def _draw(fig):
    canvas = FigureCanvasAgg(fig)  # the functions return bare Figures; draw them as savefig would
    canvas.draw()
    return canvas.get_renderer()


def _integer_ticks(ax, lo, hi):
    loc = ax.xaxis.get_major_locator()
    assert isinstance(loc, MaxNLocator)
    ticks = loc.tick_values(lo, hi)
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


# ----------------------------------------------------------------------------------------------
# numbers


@pytest.mark.parametrize("v, want", [(5.5, "5.5"), (6.0, "6"), (6, "6"), (450.625, "450.6"), (14.0, "14"),
                                     (None, "n/a"), (float("nan"), "n/a")])
def test_steps_print_integers_as_integers_and_fractions_with_a_decimal(v, want):
    assert fmt_steps(v) == want


def test_a_missing_sd_prints_the_mean_alone():
    assert fmt_pm(1.25, 0.5, ".2f") == "1.25 ± 0.50"
    assert fmt_pm(1.25, None, ".2f") == fmt_pm(1.25, float("nan"), ".2f") == "1.25"


def test_uniform_attention_bits_is_log2_n_factorial_over_n():
    assert uniform_attention_bits({"config": {"task": {"seq_len": 3}}}) == pytest.approx(0.5)  # N = 2
    n = 999
    want = sum(math.log2(i) for i in range(1, n + 1)) / n
    assert uniform_attention_bits({"config": {"task": {"seq_len": 1000}}}) == pytest.approx(want)
    assert uniform_attention_bits({"config": {"task": {}}}) is None


# ----------------------------------------------------------------------------------------------
# EM-like vs SGD


def test_em_vs_sgd_text_prints_the_fractional_mean_and_labels_every_pm():
    text = format_em_vs_sgd(em_results())
    assert "H_min = 1.8292 nats, the loss of an oracle that knows the previous symbol" in text.splitlines()[1]
    assert "at step 5.5 ± 0.7 (mean ± sd over 2 seeds)" in text
    assert "speed-up 1.27x (7 / 5.5 steps)" in text
    assert "+-" not in text and "final loss (mean ± sd over 2 seeds)" in text
    assert "2.0500 ± 0.0213" in text
    # Older results (no format field) hold the population sd, and say so.
    assert "mean ± population sd over 2 seeds" in format_em_vs_sgd(em_results(fmt=None) | {"format": 1})


def test_seeds_that_never_fall_below_the_threshold_are_named():
    res = em_results() | {"per_seed": {"em_steps_to_sgd_final": [4, 7]}}  # 7 = steps: never
    note = "1 seed never fell below it (counted as 7 steps)"
    assert note in format_em_vs_sgd(res)
    (line,) = [ln for ln in plot_em_vs_sgd(res).axes[0].get_lines() if ln.get_gid() == "crossing_step"]
    assert note in line.get_label()
    assert "never" not in format_em_vs_sgd(em_results() | {"per_seed": {"em_steps_to_sgd_final": [4, 6]}})


def test_em_vs_sgd_text_of_an_integer_mean_and_of_one_seed():
    assert "at step 6 ± 0.7 " in format_em_vs_sgd(em_results(cross=(6.0, 0.7071)))
    one = format_em_vs_sgd(em_results(n_seeds=1, cross=(6.0, None)))
    assert "±" not in one and "at step 6 (1 seed)" in one and "p = n/a" in one


def test_em_vs_sgd_figure_marks_the_crossing_step_with_integer_ticks_and_the_legend_off_the_axes():
    fig = plot_em_vs_sgd(em_results())
    ax = fig.axes[0]
    (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == "crossing_step"]
    assert list(line.get_xdata()) == [5.5, 5.5]
    assert "step 5.5 ± 0.7 (mean ± sd over 2 seeds)" in line.get_label()
    (marker,) = [ln for ln in ax.get_lines() if ln.get_gid() == "crossing_marker"]  # at the threshold, with a ±sd bar
    assert list(marker.get_xdata()) == [5.5] and list(marker.get_ydata()) == [2.05]
    top = [a for a in ax.child_axes]
    assert any(t.get_text() == "step 5.5" for a in top for t in a.get_xticklabels())
    renderer = _draw(fig)
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.y1 <= ax.get_window_extent(renderer).y0  # below the axes: it hides no data
    assert any("H_min = 1.8292 nats" in t.get_text() for t in ax.get_legend().get_texts())


@pytest.mark.parametrize("steps", [3, 4, 7])
def test_every_step_axis_has_integer_ticks_on_short_runs(steps):
    # Matplotlib's default locator puts ticks at 0.5 or 0.25 steps on runs this short.
    em = plot_em_vs_sgd(em_results(steps=steps, cross=(1.5, 0.5)))
    deep = plot_deep(deep_results(steps=steps, n_ck=1))
    for fig in (em, deep):
        ax = fig.axes[0]
        assert ax.get_xlabel() == "step"
        _integer_ticks(ax, 0, steps - 1)
        _draw(fig)
        assert all(float(v).is_integer() for v in ax.get_xticks()), ax.get_xticks()


def test_em_vs_sgd_figure_of_one_seed_and_of_a_diverged_run():
    fig = plot_em_vs_sgd(em_results(n_seeds=1, cross=(6.0, None)))
    ax = fig.axes[0]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no sd band without an sd
    (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == "crossing_step"]
    assert "±" not in line.get_label() and "(1 seed)" in line.get_label()
    fig = plot_em_vs_sgd(em_results(cross=(None, None), threshold=None))
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "crossing_step"]


# ----------------------------------------------------------------------------------------------
# the deep experiment


@pytest.mark.parametrize("sign, entropy", [(0.51, 1.5), (0.9, 3.9), (0.2, 0.1)])
def test_deep_heat_maps_sit_on_fixed_scales_whatever_the_data(sign, entropy):
    fig = plot_deep(deep_results(sign=sign, entropy=entropy))
    loss_ax, ent_ax, sign_ax = fig.axes[:3]
    uniform = uniform_attention_bits(deep_results())
    assert ent_ax.images[0].get_clim() == pytest.approx((0.0, uniform))
    assert sign_ax.images[0].get_clim() == pytest.approx(SIGN_AGREEMENT_RANGE)
    assert sign_ax.images[0].norm.vcenter == 0.5 and sign_ax.images[0].get_cmap().name == "RdBu_r"
    # Units and chance are stated: bits on the entropy map, nats on the loss axis, chance on the sign map.
    cbar_labels = [a.get_ylabel() for a in fig.axes[3:]]
    assert any("bits" in s for s in cbar_labels) and any("chance 0.5" in s for s in cbar_labels)
    assert "bits" in ent_ax.get_title() and "chance (0.5)" in sign_ax.get_title()
    assert loss_ax.get_ylabel() == "loss (nats)" and loss_ax.get_xlabel() == "step"
    _integer_ticks(loss_ax, 0, 6)
    # Each cell carries its value.
    assert sorted(t.get_text() for t in sign_ax.texts) == sorted(f"{v:.3f}" for v in (sign, sign + 0.001, sign - 0.001, sign))


def test_deep_legend_is_off_the_axes_and_one_seed_plots_without_a_band():
    fig = plot_deep(deep_results(n_seeds=1))
    ax = fig.axes[0]
    renderer = _draw(fig)
    assert ax.get_legend().get_window_extent(renderer).y1 <= ax.get_window_extent(renderer).y0
    assert not any("±" in t.get_text() for t in ax.get_legend().get_texts())
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_deep_text_prints_settling_steps_as_integers_and_labels_every_pm():
    text = format_deep(deep_results())
    assert "14.000" not in text and "      14" in text and "412.5" in text
    assert "H_min = 1.8292 nats, the loss of an oracle that knows the previous symbol" in text
    assert "loss: mean ± sd over 2 seeds" in text and "loss 1.8500 ± 0.0150" in text and "+-" not in text
    assert "attention entropy (bits)" in text and "chance 0.5" in text
    one = format_deep(deep_results(n_seeds=1))
    assert "±" not in one and "loss 1.8500   Bayes" in one


# ----------------------------------------------------------------------------------------------
# the bijection study


def bijection_results(n_seeds=2, k=7):
    one = n_seeds == 1
    t = list(range(1, k + 1))
    exact = [math.log(k - i + 1) for i in t]

    def metric(v):
        return {"mean": list(v), "std": [None if one else 0.01] * k}

    models = {m: {"kl": metric(np.geomspace(1e-4, 1.0, k)), "entropy": metric(exact)}
              for m in ("head_init", "head", "deep_init", "deep")}
    return {"n_symbols": k, "steps": 5, "seeds": list(range(n_seeds)), "positions": t, "exact_entropy": exact,
            "models": models, "format": 2}


@pytest.mark.parametrize("n_seeds", [1, 2])
def test_bijection_figure_has_integer_ticks_and_one_legend_below_the_panels(n_seeds):
    fig = plot_bijection(bijection_results(n_seeds))
    renderer = _draw(fig)
    for ax in fig.axes:
        _integer_ticks(ax, 1, 7)
        assert ax.get_legend() is None
        assert all(float(v).is_integer() for v in ax.get_xticks())
    (legend,) = fig.legends
    assert legend.get_window_extent(renderer).y1 <= min(ax.get_window_extent(renderer).y0 for ax in fig.axes)
    title = fig.axes[0].get_title()
    assert ("±" not in title and "1 seed" in title) if n_seeds == 1 else "mean ± sd over 2 seeds" in title
