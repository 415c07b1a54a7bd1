"""The Slicer module's logic on real MRML (the ``slicer-core`` package: Slicer's MRML classes without the GUI).

``make test`` runs this file in its own virtual environment (``.venv-slicer``: slicer-core pins vtk 9.6.2); in an
environment without slicer-core it is skipped. There is no ``slicer.mrmlScene`` there: the scene is passed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

_REASON = "needs the slicer-core package's MRML (make test installs it in .venv-slicer)"
slicer = pytest.importorskip("slicer", reason=_REASON)
if not hasattr(slicer, "vtkMRMLScene"):  # another PyPI package is also called "slicer"
    pytest.skip(_REASON, allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "slicer_extension" / "GeomedShapes"))

from GeomedShapesLib.logic import export_nodes, longitudinal_nodes, measure_nodes, register_nodes  # noqa: E402
from GeomedShapesLib.logic import preview_nodes, shape_from_node  # noqa: E402
from GeomedShapesLib.nodes import image_from_segment, image_from_volume, mesh_from_model, table_rows  # noqa: E402

from geomed import Mesh, datasets, mask_to_mesh, read_mesh  # noqa: E402
from geomed.io import mesh_to_polydata  # noqa: E402
from geomed.morphometry import volume  # noqa: E402


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def hippocampus() -> Mesh:
    return mask_to_mesh(datasets.brain_labels("9861"), "left_hippocampus")


def _model(scene, mesh: Mesh, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    node.SetAndObservePolyData(mesh_to_polydata(mesh))
    return node


def _labelmap(scene, image, name: str):
    """A labelmap node holding ``image`` (voxels [i, j, k], affine IJK → RAS) as Slicer stores volumes."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonDataModel import vtkImageData

    data = vtkImageData()
    data.SetDimensions(*image.shape)
    flat = np.ascontiguousarray(image.array.transpose(2, 1, 0)).ravel()
    data.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    node.SetAndObserveImageData(data)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(image.affine))
    return node


def _segmentation(scene, image, label: int, name: str):
    """A segmentation node with one segment ``name``: the voxels of ``label``, as a binary labelmap (as the Segment
    Editor stores it), on the image's own grid."""
    mask = np.ascontiguousarray((image.array == label).astype(np.uint8).transpose(2, 1, 0))
    oriented = slicer.vtkOrientedImageData()
    oriented.SetExtent(0, image.shape[0] - 1, 0, image.shape[1] - 1, 0, image.shape[2] - 1)
    from vtkmodules.util import numpy_support

    oriented.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True))
    oriented.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(image.affine))
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.AddRepresentation("Binary labelmap", oriented)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    node.GetSegmentation().SetSourceRepresentationName("Binary labelmap")
    node.GetSegmentation().AddSegment(segment)
    return node


def _motion(degrees: float, shift) -> np.ndarray:
    angle = np.radians(degrees)
    motion = np.eye(4)
    motion[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    motion[:3, 3] = shift
    return motion


def test_model_and_labelmap_nodes_round_trip(scene, hippocampus):
    labels = datasets.brain_labels("9861")
    node = _labelmap(scene, labels, "brain")
    image = image_from_volume(node)
    np.testing.assert_array_equal(image.array, labels.array)
    np.testing.assert_allclose(image.affine, labels.affine)
    model = _model(scene, hippocampus, "hippocampus")
    np.testing.assert_allclose(mesh_from_model(model).vertices, hippocampus.vertices)
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    parent.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(_motion(0.0, [5.0, 0.0, 0.0])))
    model.SetAndObserveTransformNodeID(parent.GetID())
    np.testing.assert_allclose(mesh_from_model(model).vertices, hippocampus.vertices + [5.0, 0.0, 0.0])


def test_inputs_without_a_shape_are_refused_naming_the_node(scene):
    labels = datasets.brain_labels("9861")
    with pytest.raises(ValueError, match="'brain': label 999 is absent"):
        shape_from_node(_labelmap(scene, labels, "brain"), 999)
    blank = type(labels)(np.zeros(labels.shape, np.uint8), labels.affine)
    with pytest.raises(ValueError, match="'blank': mask is empty"):
        shape_from_node(_labelmap(scene, blank, "blank"))
    with pytest.raises(ValueError, match="'empty' has no surface"):
        mesh_from_model(scene.AddNewNodeByClass("vtkMRMLModelNode", "empty"))
    with pytest.raises(ValueError, match="'markups' is a vtkMRMLMarkupsFiducialNode"):
        shape_from_node(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "markups"))


def test_preview_shows_what_would_be_registered_and_replaces_itself(scene, hippocampus):
    labels = datasets.brain_labels("9861")
    fixed, moving = _labelmap(scene, labels, "brain"), _model(scene, hippocampus, "model")
    shown = preview_nodes(scene, moving, fixed, label=40)
    np.testing.assert_allclose(mesh_from_model(shown[0]).vertices, hippocampus.vertices)
    np.testing.assert_allclose(mesh_from_model(shown[1]).vertices, mask_to_mesh(labels, 40).vertices)
    assert not any(node.GetSaveWithScene() for node in shown)
    count = scene.GetNumberOfNodes()
    again = preview_nodes(scene, moving, fixed, label=41)  # the amygdala: the old preview goes
    assert scene.GetNumberOfNodes() == count and again[1].GetPolyData().GetNumberOfPoints() != \
        shown[1].GetPolyData().GetNumberOfPoints()
    with pytest.raises(ValueError, match="label 999 is absent"):
        preview_nodes(scene, moving, fixed, label=999)
    assert scene.GetNumberOfNodes() == count  # a failed preview leaves the last one


