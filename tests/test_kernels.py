"""Kernel losses: MMD, varifolds and currents against a dense float64 reference, GeomLoss, and their invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomed import KernelLoss, Measure, Mesh, VarifoldLoss, datasets, mmd, varifold_distance
from geomed import keops_available


def _dense(a: Measure, b: Measure, kernel: str, blur: float | None, kind: str | None = None, width: float = 0.5):
    """½ wᵀ K w with the full kernel matrix, by autograd-friendly torch operations (the reference)."""
    z = torch.cat([a.points, b.points])
    w = torch.cat([a.weights, -b.weights])
    difference = z[:, None] - z[None]
    squared = (difference**2).sum(-1)
    distance = torch.where(squared > 0, squared.clamp_min(1e-300).sqrt(), torch.zeros_like(squared))
    k = {"gaussian": lambda: torch.exp(-squared / (2 * blur**2)), "laplacian": lambda: torch.exp(-distance / blur),
         "energy": lambda: -distance}[kernel]()
    if kind is not None:
        u = torch.cat([a.normals, b.normals])
        cosine = u @ u.T
        k = k * {"current": cosine, "unoriented": cosine**2, "oriented": torch.exp((cosine - 1) / width**2)}[kind]
    return 0.5 * w @ k @ w


def _random_pair(seed: int, n: int = 300, m: int = 200, normals: bool = False):
    generator = torch.Generator().manual_seed(seed)

    def measure(count, shift):
        points = (torch.randn(count, 3, generator=generator, dtype=torch.float64) * 5 + shift).requires_grad_()
        weights = torch.rand(count, generator=generator, dtype=torch.float64).add_(0.1).requires_grad_()
        unit = None
        if normals:
            raw = torch.randn(count, 3, generator=generator, dtype=torch.float64)
            unit = (raw / raw.norm(dim=1, keepdim=True)).requires_grad_()
        return Measure(points, weights, unit)

    return measure(n, 0.0), measure(m, 1.5)


def _compare(value, reference, a: Measure, b: Measure, normals: bool, rtol: float = 1e-10):
    inputs = [a.points, b.points, a.weights, b.weights] + ([a.normals, b.normals] if normals else [])
    gradients = torch.autograd.grad(value, inputs)
    expected = torch.autograd.grad(reference, inputs)
    assert float(value.detach()) == pytest.approx(float(reference), rel=rtol)
    for got, want in zip(gradients, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("truncate", [None, 1e-15])
@pytest.mark.parametrize("kernel, blur", [("gaussian", 2.0), ("laplacian", 1.5), ("energy", None)])
def test_mmd_matches_dense_reference(kernel, blur, truncate):
    a, b = _random_pair(0)
    value = mmd(a, b, kernel=kernel, blur=blur, truncate=truncate, backend="torch")
    _compare(value, _dense(a, b, kernel, blur), a, b, normals=False)


@pytest.mark.parametrize("kind", ["current", "unoriented", "oriented"])
def test_varifold_matches_dense_reference(kind):
    a, b = _random_pair(1, normals=True)
    value = varifold_distance(a, b, blur=3.0, kind=kind, orientation_width=0.7, truncate=1e-15)
    _compare(value, _dense(a, b, "gaussian", 3.0, kind, 0.7), a, b, normals=True)


@pytest.mark.skipif(not keops_available(), reason="KeOps does not compile here")
@pytest.mark.parametrize("loss", ["mmd", "varifold"])
def test_keops_backend_matches_dense_reference(loss):
    """Two KeOps formulas (one per loss) with their gradients."""
    a, b = _random_pair(2, normals=loss == "varifold")
    if loss == "mmd":
        value, reference = mmd(a, b, blur=2.0, backend="keops"), _dense(a, b, "gaussian", 2.0)
    else:
        value = varifold_distance(a, b, blur=3.0, backend="keops")
        reference = _dense(a, b, "gaussian", 3.0, "oriented")
    _compare(value, reference, a, b, normals=loss == "varifold")


@pytest.mark.parametrize("kernel, blur", [("gaussian", 2.0), ("laplacian", 1.5), ("energy", None)])
def test_mmd_matches_geomloss(kernel, blur):
    """GeomLoss's tensorized path clamps squared distances at 1e-8 (in units of blur² for the Laplacian, mm² for
    the energy), which moves only the self-pairs: k(x, x) = e^{-10⁻⁴} and -10⁻⁴ instead of 1 and 0. That shift,
    ½ Σ_i w_i² (k_GeomLoss(x, x) − k(x, x)), is removed before comparing."""
    geomloss = pytest.importorskip("geomloss")
    a, b = _random_pair(3)
    value = mmd(a, b, kernel=kernel, blur=blur)
    peer = geomloss.SamplesLoss(kernel, blur=blur if blur else 0.05, backend="tensorized")
    expected = peer(a.weights, a.points, b.weights, b.points)
    self_shift = {"gaussian": 0.0, "laplacian": np.expm1(-1e-4), "energy": -1e-4}[kernel]
    squares = float((a.weights**2).sum() + (b.weights**2).sum())
    assert float(value) == pytest.approx(float(expected) - 0.5 * self_shift * squares, rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(value, a.points)[0], torch.autograd.grad(expected, a.points)[0])


@pytest.mark.slow
def test_truncation_error_is_within_its_bound():
    """On a real femur against a shifted copy: the coarse truncation's error obeys ½·truncate·(Σ|a| + Σ|b|)²,
    and the default one agrees with every pair to 1e-9."""
    surface = Measure.from_mesh(datasets.femur(1), dtype=torch.float64)
    femur = Measure(surface.points[::8], surface.weights[::8])
    moved = Measure(femur.points + torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), femur.weights)
    exact = float(mmd(femur, moved, blur=2.0, truncate=None))
    mass = float(femur.weights.sum() + moved.weights.sum())
    coarse = float(mmd(femur, moved, blur=2.0, truncate=1e-3))
    assert abs(coarse - exact) <= 0.5 * 1e-3 * mass**2
    assert float(mmd(femur, moved, blur=2.0)) == pytest.approx(exact, rel=1e-9)


def _subdivided(mesh: Mesh) -> Mesh:
    """Each triangle split in four at its edge midpoints: the same surface, another parametrisation."""
    vertices, triangles = list(mesh.vertices), []
    midpoints: dict[tuple[int, int], int] = {}

    def middle(i: int, j: int) -> int:
        key = (min(i, j), max(i, j))
        if key not in midpoints:
            midpoints[key] = len(vertices)
            vertices.append((mesh.vertices[i] + mesh.vertices[j]) / 2)
        return midpoints[key]

    for i, j, k in mesh.triangles:
        ij, jk, ki = middle(i, j), middle(j, k), middle(k, i)
        triangles += [(i, ij, ki), (ij, j, jk), (ki, jk, k), (ij, jk, ki)]
    return Mesh(np.array(vertices), np.array(triangles))


@pytest.fixture(scope="module")
def heart():
    return datasets.heart_myocardium("septum")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["oriented", "unoriented", "current"])
def test_varifold_invariants_on_a_real_surface(heart, kind):
    """Remeshing the same surface costs little next to moving it by 1 mm; flipping the normals is seen by the
    oriented kernels and not by the unoriented varifold."""
    surface = Measure.from_mesh(heart)
    remeshed = Measure.from_mesh(_subdivided(heart))
    moved = Measure(surface.points + torch.tensor([1.0, 0.0, 0.0]), surface.weights, surface.normals)
    flipped = Measure(surface.points, surface.weights, -surface.normals)
    loss = VarifoldLoss(blur=2.0, kind=kind)
    self_distance, reparametrised, displaced, inverted = (
        float(loss(surface, other)) for other in (surface, remeshed, moved, flipped))
    assert abs(self_distance) < 1e-6 * displaced
    assert reparametrised < 0.02 * displaced
    if kind == "unoriented":
        assert inverted == self_distance
    else:
        assert inverted > 10 * displaced


@pytest.mark.slow
def test_from_triangles_matches_from_mesh_and_its_gradient_matches_finite_differences():
    mesh = datasets.heart_myocardium("septum")
    vertices = torch.tensor(mesh.vertices, dtype=torch.float64, requires_grad=True)
    surface = Measure.from_triangles(vertices, mesh.triangles)
    reference = Measure.from_mesh(mesh, dtype=torch.float64)
    torch.testing.assert_close(surface.points, reference.points)
    torch.testing.assert_close(surface.weights, reference.weights)
    torch.testing.assert_close(surface.normals, reference.normals)
    target = Measure(reference.points * 1.05 + 1.0, reference.weights, reference.normals)
    value = varifold_distance(surface, target, blur=5.0)
    gradient = torch.autograd.grad(value, vertices)[0]
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(vertices.shape, generator=generator, dtype=torch.float64)
    step = 1e-4

    def at(offset):
        with torch.no_grad():
            return float(varifold_distance(Measure.from_triangles(vertices + offset, mesh.triangles), target, blur=5.0))

    finite_difference = (at(step * direction) - at(-step * direction)) / (2 * step)
    assert float((gradient * direction).sum()) == pytest.approx(finite_difference, rel=1e-6)


def test_batches_and_sequences_match_items():
    a, b = _random_pair(4, n=100, m=100)
    batch_a = Measure(torch.stack([a.points, b.points]).detach(), torch.stack([a.weights, b.weights]).detach())
    batch_b = Measure(torch.stack([b.points, a.points]).detach(), torch.stack([b.weights, a.weights]).detach())
    loss = KernelLoss(kernel="laplacian", blur=2.0)
    batched = loss(batch_a, batch_b)
    assert batched.shape == (2,)
    items = loss([a, b], [b, a])
    torch.testing.assert_close(batched, items.detach())
    assert "laplacian" in repr(loss)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from(["gaussian", "laplacian", "energy"]),
       angle=st.floats(-3.0, 3.0))
def test_mmd_is_a_symmetric_nonnegative_rigid_invariant(seed, kernel, angle):
    """Positive (conditionally, for energy at equal masses) definite kernels: ½‖α − β‖² ≥ 0, symmetric, and
    unchanged by a rotation and translation of both measures."""
    generator = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(n, 3, generator=generator, dtype=torch.float64) * 4 for n in (40, 30))
    a = Measure(x, torch.full((40,), 1 / 40, dtype=torch.float64))
    b = Measure(y, torch.full((30,), 1 / 30, dtype=torch.float64))
    blur = None if kernel == "energy" else 2.0
    value = float(mmd(a, b, kernel=kernel, blur=blur))
    assert value >= -1e-12
    assert float(mmd(b, a, kernel=kernel, blur=blur)) == pytest.approx(value, rel=1e-9, abs=1e-12)
    c, s = np.cos(angle), np.sin(angle)
    rotation = torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    shift = torch.tensor([10.0, -3.0, 7.0], dtype=torch.float64)
    moved = [Measure(m.points @ rotation.T + shift, m.weights) for m in (a, b)]
    assert float(mmd(*moved, kernel=kernel, blur=blur)) == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_bad_inputs_get_clear_errors():
    a, b = _random_pair(5, n=10, m=10)
    surface = Measure.from_mesh(datasets.heart_myocardium("lv"))
    with pytest.raises(ValueError, match="blur must be a positive width"):
        mmd(a, b, kernel="gaussian")
    with pytest.raises(ValueError, match="energy kernel .* has no width"):
        mmd(a, b, kernel="energy", blur=1.0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        mmd(a, b, kernel="cauchy", blur=1.0)
    with pytest.raises(ValueError, match="truncate must be in"):
        mmd(a, b, blur=1.0, truncate=2.0)
    with pytest.raises(ValueError, match="same dimension, got 3-D and 2-D"):
        mmd(a, Measure.from_points(torch.zeros(4, 2, dtype=torch.float64)), blur=1.0)
    with pytest.raises(ValueError, match="b has no normals"):
        varifold_distance(surface, Measure.from_points(surface.points), blur=2.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        VarifoldLoss(blur=2.0, kind="normal")
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]])
    with pytest.raises(ValueError, match=r"1 triangle\(s\) have zero area, e.g. triangles \[1\]"):
        Measure.from_triangles(vertices, [[0, 1, 2], [0, 1, 3]])
    with pytest.raises(ValueError, match="out of range"):
        Measure.from_triangles(vertices, [[0, 1, 7]])
