"""read_image / write_image on real anatomy: world geometry against SimpleITK, round trips, bad input, atomic writes.

All images are real label maps from ``geomed.datasets`` (oblique, anisotropic knee MRI segmentations and a brain
label map), cropped where a round trip does not need the whole volume.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from geomed import Image, datasets, read_image, write_image

KNEES = ("A", "B", "C")
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def bundled(*parts: str) -> Path:
    return Path(str(resources.files("geomed").joinpath("data", *parts)))


def esc(path: Path) -> str:
    return re.escape(str(path))


def knee_file(name: str) -> Path:
    return bundled("knee", f"knee_{name}.nii.gz")


@pytest.fixture(scope="module")
def knee_a() -> Image:
    return datasets.knee_labels("A")


def _around_labels(image: Image, half: tuple[int, int, int]) -> Image:
    """A crop centred on the labelled voxels (so that it holds several labels and background)."""
    centre = np.argwhere(image.array > 0).mean(axis=0).astype(int)
    lower = np.maximum(centre - half, 0)
    upper = np.minimum(centre + half, image.shape)
    return image.crop(tuple(lower), tuple(upper))


def _left_handed(image: Image) -> Image:
    """The same physical image stored with the k axis reversed (a left-handed voxel grid, det < 0)."""
    affine = image.affine.copy()
    affine[:3, 3] = image.index_to_world([[0, 0, image.shape[2] - 1]])[0]
    affine[:3, 2] *= -1
    return Image(image.array[:, :, ::-1], affine)


@pytest.fixture(scope="module")
def images(knee_a) -> dict[str, Image]:
    """Real label maps for round trips, keyed by the ids used in parametrize."""
    knee_crop = _around_labels(knee_a, (20, 24, 10))
    brain = datasets.brain_labels("9861")
    signed = knee_crop.array.astype(np.int16) * -300 + 7  # negative and positive values, int16
    return {
        "knee_A_oblique_crop": knee_crop,
        "knee_A_left_handed_crop": _left_handed(knee_crop),
        "knee_C_oblique_crop": _around_labels(datasets.knee_labels("C"), (12, 14, 16)),
        "brain_9861": brain,
        "knee_A_int16_signed": knee_crop.with_array(signed),
        "knee_A_float32": knee_crop.with_array(knee_crop.array.astype(np.float32) * 0.25 - 0.125),
    }


# ------------------------------------------------------------------------------------------- voxel -> world
def _corner_indices(size) -> np.ndarray:
    return np.array(list(itertools.product(*[(0, n - 1) for n in size])), dtype=int)


@pytest.mark.parametrize("name", KNEES)
def test_index_to_world_agrees_with_simpleitk(name):
    path = knee_file(name)
    reference = sitk.ReadImage(str(path))
    image = read_image(path)
    size = reference.GetSize()
    assert image.shape == tuple(size)
    rng = np.random.default_rng(sum(map(ord, name)))
    indices = np.concatenate([_corner_indices(size), rng.integers(0, size, size=(60, 3))])

    expected = np.array([reference.TransformIndexToPhysicalPoint([int(v) for v in ijk]) for ijk in indices])
    np.testing.assert_allclose(image.index_to_world(indices), expected * LPS_TO_RAS, rtol=0, atol=1e-6)

    # continuous indices, including outside the grid
    continuous = rng.uniform(-5.0, np.asarray(size) + 5.0, size=(40, 3))
    expected = np.array([reference.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in continuous])
    np.testing.assert_allclose(image.index_to_world(continuous), expected * LPS_TO_RAS, rtol=0, atol=1e-6)

    # and back: world_to_index agrees with SimpleITK's physical -> continuous index
    points_lps = expected
    back = np.array([reference.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points_lps])
    np.testing.assert_allclose(image.world_to_index(points_lps * LPS_TO_RAS), back, rtol=0, atol=1e-6)

    # the array is indexed [i, j, k] like SimpleITK's GetPixel(i, j, k)
    for ijk in indices[:20]:
        assert image.array[tuple(ijk)] == reference.GetPixel(*[int(v) for v in ijk])


@pytest.mark.parametrize("name", KNEES)
def test_knee_maps_are_oblique_and_anisotropic(name):
    """Guards the premise of the geometry tests: an axis-aligned isotropic map would hide LPS/RAS mistakes."""
    image = read_image(knee_file(name))
    off_axis = np.abs(image.direction) - np.round(np.abs(image.direction))
    assert np.abs(off_axis).max() > 0.05
    np.testing.assert_allclose(image.direction.T @ image.direction, np.eye(3), atol=1e-6)
    if name != "C":
        assert image.spacing.max() / image.spacing.min() > 1.5


# ------------------------------------------------------------------------------------------- round trips
FILE_FORMATS = (".nii", ".nii.gz", ".nrrd", ".mha")
# NIfTI headers hold the affine in float32 (an origin of 65 mm is stored to ~4e-6 mm): allow float32 rounding
# there on top of 1e-6 mm; NRRD and MetaImage write the geometry as decimal text with full double precision.
AFFINE_RTOL = {".nii": 2e-7, ".nii.gz": 2e-7, ".nrrd": 0.0, ".mha": 0.0}
ROUND_TRIP_IMAGES = (
    "knee_A_oblique_crop",
    "knee_A_left_handed_crop",
    "knee_C_oblique_crop",
    "brain_9861",
    "knee_A_int16_signed",
    "knee_A_float32",
)


@pytest.mark.parametrize("suffix", FILE_FORMATS)
@pytest.mark.parametrize("key", ROUND_TRIP_IMAGES)
def test_round_trip_file(images, tmp_path, key, suffix):
    original = images[key]
    path = tmp_path / f"image{suffix}"
    write_image(original, path)
    back = read_image(path)
    assert back.array.dtype == original.array.dtype
    np.testing.assert_array_equal(back.array, original.array)
    np.testing.assert_allclose(back.affine, original.affine, rtol=AFFINE_RTOL[suffix], atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == [path.name]


def _assert_same_voxels_in_world(back: Image, original: Image, atol: float) -> None:
    """Same labelled voxels at the same world positions, whatever order the reader put the slices in."""
    assert sorted(back.shape) == sorted(original.shape)
    corners = original.world_to_index(back.index_to_world(_corner_indices(back.shape)))
    np.testing.assert_allclose(corners, np.round(corners), atol=atol)
    assert sorted(map(tuple, np.round(corners).astype(int))) == sorted(map(tuple, _corner_indices(original.shape)))

    where = np.argwhere(back.array != 0)
    assert len(where) == np.count_nonzero(original.array)
    at = original.world_to_index(back.index_to_world(where))
    np.testing.assert_allclose(at, np.round(at), atol=atol)
    at = np.round(at).astype(int)
    assert sorted(map(tuple, at)) == sorted(map(tuple, np.argwhere(original.array != 0)))
    np.testing.assert_array_equal(back.array[tuple(where.T)], original.array[tuple(at.T)])


@pytest.mark.parametrize(
    "key",
    ("knee_A_oblique_crop", "knee_A_left_handed_crop", "knee_C_oblique_crop", "brain_9861", "knee_A_int16_signed"),
)
def test_round_trip_dicom_series(images, tmp_path, key):
    original = images[key]
    folder = tmp_path / "series"
    write_image(original, folder)
    assert folder.is_dir()
    assert len(list(folder.glob("*.dcm"))) == original.shape[2]
    back = read_image(folder)
    assert np.issubdtype(back.array.dtype, np.integer)
    _assert_same_voxels_in_world(back, original, atol=1e-5)
    np.testing.assert_allclose(np.sort(back.spacing), np.sort(original.spacing), rtol=0, atol=1e-5)
    if np.linalg.det(original.affine[:3, :3]) > 0:  # right-handed grids come back slice for slice
        np.testing.assert_array_equal(back.array, original.array)
        np.testing.assert_allclose(back.affine, original.affine, rtol=0, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["series"]


@pytest.mark.parametrize("suffix", (".nii.gz", ".nrrd", ".mha"))
def test_round_trip_vector_image(images, tmp_path, suffix):
    crop = images["knee_A_oblique_crop"]
    labels = crop.array.astype(np.float32)
    vector = crop.with_array(np.stack([labels, -labels, labels * 0.5 + 1.0], axis=-1))
    path = tmp_path / f"vector{suffix}"
    write_image(vector, path)
    back = read_image(path)
    assert back.array.shape == vector.array.shape
    np.testing.assert_array_equal(back.array, vector.array)
    np.testing.assert_allclose(back.affine, vector.affine, rtol=AFFINE_RTOL[suffix], atol=1e-6)


def test_bool_image_is_written_as_uint8(images, tmp_path):
    crop = images["knee_A_oblique_crop"]
    write_image(crop.with_array(crop.array == 5), tmp_path / "mask.nii.gz")
    back = read_image(tmp_path / "mask.nii.gz")
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, (crop.array == 5).astype(np.uint8))


def test_dicom_overwrite_replaces_the_folder(images, tmp_path):
    folder = tmp_path / "series"
    write_image(images["brain_9861"], folder)
    crop = images["knee_A_oblique_crop"]
    write_image(crop, folder)
    back = read_image(folder)
    np.testing.assert_array_equal(back.array, crop.array)
    assert len(list(folder.iterdir())) == crop.shape[2]
    assert sorted(os.listdir(tmp_path)) == ["series"]


@pytest.mark.parametrize("suffix", (".nii.gz", ".nrrd", ".mha", ".nii"))
def test_2d_image_is_read_as_one_slice(tmp_path, suffix):
    brain = datasets.brain_labels("9861")
    plane = brain.array[:, :, 40].astype(np.int16)  # [i, j] of a real slice
    two_d = sitk.GetImageFromArray(plane.T)  # SimpleITK arrays are [j, i]
    two_d.SetSpacing((0.5, 0.8))
    two_d.SetOrigin((12.25, -7.5))
    angle = np.deg2rad(30.0)
    two_d.SetDirection((np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)))
    path = tmp_path / f"slice{suffix}"
    sitk.WriteImage(two_d, str(path))
    reference = sitk.ReadImage(str(path))
    assert reference.GetDimension() == 2

    image = read_image(path)
    assert image.shape == (*plane.shape, 1)
    np.testing.assert_array_equal(image.array[:, :, 0], plane)
    indices = [(0, 0), (plane.shape[0] - 1, plane.shape[1] - 1), (plane.shape[0] - 1, 0), (17, 23)]
    expected = np.array([(*reference.TransformIndexToPhysicalPoint(ij), 0.0) for ij in indices]) * LPS_TO_RAS
    np.testing.assert_allclose(image.index_to_world([(*ij, 0) for ij in indices]), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.spacing[:2], [0.5, 0.8], atol=1e-6)


# ------------------------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "knee.nii.gz"
    with pytest.raises(FileNotFoundError, match=f"{esc(path)}: no such file or folder"):
        read_image(path)


@pytest.mark.parametrize("name", ("empty.nii.gz", "empty.nii", "empty.nrrd", "empty.mha"))
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.touch()
    with pytest.raises(ValueError, match=f"{esc(path)}: the file is empty"):
        read_image(path)


def test_truncated_bundled_nii_gz(tmp_path):
    data = knee_file("A").read_bytes()
    path = tmp_path / "knee_A.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{esc(path)}: could not read the image \(.*truncated"):
        read_image(path)


@pytest.mark.parametrize("suffix", FILE_FORMATS)
@pytest.mark.parametrize("keep", (0.5, 0.9))
def test_truncated_file(images, tmp_path, suffix, keep):
    """SimpleITK reads some truncated files without complaint (zero-filling the rest): read_image must refuse."""
    full = tmp_path / f"full{suffix}"
    write_image(images["brain_9861"], full)
    data = full.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=f"{esc(path)}: could not read the image"):
        read_image(path)


@pytest.mark.parametrize("name", ("notes.nii.gz", "notes.nii", "notes.nrrd", "notes.mha"))
def test_text_file_with_image_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("patient 12, left knee, cartilage labels 1-4\n" * 20)
    with pytest.raises(ValueError, match=f"{esc(path)}: could not read the image"):
        read_image(path)


@pytest.mark.parametrize("name", ("knee.png", "knee.jpg", "knee.txt", "knee.nii.bz2"))
def test_unknown_write_extension(images, tmp_path, name):
    path = tmp_path / name
    with pytest.raises(ValueError, match=rf"{esc(path)}: unknown image format '\.\w+'"):
        write_image(images["knee_A_oblique_crop"], path)
    assert os.listdir(tmp_path) == []


def test_mhd_is_refused(images, tmp_path):
    path = tmp_path / "knee.mhd"
    with pytest.raises(ValueError, match=f"{esc(path)}: .mhd .* atomically; use .mha"):
        write_image(images["knee_A_oblique_crop"], path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("target", ("knee.nii.gz", "knee.nrrd", "knee.mha", "series"))
def test_sheared_affine_is_refused(images, tmp_path, target):
    crop = images["knee_A_oblique_crop"]
    shear = np.eye(4)
    shear[0, 1] = 0.2
    path = tmp_path / target
    with pytest.raises(ValueError, match=f"{esc(path)}: .*sheared"):
        write_image(Image(crop.array, crop.affine @ shear), path)
    assert os.listdir(tmp_path) == []


def test_write_image_refuses_non_images(tmp_path):
    with pytest.raises(TypeError, match="image must be a geomed.Image, got ndarray"):
        write_image(np.zeros((3, 3, 3)), tmp_path / "x.nii.gz")


@pytest.mark.parametrize("dtype", (np.float32, np.float64))
def test_dicom_refuses_float_voxels(images, tmp_path, dtype):
    crop = images["knee_A_oblique_crop"]
    path = tmp_path / "series"
    message = f"{esc(path)}: DICOM series are written for integer voxels only, got float"
    with pytest.raises(ValueError, match=message):
        write_image(crop.with_array(crop.array.astype(dtype)), path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "low, high", ((0, 70000), (-40000, 0), (-1, 65535), (0, 2**40)), ids=("over_uint16", "under_int16", "span", "int64")
)
def test_dicom_refuses_values_beyond_16_bits(images, tmp_path, low, high):
    crop = images["knee_A_oblique_crop"]
    array = np.where(crop.array > 0, high, low).astype(np.int64)
    path = tmp_path / "series"
    message = rf"{esc(path)}: voxel values {low}\.\.{high} do not fit 16-bit DICOM pixels"
    with pytest.raises(ValueError, match=message):
        write_image(crop.with_array(array), path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("low, high", ((0, 65535), (-32768, 32767)), ids=("uint16", "int16"))
def test_dicom_accepts_the_16_bit_limits(images, tmp_path, low, high):
    crop = images["knee_A_oblique_crop"]
    array = np.where(crop.array > 0, high, low).astype(np.int32)
    write_image(crop.with_array(array), tmp_path / "series")
    np.testing.assert_array_equal(read_image(tmp_path / "series").array, array)


@pytest.fixture
def two_series_folder(images, tmp_path) -> tuple[Path, dict[str, Image]]:
    """One folder holding two DICOM series (knee crop and brain), each series written by write_image."""
    written = {}
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for key in ("knee_A_oblique_crop", "brain_9861"):
        folder = tmp_path / key
        write_image(images[key], folder)
        (series_id,) = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        written[series_id] = images[key]
        for file in folder.iterdir():
            shutil.copy(file, mixed / f"{key}_{file.name}")  # same slice names in both series: prefix them
    return mixed, written


def test_two_series_need_a_series_id(two_series_folder):
    folder, written = two_series_folder
    message = rf"{esc(folder)}: the folder holds 2 DICOM series .*pick one with series_id="
    with pytest.raises(ValueError, match=message):
        read_image(folder)
    for series_id, original in written.items():
        back = read_image(folder, series_id=series_id)
        np.testing.assert_array_equal(back.array, original.array)
        np.testing.assert_allclose(back.affine, original.affine, rtol=0, atol=1e-5)


def test_unknown_series_id(two_series_folder):
    folder, written = two_series_folder
    with pytest.raises(ValueError, match=rf"{esc(folder)}: no DICOM series '1\.2\.3\.4'; found \["):
        read_image(folder, series_id="1.2.3.4")


@pytest.mark.parametrize("content", ("empty", "text", "nifti"))
def test_folder_without_dicom(images, tmp_path, content):
    folder = tmp_path / "folder"
    folder.mkdir()
    if content == "text":
        (folder / "README.txt").write_text("no images here\n")
    elif content == "nifti":
        write_image(images["knee_A_oblique_crop"], folder / "knee.nii.gz")
    with pytest.raises(ValueError, match=f"{esc(folder)}: the folder holds no DICOM series"):
        read_image(folder)


# ------------------------------------------------------------------------------------------- atomic writes
def _failing_writes(images) -> dict[str, tuple[Image, str]]:
    crop = images["knee_A_oblique_crop"]
    return {
        # NIfTI-1 cannot hold an axis longer than 32767: SimpleITK fails while writing the temporary file
        "nifti_too_long": (Image(np.zeros((40000, 2, 1), np.uint8), np.eye(4)), "Dimension"),
        "float_dicom": (crop.with_array(crop.array.astype(np.float32)), "integer voxels only"),
        "wide_dicom": (crop.with_array(crop.array.astype(np.int64) * 100000), "do not fit 16-bit"),
    }


@pytest.mark.parametrize(
    "target, failure",
    (
        ("knee.nii", "nifti_too_long"),
        ("knee.nii.gz", "nifti_too_long"),
        ("series", "float_dicom"),
        ("series", "wide_dicom"),
    ),
)
@pytest.mark.parametrize("existing", (False, True), ids=("new", "over_existing"))
def test_failed_write_is_atomic(images, tmp_path, target, failure, existing):
    """A failed write leaves no partial file or folder, and an existing target untouched."""
    path = tmp_path / target
    previous = images["brain_9861"]
    if existing:
        write_image(previous, path)
    before = sorted(os.listdir(tmp_path))
    contents = sorted(p.name for p in path.iterdir()) if path.is_dir() else None

    image, message = _failing_writes(images)[failure]
    with pytest.raises(ValueError, match=f"{esc(path)}: .*{message}"):
        write_image(image, path)

    assert sorted(os.listdir(tmp_path)) == before  # no .partial leftovers
    if existing:
        if contents is not None:
            assert sorted(p.name for p in path.iterdir()) == contents
        back = read_image(path)
        np.testing.assert_array_equal(back.array, previous.array)
        np.testing.assert_allclose(back.affine, previous.affine, rtol=0, atol=1e-5)
    else:
        assert not path.exists()


def test_write_into_missing_folder(images, tmp_path):
    path = tmp_path / "missing" / "knee.nii.gz"
    with pytest.raises(FileNotFoundError, match=f"{esc(path)}: the folder {esc(path.parent)} does not exist"):
        write_image(images["knee_A_oblique_crop"], path)
    assert os.listdir(tmp_path) == []


def test_dicom_io_leaves_the_process_locale_alone(tmp_path):
    import locale

    before = locale.setlocale(locale.LC_ALL)
    knee = datasets.knee_labels("A").crop((0, 0, 0), (12, 10, 4))
    write_image(knee, tmp_path / "series")
    read_image(tmp_path / "series")
    assert locale.setlocale(locale.LC_ALL) == before
