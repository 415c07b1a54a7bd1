"""geomed.registration: closed-form fits, recovery of known transforms of real shapes, diffeomorphisms (inverse
consistency, Jacobians), SimpleITK export read back by SimpleITK, mixed inputs, progress and cancel, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from geomed import Image, KernelLoss, Measure, Mesh, SinkhornLoss, VarifoldLoss, datasets, mask_to_mesh, register
from geomed.registration import (PRESETS, AffineTransform, KernelDeformation, RegistrationCancelled,
                                 deformable_loss)
from geomed import keops_available
from geomed.plotting import plot_registration, plot_surface
from geomed.surface import distance_to_surface
from geomed.registration.kernel_velocity import velocity
from geomed.registration.linear import fit_pairs

LPS = np.diag([-1.0, -1.0, 1.0])


def _rigid(vertices: np.ndarray, degrees: float, axis, shift) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotate about the centroid and shift; returns the moved vertices, the rotation and the translation."""
    rotation = Rotation.from_rotvec(np.radians(degrees) * np.asarray(axis) / np.linalg.norm(axis)).as_matrix()
    centre = vertices.mean(0)
    return (vertices - centre) @ rotation.T + centre + np.asarray(shift), rotation, np.asarray(shift)


@pytest.fixture(scope="module")
def femur_small() -> Mesh:
    """A real distal femur (datasets.femur(1)), every vertex kept: 20k vertices."""
    return datasets.femur(1)


# ------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("model", ["rigid", "similarity", "affine"])
def test_closed_form_fits_recover_exact_pairs(model):
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(50, 3, generator=generator, dtype=torch.float64) * 20
    rotation = torch.tensor(Rotation.from_rotvec([0.3, -0.5, 0.2]).as_matrix())
    matrix = {"rigid": rotation, "similarity": 1.3 * rotation,
              "affine": rotation @ torch.tensor([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.0, 0.0, 1.1]],
                                                dtype=torch.float64)}[model]
    translation = torch.tensor([4.0, -2.0, 7.0], dtype=torch.float64)
    target = source @ matrix.T + translation
    weights = torch.rand(50, generator=generator, dtype=torch.float64) + 0.1
    fitted = fit_pairs(source, target, weights, model)
    torch.testing.assert_close(fitted.matrix, matrix)
    torch.testing.assert_close(fitted.translation, translation)


def test_rigid_fit_never_returns_a_reflection():
    """Mirrored pairs: Kabsch's sign correction keeps det = +1."""
    source = torch.randn(30, 3, dtype=torch.float64)
    fitted = fit_pairs(source, source * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64), torch.ones(30), "rigid")
    assert float(torch.linalg.det(fitted.matrix)) == pytest.approx(1.0)


# ------------------------------------------------------------------ recovery on real shapes


def _cropped(mesh: Mesh, kept: float) -> tuple[Mesh, np.ndarray]:
    """The mesh below the ``kept`` quantile of its height (z): a scan cropped at a different level, with an open
    rim; and the kept vertices' indices in ``mesh``."""
    return mesh.submesh(mesh.vertices[:, 2] < np.quantile(mesh.vertices[:, 2], kept))


_SHAPES = {"femur": (lambda: datasets.femur(1), "knee"), "lv": (lambda: datasets.heart_myocardium("lv"), "heart"),
           "hippocampus": (lambda: mask_to_mesh(datasets.brain_labels("9861"), 40), "brain")}


@pytest.mark.slow
@pytest.mark.parametrize("kept", [1.0, 0.8], ids=["whole", "cropped"])
@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_rigid_transform_of_a_real_shape_is_recovered(shape, kept):
    """12° about an oblique axis and (6, −4, 5) mm on a real femur, LV and hippocampus, whole or with the top 20%
    of its height cropped away (partial overlap: the moving shape is a part of the fixed one), with the anatomy's
    preset: recovered within 0.5° and 0.5 mm (mean vertex error)."""
    load, preset = _SHAPES[shape]
    fixed = load()
    moved, rotation, _ = _rigid(fixed.vertices, 12.0, [0.3, 0.8, 0.5], [6.0, -4.0, 5.0])
    moving, used = _cropped(Mesh(moved, fixed.triangles), kept)
    result = register(moving, fixed, model="rigid", preset=preset)
    angle = np.degrees(Rotation.from_matrix(result.transform.matrix.numpy() @ rotation).magnitude())
    assert angle < 0.5
    assert np.linalg.norm(result.warped.vertices - fixed.vertices[used], axis=1).mean() < 0.5
    assert result.history[0][0].startswith(f"rigid (blur {PRESETS[preset].blurs[0]:g}")
    assert result.timings["total"] > 0 and result.min_jacobian == pytest.approx(1.0)


