"""Grid Sinkhorn against GeomLoss's image solver on the same voxel densities, forward + backward (the MONAI losses
built on it are compared with MONAI's own in ``benchmarks/monai_losses.py``).

Inputs on a K³ grid of 1 mm voxels, batch 1, blur = one voxel, p = 2: ``blobs``, a Gaussian and a shifted,
anisotropic one; ``shift``, a Gaussian and itself moved by 3 voxels, whose exact value is 3²/2 = 4.5 mm² (the
debiased divergence differs from it only by the small entropic bias). geomed runs ``grid_sinkhorn_divergence`` at
its defaults; GeomLoss runs ``geomloss.sinkhorn_divergence`` (its image solver, coordinates in [0, 1)³, so its
values are scaled by K² to mm²) at its defaults, on (batch, channel, K, K, K) = (1, 1, K, K, K) tensors: that solver
reads the spatial dimensions after two leading ones (a (1, K, K, K) tensor would be K 2-D images). Error: relative
gap to geomed's grid solve at marginal error 1e-5 (``blobs``) or to the exact 4.5 mm² (``shift``).

Each run is a fresh subprocess, so that its peak resident memory is its own (the interpreter, torch and the
library imported count in it); the time covers one forward + backward, after the inputs are built and the library
imported.

``cartilage``: two real masks on one grid, the femoral cartilage (label 1, 157 596 voxels) against the tibial
cartilage (labels 2 and 3, 49 098 voxels) of the shipped knee A (0.365 × 0.365 × 0.7 mm, oblique), through
``sinkhorn_divergence`` (it takes the grid path by itself: a 204 × 137 × 121 crop, 6% occupied) at blur 1 mm,
float32, the default ``tol``, forward only — the converged solve. Each of ``--repeats`` fresh subprocesses prints
the time of the solve, the Sinkhorn iterations of the solver's schedule, the softmin reductions (those on the
full-resolution grid, then those on coarser levels: the ε-scaling, the extrapolations and the final blur solved
there first), the value and the peak resident memory (VmHWM; baseline: after the masks are loaded); the last line
has the median time.

    python benchmarks/grid.py --sizes 32 64 --inputs blobs shift
    python benchmarks/grid.py --inputs cartilage --repeats 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


_SHIFT = 3


def _densities(kind: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.arange(size, dtype=torch.float32)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    centre = size / 2
    a = torch.exp(-((x - centre) ** 2 + (y - centre) ** 2 + (z - centre) ** 2) / (2 * (size / 8) ** 2))
    if kind == "shift":
        b = torch.roll(a, _SHIFT, 0)
    else:
        b = torch.exp(-((x - centre - size / 8) ** 2 / 2 + (y - centre) ** 2 + (z - centre + size / 10) ** 2 * 2)
                      / (2 * (size / 8) ** 2))
    return a / a.sum(), b / b.sum()


def _density_loss(library: str, tol: float | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The divergence (mm²) of two densities (K, K, K) on 1 mm voxels, its library imported."""
    if library == "geomed":
        from geomed import grid_sinkhorn_divergence

        options = {} if tol is None else dict(tol=tol, max_iter=20_000)
        return lambda a, b: grid_sinkhorn_divergence(a[None, None], b[None, None], blur=1.0, **options).value.sum()
    import geomloss

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        size = a.shape[-1]
        value = geomloss.sinkhorn_divergence(a[None, None], b[None, None], p=2, blur=1.0 / size).sum()
        return value * float(size) ** 2

    return loss


