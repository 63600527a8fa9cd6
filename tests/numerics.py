"""The one tolerance tests use to say "the same function": a transformed or converted model
against its original, computed by whatever kernels this CPU gets (see
``serving_optimiser.saved_model.compare``: ``|Δ| <= 1e-5 + 1e-4·max|output|`` for floats, exact
for the rest)."""

import numpy as np

from serving_optimiser.saved_model.compare import within_rounding


def assert_same_function(actual, desired, err_msg: str = "") -> None:
    actual, desired = np.asarray(actual), np.asarray(desired)
    if within_rounding(desired, actual):
        return
    if actual.dtype.kind in "fc":
        worst = float(np.max(np.abs(actual.astype(np.float64) - desired.astype(np.float64))))
        raise AssertionError(f"{err_msg}: differs beyond float rounding (max |diff| {worst:.3g})")
    np.testing.assert_array_equal(actual, desired, err_msg=err_msg)
