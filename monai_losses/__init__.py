"""geomed for MONAI: geometric losses, transforms and metrics with MONAI's signatures and conventions.

Every number comes from :mod:`geomed`; this package arranges tensors the way MONAI's losses, transforms and
metrics do, so that they drop into training loops, ``DeepSupervisionLoss`` / ``MaskedLoss`` and bundle configs
(``"_target_": "monai_losses.losses.DiceSinkhornLoss"``).
"""

from .losses import BoundaryKernelLoss, DiceSinkhornLoss, SinkhornSegmentationLoss

__all__ = ["BoundaryKernelLoss", "DiceSinkhornLoss", "SinkhornSegmentationLoss"]
