"""geomed's Sinkhorn divergence against GeomLoss on the same inputs, in one run: time ratios, accuracy, memory.

On a CPU each (library, inputs, size) runs in its own subprocess so that its peak resident memory is its own; on a
GPU (``--device cuda``, the default when one is present) runs share the process, and peak memory is the CUDA
allocator's. Inputs (float32, mm; cached in ``build/benchmark-inputs``):

- ``cube``: two uniform point clouds in the unit cube scaled to 100 mm, the second shifted by 10 mm;
- ``surface``: triangle centroids of two real distal femurs (``datasets.femur(1)`` and a smooth 2 mm deformation
  of it), subsampled to N; beyond the 39 991 triangles, N points uniform by area on the triangles;
- ``volume``: voxel centres of the tibia of ``datasets.knee_labels("A")`` (1.35 M voxels) and of the same voxels
  smoothly deformed, subsampled to N (volume-filling sets, where GeomLoss's default clustering biases the value).

Blur = 1% of the diameter unless ``--blur-fraction`` says otherwise. Accuracy is against geomed's exact (untruncated)
solve run to a marginal error of 1e-3 at the same blur (the value error is second order in it): the ``online``
backend in float64 up to 20k points, float32 KeOps beyond (on a GPU; ``--reference-max`` sets the largest N that
gets a reference). GeomLoss runs with its defaults (scaling 0.5), geomed with its own. Usage::

    python benchmarks/sinkhorn.py --sizes 1000 5000 10000 --inputs cube surface volume --out benchmarks/results

prints a table and writes ``sinkhorn.csv`` and ``sinkhorn.json`` into ``--out`` (rewritten after every run).
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


_INPUTS_CACHE = Path(__file__).resolve().parents[1] / "build" / "benchmark-inputs"


def _inputs(kind: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two point sets (float32, mm), cached in ``build/benchmark-inputs`` (they need VTK/SimpleITK once)."""
    cached = _INPUTS_CACHE / f"{kind}-{n}-{seed}.pt"
    if cached.exists():
        return torch.load(cached)
    generator = torch.Generator().manual_seed(seed)
    if kind == "cube":
        x = torch.rand(n, 3, generator=generator) * 100
        y = torch.rand(n, 3, generator=generator) * 100 + torch.tensor([10.0, 0.0, 0.0])
    elif kind in ("surface", "volume"):
        points = _real_points(kind, n, generator)
        pick = torch.randperm(len(points), generator=generator)
        x = points[pick[:n]]
        y_source = points[pick[-n:]] if len(points) >= 2 * n else points[pick[:n]]
        x, y = x.float(), (y_source + 2.0 * torch.sin(y_source / 15.0)).float()
    else:
        raise ValueError(f"unknown inputs {kind!r}")
    _INPUTS_CACHE.mkdir(parents=True, exist_ok=True)
    torch.save((x, y), cached.with_suffix(".partial"))
    cached.with_suffix(".partial").replace(cached)
    return x, y


