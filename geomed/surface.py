"""Surface meshes extracted from masks and label maps, in world RAS millimetres."""

from __future__ import annotations

import numpy as np
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonCore import vtkDoubleArray
from vtkmodules.vtkFiltersCore import (vtkFlyingEdges3D, vtkImplicitPolyDataDistance, vtkSurfaceNets3D,
                                       vtkWindowedSincPolyDataFilter)
from vtkmodules.vtkFiltersGeneral import vtkDiscreteFlyingEdges3D

from ._vtk import VTKError, captured_vtk_errors, mesh_to_polydata, polydata_to_mesh
from .image import Image
from .mesh import Mesh

METHODS = ("surface_nets", "flying_edges")


def mask_to_mesh(
    mask: Image,
    label: int | str | None = None,
    *,
    method: str = "surface_nets",
    smoothing_iterations: int = 20,
) -> Mesh:
    """Extract the closed boundary surface of a mask (or of one label of a label map) in world RAS mm.

    Parameters
    ----------
    mask : Image
        A binary mask (voxels > 0.5 are inside), or a label map when ``label`` is given.
    label : int or str, optional
        The label id, or a name from ``mask.label_names``, whose region to extract.
    method : {"surface_nets", "flying_edges"}
        ``"surface_nets"`` (vtkSurfaceNets3D, default): the unsmoothed surface nets enclose exactly the voxel
        volume. ``"flying_edges"``: discrete flying edges (vtkDiscreteFlyingEdges3D), whose surface cuts voxel
        corners (about 1% less volume on a 1 mm hippocampus).
    smoothing_iterations : int
        Iterations of windowed-sinc smoothing (a low-pass filter that, unlike Laplacian smoothing, does not
        shrink the surface: the hippocampus loses < 0.5% of its volume at the default). 0 keeps the staircase.

    Returns
    -------
    Mesh
        Triangles wound so that normals point outwards; closed where the region does not touch a hole. A region
        cut by the image border is closed along the border (the image is padded with background).

    Notes
    -----
    Smoothing runs in scaled voxel coordinates (anisotropic spacing in mm, no rotation); vertices are then mapped
    through the full affine. Only the region's bounding box is processed, so large label maps stay cheap.
    """
    if not isinstance(mask, Image):
        raise TypeError(f"mask must be a geomed.Image, got {type(mask).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(smoothing_iterations, (int, np.integer)) or smoothing_iterations < 0:
        raise ValueError(f"smoothing_iterations must be a non-negative integer, got {smoothing_iterations!r}")
    if mask.array.ndim != 3:
        raise ValueError(f"mask must be a scalar image (I, J, K), got shape {tuple(mask.array.shape)}")
    inside = _region(mask, label)
    occupied = np.nonzero(inside.any(axis=(1, 2)))[0], np.nonzero(inside.any(axis=(0, 2)))[0], np.nonzero(
        inside.any(axis=(0, 1))
    )[0]
    if any(len(axis) == 0 for axis in occupied):
        what = "mask is empty" if label is None else f"label {label!r} is absent from the image"
        raise ValueError(f"{what}: there is no surface to extract")
    lower = np.array([axis[0] for axis in occupied])
    upper = np.array([axis[-1] + 1 for axis in occupied])
    box = np.zeros(tuple(upper - lower + 2), dtype=np.uint8)
    box[1:-1, 1:-1, 1:-1] = inside[lower[0] : upper[0], lower[1] : upper[1], lower[2] : upper[2]]
    spacing = mask.spacing
    try:
        with captured_vtk_errors():
            polydata = _extract(box, spacing, method, int(smoothing_iterations))
    except VTKError as error:
        raise ValueError(f"surface extraction ({method}) failed: {error}") from None
    mesh = polydata_to_mesh(polydata, f"the {method} surface")
    index = mesh.vertices / spacing + (lower - 1)
    surface = Mesh(mask.index_to_world(index), mesh.triangles)
    return _outward(surface)


def probability_to_mesh(
    probability: Image,
    channel: int | None = None,
    *,
    calibration: float | None = None,
    smoothing_iterations: int = 20,
) -> Mesh:
    r"""Extract the closed boundary surface of a probability map (a soft segmentation) in world RAS mm.

    The surface is the map's 0.5 level placed to sub-voxel accuracy, enclosing the volume that the probabilities
    give. A probability is not a volume fraction (a segmenter trained on binary labels is sure of most voxels that
    the boundary cuts), so the map is modelled as a monotone, symmetric calibration curve of the partial volume f,
    :math:`p = h_\beta(f) = f^\beta / (f^\beta + (1 - f)^\beta)` (β = 1: p is the partial volume, as FSL FAST's
    maps; β > 1: sharper, as softmax outputs), which is inverted voxel by voxel.

    1. The 0.5 level of the trilinearly interpolated map (flying edges), smoothed by windowed-sinc iterations.
    2. β, unless given: the value that best predicts the map (least squares over the voxels the boundary cuts)
       from the exact partial volumes of that surface on the image's grid (:func:`geomed.voxelize.
       mesh_to_partial_volume`).
    3. The volume :math:`\sum_v h_\beta^{-1}(p_v)` × voxel volume, and the surface moved along its normals by the
       uniform distance (a few hundredths of a mm) that makes it enclose that volume.

    Parameters
    ----------
    probability : Image
        Probabilities in [0, 1] (any float or integer type; no NaN), scalar (I, J, K) or multi-component
        (I, J, K, C) with ``channel`` picking the structure's component (e.g. an nnU-Net ``--save_probabilities``
        map, SynthSeg posteriors, an FSL FAST partial-volume map). A binary mask works too: its volume is then the
        voxel count.
    channel : int, optional
        The component of a multi-component map (0-based); required for those, refused for scalar maps.
    calibration : float, optional
        β of the calibration curve if known; default: fitted to the map.
    smoothing_iterations : int
        Windowed-sinc iterations of the 0.5 level (as :func:`mask_to_mesh`); 0 keeps the raw level set.

    Returns
    -------
    Mesh
        Closed where the structure does not touch a hole, outward-wound, in world RAS mm; its enclosed volume
        (mm³) is the probability-based volume.

    Raises
    ------
    ValueError
        Values outside [0, 1] or NaN, a map with no voxel above 0.5, a missing, out-of-range or superfluous
        ``channel``, a non-positive ``calibration``.
    TypeError
        ``probability`` not an :class:`Image`.
    """
    if not isinstance(probability, Image):
        raise TypeError(f"probability must be a geomed.Image, got {type(probability).__name__}")
    if not isinstance(smoothing_iterations, (int, np.integer)) or smoothing_iterations < 0:
        raise ValueError(f"smoothing_iterations must be a non-negative integer, got {smoothing_iterations!r}")
    if calibration is not None and not (np.isfinite(calibration) and calibration > 0):
        raise ValueError(f"calibration must be a positive number (β of the calibration curve), got {calibration!r}")
    values = _channel(probability, channel).astype(np.float64)
    if np.isnan(values).any():
        raise ValueError(f"probability map holds {int(np.isnan(values).sum())} NaN voxel(s)")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"probabilities must lie in [0, 1], got values in [{low:g}, {high:g}] (a label map? give "
                         "its label)")
    above = values > 0.5
    if not above.any():
        raise ValueError(f"no voxel has a probability above 0.5 (largest {high:g}): there is no surface to extract")
    support = values > 0
    occupied = [np.nonzero(support.any(axis=tuple(a for a in range(3) if a != axis)))[0] for axis in range(3)]
    lower = np.array([axis[0] for axis in occupied])
    upper = np.array([axis[-1] + 1 for axis in occupied])
    box = np.pad(values[lower[0]:upper[0], lower[1]:upper[1], lower[2]:upper[2]], 1)
    affine = probability.affine.copy()
    affine[:3, 3] = probability.index_to_world((lower - 1)[None])[0]
    grid = Image(np.zeros((1, 1, 1), np.uint8), affine)
    try:
        with captured_vtk_errors():
            polydata = _level_set(box, grid.spacing, 0.5, int(smoothing_iterations))
    except VTKError as error:
        raise ValueError(f"surface extraction (flying edges at 0.5) failed: {error}") from None
    mesh = polydata_to_mesh(polydata, "the 0.5 level")
    surface = _outward(Mesh(grid.index_to_world(mesh.vertices / grid.spacing), mesh.triangles))
    if calibration is None:
        calibration = _fitted_calibration(box, surface, affine)
    target = float(_uncalibrated(box, calibration).sum()) * grid.voxel_volume
    return _with_volume(surface, target)


