"""read_mesh / write_mesh on real anatomy: round trips, LPS/RAS records, polygon triangulation, bad input, atomic
writes.

The meshes are real: the heart septum myocardium (point and cell arrays) and a distal femur with cartilage
thickness, both from ``geomed.datasets``; small hand-written legacy .vtk files cover what a real file from another
program may hold (Slicer's SPACE=LPS header, quads, pentagons, strips, volume cells, vertices only).
"""

from __future__ import annotations

import logging
import os
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from geomed import Mesh, datasets, read_mesh, write_mesh

MESH_FORMATS = (".vtk", ".vtp", ".stl", ".ply", ".obj", ".gii")
SPACE_RECORDING_FORMATS = (".vtk", ".vtp", ".stl", ".ply", ".obj")
ARRAY_FORMATS = (".vtk", ".vtp")
# corner coordinates after a round trip: vtk/vtp/obj keep doubles; stl, ply and gii store float32
CORNER_ATOL = {".vtk": 1e-12, ".vtp": 1e-12, ".obj": 1e-12, ".stl": 1e-4, ".ply": 1e-4, ".gii": 1e-4}
FLIP = np.array([-1.0, -1.0, 1.0])


def esc(path: Path) -> str:
    return re.escape(str(path))


@pytest.fixture(scope="module")
def septum() -> Mesh:
    return datasets.heart_myocardium("septum")


@pytest.fixture(scope="module")
def femur() -> Mesh:
    return datasets.femur(1)


@pytest.fixture(scope="module")
def septum_with_normals(septum) -> Mesh:
    return septum.with_point_data(Normals=septum.vertex_normals())


def _corners(mesh: Mesh) -> np.ndarray:
    return mesh.vertices[mesh.triangles]


def _assert_arrays_equal(actual, expected) -> None:
    assert set(actual) == set(expected)
    for name, values in expected.items():
        assert actual[name].shape == values.shape, name
        np.testing.assert_array_equal(actual[name], values, err_msg=name)


# ------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", MESH_FORMATS)
def test_round_trip_septum(septum, tmp_path, suffix):
    path = tmp_path / f"septum{suffix}"
    write_mesh(septum, path)
    back = read_mesh(path)
    assert back.n_triangles == septum.n_triangles
    np.testing.assert_allclose(_corners(back), _corners(septum), rtol=0, atol=CORNER_ATOL[suffix])
    if suffix in ARRAY_FORMATS:
        _assert_arrays_equal(back.point_data, septum.point_data)
        _assert_arrays_equal(back.cell_data, septum.cell_data)
        for name, values in {**septum.point_data, **septum.cell_data}.items():
            assert {**back.point_data, **back.cell_data}[name].dtype == values.dtype
    elif suffix == ".gii":
        assert set(back.point_data) == set(septum.point_data)
        for name, values in septum.point_data.items():
            np.testing.assert_allclose(back.point_data[name], values, rtol=1e-6, atol=1e-6, err_msg=name)
    assert os.listdir(tmp_path) == [path.name]  # nothing but the file: no temporaries left


@pytest.mark.parametrize("suffix", (".vtk", ".vtp", ".gii"))
def test_round_trip_femur_arrays_with_spaces_in_names(femur, tmp_path, suffix):
    """'thickness (mm)' and the integer 'Cartilage Region' survive (legacy .vtk escapes spaces in names)."""
    path = tmp_path / f"femur{suffix}"
    write_mesh(femur, path)
    back = read_mesh(path)
    np.testing.assert_allclose(_corners(back), _corners(femur), rtol=0, atol=CORNER_ATOL[suffix])
    assert set(back.point_data) == {"thickness (mm)", "Cartilage Region"}
    np.testing.assert_allclose(back.point_data["thickness (mm)"], femur.point_data["thickness (mm)"], atol=1e-6)
    np.testing.assert_array_equal(back.point_data["Cartilage Region"], femur.point_data["Cartilage Region"])
    if suffix in ARRAY_FORMATS:
        _assert_arrays_equal(back.point_data, femur.point_data)


