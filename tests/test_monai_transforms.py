"""MONAI transforms of monai_losses on real anatomy, checked against SimpleITK, MONAI's loaders and mesh geometry.

The label maps are real: a crop of knee "A" (oblique affine, 0.36 × 0.36 × 0.7 mm voxels) written to disk with
``geomed.write_image``, and the shipped brain label map of donor 9861 (left hippocampus = 40); they are loaded
with MONAI's own ``LoadImaged``. The meshes are a distal femur and the heart's left-ventricle myocardium.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, CopyItemsd, LoadImaged

from geomed import Measure, Mesh, datasets, write_image, write_mesh
from monai_losses.transforms import (LoadMesh, LoadMeshd, MaskToMeasure, MaskToMeasured, MaskToMesh, MaskToMeshd,
                                     MeshToMeasure, MeshToMeasured)

BRAIN_FILE = Path(str(resources.files("geomed").joinpath("data", "brain", "9861.nii.gz")))
HIPPOCAMPUS = 40
TIBIAL_CARTILAGE = 2  # medial tibial cartilage of knee A: a thin sheet, 21638 voxels
KNEE_CROP = ((130, 225, 20), (266, 274, 70))  # around it, with parts of the femoral cartilage (1), femur and tibia
FLIP = np.array([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def knee_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("knee") / "knee_A_crop.nii.gz"
    write_image(datasets.knee_labels("A").crop(*KNEE_CROP), path)
    return path


@pytest.fixture(scope="module")
def knee(knee_file) -> dict:
    return LoadImaged(keys="label", ensure_channel_first=True)({"label": str(knee_file)})


@pytest.fixture(scope="module")
def brain() -> MetaTensor:
    return LoadImaged(keys="label", ensure_channel_first=True)({"label": str(BRAIN_FILE)})["label"]


@pytest.fixture(scope="module")
def femur() -> Mesh:
    return datasets.femur(1)


def _sitk_label_voxels(path: Path, label: int) -> tuple[np.ndarray, sitk.Image]:
    """Indices (i, j, k) of the voxels holding ``label``, read by SimpleITK (whose arrays are [k, j, i])."""
    image = sitk.ReadImage(str(path))
    return np.argwhere(sitk.GetArrayViewFromImage(image) == label)[:, ::-1], image


def _voxel_indices(measure: Measure) -> np.ndarray:
    return np.stack(np.unravel_index(measure.grid.index.numpy(), measure.grid.shape), axis=1)


def _enclosed_volume(mesh: Mesh) -> float:
    a, b, c = (mesh.vertices[mesh.triangles[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0)


# ---------------------------------------------------------------------------------------------------- MaskToMeasure
@pytest.mark.parametrize("label", [TIBIAL_CARTILAGE, 1])
def test_mask_to_measured_matches_simpleitk_on_oblique_knee(knee_file, knee, label):
    out = MaskToMeasured(keys="label", label=label, dtype=torch.float64)(knee)
    measure = out["label"]
    voxels, image = _sitk_label_voxels(knee_file, label)
    index = _voxel_indices(measure)
    # the same voxels as SimpleITK sees ...
    assert len(index) == len(voxels)
    np.testing.assert_array_equal(np.sort(np.ravel_multi_index(index.T, measure.grid.shape)),
                                  np.sort(np.ravel_multi_index(voxels.T, measure.grid.shape)))
    # ... each at SimpleITK's physical point of its index, LPS -> RAS (to the float32 precision of the NIfTI sform)
    expected = np.array([image.TransformIndexToPhysicalPoint(tuple(map(int, ijk))) for ijk in index]) * FLIP
    np.testing.assert_allclose(measure.points.numpy(), expected, rtol=0, atol=1e-4)
    assert float(measure.total_mass) == pytest.approx(len(voxels) * np.prod(image.GetSpacing()), rel=1e-6)
    assert np.prod(image.GetSpacing()) == pytest.approx(0.3646 * 0.3646 * 0.7, rel=1e-3)
    # the source's metadata is kept beside the measure
    meta = out["label_meta_dict"]
    assert meta["filename_or_obj"] == str(knee_file)
    np.testing.assert_allclose(meta["affine"], knee["label"].affine)


def test_lps_metatensor_gives_the_same_measure_as_ras(knee_file, knee):
    """A MetaTensor whose affine is recorded in LPS (SimpleITK's frame) is converted to RAS."""
    image = sitk.ReadImage(str(knee_file))
    lps_affine = np.eye(4)
    lps_affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
    lps_affine[:3, 3] = image.GetOrigin()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)[None]
    lps = MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(lps_affine), meta={"space": "LPS"})
    transform = MaskToMeasure(label=TIBIAL_CARTILAGE, dtype=torch.float64)
    np.testing.assert_allclose(transform(lps).points, transform(knee["label"]).points, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["metatensor", "tensor", "numpy", "tensor_with_meta_dict"])