def _real_points(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Femur triangle centroids (or, for N beyond the triangle count, N points uniform by area on the triangles);
    tibia voxel centres."""
    from geomed import Measure, datasets

    if kind == "volume":
        knee = datasets.knee_labels("A")
        return Measure.from_labels(knee, ["tibia"], dtype=torch.float64)["tibia"].points
    mesh = datasets.femur(1)
    if n <= mesh.n_triangles:
        return Measure.from_mesh(mesh, dtype=torch.float64).points
    corners = torch.as_tensor(mesh.vertices)[torch.as_tensor(mesh.triangles)]
    triangle = torch.multinomial(torch.as_tensor(mesh.triangle_areas()), 2 * n, replacement=True,
                                 generator=generator)
    u, v = torch.rand(2, 2 * n, 1, generator=generator, dtype=torch.float64)
    root = u.sqrt()
    a, b, c = corners[triangle].unbind(1)
    return (1 - root) * a + root * (1 - v) * b + root * v * c


def _diameter(x: torch.Tensor, y: torch.Tensor) -> float:
    both = torch.cat([x, y])
    return float((both.amax(0) - both.amin(0)).norm())


def _run_single(library: str, kind: str, n: int, blur_fraction: float, backward: bool, repeats: int,
                device: torch.device) -> dict:
    x, y = (points.to(device) for points in _inputs(kind, n))
    blur = blur_fraction * _diameter(x, y)
    if library.startswith("geomed"):
        from geomed import Measure, sinkhorn_divergence

        requested = library.removeprefix("geomed-") if library.startswith("geomed-") else "auto"
        chosen = []

        def call(points):
            result = sinkhorn_divergence(Measure.from_points(points), Measure.from_points(y), blur=blur,
                                         backend=requested)
            chosen.append(result.backend)
            return result.value
    else:
        from geomloss import SamplesLoss

        chosen = [library.removeprefix("geomloss-")]
        loss = SamplesLoss("sinkhorn", p=2, blur=blur, backend=chosen[0])

        def call(points):
            return loss(points, y)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    value = None
    for _ in range(repeats):
        points = x.clone().requires_grad_(backward)
        _synchronize(device)
        start = time.perf_counter()
        value = call(points)
        if backward:
            value.backward()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"library": library, "backend": chosen[-1], "inputs": kind, "n": n, "backward": backward, "blur_mm": blur,
            "seconds": min(times), "first_call_seconds": times[0], "value": float(value), "peak_mb": peak_mb}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reference(kind: str, n: int, blur_fraction: float, device: torch.device) -> float:
    """Exact (untruncated) solve at marginal error 1e-3: float64 tiles up to 20k points, float32 beyond (KeOps on a
    GPU)."""
    from geomed import Measure, sinkhorn_divergence
    from geomed._spatial import keops_available

    dtype = torch.float64 if n <= 20_000 else torch.float32
    backend = "keops" if n > 20_000 and device.type == "cuda" and keops_available() else "online"
    x, y = (points.to(device, dtype) for points in _inputs(kind, n))
    blur = blur_fraction * _diameter(x, y)
    return float(sinkhorn_divergence(Measure.from_points(x), Measure.from_points(y), blur=blur,
                                     tol=1e-3, max_iter=20_000, backend=backend).value)


def _measure(arguments: list[str], device: torch.device) -> dict | None:
    """One run: in this process on a GPU (peak memory from the CUDA allocator), else in a subprocess so that its
    peak resident memory is its own."""
    if device.type == "cuda":
        library, kind, n, blur, backward, repeats = arguments
        try:
            return _run_single(library, kind, int(n), float(blur), backward == "1", int(repeats), device)
        except Exception as error:  # a peer failing (out of memory, no KeOps) must not stop the table
            print(f"  failed: {' '.join(arguments)}: {type(error).__name__}: {error}", file=sys.stderr)
            torch.cuda.empty_cache()
            return None
    return _subprocess(arguments)


def _subprocess(arguments: list[str]) -> dict | None:
    result = subprocess.run([sys.executable, __file__, "--single", *arguments, "--device", "cpu"],
                            capture_output=True, text=True,
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
    parser.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="both")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference-max", type=int, default=20_000,
                        help="largest N with an exact reference solve (quadratic cost)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--single", nargs=6, metavar=("LIB", "INPUTS", "N", "BLUR", "BACKWARD", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.single:
        library, kind, n, blur, backward, repeats = args.single
        print(json.dumps(_run_single(library, kind, int(n), float(blur), backward == "1", int(repeats), device)))
        return
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[args.passes]
    rows = []
    for kind in args.inputs:
        for n in args.sizes:
            reference = _reference(kind, n, args.blur_fraction, device) if n <= args.reference_max else None
            for backward in passes:
                for library in args.libraries:
                    row = _measure([library, kind, str(n), str(args.blur_fraction), str(int(backward)),
                                    str(args.repeats)], device)
                    if row is None:
                        continue
                    row["device"] = device_name
                    row["relative_error"] = None if reference is None else abs(row["value"] - reference) / reference
                    rows.append(row)
                    print(f"{kind:8s} N={n:>7d} {'fwd+bwd' if backward else 'fwd':7s} {library:20s} "
                          f"{row['backend']:11s}"
                          f"{row['seconds']:8.3f}s  value={row['value']:.5g}  "
                          f"err={row['relative_error'] if row['relative_error'] is not None else float('nan'):.2e}  "
                          f"peak={row['peak_mb']:.0f} MB", flush=True)
                    _write(rows, args.out)
    _summarise(rows)


def _write(rows: list[dict], out: Path) -> None:
    """Rewrite ``sinkhorn.json`` and ``sinkhorn.csv`` (atomically) with every row so far."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sinkhorn.json.partial", "w") as stream:
        json.dump(rows, stream, indent=1)
    with open(out / "sinkhorn.csv.partial", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name in ("sinkhorn.json", "sinkhorn.csv"):
        (out / f"{name}.partial").replace(out / name)


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
