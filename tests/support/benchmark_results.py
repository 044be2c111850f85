"""What the benchmark tests share: the repository root and the check of a measured number."""

import math
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]


def positive_finite(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0
