"""Knee: register one subject's distal femur onto another's — rigid, then affine, then diffeomorphic.

Two real femur surfaces (``datasets.femur(2)`` onto ``datasets.femur(1)``, 20k vertices each, from knee MRI
segmentations) with the ``knee`` preset: Sinkhorn correspondences at blurs 12 → 4 → 1.5 mm for the linear stages,
then LDDMM geodesic shooting with 20 and 10 mm kernels (see ``geomed.registration.presets``). Each model starts
from scratch, so their times add up to what one call with that model costs. Mean surface distance (moving
vertices to the fixed triangles) before and after tells how much of the difference each model explains: the
pose, the size and proportions, then the shape.

Outputs in ``--out``: ``knee_registration.csv`` (model, seconds, distances, minimum Jacobian),
``knee_registration.png`` (the fixed femur, the warped one coloured by its normal displacement, the objective per
stage), ``knee_warped.vtp`` (the diffeomorphically warped femur with ``displacement``, ``normal displacement`` and
``jacobian`` arrays — open it in Slicer or ParaView) and ``knee_transform.h5`` (the transform for ITK and Slicer,
fixed → moving in LPS as they expect). Run::

    python tutorials/knee_registration.py --out tutorial_output/knee

Outcome (2 CPU cores): mean surface distance 14.6 mm before; rigid 2.1 mm (1.8 s), affine 1.19 mm (1.9 s),
diffeomorphic 0.29 mm (62 s), minimum Jacobian 0.26 > 0 (nothing folds).
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

from geomed import datasets, register
from geomed.io import write_mesh
from geomed.plotting import plot_registration
from geomed.surface import distance_to_surface

MODELS = ("rigid", "affine", "diffeomorphic")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("tutorial_output/knee"), help="output folder")
    parser.add_argument("--moving", type=int, default=2, help="moving femur, 1-5 (default 2)")
    parser.add_argument("--fixed", type=int, default=1, help="fixed femur, 1-5 (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fixed, moving = datasets.femur(args.fixed), datasets.femur(args.moving)
    before = float(distance_to_surface(moving.vertices, fixed).mean())
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in MODELS:
        start = time.perf_counter()
        result = register(moving, fixed, model=model, preset="knee")
        seconds = time.perf_counter() - start
        after = float(distance_to_surface(result.warped.vertices, fixed).mean())
        rows.append(dict(model=model, seconds=round(seconds, 2), distance_before_mm=round(before, 3),
                         distance_after_mm=round(after, 3), min_jacobian=round(result.min_jacobian, 3)))
        logging.info("%-13s %6.1f s   mean surface distance %.2f → %.2f mm", model, seconds, before, after)
    write_mesh(result.warped, args.out / "knee_warped.vtp")
    result.write_transform(args.out / "knee_transform.h5")
    plot_registration(result, fixed, args.out / "knee_registration.png")
    with open(args.out / "knee_registration.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}/knee_registration.csv, .png, knee_warped.vtp and knee_transform.h5")
    return rows


if __name__ == "__main__":
    main()
