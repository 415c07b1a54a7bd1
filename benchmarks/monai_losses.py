"""geomed's MONAI losses against MONAI's own segmentation losses: forward + backward time and peak memory.

Inputs (B, 3, K³), as a segmentation network sees them: logits of a noisy prediction (8 × one-hot + N(0, 1);
item 0 with both structures shifted by K/32 voxels, item 1 with them dilated by K/32) against the one-hot labels
of background, a ball and an ellipsoid, 1 mm voxels. Every loss takes the logits with ``softmax=True`` and the
background channel included, so that each sees the same B × 3 channels:

``sinkhorn``           ``SinkhornSegmentationLoss()``: blur 2 mm, reach 10 mm, stops at the end of ε-scaling
``sinkhorn-balanced``  the same, balanced (``reach=None``)
``sinkhorn-converged`` ``SinkhornSegmentationLoss(tol=1e-3)``: converged potentials at the final blur
``dice-sinkhorn``      ``DiceSinkhornLoss()``
``boundary-kernel``    ``BoundaryKernelLoss()``: boundary currents, Gaussian kernel of 3 mm
``monai-dice``         ``monai.losses.DiceLoss``
``monai-hausdorff``    ``monai.losses.HausdorffDTLoss`` (distance transforms on the CPU, treated as constants)
``monai-boundary``     ``monai.losses.BoundaryLoss`` (likewise)

Values are in each loss's own units: the columns compare time and memory. Each loss runs in a fresh subprocess
(its peak resident memory, or peak GPU memory on a GPU, is its own; the interpreter, torch and the libraries count
in the CPU figure); the time is the best of ``--repeats`` forward + backward passes after one warm-up pass.

    python benchmarks/monai_losses.py                          # (2, 3, 64³) and (1, 3, 128³) on the CPU
    python benchmarks/monai_losses.py --device cuda --shapes 2x64 1x128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

# This script shares its name with the package it measures: take the script's folder off the import path.
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != os.path.dirname(os.path.abspath(__file__))]

LOSSES = ("sinkhorn", "sinkhorn-balanced", "sinkhorn-converged", "dice-sinkhorn", "boundary-kernel", "monai-dice",
          "monai-hausdorff", "monai-boundary")


def _segmentation(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, 3, K³) of a noisy prediction and the one-hot target (background, ball, ellipsoid)."""
    axis = torch.arange(size, dtype=torch.float32) - size / 2
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")

    def labels(shift: float, grow: float) -> torch.Tensor:
        ball = (x - shift + size / 6) ** 2 + (y + size / 8) ** 2 + z**2 <= (size / 6 + grow) ** 2
        ellipsoid = ((x - shift - size / 6) / (size / 5 + grow)) ** 2 + ((y - size / 8) / (size / 9 + grow)) ** 2 + (
            z / (size / 7 + grow)) ** 2 <= 1
        return torch.where(ellipsoid, 2, torch.where(ball, 1, 0))

    target = torch.nn.functional.one_hot(labels(0.0, 0.0), 3).movedim(-1, 0).float()
    variants = [(size / 32, 0.0), (0.0, size / 32)]
    predicted = [torch.nn.functional.one_hot(labels(*variants[item % 2]), 3) for item in range(batch)]
    generator = torch.Generator().manual_seed(0)
    logits = torch.stack([8.0 * p.movedim(-1, 0).float() for p in predicted])
    logits = logits + torch.randn(logits.shape, generator=generator)
    return logits, target.expand(batch, -1, -1, -1, -1).contiguous()


def _loss(name: str) -> torch.nn.Module:
    if name.startswith("monai-"):
        from monai.losses import BoundaryLoss, DiceLoss, HausdorffDTLoss

        return {"monai-dice": DiceLoss, "monai-hausdorff": HausdorffDTLoss, "monai-boundary": BoundaryLoss}[name](
            softmax=True)
    from monai_losses import BoundaryKernelLoss, DiceSinkhornLoss, SinkhornSegmentationLoss

    return {"sinkhorn": lambda: SinkhornSegmentationLoss(softmax=True),
            "sinkhorn-balanced": lambda: SinkhornSegmentationLoss(softmax=True, reach=None),
            "sinkhorn-converged": lambda: SinkhornSegmentationLoss(softmax=True, tol=1e-3),
            "dice-sinkhorn": lambda: DiceSinkhornLoss(softmax=True),
            "boundary-kernel": lambda: BoundaryKernelLoss(softmax=True)}[name]()


def _run(name: str, batch: int, size: int, device: str, repeats: int) -> dict:
    logits, target = (t.to(device) for t in _segmentation(batch, size))
    loss = _loss(name)
    times = []
    for _ in range(repeats + 1):
        x = logits.clone().requires_grad_()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = loss(x, target)
        value.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"loss": name, "seconds": min(times[1:]), "value": float(value.detach()), "peak_mb": peak}


def _subprocess(name: str, batch: int, size: int, device: str, repeats: int) -> dict | None:
    arguments = [sys.executable, __file__, "--single", name, str(batch), str(size), device, str(repeats)]
    result = subprocess.run(arguments, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        print(f"  failed: {name} ({batch}, 3, {size}³): {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2x64", "1x128"],
                        help="batch x K for inputs (batch, 3, K, K, K) (default: 2x64 1x128)")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        name, batch, size, device, repeats = args.single
        print(json.dumps(_run(name, int(batch), int(size), device, int(repeats))))
        return
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"forward + backward, best of {args.repeats}, on {card}; ratio = time / sinkhorn time")
    print(f"{'inputs':>14} {'loss':>18} {'fwd+bwd':>9} {'value':>10} {'ratio':>7} {'peak MB':>8}")
    for shape in args.shapes:
        batch, size = (int(part) for part in shape.split("x"))
        reference = None
        for name in args.losses:
            row = _subprocess(name, batch, size, args.device, args.repeats)
            if row is None:
                continue
            reference = row["seconds"] if name == "sinkhorn" else reference
            ratio = f"{row['seconds'] / reference:>7.2f}" if reference else f"{'-':>7}"
            print(f"{f'({batch}, 3, {size}³)':>14} {row['loss']:>18} {row['seconds']:>8.3f}s {row['value']:>10.4g} "
                  f"{ratio} {row['peak_mb']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
