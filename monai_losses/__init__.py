"""geomed for MONAI: geometric losses, transforms and metrics with MONAI's signatures and conventions.

Every number comes from :mod:`geomed`; this package arranges tensors the way MONAI's losses, transforms and
metrics do, so that they drop into training loops, ``DeepSupervisionLoss`` / ``MaskedLoss`` and bundle configs
(``"_target_": "monai_losses.losses.DiceSinkhornLoss"``). The voxel spacing follows one rule for every class
(:mod:`monai_losses.spacing`). nnU-Net v2 trainers are in :mod:`monai_losses.nnunet`, imported only on demand (it
needs nnU-Net).
"""

from .losses import BoundaryKernelLoss, DiceSinkhornLoss, SinkhornSegmentationLoss

__all__ = ["BoundaryKernelLoss", "DiceSinkhornLoss", "SinkhornSegmentationLoss"]
