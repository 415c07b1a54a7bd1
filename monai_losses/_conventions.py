"""MONAI's loss conventions, shared by the losses of this package: activation, one-hot targets, background,
ignored voxels, class weights, reductions, and the voxel spacing of each batch item."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from monai.networks import one_hot
from monai.utils import LossReduction

from .spacing import item_spacings

Spacing = float | Sequence[float] | None


class SegmentationConventions:
    """The options every segmentation loss of MONAI takes, validated as MONAI validates them."""

    def __init__(self, include_background: bool, to_onehot_y: bool, sigmoid: bool, softmax: bool,
                 other_act: Callable | None, reduction: LossReduction | str, batch: bool,
                 weight: Sequence[float] | float | int | torch.Tensor | None, ignore_index: int | None,
                 spacing: Spacing, spatial_size: Sequence[int] | None):
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act must be None or callable but is {type(other_act).__name__}.")
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError("Incompatible values: more than 1 of [sigmoid=True, softmax=True, other_act is not None].")
        if ignore_index is not None and not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be None or an int, got {type(ignore_index).__name__}.")
        self.reduction = LossReduction(reduction).value
        self.include_background, self.to_onehot_y = include_background, to_onehot_y
        self.sigmoid, self.softmax, self.other_act = sigmoid, softmax, other_act
        self.batch, self.ignore_index = batch, ignore_index
        self.weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        if self.weight is not None and (self.weight.ndim > 1 or bool((self.weight < 0).any())):
            raise ValueError(f"weight must be a non-negative number or one per class, got {weight!r}.")
        self.spacing = _checked_spacing(spacing)
        if spatial_size is not None and not all(isinstance(n, int) and n > 0 for n in spatial_size):
            raise ValueError(f"spatial_size must be positive integers (voxels per axis), got {spatial_size!r}.")
        self.spatial_size = None if spatial_size is None else tuple(spatial_size)

    def prepare(self, input: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Activated prediction and one-hot target (B, C', *spatial), background dropped and ignored voxels zeroed
        in both, as plain float tensors (C' = C, or C − 1 without background)."""
        if input.dim() not in (4, 5):
            raise AssertionError(f"input must have shape (B, C, H, W) or (B, C, H, W, D), got {tuple(input.shape)}")
        if target.dim() != input.dim():
            raise AssertionError(f"ground truth has different number of dimensions ({tuple(target.shape)}) from "
                                 f"input ({tuple(input.shape)})")
        input, target = _plain(input), _plain(target)
        input = input if input.dtype in (torch.float32, torch.float64) else input.float()
        if self.sigmoid:
            input = torch.sigmoid(input)
        channels = input.shape[1]
        if self.softmax:
            if channels == 1:
                warnings.warn("single channel prediction, `softmax=True` ignored.", stacklevel=3)
            else:
                input = torch.softmax(input, 1)
        if self.other_act is not None:
            input = self.other_act(input)
        original = target
        if self.to_onehot_y:
            if channels == 1:
                warnings.warn("single channel prediction, `to_onehot_y=True` ignored.", stacklevel=3)
            else:
                if self.ignore_index is not None and not 0 <= self.ignore_index < channels:
                    target = torch.where(target == self.ignore_index, torch.zeros_like(target), target)
                target = one_hot(target, num_classes=channels)
        if not self.include_background:
            if channels == 1:
                warnings.warn("single channel prediction, `include_background=False` ignored.", stacklevel=3)
            else:
                input, target = input[:, 1:], target[:, 1:]
        if target.shape != input.shape:
            raise AssertionError(f"ground truth has different shape ({tuple(target.shape)}) from input "
                                 f"({tuple(input.shape)})")
        target = target.to(input.dtype)
        mask = self._valid_voxels(original)
        if mask is not None:
            input, target = input * mask, target * mask
        return input, target

    def _valid_voxels(self, target: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, *spatial) mask of the voxels not labelled ``ignore_index`` (MONAI's rule: label maps compare
        directly; one-hot targets mask that channel's voxels, or all-zero voxels for an out-of-range index)."""
        if self.ignore_index is None:
            return None
        if target.shape[1] == 1:
            return (target != self.ignore_index).float()
        if 0 <= self.ignore_index < target.shape[1]:
            return 1.0 - target[:, self.ignore_index : self.ignore_index + 1].float()
        return (target != 0).any(1, keepdim=True).float()

    def spacings(self, input: torch.Tensor, target: torch.Tensor) -> list[tuple[float, ...]]:
        """Voxel size (mm) of each item by the rule of :mod:`monai_losses.spacing` (``spacing`` if given, else the
        target's MetaTensor affine, else the input's, else 1 mm); scaled by ``spatial_size`` / the input's size when
        ``spatial_size`` is set."""
        dims = input.dim() - 2
        spacing = self.spacing
        if spacing is not None:
            spacing = spacing * dims if len(spacing) == 1 else spacing
            if len(spacing) != dims:
                raise ValueError(f"spacing has {len(spacing)} entries for {dims} spatial dimensions")
            spacing = list(spacing)
        per_item = item_spacings(input, target, spacing, dims)
        if self.spatial_size is not None:
            if len(self.spatial_size) != dims:
                raise ValueError(f"spatial_size {self.spatial_size} must have one entry per spatial dimension ({dims})")
            ratio = [full / now for full, now in zip(self.spatial_size, input.shape[2:])]
            per_item = [tuple(s * r for s, r in zip(spacing, ratio)) for spacing in per_item]
        return per_item

    def weighted_and_reduced(self, values: torch.Tensor, present: torch.Tensor, spatial_dims: int) -> torch.Tensor:
        """Class weights, then the ``batch`` average and the reduction, of per-(item, class) values (B, C);
        ``present`` marks the pairs whose target is not empty (those that count in the ``batch`` average)."""
        if self.batch:
            counts = present.sum(0)
            values = torch.where(counts > 0, (values * present).sum(0) / counts.clamp_min(1), 0.0)
        classes = values.shape[-1]
        if self.weight is not None and classes != 1:
            weight = self.weight.expand(classes) if self.weight.ndim == 0 else self.weight
            if weight.shape[0] != classes:
                raise ValueError("The length of the `weight` sequence should be the same as the number of classes. "
                                 "If `include_background=False`, the weight should not include the background "
                                 "category class 0.")
            values = values * weight.to(values)
        if self.reduction == LossReduction.MEAN.value:
            return values.mean()
        if self.reduction == LossReduction.SUM.value:
            return values.sum()
        return values.reshape(*values.shape, *([1] * spatial_dims))


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (same storage, autograd kept): the losses need no metadata tracking."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def _checked_spacing(spacing: Spacing) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    values = (spacing,) if isinstance(spacing, (int, float)) else tuple(spacing)
    try:
        values = tuple(float(s) for s in values)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a number or one number per spatial axis (mm), got {spacing!r}") from None
    if not values or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be positive numbers of mm, got {spacing!r}")
    return values
