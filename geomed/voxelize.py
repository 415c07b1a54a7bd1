r"""Partial-volume voxelisation of closed surfaces: the fraction of each voxel of a grid inside a mesh.

A closed, outward-wound triangle mesh is sampled on any voxel grid (oblique directions and anisotropic spacing
included) by casting lines along the grid's third axis k: each sub-column at (i + (a + ½)/s − ½, j + (b + ½)/s − ½)
(s = ``supersampling``) crosses the surface where it enters and leaves it, and the length inside along k is
integrated exactly over every voxel. So a voxel's fraction is exact along k and an s × s midpoint rule across it;
voxels far from the surface come out exactly 0 or 1 without being visited, and the work grows with the number of
crossings (the surface's area), not with the grid's size. The sum of the fractions is the enclosed volume to a
2-D quadrature error (< 10⁻⁵ relative at s = 4 and 8 for a 10 mm-radius sphere on an oblique 0.365 × 0.365 ×
0.7 mm grid, in 0.2 and 1 s).
"""

from __future__ import annotations

import numpy as np

from .image import Image
from .mesh import Mesh

_CHUNK = 1 << 22  # candidate (triangle, sub-column) pairs tested at once
_ROUNDING = 1e-9  # fractions this close to 0 or 1 are taken as 0 or 1


def mesh_to_partial_volume(mesh: Mesh, affine: np.ndarray, shape: tuple[int, int, int], *,
                           supersampling: int = 8) -> Image:
    """Fraction of each voxel of a grid that lies inside a closed mesh (partial volume), in [0, 1].

    Parameters
    ----------
    mesh : Mesh
        A closed, outward-wound triangle mesh in world RAS mm.
    affine : array (4, 4)
        The grid's voxel-index-to-world map (RAS mm; oblique and anisotropic grids are fine).
    shape : tuple of 3 int
        The grid's size (I, J, K). Parts of the mesh outside the grid are left out.
    supersampling : int
        Sub-columns per voxel along i and along j (s × s per voxel); along k the length inside is exact.

    Returns
    -------
    Image
        float64 fractions (I, J, K) on the grid: 0 outside, 1 inside, the partial volume in between; their sum
        times :attr:`Image.voxel_volume` is the enclosed volume (mm³).

    Raises
    ------
    ValueError
        If the mesh is not closed, has no triangles, or the arguments are malformed.
    """
    if not isinstance(mesh, Mesh) or mesh.n_triangles == 0:
        raise ValueError("mesh must be a triangle Mesh with triangles")
    if not mesh.is_closed:
        raise ValueError(f"mesh must be closed to have an inside ({mesh.boundary_edge_count()} boundary edges)")
    if not isinstance(supersampling, (int, np.integer)) or supersampling < 1:
        raise ValueError(f"supersampling must be a positive integer, got {supersampling!r}")
    shape = tuple(int(size) for size in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (I, J, K), got {shape!r}")
    grid = Image(np.zeros((1, 1, 1), np.uint8), affine)
    index = grid.world_to_index(mesh.vertices)
    flipped = np.linalg.det(grid.affine[:3, :3]) < 0
    sums = np.zeros((shape[0] * shape[1], shape[2] + 1))
    triangles = mesh.triangles
    s = int(supersampling)
    lower, upper = _sub_column_range(index[:, :2], triangles, s)
    counts = np.prod(np.maximum(upper - lower + 1, 0), axis=1)
    ends = np.cumsum(counts)
    start = 0
    while start < len(triangles):
        stop = max(int(np.searchsorted(ends, (ends[start - 1] if start else 0) + _CHUNK, side="right")), start + 1)
        _accumulate(index, triangles, np.arange(start, stop), lower, upper, s, flipped, shape, sums)
        start = stop
    fractions = np.cumsum(sums, axis=1)[:, :-1].reshape(shape)
    fractions[fractions < _ROUNDING] = 0.0  # the rounding of the sums, not a partial volume
    fractions[fractions > 1.0 - _ROUNDING] = 1.0
    return Image(fractions, grid.affine)


def _sub_column_range(points: np.ndarray, triangles: np.ndarray, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Per triangle, the first and last sub-column numbers (u, v) whose centre (n + ½)/s − ½ lies in its
    projected bounding box, (T, 2) each."""
    corners = points[triangles]
    low, high = corners.min(axis=1), corners.max(axis=1)
    return np.ceil((low + 0.5) * s - 0.5).astype(np.int64), np.floor((high + 0.5) * s - 0.5).astype(np.int64)


def _accumulate(index, triangles, chosen, lower, upper, s, flipped, shape, sums) -> None:
    """Add the crossings of the ``chosen`` triangles with their sub-columns to the per-column difference arrays."""
    width = np.maximum(upper[chosen] - lower[chosen] + 1, 0)
    counts = width[:, 0] * width[:, 1]
    keep = counts > 0
    chosen, width, counts = chosen[keep], width[keep], counts[keep]
    if not len(chosen):
        return
    owner = np.repeat(np.arange(len(chosen)), counts)
    offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    u = lower[chosen, 0][owner] + offset // width[owner, 1]
    v = lower[chosen, 1][owner] + offset % width[owner, 1]
    point = np.stack([(u + 0.5) / s - 0.5, (v + 0.5) / s - 0.5], axis=1)
    corners = triangles[chosen][owner]
    xy = index[:, :2]
    area = _orient(xy[corners[:, 0]], xy[corners[:, 1]], xy[corners[:, 2]])
    inside = area != 0
    weights = []
    for k in range(3):
        a, b = corners[:, (k + 1) % 3], corners[:, (k + 2) % 3]  # the edge opposite corner k
        first, second = np.minimum(a, b), np.maximum(a, b)
        edge = _orient(xy[first], xy[second], point) * np.where(a < b, 1.0, -1.0)
        positive = edge * np.sign(area)
        # a point exactly on an edge belongs to exactly one of the two triangles that share it (same products,
        # opposite edge direction), so no line crosses the surface twice or never at a seam
        inside &= (positive > 0) | ((positive == 0) & ((a < b) == (area > 0)))
        weights.append(edge)
    total = np.where(area != 0, area, 1.0)
    depth = sum(weights[k] * index[corners[:, k], 2] for k in range(3)) / total
    sign = -np.sign(area) * (-1.0 if flipped else 1.0)  # outward normal along +k: the line leaves the inside
    u, v, depth, sign = u[inside], v[inside], depth[inside], sign[inside]
    i, a = np.divmod(u, s)
    j, b = np.divmod(v, s)
    on_grid = (i >= 0) & (i < shape[0]) & (j >= 0) & (j < shape[1])
    column = (i * shape[1] + j)[on_grid]
    depth, sign = depth[on_grid], sign[on_grid] / (s * s)
    voxel = np.floor(depth + 0.5)
    within = depth + 0.5 - voxel
    before = voxel < 0
    voxel = np.clip(voxel, 0, shape[2]).astype(np.int64)
    after = np.minimum(voxel + 1, shape[2])
    share = np.where(before, 1.0, 1.0 - within)
    flat = sums.reshape(-1)
    stride = shape[2] + 1
    flat += np.bincount(column * stride + voxel, sign * share, minlength=flat.size)
    flat += np.bincount(column * stride + after, np.where(before, 0.0, sign * within), minlength=flat.size)


def _orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Twice the signed area of the 2-D triangles (a, b, c), (N,)."""
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
