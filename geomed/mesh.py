"""Triangle surface meshes in world millimetres (RAS)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ._validation import frozen_array, frozen_arrays, require_finite


@dataclass(frozen=True, eq=False)
class Mesh:
    """A triangulated surface in world RAS millimetres.

    Parameters
    ----------
    vertices : array (V, 3)
        Vertex coordinates in mm (float64).
    triangles : array (F, 3)
        Vertex indices of each triangle (int64), counter-clockwise seen from outside for closed surfaces,
        so that :meth:`triangle_normals` point outwards.
    point_data : mapping of str to array (V, ...), optional
        Per-vertex arrays (e.g. cartilage thickness in mm).
    cell_data : mapping of str to array (F, ...), optional
        Per-triangle arrays (e.g. a region id).

    Notes
    -----
    A ``Mesh`` is immutable-minded: its arrays are read-only copies and every operation returns a new mesh.
    """

    vertices: np.ndarray
    triangles: np.ndarray
    point_data: Mapping[str, np.ndarray] = field(default_factory=dict)
    cell_data: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vertices = frozen_array(self.vertices, "vertices", np.float64)
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise ValueError(f"vertices must have shape (V, 3), got {tuple(vertices.shape)}")
        require_finite(vertices, "vertices")
        triangles = np.asarray(self.triangles)
        if triangles.size and not np.issubdtype(triangles.dtype, np.integer):
            if not np.all(np.equal(np.mod(triangles, 1), 0)):
                raise TypeError(f"triangles must hold integer vertex indices, got dtype {triangles.dtype}")
        triangles = frozen_array(triangles.reshape(-1, 3) if triangles.size == 0 else triangles, "triangles", np.int64)
        if triangles.ndim != 2 or triangles.shape[1] != 3:
            raise ValueError(
                f"triangles must have shape (F, 3) (only triangle cells; triangulate polygons first), "
                f"got {tuple(triangles.shape)}"
            )
        if triangles.size and (triangles.min() < 0 or triangles.max() >= len(vertices)):
            raise ValueError(
                f"triangles index vertices out of range [0, {len(vertices)}): "
                f"found indices {int(triangles.min())}..{int(triangles.max())}"
            )
        object.__setattr__(self, "vertices", vertices)
        object.__setattr__(self, "triangles", triangles)
        object.__setattr__(self, "point_data", frozen_arrays(self.point_data, "point_data", len(vertices), "vertex"))
        object.__setattr__(self, "cell_data", frozen_arrays(self.cell_data, "cell_data", len(triangles), "triangle"))

    @property
    def n_vertices(self) -> int:
        """Number of vertices V."""
        return len(self.vertices)

    @property
    def n_triangles(self) -> int:
        """Number of triangles F."""
        return len(self.triangles)

    def _edge_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b, c = (self.vertices[self.triangles[:, k]] for k in range(3))
        return a, b - a, c - a

    def triangle_centroids(self) -> np.ndarray:
        """Centroids of the triangles, shape (F, 3), mm."""
        return self.vertices[self.triangles].mean(axis=1)

    def triangle_areas(self) -> np.ndarray:
        """Areas of the triangles, shape (F,), mm²."""
        _, ab, ac = self._edge_vectors()
        return 0.5 * np.linalg.norm(np.cross(ab, ac), axis=1)

    def vertex_areas(self) -> np.ndarray:
        """Each vertex's share of the surface, a third of the areas of its triangles, shape (V,), mm² (they sum to
        the mesh's area)."""
        areas = np.zeros(self.n_vertices)
        for corner in range(3):
            np.add.at(areas, self.triangles[:, corner], self.triangle_areas() / 3.0)
        return areas

    def vertex_area_vectors(self) -> np.ndarray:
        """A third of the area vectors (area × unit normal) of each vertex's triangles, shape (V, 3), mm².

        Moving vertex v by δ_v changes the enclosed volume by Σ_v δ_v · N_v to first order; |N_v| ≤ the vertex
        area, less where the surface folds (the crumpled corners of a surface from a voxel mask).
        """
        weighted = self.triangle_normals() * self.triangle_areas()[:, None] / 3.0
        vectors = np.zeros_like(self.vertices, dtype=np.float64)
        for corner in range(3):
            np.add.at(vectors, self.triangles[:, corner], weighted)
        return vectors

    def vertex_normals(self, smoothing: int = 0) -> np.ndarray:
        """Area-weighted unit vertex normals, shape (V, 3) (outward for a closed, outward-wound mesh); a vertex
        with no area gets a zero normal.

        ``smoothing`` > 0 averages the area vectors over that many rings of neighbours first: the normal of the
        underlying smooth surface where a mesh from a voxel mask is crumpled at the scale of its edges.
        """
        vectors = self.vertex_area_vectors()
        if smoothing:
            from scipy.sparse import coo_matrix

            pairs = self.triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
            rows = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(self.n_vertices)])
            columns = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(self.n_vertices)])
            ring = coo_matrix((np.ones(len(rows)), (rows, columns)), shape=(self.n_vertices,) * 2).tocsr()
            ring.data[:] = 1.0
            for _ in range(smoothing):
                vectors = ring @ vectors
        length = np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.divide(vectors, length, out=np.zeros_like(vectors), where=length > 0)

    def triangle_normals(self) -> np.ndarray:
        """Unit normals of the triangles (right-hand rule on the vertex order), shape (F, 3).

        Degenerate (zero-area) triangles get a zero normal.
        """
        _, ab, ac = self._edge_vectors()
        cross = np.cross(ab, ac)
        norm = np.linalg.norm(cross, axis=1, keepdims=True)
        return np.divide(cross, norm, out=np.zeros_like(cross), where=norm > 0)

    def boundary_edges(self) -> np.ndarray:
        """The edges used by exactly one triangle (the rims of holes and crops), vertex index pairs (E, 2)."""
        if self.n_triangles == 0:
            return np.zeros((0, 2), dtype=np.int64)
        edges = np.sort(self.triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1).astype(np.int64)
        keys, counts = np.unique(edges[:, 0] * self.n_vertices + edges[:, 1], return_counts=True)
        single = keys[counts == 1]
        return np.stack([single // self.n_vertices, single % self.n_vertices], 1)

    def boundary_edge_count(self) -> int:
        """Number of edges used by exactly one triangle; 0 for a closed (watertight) surface."""
        return len(self.boundary_edges())

    @property
    def is_closed(self) -> bool:
        """True when every edge is shared by at least two triangles (the surface encloses a volume)."""
        return self.n_triangles > 0 and self.boundary_edge_count() == 0

    def transformed(self, affine: np.ndarray) -> Mesh:
        """Apply a 4×4 affine map (mm → mm) to the vertices.

        Triangle winding is reversed when the map flips orientation (negative determinant), so that outward
        normals stay outward. Point and cell arrays are carried over unchanged.
        """
        matrix = frozen_array(affine, "affine", np.float64)
        if matrix.shape != (4, 4):
            raise ValueError(f"affine must have shape (4, 4), got {tuple(matrix.shape)}")
        vertices = self.vertices @ matrix[:3, :3].T + matrix[:3, 3]
        triangles = self.triangles[:, ::-1] if np.linalg.det(matrix[:3, :3]) < 0 else self.triangles
        return Mesh(vertices, triangles, dict(self.point_data), dict(self.cell_data))

    def submesh(self, keep: np.ndarray) -> tuple[Mesh, np.ndarray]:
        """The triangles whose three vertices are kept (a crop, a region), with their vertices renumbered.

        Parameters
        ----------
        keep : bool array (V,)
            Which vertices to keep.

        Returns
        -------
        mesh : Mesh
            The sub-mesh, with the point and cell arrays of what it kept.
        indices : int array (V',)
            Each of its vertices' index in this mesh.
        """
        keep = np.asarray(keep)
        if keep.shape != (self.n_vertices,) or keep.dtype != bool:
            raise ValueError(f"keep must be a boolean array of one entry per vertex ({self.n_vertices},), got "
                             f"{keep.dtype} {keep.shape}")
        kept_triangles = keep[self.triangles].all(1)
        indices = np.unique(self.triangles[kept_triangles])
        renumber = np.full(self.n_vertices, -1)
        renumber[indices] = np.arange(len(indices))
        return Mesh(self.vertices[indices], renumber[self.triangles[kept_triangles]],
                    {name: array[indices] for name, array in self.point_data.items()},
                    {name: array[kept_triangles] for name, array in self.cell_data.items()}), indices

    def with_point_data(self, **arrays: np.ndarray) -> Mesh:
        """Return a copy with per-vertex arrays added or replaced."""
        return Mesh(self.vertices, self.triangles, {**self.point_data, **arrays}, dict(self.cell_data))

    def with_cell_data(self, **arrays: np.ndarray) -> Mesh:
        """Return a copy with per-triangle arrays added or replaced."""
        return Mesh(self.vertices, self.triangles, dict(self.point_data), {**self.cell_data, **arrays})

    def __repr__(self) -> str:
        return (
            f"Mesh(n_vertices={self.n_vertices}, n_triangles={self.n_triangles}, "
            f"point_data={list(self.point_data)}, cell_data={list(self.cell_data)})"
        )
