"""The wind-tunnel experiment at tiny sizes: its metrics against numpy, its optimiser's schedule, one
seed one result, every model on both tunnels, presets and the command line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from _cli import cli_run

from gradattn.experiments import compiled_run, config_from_dict, run_experiment
from gradattn.experiments.windtunnel import (
    HMMTunnelConfig,
    WindTunnelConfig,
    eval_tasks,
    format_windtunnel,
    optimizer,
    position_metrics,
    windtunnel_bijection,
    windtunnel_hmm,
)
from gradattn.sweeps import seed_key
from gradattn.tasks import BijectionTokens, InContextHMM

TINY_B = WindTunnelConfig(task=BijectionTokens(V=4, L=3), d_model=8, n_layers=1, n_heads=2, steps=6, warmup=2,
                          batch=4, heldout=8)
TINY_H = HMMTunnelConfig(task=InContextHMM(n_states=2, n_obs=2, length=3), d_model=8, n_layers=1, n_heads=2, steps=4,
                         warmup=1, batch=2, heldout=4)


def test_position_metrics_against_numpy():
    rng = np.random.default_rng(0)
    b, s, c, lo, hi = 5, 3, 6, 2, 6
    logits = rng.normal(size=(b, s, c))
    p = np.zeros((b, s, c))
    p[..., lo:hi] = rng.dirichlet(np.ones(hi - lo), size=(b, s))
    p[0, 0, lo] = 0.0
    p[0, 0] /= p[0, 0].sum()
    labels = rng.integers(lo, hi, size=(b, s))
    m = position_metrics(jnp.asarray(logits), jnp.asarray(p), jnp.asarray(labels), (lo, hi))
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.nansum(np.where(p > 0, p * np.log2(p / q), 0.0), axis=-1)
        h_exact = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=-1)
    qr = np.exp(logits[..., lo:hi] - logits[..., lo:hi].max(-1, keepdims=True))
    qr /= qr.sum(-1, keepdims=True)
    h_model = -np.sum(qr * np.log2(qr), axis=-1)
    np.testing.assert_allclose(m["kl_bits"], kl.mean(0), rtol=1e-10)
    np.testing.assert_allclose(m["exact_entropy_bits"], h_exact.mean(0), rtol=1e-10)
    np.testing.assert_allclose(m["model_entropy_bits"], h_model.mean(0), rtol=1e-10)
    np.testing.assert_allclose(m["abs_entropy_error_bits"], np.abs(h_model - h_exact).mean(0), rtol=1e-10)
    np.testing.assert_allclose(m["accuracy"], (logits.argmax(-1) == labels).mean(0))
    np.testing.assert_allclose(m["bayes_accuracy"], p.max(-1).mean(0), rtol=1e-12)


def test_position_metrics_refuse_mismatched_shapes():
    z = jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"position_metrics: logits and posterior must be \(B, S, C\)"):
        position_metrics(z, z[..., :3], jnp.zeros((2, 3), jnp.int32), (0, 3))
    with pytest.raises(ValueError, match=r"position_metrics: class_range.*C = 4"):
        position_metrics(z, z, jnp.zeros((2, 3), jnp.int32), (2, 5))


def test_schedule_is_linear_warmup_then_cosine_to_zero():
    cfg = WindTunnelConfig(steps=100, warmup=10, lr=1e-3)
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100, end_value=0.0)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3) and float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    assert float(schedule(55)) == pytest.approx(0.5e-3, rel=1e-6)  # half-way down the cosine
    params = {"w": jnp.ones(3)}
    tx = optimizer(cfg)
    updates, _ = tx.update({"w": jnp.full(3, 100.0)}, tx.init(params), params)
    assert float(jnp.max(jnp.abs(updates["w"]))) == 0.0  # step 0 runs at rate 0


def test_one_seed_one_result_whatever_its_neighbours():
    alone = run_experiment(windtunnel_bijection, [3], TINY_B, chunk_size=2, per_seed_curves=True)
    beside = run_experiment(windtunnel_bijection, [7, 3], TINY_B, chunk_size=2, per_seed_curves=True)
    assert alone["per_seed_curves"]["curve"][0] == beside["per_seed_curves"]["curve"][1]
    for metric in ("kl_bits", "abs_entropy_error_bits"):
        a = alone["measured"]["train"][metric]["overall"]["per_seed"][0]
        b = beside["measured"]["train"][metric]["overall"]["per_seed"][1]
        assert a == b, metric


@pytest.mark.slow
@pytest.mark.parametrize("model, tiny", [("gpt", TINY_B), ("mlp", TINY_B), ("lstm", TINY_B), ("gpt", TINY_H)],
                         ids=["bijection-gpt", "bijection-mlp", "bijection-lstm", "hmm-gpt"])
def test_every_model_on_both_tunnels(model, tiny):
    """Every model trains and is measured through the one experiment (on the HMM, the GPT; the
    models are interchangeable there by the same code path, and each HMM case costs three compiles)."""
    import dataclasses

    cfg = dataclasses.replace(tiny, model=model)
    experiment = windtunnel_hmm if isinstance(cfg, HMMTunnelConfig) else windtunnel_bijection
    r = run_experiment(experiment, 1, cfg)
    assert set(r["measured"]) == set(eval_tasks(cfg))
    for e in r["measured"].values():
        assert np.isfinite(e["kl_bits"]["overall"]["mean"]) and e["kl_bits"]["overall"]["mean"] >= 0
        assert e["entropy_curve_mae_bits"]["mean"] <= e["entropy_mae_bits"]["mean"] + 1e-6
    assert len(r["curve"]["mean"]) == cfg.steps and "bits" in format_windtunnel(r)
    assert config_from_dict(type(cfg), json.loads(json.dumps(r["config"]))) == cfg


def test_hmm_is_measured_at_longer_lengths_on_the_same_draws():
    tasks = eval_tasks(TINY_H)
    assert [t.length for t in tasks.values()] == [3, 5, 8]
    key = jax.random.key(0)
    short, long = tasks["train"].sample(key), tasks["x2.5"].sample(key)
    n = short.tokens.shape[0]
    np.testing.assert_array_equal(short.tokens, long.tokens[:n])  # the same HMM, the same first steps


def test_config_errors():
    with pytest.raises(ValueError, match="WindTunnelConfig: warmup=6 must be below steps=6"):
        WindTunnelConfig(steps=6, warmup=6)
    with pytest.raises(ValueError, match="WindTunnelConfig: d_model=10 must be divisible by n_heads=4"):
        WindTunnelConfig(d_model=10, n_heads=4)
    with pytest.raises(TypeError, match="WindTunnelConfig: task must provide the TokenTask members"):
        WindTunnelConfig(task="bijection")
    with pytest.raises(ValueError, match="model must be one of"):
        WindTunnelConfig(model="mamba")


def test_command_line_presets_and_flags(tmp_path, capsys):
    out = tmp_path / "w.json"
    code, stdout, err = cli_run(["windtunnel-bijection", "--preset", "small", "--seeds", "1", "--steps", "4", "--warmup", "1",
                                 "--batch", "2", "--heldout", "4", "--V", "4", "--L", "3", "--d-model", "8",
                                 "--n-layers", "1", "--n-heads", "2", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    cfg = json.loads(out.read_text())["config"]
    assert (cfg["steps"], cfg["d_model"], cfg["task"]["V"], cfg["model"]) == (4, 8, 4, "gpt")
    code, _, err = cli_run(["windtunnel-bijection", "--preset", "huge", "--out", str(out)], capsys)
    assert code == 2 and "--preset" in err
    from gradattn.experiments.windtunnel import BIJECTION_PRESETS, HMM_PRESETS

    paper = BIJECTION_PRESETS["paper"]()
    assert (paper.task.V, paper.task.L, paper.d_model, paper.n_layers, paper.n_heads, paper.batch, paper.steps) == (
        20, 19, 192, 6, 6, 128, 100_000)
    hmm = HMM_PRESETS["paper"]()
    assert (hmm.task.length, hmm.d_model, hmm.n_layers, hmm.n_heads) == (20, 256, 9, 8)


def test_trained_parameters_and_checkpoints_are_saved_and_load_back(tmp_path):
    """The parameters kept at step 0 are the seed's initial model, and the trained ones give the
    held-out KL the run measured."""
    import dataclasses

    from gradattn.experiments.windtunnel import build_model, load_windtunnel_model
    from gradattn.sweeps import seed_key

    cfg = dataclasses.replace(TINY_B, checkpoint_every=2)
    r = run_experiment(windtunnel_bijection, [0, 5], cfg, save_dir=tmp_path / "models")
    assert r["saved_to"] == str(tmp_path / "models")
    _, k_init, k_test = jax.random.split(seed_key(5), 3)
    s = cfg.task.sample(jax.random.key(1))
    first, loaded_cfg = load_windtunnel_model(str(tmp_path / "models"), 5, checkpoint=0)
    assert loaded_cfg == cfg
    # the seed's initial model (to float32 rounding: drawn inside the vmapped sweep there, eagerly here)
    np.testing.assert_allclose(first(s.tokens), build_model(cfg, k_init)(s.tokens), rtol=1e-5, atol=1e-7)
    model, _ = load_windtunnel_model(str(tmp_path / "models"), 5)
    held = jax.vmap(cfg.task.sample)(jax.random.split(k_test, cfg.heldout))
    idx = jnp.asarray(cfg.task.supervised)
    logits = jax.vmap(model)(held.tokens)[:, idx]
    m = position_metrics(logits, held.posterior[:, idx], held.labels[:, idx], cfg.task.class_range)
    want = r["measured"]["train"]["kl_bits"]["overall"]["per_seed"][1]
    assert float(jnp.mean(m["kl_bits"])) == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="save_dir is for experiments that keep something"):
        run_experiment(__import__("gradattn").em_vs_sgd, 1, save_dir=tmp_path / "x")


def test_geometric_checkpoints_are_denser_early_and_hold_the_parameters_of_their_steps():
    """``checkpoints = n`` keeps n steps from 0 to steps - 1, consecutive at first, and each kept
    slot holds the parameters before its step: the same as every-step checkpoints at that step, and
    training is unchanged by keeping them."""
    import dataclasses

    cfg = dataclasses.replace(TINY_B, steps=12, warmup=2, checkpoints=6)
    t = cfg.checkpoint_steps
    assert t.tolist()[0] == 0 and t.tolist()[-1] == 11 and len(t) == 6
    assert np.all(np.diff(t) >= 1) and np.all(np.diff(np.diff(t)) >= 0)  # increasing gaps: denser early
    big = dataclasses.replace(TINY_B, steps=100_000, warmup=2, checkpoints=30).checkpoint_steps
    assert len(big) == 30 and big[-1] == 99_999 and np.sum(big < 10_000) > 20
    every = dataclasses.replace(cfg, checkpoints=0, checkpoint_every=1)
    none = dataclasses.replace(cfg, checkpoints=0)
    r_geo, r_all, r_none = (jax.jit(compiled_run(windtunnel_bijection, c))(seed_key(3)) for c in (cfg, every, none))
    kept = [k for k in r_geo if k.startswith("checkpoints.")]
    assert kept
    for k in kept:
        np.testing.assert_array_equal(np.asarray(r_geo[k]), np.asarray(r_all[k])[t])
    for k in (k for k in r_none if k.startswith("params.") or k == "curve"):
        np.testing.assert_array_equal(np.asarray(r_geo[k]), np.asarray(r_none[k]))
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(cfg, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoints=13 must not exceed steps=12"):
        dataclasses.replace(cfg, checkpoints=13)


def test_command_line_resumes_a_wind_tunnel_sweep_and_saves_the_resumed_seeds(tmp_path, capsys):
    """Seeds finished by a first run are read back from --checkpoint-dir (their files untouched), the
    rest computed; the results equal an uninterrupted run's bit for bit, and --save-dir writes every
    seed's trained model, the resumed ones included, with the checkpoints kept along training."""
    from gradattn.experiments.windtunnel import load_windtunnel_model

    d = tmp_path / "ck"
    tiny = ["--steps", "4", "--warmup", "1", "--batch", "2", "--heldout", "4", "--V", "4", "--L", "3",
            "--d-model", "8", "--n-layers", "1", "--n-heads", "2", "--checkpoints", "3", "--no-progress"]
    code, _, err = cli_run(["windtunnel-bijection", "--seeds", "2", "--checkpoint-dir", str(d), "--out",
                            str(tmp_path / "a.json"), *tiny], capsys)
    assert code == 0, err
    chunks = sorted(f for f in os.listdir(d) if f.startswith("chunk-"))
    stamp = {f: os.stat(d / f).st_mtime_ns for f in chunks}
    code, _, err = cli_run(["windtunnel-bijection", "--seeds", "3", "--checkpoint-dir", str(d), "--save-dir",
                            str(tmp_path / "models"), "--out", str(tmp_path / "b.json"), *tiny], capsys)
    assert code == 0, err
    assert {f: os.stat(d / f).st_mtime_ns for f in chunks} == stamp
    code, _, err = cli_run(["windtunnel-bijection", "--seeds", "3", "--out", str(tmp_path / "ref.json"), *tiny], capsys)
    assert code == 0, err
    resumed, ref = (json.loads((tmp_path / f).read_text()) for f in ("b.json", "ref.json"))
    assert resumed["measured"] == ref["measured"] and resumed["curve"] == ref["curve"]
    meta = json.loads((tmp_path / "models" / "config.json").read_text())
    assert meta["seeds"] == [0, 1, 2] and meta["checkpoint_steps"] == [0, 1, 3]
    for seed in (0, 2):  # one read back from the directory, one computed
        model, cfg = load_windtunnel_model(str(tmp_path / "models"), seed)
        first, _ = load_windtunnel_model(str(tmp_path / "models"), seed, checkpoint=2)
        tokens = cfg.task.sample(jax.random.key(0)).tokens
        assert not np.allclose(model(tokens), first(tokens))  # the step-3 checkpoint is not the trained model