def test_rims_of_a_cropped_mesh_are_found():
    """The open boundary of a cropped mesh is what rim trimming measures from: none on a closed surface, the cut on
    a cropped one."""
    hippocampus = mask_to_mesh(datasets.brain_labels("9861"), 40)
    cropped, _ = _cropped(hippocampus, 0.8)
    assert hippocampus.is_closed and len(hippocampus.boundary_edges()) == 0
    rim = np.unique(cropped.boundary_edges())
    cut = np.quantile(hippocampus.vertices[:, 2], 0.8)
    assert len(rim) > 20
    assert np.all(np.abs(cropped.vertices[rim, 2] - cut) < 2.0)
    femur = datasets.femur(1)
    part, indices = femur.submesh(femur.vertices[:, 2] < np.median(femur.vertices[:, 2]))
    np.testing.assert_array_equal(part.vertices, femur.vertices[indices])
    np.testing.assert_array_equal(part.point_data["thickness (mm)"], femur.point_data["thickness (mm)"][indices])
    assert 0.3 < part.n_triangles / femur.n_triangles < 0.7
    with pytest.raises(ValueError, match="keep must be a boolean array"):
        femur.submesh(np.ones(3, dtype=bool))


# ------------------------------------------------------------------ diffeomorphisms


def _deformation(steps: int, amplitude: float) -> KernelDeformation:
    generator = torch.Generator().manual_seed(3)
    control = torch.rand(40, 3, generator=generator, dtype=torch.float64) * 60
    momenta = torch.randn(40, 3, generator=generator, dtype=torch.float64) * amplitude
    initial = AffineTransform(torch.eye(3, dtype=torch.float64) * 1.05, torch.tensor([1.0, 2.0, -1.0],
                                                                                      dtype=torch.float64))
    return KernelDeformation(initial, control, momenta, 12.0, steps)


def test_diffeomorphic_map_is_inverse_consistent_and_folds_nothing():
    deformation = _deformation(steps=10, amplitude=1.5)
    assert deformation.is_invertible
    points = torch.rand(500, 3, dtype=torch.float64) * 60
    moved = deformation(points)
    assert float((moved - points).norm(dim=1).max()) > 2.0
    torch.testing.assert_close(deformation.inverse(moved), points, rtol=0, atol=1e-8)
    assert float(deformation.jacobian_determinant(points).min()) > 0


def test_jacobian_matches_finite_differences():
    deformation = _deformation(steps=4, amplitude=1.0)
    point = torch.tensor([[30.0, 20.0, 25.0]], dtype=torch.float64)
    step = 1e-5
    columns = [(deformation(point + step * e) - deformation(point - step * e))[0] / (2 * step)
               for e in torch.eye(3, dtype=torch.float64)]
    torch.testing.assert_close(deformation.jacobian(point)[0], torch.stack(columns, 1), rtol=1e-6, atol=1e-8)


def test_geodesic_conserves_the_kinetic_energy():
    """Hamilton's equations conserve H(q, p) = energy (explicit steps: to first order in the step)."""
    deformation = _deformation(steps=50, amplitude=1.0)
    energies = [0.5 * float((p * (torch.exp(-torch.cdist(q, q) ** 2 / (2 * 12.0**2)) @ p)).sum())
                for q, p in deformation.trajectory()]
    assert max(energies) == pytest.approx(min(energies), rel=0.02)
    assert energies[0] == pytest.approx(float(deformation.energy()))


