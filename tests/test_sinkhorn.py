"""sinkhorn_divergence against exact OT (POT), finite differences, invariants, backends, batches, robustness."""

from __future__ import annotations

import logging

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomed import Measure, SinkhornLoss, datasets, mask_to_mesh, sinkhorn_divergence
from geomed import keops_available
from geomed._spatial import expand_ranges
from geomed.ot.multiscale import Multiscale

CONVERGED = dict(tol=1e-7, max_iter=20_000)


def _cloud(n: int, seed: int, shift=(0.0, 0.0, 0.0), dtype=torch.float64, scale=10.0) -> Measure:
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(n, 3, generator=generator, dtype=dtype) * scale + torch.tensor(shift, dtype=dtype)
    weights = torch.rand(n, generator=generator, dtype=dtype) + 0.5
    return Measure.from_points(points, weights)


@pytest.fixture(scope="module")
def knee_bones() -> tuple[Measure, Measure]:
    """Femur and tibia surfaces of a real knee (from its label map), subsampled to a few hundred points."""
    knee = datasets.knee_labels("A")
    measures = []
    for label, count in (("femur", 400), ("tibia", 300)):
        surface = Measure.from_mesh(mask_to_mesh(knee, label), dtype=torch.float64)
        step = surface.n_points // count
        measures.append(Measure.from_points(surface.points[::step], surface.weights[::step]))
    return measures[0], measures[1]


# ---------------------------------------------------------------------------------------- against exact OT
def test_small_blur_approaches_exact_ot_on_real_bones(knee_bones):
    femur, tibia = knee_bones
    both = torch.cat([femur.points, tibia.points])
    diameter = float((both.amax(0) - both.amin(0)).norm())
    a, b = femur.normalized(), tibia.normalized()
    cost = ot.dist(a.points.numpy(), b.points.numpy()) / 2  # |x − y|²/2, the geomed convention for p = 2
    exact = ot.emd2(a.weights.numpy(), b.weights.numpy(), cost, numItermax=1_000_000)
    result = sinkhorn_divergence(femur, tibia, blur=0.005 * diameter)
    assert result.converged
    assert float(result.value) == pytest.approx(exact, rel=1e-3)


def test_entropic_bias_shrinks_with_blur(knee_bones):
    femur, tibia = knee_bones
    a, b = femur.normalized(), tibia.normalized()
    exact = ot.emd2(a.weights.numpy(), b.weights.numpy(), ot.dist(a.points.numpy(), b.points.numpy()) / 2)
    gaps = [abs(float(sinkhorn_divergence(femur, tibia, blur=blur).value) - exact) / exact for blur in (8.0, 4.0, 1.0)]
    assert gaps[0] > gaps[1] > gaps[2]


def test_default_call_is_within_half_a_percent_of_converged(knee_bones):
    femur, _ = knee_bones
    warped = Measure.from_points(femur.points + 2.0 * torch.sin(femur.points / 20.0), femur.weights)
    both = femur.points
    blur = 0.002 * float((both.amax(0) - both.amin(0)).norm())
    default = sinkhorn_divergence(femur, warped, blur=blur)
    converged = sinkhorn_divergence(femur, warped, blur=blur, tol=1e-6, max_iter=100_000)
    assert float(default.value) == pytest.approx(float(converged.value), rel=5e-3)


# ---------------------------------------------------------------------------------------- gradients
def _finite_difference_check(a: Measure, b: Measure, **options):
    points = a.points.clone().requires_grad_(True)
    weights = a.weights.clone().requires_grad_(True)
    value = sinkhorn_divergence(Measure(points, weights), b, **options, **CONVERGED).value
    grad_points, grad_weights = torch.autograd.grad(value, [points, weights])
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        direction_p = torch.randn(points.shape, generator=generator, dtype=points.dtype)
        direction_w = torch.randn(weights.shape, generator=generator, dtype=weights.dtype) * 0.1
        step = 1e-5

        def at(t):
            moved = Measure(points.detach() + t * direction_p, weights.detach() + t * direction_w)
            return float(sinkhorn_divergence(moved, b, **options, **CONVERGED).value)

        numeric = (at(step) - at(-step)) / (2 * step)
        analytic = float((grad_points * direction_p).sum() + (grad_weights * direction_w).sum())
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize(
    "options",
    [
        dict(blur=3.0),
        dict(blur=3.0, reach=20.0),
        dict(blur=3.0, reach=(None, 15.0)),
        dict(blur=3.0, reach=(15.0, None)),
        dict(blur=3.0, debias=False),
        dict(blur=3.0, reach=20.0, debias=False),
        dict(blur=4.0, p=1),
    ],
    ids=["balanced", "unbalanced", "semi-a", "semi-b", "raw-balanced", "raw-unbalanced", "p1"],
)
def test_gradients_match_finite_differences(options):
    _finite_difference_check(_cloud(25, 0), _cloud(30, 1, shift=(8.0, -3.0, 2.0)), **options)


