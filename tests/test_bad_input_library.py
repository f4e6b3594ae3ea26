"""Bad values given to the library: refused at its door, naming the function and the argument,
when they can be seen; NaN where they cannot (inside ``jit``); never a plausible finite answer or an
error from deep inside JAX that names neither.
"""

import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.lib import format as npy_format

from _cli import TINY, cli_run

import gradattn as ga
from gradattn._checks import check_int32_range
from gradattn._math import entropy_bits
from gradattn._parse import parse_float
from gradattn.deep import deep_law_errors
from gradattn.dynamics import frame_before_precision, quiet_step, settling_step
from gradattn.experiments.deep import DeepConfig
from gradattn.experiments.plateau import PlateauConfig
from gradattn.geometry import attention_entropy_bits, pca_spectrum
from gradattn.nn import Transformer
from gradattn.tasks import BijectionElimination, DirichletHMM, StickyMarkov, embeddings_from_spec

F32 = jnp.float32


def _head32():
    params = ga.init_head(jax.random.key(0), 4, 3, 3, 5, dtype=F32)
    x = jax.random.normal(jax.random.key(1), (6, 4), F32)
    return params, x


# --------------------------------------------------------------------------------------------
# Wrong finite answers
# --------------------------------------------------------------------------------------------


def test_entropy_of_rows_with_nan_is_nan_eagerly_and_under_jit():
    alpha = jnp.array([[np.nan, np.nan, np.nan], [0.5, np.nan, 0.5], [0.25, 0.25, 0.5]])
    for fn in (attention_entropy_bits, jax.jit(attention_entropy_bits)):
        h = np.asarray(fn(alpha))
        assert np.isnan(h[:2]).all(), h
        assert h[2] == pytest.approx(1.5)


@pytest.mark.parametrize("row", [[-0.5, 1.5, 0.0], [1.5, 0.0, 0.0], [np.inf, 0.0, 0.0]])
def test_entropy_refuses_weights_outside_0_1_eagerly_and_is_nan_under_jit(row):
    alpha = jnp.array([[0.5, 0.5, 0.0], row])
    with pytest.raises(ValueError, match=r"attention_entropy_bits: alpha\b.*\(2, 3\).*outside \[0, 1\]"):
        attention_entropy_bits(alpha)
    h = np.asarray(jax.jit(attention_entropy_bits)(alpha))
    assert h[0] == 1.0 and np.isnan(h[1])


def test_entropy_of_valid_rows_is_unchanged():
    scores = jax.random.normal(jax.random.key(3), (2, 7, 7), F32)
    alpha = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((7, 7), bool)), scores, -jnp.inf), axis=-1)
    ref = np.asarray(entropy_bits(alpha, axis=-1))
    assert np.asarray(attention_entropy_bits(alpha)).tobytes() == ref.tobytes()  # eagerly: the same bits
    np.testing.assert_allclose(jax.jit(attention_entropy_bits)(alpha), ref, rtol=1e-6)


def test_int64_labels_beyond_int32_are_refused_before_they_cross_jit():
    # With x64 off JAX keeps the low 32 bits of an int64 argument where it enters jit: 2^32 + 1
    # arrives as label 1. Eager calls see the int64 values; the helper refuses them for code that
    # jits what it is given.
    with jax.enable_x64(False):
        params, x = _head32()
        y = np.array([0, 1, 2, 3, 4, 2**32 + 1], np.int64)
        with pytest.raises(ValueError, match=r"dense_loss: y .* outside \[0, 5\)"):
            ga.dense_loss(params, x, y)
        with pytest.raises(ValueError, match=r"f: y\b.*int64.*\[0, 4294967297\].*beyond int32"):
            check_int32_range("y", y, "f")
        check_int32_range("y", y % 5, "f")
        with pytest.raises(ValueError, match=r"f: y .* beyond uint32"):
            check_int32_range("y", y.astype(np.uint64), "f")
    check_int32_range("y", y, "f")  # x64 on: nothing is converted, nothing to refuse


# --------------------------------------------------------------------------------------------
# Lenient values
# --------------------------------------------------------------------------------------------