_CALIBRATION_RANGE = (0.25, 8.0)  # β searched: from much flatter to much sharper than the partial volume


def _channel(image: Image, channel: int | None) -> np.ndarray:
    """The scalar map of ``image`` (its ``channel`` if it has components), checked."""
    array = image.array
    if array.ndim == 3:
        if channel is not None:
            raise ValueError(f"channel applies to multi-component maps only; this map is scalar {image.shape}")
        return array
    components = array.shape[3]
    if channel is None:
        raise ValueError(f"the map has {components} components: give the channel (0..{components - 1})")
    if not isinstance(channel, (int, np.integer)) or isinstance(channel, bool) or not 0 <= channel < components:
        raise ValueError(f"channel must be an integer in 0..{components - 1} for this map, got {channel!r}")
    return array[..., int(channel)]


def _level_set(box: np.ndarray, spacing: np.ndarray, level: float, iterations: int):
    """Flying edges of ``box`` (scaled voxel coordinates) at ``level``, windowed-sinc smoothed."""
    image = vtkImageData()
    image.SetDimensions(*box.shape)
    image.SetSpacing(*spacing)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(box.reshape(-1, order="F"), deep=True))
    edges = vtkFlyingEdges3D()
    edges.SetInputData(image)
    edges.SetValue(0, level)
    edges.ComputeNormalsOff()
    edges.ComputeGradientsOff()
    edges.ComputeScalarsOff()
    edges.Update()
    if iterations == 0:
        return edges.GetOutput()
    return _windowed_sinc(edges.GetOutput(), iterations)


