"""How the Sinkhorn divergence approaches exact optimal transport as the blur shrinks, on real nearby shapes.

A knee's femur surface (from the bundled label map, ~1500 points) is compared with a smooth 2 mm deformation of
itself. For each blur, the debiased divergence S_ε (converged, float64) is compared with the exact OT cost
W₂²/2 of POT's network simplex (``ot.emd2``, same |x − y|²/2 cost). Run::

    python tutorials/entropic_bias.py --out benchmarks/results

It prints a table and writes ``entropic_bias.png`` and ``entropic_bias.csv``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import ot
import torch

from geomed import Measure, datasets, mask_to_mesh, sinkhorn_divergence


def _shapes(count: int) -> tuple[Measure, Measure]:
    surface = Measure.from_mesh(mask_to_mesh(datasets.knee_labels("A"), "femur"), dtype=torch.float64)
    step = max(1, surface.n_points // count)
    points, weights = surface.points[::step], surface.weights[::step]
    warped = points + 2.0 * torch.sin(points / 15.0)
    return Measure.from_points(points, weights), Measure.from_points(warped, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=1500, help="points per shape (default 1500)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG and CSV")
    args = parser.parse_args()
    a, b = _shapes(args.points)
    diameter = float((a.points.amax(0) - a.points.amin(0)).norm())
    alpha, beta = a.normalized(), b.normalized()
    exact = ot.emd2(alpha.weights.numpy(), beta.weights.numpy(),
                    ot.dist(alpha.points.numpy(), beta.points.numpy()) / 2, numItermax=10_000_000)
    fractions = [0.1, 0.05, 0.02, 0.01, 0.005, 0.002]
    rows = []
    print(f"exact OT (W2^2/2) = {exact:.4f} mm^2, diameter {diameter:.1f} mm, {a.n_points} points per shape")
    for fraction in fractions:
        blur = fraction * diameter
        value = float(sinkhorn_divergence(a, b, blur=blur, tol=1e-4, max_iter=20_000).value)
        rows.append({"blur_fraction": fraction, "blur_mm": blur, "sinkhorn": value, "exact": exact,
                     "relative_gap": (exact - value) / exact})
        print(f"blur {fraction:6.3f} x diameter = {blur:6.2f} mm   S = {value:.4f}   gap {(exact - value) / exact:+.2%}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "entropic_bias.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    figure, axis = plt.subplots(figsize=(5, 3.6))
    axis.loglog([r["blur_mm"] for r in rows], [abs(r["relative_gap"]) for r in rows], "o-")
    axis.set_xlabel("blur (mm)")
    axis.set_ylabel("|S_ε − OT| / OT")
    axis.set_title("Entropic bias, femur vs 2 mm deformation")
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out / "entropic_bias.png", dpi=120)


if __name__ == "__main__":
    main()
