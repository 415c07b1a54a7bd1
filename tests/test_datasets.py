"""The shipped demo anatomy: loaders, names, size, and fidelity to the full data set it was cut from."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from geomed import Image, Measure, Mesh, datasets, read_image, read_mesh

SUBCORTICAL = [*range(35, 42), *range(76, 83)]


def test_available_lists_every_loader_argument():
    assert datasets.available() == {
        "brain_labels": ["9861", "10021", "12876", "14380", "15496", "15697"],
        "knee_labels": ["A", "B", "C"],
        "femur": [1, 2, 3, 4, 5],
        "heart_myocardium": ["lv", "rv", "septum"],
    }


@pytest.mark.parametrize("donor", datasets.BRAIN_DONORS)
def test_brain_labels(donor):
    brain = datasets.brain_labels(int(donor))
    assert isinstance(brain, Image)
    assert sorted(int(v) for v in np.unique(brain.array) if v) == SUBCORTICAL
    assert brain.label_names[40] == "left_hippocampus" and brain.label_names[81] == "right_hippocampus"
    np.testing.assert_allclose(brain.spacing, 1.0)


@pytest.mark.parametrize("name", ["A", "b", "C"])
def test_knee_labels(name):
    knee = datasets.knee_labels(name)
    assert knee.label_names[1] == "femoral_cartilage" and knee.label_names[6] == "tibia"
    assert not np.allclose(np.abs(knee.direction), np.eye(3), atol=1e-3), "the knee maps are oblique"
    assert (8 in knee.label_names) == (name.upper() == "B")


@pytest.mark.parametrize("index", datasets.FEMURS)
def test_femur(index):
    femur = datasets.femur(str(index))
    assert isinstance(femur, Mesh) and 19_000 < femur.n_vertices < 21_000
    assert {"thickness (mm)", "Cartilage Region"} <= set(femur.point_data)


@pytest.mark.parametrize("part, millilitres", [("lv", 125.8), ("rv", 62.1), ("septum", 38.3)])
def test_heart_myocardium_volume_matches_source(part, millilitres):
    from geomed.morphometry import volume

    heart = datasets.heart_myocardium(part.upper())
    assert heart.is_closed
    assert volume(heart) / 1000 == pytest.approx(millilitres, abs=0.05)
    assert {"apico-basal", "transmural", "rotational"} <= set(heart.point_data)
    assert {"fiber", "sheet"} <= set(heart.cell_data)


def test_mni_hippocampi():
    t1, labels = datasets.mni_hippocampi()
    assert t1.shape == labels.shape == (92, 53, 52)
    assert t1.array.dtype == labels.array.dtype == np.uint8
    np.testing.assert_array_equal(t1.affine, labels.affine)
    np.testing.assert_allclose(t1.spacing, 1.0)
    assert dict(labels.label_names) == {40: "left_hippocampus", 81: "right_hippocampus"}
    assert sorted(np.unique(labels.array).tolist()) == [0, 40, 81]
    hippocampi = Measure.from_labels(labels, ["left_hippocampus", "right_hippocampus"])
    for name, side in (("left_hippocampus", -1), ("right_hippocampus", 1)):
        assert 6.0 < float(hippocampi[name].total_mass) / 1000 < 7.5
        assert side * float(hippocampi[name].points[:, 0].mean()) > 20, "RAS: left is x < 0"
    assert t1.array.max() > 200 and np.unique(t1.array).size > 100
    assert "Copyright (C) 1993–2009 Louis Collins" in datasets.attribution(), "the MNI licence needs its notice"


def _components(mask: np.ndarray) -> int:
    """Number of face-connected (6-connected) components of a boolean volume."""
    components = sitk.ConnectedComponentImageFilter()  # fully_connected off: faces only
    components.Execute(sitk.GetImageFromArray(mask.astype(np.uint8)))
    return components.GetObjectCount()


def test_mni_lateral_ventricles():
    ventricles = datasets.mni_lateral_ventricles()
    assert isinstance(ventricles, Image) and ventricles.array.dtype == np.uint8
    assert dict(ventricles.label_names) == {1: "left_lateral_ventricle", 2: "right_lateral_ventricle"}
    assert sorted(np.unique(ventricles.array).tolist()) == [0, 1, 2]
    voxel = abs(np.linalg.det(ventricles.affine[:3, :3]))
    centroid = {}
    for label, side in ((1, -1), (2, 1)):
        mask = ventricles.array == label
        assert _components(mask) == 1, f"label {label} is one connected component"
        assert 3.0 < mask.sum() * voxel / 1000 < 12.0, "a lateral ventricle holds a few mL"
        world = ventricles.index_to_world(np.argwhere(mask))
        assert (side * world[:, 0] > 0).all(), "RAS: the left ventricle lies at x < 0, the right at x > 0"
        centroid[label] = world.mean(axis=0)
    assert abs(-centroid[1][0] - centroid[2][0]) < 5.0, "the two ventricles mirror each other"
    assert "Copyright (C) 1993–2009 Louis Collins" in datasets.attribution(), "the MNI licence needs its notice"


@pytest.mark.parametrize(
    "loader, argument, match",
    [
        (datasets.brain_labels, "12345", "unknown brain donor '12345'; available: 9861, 10021"),
        (datasets.knee_labels, "D", "unknown knee 'D'; available: A, B, C"),
        (datasets.femur, 6, "unknown femur 6; available: 1, 2, 3, 4, 5"),
        (datasets.femur, "left", "unknown femur 'left'"),
        (datasets.heart_myocardium, "atrium", "unknown heart part 'atrium'; available: lv, rv, septum"),
    ],
)
def test_unknown_names(loader, argument, match):
    with pytest.raises(ValueError, match=match):
        loader(argument)


def test_attribution_and_size():
    text = datasets.attribution()
    for needle in ("CC BY 4.0", "MIT", "Arnatkevičiūtė", "Rodero", "Gatti"):
        assert needle in text
    root = Path(str(resources.files("geomed") / "data"))
    size = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    assert size < 10 * 2**20


def test_brain_donor_table():
    donors = datasets.brain_donors()
    assert [row["uid"] for row in donors] == list(datasets.BRAIN_DONORS)


# ---------------------------------------------------------------------------------- against the full data set
@pytest.mark.parametrize("donor", datasets.BRAIN_DONORS)
def test_brain_crop_keeps_subcortical_structures_in_place(shared_data, donor):
    full = read_image(shared_data / "brain" / "native_dk" / donor / "atlas-desikankilliany.nii.gz")
    cropped = datasets.brain_labels(donor)
    ours = Measure.from_labels(cropped, SUBCORTICAL)
    theirs = Measure.from_labels(full, SUBCORTICAL)
    for label in SUBCORTICAL:
        a = ours[label].points.double().numpy()
        b = theirs[label].points.double().numpy()
        assert len(a) == len(b)
        np.testing.assert_allclose(a[np.lexsort(a.T)], b[np.lexsort(b.T)], atol=1e-4)


@pytest.mark.parametrize("name", datasets.KNEES)
def test_knee_maps_are_the_originals(shared_data, name):
    full = read_image(shared_data / "knee" / "labelmaps" / f"knee_{name}.nii.gz")
    ours = datasets.knee_labels(name)
    np.testing.assert_array_equal(ours.array, full.array)
    np.testing.assert_allclose(ours.affine, full.affine, atol=1e-9)


@pytest.mark.parametrize(
    "loader, argument, source",
    [
        *[(datasets.femur, i, f"knee/femur_meshes/femur_{i}.vtp") for i in datasets.FEMURS],
        *[(datasets.heart_myocardium, p, f"heart/rodero01_{p}_myocardium.vtp") for p in datasets.HEART_PARTS],
    ],
)
def test_meshes_are_the_originals(shared_data, loader, argument, source):
    full = read_mesh(shared_data / source)
    ours = loader(argument)
    np.testing.assert_array_equal(ours.vertices, full.vertices)
    np.testing.assert_array_equal(ours.triangles, full.triangles)
    for name, values in ours.point_data.items():
        np.testing.assert_array_equal(values, full.point_data[name])


def test_mni_hippocampi_crop_is_the_original(shared_data):
    t1, labels = datasets.mni_hippocampi()
    full_t1 = read_image(shared_data / "brain" / "mni152_2009a" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    atlas = read_image(shared_data / "brain" / "mni_dk_atlas.nii.gz")
    index = np.indices(t1.shape).reshape(3, -1).T
    world = t1.index_to_world(index)
    in_t1 = np.rint(full_t1.world_to_index(world)).astype(int)
    in_atlas = np.rint(atlas.world_to_index(world)).astype(int)
    for full, inside in ((full_t1, in_t1), (atlas, in_atlas)):
        assert (inside >= 0).all() and (inside < full.shape).all(), "the crop lies inside the original grid"
        np.testing.assert_allclose(full.index_to_world(inside), world, atol=1e-6)
    np.testing.assert_array_equal(t1.array[tuple(index.T)], full_t1.array[tuple(in_t1.T)])
    original = atlas.array[tuple(in_atlas.T)]
    np.testing.assert_array_equal(labels.array[tuple(index.T)], np.where(np.isin(original, [40, 81]), original, 0))
    for label in (40, 81):
        assert (labels.array == label).sum() == (atlas.array == label).sum(), "the crop holds the whole hippocampus"


def test_mni_ventricles_are_template_csf(shared_data):
    ventricles = datasets.mni_lateral_ventricles()
    folder = shared_data / "brain" / "mni152_2009a"
    t1, gm, wm = (read_image(folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz") for k in ("t1", "gm", "wm"))
    index = np.argwhere(ventricles.array > 0)
    world = ventricles.index_to_world(index)
    inside = np.rint(t1.world_to_index(world)).astype(int)
    assert (inside >= 0).all() and (inside < t1.shape).all(), "the crop lies inside the template grid"
    np.testing.assert_allclose(t1.index_to_world(inside), world, atol=1e-6)
    at = tuple(inside.T)
    tissue = gm.array[at].astype(int) + wm.array[at]
    csf = (tissue < 0.2 * 255) & (t1.array[at] < 120)
    assert csf.mean() > 0.99, "only the filled holes may be other than dark, tissue-free voxels"
    assert (tissue < 0.5 * 255).all()
