"""Seed sweeps: a seed's result is bit-identical alone, in any chunk, in any order, on any device count."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradattn.experiments import EmVsSgdConfig, make_em_vs_sgd
from gradattn.sweeps import seed_keys, sweep
from gradattn.tasks import StickyMarkov

# A real (tiny) experiment: sampling, matmuls, softmax reductions and a training scan.
CONFIG = EmVsSgdConfig(steps=4, task=StickyMarkov(seq_len=24))
FN = make_em_vs_sgd(CONFIG)


def assert_trees_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def pick(tree, i):
    return {k: v[i] for k, v in tree.items()}


def test_seed_result_independent_of_chunking_and_order():
    alone = sweep(FN, [3], chunk_size=3)
    three = sweep(FN, [1, 3, 4], chunk_size=3)
    five = sweep(FN, [0, 1, 2, 3, 4], chunk_size=3)  # two calls; seed 3 opens the second
    reverse = sweep(FN, [4, 3, 2, 1, 0], chunk_size=3)
    assert alone["sgd_curve"].shape == (1, 4) and five["em_final_loss"].shape == (5,)
    assert isinstance(five["em_final_loss"], np.ndarray)
    assert_trees_equal(pick(alone, 0), pick(three, 1))
    assert_trees_equal(pick(alone, 0), pick(five, 3))
    assert_trees_equal(pick(five, 0), pick(reverse, 4))
    assert_trees_equal(pick(five, 1), pick(reverse, 3))
    assert not np.array_equal(five["sgd_curve"][0], five["sgd_curve"][1])


def test_keys_ints_and_raw_keys_agree():
    ints = sweep(FN, [5, 6], chunk_size=3)
    typed = sweep(FN, jnp.stack([jax.random.key(5), jax.random.key(6)]), chunk_size=3)
    raw = sweep(FN, jax.random.key_data(jnp.stack([jax.random.key(5), jax.random.key(6)])), chunk_size=3)
    assert_trees_equal(ints, typed)
    assert_trees_equal(ints, raw)
    np.testing.assert_array_equal(jax.random.key_data(seed_keys([7])[0]), jax.random.key_data(jax.random.key(7)))


def test_integer_array_seeds_of_any_kind():
    def draw(k):
        return {"u": jax.random.uniform(k, (2,))}

    ref = sweep(draw, [5, 0, 7], chunk_size=2)
    for seeds in (
        np.array([5, 0, 7]),
        np.array([5, 0, 7], np.uint32),
        jnp.array([5, 0, 7]),  # used to be rejected: its elements are 0-d jax arrays
        jnp.array([5, 0, 7], jnp.int64),
        [np.int64(5), jnp.int32(0), 7],
        (5, 0, 7),
    ):
        assert_trees_equal(sweep(draw, seeds, chunk_size=2), ref)


@pytest.mark.parametrize(
    "seeds, match",
    [
        (jnp.array([1.0, 2.0]), "non-negative integer.*dtype float"),
        (np.array([True, False]), "non-negative integer.*dtype bool"),
        (jnp.array([[1, 2], [3, 4]]), r"seeds\b.*1-D.*\(2, 2\)"),
        (np.array([[1, 2, 3]], np.int64), r"seeds\b.*1-D.*\(1, 3\)"),
        (jnp.array([], jnp.int32), "empty"),
        (np.array([]), "empty"),
        (jnp.array([3, -1]), "non-negative integer.*got -1"),
        ([1, True], "non-negative integer.*got True"),
        ([jnp.array(2.0)], "non-negative integer"),
        ([[1, 2]], "non-negative integer"),
    ],
)
def test_bad_array_seeds(seeds, match):
    with pytest.raises(ValueError, match=rf"^sweep: .*{match}"):
        seed_keys(seeds)


def test_progress_bar_runs(capsys):
    out = sweep(lambda k: {"u": jax.random.uniform(k, (2,))}, range(5), chunk_size=2, progress=True)
    assert out["u"].shape == (5, 2)
    assert "5 seeds" in capsys.readouterr().err


@pytest.mark.parametrize(
    "seeds, kwargs, err, match",
    [
        ([], {}, ValueError, "empty"),
        ([1, -2], {}, ValueError, "non-negative"),
        ([1.5], {}, ValueError, "non-negative integer"),
        (3, {}, TypeError, "seeds"),
        ([1], dict(chunk_size=0), ValueError, "chunk_size"),
        ([1], dict(devices=[]), ValueError, "devices"),
    ],
)
def test_bad_arguments(seeds, kwargs, err, match):
    with pytest.raises(err, match=rf"^sweep: .*{match}"):
        sweep(lambda k: {"u": jax.random.uniform(k)}, seeds, **kwargs)


@pytest.mark.parametrize(
    "devices, err, match",
    [
        (lambda: ["cpu"], TypeError, r"sweep: devices\b.*hold jax\.Device.*'cpu'.*\bstr\b"),  # an element of the list
        (lambda: "cpu", TypeError, r"sweep: devices\b.*list of jax\.Device.*'cpu'.*\bstr\b"),  # the list itself
        (lambda: [0], TypeError, r"sweep: devices\b.*hold jax\.Device.*got 0\b.*\bint\b"),
        (lambda: jax.devices()[0], TypeError, r"sweep: devices\b.*list of jax\.Device.*CpuDevice"),
        (lambda: jax.devices()[:1] * 2, ValueError, r"sweep: devices\b.*distinct.*CpuDevice\(id=0\) twice"),
    ],
    ids=["strings", "a string", "ints", "one device", "repeated"],
)
def test_devices_checked_before_anything_is_traced(devices, err, match):
    with pytest.raises(err, match=match):
        sweep(lambda k: {"u": jax.random.uniform(k)}, [0], devices=devices())


SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    from gradattn.experiments import EmVsSgdConfig, make_em_vs_sgd
    from gradattn.sweeps import sweep
    from gradattn.tasks import StickyMarkov

    assert jax.device_count() == 4, jax.devices()
    fn = make_em_vs_sgd(EmVsSgdConfig(steps=4, task=StickyMarkov(seq_len=24)))
    four = sweep(fn, range(5), chunk_size=1)
    one = sweep(fn, range(5), chunk_size=1, devices=jax.devices()[:1])
    for k in four:
        np.testing.assert_array_equal(four[k], one[k], err_msg=k)
    np.savez(sys.argv[1], **four)
    """
)


