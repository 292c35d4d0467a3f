"""The profiler's Shift Parallelism pass: a base-mode layer timed on two real gloo ranks, as profile tables."""

from __future__ import annotations

import pytest

from exegpt.errors import ExeGPTError
from exegpt.profile import Kernel
from profiler.sp_layer import SPLayerPoints, measure_sp_layer, points_for


def test_base_mode_layer_tables_from_two_ranks():
    enc, dec = measure_sp_layer("tiny", 2, SPLayerPoints(tokens=(8, 32), batches=(2,), contexts=(16,)))
    assert (enc.kernel, enc.tp, enc.xs) == (Kernel.SP_ENCODE, 2, (8.0, 32.0)) and enc.extrapolate
    assert (dec.kernel, dec.tp, dec.xs, dec.ys) == (Kernel.SP_DECODE, 2, (2.0,), (16.0,))
    assert all(t > 0 for t in enc.seconds) and dec.seconds[0][0] > 0


def test_points_and_bad_group():
    assert points_for(100, 8, 64) == SPLayerPoints((8, 32), (1, 4), (32,))
    assert points_for(4, 1, 8) == SPLayerPoints((8,), (1,), (32,))  # at least one point an axis
    with pytest.raises(ExeGPTError, match="at least 2 ranks, got 1"):
        measure_sp_layer("tiny", 1, points_for(8, 1, 33))
