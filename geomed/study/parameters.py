"""What a study measures with (:class:`StudyParameters`), part of every subject's cache key."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..mesh_repair import DEFAULT_MAX_HOLE_RADIUS


@dataclass(frozen=True)
class StudyParameters:
    """What a study measures with; part of every subject's cache key.

    Attributes
    ----------
    preset : {"brain", "knee", "heart"} or None
        Registration scales (:mod:`geomed.registration.presets`); None scales them to each shape's size.
    max_distance : float
        Largest normal displacement searched between consecutive scans, mm.
    method : {"surface_nets", "flying_edges"}
        Surface extraction from label maps and masks (:func:`geomed.mask_to_mesh`).
    max_hole_radius : float
        Holes of a scan's surface up to this radius (mm) are closed, with a warning in ``warnings.csv`` and the
        report (:func:`geomed.mesh_repair.close_holes` says why 2 mm is harmless); larger ones fail the subject.
    """

    preset: str | None = None
    max_distance: float = 3.0
    method: str = "surface_nets"
    max_hole_radius: float = DEFAULT_MAX_HOLE_RADIUS

    def __post_init__(self) -> None:
        from ..registration import PRESETS
        from ..surface import METHODS

        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {self.preset!r}")
        if not (isinstance(self.max_distance, (int, float)) and math.isfinite(self.max_distance)
                and self.max_distance > 0):
            raise ValueError(f"max_distance must be a positive number of mm, got {self.max_distance!r}")
        if not (isinstance(self.max_hole_radius, (int, float)) and math.isfinite(self.max_hole_radius)
                and self.max_hole_radius >= 0):
            raise ValueError(f"max_hole_radius must be a non-negative number of mm, got {self.max_hole_radius!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