def test_checked_refuses_int64_labels_that_jit_would_cut_to_32_bits():
    with jax.enable_x64(False):
        params, x = _head32()
        y = np.array([0, 1, 2, 3, 4, 2**32 + 1], np.int64)
        safe = ga.checked(ga.dense_loss)
        with pytest.raises(ValueError, match=r"checked: y\b.*int64.*\[0, 4294967297\]"):
            safe(params, x, y)
        with pytest.raises(ValueError, match="beyond int32"):
            safe(params, x, y=y)
        assert np.isfinite(safe(params, x, y % 5))


def test_parse_float_refuses_non_zero_numbers_that_are_0_in_float32():
    with pytest.raises(ValueError, match=r"'1e-50'.*rounds to 0.*float32"):
        parse_float("1e-50", float32=True)
    assert parse_float("1e-50") == 1e-50
    assert parse_float("0", float32=True) == 0.0 and parse_float("-0.0", float32=True) == 0.0
    assert parse_float("1e-45", float32=True) == 1e-45  # the smallest float32 subnormal, not 0


@pytest.mark.parametrize("args, flag", [(["--value-lr", "1e-50"], "--value-lr"), (["--noise-std", "1e-60"], "--noise-std")])
def test_command_line_refuses_rates_that_are_0_in_float32(capsys, tmp_path, args, flag):
    code, out, err = cli_run(["em-vs-sgd", "--seeds", "1", "--out", str(tmp_path / "r.json")] + TINY + args, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert flag in err and "rounds to 0" in err and "float32" in err
    assert list(tmp_path.iterdir()) == []


def test_configs_refuse_rates_that_are_0_in_float32():
    with pytest.raises(ValueError, match=r"ArmRates: value_lr\b.*1e-50.*rounds to 0.*float32"):
        ga.ArmRates(value_lr=1e-50)
    with pytest.raises(ValueError, match=r"DeepConfig: lr \* weight_decay\b.*1e-50.*rounds to 0"):
        DeepConfig(lr=1e-30, weight_decay=1e-20)
    assert ga.ArmRates(value_lr=0.0).value_lr == 0.0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ga.sgd(1e-50), r"sgd: lr\b.*1e-50.*rounds to 0.*float32"),
        (lambda: ga.sgd(1e39), r"sgd: lr\b.*1e\+39.*beyond float32"),
        (lambda: ga.em_like(value_lr=1e-50), r"em_like: value_lr\b.*1e-50.*rounds to 0"),
        (lambda: ga.em_like(routing_lr=np.float64(1e39)), r"em_like: routing_lr\b.*1e\+39.*beyond float32"),
        (lambda: ga.alternating(value_lr=1e39), r"alternating: value_lr\b.*1e\+39.*beyond float32"),
    ],
)
def test_optimisers_refuse_rates_outside_float32(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_optimisers_keep_zero_and_float32_rates():
    for lr in (0.0, 1e-45, 3e38, np.float32(0.1)):
        ga.sgd(lr)


def test_init_head_scale_must_be_finite_and_non_zero_in_its_dtype():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"init_head: scale\b.*1e\+39.*beyond float32"):
        ga.init_head(key, 4, 3, 3, 5, scale=1e39)
    with pytest.raises(ValueError, match=r"init_head: scale\b.*1e-50.*rounds to 0.*float32"):
        ga.init_head(key, 4, 3, 3, 5, scale=1e-50)
    assert np.isfinite(ga.init_head(key, 4, 3, 3, 5, scale=1e39, dtype=jnp.float64).w_q).all()
    a = ga.init_head(key, 4, 3, 3, 5, scale=0.1)
    b = ga.init_head(key, 4, 3, 3, 5, scale=np.float64(0.1))
    assert all(np.asarray(p).tobytes() == np.asarray(q).tobytes() for p, q in zip(a, b))