@pytest.mark.slow
def test_smooth_deformation_of_a_real_femur_is_recovered_without_folds(femur_small):
    """A 3 mm smooth bump on the condyle: the diffeomorphic registration brings the surface back to within 0.3 mm
    mean surface distance and the vertices to their own places within 0.4 mm on average (tangential slips
    included), with every Jacobian positive and the map invertible."""
    vertices = femur_small.vertices
    centre = vertices.mean(0) + np.array([15.0, 0.0, -10.0])
    bump = np.exp(-np.sum((vertices - centre) ** 2, 1) / (2 * 18.0**2))
    moving = Mesh(vertices + 3.0 * bump[:, None] * np.array([0.6, 0.0, 0.8]), femur_small.triangles)
    result = register(moving, femur_small, model="diffeomorphic", preset="knee")
    assert distance_to_surface(result.warped.vertices, femur_small).mean() < 0.3
    assert np.linalg.norm(result.warped.vertices - vertices, axis=1).mean() < 0.4
    assert result.min_jacobian > 0 and result.transform.is_invertible
    assert set(result.warped.point_data) >= {"displacement", "normal displacement", "jacobian"}
    back = result.transform.inverse(result.warped.vertices)
    assert np.abs(back - moving.vertices).max() < 1e-4


@pytest.mark.parametrize("backend", ["tiles", "keops"])
def test_lean_velocity_matches_the_dense_kernel_and_its_point_gradient(backend):
    """The O(N)-memory velocity (torch tiles, KeOps) equals the dense kernel product, and so does its gradient in
    the points (recomputed in the backward pass)."""
    if backend == "keops" and not keops_available():
        pytest.skip("KeOps does not compile here (logged warning); the tiles cover the same reduction")
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(700, 3, generator=generator, dtype=torch.float64) * 60
    q = torch.rand(40, 3, generator=generator, dtype=torch.float64) * 60
    p = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    weights = torch.randn(700, 3, generator=generator, dtype=torch.float64)
    results = {}
    for name in ("dense", backend):
        points = x.clone().requires_grad_()
        value = velocity(points, q, p, 12.0, name)
        results[name] = (value.detach(), torch.autograd.grad((value * weights).sum(), points)[0])
    torch.testing.assert_close(results[backend][0], results["dense"][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[backend][1], results["dense"][1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="differentiates in the points only"):
        velocity(x, q, p.clone().requires_grad_(), 12.0, backend)


# ------------------------------------------------------------------ SimpleITK export


def test_affine_export_is_read_back_by_simpleitk(tmp_path):
    import SimpleITK as sitk

    source = torch.tensor([[10.0, 0.0, 0.0], [0.0, 12.0, 0.0], [0.0, 0.0, 14.0], [3.0, 4.0, 5.0]],
                          dtype=torch.float64)
    mesh = Mesh(source.numpy(), np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1], [1, 3, 2]]))
    transform = AffineTransform(torch.tensor(Rotation.from_rotvec([0.2, 0.1, -0.3]).as_matrix()) * 1.1,
                                torch.tensor([5.0, -3.0, 2.0], dtype=torch.float64))
    from geomed.registration.result import summarise

    result = summarise(transform, mesh, history=[], timings={}, model="similarity", backend="cpu")
    for suffix in (".tfm", ".h5"):
        path = result.write_transform(tmp_path / f"affine{suffix}")
        read = sitk.ReadTransform(str(path))
        for x, y in zip(mesh.vertices, result.warped.vertices):
            np.testing.assert_allclose(read.TransformPoint((LPS @ y).tolist()), LPS @ x, atol=1e-9)
    with pytest.raises(ValueError, match=".tfm or .h5"):
        result.write_transform(tmp_path / "affine.nii.gz")


def test_deformation_export_is_read_back_by_simpleitk(tmp_path):
    """The displacement field (fixed → moving, LPS) maps the warped points back onto the moving ones, to within
    the interpolation error of a 1.5 mm grid."""
    import SimpleITK as sitk

    deformation = _deformation(steps=5, amplitude=1.0)
    points = torch.rand(200, 3, dtype=torch.float64) * 40 + 10
    measure = Measure.from_points(points, torch.ones(200, dtype=torch.float64))
    from geomed.registration.result import summarise

    result = summarise(deformation, measure, history=[], timings={}, model="diffeomorphic", backend="cpu")
    warped = result.warped.points.numpy()
    for name in ("field.h5", "field.nii.gz"):
        path = result.write_transform(tmp_path / name, spacing=1.5)
        read = (sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
                if name.endswith(".nii.gz") else sitk.ReadTransform(str(path)))
        back = np.array([read.TransformPoint((LPS @ y).tolist()) for y in warped]) @ LPS
        assert np.abs(back - points.numpy()).max() < 0.05


# ------------------------------------------------------------------ inputs, progress, cancel


