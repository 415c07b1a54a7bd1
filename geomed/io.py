"""Reading and writing meshes (vtk, GIfTI) and images (SimpleITK), always in world RAS millimetres.

Images
    SimpleITK works in LPS; every image is converted on reading (``affine = diag(-1, -1, 1, 1) @ affine_LPS``)
    with its full direction matrix, and back on writing.
Meshes
    Files hold coordinates in whatever frame their writer used. 3D Slicer (≥ 4.11) records it in the file as
    ``SPACE=LPS`` or ``SPACE=RAS`` (legacy .vtk / .stl header, .ply / .obj comment, .vtp field array
    ``SPACE``); :func:`read_mesh` honours that record, and :func:`write_mesh` writes one the same way, so Slicer
    reads geomed's files in place.

Writes are atomic: a file (or DICOM folder) appears complete under its name, or not at all.

For applications that hold vtk objects themselves (the 3D Slicer module): :func:`mesh_to_polydata` and
:func:`polydata_to_mesh` convert in memory, with point data; :func:`file_stem` makes a name safe as a file name.
"""

from __future__ import annotations

import contextlib
import locale
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from vtkmodules.vtkCommonCore import vtkStringArray
from vtkmodules.vtkFiltersGeometry import vtkGeometryFilter
from vtkmodules.vtkIOGeometry import vtkOBJReader, vtkSTLReader, vtkSTLWriter
from vtkmodules.vtkIOLegacy import vtkPolyDataReader, vtkPolyDataWriter, vtkUnstructuredGridReader
from vtkmodules.vtkIOPLY import vtkPLYReader, vtkPLYWriter
from vtkmodules.vtkIOXML import vtkXMLPolyDataReader, vtkXMLPolyDataWriter

from ._files import atomic_path, file_stem, file_suffix, readable_input
from ._integrity import check_nifti_complete, check_ply_complete
from ._vtk import VTKError, captured_vtk_errors, mesh_to_polydata, polydata_to_mesh
from .image import Image
from .mesh import Mesh

logger = logging.getLogger(__name__)