def test_sticky_markov_means_must_be_finite_in_float32(tmp_path):
    mu = np.full((8, 20), 1e39)
    with pytest.raises(ValueError, match=r"StickyMarkov: embeddings\b.*\(8, 20\).*beyond float32"):
        StickyMarkov(embeddings=mu)
    np.save(tmp_path / "big.npy", mu)
    with pytest.raises(ValueError, match=r"embeddings_from_spec: .*big\.npy.*beyond float32"):
        embeddings_from_spec(str(tmp_path / "big.npy"))
    assert StickyMarkov(embeddings=np.full((8, 20), 3e38)).embeddings.max() == 3e38


@pytest.mark.parametrize("field", ["plateau_tol", "settle_tol"])
@pytest.mark.parametrize("value", [5.0, 1e30, 0.0, -0.1])
def test_plateau_tolerances_are_fractions(field, value):
    with pytest.raises(ValueError, match=rf"PlateauConfig: {field}\b.*\(0\.0, 1\.0\].*got {re.escape(str(value))}"):
        PlateauConfig(**{field: value})


def test_plateau_tolerances_keep_the_range_0_1():
    cfg = PlateauConfig(plateau_tol=1.0, settle_tol=1.0)
    assert (cfg.plateau_tol, cfg.settle_tol) == (1.0, 1.0)


@pytest.mark.parametrize("value", [5.0, 0.0])
def test_deep_settle_tol_is_a_fraction(value):
    with pytest.raises(ValueError, match=rf"DeepConfig: settle_tol\b.*\(0\.0, 1\.0\].*got {re.escape(str(value))}"):
        DeepConfig(settle_tol=value)