def test_segment_of_a_segmentation_node(scene, hippocampus):
    labels = datasets.brain_labels("9861")
    node = _segmentation(scene, labels, 40, "left hippocampus")
    image = image_from_segment(node, "left hippocampus")
    np.testing.assert_array_equal(image.array, labels.array == 40)
    np.testing.assert_allclose(image.affine, labels.affine)
    np.testing.assert_allclose(shape_from_node(node, segment="left hippocampus").vertices, hippocampus.vertices)
    with pytest.raises(ValueError, match="has no segment 'amygdala'"):
        image_from_segment(node, "amygdala")
    with pytest.raises(ValueError, match="choose a segment"):
        shape_from_node(node)


def test_rigid_registration_outputs_new_nodes(scene, hippocampus):
    motion = _motion(8.0, [2.0, -1.0, 3.0])
    fixed, moving = _model(scene, hippocampus, "fixed"), _model(scene, hippocampus.transformed(motion), "moving")
    before = slicer.util.arrayFromModelPoints(moving).copy()
    outputs = register_nodes(scene, moving, fixed, model="rigid", preset="brain", plot=True)
    assert outputs.transform.IsA("vtkMRMLLinearTransformNode")
    assert outputs.plot.IsA("vtkMRMLPlotChartNode") and outputs.plot.GetNumberOfPlotSeriesNodes() == 2
    histogram = slicer.util.arrayFromTableColumn(outputs.plot.GetNthPlotSeriesNode(1).GetTableNode(), "after")
    assert histogram.sum() == hippocampus.n_vertices
    matrix = slicer.util.arrayFromTransformMatrix(outputs.transform)
    points = np.c_[hippocampus.vertices, np.ones(hippocampus.n_vertices)]
    recovered = points @ (matrix @ motion).T
    assert np.abs(recovered - points).max() < 0.1  # mm, over the shape
    np.testing.assert_array_equal(slicer.util.arrayFromModelPoints(moving), before)  # inputs untouched
    assert outputs.warped.IsA("vtkMRMLModelNode") and outputs.warped is not moving
    displacement = slicer.util.arrayFromModelPointData(outputs.warped, "normal displacement")
    assert displacement.shape == (hippocampus.n_vertices,)
    display = outputs.warped.GetDisplayNode()
    assert display.GetActiveScalarName() == "normal displacement" and display.GetScalarVisibility()
    rows = table_rows(outputs.table)
    assert float(rows["mean surface distance after"]) < 0.05 < float(rows["mean surface distance before"])
    assert float(rows["volume change"]) == pytest.approx(0.0, abs=1e-6)
    assert rows["backend"] == "cpu" and float(rows["time"]) > 0


def test_segment_to_model_registration_and_export(scene, hippocampus, tmp_path):
    """A segment picked in a segmentation registered onto a model; the outputs written, and read back by
    independent readers: geomed's mesh reader, SimpleITK's transform reader, the csv module."""
    import csv

    import SimpleITK as sitk

    labels = datasets.brain_labels("9861")
    motion = _motion(6.0, [1.0, -2.0, 1.5])
    fixed = _model(scene, hippocampus.transformed(motion), "fixed")
    moving = _segmentation(scene, labels, 40, "left hippocampus")
    segment_id = moving.GetSegmentation().GetNthSegmentID(0)
    outputs = register_nodes(scene, moving, fixed, model="rigid", preset="brain", moving_segment=segment_id)
    assert float(table_rows(outputs.table)["mean surface distance after"]) < 0.05
    namesake = scene.AddNewNodeByClass("vtkMRMLTableNode", outputs.table.GetName())
    files = export_nodes(outputs.nodes() + [outputs.table, namesake], tmp_path / "out")
    assert sorted(path.suffix for path in files) == [".csv", ".csv", ".h5", ".vtk"]  # the table once, its namesake
    assert files[-1].name == files[-2].stem + "_2.csv"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(path.name for path in files)
    warped = read_mesh(next(path for path in files if path.suffix == ".vtk"))
    np.testing.assert_allclose(warped.vertices, outputs.result.warped.vertices, atol=1e-4)
    np.testing.assert_allclose(warped.point_data["normal displacement"],
                               outputs.result.warped.point_data["normal displacement"], atol=1e-5)
    # ITK's transform file maps fixed points to moving points (resampling convention), in LPS
    itk = sitk.ReadTransform(str(next(path for path in files if path.suffix == ".h5")))
    lps = np.diag([-1.0, -1.0, 1.0])
    matrix = slicer.util.arrayFromTransformMatrix(outputs.transform)
    for point in hippocampus.vertices[:20]:
        moved = matrix[:3, :3] @ point + matrix[:3, 3]
        np.testing.assert_allclose(itk.TransformPoint(tuple(lps @ moved)), lps @ point, atol=1e-6)
    with open(next(path for path in files if path.suffix == ".csv"), newline="") as handle:
        written = {row["metric"]: row["value"] for row in csv.DictReader(handle)}
    assert written == table_rows(outputs.table)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "chart")
    with pytest.raises(ValueError, match="'chart' is a vtkMRMLPlotChartNode"):
        export_nodes([chart], tmp_path / "out")