def _ball_mask(centre, radius=8.0, size=32) -> Image:
    axis = np.arange(size)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)
    mask = (np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius).astype(np.uint8)
    return Image(mask, np.diag([1.0, 1.0, 1.0, 1.0]))


def test_mask_is_registered_onto_a_mesh():
    """Mixed inputs: a ball mask onto the surface mesh of a ball 3 mm away — the mask becomes its boundary
    surface and the translation is recovered."""
    fixed = mask_to_mesh(_ball_mask((17.0, 15.0, 16.0)))
    moving = _ball_mask((15.0, 16.0, 15.0))
    result = register(moving, fixed, model="rigid", preset="brain")
    np.testing.assert_allclose(result.transform.translation.numpy(), [2.0, -1.0, 1.0], atol=0.3)


def test_registration_figure_is_written_and_bad_arrays_are_refused(tmp_path):
    fixed = mask_to_mesh(_ball_mask((17.0, 15.0, 16.0)))
    result = register(_ball_mask((15.0, 16.0, 15.0)), fixed, model="rigid", preset="brain")
    path = plot_registration(result, fixed, tmp_path / "figures" / "ball.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="one entry per vertex"):
        plot_surface(fixed, np.zeros(3))


def test_progress_is_reported_and_cancel_stops_within_one_iteration():
    fixed = mask_to_mesh(_ball_mask((17.0, 15.0, 16.0)))
    moving = mask_to_mesh(_ball_mask((15.0, 16.0, 15.0)))
    seen = []
    with pytest.raises(RegistrationCancelled, match="cancelled"):
        register(moving, fixed, model="affine", preset="brain",
                 progress=lambda stage, iteration, value: seen.append((stage, iteration, value)),
                 cancel=lambda: len(seen) >= 3)
    assert len(seen) == 3 and all(np.isfinite(value) for _, _, value in seen)


def test_bad_inputs_are_refused_clearly():
    mesh = mask_to_mesh(_ball_mask((16.0, 16.0, 16.0)))
    with pytest.raises(ValueError, match="model must be one of"):
        register(mesh, mesh, model="elastic")
    with pytest.raises(ValueError, match="preset must be one of"):
        register(mesh, mesh, preset="lung")
    with pytest.raises(TypeError, match="moving must be a Mesh"):
        register(np.zeros((10, 3)), mesh)
    flat = Measure.from_points(torch.rand(20, 2), torch.ones(20))
    with pytest.raises(ValueError, match="same dimension"):
        register(flat, Measure.from_mesh(mesh))
    with pytest.raises(ValueError, match="no triangles"):
        register(Mesh(np.zeros((3, 3)), np.zeros((0, 3), dtype=np.int64)), mesh)
    assert set(PRESETS) == {"brain", "knee", "heart"}


@pytest.mark.parametrize(("loss", "blur", "reach", "expected"), [
    ("sinkhorn", None, None, None),  # geomed.register's own default
    ("sinkhorn", 2.0, None, SinkhornLoss(blur=2.0, reach=10.0)),  # the brain preset's deformable reach
    ("sinkhorn", None, 5.0, SinkhornLoss(blur=1.0, reach=5.0)),  # its finest blur
    ("kernel", None, None, KernelLoss(kernel="gaussian", blur=1.0)),
    ("varifold", 3.0, None, VarifoldLoss(blur=3.0)),
])
def test_deformable_loss_choice_and_scales(loss, blur, reach, expected):
    """A loss by name (what the 3D Slicer module offers), its scales from the preset when unset."""
    chosen = deformable_loss(loss, "brain", blur, reach)
    assert chosen is None if expected is None else (type(chosen) is type(expected)
                                                    and chosen.options == expected.options)


def test_deformable_loss_errors_name_the_option():
    hippocampus = mask_to_mesh(datasets.brain_labels("9861"), "left_hippocampus")
    with pytest.raises(ValueError, match="loss must be one of"):
        deformable_loss("dice", "brain", None, None)
    with pytest.raises(ValueError, match="reach is an option of the Sinkhorn loss, not of the varifold loss"):
        deformable_loss("varifold", "brain", None, 5.0)
    sized = deformable_loss("kernel", None, None, None, hippocampus)  # scaled to the shape without a preset
    assert sized.options["blur"] == pytest.approx(np.linalg.norm(np.ptp(hippocampus.vertices, axis=0)) / 60)