def _calibrated(fraction: np.ndarray, beta: float) -> np.ndarray:
    """h_β(f) = f^β / (f^β + (1 − f)^β)."""
    inside, outside = fraction**beta, (1.0 - fraction) ** beta
    return inside / (inside + outside)


def _uncalibrated(probability: np.ndarray, beta: float) -> np.ndarray:
    """h_β⁻¹(p): the partial volume a probability stands for."""
    return _calibrated(probability, 1.0 / beta)


def _fitted_calibration(box: np.ndarray, surface: Mesh, affine: np.ndarray) -> float:
    """β that best predicts the map from the exact partial volumes of ``surface`` on its grid (least squares over
    the voxels that the surface or the map says are cut); 1 when no voxel is cut (a binary mask)."""
    from scipy.optimize import minimize_scalar

    from .voxelize import mesh_to_partial_volume

    fractions = mesh_to_partial_volume(surface, affine, box.shape, supersampling=4).array
    cut = ((fractions > 0) & (fractions < 1)) | ((box > 0) & (box < 1))
    if not ((box > 0) & (box < 1)).any():
        return 1.0
    observed, predicted = box[cut], fractions[cut]
    fit = minimize_scalar(lambda beta: float(((observed - _calibrated(predicted, beta)) ** 2).sum()),
                          bounds=_CALIBRATION_RANGE, method="bounded", options={"xatol": 1e-3})
    return float(fit.x)


def _with_volume(mesh: Mesh, target: float) -> Mesh:
    """``mesh`` moved along its (two-ring smoothed) normals by the uniform distance that makes it enclose
    ``target`` mm³ (Newton steps on V(t) ≈ V + A t)."""
    from .morphometry import enclosed_volume

    normals = mesh.vertex_normals(NORMAL_SMOOTHING)
    area = float(mesh.triangle_areas().sum())
    offset = 0.0
    for _ in range(4):
        enclosed = enclosed_volume(mesh.vertices + offset * normals, mesh.triangles)
        if abs(enclosed - target) <= 1e-9 * target:
            break
        offset += (target - enclosed) / area
    return Mesh(mesh.vertices + offset * normals, mesh.triangles)


def _region(mask: Image, label: int | str | None) -> np.ndarray:
    if label is None:
        return np.asarray(mask.array > 0.5)
    return np.asarray(mask.array == mask.label_id(label))


def _extract(box: np.ndarray, spacing: np.ndarray, method: str, iterations: int):
    image = vtkImageData()
    image.SetDimensions(*box.shape)
    image.SetSpacing(*spacing)
    scalars = numpy_support.numpy_to_vtk(box.reshape(-1, order="F"), deep=True)
    image.GetPointData().SetScalars(scalars)
    if method == "surface_nets":
        nets = vtkSurfaceNets3D()
        nets.SetInputData(image)
        nets.SetValue(0, 1)
        nets.SetOutputMeshTypeToTriangles()
        nets.SetOutputStyleToBoundary()
        nets.SmoothingOff()
        extractor = nets
    else:
        extractor = vtkDiscreteFlyingEdges3D()
        extractor.SetInputData(image)
        extractor.SetValue(0, 1)
        extractor.ComputeNormalsOff()
        extractor.ComputeGradientsOff()
    extractor.Update()
    if iterations == 0:
        return extractor.GetOutput()
    return _windowed_sinc(extractor.GetOutput(), iterations)


