r"""Morphometry: volumes and areas of meshes and masks (mm³, mm²), and where and how much a shape changed.

Between a baseline surface and a follow-up, two estimates of the volume change answer "how much", and should
agree:

- **direct**: the difference of the enclosed volumes (divergence theorem on each closed surface, or voxel counts);
- **registration-based** (SIENA-like): align the two (a rigid registration takes out the change of position),
  measure how far each baseline vertex moves along its outward normal to reach the follow-up surface (its *normal
  displacement* d_v, mm, > 0 outwards), and take the volume enclosed by the moved surface. To first order the
  change is the flux :math:`\Delta V \approx \sum_v A_v\, d_v` (vertex area times normal displacement), and the
  same sum over a region says *where* the change is.

:func:`percent_volume_change` reports both and their disagreement; :func:`surface_change`,
:func:`local_area_change` and :func:`regional_summary` map the change over the surface.
"""

from __future__ import annotations

import logging

import numpy as np

from .image import Image
from .mesh import Mesh

logger = logging.getLogger(__name__)


def volume(shape: Mesh | Image, label: int | str | None = None) -> float:
    """Volume enclosed by a shape, in mm³.

    Parameters
    ----------
    shape : Mesh or Image
        A closed surface mesh: volume by the divergence theorem, ``Σ_f (a_f · (b_f × c_f)) / 6`` over its
        outward-wound triangles (a warning is logged if the surface has boundary edges). A mask: the sum of the
        occupancies (soft masks count partial volume) times the voxel volume. A label map with ``label``:
        the number of voxels of that label times the voxel volume.
    label : int or str, optional
        For a label map, the label id or a name from ``shape.label_names``.
    """
    if isinstance(shape, Mesh):
        if label is not None:
            raise TypeError("label applies to label maps only, not to a Mesh")
        if shape.n_triangles == 0:
            raise ValueError("mesh has no triangles: it encloses no volume")
        if not shape.is_closed:
            logger.warning("mesh has %d boundary edges: its enclosed volume is approximate",
                           shape.boundary_edge_count())
        return enclosed_volume(shape.vertices, shape.triangles)
    if isinstance(shape, Image):
        if shape.array.ndim != 3:
            raise ValueError(f"image must be scalar (I, J, K), got shape {tuple(shape.array.shape)}")
        if label is None:
            occupancy = shape.array.astype(np.float64)
            if occupancy.min() < 0 or occupancy.max() > 1:
                raise ValueError(
                    f"mask must hold occupancies in [0, 1], got values in [{occupancy.min():g}, {occupancy.max():g}];"
                    " pass label= for a label map"
                )
            return float(occupancy.sum() * shape.voxel_volume)
        label_id = shape.label_id(label)
        return float(np.count_nonzero(shape.array == label_id) * shape.voxel_volume)
    raise TypeError(f"shape must be a geomed.Mesh or geomed.Image, got {type(shape).__name__}")


def enclosed_volume(vertices: np.ndarray, triangles: np.ndarray) -> float:
    """Signed volume enclosed by outward-wound triangles, Σ_f (a_f · (b_f × c_f)) / 6, in mm³ (no checks: the
    inner loop of :func:`volume` and of solvers that move the vertices of one closed mesh many times)."""
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0)


