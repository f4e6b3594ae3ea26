"""The bijection-elimination experiment (gradattn.experiments.bijection): shapes, the KL gap against a numpy
reference and against the exact predictive itself, seed independence, training closing the gap,
config errors, JSON and the report."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradattn._io import write_json
from gradattn.experiments import HeadSpec
from gradattn.experiments.bijection import (
    METRICS,
    MODELS,
    BijectionConfig,
    bijection_study,
    entropy_mae_bits,
    format_bijection,
    make_bijection_run,
    plot_bijection,
    position_metrics,
)
from gradattn.head import dense_loss
from gradattn.tasks import BijectionElimination
from gradattn.training import scan_steps

TINY = BijectionConfig(task=BijectionElimination(4), steps=100, batch=16, heldout=64, head=HeadSpec(d_k=4, d_v=8), d_model=16,
                       n_layers=1, n_heads=2)


@pytest.fixture(scope="module")
def runs():
    """The tiny study over seeds [0, 1] and over [1] alone (one compiled program: chunk size 1)."""
    return bijection_study([0, 1], TINY, chunk_size=1), bijection_study([1], TINY, chunk_size=1)


def test_entropy_mae_bits_constructed():
    """|1 nat| at one of four positions is ln(2)^-1 / 4 bits on average; shapes must agree."""
    exact = np.log(np.arange(4, 0, -1.0))
    assert entropy_mae_bits(exact, exact) == 0.0
    model = np.stack([exact, exact + np.array([0.0, 1.0, 0.0, 0.0])])
    np.testing.assert_allclose(entropy_mae_bits(model, exact), [0.0, 1 / (4 * math.log(2))], rtol=1e-15)
    with pytest.raises(ValueError, match=r"entropy_mae_bits: model_entropy\b.*\(\.\.\., N\).*\(3,\).*\(4,\)"):
        entropy_mae_bits(exact[:3], exact)


def test_run_shapes_and_dtypes():
    out = jax.eval_shape(make_bijection_run(TINY), jax.random.key(0))
    k = TINY.task.n_symbols
    assert out["head_curve"].shape == out["deep_curve"].shape == (TINY.steps,)
    assert out["exact_entropy"].shape == (k,)
    for m in MODELS:
        for metric in METRICS:
            assert out[f"{m}_{metric}"].shape == (k,)
    assert set(out) == {"head_curve", "deep_curve", "exact_entropy"} | {f"{m}_{x}" for m in MODELS for x in METRICS}
    assert all(v.dtype == jnp.float32 for v in out.values())


def _numpy_kl(log_p, logits):
    p = np.exp(np.asarray(log_p, np.float64))
    z = np.asarray(logits, np.float64)
    log_q = z - z.max(axis=1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    kl = np.zeros(len(p))
    for t in range(len(p)):
        for c in range(p.shape[1]):
            if p[t, c] > 0:
                kl[t] += p[t, c] * (math.log(p[t, c]) - log_q[t, c])
    return kl, np.exp(log_q)


def test_kl_matches_numpy_reference():
    task = BijectionElimination(5)
    x, y = task.sample(jax.random.key(3))
    log_p = task.bayes_log_predictive(x)
    logits = 2.0 * jax.random.normal(jax.random.key(4), (5, 5))
    got = position_metrics(log_p, logits, y)
    kl, q = _numpy_kl(log_p, logits)
    revealed = ~np.isfinite(np.asarray(log_p))
    np.testing.assert_allclose(got["kl"], kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["revealed_mass"], np.where(revealed, q, 0).sum(axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["entropy"], -(q * np.log(q)).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(got["loss"], -np.log(q[np.arange(5), np.asarray(y)]), rtol=1e-5)
    np.testing.assert_allclose(got["exact_entropy"], task.entropy_profile, atol=1e-6)
    assert (np.asarray(got["kl"]) > 0).all()  # a random model is off the posterior everywhere


def test_kl_is_exactly_zero_for_the_exact_predictive():
    task = BijectionElimination(6)
    x, y = task.sample(jax.random.key(7))
    log_p = task.bayes_log_predictive(x)
    # The exact predictive as a model: logits 0 on the unrevealed outputs, -inf on the revealed.
    logits = jnp.where(jnp.isfinite(log_p), 0.0, -jnp.inf).astype(log_p.dtype)
    for model in (logits, log_p):
        got = position_metrics(log_p, model, y)
        np.testing.assert_array_equal(got["kl"], np.zeros(6))
        np.testing.assert_array_equal(got["revealed_mass"], np.zeros(6))
        np.testing.assert_allclose(got["entropy"], task.entropy_profile, atol=1e-6)
        np.testing.assert_allclose(got["loss"], task.entropy_profile, atol=1e-6)
    # Moving mass onto one revealed output makes the gap positive.
    off = position_metrics(log_p, jnp.where(jnp.isfinite(log_p), 0.0, -1.0).astype(log_p.dtype), y)
    assert (np.asarray(off["kl"])[1:] > 0).all() and (np.asarray(off["revealed_mass"])[1:] > 0).all()
    assert float(off["kl"][0]) == 0.0  # nothing is revealed at t = 1


@pytest.mark.slow
def test_study_results_are_consistent(runs):
    both, _ = runs
    k = TINY.task.n_symbols
    assert both["positions"] == list(range(1, k + 1))
    np.testing.assert_allclose(both["exact_entropy_measured"], both["exact_entropy"], atol=1e-5)
    np.testing.assert_allclose(both["exact_entropy"], np.log(np.arange(k, 0, -1)), atol=1e-12)
    for m in MODELS:
        entry = both["models"][m]
        kl = np.asarray(entry["kl"]["mean"])
        assert kl.shape == (k,) and (kl >= 0).all()
        assert all(len(entry[x]["mean"]) == len(entry[x]["std"]) == k for x in METRICS)
        assert np.isclose(entry["gap"]["mean"], kl.mean(), rtol=1e-6)
        # loss - exact entropy is the KL in expectation; on the same held-out samples it is exactly
        # the mean of log p(y) - log q(y), which differs from the KL only by sampling noise.
        mass = np.asarray(entry["revealed_mass"]["mean"])
        assert ((mass >= 0) & (mass <= 1)).all()
        # The per-seed entropy MAE averages to at least the MAE of the seed-averaged entropies
        # (|mean| <= mean |.|), and is that MAE for the exact entropies' own bits.
        mae = entry["entropy_mae_bits"]
        assert len(mae["per_seed"]) == 2 and np.isclose(mae["mean"], np.mean(mae["per_seed"]), rtol=1e-12)
        pooled = np.mean(np.abs(np.asarray(entry["entropy"]["mean"]) - both["exact_entropy"])) / math.log(2)
        assert mae["mean"] >= pooled - 1e-12
    assert "entropy MAE, bits" in format_bijection(both)
    assert len(both["curves"]["head"]["mean"]) == len(both["curves"]["deep"]["mean"]) == TINY.steps


@pytest.mark.slow
def test_seed_result_does_not_depend_on_the_other_seeds(runs):
    both, alone = runs
    for m in MODELS:
        assert both["models"][m]["gap"]["per_seed"][1] == alone["models"][m]["gap"]["per_seed"][0]
    assert alone["seeds"] == [1] and both["seeds"] == [0, 1]


@pytest.mark.slow
def test_training_closes_the_gap(runs):
    both, _ = runs
    gaps = {m: both["models"][m]["gap"]["per_seed"] for m in MODELS}
    for trained, untrained in (("head", "head_init"), ("deep", "deep_init")):
        assert all(a < 0.5 * b for a, b in zip(gaps[trained], gaps[untrained])), (trained, gaps)
    # The untrained head's gap grows along the sequence (it ignores what was revealed).
    kl0 = np.asarray(both["models"]["head_init"]["kl"]["mean"])
    assert kl0[-1] > kl0[0]


@pytest.mark.slow
def test_json_report_and_plot(runs, tmp_path):
    both, _ = runs
    text = json.dumps(both, allow_nan=False)
    back = json.loads(text)

    def finite(v):
        if isinstance(v, dict):
            return all(finite(u) for u in v.values())
        if isinstance(v, list):
            return all(finite(u) for u in v)
        return v is not None and (not isinstance(v, float) or math.isfinite(v))

    assert finite(back["models"]) and finite(back["curves"]) and finite(back["exact_entropy"])
    write_json(both, tmp_path / "b.json")
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["models"] == back["models"]
    table = format_bijection(again)
    assert "head (trained)" in table and "deep (trained)" in table
    assert len(table.splitlines()) == 2 + TINY.task.n_symbols + 4  # + mean, entropy MAE (2 lines), wall time
    plot_bijection(again, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0
    assert again["config"]["task"]["n_symbols"] == 4 and again["config"]["steps"] == TINY.steps


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"steps": 0}, "steps"),
        ({"batch": 0}, "batch"),
        ({"heldout": -1}, "heldout"),
        ({"head": {"init_scale": 0.0}}, "init_scale"),
        ({"head_optimizer": "lbfgs"}, "head_optimizer"),
        ({"head_schedule": "linear"}, "head_schedule"),
        ({"head_lr": -0.1}, "head_lr"),
        ({"head_value_lr": 0.5}, "head_value_lr"),  # ignored with adam
        ({"deep_dropout": 1.0}, "deep_dropout"),
        ({"d_model": 10, "n_heads": 3}, "d_model"),
        ({"head": {"d_v": 0}}, "d_v"),
        ({"head_grad_source": "numeric"}, "head_grad_source"),
    ],
)
def test_config_errors_name_the_field(kwargs, name):
    owner = "HeadSpec" if "head" in kwargs else "BijectionConfig"  # the head's options are checked by its spec
    with pytest.raises(ValueError, match=rf"^{owner}: .*\b{name}\b"):
        BijectionConfig(**{k: HeadSpec(**v) if k == "head" else v for k, v in kwargs.items()})


def test_config_type_errors():
    with pytest.raises(TypeError, match=r"BijectionConfig: task\b.*BijectionElimination.*got str"):
        BijectionConfig(task="k=8")
    with pytest.raises(TypeError, match=r"BijectionConfig: steps\b.*integer.*2\.5"):
        BijectionConfig(steps=2.5)
    with pytest.raises(TypeError, match=r"BijectionConfig: head_grad_source\b.*string"):
        BijectionConfig(head_grad_source=len)
    with pytest.raises(TypeError, match=r"make_bijection_run: config\b.*BijectionConfig.*got dict"):
        make_bijection_run({"steps": 3})
    with pytest.raises(TypeError, match=r"bijection_study: config\b.*BijectionConfig.*got object"):
        bijection_study(1, object())
    with pytest.raises(ValueError, match=r"format_bijection: results\b.*bijection_study"):
        format_bijection({"seeds": [0]})
    # em_like takes its value rate; its to_dict is JSON
    cfg = BijectionConfig(head_optimizer="em_like", head_value_lr=0.5, head_schedule="constant")
    assert json.loads(json.dumps(cfg.to_dict()))["head_value_lr"] == 0.5


SMALL = BijectionConfig(task=BijectionElimination(4), steps=6, batch=3, heldout=4, head=HeadSpec(d_k=4, d_v=8), d_model=8, n_layers=1,
                        n_heads=1)


def test_the_head_trains_on_the_laws_and_autodiff_is_the_batch_loss_differentiated():
    """The head's steps take their gradients from head_grad_source: the default ("autodiff") is
    Adam on jax.value_and_grad of the batch's mean dense loss (written out below, compiled as a
    program of its own, so equal to the last float32 bit or so), and the blocked laws give the
    same numbers to float32 rounding. The deep model does not depend on the head's path."""
    assert BijectionConfig().head_grad_source == "autodiff"
    key = jax.random.key(5)
    auto = jax.jit(make_bijection_run(SMALL))(key)
    laws = jax.jit(make_bijection_run(dataclasses.replace(SMALL, head_grad_source="blocked")))(key)

    task, tx = SMALL.task, SMALL.head_tx()
    k_data, _, k_head, _, _ = jax.random.split(key, 5)
    samples = jax.vmap(lambda k: task.sample(k, jnp.float32))

    def step(carry, t):
        p, s = carry
        x, y = samples(jax.random.split(jax.random.fold_in(k_data, t), SMALL.batch))
        value, grads = jax.value_and_grad(lambda p: jnp.mean(jax.vmap(lambda a, b: dense_loss(p, a, b))(x, y)))(p)
        updates, s = tx.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), value

    head0 = SMALL.head.init(k_head, task)
    _, curve, _ = jax.jit(lambda p: scan_steps(step, (p, tx.init(p)), SMALL.steps))(head0)
    np.testing.assert_allclose(auto["head_curve"], curve, rtol=1e-6)
    np.testing.assert_allclose(laws["head_curve"], auto["head_curve"], rtol=1e-5)
    for metric in METRICS:
        np.testing.assert_allclose(laws[f"head_{metric}"], auto[f"head_{metric}"], rtol=1e-4, atol=1e-6)
    for name in ("deep_curve", "deep_kl", "head_init_kl"):
        np.testing.assert_array_equal(laws[name], auto[name])
