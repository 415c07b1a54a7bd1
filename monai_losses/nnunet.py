r"""nnU-Net v2 trainers that add a geometric loss of :mod:`monai_losses` to nnU-Net's own Dice + cross-entropy.

nnU-Net users switch losses by choosing a trainer class (``nnUNetv2_train DATASET CONFIG FOLD -tr NAME``). Two
trainers here subclass ``nnUNetTrainer`` and change only its loss:

``nnUNetTrainerDiceSinkhorn``
    nnU-Net's loss + ``geometric_weight`` (0.1 per mm²) × :class:`~monai_losses.SinkhornSegmentationLoss` (blur
    2 mm, reach 10 mm): the debiased, unbalanced Sinkhorn divergence between each foreground class's prediction and
    label, in mm² — where the mass is, not only how much overlaps.
``nnUNetTrainerDiceBoundaryKernel``
    nnU-Net's loss + ``geometric_weight`` (1) × :class:`~monai_losses.BoundaryKernelLoss` (3 mm): the normalised
    kernel distance between the boundaries, in [0, 1].

Everything else is nnU-Net's, from its own configuration:

* the base loss is the one ``nnUNetTrainer._build_loss`` builds (Dice + CE on labels, Dice + BCE on regions, the
  ignore label, batch Dice), and the sum is wrapped in nnU-Net's ``DeepSupervisionWrapper`` with its weights;
* labels: softmax over the classes, the label map one-hot encoded, background left out, voxels of the ignore label
  left out of both; regions: a sigmoid per region, every region counted, the ignore channel (the target's last)
  masking both;
* spacing: the configuration's ``spacing`` (mm, in the order of the preprocessed arrays) at full resolution, scaled
  at each deep-supervision output by the patch size over that output's size (``spatial_size``).

nnU-Net finds trainers only by class name inside its own package: ``python -m monai_losses.nnunet install`` writes a
small module there that imports these trainers (``uninstall`` removes it), so that ``nnUNetv2_train`` and
``nnUNetv2_predict`` see them. Importing :mod:`monai_losses` does not import this module (nor nnU-Net).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import nn

try:
    import nnunetv2
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("monai_losses.nnunet needs nnU-Net v2: pip install 'geomed[nnunet]'") from error

from geomed.io import atomic_path

from .losses import BoundaryKernelLoss, SinkhornSegmentationLoss

__all__ = ["GeometricCompoundLoss", "geometric_loss", "install", "nnUNetTrainerDiceBoundaryKernel",
           "nnUNetTrainerDiceSinkhorn", "trainers_folder", "uninstall"]

logger = logging.getLogger(__name__)

SHIM_NAME = "nnUNetTrainerGeomed.py"
_SHIM = '''"""geomed's nnU-Net trainers (monai_losses.nnunet), made visible to nnUNetv2_train and nnUNetv2_predict.

