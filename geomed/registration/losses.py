"""The losses the deformable stages of :func:`geomed.register` can minimise, by name, with anatomy scales.

Applications that offer the choice to users (the 3D Slicer module, a command line) list :data:`LOSSES` and build
the chosen one with :func:`deformable_loss`: its blur and reach default to the preset's (or to scales of the fixed
shape's size), in mm.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from ..kernels import KernelLoss, VarifoldLoss
from ..mesh import Mesh
from ..ot import SinkhornLoss
from .presets import Preset, preset as named_preset

__all__ = ["LOSSES", "deformable_loss"]

LOSSES = ("sinkhorn", "kernel", "varifold")
"""Unbalanced Sinkhorn divergence, Gaussian-kernel MMD, oriented varifold distance (surfaces)."""


def deformable_loss(loss: str, preset: str | Preset | None = None, blur: float | None = None,
                    reach: float | None = None, fixed: Mesh | None = None) -> nn.Module | None:
    """The loss module of the deformable stages, or None for :func:`geomed.register`'s default (the preset's
    Sinkhorn loss).

    Parameters
    ----------
    loss : {"sinkhorn", "kernel", "varifold"}
        One of :data:`LOSSES`.
    preset : str or Preset, optional
        Gives the scales left unset: the finest blur, and the Sinkhorn ``deformable_reach``.
    blur : float, optional
        The Sinkhorn blur or the kernel width (mm).
    reach : float, optional
        The Sinkhorn reach (mm); not an option of the kernel losses.
    fixed : Mesh, optional
        Without a preset, the scales are those of :meth:`Preset.for_size` of the fixed shape's diameter.

    Raises
    ------
    ValueError
        An unknown loss, a reach for a kernel loss, or neither a preset nor the fixed shape when a scale is unset.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if loss != "sinkhorn" and reach is not None:
        raise ValueError(f"reach is an option of the Sinkhorn loss, not of the {loss} loss")
    if loss == "sinkhorn" and blur is None and reach is None:
        return None
    if preset is not None:
        schedule = named_preset(preset)
    elif fixed is not None:
        schedule = Preset.for_size(float(np.linalg.norm(np.ptp(fixed.vertices, axis=0))))
    else:
        raise ValueError("give a preset or the fixed shape, for the scales left unset")
    width = blur if blur is not None else schedule.blurs[-1]
    if loss == "sinkhorn":
        return SinkhornLoss(blur=width, reach=reach if reach is not None else schedule.deformable_reach)
    if loss == "kernel":
        return KernelLoss(kernel="gaussian", blur=width)
    return VarifoldLoss(blur=width)
