"""The paper's EM-vs-SGD experiment at tiny sizes, its summary statistics, and the laws check."""

import json

import jax
import numpy as np
import pytest

from gradattn import experiments, verify
from gradattn.experiments import ArmRates, EmVsSgdConfig, HeadSpec, compiled_run, em_vs_sgd
from gradattn.experiments.em_sgd import format_em_vs_sgd, make_em_vs_sgd, steps_to_threshold, summarise_em_vs_sgd
from gradattn.sweeps import default_chunk_size, sweep
from gradattn.tasks import StickyMarkov

TASK = StickyMarkov(seq_len=32)


@pytest.fixture(scope="module")
def tiny():
    return experiments.em_vs_sgd([0, 2, 5], EmVsSgdConfig(steps=6, task=TASK), chunk_size=3)


def test_arms_are_paired_and_train(tiny):
    per = tiny["per_seed"]
    assert per["seed"] == [0, 2, 5]
    fn = compiled_run(em_vs_sgd, EmVsSgdConfig(steps=6, task=TASK))
    assert fn is compiled_run(em_vs_sgd, EmVsSgdConfig(steps=6, task=TASK))  # cached: sweeps reuse the compiled run
    out = {k: v[0] for k, v in sweep(fn, [2], chunk_size=3).items()}
    assert out["sgd_curve"].shape == (6,) and out["sgd_curve"].dtype == np.float32
    # Same sequence and same initial parameters: the curves start at the same loss.
    assert out["sgd_curve"][0] == out["em_curve"][0]
    # The final loss is measured after the last update.
    assert out["sgd_final_loss"] < out["sgd_curve"][-1]
    assert per["sgd_final_loss"][1] == out["sgd_final_loss"] and per["em_final_loss"][1] == out["em_final_loss"]
    assert 0.0 <= out["em_final_accuracy"] <= 1.0 and 0.0 < out["em_final_entropy"] <= np.log(8) + 1e-5


def test_summary_schema(tiny):
    for key in ("h_min", "steps", "seeds", "sgd", "em", "em_steps_to_sgd_final", "speedup", "p_value", "per_seed", "curves", "config"):
        assert key in tiny, key
    for arm in ("sgd", "em"):
        assert set(tiny[arm]) >= {"final_loss_mean", "final_loss_std", "final_entropy_mean", "final_accuracy_mean"}
    assert set(tiny["em_steps_to_sgd_final"]) == {"mean", "std"}
    assert set(tiny["per_seed"]) >= {"seed", "sgd_final_loss", "em_final_loss", "em_steps_to_sgd_final"}
    assert len(tiny["curves"]["em_mean"]) == 6 and len(tiny["curves"]["sgd_std"]) == 6
    assert tiny["steps"] == 6 and tiny["seeds"] == [0, 2, 5]
    assert abs(tiny["h_min"] - 1.8292) < 1e-4
    assert isinstance(tiny["p_value"], float)
    assert tiny["config"]["task"]["seq_len"] == 32 and tiny["config"]["value_lr"] == 0.1
    json.dumps(tiny, allow_nan=False)  # plain JSON


