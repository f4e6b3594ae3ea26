"""The plateau and manifold experiments (gradattn.experiments.plateau and
gradattn.experiments.manifold: frame before precision on plateau runs, the manifold on held-out
data) at tiny sizes, their criteria against numpy references, and their commands."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _cli import cli_run

from gradattn import EmVsSgdConfig, em_vs_sgd, forward, init_head
from gradattn.dynamics import change_per_step, plateau_step, quiet_step
from gradattn.experiments.manifold import ManifoldConfig, format_manifold, linear_readout_ceiling, manifold_study
from gradattn.experiments.plateau import PlateauConfig, format_plateau, make_plateau_run, plateau_study
from gradattn.geometry import covariate_r2
from gradattn.tasks import StickyMarkov

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = StickyMarkov(seq_len=24)
PLATEAU = PlateauConfig(steps=40, checkpoint_every=10, plateau_window=10, task=TASK)
MANIFOLD = ManifoldConfig(steps=6, heldout=2, task=dataclasses.replace(TASK, noise_std=2.0))


# --------------------------------------------------------------------------------------------
# The criteria, against numpy
# --------------------------------------------------------------------------------------------


def np_quiet(steps, series, fraction):
    flat = np.asarray(series, np.float64).reshape(len(steps), -1)
    rate = np.linalg.norm(np.diff(flat, axis=0), axis=1) / np.diff(steps)
    ok = rate <= fraction * rate.max()
    if not ok[-1]:
        return np.nan
    k = len(ok) - 1
    while k > 0 and ok[k - 1]:
        k -= 1
    return float(steps[k])


def np_plateau(curve, window, tol):
    n = len(curve) // window
    m = np.asarray(curve[: n * window], np.float64).reshape(n, window).mean(1)
    ok = np.abs(np.diff(m)) / np.abs(m[:-1]) < tol
    if not ok[-1]:
        return np.nan
    j = len(ok) - 1
    while j > 0 and ok[j - 1]:
        j -= 1
    return float(j * window)


@pytest.mark.parametrize("seed", range(6))
def test_quiet_and_plateau_steps_equal_numpy(seed):
    rng = np.random.default_rng(seed)
    steps = np.arange(0, 121, 10, dtype=np.float64)
    # A decaying walk plus noise: quiet somewhere in the middle for most fractions.
    series = np.cumsum(rng.normal(size=(13, 3, 2)) * np.exp(-np.arange(13) / 3)[:, None, None], axis=0)
    for fraction in (0.05, 0.2, 0.5, 1.0):
        got = float(quiet_step(steps, series, fraction))
        want = np_quiet(steps, series, fraction)
        assert (np.isnan(got) and np.isnan(want)) or got == want, (fraction, got, want)
    np.testing.assert_allclose(change_per_step(steps, series),
                               np.linalg.norm(np.diff(series.reshape(13, -1), axis=0), axis=1) / 10, rtol=1e-12)
    curve = 2.0 + np.exp(-np.arange(200) / rng.uniform(10, 60)) + rng.normal(0, 1e-3, 200)
    for window, tol in ((10, 1e-3), (20, 1e-2), (50, 0.1)):
        got, want = float(plateau_step(curve, window, tol)), np_plateau(curve, window, tol)
        assert (np.isnan(got) and np.isnan(want)) or got == want, (window, tol, got, want)


def test_criteria_edge_cases_and_errors():
    steps = jnp.arange(4.0)
    # A constant speed is its own peak: below 100% of it from the start, never below half of it.
    assert float(quiet_step(steps, jnp.array([0.0, 1.0, 2.0, 3.0]), 1.0)) == 0.0
    assert np.isnan(float(quiet_step(steps, jnp.array([0.0, 1.0, 2.0, 3.0]), 0.5)))
    assert np.isnan(float(quiet_step(steps, jnp.array([0.0, 0.1, 0.2, 3.0]), 0.5)))  # still moving at the end
    assert np.isnan(float(quiet_step(steps, jnp.array([0.0, np.nan, 0.2, 0.2]), 0.5)))
    assert np.isnan(float(plateau_step(jnp.linspace(3.0, 1.0, 40), 10, 1e-3)))  # still falling
    assert float(plateau_step(jnp.ones(40), 10, 1e-3)) == 0.0
    assert np.isnan(float(plateau_step(jnp.ones(40).at[3].set(jnp.inf), 10, 1e-3)))
    with pytest.raises(ValueError, match=r"quiet_step: fraction\b.*got 0\.0"):
        quiet_step(steps, jnp.zeros(4), 0.0)
    with pytest.raises(ValueError, match=r"quiet_step: series\b.*K = 4.*\(3,\)"):
        quiet_step(steps, jnp.zeros(3), 0.5)
    with pytest.raises(ValueError, match=r"change_per_step: series\b.*K = 4.*\(3, 2\)"):
        change_per_step(steps, jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"change_per_step: checkpoint_steps\b.*at least 2.*\(1,\)"):
        change_per_step(jnp.zeros(1), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"plateau_step: curve\b.*two windows.*10 steps"):
        plateau_step(jnp.ones(15), 10, 1e-3)
    # Vmapped over seeds under jit.
    batch = jnp.stack([jnp.array([0.0, 1.0, 1.01, 1.011]), jnp.array([0.0, 0.1, 0.2, 3.0])])
    got = jax.jit(jax.vmap(lambda s: quiet_step(steps, s, 0.05)))(batch)
    assert float(got[0]) == 1.0 and np.isnan(float(got[1]))


# --------------------------------------------------------------------------------------------
# The plateau study
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plateau():
    return plateau_study(2, PLATEAU)


def test_plateau_study_contents(plateau):
    r = plateau
    assert r["seeds"] == [0, 1] and r["checkpoint_steps"] == [0, 10, 20, 30, 40]
    assert "provenance" in r and r["config"]["fresh_data"] is True
    json.dumps(r, allow_nan=False)
    for arm in ("sgd", "em"):
        assert len(r[arm]["loss_mean"]) == 4 and len(r[arm]["attention_distance_mean"]) == 5
        assert r[arm]["attention_distance_mean"][-1] == 0.0
        for key in ("against_converged", "endpoint_free"):
            for c in r[arm][key].values():
                assert c["n_compared"] + max(c["attention_never"], c["values_never"]) >= 0
        settle = np.array(r["per_seed"][f"{arm}_attention_settle"], dtype=float)
        assert np.all((settle >= 0) & (settle <= 40))
    assert "frame before precision" in format_plateau(r)


def test_plateau_attention_entropy_against_uniform(plateau):
    """Causal attention row i has at most log2(i + 1) bits, so the mean over rows is at most the
    uniform causal entropy, which the summary states in closed form; the report prints both and every
    criterion of the grid (the configured one marked)."""
    n = PLATEAU.task.n_positions
    uniform = plateau["uniform_attention_entropy_bits"]
    np.testing.assert_allclose(uniform, np.mean([np.log2(i + 1) for i in range(n)]), rtol=1e-12)
    for head in ("init", "sgd", "em"):
        per = np.asarray(plateau["per_seed"][f"{head}_attention_entropy_bits"])
        assert per.shape == (2,) and np.all((per > 0) & (per <= uniform + 1e-5))
        np.testing.assert_allclose(plateau["attention_entropy_bits"][head]["mean"], per.mean(), rtol=1e-6)
    text = format_plateau(plateau)
    assert f"uniform causal attention {uniform:.3f}" in text
    for crit in ("tol 0.05", "tol 0.2", "fraction of peak 0.1", "fraction of peak 0.5"):
        assert f" {crit}:" in text
    assert "*endpoint-free, fraction of peak 0.25:" in text and "*vs converged state, tol 0.1:" in text


def test_plateau_attention_entropy_recomputed():
    """The final attention entropy of a seed is attention_entropy_bits of the head after the run,
    on the seed's first sequence (one-sequence runs: em_vs_sgd's final parameters)."""
    from gradattn.geometry import attention_entropy_bits

    cfg = dataclasses.replace(PLATEAU, fresh_data=False)
    out = jax.jit(make_plateau_run(cfg))(jax.random.key(2))
    data_key, init_key = jax.random.split(jax.random.key(2))
    x, _ = TASK.sample(data_key, jnp.float32)
    p0 = init_head(init_key, TASK.d_in, cfg.head.d_k, cfg.head.d_v, TASK.n_classes, cfg.head.init_scale, jnp.float32)
    want = float(np.mean(np.asarray(attention_entropy_bits(forward(p0, x).alpha))))
    np.testing.assert_allclose(float(out["init_attention_entropy_bits"]), want, rtol=1e-6)


@pytest.mark.slow
def test_plateau_study_settling_equals_the_criterion_on_the_snapshots(plateau):
    """The study's settling steps are settling_step / quiet_step of attention rows and values that
    are recomputed here from a run of the same seed."""
    from gradattn.dynamics import settling_step

    run = make_plateau_run(PLATEAU)
    out = jax.jit(run)(jax.random.key(0))
    k = PLATEAU.checkpoint_steps.astype(np.float32)
    d = np.asarray(out["em_value_distance"])
    assert float(settling_step(k, d, 0.1, "change")) == float(out["em_value_settle_0.1"])
    assert plateau["per_seed"]["em_values_settle"][0] == float(out["em_value_settle_0.1"])
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(out["sgd_attention_rate"], np.float64) * 10)])
    want = np_quiet(k, cum, 0.25)
    got = float(out["sgd_attention_quiet_0.25"])
    assert (np.isnan(got) and np.isnan(want)) or got == want


@pytest.mark.slow
def test_plateau_one_sequence_is_em_vs_sgd_seed_for_seed():
    """With --one-sequence, seed s is em_vs_sgd's seed s: the same sequence, the same start, the
    same SGD and EM-like updates (the loss curves agree to float32 rounding)."""
    cfg = dataclasses.replace(PLATEAU, fresh_data=False)
    out = jax.jit(make_plateau_run(cfg))(jax.random.key(3))
    ref = em_vs_sgd([3], EmVsSgdConfig(steps=40, task=TASK))
    for arm in ("sgd", "em"):
        want = np.asarray(ref["curves"][f"{arm}_mean"]).reshape(4, 10).mean(1)
        np.testing.assert_allclose(out[f"{arm}_loss"], want, rtol=1e-5)
        np.testing.assert_allclose(out[f"{arm}_final_loss"], ref[arm]["final_loss_mean"], rtol=1e-5)


def test_plateau_one_seed_one_result(plateau):
    alone = plateau_study([1], PLATEAU)
    for arm in ("sgd", "em"):
        assert alone["per_seed"][f"{arm}_final_loss"][0] == plateau["per_seed"][f"{arm}_final_loss"][1]
        assert alone["per_seed"][f"{arm}_attention_quiet"][0] == plateau["per_seed"][f"{arm}_attention_quiet"][1] or (
            alone["per_seed"][f"{arm}_attention_quiet"][0] is None and plateau["per_seed"][f"{arm}_attention_quiet"][1] is None)


@pytest.mark.parametrize("kw, message", [
    (dict(steps=45), r"checkpoint_every=10\b.*divide.*steps=45"), (dict(checkpoint_every=40), r"checkpoint_every=40\b.*fewer than 2"),
    (dict(plateau_window=30), r"plateau_window=30\b.*2 windows"),
    (dict(peak_fraction=0.0), r"peak_fraction\b.*\(0\.0, 1\.0\].*got 0\.0"), (dict(peak_fraction=1.5), r"peak_fraction\b.*got 1\.5"),
    (dict(settle_rows=0), r"settle_rows\b.*got 0"), (dict(rates={"sgd_lr": 0.01}), r"rates\b.*ArmRates.*got dict"),
    (dict(grad_source="x"), r"grad_source\b.*'x'"),
])
def test_plateau_config_errors(kw, message):
    with pytest.raises((ValueError, TypeError), match=rf"^PlateauConfig: .*{message}"):
        dataclasses.replace(PLATEAU, **kw)


# --------------------------------------------------------------------------------------------
# The manifold study
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifold():
    return manifold_study(2, MANIFOLD)


def test_manifold_study_contents(manifold):
    r = manifold
    json.dumps(r, allow_nan=False)
    assert r["seeds"] == [0, 1] and r["noise_std"] == 2.0 and 0 < r["uncertain_fraction_mean"] <= 1
    for head in ("init", "sgd", "em"):
        for m in ("values_r2", "contexts_r2", "contexts_decoding_r2", "values_r2_shuffled", "contexts_r2_shuffled"):
            assert 0.0 <= r[head][m]["mean"] <= 1.0, (head, m)
    for arm in ("sgd", "em"):
        assert {"values_r2_vs_init", "values_r2_vs_shuffled", "contexts_decoding_r2_vs_init"} <= set(r[arm]["compared"])
    assert len(r["curves"]["em_mean"]) == MANIFOLD.steps
    assert "R^2" in format_manifold(r) and "linear-readout ceiling" in format_manifold(r)


def _np_r2(z, h):
    """In-sample R^2 of the least-squares fit of h on z with an intercept (numpy lstsq, float64)."""
    z = np.column_stack([np.ones(len(z)), np.asarray(z, np.float64)])
    h = np.asarray(h, np.float64)
    resid = h - z @ np.linalg.lstsq(z, h, rcond=None)[0]
    return 1.0 - resid @ resid / np.sum((h - h.mean()) ** 2)


def test_linear_readout_ceiling_equals_numpy_lstsq():
    """The ceiling is the least-squares R^2 of the entropy on x_t and on [x_t, x_{t-1}], checked
    against numpy's lstsq with an explicit intercept column, on sticky-chain sequences and their
    exact posterior entropy."""
    task = MANIFOLD.task
    xs = np.stack([np.asarray(task.sample(k, jnp.float64)[0]) for k in jax.random.split(jax.random.key(5), 3)])
    h = np.stack([np.asarray(task.bayes_filter_entropy(x)) for x in xs])
    got = linear_readout_ceiling(xs, h)
    prev = np.concatenate([np.zeros_like(xs[:, :1]), xs[:, :-1]], axis=1)
    np.testing.assert_allclose(float(got["x"]), _np_r2(xs.reshape(-1, xs.shape[-1]), h.reshape(-1)), rtol=1e-9)
    both = np.concatenate([xs, prev], -1).reshape(-1, 2 * xs.shape[-1])
    np.testing.assert_allclose(float(got["x_and_previous"]), _np_r2(both, h.reshape(-1)), rtol=1e-9)
    assert float(got["x"]) <= float(got["x_and_previous"]) <= 1.0
    with pytest.raises(ValueError, match=r"linear_readout_ceiling: xs\b.*\(S, N, d_in\).*\(23, 20\)"):
        linear_readout_ceiling(xs[0], h[0])
    with pytest.raises(ValueError, match=r"linear_readout_ceiling: xs\b.*entropy.*\(3, 22\)"):
        linear_readout_ceiling(xs, h[:, 1:])


def test_manifold_ceiling_bounds_the_values_r2(manifold):
    """The values are linear in x_t, so no head's value R^2 can exceed the ceiling on x_t: for every
    seed, untrained and trained (float32 slack only)."""
    per = manifold["per_seed"]
    ceiling = np.asarray(per["ceiling_x"])
    assert np.all((ceiling > 0) & (ceiling <= np.asarray(per["ceiling_x_and_previous"]) + 1e-6))
    for head in ("init", "sgd", "em"):
        assert np.all(np.asarray(per[f"{head}_values_r2"]) <= ceiling + 1e-4), head
    np.testing.assert_allclose(manifold["readout_ceiling"]["x"]["mean"], ceiling.mean(), rtol=1e-6)


@pytest.mark.slow
def test_manifold_untrained_r2_recomputed_independently(manifold):
    """The untrained head's R^2 on the pooled held-out positions, rebuilt from the documented key
    split: (data, init, test, shuffle) = split(key, 4)."""
    key = jax.random.key(1)
    _, init_key, test_key, _ = jax.random.split(key, 4)
    task = MANIFOLD.task
    params = init_head(init_key, task.d_in, MANIFOLD.head.d_k, MANIFOLD.head.d_v, task.n_classes, MANIFOLD.head.init_scale,
                       jnp.float32)
    xs = [task.sample(k, jnp.float32)[0] for k in jax.random.split(test_key, MANIFOLD.heldout)]
    entropy = np.concatenate([np.asarray(task.bayes_filter_entropy(x)) for x in xs])
    values = np.concatenate([np.asarray(forward(params, x).v) for x in xs])
    want = float(covariate_r2(values, entropy, MANIFOLD.n_components))
    np.testing.assert_allclose(manifold["per_seed"]["init_values_r2"][1], want, rtol=1e-4, atol=1e-6)
    # The ceiling of the same seed, by numpy's lstsq on the same held-out positions.
    xs = np.stack([np.asarray(x) for x in xs])
    np.testing.assert_allclose(manifold["per_seed"]["ceiling_x"][1], _np_r2(xs.reshape(-1, xs.shape[-1]), entropy),
                               rtol=1e-4, atol=1e-6)


def test_manifold_config_errors():
    with pytest.raises(ValueError, match=r"ManifoldConfig: n_components=16\b.*d_v=15"):
        dataclasses.replace(MANIFOLD, n_components=16)
    with pytest.raises(ValueError, match=r"ManifoldConfig: heldout\b.*\[1, 4096\].*got 0"):
        dataclasses.replace(MANIFOLD, heldout=0)


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_commands_write_their_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    code, stdout, err = cli_run(["plateau", "--seeds", "1", "--steps", "40", "--checkpoint-every", "10",
                                 "--plateau-window", "10", "--seq-len", "24", "--one-sequence", "--no-progress",
                                 "--out", str(out)], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["config"]["fresh_data"] is False and res["config"]["task"]["seq_len"] == 24
    assert "one sequence" in stdout
    out = tmp_path / "m.json"
    code, stdout, err = cli_run(["manifold", "--seeds", "1", "--steps", "3", "--heldout", "1", "--seq-len", "24",
                                 "--noise-std", "3", "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["noise_std"] == 3.0


def test_commands_default_to_their_configs_task(capsys):
    """A study's task flags change its config's own default task (T = 500), not the chain's T = 2000."""
    from gradattn import cli

    parser = cli.build_parser()
    for name, config_type in (("plateau", PlateauConfig), ("manifold", ManifoldConfig)):
        args = parser.parse_args([name, "--out", "x.json", "--noise-std", "2"])
        task = cli._build_task(args, parser, args.experiment.config_type())
        assert task.seq_len == config_type().task.seq_len == 500 and task.noise_std == 2.0
    code, _, err = cli_run(["plateau", "--out", "x.json", "--plot", "x.png"], capsys)
    assert code == 2 and "--plot" in err