MESH_FORMATS = (".vtk", ".vtp", ".stl", ".ply", ".obj", ".gii")
IMAGE_FORMATS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_SPACES = ("RAS", "LPS")


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    readable_input(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty")
    return path


# ---------------------------------------------------------------------------------------------------- meshes
def read_mesh(path: str | os.PathLike, *, space: str | None = None) -> Mesh:
    """Read a triangle surface mesh (.vtk, .vtp, .stl, .ply, .obj, .gii) into RAS millimetres.

    Parameters
    ----------
    path : path
        The mesh file. Polygons are triangulated; point and cell arrays are kept (.vtk, .vtp, .gii).
    space : {"RAS", "LPS"}, optional
        The frame the file's coordinates are in. Default: the ``SPACE=`` record written by 3D Slicer (or geomed)
        if the file has one, else RAS. An explicit value overrides the record (with a warning if they differ).
        LPS coordinates (and the 3-vector arrays ``Normals`` of the file) are converted to RAS.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the format is unknown, the file is unreadable or truncated, or it holds no surface polygons.
    """
    path = _existing_file(path)
    if space is not None and space not in _SPACES:
        raise ValueError(f"space must be 'RAS' or 'LPS', got {space!r}")
    suffix = file_suffix(path)
    if suffix not in MESH_FORMATS:
        raise ValueError(f"{path}: unknown mesh format {suffix!r}; expected one of {', '.join(MESH_FORMATS)}")
    if suffix == ".gii":
        mesh, recorded = _read_gifti(path), None
    else:
        try:
            with captured_vtk_errors():
                polydata, recorded = _read_vtk_family(path, suffix)
        except VTKError as error:
            raise ValueError(f"{path}: could not read the {suffix} mesh (broken or truncated file?): {error}") from None
        mesh = polydata_to_mesh(polydata, str(path))
    if space is not None and recorded is not None and space != recorded:
        logger.warning("%s records SPACE=%s but space=%r was given; using %s", path, recorded, space, space)
    if (space or recorded or "RAS") == "LPS":
        mesh = _flip_lps_ras(mesh)
    return mesh


def _space_in(text: str | bytes | None) -> str | None:
    if isinstance(text, bytes):  # vtk returns a binary STL header that is not valid UTF-8 as bytes
        text = text.decode("latin-1")
    match = re.search(r"SPACE\s*=\s*(RAS|LPS)", text or "", flags=re.IGNORECASE)
    return match.group(1).upper() if match else None


def _read_vtk_family(path: Path, suffix: str):
    if suffix == ".vtk":
        reader = vtkPolyDataReader()
        reader.SetFileName(str(path))
        if reader.IsFileUnstructuredGrid():
            reader = vtkUnstructuredGridReader()
            reader.SetFileName(str(path))
        elif not reader.IsFilePolyData():
            raise VTKError("the legacy .vtk file holds neither polydata nor an unstructured grid")
        for option in ("Scalars", "Vectors", "Normals", "Tensors", "ColorScalars", "TCoords", "Fields"):
            getattr(reader, f"ReadAll{option}On")()
        reader.Update()
        output, recorded = reader.GetOutput(), _space_in(reader.GetHeader())
        if isinstance(reader, vtkUnstructuredGridReader):
            surface = vtkGeometryFilter()
            surface.SetInputData(output)
            surface.Update()
            output = surface.GetOutput()
        return output, recorded
    if suffix == ".ply":
        try:
            check_ply_complete(path)
        except (ValueError, IndexError) as error:
            raise VTKError(f"malformed PLY header or data: {error}") from None
    reader = {".vtp": vtkXMLPolyDataReader, ".stl": vtkSTLReader, ".ply": vtkPLYReader, ".obj": vtkOBJReader}[suffix]()
    reader.SetFileName(str(path))
    reader.Update()
    output = reader.GetOutput()
    if suffix == ".vtp":
        field = output.GetFieldData().GetAbstractArray("SPACE")
        recorded = _space_in(f"SPACE={field.GetValue(0)}") if field is not None and field.GetNumberOfValues() else None
    elif suffix == ".stl":
        recorded = _space_in(reader.GetHeader())
    elif suffix == ".ply":
        comments = reader.GetComments()
        recorded = next(
            (s for s in (_space_in(comments.GetValue(i)) for i in range(comments.GetNumberOfValues())) if s), None
        )
    else:
        recorded = _space_in(reader.GetComment())
    if output.GetNumberOfPoints() == 0:
        raise VTKError("the file holds no points")
    return output, recorded


def _flip_lps_ras(mesh: Mesh) -> Mesh:
    """LPS ↔ RAS: negate x and y of the vertices and of the direction arrays named ``Normals``.

    The map is a rotation by 180° about z (determinant +1), so triangle winding is unchanged.
    """
    flip = np.array([-1.0, -1.0, 1.0])

    def flipped(arrays):
        return {
            name: values * flip if name == "Normals" and values.ndim == 2 and values.shape[1] == 3 else values
            for name, values in arrays.items()
        }

    return Mesh(mesh.vertices * flip, mesh.triangles, flipped(mesh.point_data), flipped(mesh.cell_data))


def _read_gifti(path: Path) -> Mesh:
    nibabel = _import_nibabel(path)
    try:
        gifti = nibabel.load(str(path))
        coordinates = gifti.agg_data("NIFTI_INTENT_POINTSET")
        triangles = gifti.agg_data("NIFTI_INTENT_TRIANGLE")
    except Exception as error:  # nibabel raises many types for broken XML
        raise ValueError(f"{path}: could not read the GIfTI surface (broken or truncated file?): {error}") from None
    if coordinates is None or triangles is None or len(coordinates) == 0:
        raise ValueError(f"{path}: the GIfTI file needs a POINTSET and a TRIANGLE data array")
    point_data = {}
    for index, array in enumerate(gifti.darrays):
        if array.intent in (1008, 1009):  # NIFTI_INTENT_POINTSET, NIFTI_INTENT_TRIANGLE
            continue
        if len(array.data) == len(coordinates):
            point_data[array.meta.get("Name", f"array_{index}")] = np.asarray(array.data)
    try:
        return Mesh(coordinates, triangles, point_data)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}: {error}") from None


def _import_nibabel(path: Path):
    try:
        import nibabel
    except ImportError:
        raise ValueError(f"{path}: GIfTI files need nibabel (pip install 'geomed[gifti]')") from None
    return nibabel


