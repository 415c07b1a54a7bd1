"""Heart: map a left-ventricle template onto a smoothly deformed LV, and check it against the known truth.

The template is a real left-ventricular myocardium (``datasets.heart_myocardium("lv")``, CT-derived, mm). The
"patient" is the same surface moved by a known diffeomorphism built like the deformations we look for: a twist
about the long axis (the apex turned against the base, as in systole) plus a regional bulge of the lateral wall,
a geodesic of Gaussian-kernel momenta (25 mm) that folds nothing. The template is then registered onto the
patient with ``model="diffeomorphic"`` and the ``heart`` preset, knowing nothing of the truth.

Because the patient is the template with its vertices moved, each warped template vertex has a true position:
the mean vertex error measures the correspondences (tangential slips included), stricter than the mean surface
distance (to the patient's triangles). ``heart_registration.csv`` has both, the truth's size, the minimum Jacobian
and the inverse consistency (|φ⁻¹(φ(x)) − x|, mm); ``heart_registration.png`` shows the warped template coloured
by its normal displacement. Run::

    python tutorials/heart_registration.py --out tutorial_output/heart

Outcome (2 CPU cores): a truth of up to 4.8 mm (mean 2.4 mm) is recovered to 0.47 mm mean vertex error (the
twist's slip along the wall is what remains) and 0.08 mm mean surface distance in ≈ 24 s, minimum Jacobian 0.99,
inverse consistent to 6·10⁻¹⁴ mm.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch

from geomed import Mesh, datasets, register
from geomed.plotting import plot_registration
from geomed.registration import AffineTransform, KernelDeformation
from geomed.surface import distance_to_surface


def known_deformation(mesh: Mesh, twist_degrees: float = 15.0, bulge_mm: float = 6.0) -> KernelDeformation:
    """A twist about the LV's long axis (growing from base to apex) plus an outward bulge of one wall, carried by
    control points every 15 mm along the surface with a 25 mm kernel, integrated as an LDDMM geodesic."""
    vertices = torch.tensor(mesh.vertices, dtype=torch.float64)
    centre = vertices.mean(0)
    axes = torch.linalg.svd(vertices - centre, full_matrices=False)[2]
    long_axis, lateral = axes[0], axes[1]
    keys = torch.floor((vertices - vertices.min(0).values) / 15.0).long()
    _, cell = torch.unique(keys, dim=0, return_inverse=True)
    sums = torch.zeros(int(cell.max()) + 1, 3, dtype=torch.float64).index_add_(0, cell, vertices)
    control = sums / torch.bincount(cell)[:, None]
    offset = control - centre
    height = offset @ long_axis
    height = (height - height.min()) / (height.max() - height.min())
    twist = torch.linalg.cross(long_axis.expand_as(offset), offset) * np.radians(twist_degrees) * height[:, None]
    radial = offset - (offset @ long_axis)[:, None] * long_axis
    radial = radial / radial.norm(dim=1, keepdim=True)
    bulge = bulge_mm * torch.clamp(radial @ lateral, min=0)[:, None] ** 4 * radial
    kernel_sums = torch.exp(-torch.cdist(control, control) ** 2 / (2 * 25.0**2)).sum(1, keepdim=True)
    momenta = (twist + bulge) / kernel_sums  # so that the velocity at the control points is about twist + bulge
    return KernelDeformation(AffineTransform.identity(3), control, momenta, 25.0, 10)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tutorial_output/heart"), help="output folder")
    parser.add_argument("--twist", type=float, default=15.0, help="apex twist of the truth, degrees (default 15)")
    parser.add_argument("--bulge", type=float, default=6.0, help="lateral-wall bulge of the truth, mm (default 6)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    template = datasets.heart_myocardium("lv")
    truth = known_deformation(template, args.twist, args.bulge)
    patient = truth(template)
    true_motion = np.linalg.norm(patient.vertices - template.vertices, axis=1)
    start = time.perf_counter()
    result = register(template, patient, model="diffeomorphic", preset="heart")
    seconds = time.perf_counter() - start
    warped = result.warped.vertices
    back = result.transform.inverse(warped)
    row = dict(seconds=round(seconds, 2), truth_mean_mm=round(float(true_motion.mean()), 3),
               truth_max_mm=round(float(true_motion.max()), 3),
               mean_vertex_error_mm=round(float(np.linalg.norm(warped - patient.vertices, axis=1).mean()), 3),
               mean_surface_distance_mm=round(float(distance_to_surface(warped, patient).mean()), 3),
               min_jacobian=round(result.min_jacobian, 3),
               inverse_consistency_mm=float(np.abs(back - template.vertices).max()))
    logging.info("truth: mean %.2f mm, max %.2f mm; recovered: mean vertex error %.2f mm, surface distance %.2f mm "
                 "(%.1f s), min Jacobian %.2f", row["truth_mean_mm"], row["truth_max_mm"],
                 row["mean_vertex_error_mm"], row["mean_surface_distance_mm"], seconds, row["min_jacobian"])
    args.out.mkdir(parents=True, exist_ok=True)
    plot_registration(result, patient, args.out / "heart_registration.png", view=(10, -30))
    with open(args.out / "heart_registration.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    print(f"wrote {args.out}/heart_registration.csv and .png")
    return row


if __name__ == "__main__":
    main()