@pytest.mark.slow
def test_compilation_cache_is_kept_and_reused(tmp_path):
    """The command keeps its compiled programs in $GRADATTN_CACHE_DIR; a second run of the same sizes
    reuses them (it adds no entry) and gives the same results; --no-compilation-cache keeps none."""
    env = {k: v for k, v in os.environ.items() if k != "GRADATTN_NO_COMPILATION_CACHE"}
    env.update(PYTHONPATH=ROOT, GRADATTN_CACHE_DIR=str(tmp_path / "cache"))
    argv = [sys.executable, "-m", "gradattn_launcher", "em-vs-sgd", "--seeds", "1", "--steps", "3", "--seq-len", "16",
            "--no-progress"]

    def run(out, *extra, cache="cache"):
        e = dict(env, GRADATTN_CACHE_DIR=str(tmp_path / cache))
        proc = subprocess.run(argv + ["--out", str(tmp_path / out), *extra], env=e, capture_output=True, text=True,
                              timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads((tmp_path / out).read_text())["per_seed"]

    first = run("a.json")
    entries = sorted(os.listdir(tmp_path / "cache"))
    assert entries
    assert run("b.json") == first
    assert sorted(os.listdir(tmp_path / "cache")) == entries
    run("c.json", "--no-compilation-cache", cache="other")
    assert not (tmp_path / "other").exists()