@pytest.mark.parametrize("reach", [None, 20.0])
def test_stop_at_the_extrapolation_reads_the_value_off_the_potentials(reach):
    """``tol=None, max_iter=0``: the value is the divergence of the returned (extrapolated) potentials, the same
    whether or not the points need gradients, and (balanced) the gradient w.r.t. the points is the envelope
    gradient at those potentials, α_i (T_aa(x_i) − T_ab(x_i)) with the barycentric maps T computed here densely."""
    a, b = _cloud(25, 0), _cloud(30, 1, shift=(8.0, -3.0, 2.0))
    options = dict(blur=3.0, reach=reach, backend="dense", tol=None, max_iter=0)
    plain = sinkhorn_divergence(a, b, **options)
    eps = plain.eps
    if reach is None:
        alpha, beta = a.weights / a.weights.sum(), b.weights / b.weights.sum()
        expected = (alpha * (plain.f - plain.f_aa)).sum() + (beta * (plain.g - plain.g_bb)).sum()
    else:
        rho = reach**2
        expected = (rho + eps / 2) * ((a.weights * (torch.exp(-plain.f_aa / rho) - torch.exp(-plain.f / rho))).sum()
                                      + (b.weights * (torch.exp(-plain.g_bb / rho) - torch.exp(-plain.g / rho))).sum())
    torch.testing.assert_close(plain.value, expected, rtol=1e-12, atol=1e-12)
    points = a.points.clone().requires_grad_()
    tracked = sinkhorn_divergence(Measure.from_points(points, a.weights), b, **options)
    assert float(tracked.value) == float(plain.value)
    if reach is None:
        tracked.value.backward()

        def barycentric(targets, weights, potential):
            logits = weights.log() + (potential - 0.5 * torch.cdist(a.points, targets) ** 2) / eps
            return torch.softmax(logits, -1) @ targets

        envelope = alpha[:, None] * (barycentric(a.points, alpha, plain.f_aa) - barycentric(b.points, beta, plain.g))
        torch.testing.assert_close(points.grad, envelope, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------- invariants
@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.integers(0, 10_000), st.floats(4.0, 12.0), st.floats(0.5, 3.0))
def test_invariants(seed, blur, factor):
    a, b = _cloud(20, seed), _cloud(25, seed + 1, shift=(5.0, 0.0, 0.0))
    ab = float(sinkhorn_divergence(a, b, blur=blur, **CONVERGED).value)
    ba = float(sinkhorn_divergence(b, a, blur=blur, **CONVERGED).value)
    assert ab == pytest.approx(ba, rel=1e-7)
    assert ab > 0
    assert float(sinkhorn_divergence(a, a, blur=blur).value) == 0.0
    shift = torch.tensor([1e3, -2e3, 5e2], dtype=torch.float64)
    moved = sinkhorn_divergence(
        Measure(a.points + shift, a.weights), Measure(b.points + shift, b.weights), blur=blur, **CONVERGED
    )
    assert float(moved.value) == pytest.approx(ab, rel=1e-6)
    scaled = sinkhorn_divergence(
        Measure(a.points * factor, a.weights), Measure(b.points * factor, b.weights), blur=blur * factor, **CONVERGED
    )
    assert float(scaled.value) == pytest.approx(ab * factor**2, rel=1e-6)


def test_unbalanced_with_large_reach_tends_to_balanced():
    a, b = _cloud(30, 4).normalized(), _cloud(40, 5, shift=(4.0, 0.0, 0.0)).normalized()
    balanced = float(sinkhorn_divergence(a, b, blur=2.0, **CONVERGED).value)
    unbalanced = float(sinkhorn_divergence(a, b, blur=2.0, reach=1e4, **CONVERGED).value)
    assert unbalanced == pytest.approx(balanced, rel=1e-3)


