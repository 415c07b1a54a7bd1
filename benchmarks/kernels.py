"""Kernel (MMD) and varifold losses: geomed against GeomLoss's kernel losses and a dense float64 reference.

Inputs: N points sampled uniformly on two real distal femur surfaces (``datasets.femur(1)`` and ``(2)``, each
centred on its mean, as in a registration), with the unit normals of their triangles and weights 1/N; blur 2 mm
(the femurs are ≈ 90 mm long). Each run is a fresh subprocess (its peak resident memory is its own) that times one
forward + backward (gradient w.r.t. the first points) after a warm-up call on 200 points (KeOps compiles then).
Error: relative gap to a float64 evaluation of every pair (plain torch, chunked; cached in ``--cache``).

Libraries: ``geomed`` (default backend: truncated torch tiles), ``geomed-keops`` (one KeOps reduction),
``geomloss-online`` (its default for kernels, KeOps), ``geomloss-multiscale`` (KeOps, block-sparse, truncate=5)
and ``geomloss-tensorized`` (plain torch, O(N²) memory). KeOps rows are skipped where geomed's probe finds KeOps
broken (a broken build can crash the process).
GeomLoss has no varifolds or currents: those rows compare geomed's backends with the reference only.

    python benchmarks/kernels.py --sizes 10000 50000 --losses gaussian laplacian energy oriented
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

_BLUR = 2.0
_VARIFOLDS = ("oriented", "unoriented", "current")
_LOSSES = ("gaussian", "laplacian", "energy", *_VARIFOLDS)
_LIBRARIES = ("geomed", "geomed-keops", "geomloss-online", "geomloss-multiscale", "geomloss-tensorized")
_KEOPS_LIBRARIES = ("geomed-keops", "geomloss-online", "geomloss-multiscale")


def _surface_sample(index: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform on femur ``index`` (area-weighted triangles, uniform barycentric) and their unit normals."""
    from geomed import datasets

    mesh = datasets.femur(index)
    generator = np.random.default_rng(seed)
    areas = mesh.triangle_areas()
    chosen = generator.choice(len(areas), size=n, p=areas / areas.sum())
    r1, r2 = generator.random(n), generator.random(n)
    flip = r1 + r2 > 1
    r1[flip], r2[flip] = 1 - r1[flip], 1 - r2[flip]
    corners = mesh.vertices[mesh.triangles[chosen]]
    points = corners[:, 0] + r1[:, None] * (corners[:, 1] - corners[:, 0]) + r2[:, None] * (corners[:, 2] - corners[:, 0])
    return points - mesh.vertices.mean(0), mesh.triangle_normals()[chosen]


def _inputs(n: int, dtype: torch.dtype, device: str):
    cache = Path("build/benchmark-inputs") / f"femur-pair-{n}.npz"
    if cache.exists():
        arrays = np.load(cache)
    else:
        (x, u), (y, v) = _surface_sample(1, n, 0), _surface_sample(2, n, 1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, x=x, u=u, y=y, v=v)
        arrays = np.load(cache)
    tensors = [torch.tensor(arrays[key], dtype=dtype, device=device) for key in ("x", "u", "y", "v")]
    weights = torch.full((n,), 1.0 / n, dtype=dtype, device=device)
    return tensors, weights


def _loss(library: str, loss: str, x, u, y, v, w):
    if library.startswith("geomed"):
        from geomed import Measure, mmd, varifold_distance

        backend = "keops" if library == "geomed-keops" else "auto"
        a, b = Measure(x, w, u), Measure(y, w, v)
        if loss in _VARIFOLDS:
            return varifold_distance(a, b, blur=_BLUR, kind=loss, backend=backend)
        return mmd(a, b, kernel=loss, blur=None if loss == "energy" else _BLUR, backend=backend)
    from geomloss import SamplesLoss

    return SamplesLoss(loss, blur=_BLUR, backend=library.split("-")[1])(w, x, w, y)


