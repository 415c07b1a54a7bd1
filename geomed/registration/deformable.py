r"""Deformable and diffeomorphic registration: momenta on control points fitted by L-BFGS.

One stage per kernel width σ (coarse to fine). The control points are the moved shape's points pooled into cells
of side σ (tens to hundreds), the momenta start at zero and minimise

.. math:: L(\varphi(\text{moving}), \text{fixed}) + \lambda \, \tfrac12 \sum_{kl} p_k^\top K(q_k, q_l) p_l ,

the loss plus the kinetic energy of the deformation (its squared norm in the kernel's space: smooth, small
deformations cost little). A stage's deformation is the ``initial`` transform of the next. The loss sees the
warped shape pooled into cells of a quarter of its blur, widened to at most 2000 cells (the pooling is fixed at
the start of the stage and moves with the points, so gradients flow to every point), and the fixed shape pooled
into the same cells; meshes are warped vertex-wise, so their normals follow.
"""

from __future__ import annotations

import numpy as np
import torch

from .._spatial import cell_means, cell_sums, grid_cells
from ..measure import Measure
from ..mesh import Mesh
from .linear import _pooled, budgeted_cells
from .transforms import KernelDeformation, Transform


class WarpedShape:
    """The moving shape as the loss sees it after a transform, pooled into at most 2000 cells (:func:`budgeted_cells`).

    By default the cells' centroids (taken in the moving shape's own space) are moved, carrying the cells' masses
    at the start of the stage: one point per cell through the flow. With ``exact_normals`` (varifold and current
    losses), a mesh's vertices are moved and its surface measure rebuilt, so that areas and normals follow the
    deformation exactly, then pooled. Surface areas are divided by ``mass_scale``.
    """

    def __init__(self, shape: Mesh | Measure, dtype: torch.dtype, mass_scale: float = 1.0,
                 exact_normals: bool = False):
        self.mesh = shape if isinstance(shape, Mesh) else None
        self.measure = None if isinstance(shape, Mesh) else shape.to(dtype=dtype)
        self.dtype, self.mass_scale = dtype, mass_scale
        self.exact_normals = exact_normals and self.mesh is not None
        base = shape.vertices if isinstance(shape, Mesh) else shape.points.detach()
        self.points = torch.tensor(np.asarray(base), dtype=dtype) if isinstance(shape, Mesh) else base.to(dtype)
        self._members, self._count, self._centroids, self._masses, self._normals = None, 0, None, None, None

    def pool_at(self, transform: Transform, cell: float) -> float:
        """Fix the pooling cells (side ``cell`` mm, widened to at most 2000 cells) from the shape
        moved by ``transform``; returns the cell side used."""
        with torch.no_grad():
            moved = self._measure(transform.forward(self.points.double()).to(self.dtype))
        points = moved.points.detach().double()
        self._members, self._count, cell = budgeted_cells(points, cell)
        own = self._measure(self.points)
        weights = moved.weights.detach()
        self._masses = cell_sums(weights, self._members, self._count)
        self._centroids = cell_means(own.points.detach().double(), own.weights.detach().double(), self._members,
                                     self._count)
        self._normals = None if moved.normals is None else _unit(
            cell_means(moved.normals.detach(), weights, self._members, self._count))
        return cell

    def __call__(self, transform: Transform) -> Measure:
        """The pooled measure of the shape moved by ``transform`` (differentiable w.r.t. its parameters)."""
        if not self.exact_normals:
            points = transform.forward(self._centroids).to(self.dtype)
            return Measure(points, self._masses, self._normals)
        moved = self._measure(transform.forward(self.points.double()).to(self.dtype))
        weights = moved.weights
        pooled_weights = cell_sums(weights, self._members, self._count)
        points = cell_means(moved.points, weights, self._members, self._count)
        return Measure(points, pooled_weights, _unit(cell_means(moved.normals, weights, self._members, self._count)))

    def _measure(self, points: torch.Tensor) -> Measure:
        if self.mesh is not None:
            surface = Measure.from_triangles(points, self.mesh.triangles)
            return Measure(surface.points, surface.weights / self.mass_scale, surface.normals)
        return Measure(points, self.measure.weights, self.measure.normals)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)


def fit_deformation(moving: WarpedShape, fixed: Measure, *, initial: Transform, scales, losses, steps: int,
                    regularisation: float, iterations: int, report) -> Transform:
    """Stages of kernel deformations (widths ``scales``, mm, each with its loss from ``losses``) after ``initial``.

    ``report(stage, iteration, value)`` is called at every evaluation of the objective (progress and cancel).
    """
    transform = initial
    for scale, loss in zip(scales, losses, strict=True):
        blur = float(loss.options.get("blur") or scale / 4)
        cell = moving.pool_at(transform, blur / 4)
        target = _pooled(fixed, cell)[0].to(fixed.device, fixed.dtype)
        with torch.no_grad():
            control = _control_points(transform.forward(moving.points.double()), scale)
        momenta = torch.zeros_like(control, requires_grad=True)
        stage = f"{'diffeomorphic' if steps > 1 else 'deformable'} (kernel {scale:g} mm)"
        optimiser = torch.optim.LBFGS([momenta], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")
        evaluations = [0]

        def objective():
            optimiser.zero_grad()
            deformation = KernelDeformation(transform, control, momenta, float(scale), steps)
            value = loss(moving(deformation), target) + regularisation * deformation.energy()
            value.backward()
            report(stage, evaluations[0], float(value.detach()))
            evaluations[0] += 1
            return value

        optimiser.step(objective)
        transform = KernelDeformation(transform, control, momenta.detach(), float(scale), steps)
    return transform


def _control_points(points: torch.Tensor, cell: float) -> torch.Tensor:
    """The mean of the points in each cubic cell of side ``cell`` (mm)."""
    members, count = grid_cells(points, cell)
    return cell_means(points, torch.ones(len(points), dtype=points.dtype), members, count)