@pytest.mark.parametrize("suffix", MESH_FORMATS)
def test_overwrite_replaces_the_file(septum, femur, tmp_path, suffix):
    path = tmp_path / f"mesh{suffix}"
    write_mesh(femur, path)
    write_mesh(septum, path)
    np.testing.assert_allclose(_corners(read_mesh(path)), _corners(septum), rtol=0, atol=CORNER_ATOL[suffix])
    assert os.listdir(tmp_path) == [path.name]


# ------------------------------------------------------------------------------------------- LPS / RAS
@pytest.mark.parametrize("suffix", SPACE_RECORDING_FORMATS)
def test_lps_file_reads_back_as_ras(septum_with_normals, tmp_path, suffix, caplog):
    mesh = septum_with_normals
    path = tmp_path / f"septum_lps{suffix}"
    write_mesh(mesh, path, space="LPS")

    back = read_mesh(path)  # the file's SPACE=LPS record is honoured
    np.testing.assert_allclose(_corners(back), _corners(mesh), rtol=0, atol=CORNER_ATOL[suffix])
    # a rotation by 180 degrees about z: the winding, hence the outward normals, are kept
    np.testing.assert_allclose(back.triangle_normals(), mesh.triangle_normals(), atol=1e-3)

    with caplog.at_level(logging.WARNING, logger="geomed.io"):
        stored = read_mesh(path, space="RAS")  # explicit space overrides the record, with a warning
    np.testing.assert_allclose(_corners(stored), _corners(mesh) * FLIP, rtol=0, atol=CORNER_ATOL[suffix])
    assert any("records SPACE=LPS but space='RAS'" in r.getMessage() for r in caplog.records)

    if suffix in ARRAY_FORMATS:
        np.testing.assert_allclose(back.point_data["Normals"], mesh.point_data["Normals"], atol=1e-12)
        np.testing.assert_allclose(stored.point_data["Normals"], mesh.point_data["Normals"] * FLIP, atol=1e-12)
        without_normals = {k: v for k, v in mesh.point_data.items() if k != "Normals"}
        _assert_arrays_equal({k: v for k, v in back.point_data.items() if k != "Normals"}, without_normals)
        _assert_arrays_equal(back.cell_data, mesh.cell_data)
        # only arrays named Normals are directions that flip; fiber/sheet cell vectors are stored as given
        _assert_arrays_equal(stored.cell_data, mesh.cell_data)


@pytest.mark.parametrize("suffix", SPACE_RECORDING_FORMATS)
def test_ras_file_is_stored_as_is(septum, tmp_path, suffix):
    path = tmp_path / f"septum_ras{suffix}"
    write_mesh(septum, path)  # default RAS
    for space in (None, "RAS"):
        back = read_mesh(path, space=space)
        np.testing.assert_allclose(_corners(back), _corners(septum), rtol=0, atol=CORNER_ATOL[suffix])
    flipped = read_mesh(path, space="LPS")  # declare the file LPS: converted to RAS
    np.testing.assert_allclose(_corners(flipped), _corners(septum) * FLIP, rtol=0, atol=CORNER_ATOL[suffix])


def test_gifti_refuses_lps(septum, tmp_path):
    path = tmp_path / "septum.gii"
    with pytest.raises(ValueError, match=f"{esc(path)}: GIfTI surfaces are RAS by convention"):
        write_mesh(septum, path, space="LPS")
    assert os.listdir(tmp_path) == []


SLICER_TRIANGLE = """# vtk DataFile Version 4.2
{header}
ASCII
DATASET POLYDATA
POINTS 3 double
-12.5 30.25 41
-10.5 30.25 41
-12.5 33.25 45
POLYGONS 1 4
3 0 1 2
POINT_DATA 3
NORMALS Normals double
0 -0.8 0.6
0 -0.8 0.6
0 -0.8 0.6
SCALARS thickness double 1
LOOKUP_TABLE default
1.5 2.5 3.5
"""
STORED_POINTS = np.array([[-12.5, 30.25, 41.0], [-10.5, 30.25, 41.0], [-12.5, 33.25, 45.0]])
STORED_NORMAL = np.array([0.0, -0.8, 0.6])