def test_config_accepts_numpy_ints_and_shares_the_cache_entry():
    a = EmVsSgdConfig(steps=np.int64(6), task=StickyMarkov(seq_len=np.int64(32)),
                      head=HeadSpec(d_k=np.int32(10), d_v=np.uint8(15)))
    b = EmVsSgdConfig(steps=6, task=TASK)
    assert a == b and hash(a) == hash(b)
    assert type(a.steps) is int and type(a.head.d_k) is int and type(a.head.d_v) is int and type(a.task.seq_len) is int
    assert compiled_run(em_vs_sgd, a) is compiled_run(em_vs_sgd, b)  # one cache entry, one compiled program
    json.dumps(a.to_dict())  # plain ints, so the results file can hold the config
    c = EmVsSgdConfig(rates=ArmRates(sgd_lr=np.float32(0.5), value_lr=np.float64(0.1), routing_lr=np.int64(0)), task=TASK)
    r = c.rates
    assert (type(r.sgd_lr), r.sgd_lr, type(r.value_lr), type(r.routing_lr)) == (float, 0.5, float, float)
    json.dumps(c.to_dict())  # numpy scalars would not serialise
    with pytest.raises(TypeError, match=r"EmVsSgdConfig: steps\b.*integer.*6\.0"):
        EmVsSgdConfig(steps=6.0, task=TASK)
    with pytest.raises(TypeError, match=r"HeadSpec: d_k\b.*integer.*bool"):
        HeadSpec(d_k=True)
    with pytest.raises(ValueError, match=r"HeadSpec: d_v\b.*\[1, 4096\].*got 0"):
        HeadSpec(d_v=np.int64(0))
    for scale in (0, 0.0, float("nan"), -0.1):  # at 0 the head's scores are 0 and W_Q, W_K never move
        with pytest.raises(ValueError, match=r"HeadSpec: init_scale\b"):
            HeadSpec(init_scale=scale)
    with pytest.raises(TypeError, match=r"EmVsSgdConfig: head\b.*HeadSpec.*got dict"):
        EmVsSgdConfig(head={"d_k": 4}, task=TASK)  # a nested spec is a spec, not a dict
    with pytest.raises(TypeError, match=r"EmVsSgdConfig: task\b"):
        EmVsSgdConfig(task="sticky")
    with pytest.raises(ValueError, match=r"EmVsSgdConfig: grad_source\b.*'magic'"):
        EmVsSgdConfig(grad_source="magic", task=TASK)


def test_invalid_config_never_reaches_the_cache_of_runs():
    """A config altered after construction is checked again before a run is made of it (the run
    would fail inside the sweep), and a config of another type is refused before the cache (a dict
    is unhashable): neither leaves a cached run, so the experiment's make_run is never called."""
    made = []
    probe = experiments.Experiment("probe", EmVsSgdConfig, lambda c: made.append(c) or make_em_vs_sgd(c),
                                   summarise_em_vs_sgd)
    bad = EmVsSgdConfig(steps=7, task=TASK)
    object.__setattr__(bad, "steps", 0)  # altered after validation: the closure would fail in the sweep
    with pytest.raises(ValueError, match=r"EmVsSgdConfig: steps\b.*\[1, 10000000\].*got 0"):
        compiled_run(probe, bad)
    with pytest.raises(TypeError, match=r"probe: config\b.*EmVsSgdConfig.*got dict"):
        compiled_run(probe, {"steps": 7})
    with pytest.raises(TypeError, match=r"make_em_vs_sgd: config\b.*EmVsSgdConfig.*got dict"):
        make_em_vs_sgd({"steps": 7})
    assert made == []
    good = EmVsSgdConfig(steps=7, task=TASK)
    assert compiled_run(probe, good) is compiled_run(probe, good) and made == [good]


def test_steps_to_threshold():
    curves = np.array([[3.0, 2.5, 2.0, 1.5], [3.0, 2.9, 2.8, 2.7], [1.0, 0.5, 0.4, 0.3]])
    np.testing.assert_array_equal(steps_to_threshold(curves, 2.1), [2, 4, 0])