def test_transformer_refuses_a_sequence_of_no_positions():
    model = Transformer(4, 8, 1, 2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Transformer: x\b.*one position.*\(0, 4\)"):
        model(jnp.ones((0, 4)))


@pytest.mark.parametrize("steps", [[3, 2, 1], [0, 1, 1], [0, 2, 1]])
def test_settling_steps_must_increase(steps):
    series = np.arange(6.0).reshape(3, 2)
    with pytest.raises(ValueError, match=rf"settling_step: checkpoint_steps\b.*increasing.*\[{steps[0]}, "):
        settling_step(np.array(steps), series)
    with pytest.raises(ValueError, match=r"quiet_step: checkpoint_steps\b.*increasing"):
        quiet_step(np.array(steps), series)
    with pytest.raises(ValueError, match=r"frame_before_precision: checkpoint_steps\b.*increasing"):
        frame_before_precision(np.array(steps), series, series)
    traced = jax.jit(lambda t, s: (settling_step(t, s), quiet_step(t, s, 0.5)))(jnp.array(steps, F32), series)
    assert all(np.isnan(np.asarray(v)) for v in traced), traced


def test_settling_on_increasing_steps_is_unchanged():
    series = np.array([[0.0, 0.0], [1.0, 0.5], [1.1, 0.55], [1.1, 0.56]])
    steps = np.array([0.0, 10.0, 20.0, 30.0], np.float32)
    assert float(settling_step(steps, series, 0.1, "change")) == 10.0
    assert float(jax.jit(lambda t: settling_step(t, series, 0.1, "change"))(steps)) == 10.0
    assert float(quiet_step(steps, series, 0.5)) == 10.0


# --------------------------------------------------------------------------------------------
# --embeddings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["seed: 3", " seed:3", "seed:3 ", "seed:\t3", " reference", "reference\n"])
def test_embeddings_spec_has_no_spaces(spec):
    with pytest.raises(ValueError, match="embeddings_from_spec: .* no spaces"):
        embeddings_from_spec(spec)


def _npy_header_only(path, shape, descr="<f8", size=192):
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    data = buf.getvalue()
    path.write_bytes(data + b"\0" * max(0, size - len(data)))
    return str(path)


def test_damaged_npy_header_is_one_line_before_any_allocation(tmp_path):
    path = _npy_header_only(tmp_path / "damaged.npy", (200000, 100000))
    with pytest.raises(ValueError, match=r"embeddings_from_spec: .*damaged.npy.*shape \(200000, 100000\).*at most 1024"):
        embeddings_from_spec(path)


def test_npy_shorter_than_its_header_says_is_refused(tmp_path):
    path = _npy_header_only(tmp_path / "short.npy", (8, 20))
    with pytest.raises(ValueError, match=r"embeddings_from_spec: .*short\.npy.*192 bytes.*\(8, 20\).*float64.*1280"):
        embeddings_from_spec(path)


@pytest.mark.parametrize("shape, descr, match", [((3,), "<f8", r"shape \(C, d\)"), ((8, 5000), "<f8", "at most 4096"),
                                                 ((1, 20), "<f8", "at least 2"), ((8, 20), "<i8", "floating point")])
def test_npy_header_is_checked_against_the_task(tmp_path, shape, descr, match):
    path = _npy_header_only(tmp_path / "h.npy", shape, descr, size=0)
    with pytest.raises(ValueError, match=match):
        embeddings_from_spec(path)


def test_command_line_damaged_npy_is_one_line(capsys, tmp_path):
    path = _npy_header_only(tmp_path / "damaged.npy", (200000, 100000))
    code, out, err = cli_run(["em-vs-sgd", "--seeds", "1", "--embeddings", path] + TINY, capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "--embeddings" in err and "(200000, 100000)" in err


# --------------------------------------------------------------------------------------------
# Errors that name the argument
# --------------------------------------------------------------------------------------------


def test_raw_key_data_of_the_wrong_width_names_the_key():
    with pytest.raises(TypeError, match=r"init_head: key\b.*uint32.*\(2,\).*\(3,\)"):
        ga.init_head(np.array([1, 2, 3], np.uint32), 4, 3, 3, 5)
    ga.init_head(np.array([1, 2], np.uint32), 4, 3, 3, 5)


@pytest.mark.parametrize("task", [StickyMarkov(seq_len=8), DirichletHMM(seq_len=8), BijectionElimination(n_symbols=3)])
@pytest.mark.parametrize("key", [0, np.array([1, 2, 3], np.uint32), jax.random.split(jax.random.key(0), 2)])
def test_task_sample_needs_one_key(task, key):
    name = type(task).__name__
    with pytest.raises(TypeError, match=rf"{name}\.sample: key\b.*(PRNG key|uint32)"):
        task.sample(key)


def test_transformer_dropout_key_must_be_a_key():
    model = Transformer(4, 8, 1, 2, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"Transformer: dropout_key\b.*PRNG key.*got 0\b.*jax\.random\.key\(seed\)"):
        model(jnp.ones((5, 4)), dropout_key=0)
    model(jnp.ones((5, 4)), dropout_key=jax.random.key(0))


def test_deep_law_errors_key_must_be_a_key():
    with pytest.raises(TypeError, match=r"deep_law_errors: key\b.*PRNG key"):
        deep_law_errors(0)


def test_lists_where_arrays_are_expected_are_named():
    params, x = _head32()
    y = jnp.array([0, 1, 2, 3, 4, 0])
    listed = ga.HeadParams(*(np.asarray(a).tolist() for a in params))
    with pytest.raises(TypeError, match=r"forward: params\.w_q\b.*array.*got list"):
        ga.forward(listed, x)
    with pytest.raises(TypeError, match=r"dense_loss: params\.w_q\b.*array"):
        ga.dense_loss(listed, x, y)
    with pytest.raises(TypeError, match=r"dense_loss: x\b.*array"):
        ga.dense_loss(params, np.asarray(x).tolist(), y)
    with pytest.raises(TypeError, match=r"blocked_loss_and_grads: y\b.*array"):
        ga.blocked_loss_and_grads(params, x, [0, 1, 2, 3, 4, 0])
    with pytest.raises(TypeError, match=r"dense_loss: weights\b.*array"):
        ga.dense_loss(params, x, y, [1.0] * 6)
    ga.forward(ga.HeadParams(*(nnx.Param(a) for a in params)), x)  # what JAX converts itself still passes


def test_geometry_names_a_list_given_for_points():
    with pytest.raises(TypeError, match=r"pca_spectrum: z\b.*array"):
        pca_spectrum([[0.0, 1.0], [1.0, 0.0]])