@pytest.mark.parametrize(
    "header, flipped",
    (
        ("3D Slicer output. SPACE=LPS", True),
        ("3D Slicer output. SPACE=RAS", False),
        ("vtk output", False),  # no SPACE record: RAS
        ("exported by a script, space = lps", True),
    ),
)
def test_hand_written_legacy_vtk_space_record(tmp_path, header, flipped):
    path = tmp_path / "triangle.vtk"
    path.write_text(SLICER_TRIANGLE.format(header=header))
    mesh = read_mesh(path)
    flip = FLIP if flipped else np.ones(3)
    assert mesh.n_triangles == 1
    np.testing.assert_allclose(_corners(mesh)[0], STORED_POINTS * flip, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mesh.point_data["Normals"], np.tile(STORED_NORMAL * flip, (3, 1)), atol=1e-12)
    np.testing.assert_array_equal(mesh.point_data["thickness"], [1.5, 2.5, 3.5])  # scalars never flip
    # the stored normal agrees with the triangle's winding, in either frame
    np.testing.assert_allclose(mesh.triangle_normals()[0], STORED_NORMAL * flip, atol=1e-12)


def test_explicit_space_overrides_a_missing_record(tmp_path):
    path = tmp_path / "triangle.vtk"
    path.write_text(SLICER_TRIANGLE.format(header="vtk output"))
    np.testing.assert_allclose(read_mesh(path, space="LPS").vertices, STORED_POINTS * FLIP, atol=1e-12)


# ------------------------------------------------------------------------------------------- polygons
QUAD = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [3.0, 2.0, 1.0], [0.0, 2.0, 1.0]])  # tilted 3 x sqrt(5)
ANGLES = np.deg2rad(90.0 + 72.0 * np.arange(5))
PENTAGON = np.column_stack([2 * np.cos(ANGLES), 2 * np.sin(ANGLES), 5 + np.cos(ANGLES)])  # regular, tilted plane


def _polygon_area(points: np.ndarray) -> float:
    return 0.5 * float(np.linalg.norm(np.cross(points, np.roll(points, -1, axis=0)).sum(axis=0)))


def _points_block(points: np.ndarray) -> str:
    return f"POINTS {len(points)} double\n" + "\n".join(" ".join(f"{v:.17g}" for v in p) for p in points) + "\n"


def _legacy(body: str, dataset: str = "POLYDATA") -> str:
    return f"# vtk DataFile Version 4.2\nhand written\nASCII\nDATASET {dataset}\n{body}"


BOX = np.array([[x, y, z] for z in (0.0, 4.0) for y in (0.0, 3.0) for x in (0.0, 2.0)])[[0, 1, 3, 2, 4, 5, 7, 6]]
POLYGON_FILES = {
    "quad_and_pentagon": (
        _legacy(
            _points_block(np.vstack([QUAD, PENTAGON]))
            + "POLYGONS 2 11\n4 0 1 2 3\n5 4 5 6 7 8\n"
            + "CELL_DATA 2\nSCALARS region int 1\nLOOKUP_TABLE default\n7 9\n"
            + "POINT_DATA 9\nSCALARS thickness double 1\nLOOKUP_TABLE default\n"
            + " ".join(str(0.5 * k) for k in range(9)) + "\n"
        ),
        5,
        _polygon_area(QUAD) + _polygon_area(PENTAGON),
    ),
    "triangle_strip": (
        _legacy(
            _points_block(np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0], [2, 0, 0]], dtype=float))
            + "TRIANGLE_STRIPS 1 6\n5 0 1 2 3 4\n"
        ),
        3,
        1.5,
    ),
    "triangle_among_vertices_and_lines": (
        _legacy(
            _points_block(np.array([[0, 0, 0], [4, 0, 0], [0, 3, 0], [9, 9, 9]], dtype=float))
            + "VERTICES 1 2\n1 3\nLINES 1 3\n2 0 3\nPOLYGONS 1 4\n3 0 1 2\n"
        ),
        1,
        6.0,
    ),
    "hexahedron_unstructured_grid": (
        _legacy(_points_block(BOX) + "CELLS 1 9\n8 0 1 2 3 4 5 6 7\nCELL_TYPES 1\n12\n", "UNSTRUCTURED_GRID"),
        12,
        2 * (2 * 3 + 3 * 4 + 2 * 4),
    ),
}