def test_summary_statistics():
    config = EmVsSgdConfig(steps=4, task=TASK)
    per = {
        "sgd_curve": np.array([[3.0, 2.5, 2.2, 2.1], [3.0, 2.6, 2.3, 2.2]]),
        "em_curve": np.array([[3.0, 2.0, 1.9, 1.8], [3.0, 2.5, 2.05, 2.0]]),
        "sgd_final_loss": np.array([2.0, 2.2]),
        "em_final_loss": np.array([1.7, 1.95]),
        "sgd_final_entropy": np.array([2.1, 2.3]),
        "em_final_entropy": np.array([1.8, 2.0]),
        "sgd_final_accuracy": np.array([0.2, 0.3]),
        "em_final_accuracy": np.array([0.3, 0.4]),
    }
    s = summarise_em_vs_sgd(per, [0, 1], config)
    assert s["threshold"] == pytest.approx(2.1)
    assert s["per_seed"]["em_steps_to_sgd_final"] == [1, 2]
    assert s["em_steps_to_sgd_final"]["mean"] == 1.5 and s["speedup"] == pytest.approx(4 / 1.5)
    assert s["sgd"]["final_loss_std"] == pytest.approx(np.std([2.0, 2.2], ddof=1))  # the sample std over seeds
    assert s["em_steps_to_sgd_final"]["std"] == pytest.approx(np.std([1, 2], ddof=1))
    from scipy import stats

    assert s["p_value"] == pytest.approx(stats.ttest_rel([2.0, 2.2], [1.7, 1.95]).pvalue)
    np.testing.assert_allclose(s["curves"]["em_mean"], [3.0, 2.25, 1.975, 1.9])
    one = summarise_em_vs_sgd({k: v[:1] for k, v in per.items()}, [0], config)
    assert one["p_value"] is None
    # One seed has no sample standard deviation: null, not 0.
    assert one["sgd"]["final_loss_std"] is None and one["em_steps_to_sgd_final"]["std"] is None
    assert one["curves"]["em_std"] == [None] * 4