def test_input_types_agree(brain, kind):
    affine = brain.affine.numpy()
    data = {
        "metatensor": {"label": brain},
        "tensor": {"label": brain.as_tensor()},
        "numpy": {"label": brain.numpy()},
        "tensor_with_meta_dict": {"label": brain.as_tensor(), "label_meta_dict": {"affine": brain.affine}},
    }[kind]
    measure = MaskToMeasured(keys="label", label=HIPPOCAMPUS)(data)["label"]
    if kind in ("tensor", "numpy"):  # no geometry: identity affine (voxel indices), unless given explicitly
        np.testing.assert_array_equal(measure.points, _voxel_indices(measure))
        measure = MaskToMeasure(label=HIPPOCAMPUS)(data["label"], affine=affine)
    reference = Measure.from_labels(datasets.brain_labels("9861"), [HIPPOCAMPUS])[HIPPOCAMPUS]
    np.testing.assert_allclose(measure.points, reference.points, atol=1e-5)
    assert float(measure.total_mass) == 4925.0


def test_label_none_takes_masks_as_occupancy_and_label_maps_as_foreground(brain):
    labels = brain.as_tensor()
    assert float(MaskToMeasure()(brain).total_mass) == float((labels > 0).sum())
    soft = (labels == HIPPOCAMPUS).double() * 0.25
    soft.requires_grad_(True)
    measure = MaskToMeasure()(soft)  # a soft mask keeps its graph: weights are differentiable
    assert float(measure.total_mass.detach()) == pytest.approx(0.25 * 4925)
    measure.total_mass.backward()
    assert float(soft.grad.sum()) == pytest.approx(4925.0)


def test_two_dimensional_slice():
    mask = np.zeros((1, 6, 5), dtype=np.uint8)
    mask[0, 1:4, 2:5] = 1
    affine = np.array([[0.5, 0.0, 10.0], [0.0, 2.0, -3.0], [0.0, 0.0, 1.0]])
    measure = MaskToMeasure()(mask, affine=affine)
    assert measure.dim == 2
    assert float(measure.total_mass) == pytest.approx(9 * 0.5 * 2.0)  # mm²
    np.testing.assert_allclose(measure.points[0], [10.5, 1.0])


# ---------------------------------------------------------------------------------------------------- MaskToMesh
@pytest.mark.parametrize("iterations, volume_rtol, box_margin", [(0, 1e-4, 0.5 + 1e-5), (20, 0.03, 1.0)])
def test_mask_to_meshd_encloses_the_voxels_in_place(knee_file, knee, iterations, volume_rtol, box_margin):
    """Unsmoothed surface nets enclose exactly the voxels, up to their faces; smoothing moves the surface < 1 voxel."""
    out = MaskToMeshd(keys="label", label=TIBIAL_CARTILAGE, smoothing_iterations=iterations)(knee)
    mesh = out["label"]
    voxels, image = _sitk_label_voxels(knee_file, TIBIAL_CARTILAGE)
    assert mesh.is_closed
    assert _enclosed_volume(mesh) == pytest.approx(len(voxels) * np.prod(image.GetSpacing()), rel=volume_rtol)
    # every vertex lies within the cartilage's voxel bounding box (continuous indices from SimpleITK's geometry)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps_to_index = np.linalg.inv(direction * np.array(image.GetSpacing()))
    continuous = (mesh.vertices * FLIP - np.array(image.GetOrigin())) @ lps_to_index.T
    assert np.all(continuous >= voxels.min(0) - box_margin)
    assert np.all(continuous <= voxels.max(0) + box_margin)
    assert out["label_meta_dict"]["filename_or_obj"] == str(knee_file)