def test_labelmap_to_model_affine_registration_and_measurement(scene, hippocampus):
    labels = datasets.brain_labels("9861")
    fixed = _labelmap(scene, labels, "brain")
    moving = _model(scene, hippocampus.transformed(_motion(5.0, [1.0, 2.0, 0.0])), "moving")
    outputs = register_nodes(scene, moving, fixed, model="affine", preset="brain", label=40)
    rows = table_rows(outputs.table)
    assert float(rows["mean surface distance after"]) < 0.3
    table = table_rows(measure_nodes(scene, [moving], None))
    assert float(table["moving volume"]) == pytest.approx(volume(hippocampus) / 1000.0, rel=1e-4)  # 4 decimals


@pytest.mark.slow
def test_deformable_registration_gives_a_grid_transform(scene, hippocampus):
    centre = hippocampus.vertices.mean(0)
    bent = Mesh(centre + (hippocampus.vertices - centre) * [1.0, 1.04, 0.97], hippocampus.triangles)
    fixed, moving = _model(scene, hippocampus, "fixed"), _model(scene, bent, "moving")
    outputs = register_nodes(scene, moving, fixed, model="deformable", preset="brain", loss="varifold", blur=2.0)
    assert outputs.transform.IsA("vtkMRMLGridTransformNode")
    rows = table_rows(outputs.table)
    assert float(rows["mean surface distance after"]) < 0.5 * float(rows["mean surface distance before"])
    moved = np.array([outputs.transform.GetTransformToParent().TransformPoint(*point) for point in bent.vertices[:50]])
    np.testing.assert_allclose(moved, outputs.result.warped.vertices[:50], atol=0.05)


def test_longitudinal_table_and_change_map(scene, hippocampus):
    centre = hippocampus.vertices.mean(0)
    scans = [Mesh(centre + (hippocampus.vertices - centre) * 0.99 ** (t / 3), hippocampus.triangles)
             for t in range(3)]
    nodes = [_model(scene, mesh.transformed(_motion(2.0 * t, [t, 0.0, 0.0])), f"y{t}") for t, mesh in enumerate(scans)]
    table, change_map = longitudinal_nodes(scene, [nodes[2], nodes[0], nodes[1]], "2, 0 1", preset="brain")
    rows = table_rows(table)  # taken in the order of their years
    assert float(rows["annual rate (registration)"]) == pytest.approx(-1.0, abs=0.1)  # 0.99 per year in volume
    assert float(rows["y0 → y1: direct"]) == pytest.approx(-1.0, abs=1e-6)
    assert change_map.GetDisplayNode().GetActiveScalarName() == "normal displacement"
    assert np.nanmedian(slicer.util.arrayFromModelPointData(change_map, "normal displacement")) < 0
    count = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="'y0' and 'y2' have the same year"):
        longitudinal_nodes(scene, nodes, [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="3 timepoints, 2 years"):
        longitudinal_nodes(scene, nodes, "0 1")
    with pytest.raises(ValueError, match="'1y' is not a number"):
        longitudinal_nodes(scene, nodes, "0 1y 2")
    assert scene.GetNumberOfNodes() == count


def test_cancelled_runs_add_no_node(scene, hippocampus):
    """Cancel adds nothing to the scene, even when it comes in the last of the longitudinal registrations."""
    from geomed import register
    from geomed.registration import RegistrationCancelled

    def counting(limit: float):
        polls = []

        def cancel() -> bool:
            polls.append(None)
            return len(polls) > limit
        return cancel, polls

    nodes = [_model(scene, hippocampus.transformed(_motion(2.0 * t, [t, 0.0, 0.0])), f"y{t}") for t in range(3)]
    count = scene.GetNumberOfNodes()
    with pytest.raises(RegistrationCancelled):
        register_nodes(scene, nodes[1], nodes[0], model="affine", preset="brain", cancel=counting(0)[0])
    assert scene.GetNumberOfNodes() == count
    last, last_polls = counting(np.inf)
    register(shape_from_node(nodes[0]), shape_from_node(nodes[2]), model="rigid", preset="brain", cancel=last)
    whole, all_polls = counting(np.inf)
    longitudinal_nodes(scene, nodes, [0.0, 1.0, 2.0], preset="brain", cancel=whole)
    count = scene.GetNumberOfNodes()
    with pytest.raises(RegistrationCancelled):  # within the last registration (the change map's)
        longitudinal_nodes(scene, nodes, [0.0, 1.0, 2.0], preset="brain",
                           cancel=counting(len(all_polls) - len(last_polls) + 1)[0])
    assert scene.GetNumberOfNodes() == count
