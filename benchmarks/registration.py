"""Registration on real shapes: recovery of known transforms, and geomed against pycpd (CPU coherent point drift).

Cases (all real surfaces from ``geomed.datasets``, meshes in mm):

``rigid``   a known rigid motion (12° about an oblique axis, (6, −4, 5) mm) of the femur (``femur(1)``), the left
            ventricle (``heart_myocardium("lv")``) and a left hippocampus (brain donor 9861, label 40, surface
            nets): recovered rotation error (°) and mean vertex error (mm). geomed registers the whole meshes; pycpd
            ``RigidRegistration`` registers 5000 vertices of each (its O(N·M) memory allows no more on 24 GB at
            40k), and its transform is applied to every vertex.
``smooth``  a smooth 3 mm bump on the femur's condyle undone by ``model="diffeomorphic"``: mean vertex error,
            minimum Jacobian.
``pair``    two subjects' femurs (``femur(2)`` onto ``femur(1)``): affine and diffeomorphic, mean surface
            distance (point to triangle) before and after, and the time.

    pip install pycpd            # the peer (optional: its rows are skipped without it)
    python benchmarks/registration.py [--cases rigid smooth pair] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import os
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


def _rigid_rows() -> list[dict]:
    rows = []
    for name, (fixed, preset) in _shapes().items():
        moving = _moved(fixed)
        start = time.perf_counter()
        result = register(moving, fixed, model="rigid", preset=preset)
        seconds = time.perf_counter() - start
        angle = np.degrees((Rotation.from_matrix(result.transform.matrix.numpy()) * ROTATION).magnitude())
        error = np.linalg.norm(result.warped.vertices - fixed.vertices, axis=1).mean()
        rows.append(dict(case="rigid", shape=name, library="geomed", points=len(fixed.vertices), seconds=seconds,
                         angle_error_deg=angle, mean_error_mm=error))
        rows.extend(_pycpd_rigid(name, moving, fixed))
    return rows


def _pycpd_rigid(name: str, moving: Mesh, fixed: Mesh) -> list[dict]:
    try:
        from pycpd import RigidRegistration
    except ImportError:
        print("pycpd is not installed: its rows are skipped (pip install pycpd)", file=sys.stderr)
        return []
    generator = np.random.default_rng(0)

    def sample(vertices: np.ndarray) -> np.ndarray:
        return vertices[generator.choice(len(vertices), min(len(vertices), PYCPD_POINTS), replace=False)]

    start = time.perf_counter()
    solver = RigidRegistration(X=sample(fixed.vertices), Y=sample(moving.vertices))
    solver.register()
    seconds = time.perf_counter() - start
    scale, rotation, translation = solver.get_registration_parameters()
    warped = scale * moving.vertices @ rotation + translation  # pycpd moves row vectors: y = s x R + t
    angle = np.degrees((Rotation.from_matrix(rotation.T) * ROTATION).magnitude())
    error = np.linalg.norm(warped - fixed.vertices, axis=1).mean()
    return [dict(case="rigid", shape=name, library="pycpd", points=PYCPD_POINTS, seconds=seconds,
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
                 mean_error_mm=error, min_jacobian=result.min_jacobian)]


def _pair_rows() -> list[dict]:
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
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=("rigid", "smooth", "pair"), default=["rigid", "smooth", "pair"])
    parser.add_argument("--out", default=None, help="folder for registration.csv (default: print only)")
    args = parser.parse_args()
    runs = {"rigid": _rigid_rows, "smooth": _smooth_rows, "pair": _pair_rows}
    rows = [row for case in args.cases for row in runs[case]()]
    columns = ["case", "shape", "library", "points", "seconds", "angle_error_deg", "mean_error_mm", "msd_before_mm",
               "msd_after_mm", "min_jacobian"]
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
