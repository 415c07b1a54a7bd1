"""Numbers beyond what float32 or a registration can use: a clear error, or float64 with a warning that names the
magnitude — never a silent NaN, a raw overflow or a wrong value."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from geomed import Measure
from geomed.ot import sinkhorn_divergence
from geomed.registration import register

_RNG = np.random.default_rng(0)
_X = _RNG.uniform(0, 10, (200, 3))
_Y = _RNG.uniform(0, 10, (200, 3)) + 1.0


def test_float32_weights_whose_total_overflows_are_refused():
    with pytest.raises(ValueError, match=r"weights sum to 6e\+38, beyond the range of torch.float32"):
        Measure.from_points(torch.as_tensor(_X, dtype=torch.float32), torch.full((200,), 3e36))


def test_far_coordinates_stay_float64_with_a_warning_and_the_value_is_right():
    reference = float(sinkhorn_divergence(Measure.from_points(_X), Measure.from_points(_Y), blur=0.5).value)
    with pytest.warns(RuntimeWarning, match=r"points reach 1e\+07 mm from the origin, where float32 resolves only"):
        far = Measure.from_points(_X + 1e7), Measure.from_points(_Y + 1e7)
    assert far[0].points.dtype == torch.float64
    assert float(sinkhorn_divergence(*far, blur=0.5).value) == pytest.approx(reference, rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Measure.from_points(_X + 1e3).points.dtype == torch.float32  # scanner coordinates: no warning


def test_float32_points_far_from_the_origin_warn_in_the_solve():
    a = Measure.from_points(torch.as_tensor(_X + 1e7, dtype=torch.float32))
    b = Measure.from_points(torch.as_tensor(_Y + 1e7, dtype=torch.float32))
    with pytest.warns(RuntimeWarning, match=r"1e\+07 mm from the origin, where torch.float32 resolves only 1.2 mm"):
        sinkhorn_divergence(a, b, blur=0.5)


@pytest.mark.parametrize(("dtype", "message"), [
    (torch.float32, r"costs \|x − y\|\^2 overflow torch.float32"),
    (torch.float64, r"times the blur 0.5 mm \(at most 1e\+09\): are the coordinates in mm"),
])
def test_extents_beyond_any_schedule_are_refused(dtype, message):
    a = Measure.from_points(torch.as_tensor(_X * 1e20, dtype=dtype))
    b = Measure.from_points(torch.as_tensor(_Y * 1e20, dtype=dtype))
    with pytest.raises(ValueError, match=message):
        sinkhorn_divergence(a, b, blur=0.5)


@pytest.mark.parametrize(("moving", "model", "message"), [
    (_X[:1], "rigid", r"moving has no extent: its 1 point\(s\)"),
    (np.repeat(_X[:1], 5, axis=0), "affine", r"moving has no extent: its 5 point\(s\)"),
    (np.column_stack([_X[:, :2], np.zeros(200)]), "affine", "moving's 200 points lie in a plane: an affine"),
])
def test_degenerate_registrations_say_what_is_degenerate(moving, model, message):
    with pytest.raises(ValueError, match=message):
        register(Measure.from_points(moving), Measure.from_points(_Y), model=model)
