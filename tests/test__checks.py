import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shufflesgd._checks import (
    check_finite,
    check_float_array,
    check_int,
    check_key,
    check_like,
    check_positive,
    check_positive_finite,
    is_concrete,
)


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


def test_check_key_accepts_typed_raw_and_traced_keys():

    check_key("key", jax.random.key(0))
    check_key("key", jax.random.PRNGKey(0))
    check_key("key", jax.random.split(jax.random.PRNGKey(0), 3))
    jax.jit(lambda k: check_key("key", k))(jax.random.key(1))


@pytest.mark.parametrize(
    "key", [3, 1.5, None, jnp.zeros(2), jnp.zeros(2, jnp.int32), np.zeros(3, np.uint32)]
)
def test_check_key_names_the_argument(key):

    with pytest.raises(TypeError, match="rng must be a PRNG key"):
        check_key("rng", key)


def test_check_float_array_and_check_like_name_the_argument():

    check_float_array("x", jnp.zeros(3), shape=(3,))
    check_like("x0", {"a": jnp.zeros(2)}, {"a": np.ones(2)}, "x_star")
    with pytest.raises(TypeError, match="x must be a float array"):
        check_float_array("x", jnp.arange(3))
    with pytest.raises(ValueError, match=r"x must have shape \(3,\)"):
        check_float_array("x", jnp.zeros(4), shape=(3,))
    with pytest.raises(ValueError, match=r"x0 must be shaped like x_star: expected \(2,\)"):
        check_like("x0", jnp.zeros(3), jnp.zeros(2), "x_star")
    with pytest.raises(TypeError, match="x0 must be a float array"):
        check_like("x0", jnp.zeros(2, jnp.int32), jnp.zeros(2), "x_star")


def test_check_finite_names_the_argument_and_passes_tracers():

    check_finite("t", 1.0)
    jax.jit(lambda t: check_finite("t", t) or t)(jnp.nan)
    with pytest.raises(ValueError, match="t_min must be finite"):
        check_finite("t_min", float("nan"))
    with pytest.raises(ValueError, match="a must be finite"):
        check_finite("a", np.array([1.0, np.inf]))