@pytest.mark.parametrize("name", POLYGON_FILES)
def test_polygons_are_triangulated(tmp_path, name):
    text, n_triangles, area = POLYGON_FILES[name]
    path = tmp_path / f"{name}.vtk"
    path.write_text(text)
    mesh = read_mesh(path)
    assert mesh.n_triangles == n_triangles
    assert mesh.triangle_areas().sum() == pytest.approx(area, rel=1e-12)
    assert np.all(mesh.triangle_areas() > 0)


def test_triangulation_keeps_point_and_cell_arrays(tmp_path):
    path = tmp_path / "polygons.vtk"
    path.write_text(POLYGON_FILES["quad_and_pentagon"][0])
    mesh = read_mesh(path)
    np.testing.assert_allclose(mesh.vertices, np.vstack([QUAD, PENTAGON]), atol=1e-12)
    np.testing.assert_array_equal(mesh.point_data["thickness"], 0.5 * np.arange(9))
    region = mesh.cell_data["region"]
    assert sorted(region.tolist()) == [7, 7, 9, 9, 9]  # the quad's 2 triangles, the pentagon's 3
    areas = mesh.triangle_areas()
    assert areas[region == 7].sum() == pytest.approx(_polygon_area(QUAD), rel=1e-12)
    assert areas[region == 9].sum() == pytest.approx(_polygon_area(PENTAGON), rel=1e-12)


def test_hexahedron_surface_is_closed_and_outward(tmp_path):
    path = tmp_path / "box.vtk"
    path.write_text(POLYGON_FILES["hexahedron_unstructured_grid"][0])
    mesh = read_mesh(path)
    assert mesh.is_closed
    outward = np.einsum("ij,ij->i", mesh.triangle_normals(), mesh.triangle_centroids() - BOX.mean(axis=0))
    assert np.all(outward > 0)


# ------------------------------------------------------------------------------------------- bad input
def _assert_quiet(capfd) -> None:
    """vtk printed nothing: its errors were turned into the Python exception."""
    assert capfd.readouterr().err == ""


def test_missing_file(tmp_path, capfd):
    path = tmp_path / "no" / "femur.vtp"
    with pytest.raises(FileNotFoundError, match=f"{esc(path)}: no such file or folder"):
        read_mesh(path)
    _assert_quiet(capfd)


@pytest.mark.parametrize("suffix", MESH_FORMATS)
def test_empty_file(tmp_path, suffix, capfd):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(ValueError, match=f"{esc(path)}: the file is empty"):
        read_mesh(path)
    _assert_quiet(capfd)


def test_truncated_bundled_vtp(tmp_path, capfd):
    data = Path(str(resources.files("geomed").joinpath("data", "heart", "rodero01_septum_myocardium.vtp"))).read_bytes()
    path = tmp_path / "septum.vtp"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{esc(path)}: could not read the \.vtp mesh \(broken or truncated file\?\)"):
        read_mesh(path)
    _assert_quiet(capfd)


# .obj is left out: a text format without counts, cut at a line end it is a valid smaller mesh
@pytest.mark.parametrize("suffix", (".vtk", ".vtp", ".stl", ".ply", ".gii"))
@pytest.mark.parametrize("keep", (0.1, 0.5, 0.9))
def test_truncated_file(septum, tmp_path, suffix, keep, capfd):
    """Cut files are refused, not read partially: legacy .vtk used to lose arrays, binary .ply crashed vtk."""
    full = tmp_path / f"full{suffix}"
    write_mesh(septum, full)
    data = full.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: int(len(data) * keep)])
    capfd.readouterr()
    with pytest.raises(ValueError, match=rf"{esc(path)}: could not read the (\{suffix} mesh|GIfTI surface)"):
        read_mesh(path)
    _assert_quiet(capfd)


