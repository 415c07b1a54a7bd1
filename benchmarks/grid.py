"""Grid Sinkhorn against GeomLoss's image solver on the same voxel densities, and against MONAI's distance-based
segmentation losses on the same soft segmentations, forward + backward.

Inputs on a K³ grid of 1 mm voxels, batch 1, blur = one voxel, p = 2: ``blobs``, a Gaussian and a shifted,
anisotropic one; ``shift``, a Gaussian and itself moved by 3 voxels, whose exact value is 3²/2 = 4.5 mm² (the
debiased divergence differs from it only by the small entropic bias). geomed runs ``grid_sinkhorn_divergence`` at
its defaults; GeomLoss runs ``geomloss.sinkhorn_divergence`` (its image solver, coordinates in [0, 1)³, so its
values are scaled by K² to mm²) at its defaults, on (batch, channel, K, K, K) = (1, 1, K, K, K) tensors: that solver
reads the spatial dimensions after two leading ones (a (1, K, K, K) tensor would be K 2-D images). Error: relative
gap to geomed's grid solve at marginal error 1e-5 (``blobs``) or to the exact 4.5 mm² (``shift``).

``segmentation``: a batch (2, 3, K³) as a segmentation network sees it: softmax probabilities of noisy logits
(8 × one-hot + N(0, 1); item 0 with both structures shifted by K/32 voxels, item 1 with them dilated by K/32)
against the one-hot labels of background, a ball and an ellipsoid. geomed's loss is ``grid_sinkhorn_divergence``
channel by channel with blur = 2 voxels and reach = 8 voxels (1 mm voxels): unbalanced, so that missing or extra
volume is paid for (mass created or destroyed costs about reach² per unit) while mass misplaced by less than the
reach is transported (|x − y|²/2 per unit); both weights are divided by the target channel's volume, so that the
value is in mm² per unit of target volume for every structure size. Its peers: MONAI's ``HausdorffDTLoss`` and
``BoundaryLoss`` (Euclidean distance transforms on the CPU, treated as constants) and ``DiceLoss`` (a speed
reference), all with ``softmax=True`` and the background channel included, so that every loss sees the same 6
channels. Their values are in their own units: the columns compare time and memory only.

Each run is a fresh subprocess, so that its peak resident memory is its own (the interpreter, torch and the
library imported count in it); the time covers one forward + backward, after the inputs are built and the library
imported.

    python benchmarks/grid.py --sizes 32 64 --inputs blobs shift
    python benchmarks/grid.py --sizes 64 --inputs segmentation
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
_MONAI = ("monai-hausdorff", "monai-boundary", "monai-dice")
_BLUR, _REACH = 2.0, 8.0


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


def _segmentation(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2, 3, K³) of a noisy prediction and the one-hot target (background, ball, ellipsoid)."""
    axis = torch.arange(size, dtype=torch.float32) - size / 2
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")

    def labels(shift: float, grow: float) -> torch.Tensor:
        ball = (x - shift + size / 6) ** 2 + (y + size / 8) ** 2 + z**2 <= (size / 6 + grow) ** 2
        ellipsoid = ((x - shift - size / 6) / (size / 5 + grow)) ** 2 + ((y - size / 8) / (size / 9 + grow)) ** 2 + (
            z / (size / 7 + grow)) ** 2 <= 1
        return torch.where(ellipsoid, 2, torch.where(ball, 1, 0))

    target = torch.nn.functional.one_hot(labels(0.0, 0.0), 3).movedim(-1, 0).float()
    predicted = [torch.nn.functional.one_hot(labels(size / 32, 0.0), 3), torch.nn.functional.one_hot(
        labels(0.0, size / 32), 3)]
    generator = torch.Generator().manual_seed(0)
    logits = torch.stack([8.0 * p.movedim(-1, 0).float() for p in predicted])
    logits = logits + torch.randn(logits.shape, generator=generator)
    return logits, target.expand(2, -1, -1, -1, -1).contiguous()


def _segmentation_loss(library: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of logits (B, C, *spatial) against one-hot targets, its library imported."""
    if library == "geomed":
        from geomed import grid_sinkhorn_divergence

        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            volume = target.sum(tuple(range(2, target.dim())), keepdim=True)
            probabilities = torch.softmax(logits, 1)
            return grid_sinkhorn_divergence(probabilities / volume, target / volume, blur=_BLUR,
                                            reach=_REACH).value.mean()

        return loss
    from monai.losses import BoundaryLoss, DiceLoss, HausdorffDTLoss

    monai_loss = {"monai-hausdorff": HausdorffDTLoss, "monai-boundary": BoundaryLoss, "monai-dice": DiceLoss}[library]
    return monai_loss(include_background=True, softmax=True)


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
    if kind == "segmentation":
        a, b = _segmentation(size)
        loss = _segmentation_loss(library)
    else:
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
    parser.add_argument("--inputs", nargs="+", choices=["blobs", "shift", "segmentation"], default=["blobs", "shift"])
    parser.add_argument("--single", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        library, kind, size, tol = args.single
        print(json.dumps(_run(library, kind, int(size), None if tol == "None" else float(tol))))
        return
    if "segmentation" in args.inputs:
        _segmentation_table(args.sizes)
    densities = [kind for kind in args.inputs if kind != "segmentation"]
    if densities:
        _density_table(densities, args.sizes)


def _segmentation_table(sizes: list[int]) -> None:
    print(f"segmentation (2, 3, K³): geomed blur {_BLUR:g} mm, reach {_REACH:g} mm, vs MONAI losses; "
          "time ratio = library / geomed")
    print(f"{'K³':>6} {'loss':>16} {'fwd+bwd':>9} {'value':>11} {'time ratio':>10} {'peak MB':>8}")
    for size in sizes:
        rows = [_subprocess(library, "segmentation", size, None) for library in ("geomed", *_MONAI)]
        reference = rows[0]["seconds"] if rows[0] else None
        for row in rows:
            if row is None:
                continue
            ratio = f"{row['seconds'] / reference:>10.3f}" if reference else f"{'-':>10}"
            print(f"{size:>4}³ {row['library']:>16} {row['seconds']:>8.2f}s {row['value']:>11.4g} {ratio} "
                  f"{row['peak_mb']:>8.0f}", flush=True)


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
