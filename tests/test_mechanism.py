"""The mechanism study (gradattn.experiments.mechanism: value split, reverse split and SGD at the
same step size, on held-out loss) and the feedback-loop study (gradattn.experiments.feedback_loop:
alpha against the advantage over training, full against frozen halves) at tiny sizes: the rates
per group, frozen groups, the statistics against numpy, seeds independent of their neighbours, the
verdicts recomputed from the JSON, validation, and the commands."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from _cli import cli_run

from gradattn.experiments import EmVsSgdConfig, config_from_dict, em_vs_sgd, registry
from gradattn.experiments.feedback_loop import (
    ARMS,
    GROUPS,
    STATISTICS,
    FeedbackLoopConfig,
    feedback_loop_study,
    format_feedback_loop,
    loop_statistics,
    plot_feedback_loop,
    summarise_feedback_loop,
)
from gradattn.experiments.mechanism import (
    MATCHED,
    GroupRates,
    MechanismConfig,
    arm_table,
    format_mechanism,
    group_sgd,
    mean_rate,
    mechanism_study,
    parameter_counts,
    plot_mechanism,
    summarise_mechanism,
)
from gradattn.head import HeadParams, dense_loss, init_head
from gradattn.tasks import StickyMarkov
from gradattn.training import train_arms

TASK = StickyMarkov(seq_len=33)  # N = 32
MECH = MechanismConfig(steps=3, task=TASK, base_rates="0.01", grid="0.01,0.1", heldout=1, min_seeds=2,
                       p_threshold=0.9)
LOOP = FeedbackLoopConfig(steps=6, checkpoint_every=3, task=TASK, min_seeds=2, p_threshold=0.9)


@pytest.fixture(scope="module")
def mech_runs():
    """The tiny mechanism study over seeds [0, 1] and over [1] alone, in chunks of 2 (one compile)."""
    both = mechanism_study([0, 1], MECH, chunk_size=2, per_seed_curves=True)
    alone = mechanism_study([1], MECH, chunk_size=2, per_seed_curves=True)
    return both, alone


@pytest.fixture(scope="module")
def loop_runs():
    both = feedback_loop_study([0, 1], LOOP, chunk_size=2)
    alone = feedback_loop_study([1], LOOP, chunk_size=2)
    return both, alone


# ---------------------------------------------------------------------------------------------
# Rates per parameter group


def _problem(dtype=jnp.float64):
    x, y = TASK.sample(jax.random.key(3), dtype)
    params = init_head(jax.random.key(4), TASK.d_in, 4, 6, TASK.n_classes, 0.3, dtype)
    return params, x, y


@pytest.mark.parametrize("rates", [GroupRates(0.1, 0.01, 0.01), GroupRates(0.01, 0.1, 0.01), GroupRates(0.03, 0.2, 0.5),
                                   GroupRates(0.0, 0.01, 0.01), GroupRates(0.1, 0.0, 0.0)])
def test_one_step_is_the_hand_made_sgd_update_of_each_group(rates):
    """One step of ``train_arms`` with :func:`group_sgd` is ``W - rate * dL/dW`` with each matrix's
    group rate (float64; the gradient from autodiff of the dense loss), and a group at rate 0 stays
    exactly where it was."""
    params, x, y = _problem()
    grads = jax.grad(dense_loss)(params, x, y)
    final, _, _ = train_arms(params, {"arm": group_sgd(rates)}, lambda t: (x, y), 1, grad_source="autodiff")
    lr = {"w_q": rates.frame, "w_k": rates.frame, "w_v": rates.value, "w_o": rates.output}
    for g in GROUPS:
        got, p, d = (np.asarray(getattr(t, g)) for t in (final["arm"].params, params, grads))
        np.testing.assert_allclose(got, p - lr[g] * d, rtol=1e-12, atol=1e-15, err_msg=g)
        if lr[g] == 0:
            np.testing.assert_array_equal(got, p)


def test_the_arm_table_holds_the_stated_rates():
    config = MechanismConfig(base_rates="0.01,0.1", grid="0.01,0.03,0.1", ratio=10)
    table = arm_table(config)
    counts = parameter_counts(config.task, config.head)
    assert counts == GroupRates(20 * 15, 2 * 20 * 10, 15 * 8)
    for j, b in enumerate((0.01, 0.1)):
        r = {role: table.rates[table.matched[role][j]] for role in MATCHED}
        assert r["sgd"] == GroupRates(b, b, b)
        assert r["value_split"] == GroupRates(10 * b, b, b)
        assert r["reverse_split"] == GroupRates(b, 10 * b, b)
        m = (300 * 10 * b + 520 * b) / 820  # the value split's rates averaged over the 820 entries
        assert r["sgd_matched"] == GroupRates(*[pytest.approx(m, rel=1e-11)] * 3)
        assert mean_rate(r["sgd_matched"], counts) == pytest.approx(mean_rate(r["value_split"], counts), rel=1e-11)
        assert mean_rate(r["reverse_split"], counts) > mean_rate(r["value_split"], counts)  # the larger total step
    grid = config.grid_values
    for i, v in enumerate(grid):
        for k, w in enumerate(grid):
            assert table.rates[table.grid[i][k]] == GroupRates(v, w, w)
    assert len(set(table.rates)) == len(table.rates)  # each triple once: (0.1, 0.01, 0.01) is the grid's and the split's
    assert table.grid[2][0] == table.matched["value_split"][0]


def test_the_runs_arms_start_together_and_move_by_their_own_rates(mech_runs):
    """Through the compiled run: every arm's loss before its first update is the seed's head's, and
    after it that of the hand-made update ``W - rate * dL/dW`` of each group (float64 reference on
    the seed's own head and sequence); swapping an arm's value and frame rates would not match."""
    both, _ = mech_runs
    curves = np.asarray(both["per_seed_curves"]["curve"], np.float64)
    table = arm_table(MECH)
    for s, seed in enumerate(both["seeds"]):
        data_key, init_key = jax.random.split(jax.random.key(seed))
        x, y = TASK.sample(data_key, jnp.float32)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), MECH.head.init(init_key, TASK))
        x = x.astype(jnp.float64)
        grads = jax.grad(dense_loss)(params, x, y)

        def stepped_loss(r, params=params, grads=grads, x=x, y=y):
            lr = HeadParams(w_q=r.frame, w_k=r.frame, w_v=r.value, w_o=r.output)
            return float(dense_loss(jax.tree.map(lambda p, g, a: p - a * g, params, grads, lr), x, y))

        for i, r in enumerate(table.rates):
            np.testing.assert_allclose(curves[s, i, 0], float(dense_loss(params, x, y)), rtol=1e-5)
            np.testing.assert_allclose(curves[s, i, 1], stepped_loss(r), rtol=1e-5)
            if r.value != r.frame:
                assert abs(stepped_loss(r._replace(value=r.frame, frame=r.value)) - curves[s, i, 1]) > 1e-4


def test_seed_s_is_em_vs_sgds_seed_s(mech_runs):
    """SGD at 0.01 and the value split at 0.01 are the paper's two arms: the same sequence and head
    per seed as :func:`gradattn.em_vs_sgd`, so the same losses (to float32 rounding)."""
    both, _ = mech_runs
    paper = em_vs_sgd([0, 1], EmVsSgdConfig(steps=MECH.steps, task=TASK), chunk_size=2)
    j = MECH.base_rate_values.index(0.01)
    for role, arm in (("sgd", "sgd"), ("value_split", "em")):
        i = arm_table(MECH).matched[role][j]
        np.testing.assert_allclose(np.asarray(both["per_seed"]["final_loss"])[:, i], paper["per_seed"][f"{arm}_final_loss"],
                                   rtol=1e-5)


def test_frozen_groups_do_not_move(loop_runs):
    both, _ = loop_runs
    frozen = {"full": set(), "routing_only": {"w_v"}, "values_only": {"w_q", "w_k"}, "output_only": {"w_q", "w_k", "w_v"}}
    for arm in ARMS:
        moved = both["arms"][arm]["moved_mean"]
        for g in GROUPS:
            assert (moved[g] == 0.0) == (g in frozen[arm]), (arm, g, moved[g])


def test_frozen_groups_stay_put_at_every_checkpoint_and_freeze_output_freezes_w_o():
    config = FeedbackLoopConfig(steps=4, checkpoint_every=2, task=TASK, freeze_output=True)
    params, x, y = _problem(jnp.float32)
    optimizers = {name: group_sgd(r) for name, r in config.arm_rates().items()}
    final, _, checkpoints = train_arms(params, optimizers, lambda t: (x, y), 4, checkpoint_every=2)
    assert config.arm_rates()["full"] == GroupRates(0.1, 0.01, 0.0)
    for arm, groups in (("routing_only", ("w_v", "w_o")), ("values_only", ("w_q", "w_k", "w_o")),
                        ("output_only", GROUPS), ("full", ("w_o",))):
        for g in groups:
            np.testing.assert_array_equal(np.asarray(getattr(checkpoints[arm], g)),
                                          np.broadcast_to(np.asarray(getattr(params, g)), (2, *getattr(params, g).shape)))
            np.testing.assert_array_equal(np.asarray(getattr(final[arm].params, g)), np.asarray(getattr(params, g)))
    assert not np.array_equal(np.asarray(final["full"].params.w_v), np.asarray(params.w_v))


# ---------------------------------------------------------------------------------------------
# The loop's statistics against numpy


def _numpy_statistics(params, x, y):
    """The three statistics from their definitions, loop by loop, in float64 numpy."""
    wq, wk, wv, wo = (np.asarray(getattr(params, g), np.float64) for g in GROUPS)
    x, y = np.asarray(x, np.float64), np.asarray(y)
    n, d_k = x.shape[0], wq.shape[1]
    q, k, v = x @ wq, x @ wk, x @ wv
    alpha = np.zeros((n, n))
    for i in range(n):
        s = q[i] @ k[: i + 1].T / np.sqrt(d_k)
        e = np.exp(s - s.max())
        alpha[i, : i + 1] = e / e.sum()
    logits = alpha @ v @ wo
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    err = p.copy()
    err[np.arange(n), y] -= 1.0
    gains, corrs, pooled_a, pooled_adv = [], [], [], []
    for i in range(1, n):
        b = np.array([err[i] @ (v[j] @ wo) for j in range(i + 1)])
        a_row = alpha[i, : i + 1]
        adv = a_row @ b - b
        gains.append(np.sum((1.0 / (i + 1) - a_row) * b))
        corrs.append(np.corrcoef(a_row, adv)[0, 1])
        pooled_a += list(a_row)
        pooled_adv += list(adv)
    return {"gain": np.mean(gains), "row_corr": np.mean(corrs), "pooled_corr": np.corrcoef(pooled_a, pooled_adv)[0, 1]}


@pytest.mark.parametrize("seed", [0, 1])
def test_loop_statistics_are_their_definitions(seed):
    x, y = StickyMarkov(seq_len=13).sample(jax.random.key(seed), jnp.float64)
    params = init_head(jax.random.key(10 + seed), x.shape[1], 3, 5, 8, 0.4, jnp.float64)
    got = jax.jit(loop_statistics)(params, x, y)
    want = _numpy_statistics(params, x, y)
    for name in STATISTICS:
        np.testing.assert_allclose(float(got[name]), want[name], rtol=1e-10, err_msg=name)
    # float32, as the run computes them
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    got32 = loop_statistics(params32, x.astype(jnp.float32), y)
    for name in STATISTICS:
        assert got32[name].dtype == jnp.float32
        np.testing.assert_allclose(float(got32[name]), want[name], rtol=2e-4, atol=1e-6, err_msg=name)


def test_uniform_attention_has_no_gain_and_no_correlation():
    """Every score 0: the gain and the pooled correlation are 0 (each row's advantages sum to 0), and no
    query's attention varies, so the per-query correlation is undefined (NaN)."""
    x, y = StickyMarkov(seq_len=9).sample(jax.random.key(2), jnp.float64)
    params = init_head(jax.random.key(3), x.shape[1], 3, 5, 8, 0.4, jnp.float64)
    s = loop_statistics(params._replace(w_q=jnp.zeros_like(params.w_q)), x, y)
    assert abs(float(s["gain"])) < 1e-15 and abs(float(s["pooled_corr"])) < 1e-12 and np.isnan(float(s["row_corr"]))


# ---------------------------------------------------------------------------------------------
# The runs: one seed whatever its neighbours; the verdicts recomputed from the JSON


def test_a_seeds_mechanism_result_does_not_depend_on_its_neighbours(mech_runs):
    both, alone = mech_runs
    for name in ("final_loss", "select_loss", "heldout_loss", "heldout_bayes_loss"):
        assert both["per_seed"][name][1] == alone["per_seed"][name][0], name
    np.testing.assert_array_equal(np.asarray(both["per_seed_curves"]["curve"][1]),
                                  np.asarray(alone["per_seed_curves"]["curve"][0]))
    assert both["per_seed"]["final_loss"][0] != both["per_seed"]["final_loss"][1]


def test_a_seeds_feedback_result_does_not_depend_on_its_neighbours(loop_runs):
    both, alone = loop_runs
    for arm in ARMS:
        assert both["per_seed"][f"{arm}_final_loss"][1] == alone["per_seed"][f"{arm}_final_loss"][0]
        for stat in STATISTICS:
            assert both["per_seed"][f"{arm}_{stat}"][1] == alone["per_seed"][f"{arm}_{stat}"][0], (arm, stat)


def _holds(worse, better, p_threshold, min_difference):
    worse, better = np.asarray(worse, float), np.asarray(better, float)
    p = stats.ttest_rel(worse, better).pvalue
    return bool(np.mean(worse - better) > min_difference and p < p_threshold)


def test_mechanism_verdict_is_recomputed_from_the_json(mech_runs):
    res = json.loads(json.dumps(mech_runs[0]))
    cfg, per = res["config"], res["per_seed"]
    held = np.asarray(per["heldout_loss"], float)
    select = np.asarray(per["select_loss"], float)
    rule = lambda w, b: _holds(w, b, cfg["p_threshold"], cfg["min_difference"])  # noqa: E731
    supported = []
    for base in res["base_rates"]:
        arm = {role: base["arms"][role]["arm"] for role in MATCHED}
        rates = {role: res["arms"][i] for role, i in arm.items()}
        b = base["base_rate"]
        assert (rates["value_split"]["value_lr"], rates["value_split"]["frame_lr"]) == (cfg["ratio"] * b, b)
        assert (rates["reverse_split"]["value_lr"], rates["reverse_split"]["frame_lr"]) == (b, cfg["ratio"] * b)
        assert rates["sgd_matched"]["mean_rate"] == rates["value_split"]["mean_rate"]
        value = held[:, arm["value_split"]]
        holds = rule(held[:, arm["reverse_split"]], value) and rule(held[:, arm["sgd_matched"]], value)
        assert base["rule_holds"] == holds
        assert base["reverse_minus_value"]["mean"] == pytest.approx(np.mean(held[:, arm["reverse_split"]] - value))
        supported += [b] if holds else []
        # the paper's speed-up: SGD at b's mean final loss as the threshold, first step below it
        final = np.asarray(per["final_loss"], float)
        threshold = np.mean(final[:, arm["sgd"]])
        assert base["threshold"] == pytest.approx(threshold)
        curves = np.asarray(res["per_seed_curves"]["curve"], float)
        for role, i in arm.items():
            below = curves[:, i] < threshold
            steps = np.where(below.any(axis=1), below.argmax(axis=1), res["steps"])
            assert base["arms"][role]["steps_to_threshold"]["per_seed"] == steps.tolist()
            assert base["arms"][role]["speedup"] == pytest.approx(res["steps"] / steps.mean())
    assert res["verdict"]["supported_at"] == supported
    grid = np.asarray(res["grid"]["arm"])
    means = select.mean(axis=0)
    single = min(np.diag(grid), key=lambda i: means[i])
    pair = min(grid.ravel(), key=lambda i: means[i])
    assert (res["best"]["single"]["arm"], res["best"]["pair"]["arm"]) == (single, pair)
    pair_wins = single != pair and rule(held[:, single], held[:, pair])
    assert res["verdict"]["pair_beats_single"] == pair_wins
    # the summary is a function of the JSON's per-seed fields alone
    per_seed = {name: np.asarray(per[name], np.float32) for name in ("final_loss", "select_loss", "heldout_loss",
                                                                     "heldout_bayes_loss")}
    per_seed["curve"] = np.asarray(res["per_seed_curves"]["curve"], np.float32)
    again = json.loads(json.dumps(summarise_mechanism(per_seed, res["seeds"], MECH)))
    assert again == {k: v for k, v in res.items() if k in again}
    # fewer seeds than min_seeds: the numbers, no verdict
    undecided = summarise_mechanism(per_seed, res["seeds"], dataclasses.replace(MECH, min_seeds=8))
    assert undecided["verdict"]["decided"] is False and undecided["verdict"]["pair_beats_single"] is None
    assert all(base["rule_holds"] is None for base in undecided["base_rates"])
    assert "undecided" in undecided["verdict"]["text"]


def test_feedback_verdict_is_recomputed_from_the_json(loop_runs):
    res = json.loads(json.dumps(loop_runs[0]))
    cfg, per = res["config"], res["per_seed"]
    assert res["checkpoint_steps"] == [0, 3, 6]
    rule = lambda w, b: _holds(w, b, cfg["p_threshold"], cfg["min_difference"])  # noqa: E731
    top = (lambda a: a[:, -1]) if cfg["growth"] == "end" else (lambda a: a.max(axis=1))
    for stat in STATISTICS:
        growth = {arm: top(np.asarray(per[f"{arm}_{stat}"], float)) - np.asarray(per[f"{arm}_{stat}"], float)[:, 0]
                  for arm in ARMS}
        r = res["statistics"][stat]
        assert r["supported"] == (rule(growth["full"], growth["routing_only"]) and rule(growth["full"], growth["values_only"]))
        assert r["superadditive"] == rule(growth["full"] + growth["output_only"], growth["routing_only"] + growth["values_only"])
        for arm in ARMS:
            assert r["arms"][arm]["growth"]["mean"] == pytest.approx(np.mean(growth[arm]))
            assert r["arms"][arm]["mean"][0] == r["arms"]["full"]["mean"][0]  # one head at the start
    chosen = res["statistics"][cfg["decide_on"]]
    assert (res["verdict"]["supported"], res["verdict"]["superadditive"]) == (chosen["supported"], chosen["superadditive"])


def test_feedback_growth_at_the_peak_and_undecided_below_min_seeds(loop_runs):
    """The summary from the per-seed series alone, read at the peak; and with too few seeds, no verdict."""
    res = loop_runs[0]
    per_seed = {f"{arm}_{stat}": np.asarray(res["per_seed"][f"{arm}_{stat}"], np.float32) for arm in ARMS for stat in STATISTICS}
    per_seed.update({f"{arm}_final_loss": np.asarray(res["per_seed"][f"{arm}_final_loss"], np.float32) for arm in ARMS})
    n_params = sum(int(np.prod(np.shape(getattr(init_head(jax.random.key(0), 20, 10, 15, 8), g)))) for g in GROUPS)
    per_seed.update({"init_params": np.zeros((2, n_params)), **{f"{arm}_params": np.zeros((2, n_params)) for arm in ARMS}})
    peak = summarise_feedback_loop(per_seed, res["seeds"], dataclasses.replace(LOOP, growth="peak"))
    for stat in STATISTICS:
        for arm in ARMS:
            series = per_seed[f"{arm}_{stat}"].astype(np.float64)
            assert peak["statistics"][stat]["arms"][arm]["growth"]["mean"] == pytest.approx(
                np.mean(series.max(axis=1) - series[:, 0]))
    assert "peak" in peak["rule"]
    undecided = summarise_feedback_loop(per_seed, res["seeds"], dataclasses.replace(LOOP, min_seeds=3))
    assert undecided["verdict"]["decided"] is False and undecided["verdict"]["supported"] is None
    assert all(undecided["statistics"][s]["supported"] is None for s in STATISTICS)


def test_reports_and_figures(mech_runs, loop_runs, tmp_path):
    text = format_mechanism(mech_runs[0])
    assert "value split" in text and "reverse split" in text and "verdict:" in text and "speed-up" in text
    text = format_feedback_loop(loop_runs[0])
    assert "routing only" in text and "verdict:" in text
    plot_mechanism(mech_runs[0], tmp_path / "m.png")
    plot_feedback_loop(loop_runs[0], tmp_path / "f.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# Validation and the commands


@pytest.mark.parametrize("kwargs, name", [
    ({"base_rates": "0.01,x"}, "base_rates"),
    ({"base_rates": "0,0.1"}, "base_rates"),
    ({"base_rates": "0.1,0.1"}, "base_rates"),
    ({"base_rates": ""}, "base_rates"),
    ({"base_rates": 0.1}, "base_rates"),
    ({"grid": "0.01,nan"}, "grid"),
    ({"grid": ",".join(str(0.01 * (i + 1)) for i in range(9))}, "grid"),
    ({"ratio": 1.0}, "ratio"),
    ({"ratio": 200.0, "base_rates": "1"}, "ratio"),
    ({"heldout": 0}, "heldout"),
    ({"p_threshold": 0.0}, "p_threshold"),
    ({"min_difference": -1.0}, "min_difference"),
    ({"min_seeds": 1}, "min_seeds"),
    ({"steps": 0}, "steps"),
])
def test_mechanism_config_errors_name_the_argument(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=rf"MechanismConfig: {name}\b"):
        MechanismConfig(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"checkpoint_every": 7}, "checkpoint_every"),
    ({"value_lr": 0.0}, "value_lr"),
    ({"routing_lr": -0.1}, "routing_lr"),
    ({"decide_on": "entropy"}, "decide_on"),
    ({"p_threshold": 1.5}, "p_threshold"),
    ({"min_seeds": 0}, "min_seeds"),
])
def test_feedback_config_errors_name_the_argument(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=rf"FeedbackLoopConfig: {name}\b"):
        FeedbackLoopConfig(**kwargs)