def test_truncated_ascii_ply(tmp_path, capfd):
    header = (
        "ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 2\nproperty list uchar int vertex_indices\nend_header\n"
    )
    body = "0 0 0\n1 0 0\n0 1 0\n1 1 0\n3 0 1 2\n3 1 3 2\n"
    (tmp_path / "whole.ply").write_text(header + body)
    assert read_mesh(tmp_path / "whole.ply").n_triangles == 2
    path = tmp_path / "cut.ply"
    path.write_text(header + body[: -len("3 2\n")])
    with pytest.raises(ValueError, match=rf"{esc(path)}: could not read the \.ply mesh .*truncated"):
        read_mesh(path)
    _assert_quiet(capfd)


GARBAGE = {
    "random_bytes": np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    "text": b"this is a radiology report, not a surface\n" * 40,
}


@pytest.mark.parametrize("suffix", MESH_FORMATS)
@pytest.mark.parametrize("kind", GARBAGE)
def test_garbage_file(tmp_path, suffix, kind, capfd):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(GARBAGE[kind])
    with pytest.raises(ValueError, match=esc(path)):
        read_mesh(path)
    _assert_quiet(capfd)


@pytest.mark.parametrize("kind", GARBAGE)
def test_garbage_stl_message(tmp_path, kind, capfd):
    path = tmp_path / "garbage.stl"
    path.write_bytes(GARBAGE[kind])
    with pytest.raises(ValueError, match=rf"{esc(path)}: could not read the \.stl mesh"):
        read_mesh(path)
    _assert_quiet(capfd)


def test_polygon_with_vertex_index_out_of_range(tmp_path, capfd):
    path = tmp_path / "bad_index.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 9\n"
    )
    with pytest.raises(ValueError, match=f"{esc(path)}: triangles index vertices out of range"):
        read_mesh(path)
    _assert_quiet(capfd)


@pytest.mark.parametrize("name", ("mesh.off", "mesh.xyz", "mesh.vtu", "mesh.nii.gz", "mesh"))
def test_unknown_extension_on_read(tmp_path, name, capfd):
    path = tmp_path / name
    path.write_text("solid nothing\nendsolid\n")
    with pytest.raises(ValueError, match=rf"{esc(path)}: unknown mesh format '[^']*'; expected one of \.vtk, "):
        read_mesh(path)
    _assert_quiet(capfd)


@pytest.mark.parametrize("name", ("mesh.off", "mesh.xyz", "mesh.vtu", "mesh.nii.gz", "mesh"))
def test_unknown_extension_on_write(septum, tmp_path, name):
    path = tmp_path / name
    with pytest.raises(ValueError, match=rf"{esc(path)}: unknown mesh format '[^']*'; expected one of \.vtk, "):
        write_mesh(septum, path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "body",
    (
        "POINTS 3 double\n0 0 0 1 0 0 0 1 0\nVERTICES 3 6\n1 0\n1 1\n1 2\n",
        "POINTS 3 double\n0 0 0 1 0 0 0 1 0\n",
        "POINTS 3 double\n0 0 0 1 0 0 0 1 0\nLINES 1 4\n3 0 1 2\n",
    ),
    ids=("vertices", "points_only", "polyline"),
)
def test_vtk_without_polygons(tmp_path, body, capfd):
    path = tmp_path / "points.vtk"
    path.write_text(_legacy(body))
    with pytest.raises(ValueError, match=rf"{esc(path)} has no surface polygons \(found \d+ cells, none a polygon\)"):
        read_mesh(path)
    _assert_quiet(capfd)