def _run(library: str, loss: str, n: int, device: str) -> dict:
    (x, u, y, v), w = _inputs(n, torch.float32, device)
    small = [t[:200].contiguous() for t in (x, u, y, v)]
    _loss(library, loss, small[0].clone().requires_grad_(), small[1], small[2], small[3], w[:200]).backward()
    x = x.clone().requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = _loss(library, loss, x, u, y, v, w)
    value.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _peak_resident_mb()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"library": library, "loss": loss, "n": n, "seconds": seconds, "value": float(value), "peak_mb": peak}


def _peak_resident_mb() -> float:
    """Peak resident memory of this process (MB): VmHWM, which starts afresh at exec — unlike ``ru_maxrss``, which
    keeps the peak of the parent forked from (here the float64 reference, gigabytes)."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reference(loss: str, n: int, device: str, cache: Path) -> float:
    """½ wᵀKw over every pair in float64, 2048 rows at a time (plain torch, independent of geomed's tiles)."""
    key = f"{loss}-{n}-{_BLUR}"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key in known:
        return known[key]
    (x, u, y, v), w = _inputs(n, torch.float64, device)
    z, normals, signed = torch.cat([x, y]), torch.cat([u, v]), torch.cat([w, -w])
    total = 0.0
    for start in range(0, len(z), 2048):
        rows = slice(start, start + 2048)
        squared = torch.cdist(z[rows], z).square_()
        if loss == "energy":
            kernel = -squared.sqrt_()
        elif loss == "laplacian":
            kernel = squared.sqrt_().div_(-_BLUR).exp_()
        else:
            kernel = squared.div_(-2 * _BLUR**2).exp_()
        if loss in _VARIFOLDS:
            cosine = normals[rows] @ normals.T
            kernel *= {"current": cosine, "unoriented": cosine**2, "oriented": torch.exp((cosine - 1) / 0.25)}[loss]
        total += float(signed[rows] @ (kernel @ signed))
    known[key] = total / 2
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(known, indent=1))
    return known[key]


def _subprocess(library: str, loss: str, n: int, device: str, timeout: float) -> dict | None:
    arguments = [sys.executable, __file__, "--single", library, loss, str(n), device]
    try:
        result = subprocess.run(arguments, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        print(f"  {library} {loss} {n}: over {timeout:.0f} s, stopped", file=sys.stderr)
        return None
    if result.returncode != 0:
        print(f"  failed: {library} {loss} {n}: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--losses", nargs="+", choices=_LOSSES, default=list(_LOSSES))
    parser.add_argument("--libraries", nargs="+", choices=_LIBRARIES, default=list(_LIBRARIES[:4]))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--cache", type=Path, default=Path("build/benchmark-inputs/kernel-references.json"))
    parser.add_argument("--single", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        library, loss, n, device = args.single
        print(json.dumps(_run(library, loss, int(n), device)))
        return
    from geomed import keops_available

    libraries = [name for name in args.libraries if name not in _KEOPS_LIBRARIES or keops_available()]
    memory = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    print(f"{'loss':>10} {'N':>7} {'library':>19} {'fwd+bwd':>9} {'value':>13} {'rel. error':>10} {memory:>11} "
          f"{'time / geomed':>13}")
    for loss in args.losses:
        for n in args.sizes:
            reference = _reference(loss, n, args.device, args.cache)
            geomed_seconds = None
            for library in libraries:
                if library.startswith("geomloss") and loss in _VARIFOLDS:
                    continue
                row = _subprocess(library, loss, n, args.device, args.timeout)
                if row is None:
                    continue
                if library == "geomed":
                    geomed_seconds = row["seconds"]
                ratio = f"{row['seconds'] / geomed_seconds:13.2f}" if geomed_seconds else f"{'':>13}"
                error = abs(row["value"] / reference - 1)
                print(f"{loss:>10} {n:>7} {library:>19} {row['seconds']:>8.2f}s {row['value']:>13.6e} {error:>10.1e} "
                      f"{row['peak_mb']:>11.0f} {ratio}", flush=True)


if __name__ == "__main__":
    main()
