import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd._checks import check_int, check_positive, check_positive_finite, is_concrete


def test_check_int_accepts_ints_and_numpy_ints_and_returns_a_python_int():
    assert check_int("k", 3) == 3
    value = check_int("k", np.int64(5))
    assert value == 5 and type(value) is int
    assert check_int("k", 0, minimum=0) == 0


@pytest.mark.parametrize(
    "value, minimum, message",
    [
        (0, 1, "k must be a positive int, got k=0"),
        (True, 1, "k must be a positive int"),
        (2.0, 1, "k must be a positive int"),
        (np.float32(2), 1, "k must be a positive int"),
        (-1, 0, "k must be a non-negative int, got k=-1"),
        (2, 3, "k must be an int >= 3, got k=2"),
        (jnp.asarray(2), 1, "k must be a positive int"),
    ],
)
def test_check_int_rejects_with_the_argument_named(value, minimum, message):
    with pytest.raises(ValueError, match=message):
        check_int("k", value, minimum)


@pytest.mark.parametrize("value", [0.0, -1e-9, float("nan"), np.array([1.0, 0.0])])
def test_check_positive_rejects_non_positive_and_nan(value):
    with pytest.raises(ValueError, match="step_size must be positive, got step_size="):
        check_positive("step_size", value)


@pytest.mark.parametrize("value", [float("inf"), 0.0, np.array([1.0, np.inf])])
def test_check_positive_finite_rejects_infinite_and_non_positive(value):
    check_positive("x", 1.0)
    check_positive_finite(x=1.0, y=np.array([2.0, 3.0]))
    with pytest.raises(ValueError, match="y must be positive and finite"):
        check_positive_finite(x=1.0, y=value)


def test_traced_values_pass_the_checks():
    @jax.jit
    def f(value):
        assert not is_concrete(value)
        check_positive("value", value)
        check_positive_finite(value=value)
        return value

    assert float(f(-1.0)) == -1.0  # the caller owns traced values
    assert is_concrete(1.0) and is_concrete(jnp.ones(2))