def surface_area(mesh: Mesh) -> float:
    """Total area of a triangle mesh, in mm²."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a geomed.Mesh, got {type(mesh).__name__}")
    return float(mesh.triangle_areas().sum())


def structure_measurements(
    shape: Mesh | Image,
    labels: list[int | str] | None = None,
    *,
    method: str = "surface_nets",
) -> list[dict[str, object]]:
    """Volume and area of each structure of a label map, or of one closed mesh.

    Parameters
    ----------
    shape : Image or Mesh
        A label map (one row per label) or a surface mesh (one row).
    labels : list of int or str, optional
        Label ids or names to measure; default every non-zero label present.
    method : str
        Surface extraction method for label maps (see :func:`geomed.surface.mask_to_mesh`).

    Returns
    -------
    list of dict
        One row per structure: ``structure``, ``label`` (None for a mesh), ``voxels`` and ``voxel_volume_ml``
        (label maps only; voxel count × voxel volume), ``surface_volume_ml`` (enclosed by the mesh, divergence
        theorem; approximate when ``closed`` is False), ``surface_area_cm2`` and ``closed``.
    """
    from .surface import mask_to_mesh

    if isinstance(shape, Mesh):
        if labels is not None:
            raise TypeError("labels apply to label maps only, not to a Mesh")
        return [_surface_row({"structure": "surface", "label": None, "voxels": None, "voxel_volume_ml": None}, shape)]
    if not isinstance(shape, Image):
        raise TypeError(f"shape must be a geomed.Mesh or geomed.Image, got {type(shape).__name__}")
    present, counts = np.unique(shape.array, return_counts=True)
    voxel_counts = dict(zip(present.tolist(), counts.tolist()))
    if labels is None:
        ids = [label for label in voxel_counts if label != 0]
    else:
        ids = [shape.label_id(label) for label in labels]
    rows = []
    for label_id in ids:
        if label_id == 0 or label_id not in voxel_counts:
            raise ValueError(f"label {label_id} is absent from the image; present labels: {sorted(voxel_counts)}")
        count = voxel_counts[label_id]
        row = {
            "structure": (shape.label_names or {}).get(label_id, f"label_{label_id}"),
            "label": int(label_id),
            "voxels": int(count),
            "voxel_volume_ml": count * shape.voxel_volume / 1000.0,
        }
        rows.append(_surface_row(row, mask_to_mesh(shape, label_id, method=method)))
    return rows


def _surface_row(row: dict[str, object], mesh: Mesh) -> dict[str, object]:
    return {
        **row,
        "surface_volume_ml": volume(mesh) / 1000.0,
        "surface_area_cm2": surface_area(mesh) / 100.0,
        "closed": mesh.is_closed,
    }


def flux_volume_change(mesh: Mesh, normal_displacement: np.ndarray) -> float:
    """Volume swept by moving each vertex of a closed surface along its outward normal, to first order, in mm³:
    Σ_v d_v N_v·n_v, with N_v the vertex's area vector (:meth:`Mesh.vertex_area_vectors`; its length is the
    vertex area where the surface is smooth, less in folds) and n_v the smoothed normal that
    :func:`surface_change` moves it along.

    Parameters
    ----------
    mesh : Mesh
        The baseline surface (outward-wound).
    normal_displacement : array (V,)
        Per-vertex displacement along the outward normal (mm).
    """
    from .surface import NORMAL_SMOOTHING

    values = _per_vertex(mesh, normal_displacement, "normal_displacement")
    effective = np.einsum("ij,ij->i", mesh.vertex_area_vectors(), mesh.vertex_normals(NORMAL_SMOOTHING))
    return float(effective @ values)


def surface_change(baseline: Mesh, follow_up: Mesh, transform=None, *, max_distance: float = 3.0) -> Mesh:
    """The baseline surface carried onto the follow-up: by ``transform`` (e.g. a rigid registration, which takes
    out the change of position), then along its outward normals onto the follow-up surface.

    Parameters
    ----------
    baseline, follow_up : Mesh
        Closed, outward-wound surfaces (mm).
    transform : geomed Transform, optional
        φ mapping baseline space to follow-up space (``geomed.register(baseline, follow_up).transform``); default:
        the two are already aligned.
    max_distance : float
        Largest normal displacement searched (mm); vertices with no crossing within it keep φ(x) and get NaN.

    Returns
    -------
    Mesh
        φ(baseline) moved along its vertex normals onto ``follow_up`` (same triangles as ``baseline``), with point
        arrays ``normal displacement`` (mm, > 0 outwards: growth; measured by
        :func:`geomed.surface.distance_along_normals`) and ``area change`` (local area ratio after/before the
        normal motion, :func:`local_area_change`).
    """
    from .surface import NORMAL_SMOOTHING, distance_along_normals

    aligned = baseline
    if transform is not None:
        aligned = Mesh(transform(np.asarray(baseline.vertices, dtype=np.float64)), baseline.triangles)
    distance = distance_along_normals(aligned, follow_up, max_distance=max_distance)
    missing = np.isnan(distance)
    if missing.any():
        logger.warning("%d of %d vertices found no follow-up surface within %g mm along their normals",
                       int(missing.sum()), len(distance), max_distance)
    directions = aligned.vertex_normals(NORMAL_SMOOTHING)
    moved = aligned.vertices + np.where(missing, 0.0, distance)[:, None] * directions
    carried = Mesh(moved, baseline.triangles, dict(baseline.point_data), dict(baseline.cell_data))
    return carried.with_point_data(**{"normal displacement": distance,
                                      "area change": local_area_change(aligned, carried)})


def percent_volume_change(baseline: Mesh, follow_up: Mesh | Image, carried: Mesh | None = None) -> dict[str, float]:
    """Percent volume change from ``baseline`` to ``follow_up``, directly and from the surface motion.

    Parameters
    ----------
    baseline : Mesh
        Closed baseline surface.
    follow_up : Mesh or Image
        Closed follow-up surface, or mask (voxel occupancies).
    carried : Mesh, optional
        ``surface_change(baseline, follow_up, transform)``: the baseline carried onto the follow-up (after a rigid
        registration, say); enables the registration-based estimate.

    Returns
    -------
    dict
        ``baseline_volume_mm3`` and ``direct_percent`` (100·(V₁ − V₀)/V₀, the two enclosed volumes); with
        ``carried`` also ``registration_percent`` (SIENA-like: the volume enclosed by the carried surface — the
        same motion says *where* as well as how much), ``flux_percent`` (its first-order part,
        :func:`flux_volume_change` over V₀) and ``disagreement_pp`` (direct − registration, percentage points).
    """
    before = volume(baseline)
    if before <= 0:
        raise ValueError(f"baseline encloses a non-positive volume ({before:g} mm³): is it closed and outward-wound?")
    row = {"baseline_volume_mm3": before, "direct_percent": 100.0 * (volume(follow_up) - before) / before}
    if carried is not None:
        if not isinstance(carried, Mesh) or not np.array_equal(carried.triangles, baseline.triangles):
            raise ValueError("carried must be surface_change(baseline, ...): the baseline's triangles, moved")
        distance = np.nan_to_num(carried.point_data["normal displacement"])
        row["registration_percent"] = 100.0 * (volume(carried) - before) / before
        row["flux_percent"] = 100.0 * flux_volume_change(baseline, distance) / before
        row["disagreement_pp"] = row["direct_percent"] - row["registration_percent"]
    return row


def local_area_change(baseline: Mesh, warped: Mesh) -> np.ndarray:
    """Per-vertex ratio of surface area after and before a deformation (1: unchanged, < 1: shrinking), (V,).

    ``warped`` is the baseline with its vertices moved (same triangles), e.g. ``register(...).warped``.
    """
    if warped.n_vertices != baseline.n_vertices or not np.array_equal(warped.triangles, baseline.triangles):
        raise ValueError("warped must be the baseline mesh with its vertices moved (same vertices and triangles)")
    before = baseline.vertex_areas()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before > 0, warped.vertex_areas() / before, np.nan)


def regional_summary(mesh: Mesh, values: np.ndarray, regions: np.ndarray | str,
                     names: dict[int, str] | None = None) -> list[dict[str, object]]:
    """Per-region summaries of a per-vertex array: area-weighted mean, median, 5th and 95th percentiles, area.

    Parameters
    ----------
    mesh : Mesh
    values : array (V,)
        E.g. the normal displacement (mm) or the local area change.
    regions : int array (V,) or str
        A region id per vertex, or the name of an integer point array of ``mesh`` (e.g. ``"Cartilage Region"``).
    names : dict of int to str, optional
        Region names for the rows (default ``region_<id>``).
    """
    values = _per_vertex(mesh, values, "values")
    if isinstance(regions, str):
        if regions not in mesh.point_data:
            raise ValueError(f"mesh has no point array {regions!r}; it has {sorted(mesh.point_data)}")
        regions = mesh.point_data[regions]
    regions = np.asarray(regions)
    if regions.shape != (mesh.n_vertices,):
        raise ValueError(f"regions must hold one id per vertex ({mesh.n_vertices},), got {regions.shape}")
    areas = mesh.vertex_areas()
    rows = []
    for region in np.unique(regions):
        inside = (regions == region) & np.isfinite(values)
        weights, picked = areas[inside], values[inside]
        row = {"region": (names or {}).get(int(region), f"region_{int(region)}"), "id": int(region),
               "area_mm2": float(weights.sum())}
        if weights.sum() > 0:
            row.update(mean=float(weights @ picked / weights.sum()), median=float(np.median(picked)),
                       p05=float(np.percentile(picked, 5)), p95=float(np.percentile(picked, 95)))
        else:
            row.update(mean=float("nan"), median=float("nan"), p05=float("nan"), p95=float("nan"))
        rows.append(row)
    return rows


def _per_vertex(mesh: Mesh, values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (mesh.n_vertices,):
        raise ValueError(f"{name} must hold one value per vertex ({mesh.n_vertices},), got {values.shape}")
    return values
