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

    python benchmarks/grid.py --sizes 32 64 --inputs blobs shift
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    parser.add_argument("--inputs", nargs="+", choices=["blobs", "shift"], default=["blobs", "shift"])
    parser.add_argument("--single", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        library, kind, size, tol = args.single
        print(json.dumps(_run(library, kind, int(size), None if tol == "None" else float(tol))))
        return
    _density_table(args.inputs, args.sizes)


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