def test_rates_are_normalised_and_round_trip():
    a = MechanismConfig(base_rates=[0.1, 0.01], grid="0.3, 0.1")
    assert (a.base_rates, a.grid) == ("0.01,0.1", "0.1,0.3")
    assert a == MechanismConfig(base_rates="0.01,0.1", grid="0.1,0.3")
    assert config_from_dict(MechanismConfig, json.loads(json.dumps(a.to_dict()))) == a
    b = FeedbackLoopConfig(decide_on="gain", freeze_output=True)
    assert config_from_dict(FeedbackLoopConfig, json.loads(json.dumps(b.to_dict()))) == b


def test_both_commands_are_on_the_registry_and_have_help(capsys):
    commands = {e.command: e for e in registry()}
    assert commands["em-mechanism"] is mechanism_study and commands["feedback-loop"] is feedback_loop_study
    for command in ("em-mechanism", "feedback-loop"):
        code, out, _ = cli_run([command, "--help"], capsys)
        assert code == 0 and "--p-threshold" in out and "--min-seeds" in out
    assert "--base-rates" in cli_run(["em-mechanism", "--help"], capsys)[1]
    assert "--decide-on" in cli_run(["feedback-loop", "--help"], capsys)[1]


@pytest.mark.parametrize("command, args, flag", [
    ("em-mechanism", ["--base-rates", "0.01,abc"], "--base-rates"),
    ("em-mechanism", ["--ratio", "1"], "--ratio"),
    ("em-mechanism", ["--grid", "0.1,0.1"], "--grid"),
    ("feedback-loop", ["--checkpoint-every", "7"], "--checkpoint-every"),
    ("feedback-loop", ["--decide-on", "nope"], "--decide-on"),
])
def test_bad_flags_exit_2_naming_the_flag(command, args, flag, capsys, tmp_path):
    out = tmp_path / "r.json"
    code, _, err = cli_run([command, "--out", str(out), "--no-progress"] + args, capsys)
    assert code == 2 and flag in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_tiny_runs_from_the_command_line(mech_runs, tmp_path, capsys):
    """The command with the fixture's config reuses its compiled run; JSON, figure and report."""
    out, fig = tmp_path / "m.json", tmp_path / "m.png"
    argv = ["em-mechanism", "--seed-list", "0,1", "--chunk-size", "2", "--no-progress", "--out", str(out), "--plot", str(fig),
            "--steps", "3", "--seq-len", "33", "--base-rates", "0.01", "--grid", "0.01,0.1", "--heldout", "1",
            "--min-seeds", "2", "--p-threshold", "0.9"]
    code, stdout, err = cli_run(argv, capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["experiment"] == "em_mechanism" and res["per_seed"]["heldout_loss"] == mech_runs[0]["per_seed"]["heldout_loss"]
    assert "verdict:" in stdout and fig.read_bytes()[:4] == b"\x89PNG"