def write_mesh(mesh: Mesh, path: str | os.PathLike, *, space: str = "RAS") -> None:
    """Write a mesh to .vtk, .vtp, .stl, .ply, .obj or .gii, atomically.

    Parameters
    ----------
    mesh : Mesh
        Vertices in RAS mm.
    path : path
        Output file; its extension picks the format. Point and cell arrays are written to .vtk and .vtp
        (point arrays also to .gii); other formats cannot hold them and a warning lists what is dropped.
    space : {"RAS", "LPS"}
        Frame of the written coordinates, recorded in the file as 3D Slicer does (``SPACE=RAS``), except in
        GIfTI, which is RAS by convention (``space="LPS"`` is refused there).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a geomed.Mesh, got {type(mesh).__name__}")
    if space not in _SPACES:
        raise ValueError(f"space must be 'RAS' or 'LPS', got {space!r}")
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in MESH_FORMATS:
        raise ValueError(f"{path}: unknown mesh format {suffix!r}; expected one of {', '.join(MESH_FORMATS)}")
    if suffix == ".gii" and space != "RAS":
        raise ValueError(f"{path}: GIfTI surfaces are RAS by convention; write them with space='RAS'")
    dropped = {
        ".vtk": [], ".vtp": [], ".gii": list(mesh.cell_data),
    }.get(suffix, [*mesh.point_data, *mesh.cell_data])
    if dropped:
        logger.warning("%s: the %s format cannot hold the arrays %s; they are not written", path, suffix, dropped)
    stored = _flip_lps_ras(mesh) if space == "LPS" else mesh
    with atomic_path(path) as temporary:
        if suffix == ".gii":
            _write_gifti(stored, temporary)
        elif suffix == ".obj":
            _write_obj(stored, temporary, space)
        else:
            try:
                with captured_vtk_errors():
                    _write_vtk_family(stored, temporary, suffix, space)
            except VTKError as error:
                raise ValueError(f"{path}: could not write the mesh: {error}") from None


def _write_vtk_family(mesh: Mesh, path: Path, suffix: str, space: str) -> None:
    # .stl and .ply drop the arrays (write_mesh warns): do not hand them to vtk, which may not hold them at all
    polydata = mesh_to_polydata(mesh if suffix in (".vtk", ".vtp") else Mesh(mesh.vertices, mesh.triangles))
    header = f"geomed output. SPACE={space}"
    if suffix == ".vtk":
        writer = vtkPolyDataWriter()
        writer.SetFileVersion(42)
        writer.SetFileTypeToBinary()
        writer.SetHeader(header)
    elif suffix == ".vtp":
        record = vtkStringArray()
        record.SetName("SPACE")
        record.InsertNextValue(space)
        polydata.GetFieldData().AddArray(record)
        writer = vtkXMLPolyDataWriter()
        writer.SetDataModeToAppended()
        writer.SetCompressorTypeToZLib()
    elif suffix == ".stl":
        writer = vtkSTLWriter()
        writer.SetFileTypeToBinary()
        writer.SetHeader(header)
    else:
        writer = vtkPLYWriter()
        writer.SetFileTypeToBinary()
        writer.AddComment(header)
    writer.SetInputData(polydata)
    writer.SetFileName(str(path))
    if not writer.Write():
        raise VTKError(f"the {suffix} writer reported failure")


def _write_obj(mesh: Mesh, path: Path, space: str) -> None:
    with open(path, "w", encoding="ascii") as stream:
        stream.write(f"# geomed output. SPACE={space}\n")
        np.savetxt(stream, mesh.vertices, fmt="v %.17g %.17g %.17g")
        np.savetxt(stream, mesh.triangles + 1, fmt="f %d %d %d")


def _write_gifti(mesh: Mesh, path: Path) -> None:
    nibabel = _import_nibabel(path)
    gifti = nibabel.gifti
    arrays = [
        gifti.GiftiDataArray(mesh.vertices.astype(np.float32), intent="NIFTI_INTENT_POINTSET", datatype="float32"),
        gifti.GiftiDataArray(mesh.triangles.astype(np.int32), intent="NIFTI_INTENT_TRIANGLE", datatype="int32"),
    ]
    for name, values in mesh.point_data.items():
        dtype = "float32" if np.issubdtype(values.dtype, np.floating) else "int32"
        arrays.append(
            gifti.GiftiDataArray(
                values.astype(dtype), intent="NIFTI_INTENT_NONE", datatype=dtype, meta={"Name": name}
            )
        )
    nibabel.save(gifti.GiftiImage(darrays=arrays), str(path))


# ---------------------------------------------------------------------------------------------------- images
def read_image(path: str | os.PathLike, *, series_id: str | None = None) -> Image:
    """Read an image (NIfTI, NRRD, MHA/MHD, or a DICOM series folder) into an :class:`Image` in RAS mm.

    Parameters
    ----------
    path : path
        An image file, or a folder holding one DICOM series.
    series_id : str, optional
        The DICOM SeriesInstanceUID to read when the folder holds several series.

    Notes
    -----
    The voxel array is indexed ``[i, j, k]`` and the affine is SimpleITK's index-to-physical map (origin,
    spacing, full direction matrix) converted from LPS to RAS. 2-D images become one-slice 3-D images.
    """
    path = _existing_file(path)
    try:
        if path.is_dir():
            with _locale_kept():
                image = _read_dicom_series(path, series_id)
        else:
            if file_suffix(path) not in IMAGE_FORMATS:
                logger.info("%s: extension not among %s; trying SimpleITK anyway", path, IMAGE_FORMATS)
            if file_suffix(path) in (".nii", ".nii.gz"):
                check_nifti_complete(path)
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            image = reader.Execute()
    except RuntimeError as error:
        reason = _itk_reason(error)
        raise ValueError(f"{path}: could not read the image (broken, truncated or unsupported file?): {reason}") from None
    return _from_sitk(image, path)


def _itk_reason(error: RuntimeError) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    details = [line for line in lines if not line.startswith(("Exception thrown", "sitk::ERROR")) or ":" in line]
    return (details[-1] if details else str(error)).removeprefix("sitk::ERROR: ")


@contextlib.contextmanager
def _locale_kept() -> Iterator[None]:
    """Restore the process locale after GDCM, which sets it to "C" (Python's open() would then default to ASCII)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _read_dicom_series(folder: Path, series_id: str | None) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise ValueError(f"{folder}: the folder holds no DICOM series")
    if series_id is None:
        if len(series) > 1:
            raise ValueError(f"{folder}: the folder holds {len(series)} DICOM series {list(series)}; pick one with series_id=")
        series_id = series[0]
    elif series_id not in series:
        raise ValueError(f"{folder}: no DICOM series {series_id!r}; found {list(series)}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id))
    return reader.Execute()


def _from_sitk(image: sitk.Image, source: Path) -> Image:
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise ValueError(f"{source}: only 2-D and 3-D images are supported, got a {image.GetDimension()}-D image")
    array = sitk.GetArrayFromImage(image)
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0)) if image.GetNumberOfComponentsPerPixel() > 1 else array.T
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return Image(np.ascontiguousarray(array), affine)