@pytest.mark.parametrize("method", ["surface_nets", "flying_edges"])
def test_mask_to_mesh_hippocampus_volume(brain, method):
    mesh = MaskToMesh(label=HIPPOCAMPUS, method=method)(brain)
    assert mesh.is_closed
    assert _enclosed_volume(mesh) == pytest.approx(4925.0, rel=0.03)  # 1 mm voxels


# ---------------------------------------------------------------------------------------------------- meshes
@pytest.mark.parametrize("suffix", [".vtp", ".ply", ".obj"])
@pytest.mark.parametrize("space", ["RAS", "LPS"])
def test_load_meshd_round_trip(tmp_path, femur, suffix, space):
    path = tmp_path / f"femur{suffix}"
    write_mesh(femur, path, space=space)
    out = LoadMeshd(keys="surface")({"surface": str(path)})
    np.testing.assert_allclose(out["surface"].vertices, femur.vertices, rtol=0, atol=1e-4)  # .ply stores float32
    np.testing.assert_array_equal(out["surface"].triangles, femur.triangles)
    assert out["surface_meta_dict"] == {"filename_or_obj": str(path), "space": "RAS"}
    # an explicit space overrides the file's record
    overridden = LoadMesh(space="LPS" if space == "RAS" else "RAS")(path)
    np.testing.assert_allclose(overridden.vertices, femur.vertices * FLIP, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["femur", "heart_lv"])
@pytest.mark.parametrize("lumped", [False, True])
def test_mesh_to_measure_weights_are_areas(femur, name, lumped):
    mesh = femur if name == "femur" else datasets.heart_myocardium("lv")
    measure = MeshToMeasure(lumped=lumped, dtype=torch.float64)(mesh)
    assert float(measure.total_mass) == pytest.approx(mesh.triangle_areas().sum(), rel=1e-12)
    np.testing.assert_allclose(measure.normals.norm(dim=1), 1.0, atol=1e-12)
    if not lumped:
        np.testing.assert_allclose(measure.points, mesh.triangle_centroids()[mesh.triangle_areas() > 0])


def test_mesh_pipeline_in_compose_keeps_the_file_metadata(tmp_path, femur):
    path = tmp_path / "femur.vtk"
    write_mesh(femur, path)
    out = Compose([LoadMeshd(keys="surface"), MeshToMeasured(keys="surface")])({"surface": str(path)})
    assert float(out["surface"].total_mass) == pytest.approx(femur.triangle_areas().sum(), rel=1e-5)
    assert out["surface_meta_dict"]["filename_or_obj"] == str(path)


# ---------------------------------------------------------------------------------------------------- dictionaries
def test_image_pipeline_in_compose():
    pipeline = Compose([
        LoadImaged(keys="label", ensure_channel_first=True),
        CopyItemsd(keys="label", names="surface"),
        MaskToMeasured(keys="label", label=HIPPOCAMPUS),
        MaskToMeshd(keys="surface", label=HIPPOCAMPUS, smoothing_iterations=0),
    ])
    out = pipeline({"label": str(BRAIN_FILE)})
    assert float(out["label"].total_mass) == 4925.0
    assert _enclosed_volume(out["surface"]) == pytest.approx(4925.0, rel=1e-9)  # unsmoothed: exactly the voxels
    for key in ("label", "surface"):
        assert out[f"{key}_meta_dict"]["filename_or_obj"] == str(BRAIN_FILE)
        assert out[f"{key}_meta_dict"]["space"] == "RAS"


def test_meta_keys_and_postfix(brain):
    out = MaskToMeasured(keys=["a", "b"], label=HIPPOCAMPUS, meta_keys=["a_info", None], meta_key_postfix="meta")(
        {"a": brain, "b": brain})
    assert set(out) == {"a", "b", "a_info", "b_meta"}


def test_bare_class_names_resolve_in_bundle_configs():
    """monai_losses is scanned by MONAI's component locator: the names must be unique among MONAI's own."""
    names = ["LoadMeshd", "MaskToMeasured", "MaskToMeshd", "MeshToMeasured"]
    parser = ConfigParser({name: {"_target_": name, "keys": "x"} for name in names})
    for name in names:
        assert type(parser.get_parsed_content(name)).__module__ == "monai_losses.transforms"