@pytest.mark.parametrize("space", ("XYZ", "ras", "", "RAS "))
def test_bad_space(septum, tmp_path, space):
    path = tmp_path / "septum.vtk"
    with pytest.raises(ValueError, match=re.escape(f"space must be 'RAS' or 'LPS', got {space!r}")):
        write_mesh(septum, path, space=space)
    assert os.listdir(tmp_path) == []
    write_mesh(septum, path)
    with pytest.raises(ValueError, match=re.escape(f"space must be 'RAS' or 'LPS', got {space!r}")):
        read_mesh(path, space=space)


@pytest.mark.parametrize(
    "thing, kind",
    (
        ("femur.vtp", "str"),
        (np.zeros((3, 3)), "ndarray"),
        ({"vertices": [], "triangles": []}, "dict"),
        (None, "NoneType"),
    ),
)
def test_write_mesh_refuses_non_meshes(tmp_path, thing, kind):
    with pytest.raises(TypeError, match=f"mesh must be a geomed.Mesh, got {kind}"):
        write_mesh(thing, tmp_path / "out.vtk")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------- dropped arrays
@pytest.mark.parametrize(
    "suffix, dropped",
    (
        (".stl", ["apico-basal", "transmural", "rotational", "sheet", "fiber"]),
        (".ply", ["apico-basal", "transmural", "rotational", "sheet", "fiber"]),
        (".obj", ["apico-basal", "transmural", "rotational", "sheet", "fiber"]),
        (".gii", ["sheet", "fiber"]),
        (".vtk", []),
        (".vtp", []),
    ),
)
def test_dropped_arrays_are_logged(septum, tmp_path, caplog, suffix, dropped):
    path = tmp_path / f"septum{suffix}"
    with caplog.at_level(logging.WARNING, logger="geomed.io"):
        write_mesh(septum, path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if dropped:
        assert len(warnings) == 1
        assert str(path) in warnings[0] and "not written" in warnings[0]
        assert all(repr(name) in warnings[0] for name in dropped)
        assert all(repr(name) not in warnings[0] for name in set(septum.point_data) - set(dropped))
    else:
        assert warnings == []


# ------------------------------------------------------------------------------------------- atomic writes
def _unstorable(mesh: Mesh, kind: str) -> Mesh:
    """A mesh whose point array vtk cannot store."""
    if kind == "matrix_per_vertex":
        return mesh.with_point_data(strain=np.zeros((mesh.n_vertices, 2, 2)))
    return mesh.with_point_data(cartilage_mask=mesh.vertices[:, 2] > np.median(mesh.vertices[:, 2]))


@pytest.mark.parametrize("suffix", ARRAY_FORMATS)
@pytest.mark.parametrize("kind", ("matrix_per_vertex", "bool"))
@pytest.mark.parametrize("existing", (False, True), ids=("new", "over_existing"))
def test_failed_write_is_atomic(septum, femur, tmp_path, suffix, kind, existing):
    path = tmp_path / f"mesh{suffix}"
    if existing:
        write_mesh(femur, path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    name = "strain" if kind == "matrix_per_vertex" else "cartilage_mask"
    message = rf"{esc(path)}: could not write the mesh: vtk cannot store the array '{name}'"
    with pytest.raises(ValueError, match=message):
        write_mesh(_unstorable(septum, kind), path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # no stray temporary, existing file untouched
    if existing:
        np.testing.assert_array_equal(read_mesh(path).vertices, femur.vertices)


@pytest.mark.parametrize("suffix", (".stl", ".ply", ".obj"))
def test_arrays_that_are_dropped_do_not_fail_the_write(septum, tmp_path, suffix):
    path = tmp_path / f"septum{suffix}"
    write_mesh(_unstorable(septum, "matrix_per_vertex"), path)
    np.testing.assert_allclose(_corners(read_mesh(path)), _corners(septum), atol=CORNER_ATOL[suffix])


@pytest.mark.parametrize("suffix", MESH_FORMATS)
def test_write_into_missing_folder(septum, tmp_path, suffix):
    path = tmp_path / "missing" / f"septum{suffix}"
    with pytest.raises(FileNotFoundError, match=f"{esc(path)}: the folder {esc(path.parent)} does not exist"):
        write_mesh(septum, path)
    assert os.listdir(tmp_path) == []