@pytest.mark.slow
def test_four_devices_match_one_device(tmp_path):
    # the compiler flags of this process too (make test's), so that both sides compile alike
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    out = tmp_path / "four.npz"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = dict(np.load(out))
    here = sweep(FN, range(5), chunk_size=1)  # this process: one device
    assert jax.device_count() == 1
    assert_trees_equal(here, four)


@pytest.mark.slow
def test_cli_per_seed_results_identical_on_four_devices(tmp_path):
    """`gradattn em-vs-sgd` on 4 (forced host) devices gives the 1-device per-seed results."""
    import json

    def run(n_devices):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}")
        out = tmp_path / f"d{n_devices}.json"
        cmd = [sys.executable, "-c", "from gradattn.cli import main; raise SystemExit(main())",
               "em-vs-sgd", "--seeds", "5", "--steps", "6", "--seq-len", "32", "--no-progress", "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())

    four, one = run(4), run(1)
    assert four["n_devices"] == 4 and one["n_devices"] == 1
    assert four["per_seed"] == one["per_seed"]
    assert four["curves"] == one["curves"]


def test_large_seeds_get_their_own_keys():
    seeds = [0, 2**32, 2**40, 2**63, 2**64 - 1, 5]
    keys = jax.random.key_data(seed_keys(seeds))
    assert len({tuple(k) for k in np.asarray(keys).tolist()}) == len(seeds)
    # below 2^32 a seed's key is jax.random.key(seed), so earlier results are unchanged
    np.testing.assert_array_equal(keys[-1], jax.random.key_data(jax.random.key(5)))
    np.testing.assert_array_equal(keys[0], jax.random.key_data(jax.random.key(0)))
    out = sweep(lambda k: {"u": jax.random.uniform(k, (3,))}, [0, 2**32, 2**40], chunk_size=1)
    assert len({tuple(r) for r in out["u"].tolist()}) == 3
    with jax.enable_x64(True):  # JAX's own 64-bit seeding agrees with ours
        np.testing.assert_array_equal(keys[2], jax.random.key_data(jax.random.key(2**40)))


@pytest.mark.parametrize("seed", [2**64, 2**70])
def test_seeds_from_2_to_the_64_rejected(seed):
    with pytest.raises(ValueError, match=rf"sweep: seeds\b.*below 2\^64.*got {seed}"):
        seed_keys([1, seed])

