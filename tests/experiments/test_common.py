"""experiments.common helpers with closed-form answers."""

import math

import numpy as np

from experiments import common


def test_mean_and_stderr_closed_form_on_each_axis():
    values = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 10.0]])
    mean, stderr = common.mean_and_stderr(values)
    np.testing.assert_allclose(mean, [2.5, 10.0])
    np.testing.assert_allclose(stderr, [math.sqrt(5.0 / 3.0) / 2.0, 0.0])  # sample var 5/3, n = 4
    mean, stderr = common.mean_and_stderr(values, axis=1)
    np.testing.assert_allclose(mean, [5.5, 6.0, 6.5, 7.0])
    np.testing.assert_allclose(stderr, np.abs(values[:, 0] - 10.0) / 2.0)  # n = 2: |a - b| / 2
    assert mean.dtype == np.float64