def test_unbalanced_sees_mass_change_balanced_does_not():
    a = _cloud(30, 6)
    grown = Measure(a.points, a.weights * 1.2)
    reference = float(sinkhorn_divergence(a, _cloud(30, 7, shift=(3.0, 0.0, 0.0)), blur=2.0).value)
    assert float(sinkhorn_divergence(a, grown, blur=2.0, reach=10.0).value) > 1e-3 * reference
    assert abs(float(sinkhorn_divergence(a, grown, blur=2.0).value)) < 1e-4 * reference  # shapes only


# ---------------------------------------------------------------------------------------- results
def test_plan_marginals_and_barycentric_map():
    a, b = _cloud(40, 7).normalized(), _cloud(50, 8, shift=(30.0, 0.0, 0.0)).normalized()
    result = sinkhorn_divergence(a, b, blur=1.0, tol=1e-8, max_iter=5000)
    torch.testing.assert_close(result.plan_times(torch.ones(50, dtype=torch.float64)), a.weights, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(result.plan_transpose_times(torch.ones(40, dtype=torch.float64)), b.weights,
                               atol=1e-8, rtol=1e-6)
    mapped = result.barycentric_map()
    expected = result.plan_times(b.points) / a.weights[:, None]
    torch.testing.assert_close(mapped, expected, atol=1e-6, rtol=1e-6)
    assert result.converged and result.marginal_error < 1e-8
    assert [step.phase for step in result.schedule][0] == "initialisation"
    assert result.schedule[-1].eps == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one row per point"):
        result.plan_times(torch.ones(3, dtype=torch.float64))


def test_translation_is_recovered_by_the_barycentric_map():
    a = _cloud(60, 9).normalized()
    shift = torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)
    moved = Measure(a.points + shift, a.weights)
    mapped = sinkhorn_divergence(a, moved, blur=0.5, tol=1e-6, max_iter=5000).barycentric_map()
    torch.testing.assert_close(mapped, a.points + shift, atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------- backends and batches
def test_backends_agree():
    a, b = _cloud(300, 10), _cloud(350, 11, shift=(10.0, 0.0, 0.0))
    values, gradients = {}, {}
    backends = ["dense", "online", "multiscale", *(["keops"] if keops_available() else [])]
    for backend in backends:
        points = a.points.clone().requires_grad_(True)
        result = sinkhorn_divergence(Measure(points, a.weights), b, blur=2.0, backend=backend, tol=1e-7)
        assert result.backend == backend
        values[backend] = float(result.value.detach())
        gradients[backend] = torch.autograd.grad(result.value, points)[0]
    for backend in backends[1:]:
        assert values[backend] == pytest.approx(values["dense"], rel=1e-9)
        torch.testing.assert_close(gradients[backend], gradients["dense"], rtol=1e-7, atol=1e-10)


@pytest.fixture(scope="module")
def femur_volume() -> Measure:
    """Voxels of a real femur mask, subsampled to about 3000 points: a volume-filling measure."""
    knee = datasets.knee_labels("A")
    voxels = Measure.from_labels(knee, ["femur"], dtype=torch.float64)["femur"]
    step = voxels.n_points // 3000
    return Measure.from_points(voxels.points[::step], voxels.weights[::step])


@pytest.mark.parametrize("p", [2, 1])
def test_multiscale_matches_exact_online(femur_volume, p):
    """Cluster levels, truncation, extrapolation and the final refinement on the points: same value and gradient
    as the untruncated solver."""
    warped = Measure.from_points(femur_volume.points + 3.0 * torch.sin(femur_volume.points / 15.0),
                                 femur_volume.weights)
    blur = 2.0
    results, gradients = {}, {}
    for backend in ("online", "multiscale"):
        points = femur_volume.points.clone().requires_grad_(True)
        result = sinkhorn_divergence(Measure(points, femur_volume.weights), warped, blur=blur, p=p,
                                     backend=backend, tol=1e-3)
        results[backend] = result
        gradients[backend] = torch.autograd.grad(result.value, points)[0]
    multiscale = results["multiscale"]
    scales = [step.scale for step in multiscale.schedule]
    assert len(set(scales)) >= 2 and scales[-1] == 0.0  # cluster levels, then the points
    assert any(step.phase == "scale-jump" for step in multiscale.schedule)
    assert multiscale.schedule[-1].kept < 1.0  # truncated
    # at the final blur the cluster pattern is cut entry by entry, without radius margins
    assert multiscale.schedule[-1].kept < (0.5 if p == 2 else 0.8) * multiscale.schedule[-3].kept
    assert float(multiscale.value.detach()) == pytest.approx(float(results["online"].value.detach()), rel=1e-4)
    torch.testing.assert_close(gradients["multiscale"], gradients["online"], rtol=0, atol=1e-3 * float(
        gradients["online"].abs().max()))
    shift = (multiscale.f - results["online"].f).mean()  # balanced potentials are defined up to a constant
    torch.testing.assert_close(multiscale.f - shift, results["online"].f, rtol=0, atol=2e-2 * blur**p)


def test_cluster_hierarchy_is_nested_and_bounded():
    """As many levels as pay off, each cluster a contiguous range of the level below, radii bounding the members."""
    generator = torch.Generator().manual_seed(41)
    x = torch.rand(60_000, 3, generator=generator) * 100
    y = torch.rand(50_000, 3, generator=generator) * 100
    log_w = torch.zeros(60_000)
    geometry = Multiscale(x, y, log_w, torch.zeros(50_000), p=2, blur=1.0, damping=lambda eps, side: 1.0,
                          debias=True)
    levels = geometry.x_levels
    assert len(levels.points) >= 3 and len(levels.points[-1]) <= 1000
    assert sorted(geometry.perm_x.tolist()) == list(range(60_000))
    fine = levels.points[0]
    for k in range(1, len(levels.points)):
        sizes = [len(p) for p in levels.points]
        assert sizes[k] <= sizes[k - 1] / 3
        assert int(levels.child_count[k].sum()) == sizes[k - 1]
        assert torch.equal(levels.child_start[k][1:], torch.cumsum(levels.child_count[k], 0)[:-1])
        torch.testing.assert_close(float(levels.log_weights[k].exp().sum()), 60_000.0, rtol=1e-5, atol=0)
    top = len(levels.points) - 1
    starts, counts = _first_points(levels, top)
    for cluster in range(0, len(starts), max(1, len(starts) // 50)):
        block = fine[starts[cluster] : starts[cluster] + counts[cluster]]
        assert float((block - levels.points[top][cluster]).norm(dim=-1).max()) <= float(levels.radius[top][cluster]) + 1e-4


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=12))
def test_expanded_ranges_are_compact_int32_aranges(ranges):
    """The block-sparse column indices: concatenated aranges, int32 (half the multiscale memory of int64)."""
    starts = torch.tensor([start for start, _ in ranges], dtype=torch.long)
    counts = torch.tensor([count for _, count in ranges], dtype=torch.long)
    expanded = expand_ranges(starts, counts)
    assert expanded.dtype == torch.int32
    assert expanded.tolist() == [index for start, count in ranges for index in range(start, start + count)]


def _first_points(levels, level):
    """Input-point range (start, count) of every cluster of ``level``."""
    starts, counts = levels.child_start[level], levels.child_count[level]
    for k in range(level - 1, 0, -1):
        ends = starts + counts
        starts = levels.child_start[k][starts]
        last = levels.child_start[k][ends - 1] + levels.child_count[k][ends - 1]
        counts = last - starts
    return starts.tolist(), counts.tolist()


def test_multiscale_with_normals_and_batches():
    """D = 6 (points and normals) and a batch of two items, each with its own clusters."""
    generator = torch.Generator().manual_seed(40)
    points = torch.randn(2, 2500, 6, generator=generator, dtype=torch.float64) * 10
    moved = points + torch.tensor([2.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    a, b = Measure.from_points(points), Measure.from_points(moved)
    options = dict(blur=3.0, tol=1e-4, diameter=150.0)  # one ε-schedule for the batch and the single item
    batched = sinkhorn_divergence(a, b, backend="multiscale", **options)
    online = sinkhorn_divergence(a, b, backend="online", **options)
    assert batched.value.shape == (2,)
    np.testing.assert_allclose(batched.value.numpy(), online.value.numpy(), rtol=1e-4)
    single = sinkhorn_divergence(Measure.from_points(points[1]), Measure.from_points(moved[1]),
                                 backend="multiscale", **options)
    assert float(single.value) == pytest.approx(float(batched.value[1]), rel=1e-9)
    mapped = batched.barycentric_map()
    assert mapped.shape == points.shape
    ones = torch.ones(2, 2500, dtype=torch.float64)
    np.testing.assert_allclose(batched.plan_times(ones).sum(-1).numpy(), 1.0, rtol=1e-3)


def test_batches_equal_per_item_results():
    items_a = [_cloud(30, 20 + i) for i in range(3)]
    items_b = [_cloud(30, 30 + i, shift=(3.0 * i, 0.0, 0.0)) for i in range(3)]
    batch_a = Measure(torch.stack([m.points for m in items_a]), torch.stack([m.weights for m in items_a]))
    batch_b = Measure(torch.stack([m.points for m in items_b]), torch.stack([m.weights for m in items_b]))
    batched = sinkhorn_divergence(batch_a, batch_b, blur=2.0, **CONVERGED)
    assert batched.value.shape == (3,) and batched.f.shape == (3, 30)
    singles = [float(sinkhorn_divergence(x, y, blur=2.0, **CONVERGED).value) for x, y in zip(items_a, items_b)]
    np.testing.assert_allclose(batched.value.numpy(), singles, rtol=1e-7)
    ragged = sinkhorn_divergence([items_a[0], _cloud(17, 5)], [items_b[0], _cloud(40, 6)], blur=2.0, **CONVERGED)
    assert isinstance(ragged, list) and float(ragged[0].value) == pytest.approx(singles[0], rel=1e-7)
    loss = SinkhornLoss(blur=2.0, **CONVERGED)
    assert loss([items_a[0], items_a[1]], [items_b[0], items_b[1]]).shape == (2,)
    assert "blur=2.0" in repr(loss)


# ---------------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("backend", ["auto", "multiscale"])
def test_identical_measures_give_zero_and_finite_gradients(backend):
    a = _cloud(50, 14)
    points = a.points.clone().requires_grad_(True)
    value = sinkhorn_divergence(Measure(points, a.weights), Measure(points, a.weights), blur=1.0,
                                backend=backend).value
    assert float(value.detach()) == 0.0
    (gradient,) = torch.autograd.grad(value, points)
    assert torch.isfinite(gradient).all()


@pytest.mark.parametrize(
    "points_a, weights_a",
    [
        ([[0.0, 0.0, 0.0]], [1.0]),  # N = 1
        ([[1.0, 2.0, 3.0]] * 5, [1.0] * 5),  # coincident points
        ([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]], [1.0, 0.0, 2.0]),  # a zero-weight point
    ],
    ids=["single-point", "coincident", "zero-weight"],
)
@pytest.mark.parametrize("reach", [None, 5.0])
def test_degenerate_inputs_are_finite(points_a, weights_a, reach):
    a = Measure.from_points(points_a, weights_a, dtype=torch.float64)
    b = _cloud(20, 15, scale=2.0)
    points = a.points.clone().requires_grad_(True)
    value = sinkhorn_divergence(Measure(points, a.weights), b, blur=0.5, reach=reach).value
    (gradient,) = torch.autograd.grad(value, points)
    assert torch.isfinite(value) and float(value) > 0
    assert torch.isfinite(gradient).all()


@pytest.mark.parametrize("offset", [1e-3, 1.0, 1e5])
def test_float32_whole_body_coordinates(offset):
    a64, b64 = _cloud(100, 16), _cloud(120, 17, shift=(6.0, 0.0, 0.0))
    reference = float(sinkhorn_divergence(a64, b64, blur=1.0).value)
    shift = torch.tensor([offset, -offset, 2 * offset])
    a32 = Measure((a64.points + shift.double()).float(), a64.weights.float())
    b32 = Measure((b64.points + shift.double()).float(), b64.weights.float())
    value = sinkhorn_divergence(a32, b32, blur=1.0).value
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(reference, rel=1e-3)


def test_autocast_and_grad_mode():
    a, b = _cloud(40, 18, dtype=torch.float32), _cloud(40, 19, shift=(3.0, 0, 0), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sinkhorn_divergence(a, b, blur=1.0).value
    assert value.dtype == torch.float32
    with torch.no_grad():
        with pytest.raises(ValueError, match="blur must be a positive number"):
            sinkhorn_divergence(a, b, blur=-1.0)
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def test_keops_failure_is_reported_once(caplog, monkeypatch):
    """A real KeOps failure (its cache folder cannot be created) found by the child-process probe: logged once,
    ``backend='keops'`` refused with the reason, ``auto`` falls back to the torch backends."""
    from geomed import _spatial

    saved = dict(_spatial.KEOPS_STATUS)
    monkeypatch.setenv("KEOPS_CACHE_FOLDER", "/proc/geomed-no-such-folder")
    try:
        _spatial.KEOPS_STATUS.clear()
        with caplog.at_level(logging.WARNING, logger="geomed._spatial"):
            with pytest.raises(ValueError, match="KeOps is unavailable"):
                sinkhorn_divergence(_cloud(5, 1), _cloud(5, 2), blur=1.0, backend="keops")
            result = sinkhorn_divergence(_cloud(2500, 1), _cloud(2000, 2), blur=5.0, p=2)
            assert not keops_available()
        warnings = [r.getMessage() for r in caplog.records if r.name == "geomed._spatial"]
        assert len(warnings) == 1
        assert "exit status 1" in warnings[0] and "geomed-no-such-folder" in warnings[0]
        assert result.backend in ("dense", "online", "multiscale")
    finally:
        _spatial.KEOPS_STATUS.clear()
        _spatial.KEOPS_STATUS.update(saved)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(blur=0.0), ValueError, "blur must be a positive number of mm"),
        (dict(blur=1.0, p=3), ValueError, "p must be 1 or 2"),
        (dict(blur=1.0, scaling=1.0), ValueError, r"scaling must be in \(0, 1\)"),
        (dict(blur=1.0, reach=-2.0), ValueError, "reach must be None, a positive number"),
        (dict(blur=1.0, reach=(1.0, 2.0, 3.0)), ValueError, "reach must be None"),
        (dict(blur=1.0, backend="gpu"), ValueError, "backend must be one of"),
        (dict(blur=1.0, tol=0.0), ValueError, "tol must be None or a positive number"),
        (dict(blur=1.0, max_iter=-1), ValueError, "max_iter must be a non-negative integer"),
        (dict(blur=1.0, diameter=float("nan")), ValueError, "diameter must be None or a positive number"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        sinkhorn_divergence(_cloud(5, 1), _cloud(6, 2), **kwargs)


def test_bad_measures():
    a = _cloud(5, 1)
    with pytest.raises(ValueError, match="same dimension, got D=3 and D=2"):
        sinkhorn_divergence(a, Measure.from_points(torch.zeros(4, 2)), blur=1.0)
    with pytest.raises(ValueError, match="same batch shape"):
        sinkhorn_divergence(a, Measure.from_points(torch.zeros(2, 4, 3)), blur=1.0)
    with pytest.raises(TypeError, match="must both be Measures or both sequences"):
        sinkhorn_divergence(a, torch.zeros(4, 3), blur=1.0)
    with pytest.raises(ValueError, match="same, non-zero length"):
        sinkhorn_divergence([a], [a, a], blur=1.0)


def test_an_unconverged_solve_says_so_in_the_log(caplog):
    """Stopping at max_iter above tol is flagged on the result and logged as a warning naming what to change."""
    generator = torch.Generator().manual_seed(0)
    a = Measure.from_points(torch.randn(60, 3, generator=generator, dtype=torch.float64))
    b = Measure.from_points(torch.randn(50, 3, generator=generator, dtype=torch.float64) * 3 + 4)
    with caplog.at_level(logging.WARNING, logger="geomed.ot.solver"):
        result = sinkhorn_divergence(a, b, blur=0.1, tol=1e-9, max_iter=2)
    assert not result.converged
    assert "Sinkhorn did not converge" in caplog.text and "raise max_iter" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geomed.ot.solver"):
        assert sinkhorn_divergence(a, b, blur=1.0, tol=1e-3, max_iter=5000).converged
    assert "did not converge" not in caplog.text


def test_reading_the_error_every_few_iterations_keeps_the_value(monkeypatch):
    """On accelerators the final-blur errors are read a few iterations at a time (the device does not wait for the
    host at every update); the same schedule run on the CPU gives the same value, within a few iterations."""
    from geomed.ot import solver

    a, b = _cloud(400, 31), _cloud(500, 32, shift=(2.0, 0.0, 0.0))
    every_time = sinkhorn_divergence(a, b, blur=1.0)
    monkeypatch.setattr(solver, "_reads_every", lambda device: solver._DEVICE_READS_EVERY)
    batched = sinkhorn_divergence(a, b, blur=1.0)
    iterations = [next(s.iterations for s in r.schedule if s.phase == "final-blur") for r in (every_time, batched)]
    assert batched.converged and iterations[0] <= iterations[1] < iterations[0] + solver._DEVICE_READS_EVERY
    assert iterations[1] % solver._DEVICE_READS_EVERY == 0
    assert float(batched.value) == pytest.approx(float(every_time.value), rel=1e-3)