def _to_sitk(image: Image) -> sitk.Image:
    array = image.array.astype(np.uint8) if image.array.dtype == bool else image.array
    vector = array.ndim == 4
    result = sitk.GetImageFromArray(np.moveaxis(array, (0, 1, 2), (2, 1, 0)) if vector else array.T, isVector=vector)
    linear = _LPS_TO_RAS @ image.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise ValueError("image affine has sheared axes; ITK formats need orthogonal directions")
    result.SetSpacing(spacing.tolist())
    result.SetDirection(direction.reshape(-1).tolist())
    result.SetOrigin((_LPS_TO_RAS @ image.affine[:3, 3]).tolist())
    return result


def write_image(image: Image, path: str | os.PathLike) -> None:
    """Write an image atomically: NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd), or a DICOM series.

    Parameters
    ----------
    image : Image
    path : path
        A file with one of those extensions, or a path without extension for a folder of DICOM slices
        (integer voxels only; an existing folder of that name is replaced once the new one is complete).
    """
    if not isinstance(image, Image):
        raise TypeError(f"image must be a geomed.Image, got {type(image).__name__}")
    path = Path(path)
    suffix = file_suffix(path)
    if suffix and suffix not in IMAGE_FORMATS:
        raise ValueError(
            f"{path}: unknown image format {suffix!r}; expected one of {', '.join(IMAGE_FORMATS)} "
            "or a path without extension for a DICOM series folder"
        )
    try:
        itk_image = _to_sitk(image)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if not suffix:
        with atomic_path(path, is_folder=True) as folder:
            with _locale_kept():
                _write_dicom_series(itk_image, folder, path)
        return
    if suffix == ".mhd":
        raise ValueError(f"{path}: .mhd writes a second .raw file that cannot be written atomically; use .mha")
    with atomic_path(path) as temporary:
        try:
            sitk.WriteImage(itk_image, str(temporary), useCompression=suffix in (".nii.gz", ".nrrd", ".mha"))
        except RuntimeError as error:
            raise ValueError(f"{path}: could not write the image: {_itk_reason(error)}") from None


def _write_dicom_series(image: sitk.Image, folder: Path, target: Path) -> None:
    """Write the slices into ``folder`` (a temporary); error messages name ``target``, the folder asked for."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{target}: DICOM series are written for scalar images only")
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{target}: DICOM series are written for integer voxels only, got {array.dtype}")
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for pixel_type, dtype in ((sitk.sitkUInt16, np.uint16), (sitk.sitkInt16, np.int16)):
        if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max:
            image = sitk.Cast(image, pixel_type)
            break
    else:
        raise ValueError(f"{target}: voxel values {low}..{high} do not fit 16-bit DICOM pixels")
    study, series = (_new_dicom_uid() for _ in range(2))
    direction = image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[0::3], *direction[1::3]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
            "0008|0018": f"{series}.{k + 1}",
            "0008|0060": "OT",
            "0020|000d": study,
            "0020|000e": series,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{image.GetSpacing()[2]:.10f}",
            "0028|0030": f"{image.GetSpacing()[1]:.10f}\\{image.GetSpacing()[0]:.10f}",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:05d}.dcm"))
        writer.Execute(slice_)


def _new_dicom_uid() -> str:
    """A fresh DICOM UID under the 2.25 (UUID-derived) root."""
    return f"2.25.{uuid.uuid4().int}"
