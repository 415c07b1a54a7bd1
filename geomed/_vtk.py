"""Conversions between :class:`~geomed.mesh.Mesh` and ``vtkPolyData``, and vtk error capture."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkLogger, vtkOutputWindow, vtkPoints, vtkStringOutputWindow
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData
from vtkmodules.vtkFiltersCore import vtkTriangleFilter

from .mesh import Mesh


class VTKError(RuntimeError):
    """Errors reported by vtk during one captured call."""


@contextlib.contextmanager
def captured_vtk_errors() -> Iterator[vtkStringOutputWindow]:
    """Route vtk's messages to a string buffer for the duration of the block, then restore the previous window.

    vtk prints errors to stderr and carries on with an empty output; inside this block they are collected so the
    caller can raise one clear Python error instead. Raises :class:`VTKError` at exit if vtk reported an error.
    """
    previous = vtkOutputWindow.GetInstance()
    window = vtkStringOutputWindow()
    vtkOutputWindow.SetInstance(window)
    # vtk >= 9 also sends every error to vtkLogger, which prints it to stderr whatever the output window;
    # silence that sink too (vtkLogger has no getter for it: restore the overall cutoff, its value by default).
    stderr_verbosity = vtkLogger.GetCurrentVerbosityCutoff()
    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_OFF)
    try:
        yield window
    except VTKError:  # a check inside the block failed: vtk's own report, if any, says more
        messages = _error_messages(window.GetOutput())
        if messages:
            raise VTKError(messages[0]) from None
        raise
    finally:
        vtkLogger.SetStderrVerbosity(vtkLogger.ConvertToVerbosity(stderr_verbosity))
        vtkOutputWindow.SetInstance(previous)
    messages = _error_messages(window.GetOutput())
    if messages:
        raise VTKError(messages[0])


_MESSAGE_HEAD = re.compile(r"^(ERROR|Warning|Generic Warning): In .*, line \d+$")


def _error_messages(text: str | bytes) -> list[str]:
    """The errors in an output window's text, plus the warnings that report an error (legacy readers report
    "Error reading binary data!" of a truncated file as a warning). Each is the message line without pointers."""
    if isinstance(text, bytes):  # vtk hands back text that is not valid UTF-8 (it quotes a binary file) as bytes
        text = text.decode("utf-8", errors="replace")
    messages = []
    lines = [line.strip() for line in text.splitlines()]
    for index, line in enumerate(lines):
        head = _MESSAGE_HEAD.match(line)
        if head:
            body = next((ln for ln in lines[index + 1 :] if ln), "")
            if head.group(1) == "ERROR" or re.search(r"\berror\b", body, flags=re.IGNORECASE):
                messages.append(re.sub(r"\s*\(0x[0-9a-fA-F]+\)", "", body) or line)
        elif "ERR|" in line:  # vtkLogger's one-line format
            messages.append(re.sub(r"^.*?ERR\|\s*", "", line))
    return messages or ([text.strip()] if "ERROR" in text else [])


def _to_numpy(array) -> np.ndarray:
    """A numpy copy of a vtk array (vtk may free or reuse its buffer)."""
    return numpy_support.vtk_to_numpy(array).copy()


def polydata_to_mesh(polydata: vtkPolyData, source: str) -> Mesh:
    """Convert polygons (triangulated if needed) and their point/cell arrays into a Mesh.

    Vertices, lines and strips are not surface triangles: strips are triangulated, vertices and lines dropped.
    """
    if polydata.GetNumberOfPolys() + polydata.GetNumberOfStrips() == 0:
        raise ValueError(f"{source} has no surface polygons (found {polydata.GetNumberOfCells()} cells, none a polygon)")
    needs_triangulation = polydata.GetNumberOfStrips() > 0 or polydata.GetNumberOfVerts() + polydata.GetNumberOfLines() > 0
    if not needs_triangulation:
        offsets = _to_numpy(polydata.GetPolys().GetOffsetsArray())
        needs_triangulation = bool(np.any(np.diff(offsets) != 3))
    if needs_triangulation:
        triangulate = vtkTriangleFilter()
        triangulate.SetInputData(polydata)
        triangulate.PassVertsOff()
        triangulate.PassLinesOff()
        triangulate.Update()
        polydata = triangulate.GetOutput()
    vertices = _to_numpy(polydata.GetPoints().GetData()).astype(np.float64)
    triangles = _to_numpy(polydata.GetPolys().GetConnectivityArray()).astype(np.int64).reshape(-1, 3)
    point_data = _arrays(polydata.GetPointData())
    cell_data = _arrays(polydata.GetCellData())
    try:
        return Mesh(vertices, triangles, point_data, cell_data)
    except (ValueError, TypeError) as error:  # e.g. a polygon indexing a vertex the file does not hold
        raise ValueError(f"{source}: {error}") from None


def _arrays(data) -> dict[str, np.ndarray]:
    arrays = {}
    for index in range(data.GetNumberOfArrays()):
        array = data.GetArray(index)
        if array is None or not array.GetName():
            continue
        arrays[array.GetName()] = _to_numpy(array)
    return arrays


def mesh_to_polydata(mesh: Mesh) -> vtkPolyData:
    """Build a vtkPolyData holding the mesh's triangles and arrays (deep copies)."""
    polydata = vtkPolyData()
    points = vtkPoints()
    points.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(mesh.vertices), deep=True))
    polydata.SetPoints(points)
    cells = vtkCellArray()
    offsets = np.arange(0, 3 * mesh.n_triangles + 1, 3, dtype=np.int64)
    cells.SetData(
        numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True),
        numpy_support.numpy_to_vtkIdTypeArray(np.ascontiguousarray(mesh.triangles.reshape(-1)), deep=True),
    )
    polydata.SetPolys(cells)
    for target, arrays in ((polydata.GetPointData(), mesh.point_data), (polydata.GetCellData(), mesh.cell_data)):
        for name, values in arrays.items():
            try:
                vtk_array = numpy_support.numpy_to_vtk(np.ascontiguousarray(values), deep=True)
            except (TypeError, ValueError, AssertionError) as error:  # numpy_support asserts on ndim > 2
                raise VTKError(
                    f"vtk cannot store the array {name!r} (dtype {values.dtype}, shape {values.shape}): "
                    f"{error or 'only 1-D and 2-D arrays are supported'}"
                ) from None
            vtk_array.SetName(name)
            target.AddArray(vtk_array)
    return polydata