def test_attention_distance_and_settling_against_numpy():
    from gradattn.experiments.windtunnel import attention_distance, settled_index

    rng = np.random.default_rng(0)
    a, b = (rng.dirichlet(np.ones(5), size=(3, 2, 4, 5)) for _ in range(2))  # (B, L, H, T, T) rows on the simplex
    want = np.zeros((2, 4))
    for layer in range(2):
        for h in range(4):
            want[layer, h] = np.mean([0.5 * np.abs(a[s, layer, h, i] - b[s, layer, h, i]).sum()
                                      for s in range(3) for i in range(5)])
    np.testing.assert_allclose(np.asarray(attention_distance(jnp.asarray(a), jnp.asarray(b))), want, rtol=1e-6)
    assert float(jnp.max(attention_distance(jnp.asarray(a), jnp.asarray(a)))) == 0.0
    assert settled_index([1.0, 0.5, 0.05, 0.2, 0.08, 0.0], 0.1) == 4  # it left the band at index 3
    assert settled_index([1.0, 0.5, 0.3], 0.1) == 3  # never
    assert settled_index([0.0, 0.0], 0.1) == 0


def test_checkpoint_dynamics_json_recomputes_the_verdict(tmp_path, capsys):
    """With checkpoints the run measures each one (KL to the exact posterior, attention distances)
    and the JSON holds them per seed, so the frame-before-precision verdict can be recomputed from
    the file alone; the first checkpoint is the untrained model and the distances behave."""
    import dataclasses

    from gradattn.experiments.windtunnel import frame_before_precision_verdict

    cfg = dataclasses.replace(TINY_B, steps=24, n_layers=2, checkpoints=6, probe_batch=8, precision_factor=1.0)
    out = tmp_path / "d.json"
    code, stdout, err = cli_run(["windtunnel-bijection", "--seeds", "2", "--steps", "24", "--warmup", "2", "--batch", "4",
                                 "--heldout", "8", "--V", "4", "--L", "3", "--d-model", "8", "--n-layers", "2",
                                 "--n-heads", "2", "--checkpoints", "6", "--probe-batch", "8", "--precision-factor", "1",
                                 "--out", str(out), "--plot", str(tmp_path / "d.png"), "--no-progress"], capsys)
    assert code == 0, err
    assert "frame before precision (layer 0" in stdout
    r = json.loads(out.read_text())
    d = r["dynamics"]
    assert d["steps"] == cfg.checkpoint_steps.tolist() and d["thresholds"]["precision_factor"] == 1.0
    to_final = np.asarray(d["attention_to_final"]["per_seed"])  # (seeds, C, L, H)
    assert to_final.shape == (2, 6, 2, 2) and np.all((to_final >= 0) & (to_final <= 1))
    assert np.all(np.asarray(d["attention_to_previous"]["per_seed"])[:, 0] == 0)
    kl = np.asarray(d["kl_bits"]["per_seed"])
    for i, seed in enumerate(d["frame_before_precision"]["per_seed"]):
        again = frame_before_precision_verdict(d["steps"], to_final[i, :, 0].mean(-1), kl[i],
                                               d["final_kl_bits"]["per_seed"][i], settle_tol=0.1, precision_factor=1.0,
                                               late_factor=2.0, total_steps=24)
        assert again == seed
    assert d["frame_before_precision"]["holds"] == sum(s["holds"] for s in d["frame_before_precision"]["per_seed"])
    assert (tmp_path / "d.png").stat().st_size > 0
    with pytest.raises(ValueError, match="frame_layer=2 must be below n_layers=2"):
        dataclasses.replace(cfg, frame_layer=2)
