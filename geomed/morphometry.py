"""Morphometry: volumes and areas of meshes and masks, in mm³ and mm²."""

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
            logger.warning("mesh has %d boundary edges: its enclosed volume is approximate", shape.boundary_edge_count())
        a, b, c = (shape.vertices[shape.triangles[:, k]] for k in range(3))
        return float(np.einsum("ij,ij->", a, np.cross(b, c)) / 6.0)
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