def _peak_mb() -> float:
    """VmHWM (peak resident memory) of this process, MB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _cartilage() -> dict:
    """The converged grid solve between knee A's femoral and tibial cartilage at blur 1 mm, timed, its softmin
    reductions counted by grid size."""
    import numpy as np

    from geomed import Measure, datasets, sinkhorn_divergence
    from geomed.ot.grid import GridSoftmin

    knee = datasets.knee_labels("A")
    femoral = Measure.from_mask(knee.with_array(knee.array == 1))
    tibial = Measure.from_mask(knee.with_array(np.isin(knee.array, [2, 3])))
    baseline = _peak_mb()
    sizes = []
    reduce = GridSoftmin.__call__

    def counted(softmin, eps, x, y, h):
        sizes.append(math.prod(len(c) for c in softmin.rows))
        return reduce(softmin, eps, x, y, h)

    GridSoftmin.__call__ = counted
    start = time.perf_counter()
    result = sinkhorn_divergence(femoral, tibial, blur=1.0)
    seconds = time.perf_counter() - start
    full = sum(size == max(sizes) for size in sizes)
    return {"inputs": "cartilage", "points": [femoral.n_points, tibial.n_points], "backend": result.backend,
            "seconds": seconds, "iterations": result.iterations, "softmins_full": full,
            "softmins_coarse": len(sizes) - full, "value": float(result.value), "converged": result.converged,
            "baseline_mb": baseline, "peak_mb": _peak_mb()}


def _run(library: str, kind: str, size: int, tol: float | None) -> dict:
    """One forward + backward, timed after the inputs are built and the library imported."""
    a, b = _densities(kind, size)
    loss = _density_loss(library, tol)
    a.requires_grad_()
    start = time.perf_counter()
    value = loss(a, b)
    value.backward()
    seconds = time.perf_counter() - start
    return {"library": library, "inputs": kind, "size": size, "seconds": seconds, "value": float(value.detach()),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _subprocess(library: str, kind: str, size: int, tol: float | None) -> dict | None:
    arguments = [sys.executable, __file__, "--single", library, kind, str(size), str(tol)]
    result = subprocess.run(arguments, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        print(f"  failed: {library} {size}: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--inputs", nargs="+", choices=["blobs", "shift", "cartilage"], default=["blobs", "shift"])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per cartilage solve")
    parser.add_argument("--single", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        library, kind, size, tol = args.single
        run = _cartilage() if kind == "cartilage" else _run(library, kind, int(size),
                                                            None if tol == "None" else float(tol))
        print(json.dumps(run))
        return
    densities = [kind for kind in args.inputs if kind != "cartilage"]
    if densities:
        _density_table(densities, args.sizes)
    if "cartilage" in args.inputs:
        _cartilage_table(args.repeats)


def _cartilage_table(repeats: int) -> None:
    print(f"{'inputs':>9} {'voxels':>15} {'time':>7} {'iterations':>10} {'softmins full + coarse':>22} "
          f"{'value mm²':>10} {'peak MB':>8} {'baseline MB':>11}")
    times = []
    for _ in range(repeats):
        row = _subprocess("geomed", "cartilage", 0, None)
        if row is None:
            continue
        times.append(row["seconds"])
        voxels = " vs ".join(str(n) for n in row["points"])
        print(f"{row['inputs']:>9} {voxels:>15} {row['seconds']:>6.2f}s {row['iterations']:>10} "
              f"{row['softmins_full']:>13} + {row['softmins_coarse']:<6} {row['value']:>10.3f} {row['peak_mb']:>8.0f} "
              f"{row['baseline_mb']:>11.0f}", flush=True)
    if times:
        print(f"median time over {len(times)} fresh processes: {statistics.median(times):.2f} s", flush=True)


def _density_table(kinds: list[str], sizes: list[int]) -> None:
    print(f"{'inputs':>6} {'K³':>6} {'library':>8} {'fwd+bwd':>9} {'value mm²':>12} {'error':>9} {'peak MB':>8}")
    for kind in kinds:
        for size in sizes:
            reference = _SHIFT**2 / 2 if kind == "shift" else (_subprocess("geomed", kind, size, 1e-5) or {}).get(
                "value")
            rows = [_subprocess("geomed", kind, size, None), _subprocess("geomloss", kind, size, None)]
            for row in rows:
                if row is None or reference is None:
                    continue
                error = abs(row["value"] / reference - 1)
                print(f"{kind:>6} {size:>4}³ {row['library']:>8} {row['seconds']:>8.2f}s {row['value']:>12.5f} "
                      f"{error:>9.1e} {row['peak_mb']:>8.0f}", flush=True)
            if all(rows):
                print(f"{'':>13} ratio GeomLoss / geomed time: {rows[1]['seconds'] / rows[0]['seconds']:.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
