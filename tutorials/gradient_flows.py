"""Which loss gives clean gradients? Gradient flows of one real hippocampus onto another donor's.

The left hippocampus of Allen donor 9861 (surface extracted from its label map, ~3000 vertices) flows onto donor
10021's, both centred on their centroids, under three losses side by side:

``sinkhorn``  debiased Sinkhorn divergence, blur 1 mm (balanced: shapes, not sizes)
``mmd``       Gaussian kernel MMD, blur 4 mm
``varifold``  oriented varifold of the triangles, blur 3 mm (the moving surface's areas and normals follow)

Each step moves every vertex along its gradient divided by its mass, ``x_i ← x_i − δt ∇_{x_i} Loss / α_i``
(α_i: a third of the area of the triangles around vertex i, normalised for the Sinkhorn and MMD losses), the
discretised Wasserstein gradient flow. The losses have different units, so δt is set per loss so that the first
step moves no vertex by more than ``--first-step`` mm, then kept. The figure shows the flowing surface's vertices
(red) over the target's (grey), projected on the target's two main axes, at several times; the curve is the mean
symmetric surface distance (mm) to the target along the flow. Run::

    python tutorials/gradient_flows.py --out benchmarks/results

Outcome (40 steps, ``benchmarks/results/gradient_flows.png``): the mean surface distance falls from 1.41 mm to
0.38 mm under Sinkhorn, which transports every vertex to a matched place in about 10 steps; to 0.69 mm under the
Gaussian MMD, which pulls the bulk and leaves stragglers where its gradient fades; to 0.89 mm under the varifold,
slower (blind to tangential motion) but keeping a surface with its orientation.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm import tqdm

from geomed import Measure, Mesh, datasets, mask_to_mesh, mmd, sinkhorn_divergence, varifold_distance

logger = logging.getLogger("gradient_flows")

_LOSSES = ("sinkhorn", "mmd", "varifold")


def _hippocampus(donor: str) -> Mesh:
    mesh = mask_to_mesh(datasets.brain_labels(donor), "left_hippocampus")
    return mesh.transformed(np.block([[np.eye(3), -mesh.vertices.mean(0)[:, None]], [np.zeros((1, 3)), 1.0]]))


def _loss(name: str, vertices: torch.Tensor, source: Mesh, masses: torch.Tensor, target: Mesh) -> torch.Tensor:
    if name == "varifold":
        return varifold_distance(Measure.from_triangles(vertices, source.triangles),
                                 Measure.from_mesh(target, dtype=torch.float32), blur=3.0)
    moving = Measure(vertices, masses / masses.sum())
    fixed = Measure.from_mesh(target, lumped=True, dtype=torch.float32).normalized()
    if name == "sinkhorn":
        return sinkhorn_divergence(moving, fixed, blur=1.0).value
    return mmd(moving, fixed, blur=4.0)


def _surface_distance(points: torch.Tensor, target: torch.Tensor) -> float:
    distances = torch.cdist(points, target)
    return float((distances.min(1).values.mean() + distances.min(0).values.mean()) / 2)


def _flow(name: str, source: Mesh, target: Mesh, steps: int, first_step: float, snapshots: list[int]):
    vertices = torch.tensor(source.vertices, dtype=torch.float32)
    masses = torch.tensor(source.vertex_areas(), dtype=torch.float32)
    mobility = masses / masses.sum() if name != "varifold" else masses
    target_points = torch.tensor(target.vertices, dtype=torch.float32)
    frames, history, step_size = {}, [], None
    for step in tqdm(range(steps + 1), desc=name, leave=False):
        history.append(_surface_distance(vertices, target_points))
        if step in snapshots:
            frames[step] = vertices.numpy().copy()
        if step == steps:
            break
        moving = vertices.clone().requires_grad_()
        gradient, = torch.autograd.grad(_loss(name, moving, source, masses, target), moving)
        velocity = gradient / mobility.unsqueeze(1)
        if step_size is None:
            step_size = first_step / float(velocity.norm(dim=1).max())
            logger.info("%s: δt = %.3g", name, step_size)
        vertices = vertices - step_size * velocity
    return frames, history


def _figure(results: dict, target: Mesh, snapshots: list[int], path: Path) -> None:
    centred = target.vertices - target.vertices.mean(0)
    axes_3d = np.linalg.svd(centred, full_matrices=False)[2][:2].T
    figure, axes = plt.subplots(len(results), len(snapshots) + 1, figsize=(3 * (len(snapshots) + 1), 3 * len(results)))
    for row, (name, (frames, history)) in enumerate(results.items()):
        for column, step in enumerate(snapshots):
            ax = axes[row, column]
            ax.scatter(*(target.vertices @ axes_3d).T, s=0.5, c="0.75")
            ax.scatter(*(frames[step] @ axes_3d).T, s=0.5, c="tab:red")
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}, step {step}", fontsize=9)
        ax = axes[row, -1]
        ax.plot(history)
        ax.set_xlabel("step")
        ax.set_ylabel("surface distance (mm)")
        ax.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="flow steps per loss (default 40)")
    parser.add_argument("--first-step", type=float, default=1.0, help="largest first displacement, mm (default 1)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for gradient_flows.png and .csv")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    source, target = _hippocampus("9861"), _hippocampus("10021")
    snapshots = sorted({0, args.steps // 8, args.steps // 4, args.steps // 2, args.steps})
    results = {name: _flow(name, source, target, args.steps, args.first_step, snapshots) for name in _LOSSES}
    args.out.mkdir(parents=True, exist_ok=True)
    _figure(results, target, snapshots, args.out / "gradient_flows.png")
    with open(args.out / "gradient_flows.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", *(f"{name}_surface_distance_mm" for name in results)])
        for step in range(args.steps + 1):
            writer.writerow([step, *(f"{results[name][1][step]:.4f}" for name in results)])
    print(f"{'loss':>9} {'start mm':>9} {'end mm':>8}")
    for name, (_, history) in results.items():
        print(f"{name:>9} {history[0]:>9.3f} {history[-1]:>8.3f}")
    print(f"wrote {args.out / 'gradient_flows.png'} and {args.out / 'gradient_flows.csv'}")


if __name__ == "__main__":
    main()
