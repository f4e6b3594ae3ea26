"""The one integer checker and the one number checker: one error policy for every public function."""

import jax.numpy as jnp
import numpy as np
import pytest

from gradattn._checks import check_int, check_number


def test_check_int_accepts_integral_types_and_normalises():
    for val in (3, np.int64(3), np.int32(3), np.array(3), jnp.asarray(3)):
        out = check_int("n", val, "f")
        assert out == 3 and type(out) is int


@pytest.mark.parametrize("bad", [2.0, 2.5, True, np.bool_(True), "3", None, np.float32(2.0)])
def test_check_int_type_errors(bad):
    with pytest.raises(TypeError, match=r"f: n\b.*positive integer.*got"):
        check_int("n", bad, "f")


def test_check_int_range_errors_name_everything():
    with pytest.raises(ValueError, match=r"f: n\b.*positive integer.*got 0"):
        check_int("n", 0, "f")
    with pytest.raises(ValueError, match=r"g: k\b.*\[2, 5\].*got 6"):
        check_int("k", 6, "g", minimum=2, maximum=5)
    assert check_int("k", -7, "g", minimum=None) == -7
    assert check_int("k", 5, "g", minimum=2, maximum=5) == 5


def test_check_number_accepts_real_scalars():
    for val in (0.5, 1, np.float32(0.5), np.float64(0.5), np.int64(1), np.array(0.5), jnp.asarray(0.5, jnp.float32)):
        out = check_number("lr", val, "f")
        assert type(out) is float
    assert check_number("p", np.float32(0.3), "f", minimum=0.0, maximum=1.0, exclusive_maximum=True) == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [True, "0.1", 1 + 2j, np.complex64(1), None, [0.1]])
def test_check_number_type_errors(bad):
    with pytest.raises(TypeError, match=r"f: lr\b.*real number"):
        check_number("lr", bad, "f")


def test_check_number_value_errors():
    for bad in (float("nan"), float("inf"), np.float32("-inf")):
        with pytest.raises(ValueError, match=r"f: lr\b.*finite"):
            check_number("lr", bad, "f")
    with pytest.raises(ValueError, match=r"f: lr\b.*\(0\.0, inf\).*got 0\.0"):
        check_number("lr", 0.0, "f", minimum=0.0, exclusive_minimum=True)
    with pytest.raises(ValueError, match=r"f: p\b.*\[0\.0, 1\.0\).*got 1\.0"):
        check_number("p", 1.0, "f", minimum=0.0, maximum=1.0, exclusive_maximum=True)
    with pytest.raises(ValueError, match=r"f: lr\b.*scalar.*\(2,\)"):
        check_number("lr", np.ones(2), "f")


def test_is_traced_under_transformations_only():
    import warnings

    import jax

    from gradattn._checks import is_traced

    for val in (0.5, 3, np.float32(0.5), np.ones(3), jnp.ones(3), [1.0, 2.0], "0.1", None):
        assert not is_traced(val)
    seen = []

    def f(x):
        seen.append(is_traced(x))
        return jnp.sum(x)

    jax.jit(f)(jnp.ones(3))
    jax.vmap(f)(jnp.ones((2, 3)))
    jax.grad(f)(jnp.ones(3))  # eager grad: a tracer over a concrete value is still a tracer
    assert seen == [True, True, True]
    # The check rests on jax.core.Tracer: a deprecation of it would show here first.
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert isinstance(jax.core.Tracer, type)