def smooth_mesh(mesh: Mesh, iterations: int = 20) -> Mesh:
    """Windowed-sinc smoothing of a triangle mesh (a low-pass filter that, unlike Laplacian smoothing, barely
    shrinks it), the same filter :func:`mask_to_mesh` applies; point and cell arrays are dropped.

    Parameters
    ----------
    mesh : Mesh
    iterations : int
        Filter iterations (more: smoother; 20–150 are typical).
    """
    if not isinstance(mesh, Mesh) or mesh.n_triangles == 0:
        raise ValueError("mesh must be a triangle Mesh with triangles")
    if not isinstance(iterations, (int, np.integer)) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    with captured_vtk_errors():
        polydata = _windowed_sinc(mesh_to_polydata(mesh), int(iterations))
    return polydata_to_mesh(polydata, "the smoothed surface")


def _windowed_sinc(polydata, iterations: int):
    smooth = vtkWindowedSincPolyDataFilter()
    smooth.SetInputData(polydata)
    smooth.SetNumberOfIterations(iterations)
    smooth.SetPassBand(0.1)
    smooth.NormalizeCoordinatesOn()
    smooth.BoundarySmoothingOff()
    smooth.FeatureEdgeSmoothingOff()
    smooth.NonManifoldSmoothingOn()
    smooth.Update()
    return smooth.GetOutput()


def _outward(mesh: Mesh) -> Mesh:
    """Reverse the winding if the signed enclosed volume is negative (normals pointing inwards)."""
    a, b, c = (mesh.vertices[mesh.triangles[:, k]] for k in range(3))
    signed_volume = np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0
    if signed_volume < 0:
        return Mesh(mesh.vertices, mesh.triangles[:, ::-1])
    return mesh


def distance_to_surface(points: np.ndarray, mesh: Mesh) -> np.ndarray:
    """Euclidean distance (mm) of each of ``points`` (N, 3) to the nearest point of ``mesh``'s triangles (not only
    its vertices), (N,): VTK's implicit polydata distance."""
    distance = vtkImplicitPolyDataDistance()
    distance.SetInput(mesh_to_polydata(mesh))
    signed = vtkDoubleArray()
    distance.FunctionValue(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True),
                           signed)
    return np.abs(numpy_support.vtk_to_numpy(signed))


NORMAL_SMOOTHING = 2  # rings of neighbours over which the ray directions and Phong normals are averaged


