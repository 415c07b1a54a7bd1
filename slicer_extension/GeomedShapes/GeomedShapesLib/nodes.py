"""MRML nodes ↔ geomed objects. Importable without the Slicer application: it needs only the nodes themselves (and
the scene they live in, passed explicitly), vtk, numpy and geomed.

Coordinates: Slicer's world frame is RAS millimetres, as geomed's; a node under a (non-hardened) linear transform is
read through its transform to world, so that what the user sees is what is registered.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.vtkFiltersCore import vtkTriangleFilter

from geomed import Image, Mesh
from geomed.io import file_stem, mesh_to_polydata, polydata_to_mesh

DIVERGING_COLORS = "GeomedDivergingBlueRed"
_FILE_SUFFIXES = {"vtkMRMLModelNode": ".vtk", "vtkMRMLTransformNode": ".h5", "vtkMRMLTableNode": ".csv"}


def mesh_from_model(node) -> Mesh:
    """The surface of a model node as a geomed Mesh (triangulated), in world RAS mm, with its point arrays."""
    polydata = node.GetPolyData() if node is not None else None
    if polydata is None or polydata.GetNumberOfPoints() == 0:
        raise ValueError(f"model {_name(node)} has no surface (no points)")
    triangles = vtkTriangleFilter()
    triangles.SetInputData(polydata)
    triangles.Update()
    mesh = polydata_to_mesh(triangles.GetOutput(), f"model {_name(node)}")
    return mesh.transformed(_to_world(node))


def image_from_volume(node) -> Image:
    """A scalar volume or labelmap node as a geomed Image: voxels indexed [i, j, k], affine IJK → world RAS."""
    data = node.GetImageData() if node is not None else None
    if data is None or data.GetPointData().GetScalars() is None:
        raise ValueError(f"volume {_name(node)} has no voxels")
    columns, rows, slices = data.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(data.GetPointData().GetScalars())
    if scalars.ndim != 1:
        raise ValueError(f"volume {_name(node)} has {scalars.shape[1]} components; a scalar volume is expected")
    array = scalars.reshape(slices, rows, columns).transpose(2, 1, 0)
    matrix = vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return Image(array.copy(), _to_world(node) @ _numpy(matrix))


def image_from_segment(node, segment: str) -> Image:
    """One segment of a segmentation node as a binary mask Image (its binary-labelmap representation, in world RAS).

    ``segment`` is the segment's name or id. The segmentation must hold binary labelmaps (what the Segment Editor
    makes); a segmentation of closed surfaces only is refused with the reason.
    """
    from vtkmodules.util.numpy_support import vtk_to_numpy

    segmentation = node.GetSegmentation()
    identifier = segmentation.GetSegmentIdBySegmentName(segment) or segment
    found = segmentation.GetSegment(identifier)
    if found is None:
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        raise ValueError(f"segmentation {_name(node)} has no segment {segment!r}; it has {names}")
    representation = "Binary labelmap"
    labelmap = found.GetRepresentation(representation)
    if labelmap is None:
        raise ValueError(f"segment {segment!r} of {_name(node)} has no binary labelmap: convert the segmentation to "
                         "a binary labelmap first (Segmentations module)")
    i0, i1, j0, j1, k0, k1 = labelmap.GetExtent()
    if i1 < i0 or j1 < j0 or k1 < k0:
        raise ValueError(f"segment {segment!r} of {_name(node)} is empty")
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars())
    array = values.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1).transpose(2, 1, 0)
    matrix = vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    offset = np.eye(4)
    offset[:3, 3] = [i0, j0, k0]
    return Image((array == found.GetLabelValue()).astype(np.uint8), _to_world(node) @ _numpy(matrix) @ offset)


def add_model(scene, mesh: Mesh, name: str, scalars: str | None = None):
    """A new model node showing ``mesh`` (with its point arrays); coloured by ``scalars`` with a diverging map
    centred on 0 when given."""
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
    node.SetAndObservePolyData(mesh_to_polydata(mesh))
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if scalars is not None and display is not None:
        values = np.nan_to_num(np.asarray(mesh.point_data[scalars], dtype=float))
        limit = float(np.percentile(np.abs(values), 98)) or 1.0
        display.SetActiveScalarName(scalars)
        display.SetAndObserveColorNodeID(_diverging_colors(scene).GetID())
        display.SetScalarRangeFlag(display.UseManualScalarRange)
        display.SetScalarRange(-limit, limit)
        display.SetScalarVisibility(True)
    return node


def add_linear_transform(scene, matrix: np.ndarray, name: str):
    """A new linear transform node whose transform to parent is ``matrix`` (4 × 4, RAS mm)."""
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(_vtk_matrix(matrix))
    return node


def add_grid_transform(scene, origin: np.ndarray, spacing: float, displacement: np.ndarray, name: str):
    """A new grid transform node moving each point x by the displacement field d(x) (to parent, RAS mm).

    ``displacement`` is (I, J, K, 3) on the axis-aligned grid ``origin + spacing·(i, j, k)``.
    """
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersHybrid import vtkGridTransform

    field = vtkImageData()
    field.SetOrigin(*origin)
    field.SetSpacing(spacing, spacing, spacing)
    field.SetDimensions(*displacement.shape[:3])
    vectors = np.ascontiguousarray(displacement.transpose(2, 1, 0, 3).reshape(-1, 3))
    field.GetPointData().SetScalars(numpy_support.numpy_to_vtk(vectors, deep=True))
    grid = vtkGridTransform()
    grid.SetDisplacementGridData(field)
    grid.SetInterpolationModeToCubic()
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformToParent(grid)
    return node


def add_table(scene, rows: list[tuple[str, object, str]], name: str):
    """A new table node with columns ``metric``, ``value``, ``unit`` (values as text, numbers rounded sensibly)."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    from vtkmodules.vtkCommonCore import vtkStringArray

    for title in ("metric", "value", "unit"):
        column = vtkStringArray()
        column.SetName(title)
        table.AddColumn(column)
    for metric, value, unit in rows:
        table.InsertNextBlankRow()
        row = table.GetNumberOfRows() - 1
        for index, text in enumerate((metric, _text(value), unit)):
            table.SetValue(row, index, text)
    node.Modified()
    return node