@pytest.mark.parametrize(
    "seeds, kwargs, err, match",
    [
        (0, {}, ValueError, "seeds"),
        ([1, 1], {}, ValueError, "distinct"),
        ([-1], {}, ValueError, "non-negative"),
        ([2**64], {}, ValueError, "2\\^64"),
        ([], {}, ValueError, "empty"),
        (2, dict(config={"steps": 3}), TypeError, "EmVsSgdConfig"),
        (2, dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_em_vs_sgd_rejects_bad_arguments(seeds, kwargs, err, match):
    kwargs.setdefault("config", EmVsSgdConfig(steps=2, task=TASK))
    with pytest.raises(err, match=match):
        experiments.em_vs_sgd(seeds, **kwargs)


def test_a_diverged_seed_makes_the_speedup_null_not_plausible():
    per = {
        "sgd_curve": np.array([[3.0, 2.5, 2.2, 2.1], [3.0, np.nan, np.nan, np.nan]]),
        "em_curve": np.array([[3.0, 2.0, 1.9, 1.8], [3.0, 2.5, 2.05, 2.0]]),
        "sgd_final_loss": np.array([2.0, np.nan]),
        "em_final_loss": np.array([1.7, 1.95]),
        "sgd_final_entropy": np.array([2.1, np.nan]),
        "em_final_entropy": np.array([1.8, 2.0]),
        "sgd_final_accuracy": np.array([0.2, 0.3]),
        "em_final_accuracy": np.array([0.3, 0.4]),
    }
    with pytest.warns(RuntimeWarning, match=r"seed\(s\) \[7\]"):
        s = {"seeds": [3, 7], "steps": 4, **summarise_em_vs_sgd(per, [3, 7], EmVsSgdConfig(steps=4, task=TASK))}
    assert s["speedup"] is None and s["threshold"] is None
    assert s["em_steps_to_sgd_final"] == {"mean": None, "std": None}
    assert s["per_seed"]["em_steps_to_sgd_final"] == [None, None]
    assert "n/a" in format_em_vs_sgd(s)


def test_laws_check_errors_are_tiny():
    errors = verify.laws_check_errors(jax.random.key(1), n=11)
    assert len(errors) == 13
    assert max(errors.values()) < 1e-9


def test_em_vs_sgd_takes_an_array_of_seeds():
    import jax.numpy as jnp

    config = EmVsSgdConfig(steps=3, task=TASK)
    want = experiments.em_vs_sgd([2, 0], config)
    for seeds in (np.array([2, 0]), jnp.array([2, 0], dtype=jnp.int32)):
        got = experiments.em_vs_sgd(seeds, config)
        assert got["per_seed"]["seed"] == [2, 0]
        assert got["per_seed"]["sgd_final_loss"] == want["per_seed"]["sgd_final_loss"]
    for bad, match in ((np.array([1.0, 2.0]), r"em_vs_sgd: .*seed.*non-negative integer.*float64"),
                       (jnp.array([[1, 2]]), r"em_vs_sgd: .*seeds\b.*1-D.*\(1, 2\)")):
        with pytest.raises(ValueError, match=match):
            experiments.em_vs_sgd(bad, config)


def test_a_new_experiment_is_its_run_and_its_summary():
    """The skeleton does the rest once: seeds (an int n or distinct ints), the sweep, the wall time,
    the device count, the chunk size and the provenance."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        scale: float = 2.0

    seen = {}

    def summarise(per_seed, seeds, config):
        seen["seeds"] = seeds
        return {"mean": float(np.mean(per_seed["u"])), "n": len(seeds)}

    toy = experiments.Experiment("toy", Cfg, lambda c: (lambda key: {"u": c.scale * jax.random.uniform(key)}), summarise)
    out = experiments.run_experiment(toy, 3)
    assert seen["seeds"] == [0, 1, 2] and out["n"] == 3
    assert out["chunk_size"] == default_chunk_size() and out["n_devices"] == len(jax.devices())
    assert out["wall_time_s"] >= 0 and {"versions", "start_time", "end_time"} <= set(out["provenance"])
    again = experiments.run_experiment(toy, [2, 0, 1], Cfg(scale=2.0), chunk_size=1)
    assert again["mean"] == pytest.approx(out["mean"], rel=1e-6)
    with pytest.raises(ValueError, match=r"toy: seeds\b.*distinct.*\[1, 1\]"):
        experiments.run_experiment(toy, [1, 1])
    with pytest.raises(TypeError, match=r"toy: config\b.*Cfg.*got dict"):
        experiments.run_experiment(toy, 1, {"scale": 1})


def test_config_bounds_are_the_cli_bounds():
    with pytest.raises(ValueError, match=r"HeadSpec: d_k\b.*\[1, 4096\].*got 5000"):
        HeadSpec(d_k=5000)
    with pytest.raises(ValueError, match=r"EmVsSgdConfig: grad_source\b.*'auto'.*'analytic'"):
        EmVsSgdConfig(grad_source="analytic")


def test_config_from_dict_round_trips_every_experiment_config():
    """A result's ``config`` rebuilds an equal config for every experiment on the command line,
    through JSON, with non-default fields and tasks."""
    import dataclasses
    import json

    from gradattn.experiments import config_from_dict, registry

    for experiment in registry():
        default = experiment.config_type()
        task_change = next({name: value} for name, value in (("seq_len", 33), ("n_symbols", 5), ("V", 12), ("length", 7))
                           if name in {f.name for f in dataclasses.fields(default.task) if f.init})
        changed = dataclasses.replace(default, steps=2 * default.steps, task=dataclasses.replace(default.task, **task_change))
        if hasattr(default, "head"):  # a nested spec changed too
            changed = dataclasses.replace(changed, head=dataclasses.replace(default.head, d_k=3))
        for config in (default, changed):
            back = config_from_dict(experiment.config_type, json.loads(json.dumps(config.to_dict())))
            assert back == config and back.to_dict() == config.to_dict(), experiment.name
        assert "head" not in default.to_dict() and "rates" not in default.to_dict()  # nested options are flat in JSON
    with pytest.raises(ValueError, match=r"config_from_dict: .*EmVsSgdConfig.*no field.*bogus"):
        config_from_dict(EmVsSgdConfig, {**EmVsSgdConfig().to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match=r"config_from_dict: .*unknown task.*'Nope'"):
        config_from_dict(EmVsSgdConfig, {"task": {"name": "Nope"}})


@pytest.mark.parametrize("devices", ["cpu", ["cpu"], [0]])
def test_devices_that_are_not_jax_devices_are_refused_in_the_experiments_name(devices):
    with pytest.raises(TypeError, match=r"em_vs_sgd: devices\b.*jax\.Device"):
        experiments.em_vs_sgd(1, EmVsSgdConfig(steps=2), devices=devices)
