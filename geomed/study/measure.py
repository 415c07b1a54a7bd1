"""One subject's measurement (a Dask task): per structure, its scans' surfaces (small holes closed), every
consecutive interval registered and measured both ways, and the subject's annualised rates."""

from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd

from .._files import distinct_file_stem, file_suffix
from ..io import IMAGE_FORMATS, MESH_FORMATS, read_image, read_mesh
from ..mesh import Mesh
from ..mesh_repair import Repair, close_holes
from ..morphometry import percent_volume_change, surface_area, surface_change, volume
from .parameters import StudyParameters
from .statistics import annualised_rates

logger = logging.getLogger(__name__)


def measure_subject(subject: str, records: list[dict], parameters: StudyParameters) -> dict:
    """Measure one subject (a Dask task): per structure, its scans, every consecutive interval both ways, and its
    annualised rate.

    Returns ``{"scans", "changes", "rates", "warnings"}`` (lists of table rows) and ``"maps"`` (``{name: Mesh}``),
    or ``{"error": ..., "file": ...}`` naming the reason and the file being read or measured if anything failed.
    """
    current = ""
    try:
        scans, changes, maps, warnings = [], [], {}, []
        for structure, entries in _by_structure(records).items():
            shapes = []
            for entry in entries:
                current = entry["path"]
                shape, repair = _closed(_surface(entry, parameters), parameters)
                if repair:
                    logger.warning("subject %s, %s: %s", subject, entry["path"], repair)
                    warnings.append({"subject": subject, "structure": structure, "path": entry["path"],
                                     "warning": str(repair)})
                shapes.append(shape)
                scans.append({"subject": subject, "structure": structure, "group": entry["group"],
                              "timepoint": entry["years"], "path": entry["path"], "volume_mm3": volume(shape),
                              "area_mm2": surface_area(shape), "vertices": shape.n_vertices})
            for index in range(len(entries) - 1):
                current = f"{entries[index]['path']} → {entries[index + 1]['path']}"
                row, carried = _interval(entries[index], entries[index + 1], shapes[index], shapes[index + 1],
                                         parameters)
                name = _map_name(structure, index, entries)
                changes.append({"subject": subject, "structure": structure, **row, "map": f"maps/{name}.vtp"})
                maps[name] = carried
        current = ""
        rates = annualised_rates(pd.DataFrame(scans), pd.DataFrame(changes)).to_dict("records")
        return {"scans": scans, "changes": changes, "rates": rates, "warnings": warnings, "maps": maps}
    except Exception as error:  # one subject's failure is recorded, the cohort goes on
        logger.debug("subject %s failed", subject, exc_info=True)
        step = f"fitting the annual rate: {type(error).__name__}" if not current else type(error).__name__
        return {"error": f"{step}: {error}", "file": current, "traceback": traceback.format_exc(limit=4)}


def _by_structure(records: list[dict]) -> dict[str, list[dict]]:
    structures: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: (str(r["label"]), float(r["years"]), str(r["path"]))):
        structures.setdefault(str(record["label"]) or "shape", []).append(record)
    return structures


def _surface(entry: dict, parameters: StudyParameters) -> Mesh:
    """The closed surface of one scan: a mesh file, the boundary of a mask / one label of a label map, or the 0.5
    level of a probability map (a float image in [0, 1] whose ``label`` is empty or a name, or the component
    ``label`` of a multi-component map; :func:`geomed.surface.probability_to_mesh`, which makes it enclose the
    volume the probabilities give)."""
    path = Path(entry["file"])
    suffix = file_suffix(path)
    if suffix in MESH_FORMATS:
        mesh = read_mesh(path)
    elif suffix in IMAGE_FORMATS or path.is_dir():
        from ..surface import mask_to_mesh, probability_to_mesh

        image = read_image(path)
        label = entry["label"] or None
        numbered = label is not None and label.isdigit()
        try:
            if image.array.ndim == 4:
                if not numbered:
                    raise ValueError(f"a multi-component probability map needs its channel index (0-based) as the "
                                     f"label, got {label!r}")
                mesh = probability_to_mesh(image, int(label))
            elif np.issubdtype(image.array.dtype, np.floating) and not numbered:
                mesh = probability_to_mesh(image)
            else:
                mesh = mask_to_mesh(image, int(label) if numbered else label, method=parameters.method)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{path}: {error}") from None
    else:
        raise ValueError(f"{path}: not a mesh ({', '.join(MESH_FORMATS)}) or image ({', '.join(IMAGE_FORMATS)})")
    return mesh


def _closed(mesh: Mesh, parameters: StudyParameters) -> tuple[Mesh, Repair]:
    """The scan's surface with its small holes closed (:func:`geomed.mesh_repair.close_holes`) and a positive
    enclosed volume; what was repaired."""
    try:
        mesh, repair = close_holes(mesh, parameters.max_hole_radius)
    except ValueError as error:
        raise ValueError(f"the surface is not closed: {error}") from None
    if volume(mesh) <= 0:
        raise ValueError("the surface encloses a non-positive volume (inward-wound?)")
    return mesh, repair


def _interval(first: dict, second: dict, before: Mesh, after: Mesh, parameters: StudyParameters):
    """One interval measured forwards and backwards: its table row and the forward change map."""
    from ..registration import register

    started = time.perf_counter()
    forward = register(before, after, model="rigid", preset=parameters.preset)
    backward = register(after, before, model="rigid", preset=parameters.preset)
    carried = surface_change(before, after, forward.transform, max_distance=parameters.max_distance)
    returned = surface_change(after, before, backward.transform, max_distance=parameters.max_distance)
    ahead = percent_volume_change(before, after, carried)
    back = percent_volume_change(after, before, returned)
    displacement = carried.point_data["normal displacement"]
    interval = float(second["years"]) - float(first["years"])
    p, q = ahead["registration_percent"], back["registration_percent"]
    symmetric = 100.0 * (math.sqrt((1.0 + p / 100.0) / (1.0 + q / 100.0)) - 1.0)
    row = {
        "group": first["group"], "from_timepoint": float(first["years"]), "to_timepoint": float(second["years"]),
        "interval_years": interval, "rescan": bool(interval == 0.0), "from_path": first["path"],
        "to_path": second["path"], "direct_percent": ahead["direct_percent"], "registration_percent": symmetric,
        "forward_percent": p, "backward_percent": q, "consistency_pp": p + q + p * q / 100.0,
        "flux_percent": ahead["flux_percent"], "disagreement_pp": ahead["direct_percent"] - symmetric,
        "mean_abs_normal_displacement_mm": float(np.nanmean(np.abs(displacement))),
        "unmatched_vertices": int(np.isnan(displacement).sum()),
        "seconds": time.perf_counter() - started,
    }
    return row, carried


def _map_name(structure: str, index: int, entries: list[dict]) -> str:
    first, second = entries[index], entries[index + 1]
    return f"{distinct_file_stem(structure)}_{index:02d}_{float(first['years']):g}y_to_{float(second['years']):g}y"