def add_histogram_plot(scene, samples: dict[str, np.ndarray], name: str, axis: str, bins: int = 40):
    """A plot chart (with its table and one line series per entry of ``samples``) of their histograms on shared
    bins: e.g. the surface distances before and after a registration."""
    from vtkmodules.vtkCommonCore import vtkDoubleArray

    values = np.concatenate([np.asarray(v, dtype=float).ravel() for v in samples.values()])
    values = values[np.isfinite(values)]
    edges = np.linspace(values.min(), values.max(), bins + 1) if values.size else np.linspace(0, 1, bins + 1)
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} data")
    table = table_node.GetTable()
    columns = {"bin": (edges[:-1] + edges[1:]) / 2}
    columns.update({label: np.histogram(np.asarray(v, dtype=float), bins=edges)[0].astype(float)
                    for label, v in samples.items()})
    for title, data in columns.items():
        column = vtkDoubleArray()
        column.SetName(title)
        column.SetNumberOfValues(len(data))
        for index, value in enumerate(data):
            column.SetValue(index, float(value))
        table.AddColumn(column)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.SetXAxisTitle(axis)
    chart.SetYAxisTitle("vertices")
    for label in samples:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name}: {label}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName("bin")
        series.SetYColumnName(label)
        series.SetPlotType(series.PlotTypeScatter)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    table_node.Modified()
    return chart


def save_node(node, folder: Path, stem: str | None = None) -> list[Path]:
    """Write a model, transform or table node into ``folder`` with Slicer's own storage node, as ``stem`` (default:
    the node's name as a portable file name).

    Models are written as ``.vtk`` (the header records the frame, so Slicer and :func:`geomed.read_mesh` read
    them back in place), transforms as ``.h5`` (ITK), tables as ``.csv``. Files appear atomically: the storage node
    writes into a private folder beside them, and each finished file is moved into place.

    Returns
    -------
    list of Path
        The files written (a table may come with its ``.schema.csv``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = next((suffix for kind, suffix in _FILE_SUFFIXES.items() if node.IsA(kind)), None)
    if suffix is None:
        raise ValueError(f"{_name(node)} is a {node.GetClassName()}: only model, transform and table nodes are "
                         "exported")
    storage = node.CreateDefaultStorageNode()
    stem = stem or file_stem(node.GetName())
    with tempfile.TemporaryDirectory(dir=folder, prefix=".geomed-export-") as scratch:
        storage.SetFileName(str(Path(scratch) / f"{stem}{suffix}"))
        if not storage.WriteData(node):
            raise OSError(f"could not write {_name(node)} to {folder}: {storage.GetWriteStateAsString()}")
        written = []
        for path in sorted(Path(scratch).iterdir()):
            os.replace(path, folder / path.name)
            written.append(folder / path.name)
    return written


def table_rows(node) -> dict[str, str]:
    """A metric → value (text) view of a table node made by :func:`add_table`."""
    table = node.GetTable()
    return {table.GetValue(row, 0).ToString(): table.GetValue(row, 1).ToString()
            for row in range(table.GetNumberOfRows())}


def _diverging_colors(scene):
    """The shared blue-white-red colour table (created once per scene)."""
    existing = scene.GetFirstNodeByName(DIVERGING_COLORS)
    if existing is not None:
        return existing
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", DIVERGING_COLORS)
    colors.SetTypeToUser()
    count = 256
    colors.SetNumberOfColors(count)
    for index in range(count):
        t = 2.0 * index / (count - 1) - 1.0  # -1 (blue, inwards) … 0 (white) … +1 (red, outwards)
        red, green, blue = (1.0, 1.0 - t, 1.0 - t) if t > 0 else (1.0 + t, 1.0 + t, 1.0)
        colors.SetColor(index, f"{t:+.2f}", red, green, blue, 1.0)
    return colors


def _to_world(node) -> np.ndarray:
    """The 4 × 4 map from the node's coordinates to world (identity without a parent transform)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(f"{_name(node)} is under a non-linear transform: harden it first (Data module)")
    matrix = vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return _numpy(matrix)


def _numpy(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(array: np.ndarray) -> vtkMatrix4x4:
    matrix = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _text(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _name(node) -> str:
    return repr(node.GetName()) if node is not None else "(none)"