@pytest.mark.parametrize("transform", [
    LoadMeshd(keys=["surface", "other"], allow_missing_keys=True),
    MeshToMeasured(keys=["surface", "other"], allow_missing_keys=True),
    MaskToMeasured(keys=["label", "other"], allow_missing_keys=True),
    MaskToMeshd(keys=["label", "other"], allow_missing_keys=True),
])
def test_allow_missing_keys(transform):
    assert transform({"unrelated": 1}) == {"unrelated": 1}
    transform.allow_missing_keys = False
    with pytest.raises(KeyError, match="was missing in the data and allow_missing_keys==False"):
        transform({"unrelated": 1})


def test_load_meshd_refuses_to_overwrite_metadata(tmp_path, femur):
    path = tmp_path / "femur.vtp"
    write_mesh(femur, path)
    with pytest.raises(KeyError, match="surface_meta_dict already exists"):
        LoadMeshd(keys="surface")({"surface": str(path), "surface_meta_dict": {}})
    out = LoadMeshd(keys="surface", overwriting=True)({"surface": str(path), "surface_meta_dict": {}})
    assert out["surface_meta_dict"]["filename_or_obj"] == str(path)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("transform", [MaskToMeasure, MaskToMesh])
@pytest.mark.parametrize("label, img, match", [
    (None, torch.zeros(1, 5, 5, 5), "mask is empty"),
    (None, torch.ones(4, 5, 5, 5), r"one channel.*got shape \(4, 5, 5, 5\)"),
    (None, torch.linspace(-1.0, 2.5, 125).reshape(1, 5, 5, 5), r"mask \(values in \[0, 1\]\) or a label map"),
    (1, torch.full((1, 5, 5, 5), 0.5), "label=1 needs a label map.*not all integers"),
    (None, torch.full((1, 5, 5, 5), float("nan")), "NaN"),
])
def test_bad_masks(transform, label, img, match):
    with pytest.raises(ValueError, match=match):
        transform(label=label)(img)


@pytest.mark.parametrize("transform", [MaskToMeasure, MaskToMesh])
def test_unknown_label_lists_the_present_ones(brain, transform):
    with pytest.raises(ValueError, match=r"label 99 is absent from img; present labels: \[35, 36, .*, 82\]"):
        transform(label=99)(brain)


@pytest.mark.parametrize("label, error, match", [
    (0, ValueError, r"positive integer id \(0 is the background\) or None, got 0"),
    (-3, ValueError, "positive integer id"),
    (2.5, TypeError, "label must be an integer label id or None, got 2.5"),
    (True, TypeError, "integer label id"),
    ("left_hippocampus", TypeError, "integer label id"),
])
def test_label_must_be_a_positive_id(label, error, match):
    for transform in (MaskToMeasure, MaskToMesh):
        with pytest.raises(error, match=match):
            transform(label=label)


def test_mask_to_mesh_needs_3d():
    with pytest.raises(ValueError, match=r"3-D mask \(1, H, W, D\), got shape \(1, 5, 5\)"):
        MaskToMesh()(torch.ones(1, 5, 5))


def test_wrong_input_types(brain):
    with pytest.raises(TypeError, match="img must be a MetaTensor, tensor or numpy array, got list"):
        MaskToMeasure()([[[1]]])
    with pytest.raises(TypeError, match="mesh must be a geomed.Mesh, got MetaTensor"):
        MeshToMeasure()(brain)
    with pytest.raises(TypeError, match="filename must be a path to a mesh file, got int"):
        LoadMesh()(3)
    with pytest.raises(ValueError, match=r"affine of a 3-D mask must have shape \(4, 4\)"):
        MaskToMeasure()(brain.as_tensor(), affine=np.eye(3))


def test_missing_and_broken_mesh_files(tmp_path):
    missing = tmp_path / "missing.vtp"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        LoadMeshd(keys="surface")({"surface": str(missing)})
    broken = tmp_path / "broken.vtp"
    broken.write_text("<VTKFile type='PolyData'><PolyData><Piece NumberOfPoints='3'")
    with pytest.raises(ValueError, match=re.escape(str(broken)) + ".*broken or truncated"):
        LoadMesh()(broken)
    unknown = tmp_path / "surface.xyz"
    unknown.write_text("1 2 3\n")
    with pytest.raises(ValueError, match=re.escape(str(unknown)) + ": unknown mesh format"):
        LoadMesh()(unknown)
    with pytest.raises(ValueError, match="space must be 'RAS', 'LPS' or None"):
        LoadMesh(space="ras")
