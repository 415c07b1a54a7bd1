"""geomed's Sinkhorn divergence against GeomLoss on the same inputs, in one run: time ratios, accuracy, memory.

Each (library, inputs, size) runs in its own subprocess so that its peak resident memory is its own. Inputs:

- ``cube``: two uniform point clouds in the unit cube scaled to 100 mm, the second shifted by 10 mm;
- ``surface``: triangle centroids of two real distal femurs (``datasets.femur(1)`` and a smooth 2 mm deformation
  of it), subsampled to N;
- ``volume``: voxel centres of the tibia of ``datasets.knee_labels("A")`` and of the same voxels smoothly deformed,
  subsampled to N (volume-filling sets, where GeomLoss's default clustering biases the value).

Blur = 1% of the diameter unless ``--blur-fraction`` says otherwise. Accuracy is against geomed's exact (untruncated)
``online`` backend in float64, run to a marginal error of 1e-3 at the same blur (the value error is second order in
it). GeomLoss runs with its defaults (scaling 0.5), geomed with its own. Usage::

    python benchmarks/sinkhorn.py --sizes 1000 5000 10000 --inputs cube surface volume --out benchmarks/results

prints a table and writes ``sinkhorn.csv`` and ``sinkhorn.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

GEOMLOSS_BACKENDS = ("tensorized", "online", "multiscale")


def _inputs(kind: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from geomed import Measure, datasets

    generator = torch.Generator().manual_seed(seed)
    if kind == "cube":
        x = torch.rand(n, 3, generator=generator) * 100
        y = torch.rand(n, 3, generator=generator) * 100 + torch.tensor([10.0, 0.0, 0.0])
        return x, y
    if kind == "surface":
        points = Measure.from_mesh(datasets.femur(1), dtype=torch.float64).points
    elif kind == "volume":
        knee = datasets.knee_labels("A")
        points = Measure.from_labels(knee, ["tibia"], dtype=torch.float64)["tibia"].points
    else:
        raise ValueError(f"unknown inputs {kind!r}")
    pick = torch.randperm(len(points), generator=generator)
    x = points[pick[:n]]
    y_source = points[pick[-n:]] if len(points) >= 2 * n else points[pick[:n]]
    y = y_source + 2.0 * torch.sin(y_source / 15.0)
    return x.float(), y.float()


def _diameter(x: torch.Tensor, y: torch.Tensor) -> float:
    both = torch.cat([x, y])
    return float((both.amax(0) - both.amin(0)).norm())


def _run_single(library: str, kind: str, n: int, blur_fraction: float, backward: bool, repeats: int) -> dict:
    x, y = _inputs(kind, n)
    blur = blur_fraction * _diameter(x, y)
    if library == "geomed":
        from geomed import Measure, sinkhorn_divergence

        def call(points):
            return sinkhorn_divergence(Measure.from_points(points), Measure.from_points(y), blur=blur).value
    elif library.startswith("geomed-"):
        from geomed import Measure, sinkhorn_divergence

        backend = library.removeprefix("geomed-")

        def call(points):
            return sinkhorn_divergence(Measure.from_points(points), Measure.from_points(y), blur=blur,
                                       backend=backend).value
    else:
        from geomloss import SamplesLoss

        loss = SamplesLoss("sinkhorn", p=2, blur=blur, backend=library.removeprefix("geomloss-"))

        def call(points):
            return loss(points, y)

    times = []
    value = None
    for _ in range(repeats):
        points = x.clone().requires_grad_(backward)
        start = time.perf_counter()
        value = call(points)
        if backward:
            value.backward()
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"library": library, "inputs": kind, "n": n, "backward": backward, "blur_mm": blur,
            "seconds": min(times), "first_call_seconds": times[0], "value": float(value), "peak_mb": peak_mb}


def _reference(kind: str, n: int, blur_fraction: float) -> float:
    from geomed import Measure, sinkhorn_divergence

    x, y = _inputs(kind, n)
    blur = blur_fraction * _diameter(x, y)
    return float(sinkhorn_divergence(Measure.from_points(x.double()), Measure.from_points(y.double()), blur=blur,
                                     tol=1e-3, max_iter=20_000, backend="online").value)


def _subprocess(arguments: list[str]) -> dict | None:
    result = subprocess.run([sys.executable, __file__, "--single", *arguments], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        print(f"  failed: {' '.join(arguments)}: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--inputs", nargs="+", default=["cube", "surface", "volume"])
    parser.add_argument("--libraries", nargs="+",
                        default=["geomed", *[f"geomloss-{b}" for b in GEOMLOSS_BACKENDS]])
    parser.add_argument("--blur-fraction", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--single", nargs=6, metavar=("LIB", "INPUTS", "N", "BLUR", "BACKWARD", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        library, kind, n, blur, backward, repeats = args.single
        print(json.dumps(_run_single(library, kind, int(n), float(blur), backward == "1", int(repeats))))
        return
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    rows = []
    for kind in args.inputs:
        for n in args.sizes:
            reference = _reference(kind, n, args.blur_fraction) if n <= 20_000 else None
            for backward in ([False] if args.forward_only else [False, True]):
                for library in args.libraries:
                    row = _subprocess([library, kind, str(n), str(args.blur_fraction), str(int(backward)),
                                       str(args.repeats)])
                    if row is None:
                        continue
                    row["device"] = device
                    row["relative_error"] = None if reference is None else abs(row["value"] - reference) / reference
                    rows.append(row)
                    print(f"{kind:8s} N={n:>7d} {'fwd+bwd' if backward else 'fwd':7s} {library:22s} "
                          f"{row['seconds']:8.3f}s  value={row['value']:.5g}  "
                          f"err={row['relative_error'] if row['relative_error'] is not None else float('nan'):.2e}  "
                          f"peak={row['peak_mb']:.0f} MB", flush=True)
    _summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sinkhorn.json", "w") as stream:
        json.dump(rows, stream, indent=1)
    with open(args.out / "sinkhorn.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _summarise(rows: list[dict]) -> None:
    print("\nratio = fastest GeomLoss backend time / geomed time (higher is better for geomed)")
    keys = sorted({(r["inputs"], r["n"], r["backward"]) for r in rows})
    for kind, n, backward in keys:
        group = [r for r in rows if (r["inputs"], r["n"], r["backward"]) == (kind, n, backward)]
        ours = [r for r in group if r["library"].startswith("geomed")]
        theirs = [r for r in group if r["library"].startswith("geomloss")]
        if ours and theirs:
            best = min(theirs, key=lambda r: r["seconds"])
            mine = min(ours, key=lambda r: r["seconds"])
            gap = (mine["value"] - best["value"]) / mine["value"]
            print(f"{kind:8s} N={n:>7d} {'fwd+bwd' if backward else 'fwd':7s} ratio {best['seconds'] / mine['seconds']:6.2f} "
                  f"(GeomLoss {best['library']} err {_error(best)}, geomed err {_error(mine)}, "
                  f"GeomLoss value {gap:+.1%} below geomed's)")


def _error(row: dict) -> str:
    return "n/a" if row["relative_error"] is None else f"{row['relative_error']:.1e}"


if __name__ == "__main__":
    main()
