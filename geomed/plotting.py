"""Figures of shapes and registrations, rendered offscreen with matplotlib (no display needed, and the user's
pyplot backend is left alone: figures are built as ``matplotlib.figure.Figure`` objects).

>>> from geomed.plotting import plot_registration
>>> plot_registration(result, fixed, "registration.png")      # result = geomed.register(moving, fixed, ...)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from mpl_toolkits.mplot3d.art3d import Poly3DCollection

from .mesh import Mesh
from .registration import RegistrationResult


def plot_surface(mesh: Mesh, values: np.ndarray | None = None, *, ax=None, cmap: str = "RdBu_r",
                 limit: float | None = None, label: str = "", title: str = "", view: tuple[float, float] = (20, -60)):
    """Draw a triangle mesh in 3-D, coloured by a per-vertex array (diverging, centred on 0) or in grey.

    Parameters
    ----------
    mesh : Mesh
    values : array (V,), optional
        Per-vertex values (e.g. the normal displacement in mm); triangles take their vertices' mean.
    ax : matplotlib 3-D axes, optional
        Where to draw (default: a new figure).
    cmap : str
        Colour map; the default diverging map shows outward (red) and inward (blue) change.
    limit : float, optional
        Colour range ±limit (default: the 98th percentile of |values|).
    label, title : str
        Colour-bar label and axes title.
    view : (elevation, azimuth) in degrees

    Returns
    -------
    The axes.
    """
    if ax is None:
        ax = Figure(figsize=(5, 5)).add_subplot(projection="3d")
    corners = mesh.vertices[mesh.triangles]
    normals = mesh.triangle_normals()
    light = 0.55 + 0.45 * np.abs(normals @ np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8]))
    if values is None:
        colours = np.clip(light, 0, 1)[:, None] * np.array([0.8, 0.8, 0.8, 1.0])
        colours[:, 3] = 1.0
        mappable = None
    else:
        values = np.asarray(values, dtype=float)
        if values.shape != (mesh.n_vertices,):
            raise ValueError(f"values must have one entry per vertex ({mesh.n_vertices},), got {values.shape}")
        limit = limit or float(np.percentile(np.abs(values), 98)) or 1.0
        mappable = ScalarMappable(norm=Normalize(-limit, limit), cmap=cmap)
        colours = mappable.to_rgba(values[mesh.triangles].mean(1))
        colours[:, :3] *= light[:, None]
    ax.add_collection3d(Poly3DCollection(corners, facecolors=colours, edgecolors="none"))
    lower, upper = mesh.vertices.min(0), mesh.vertices.max(0)
    centre, half = (lower + upper) / 2, (upper - lower).max() / 2
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_zlim(centre[2] - half, centre[2] + half)
    ax.set_box_aspect((1, 1, 1), zoom=1.3)
    ax.view_init(*view)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    if mappable is not None:
        ax.figure.colorbar(mappable, ax=ax, shrink=0.6, label=label)
    return ax


def plot_registration(result: RegistrationResult, fixed: Mesh, path: str | Path, *,
                      view: tuple[float, float] = (20, -60)) -> Path:
    """One figure of a registration: the fixed shape, the warped moving shape coloured by its normal displacement
    (mm, outward positive), and the objective per correspondence step or evaluation, stage by stage.

    Parameters
    ----------
    result : RegistrationResult
        With a warped mesh (the moving shape was a mesh or a mask).
    fixed : Mesh
    path : str or Path
        The PNG to write.
    view : (elevation, azimuth) in degrees

    Returns
    -------
    The path written.
    """
    if not isinstance(result.warped, Mesh):
        raise TypeError("plot_registration needs a warped mesh: register a mesh or a mask")
    figure = Figure(figsize=(13, 4.2))
    plot_surface(fixed, ax=figure.add_subplot(1, 3, 1, projection="3d"), title="fixed", view=view)
    plot_surface(result.warped, result.warped.point_data["normal displacement"],
                 ax=figure.add_subplot(1, 3, 2, projection="3d"), label="normal displacement (mm)",
                 title=f"warped moving ({result.model})", view=view)
    ax = figure.add_subplot(1, 3, 3)
    stages: dict[str, list[float]] = {}
    for stage, _, value in result.history:
        stages.setdefault(stage, []).append(value)
    start = 0
    for stage, values in stages.items():
        ax.plot(range(start, start + len(values)), values, label=stage)
        start += len(values)
    ax.set_yscale("symlog", linthresh=1e-2)  # debiased divergences of nearly equal shapes can dip below 0
    ax.set_xlabel("correspondence step / objective evaluation")
    ax.set_ylabel("objective (mm²)")
    ax.legend(fontsize=7)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
