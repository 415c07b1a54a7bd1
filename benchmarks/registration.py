"""Registration on real shapes: recovery of known transforms, and geomed against pycpd (CPU coherent point drift).

Cases (all real surfaces from ``geomed.datasets``, meshes in mm):

``rigid``   a known rigid motion (12° about an oblique axis, (6, −4, 5) mm) of the femur (``femur(1)``), the left
            ventricle (``heart_myocardium("lv")``) and a left hippocampus (brain donor 9861, label 40, surface
            nets), whole and with the top 20% of its height cropped away (``partial``: the moving shape is part of
            the fixed one): recovered rotation error (°) and mean vertex error (mm). geomed registers the whole
            meshes; pycpd ``RigidRegistration`` registers 5000 vertices of each (its O(N·M) memory allows no more
            on 24 GB at 40k; ``w=0.2`` outlier weight for the partial cases), and its transform is applied to every
            vertex.
``smooth``  a smooth 3 mm bump on the femur's condyle undone by ``model="diffeomorphic"``: mean vertex error
            (each vertex to its own place), mean surface distance before and after, minimum Jacobian.
``pair``    two subjects' femurs (``femur(2)`` onto ``femur(1)``): affine and diffeomorphic, mean surface
            distance (point to triangle) before and after, and the time; pycpd affine then deformable CPD
            (β = 10 mm, λ = 2) on 5000 vertices, its displacement interpolated to every vertex by its kernel.
``large``   memory stays O(N): ``femur(2)`` onto ``femur(1)``, affine and diffeomorphic, with both meshes
            subdivided (each triangle into four) to 80k and 320k vertices, each run in a fresh process that
            reports its peak resident memory; pycpd's N·M·8-byte matrices are computed, not run.

    pip install pycpd            # the peer (optional: its rows are skipped without it)
    python benchmarks/registration.py [--cases rigid smooth pair large] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
from scipy.spatial.transform import Rotation

from geomed import Mesh, datasets, mask_to_mesh, register
from geomed.surface import distance_to_surface

ROTATION = Rotation.from_rotvec(np.radians(12.0) * np.array([0.3, 0.8, 0.5]) / np.linalg.norm([0.3, 0.8, 0.5]))
SHIFT = np.array([6.0, -4.0, 5.0])
PYCPD_POINTS = 5000


def _shapes() -> dict[str, tuple[Mesh, str]]:
    hippocampus = mask_to_mesh(datasets.brain_labels("9861"), 40)
    return {"femur": (datasets.femur(1), "knee"), "lv": (datasets.heart_myocardium("lv"), "heart"),
            "hippocampus": (hippocampus, "brain")}


def _moved(mesh: Mesh) -> Mesh:
    centre = mesh.vertices.mean(0)
    return Mesh((mesh.vertices - centre) @ ROTATION.as_matrix().T + centre + SHIFT, mesh.triangles)


def _cropped(mesh: Mesh, kept: float) -> tuple[Mesh, np.ndarray]:
    return mesh.submesh(mesh.vertices[:, 2] < np.quantile(mesh.vertices[:, 2], kept))


def _rigid_rows(peer: bool) -> list[dict]:
    rows = []
    for name, (fixed, preset) in _shapes().items():
        for case, kept in (("rigid", 1.0), ("rigid partial", 0.8)):
            moving, used = _cropped(_moved(fixed), kept)
            truth = fixed.vertices[used]
            start = time.perf_counter()
            result = register(moving, fixed, model="rigid", preset=preset)
            seconds = time.perf_counter() - start
            angle = np.degrees((Rotation.from_matrix(result.transform.matrix.numpy()) * ROTATION).magnitude())
            error = np.linalg.norm(result.warped.vertices - truth, axis=1).mean()
            rows.append(dict(case=case, shape=name, library="geomed", points=len(fixed.vertices), seconds=seconds,
                             angle_error_deg=angle, mean_error_mm=error))
            if peer:
                rows.extend(_pycpd_rigid(case, name, moving, fixed, truth, outliers=0.2 if kept < 1 else 0.0))
    return rows


def _pycpd_sample(vertices: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    return vertices[generator.choice(len(vertices), min(len(vertices), PYCPD_POINTS), replace=False)]


def _pycpd_rigid(case: str, name: str, moving: Mesh, fixed: Mesh, truth: np.ndarray, outliers: float) -> list[dict]:
    try:
        from pycpd import RigidRegistration
    except ImportError:
        print("pycpd is not installed: its rows are skipped (pip install pycpd)", file=sys.stderr)
        return []
    generator = np.random.default_rng(0)
    start = time.perf_counter()
    solver = RigidRegistration(X=_pycpd_sample(fixed.vertices, generator), Y=_pycpd_sample(moving.vertices, generator),
                               w=outliers)
    solver.register()
    seconds = time.perf_counter() - start
    scale, rotation, translation = solver.get_registration_parameters()
    warped = scale * moving.vertices @ rotation + translation  # pycpd moves row vectors: y = s x R + t
    angle = np.degrees((Rotation.from_matrix(rotation.T) * ROTATION).magnitude())
    error = np.linalg.norm(warped - truth, axis=1).mean()
    return [dict(case=case, shape=name, library="pycpd", points=PYCPD_POINTS, seconds=seconds,
                 angle_error_deg=angle, mean_error_mm=error)]


def _smooth_rows() -> list[dict]:
    fixed = datasets.femur(1)
    vertices = fixed.vertices
    bump = np.exp(-np.sum((vertices - vertices.mean(0) - np.array([15.0, 0.0, -10.0])) ** 2, 1) / (2 * 18.0**2))
    moving = Mesh(vertices + 3.0 * bump[:, None] * np.array([0.6, 0.0, 0.8]), fixed.triangles)
    start = time.perf_counter()
    result = register(moving, fixed, model="diffeomorphic", preset="knee")
    seconds = time.perf_counter() - start
    error = np.linalg.norm(result.warped.vertices - vertices, axis=1).mean()
    return [dict(case="smooth", shape="femur", library="geomed", points=len(vertices), seconds=seconds,
                 mean_error_mm=error, msd_before_mm=distance_to_surface(moving.vertices, fixed).mean(),
                 msd_after_mm=distance_to_surface(result.warped.vertices, fixed).mean(),
                 min_jacobian=result.min_jacobian)]


def _pair_rows(peer: bool) -> list[dict]:
    fixed, moving = datasets.femur(1), datasets.femur(2)
    before = distance_to_surface(moving.vertices, fixed).mean()
    rows = []
    for model in ("affine", "diffeomorphic"):
        start = time.perf_counter()
        result = register(moving, fixed, model=model, preset="knee")
        seconds = time.perf_counter() - start
        rows.append(dict(case=f"pair {model}", shape="femur 2 → 1", library="geomed", points=len(moving.vertices),
                         seconds=seconds, msd_before_mm=before,
                         msd_after_mm=distance_to_surface(result.warped.vertices, fixed).mean(),
                         min_jacobian=result.min_jacobian))
    return rows + (_pycpd_pair(moving, fixed, before) if peer else [])


def _pycpd_pair(moving: Mesh, fixed: Mesh, before: float) -> list[dict]:
    try:
        from pycpd import AffineRegistration, DeformableRegistration
    except ImportError:
        return []
    generator = np.random.default_rng(0)
    target, source = _pycpd_sample(fixed.vertices, generator), _pycpd_sample(moving.vertices, generator)
    start = time.perf_counter()
    affine = AffineRegistration(X=target, Y=source)
    affine.register()
    affine_seconds = time.perf_counter() - start
    matrix, shift = affine.get_registration_parameters()
    vertices = moving.vertices @ matrix + shift
    rows = [dict(case="pair affine", shape="femur 2 → 1", library="pycpd", points=PYCPD_POINTS,
                 seconds=affine_seconds, msd_before_mm=before,
                 msd_after_mm=distance_to_surface(vertices, fixed).mean())]
    deformable = DeformableRegistration(X=target, Y=source @ matrix + shift, alpha=2.0, beta=10.0)
    deformable.register()
    seconds = time.perf_counter() - start
    squared = ((vertices[:, None, :] - deformable.Y[None]) ** 2).sum(-1)
    warped = vertices + np.exp(-squared / (2 * 10.0**2)) @ deformable.W
    rows.append(dict(case="pair deformable", shape="femur 2 → 1", library="pycpd", points=PYCPD_POINTS,
                     seconds=seconds, msd_before_mm=before, msd_after_mm=distance_to_surface(warped, fixed).mean()))
    return rows


def _subdivided(mesh: Mesh) -> Mesh:
    """Each triangle split into four at its edges' midpoints (same surface, four times the triangles)."""
    edges = np.sort(mesh.triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 3, 2), axis=2)
    unique, index = np.unique(edges.reshape(-1, 2), axis=0, return_inverse=True)
    middle = mesh.n_vertices + index.reshape(-1, 3)
    vertices = np.concatenate([mesh.vertices, mesh.vertices[unique].mean(1)])
    a, b, c = mesh.triangles.T
    ab, bc, ca = middle.T
    triangles = np.concatenate([np.stack(t, 1) for t in ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
    return Mesh(vertices, triangles)


def _large_run(subdivisions: int, model: str) -> None:
    """One large registration in this process; prints a JSON row with its peak resident memory (VmHWM: this
    process's own high-water mark, which, unlike getrusage's, does not inherit the parent's)."""
    fixed, moving = datasets.femur(1), datasets.femur(2)
    for _ in range(subdivisions):
        fixed, moving = _subdivided(fixed), _subdivided(moving)
    start = time.perf_counter()
    result = register(moving, fixed, model=model, preset="knee")
    seconds = time.perf_counter() - start
    with open("/proc/self/status", encoding="ascii") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024**2
    print(json.dumps(dict(case=f"large {model}", shape="femur 2 → 1", library="geomed", points=moving.n_vertices,
                          seconds=seconds, peak_memory_gb=peak, min_jacobian=result.min_jacobian,
                          pycpd_memory_gb=moving.n_vertices * fixed.n_vertices * 8 / 1024**3)))


def _large_rows() -> list[dict]:
    rows = []
    for model in ("affine", "diffeomorphic"):
        for subdivisions in (0, 1, 2):
            output = subprocess.run([sys.executable, __file__, "--large-run", str(subdivisions), model], check=True,
                                    capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cases = ("rigid", "smooth", "pair", "large")
    parser.add_argument("--cases", nargs="+", choices=cases, default=list(cases))
    parser.add_argument("--out", default=None, help="folder for registration.csv (default: print only)")
    parser.add_argument("--without-pycpd", action="store_true", help="leave out pycpd's rows (they take ~25 min)")
    parser.add_argument("--large-run", nargs=2, metavar=("SUBDIVISIONS", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.large_run:
        _large_run(int(args.large_run[0]), args.large_run[1])
        return
    peer = not args.without_pycpd
    runs = {"rigid": lambda: _rigid_rows(peer), "smooth": _smooth_rows, "pair": lambda: _pair_rows(peer),
            "large": _large_rows}
    rows = [row for case in args.cases for row in runs[case]()]
    columns = ["case", "shape", "library", "points", "seconds", "angle_error_deg", "mean_error_mm", "msd_before_mm",
               "msd_after_mm", "min_jacobian", "peak_memory_gb", "pycpd_memory_gb"]
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns))
    if args.out:
        with open(os.path.join(args.out, "registration.csv"), "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
