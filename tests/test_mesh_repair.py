"""Closing the small holes of real meshes (geomed.mesh_repair): what is closed keeps the volume, what is too
large is refused with its size, and cracks between unmerged vertices close by merging."""

from __future__ import annotations

import numpy as np
import pytest

from geomed import datasets
from geomed.mesh import Mesh
from geomed.mesh_repair import close_holes
from geomed.morphometry import volume
from geomed.surface import mask_to_mesh


@pytest.fixture(scope="module")
def hippocampus() -> Mesh:
    """A real closed surface: donor 9861's left hippocampus (shipped)."""
    return mask_to_mesh(datasets.brain_labels(datasets.BRAIN_DONORS[0]), "left_hippocampus")


def _holed(mesh: Mesh, radius: float) -> Mesh:
    """The mesh without the triangles whose centroids lie within ``radius`` mm of one vertex."""
    centre = mesh.vertices[mesh.n_vertices // 3]
    return Mesh(mesh.vertices, mesh.triangles[np.linalg.norm(mesh.triangle_centroids() - centre, axis=1) > radius])


@pytest.mark.parametrize("radius", [0.6, 1.5])
def test_small_holes_are_closed_and_keep_the_volume(hippocampus, radius):
    holed = _holed(hippocampus, radius)
    assert not holed.is_closed
    closed, repair = close_holes(holed)
    assert closed.is_closed and repair.holes and repair.merged_vertices == 0  # a pinched rim: two loops
    assert all(hole.radius_mm <= 2.0 for hole in repair.holes)
    assert sum(hole.edges for hole in repair.holes) == holed.boundary_edge_count()
    assert volume(closed) == pytest.approx(volume(hippocampus), rel=2e-4)  # the flat patch misses only a thin cap
    assert "closed a hole of radius" in str(repair)


def test_larger_openings_are_refused_with_their_size(hippocampus):
    with pytest.raises(ValueError, match=r"larger than the 2 mm radius closed automatically, the largest a hole of "
                                         r"radius [3-9]\.\d\d mm \(\d+ boundary edges, perimeter"):
        close_holes(_holed(hippocampus, 3.5))


def test_a_crack_between_unmerged_vertices_closes_by_merging(hippocampus):
    triangles = hippocampus.triangles.copy()
    vertices = np.vstack([hippocampus.vertices, hippocampus.vertices[triangles[10, 0]]])
    triangles[10, 0] = len(vertices) - 1
    cracked = Mesh(vertices, triangles)
    assert cracked.boundary_edge_count() == 4
    closed, repair = close_holes(cracked)
    assert closed.is_closed and repair.merged_vertices == 1 and not repair.holes
    assert volume(closed) == pytest.approx(volume(hippocampus), rel=1e-12)


def test_a_closed_mesh_is_returned_as_it_is(hippocampus):
    closed, repair = close_holes(hippocampus)
    assert closed is hippocampus and not repair