Written by `python -m monai_losses.nnunet install`; removed by `python -m monai_losses.nnunet uninstall`.
"""
# geomed-nnunet-shim
try:
    from monai_losses.nnunet import nnUNetTrainerDiceBoundaryKernel, nnUNetTrainerDiceSinkhorn  # noqa: F401
except ImportError as error:  # geomed was removed: leave nnU-Net's other trainers working
    import warnings

    warnings.warn(f"geomed's nnU-Net trainers are unavailable ({error}); `python -m monai_losses.nnunet uninstall` "
                  "or delete " + __file__, stacklevel=1)
'''
_MARKER = "# geomed-nnunet-shim"


class GeometricCompoundLoss(nn.Module):
    """nnU-Net's loss on one output plus ``weight`` × a geometric loss of the same logits and target.

    Parameters
    ----------
    base : nn.Module
        nnU-Net's loss of (logits, target) — ``DC_and_CE_loss`` or ``DC_and_BCE_loss``.
    geometric : nn.Module
        A :mod:`monai_losses` loss built for this target format (:func:`geometric_loss`).
    weight : float
        Its weight in the sum.
    regions : bool
        Whether the target holds one channel per region (sigmoid outputs) rather than a label map (softmax).
    ignore_channel : bool
        Regions only: whether the target's last channel marks the ignored voxels.
    """

    def __init__(self, base: nn.Module, geometric: nn.Module, weight: float, regions: bool,
                 ignore_channel: bool = False):
        super().__init__()
        self.base, self.geometric, self.weight = base, geometric, float(weight)
        self.regions, self.ignore_channel = regions, ignore_channel

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = self.base(net_output, target)
        if not self.regions:
            return total + self.weight * self.geometric(net_output, target)
        probabilities = torch.sigmoid(net_output.float())
        if self.ignore_channel:
            kept = 1.0 - target[:, -1:].float()
            probabilities, target = probabilities * kept, target[:, :-1].float() * kept
        return total + self.weight * self.geometric(probabilities, target.float())


def geometric_loss(kind: str, trainer: nnUNetTrainer) -> nn.Module:
    """The ``"sinkhorn"`` or ``"boundary-kernel"`` loss for this trainer's labels or regions, ignore label and
    spacing (full resolution: the configuration's spacing over its patch size)."""
    labels = trainer.label_manager
    configuration = trainer.configuration_manager
    common = dict(spacing=tuple(float(s) for s in configuration.spacing),
                  spatial_size=tuple(int(n) for n in configuration.patch_size))
    if labels.has_regions:
        options = dict(include_background=True, **common)
    else:
        options = dict(include_background=False, softmax=True, to_onehot_y=True, ignore_index=labels.ignore_label,
                       **common)
    return SinkhornSegmentationLoss(**options) if kind == "sinkhorn" else BoundaryKernelLoss(**options)


class _GeometricTrainer(nnUNetTrainer):
    """nnUNetTrainer whose loss adds ``geometric_weight`` × the ``geometric`` loss to nnU-Net's, at every
    deep-supervision output."""

    geometric = "sinkhorn"
    geometric_weight = 0.1

    def _build_loss(self) -> nn.Module:
        built = super()._build_loss()
        wrapped = isinstance(built, DeepSupervisionWrapper)
        base = built.loss if wrapped else built
        regions = self.label_manager.has_regions
        compound = GeometricCompoundLoss(base, geometric_loss(self.geometric, self), self.geometric_weight, regions,
                                         ignore_channel=regions and self.label_manager.ignore_label is not None)
        self.print_to_log_file(f"geomed: nnU-Net's loss + {self.geometric_weight} x {type(compound.geometric).__name__}"
                               f" (spacing {compound.geometric.conventions.spacing} mm at patch size "
                               f"{compound.geometric.conventions.spatial_size})")
        return DeepSupervisionWrapper(compound, built.weight_factors) if wrapped else compound


class nnUNetTrainerDiceSinkhorn(_GeometricTrainer):  # noqa: N801 - nnU-Net's naming of trainers
    """nnU-Net's Dice + CE plus 0.1 × :class:`~monai_losses.SinkhornSegmentationLoss` (blur 2 mm, reach 10 mm)."""

    geometric = "sinkhorn"
    geometric_weight = 0.1


class nnUNetTrainerDiceBoundaryKernel(_GeometricTrainer):  # noqa: N801
    """nnU-Net's Dice + CE plus 1 × :class:`~monai_losses.BoundaryKernelLoss` (3 mm Gaussian kernel, currents)."""

    geometric = "boundary-kernel"
    geometric_weight = 1.0


def trainers_folder() -> Path:
    """nnU-Net's own trainer package, the only place ``nnUNetv2_train -tr`` looks for trainers by name."""
    return Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"


def install() -> Path:
    """Write the module that makes the trainers visible to nnU-Net (atomically); returns its path.

    Raises
    ------
    FileExistsError
        If a file of that name that geomed did not write is there.
    """
    path = trainers_folder() / SHIM_NAME
    if path.exists() and _MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        raise FileExistsError(f"{path} exists and was not written by geomed: not overwriting it")
    with atomic_path(path) as temporary:
        temporary.write_text(_SHIM, encoding="utf-8")
    return path


def uninstall() -> Path | None:
    """Remove the module :func:`install` wrote; returns its path, or None if it was not there.

    Raises
    ------
    FileExistsError
        If a file of that name that geomed did not write is there (it is left alone).
    """
    path = trainers_folder() / SHIM_NAME
    if not path.exists():
        return None
    if _MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        raise FileExistsError(f"{path} was not written by geomed: leaving it")
    path.unlink()
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m monai_losses.nnunet install | uninstall``."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_losses.nnunet",
        description="Make geomed's nnU-Net v2 trainers (nnUNetTrainerDiceSinkhorn, nnUNetTrainerDiceBoundaryKernel) "
                    "visible to nnUNetv2_train -tr and nnUNetv2_predict, by writing a small module into nnU-Net's "
                    "trainer package of this environment (nnU-Net looks for trainers by class name only there).")
    parser.add_argument("action", choices=("install", "uninstall"),
                        help="install: write the module (again); uninstall: remove it")
    args = parser.parse_args(argv)
    try:
        if args.action == "install":
            print(f"installed: {install()}\ntrain with: nnUNetv2_train DATASET CONFIGURATION FOLD -tr "
                  "nnUNetTrainerDiceSinkhorn (or -tr nnUNetTrainerDiceBoundaryKernel)")
        else:
            removed = uninstall()
            print(f"removed: {removed}" if removed else "nothing to remove: geomed's trainers were not installed")
    except OSError as error:  # FileExistsError included
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