def distance_along_normals(surface: Mesh, target: Mesh, *, max_distance: float = 3.0,
                           candidates: int = 16) -> np.ndarray:
    """Signed distance (mm) from each vertex of ``surface`` along its outward normal to ``target``, shape (V,).

    Each vertex casts a line along its normal, averaged over ``NORMAL_SMOOTHING`` rings of neighbours (the
    normal of the smooth surface, not of the crumpled corners a surface from a voxel mask has at the scale of its
    edges). Of the crossings of ``target`` triangles within ``max_distance`` that do not face the other way (within
    120°: the far side of a thin sheet, e.g. cartilage, is never taken), the one nearest to a first guess is kept:
    the distance to the tangent plane of the nearest target vertex. > 0 when the target lies outside the vertex.
    A vertex whose line finds no crossing keeps that guess; NaN remains where the guess too is beyond
    ``max_distance`` (an open rim, or a larger change). This is the edge motion of SIENA measured on surfaces.

    A triangle mesh cuts the corners of the smooth surface it samples (by ≈ h²κ/8 for edges of length h on
    curvature κ, hundredths to tenths of a millimetre on a hippocampus mesh from a 1 mm mask), which would read as
    shrinkage. So the crossing is moved halfway from the triangle to its Phong surface (Boubekeur & Alexa 2008:
    the barycentric mix of the point's projections onto the three vertices' tangent planes). Of a quadratic patch
    through the vertices with their normals, the triangle lies above by ½Σwᵢqᵢ and the Phong surface below by as
    much (qᵢ the patch's quadratic form on the offset to vertex i), so the midpoint is exact to second order.

    Parameters
    ----------
    surface, target : Mesh
        Outward-wound triangle meshes in the same space (align them first, e.g. with a rigid registration).
    max_distance : float
        Largest |distance| searched, mm.
    candidates : int
        Target triangles tested per vertex (those nearest to the first guess of the crossing).
    """
    if max_distance <= 0:
        raise ValueError(f"max_distance must be positive (mm), got {max_distance}")
    for name, mesh in (("surface", surface), ("target", target)):
        if not isinstance(mesh, Mesh) or mesh.n_triangles == 0:
            raise ValueError(f"{name} must be a triangle Mesh with triangles")
    from scipy.spatial import cKDTree

    origins, directions = surface.vertices.astype(np.float64), surface.vertex_normals(NORMAL_SMOOTHING)
    target_normals = target.vertex_normals(NORMAL_SMOOTHING)
    _, nearest = cKDTree(target.vertices).query(origins)
    facing = np.maximum(np.einsum("ij,ij->i", directions, target_normals[nearest]), 0.5)
    plane = np.einsum("ij,ij->i", target.vertices[nearest] - origins, target_normals[nearest]) / facing
    guess = np.clip(plane, -max_distance, max_distance)
    tree = cKDTree(target.triangle_centroids())
    count = min(candidates, target.n_triangles)
    best = np.full(len(origins), np.inf)
    distance = np.full(len(origins), np.nan)
    for centres in (origins + guess[:, None] * directions, origins):
        _, triangles = tree.query(centres, k=count)
        triangles = triangles.reshape(len(origins), count)
        along, hit = _phong_crossings(origins, directions, target, target_normals, triangles)
        hit &= np.abs(along) <= max_distance
        gap = np.abs(along - guess[:, None])
        pick = np.argmin(np.where(hit, gap, np.inf), axis=1)
        rows = np.arange(len(origins))
        closer = hit[rows, pick] & (gap[rows, pick] < best)
        best[closer] = gap[rows, pick][closer]
        distance[closer] = along[rows, pick][closer]
    fallback = np.isnan(distance) & (np.abs(plane) <= max_distance)
    distance[fallback] = plane[fallback]
    return distance


def _phong_crossings(origins, directions, target: Mesh, target_normals, triangles):
    """Where the lines ``origins + t·directions`` (N, 3) cross the candidate ``triangles`` (N, K) of ``target``
    (Möller–Trumbore), moved halfway to the Phong surface: (t (N, K), valid (N, K))."""
    corners = target.vertices[target.triangles[triangles]]  # (N, K, 3 corners, 3)
    a, edge1, edge2 = corners[:, :, 0], corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0]
    ray = directions[:, None, :]
    p = np.cross(ray, edge2)
    det = np.einsum("nkj,nkj->nk", edge1, p)
    safe = np.where(np.abs(det) > 1e-12, det, 1.0)
    offset = origins[:, None, :] - a
    u = np.einsum("nkj,nkj->nk", offset, p) / safe
    q = np.cross(offset, edge1)
    v = np.einsum("nkj,nkj->nk", ray, q) / safe
    t = np.einsum("nkj,nkj->nk", edge2, q) / safe
    tolerance = 1e-9
    valid = (np.abs(det) > 1e-12) & (u >= -tolerance) & (v >= -tolerance) & (u + v <= 1 + tolerance)
    area_normal = np.cross(edge1, edge2)
    facing = np.einsum("nkj,nkj->nk", area_normal, ray) / np.maximum(np.linalg.norm(area_normal, axis=-1), 1e-300)
    valid &= facing > -0.5
    weights = np.stack([1 - u - v, u, v], axis=-1)[..., None]  # (N, K, 3, 1)
    point = origins[:, None, :] + t[..., None] * ray
    normals = target_normals[target.triangles[triangles]]  # (N, K, 3, 3)
    heights = np.einsum("nkcj,nkcj->nkc", point[:, :, None, :] - corners, normals)
    phong = point - 0.5 * (weights * heights[..., None] * normals).sum(axis=2)
    normal = (weights * normals).sum(axis=2)
    along_normal = np.einsum("nkj,nkj->nk", ray, normal)
    t = t + np.einsum("nkj,nkj->nk", phong - point, normal) / np.where(np.abs(along_normal) > 1e-6, along_normal, 1.0)
    return t, valid
