"""What the Sinkhorn loop works on: the declared ``Geometry`` protocol, and the single-scale geometry.

A geometry holds the point sets that the loop currently works on (the input points, or a coarse level of them) and
the softmins between them, and may change both as ε decreases. Three implement the protocol: :class:`SingleScale`
(below: the input points, one softmin for all four problems), :class:`geomed.ot.multiscale.Multiscale` (nested
point clusters, block-sparse softmins) and :class:`geomed.ot.grid.GridPyramid` (coarser voxel grids, separable
softmins).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .softmin import Softmin

Potentials = list[torch.Tensor | None]
"""[f, g, f_aa, g_bb]: (B, N), (B, M), then (B, N), (B, M) or None when the symmetric problems are not solved."""


class Geometry(Protocol):
    """The working level of a solve, as the loop of :mod:`geomed.ot.solver` sees it.

    Attributes
    ----------
    level : int
        The working level; 0 is the input points (or grid), higher levels are coarser.
    scale : float
        Cell side (mm) of the working level; 0 for the input points.
    kept : float
        Fraction of the cross cost matrix that the working softmins evaluate (1 without truncation).
    pattern_bytes : int
        Memory (bytes) held by the working softmins' truncation patterns (0 without truncation).
    order : tuple of Tensor (B, N), (B, M), or None
        Permutations from the input order of the points to the order of the level-0 points of
        :meth:`measures` (None when they are in input order).
    softmins : dict
        The working level's :class:`~geomed.ot.softmin.Softmin` of each problem: keys "xy" (rows ``a``'s points,
        columns ``b``'s), "yx", "xx" and "yy" (the symmetric problems, present when they are solved).
    """

    level: int
    scale: float
    kept: float
    pattern_bytes: int
    order: tuple[torch.Tensor, torch.Tensor] | None
    softmins: dict[str, Softmin]

    def measures(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The working level's points x (B, N, D), y (B, M, D) in mm and log-weights log α (B, N), log β (B, M)."""

    def advance(self, eps: float, potentials: Potentials, final: bool) -> Potentials:
        """Prepare the working level for ``eps`` (mm^p) — move to the level suited to it (the input if ``final``),
        extrapolating the potentials [f, g, f_aa, g_bb] onto its points, and update the softmins — and return the
        potentials on the new working level."""


class SingleScale:
    """The geometry of a one-level solve: the input points (in Morton order for the tiled backend).

    Parameters
    ----------
    x, y : Tensor (B, N, D), (B, M, D)
        Points in mm.
    log_a, log_b : Tensor (B, N), (B, M)
        Log-weights.
    softmin : Softmin
        The softmin of all four problems.
    order : tuple of Tensor (B, N), (B, M), or None
        Permutations to apply to the points first (None: input order).
    """

    level = 0
    scale = 0.0
    kept = 1.0
    pattern_bytes = 0

    def __init__(self, x: torch.Tensor, y: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, softmin: Softmin,
                 order: tuple[torch.Tensor, torch.Tensor] | None):
        self.order = order
        if order is not None:
            x, y = gather(x, order[0]), gather(y, order[1])
            log_a, log_b = torch.gather(log_a, 1, order[0]), torch.gather(log_b, 1, order[1])
        self._measures = (x, y, log_a, log_b)
        self.softmins = {"xy": softmin, "yx": softmin, "xx": softmin, "yy": softmin}

    def measures(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._measures

    def advance(self, eps: float, potentials: Potentials, final: bool) -> Potentials:
        return potentials


def gather(points: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Points (B, N, D) permuted by ``order`` (B, N) along dim 1."""
    return torch.gather(points, 1, order.unsqueeze(-1).expand(-1, -1, points.shape[-1]))


def scatter(values: torch.Tensor | None, order: torch.Tensor | None) -> torch.Tensor | None:
    """Inverse of gathering with ``order`` (B, N) along dim 1 of values (B, N[, K]); None passes through."""
    if values is None or order is None:
        return values
    out = torch.empty_like(values)
    index = order if values.dim() == 2 else order.unsqueeze(-1).expand_as(values)
    return out.scatter_(1, index, values)
