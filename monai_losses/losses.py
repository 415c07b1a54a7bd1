r"""Geometric segmentation losses with MONAI's signatures: Sinkhorn, Dice + Sinkhorn, and boundary kernels.

All three take what MONAI's ``DiceLoss`` takes — ``input`` (B, C, *spatial) logits or probabilities, ``target``
(B, C, *spatial) one-hot or (B, 1, *spatial) labels with ``to_onehot_y``; ``include_background``, ``sigmoid`` /
``softmax`` / ``other_act`` (at most one), ``reduction`` ("mean", "sum", "none": shape (B, C, 1, …, 1), or
(C, 1, …, 1) with ``batch=True``), per-class ``weight``, ``ignore_index`` — with the same checks and warnings, on
2-D and 3-D grids, plain tensors or MetaTensors, and under ``torch.autocast`` (the geometry runs in float32 or
float64 whatever the autocast dtype). The numbers come from :mod:`geomed`; this module only arranges tensors.

Voxel spacing (mm), per batch item, in this order:

1. the ``spacing=`` argument (a number, or one per spatial axis);
2. the ``affine`` of the target, else of the input, when it is a MONAI ``MetaTensor`` (batched MetaTensors hold
   one affine per item: items of different spacings are solved separately);
3. unit voxels.

``spatial_size``: the size of the full-resolution input that the spacing belongs to. A smaller input — the lower
levels of ``monai.losses.DeepSupervisionLoss``, which interpolates the target to each level and keeps the
MetaTensor's full-resolution affine — gets the spacing scaled by the size ratio.

Classes whose target is empty in an item (a class absent from a random crop) have no shape to compare: they
contribute 0 to the geometric term (the Dice term of :class:`DiceSinkhornLoss` still sees them) and are left out
of the ``batch=True`` average.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.losses import DiceLoss
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from geomed import grid_sinkhorn_divergence
from geomed.grid_kernels import grid_boundary_distance

from ._conventions import SegmentationConventions, Spacing

_Weight = Sequence[float] | float | int | torch.Tensor | None


class SinkhornSegmentationLoss(_Loss):
    r"""Debiased Sinkhorn divergence between predicted and target segmentations, class by class, in mm².

    Each class of each item is a pair of measures on the voxel grid: the soft prediction and the target, solved by
    :func:`geomed.grid_sinkhorn_divergence` (exact separable log-domain Sinkhorn, coarse-to-fine, spacing in mm,
    gradients w.r.t. every voxel's probability from the envelope theorem). The loss sees *where* the mass is, not
    only how much overlaps: a prediction displaced by t mm costs about t²/2 (mm²), whether or not it overlaps
    the target — Dice and cross-entropy are flat there.

    * Unbalanced (``reach`` in mm, default 10): both are divided by the mean of their masses, so the value is per
      unit of volume for every structure size (and stays bounded when a random crop holds only a sliver of the
      target), and a volume difference is seen as the mass ratio; mass missing or
      in excess costs about reach² / 2 per unit instead of being transported further than the reach —
      false-positive blobs and the diffuse tails of a softmax far from the structure are paid for locally, not
      dragged across the image. This is also what makes the default early stop accurate (below).
    * Balanced (``reach=None``): both masks are normalised to unit mass, and the loss compares shapes and
      positions only. The softmax tails spread over the whole image then carry ~1% of the mass across it, which
      dominates the value and needs many more iterations to converge (measured on (2, 3, 64³): gradients 13%
      off at the default early stop, against 1.3% with a reach).

    Parameters
    ----------
    include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, batch, weight, ignore_index
        As in ``monai.losses.DiceLoss``. ``batch=True`` averages each class over the items where its target is not
        empty.
    blur : float
        Entropic blur in mm (ε = blur²): details finer than the blur are smoothed; the cost of a displacement t is
        ≈ t²/2 for t ≫ blur. Default 2 mm, a couple of voxels of a typical MRI or CT.
    reach : float or None
        Unbalanced transport: the distance (mm) beyond which mass is created or destroyed rather than moved
        (default 10 mm, about a structure's size); None for balanced transport.
    spacing : float or sequence of float, optional
        Voxel size in mm (see the module docstring for the defaults).
    spatial_size : sequence of int, optional
        Spatial size of the full-resolution input that ``spacing`` / the affine describe (deep supervision).
    scaling : float
        ε-scaling factor between successive blurs (GeomLoss's default 0.5).
    tol : float, optional
        None (default): stop at the end of the ε-scaling and read the value off the potentials extrapolated to
        the full-resolution grid, as GeomLoss's losses do — measured on (2, 3, 64³) segmentations
        (``benchmarks/monai_losses.py``'s inputs, reach 10 mm), gradients within 1.3% and values of the structures
        within 2.3% of the converged ones, at a twentieth of the time. On CUDA this solve is a fixed sequence of
        device work, recorded once per input shape as a CUDA graph and replayed at the next steps
        (:mod:`geomed.ot.grid_graphs`).
        A number: iterate at the final blur until the marginal error is below it (1e-3: converged potentials, so
        the gradient is the exact gradient of the exact divergence), at most ``max_iter`` iterations.
    max_iter : int
        Iteration cap at the final blur when ``tol`` is set.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
        batch: bool = False,
        weight: _Weight = None,
        ignore_index: int | None = None,
        blur: float = 2.0,
        reach: float | None = 10.0,
        spacing: Spacing = None,
        spatial_size: Sequence[int] | None = None,
        scaling: float = 0.5,
        tol: float | None = None,
        max_iter: int = 100,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.conventions = SegmentationConventions(include_background, to_onehot_y, sigmoid, softmax, other_act,
                                                   reduction, batch, weight, ignore_index, spacing, spatial_size)
        if not (isinstance(blur, (int, float)) and blur > 0):
            raise ValueError(f"blur must be a positive number of mm, got {blur!r}")
        if reach is not None and not (isinstance(reach, (int, float)) and reach > 0):
            raise ValueError(f"reach must be None or a positive number of mm, got {reach!r}")
        if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be None or a positive number, got {tol!r}")
        if not (isinstance(max_iter, int) and max_iter >= 0):
            raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}")
        self.blur, self.reach, self.scaling, self.tol, self.max_iter = float(blur), reach, scaling, tol, max_iter

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: (B, C, H, W[, D]) logits or probabilities.
            target: (B, C, H, W[, D]) one-hot, or (B, 1, H, W[, D]) labels with ``to_onehot_y=True``.

        Returns:
            The loss (mm²), reduced as ``reduction`` says.
        """
        spacings = self.conventions.spacings(input, target)
        prediction, reference = self.conventions.prepare(input, target)
        values, present = self._per_class(prediction, reference, spacings)
        return self.conventions.weighted_and_reduced(values, present, input.dim() - 2)

    def _per_class(self, prediction: torch.Tensor, reference: torch.Tensor,
                   spacings: list[tuple[float, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Values (B, C) and the mask of pairs with a non-empty target and prediction; pairs of one spacing are
        solved together, as the channels of one call."""
        items, classes = prediction.shape[:2]
        spatial = prediction.shape[2:]
        prediction_mass = prediction.detach().flatten(2).sum(-1)
        reference_mass = reference.flatten(2).sum(-1)
        present = (reference_mass > 0) & (prediction_mass > 0)
        values = prediction.new_zeros(items, classes)
        groups = dict.fromkeys(spacings)
        for spacing in groups:
            pairs = present if len(groups) == 1 else present & torch.tensor(
                [s == spacing for s in spacings], device=present.device).unsqueeze(1)
            if not bool(pairs.any()):
                continue
            a, b = prediction[pairs], reference[pairs]
            if self.reach is not None:
                mean_mass = 0.5 * (a.flatten(1).sum(-1) + reference_mass[pairs])
                scale = mean_mass.reshape(-1, *[1] * len(spatial))
                a, b = a / scale, b / scale
            result = grid_sinkhorn_divergence(
                a.unsqueeze(0), b.unsqueeze(0), blur=self.blur, spacing=spacing, reach=self.reach,
                scaling=self.scaling, tol=self.tol, max_iter=0 if self.tol is None else self.max_iter)
            values = values.index_put(tuple(pairs.nonzero().T), result.value[0].to(values.dtype))
        return values, present


class DiceSinkhornLoss(_Loss):
    """``lambda_dice`` × MONAI's ``DiceLoss`` + ``lambda_sinkhorn`` × :class:`SinkhornSegmentationLoss`, in the
    style of ``monai.losses.DiceCELoss``: overlap from Dice, position and shape from optimal transport.

    The Sinkhorn term is in mm² (≈ half the squared displacement): with the default ``lambda_sinkhorn = 0.1``, a
    structure 3 mm off weighs about as much as 0.45 of Dice loss. All the options of both losses are accepted;
    the shared ones (activation, background, one-hot, reduction, batch, weight, ignore_index) apply to both.
    ``smooth_nr``, ``smooth_dr``, ``squared_pred``, ``jaccard`` go to ``DiceLoss``; ``blur``, ``reach``,
    ``spacing``, ``spatial_size``, ``scaling``, ``tol``, ``max_iter`` to the Sinkhorn term.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
        batch: bool = False,
        weight: _Weight = None,
        ignore_index: int | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        blur: float = 2.0,
        reach: float | None = 10.0,
        spacing: Spacing = None,
        spatial_size: Sequence[int] | None = None,
        scaling: float = 0.5,
        tol: float | None = None,
        max_iter: int = 100,
        lambda_dice: float = 1.0,
        lambda_sinkhorn: float = 0.1,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if lambda_dice < 0.0:
            raise ValueError("lambda_dice should be no less than 0.0.")
        if lambda_sinkhorn < 0.0:
            raise ValueError("lambda_sinkhorn should be no less than 0.0.")
        shared = dict(include_background=include_background, to_onehot_y=to_onehot_y, sigmoid=sigmoid,
                      softmax=softmax, other_act=other_act, reduction=reduction, batch=batch, weight=weight,
                      ignore_index=ignore_index)
        self.dice = DiceLoss(squared_pred=squared_pred, jaccard=jaccard, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
                             **shared)
        self.sinkhorn = SinkhornSegmentationLoss(blur=blur, reach=reach, spacing=spacing, spatial_size=spatial_size,
                                                 scaling=scaling, tol=tol, max_iter=max_iter, **shared)
        self.lambda_dice, self.lambda_sinkhorn = float(lambda_dice), float(lambda_sinkhorn)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: (B, C, H, W[, D]) logits or probabilities.
            target: (B, C, H, W[, D]) one-hot, or (B, 1, H, W[, D]) labels with ``to_onehot_y=True``.
        """
        if input.dim() != target.dim():
            raise ValueError(
                "the number of dimensions for input and target should be the same, got shape "
                f"{tuple(input.shape)} and {tuple(target.shape)}; if target is not one-hot encoded, please provide "
                "a tensor with shape B1H[WD].")
        if target.shape[1] != 1 and target.shape[1] != input.shape[1]:
            raise ValueError("number of channels for target is neither 1 (without one-hot encoding) nor the same as "
                             f"input, got shape {tuple(input.shape)} and {tuple(target.shape)}.")
        total = self.lambda_dice * self.dice(input, target)
        if self.lambda_sinkhorn:
            total = total + self.lambda_sinkhorn * self.sinkhorn(input, target)
        return total


class BoundaryKernelLoss(_Loss):
    r"""Kernel distance between the boundaries of predicted and target segmentations: spacing-aware, smooth,
    a few convolutions per class — a fast answer to ``HausdorffDTLoss`` / ``BoundaryLoss`` that needs no distance
    transform and passes gradients through the boundary positions.

    The boundary of each soft mask is its gradient field in mm (a current; :mod:`geomed.grid_kernels`), compared
    with a Gaussian kernel of width ``blur`` mm: as a current (oriented normals) or an unoriented varifold. The
    value per class is normalised, ‖μ_p − μ_t‖² / (‖μ_p‖² + ‖μ_t‖²) ∈ [0, 1] — 0 for identical boundaries, about
    (t / blur)² / 2 for a small displacement t, 1 for boundaries farther apart than the blur — so it adds to a Dice
    loss without units. Here a class with an empty target still counts (its value is 1 if anything is predicted,
    0 if nothing is).

    Parameters
    ----------
    include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, batch, weight, ignore_index
        As in ``monai.losses.DiceLoss``.
    blur : float
        Kernel width σ in mm (default 3): the scale at which boundary displacements saturate.
    kind : {"current", "unoriented"}
        Orientation kernel: ``current`` (normals' signs count; default) or ``unoriented`` varifold.
    spacing, spatial_size
        As in :class:`SinkhornSegmentationLoss`.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable | None = None,
        reduction: LossReduction | str = LossReduction.MEAN,
        batch: bool = False,
        weight: _Weight = None,
        ignore_index: int | None = None,
        blur: float = 3.0,
        kind: str = "current",
        spacing: Spacing = None,
        spatial_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.conventions = SegmentationConventions(include_background, to_onehot_y, sigmoid, softmax, other_act,
                                                   reduction, batch, weight, ignore_index, spacing, spatial_size)
        if not (isinstance(blur, (int, float)) and blur > 0):
            raise ValueError(f"blur must be a positive number of mm, got {blur!r}")
        if kind not in ("current", "unoriented"):
            raise ValueError(f"kind must be 'current' or 'unoriented', got {kind!r}")
        self.blur, self.kind = float(blur), kind

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: (B, C, H, W[, D]) logits or probabilities.
            target: (B, C, H, W[, D]) one-hot, or (B, 1, H, W[, D]) labels with ``to_onehot_y=True``.
        """
        spacings = self.conventions.spacings(input, target)
        prediction, reference = self.conventions.prepare(input, target)
        values = prediction.new_zeros(prediction.shape[:2])
        for spacing in dict.fromkeys(spacings):
            items = torch.tensor([s == spacing for s in spacings], device=prediction.device)
            distance = grid_boundary_distance(prediction[items], reference[items], blur=self.blur, spacing=spacing,
                                              kind=self.kind, normalized=True)
            values = values.index_put((items.nonzero().squeeze(1),), distance.to(values.dtype))
        present = torch.ones_like(values, dtype=torch.bool)
        return self.conventions.weighted_and_reduced(values, present, input.dim() - 2)
