"""nnU-Net v2 trainers with geomed's losses (monai_losses.nnunet): the loss they build against nnU-Net's own loss
plus ours computed apart, and a real nnU-Net pipeline end to end on a tiny dataset from the shipped brain labels
(plan and preprocess, a few training iterations with the geometric trainer, prediction).

nnU-Net v2 is installed by ``make test`` (without torchvision, which its dependencies would use to replace the pinned
CPU torch); without it these tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is not installed (make test installs it)")

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: E402
from nnunetv2.utilities.label_handling.label_handling import LabelManager  # noqa: E402
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager  # noqa: E402

from monai_losses import BoundaryKernelLoss, SinkhornSegmentationLoss  # noqa: E402
from monai_losses.nnunet import GeometricCompoundLoss, geometric_loss, install, trainers_folder, uninstall  # noqa: E402

SPACING, PATCH = (1.5, 1.0, 2.0), (16, 12, 8)


def _trainer_parts(labels: dict, regions: list | None = None) -> SimpleNamespace:
    """What geometric_loss reads of a trainer: nnU-Net's own label and configuration managers."""
    return SimpleNamespace(label_manager=LabelManager(labels, regions),
                           configuration_manager=ConfigurationManager({
                               "spacing": list(SPACING), "patch_size": list(PATCH), "architecture": {
                                   "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                   "arch_kwargs": {}, "_kw_requires_import": []}}))


def _scales(tensor: torch.Tensor, count: int, mode: str) -> list[torch.Tensor]:
    """The deep-supervision pyramid nnU-Net feeds its loss: full resolution, then halved (``mode`` interpolation)."""
    return [tensor] + [torch.nn.functional.interpolate(tensor, scale_factor=0.5**k, mode=mode) for k in range(1, count)]


def _label_target(generator) -> torch.Tensor:
    """A label map (2, 1, *PATCH) with labels 0–2, a block of each foreground label, and ignore label 3."""
    target = torch.zeros(2, 1, *PATCH)
    target[:, :, 3:9, 2:8, 2:6] = 1
    target[:, :, 9:14, 4:10, 3:7] = 2
    target[1, :, 0:2] = 3
    return target


@pytest.mark.parametrize("kind, weight", [("sinkhorn", 0.1), ("boundary-kernel", 1.0)])
def test_label_loss_is_nnunets_plus_ours_at_each_scale(kind, weight):
    """On labels with an ignore label and deep supervision: nnU-Net's Dice + CE plus ``weight`` × our loss on the
    softmax, one-hot target without background, ignored voxels out, spacing × 2 at the half-resolution output."""
    generator = torch.Generator().manual_seed(0)
    parts = _trainer_parts({"background": 0, "a": 1, "b": 2, "ignore": 3})
    base = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=3, dice_class=MemoryEfficientSoftDiceLoss)
    compound = DeepSupervisionWrapper(GeometricCompoundLoss(base, geometric_loss(kind, parts), weight, False),
                                      (2 / 3, 1 / 3))
    logits = torch.randn(2, 3, *PATCH, generator=generator, requires_grad=True)
    outputs, targets = _scales(logits, 2, "trilinear"), _scales(_label_target(generator), 2, "nearest")
    ours = {"sinkhorn": SinkhornSegmentationLoss, "boundary-kernel": BoundaryKernelLoss}[kind]
    expected = 0.0
    for factor, (output, target), scale in zip((2 / 3, 1 / 3), zip(outputs, targets), (1, 2)):
        apart = ours(include_background=False, softmax=True, to_onehot_y=True, ignore_index=3,
                     spacing=[s * scale for s in SPACING])
        expected = expected + factor * (base(output, target) + weight * apart(output, target))
    value = compound(outputs, targets)
    torch.testing.assert_close(value, expected)
    (gradient,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_region_loss_uses_sigmoids_and_the_ignore_channel():
    """On regions (sigmoid outputs, one target channel per region, the last marking ignored voxels): nnU-Net's
    Dice + BCE plus our loss of the sigmoids, every region counted, ignored voxels zero in both."""
    generator = torch.Generator().manual_seed(1)
    parts = _trainer_parts({"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, [1, 2])
    assert parts.label_manager.has_regions
    base = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=True, dice_class=MemoryEfficientSoftDiceLoss)
    compound = GeometricCompoundLoss(base, geometric_loss("sinkhorn", parts), 0.1, True, ignore_channel=True)
    labels = _label_target(generator)[:, 0]
    target = torch.stack([(labels == 1) | (labels == 2), labels == 2, labels == 3], 1).float()
    logits = torch.randn(2, 2, *PATCH, generator=generator)
    kept = 1 - target[:, -1:]
    apart = SinkhornSegmentationLoss(include_background=True, spacing=SPACING)
    expected = base(logits, target) + 0.1 * apart(torch.sigmoid(logits) * kept, target[:, :-1] * kept)
    torch.testing.assert_close(compound(logits, target), expected)


def test_install_and_uninstall_make_the_trainers_visible_to_nnunet():
    """``install`` writes the module nnU-Net's search finds the trainers in (by name, in a fresh process, as
    nnUNetv2_train does); ``uninstall`` removes it; neither touches a file geomed did not write."""
    probe = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
             "from monai_losses import nnunet\n"
             "assert find('nnUNetTrainerDiceSinkhorn') is nnunet.nnUNetTrainerDiceSinkhorn\n"
             "assert find('nnUNetTrainerDiceBoundaryKernel') is nnunet.nnUNetTrainerDiceBoundaryKernel\n")
    path = install()
    try:
        assert path.parent == trainers_folder() and install() == path  # again: rewritten in place
        subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, timeout=300)
    finally:
        assert uninstall() == path
    assert not path.exists() and uninstall() is None
    path.write_text("# somebody else's trainer\n")
    try:
        with pytest.raises(FileExistsError, match="not written by geomed"):
            install()
        with pytest.raises(FileExistsError, match="not written by geomed"):
            uninstall()
        assert path.read_text() == "# somebody else's trainer\n"
    finally:
        path.unlink()


_TINY = '''"""A geometric trainer cut to one epoch of three iterations, for geomed's end-to-end test (removed after it)."""
import torch

from monai_losses.nnunet import nnUNetTrainerDiceSinkhorn


class nnUNetTrainerDiceSinkhornTiny(nnUNetTrainerDiceSinkhorn):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 3, 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Skipped (nnU-Net's own sliding-window validation: the test predicts with nnUNetv2_predict instead)."""
'''


def _tiny_dataset(raw: Path) -> Path:
    """Dataset501: synthetic intensities from the shipped brain labels of three donors (training) and a fourth
    (test), cropped around the left hippocampus and amygdala at 2 mm — labels background, hippocampus, amygdala."""
    import SimpleITK as sitk
    from scipy import ndimage

    from geomed import datasets

    root = raw / "Dataset501_GeomedHippocampus"
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for index, donor in enumerate(["9861", "10021", "12876", "14380"]):
        image = datasets.brain_labels(donor)
        ids = {name: label for label, name in image.label_names.items()}
        labels = np.zeros(image.array.shape, np.uint8)
        labels[image.array == ids["left_hippocampus"]], labels[image.array == ids["left_amygdala"]] = 1, 2
        corner = np.argwhere(labels > 0)
        box = tuple(slice(max(low - 6, 0), high + 7) for low, high in zip(corner.min(0), corner.max(0)))
        labels = labels[box][::2, ::2, ::2]
        noise = np.random.default_rng(index).normal(0, 8, labels.shape)
        intensity = (ndimage.gaussian_filter(np.choose(labels, [20.0, 100.0, 60.0]), 0.7) + noise).astype(np.float32)
        pairs = [(intensity, root / ("imagesTr" if index < 3 else "imagesTs") / f"hippo_{index:03d}_0000.nii.gz")]
        pairs += [(labels, root / "labelsTr" / f"hippo_{index:03d}.nii.gz")] if index < 3 else []
        for array, path in pairs:
            written = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
            written.SetSpacing([2.0, 2.0, 2.0])
            sitk.WriteImage(written, str(path))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "synthetic MR"}, "labels": {"background": 0, "hippocampus": 1, "amygdala": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    return root


@pytest.mark.slow
def test_nnunet_pipeline_end_to_end_with_the_sinkhorn_trainer(tmp_path):
    """The README's commands on a tiny dataset: plan and preprocess, train (one epoch of three iterations, on the
    CPU) with a geometric trainer found by name, predict a new case; the log names geomed's loss, the losses are
    finite, and the prediction lies on the input's grid with the dataset's labels."""
    import SimpleITK as sitk

    root = _tiny_dataset(tmp_path / "raw")
    bin_folder = Path(sys.executable).parent
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "preprocessed"),
               nnUNet_results=str(tmp_path / "results"), nnUNet_compile="false", nnUNet_n_proc_DA="1")
    tiny = trainers_folder() / "nnUNetTrainerDiceSinkhornTiny.py"

    def run(*command, **extra):
        done = subprocess.run([str(bin_folder / command[0]), *command[1:]], env=dict(env, **extra), text=True,
                              capture_output=True, timeout=600)
        assert done.returncode == 0, f"{command[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    run("nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "1", "-npfp", "1",
        "--verify_dataset_integrity")
    install()
    tiny.write_text(_TINY)
    try:
        log = run("nnUNetv2_train", "501", "3d_fullres", "all", "-tr", "nnUNetTrainerDiceSinkhornTiny", "-device",
                  "cpu", nnUNet_n_proc_DA="0")
        run("nnUNetv2_predict", "-i", str(root / "imagesTs"), "-o", str(tmp_path / "predicted"), "-d", "501", "-c",
            "3d_fullres", "-f", "all", "-tr", "nnUNetTrainerDiceSinkhornTiny", "-device", "cpu", "--disable_tta",
            "-npp", "1", "-nps", "1")
    finally:
        tiny.unlink()
        uninstall()
    assert "geomed: nnU-Net's loss + 0.1 x SinkhornSegmentationLoss (spacing (2.0, 2.0, 2.0) mm" in log
    losses = [float(line.split()[-1]) for line in log.splitlines() if "train_loss" in line or "val_loss" in line]
    assert len(losses) == 2 and all(np.isfinite(losses))
    source = sitk.ReadImage(str(root / "imagesTs" / "hippo_003_0000.nii.gz"))
    predicted = sitk.ReadImage(str(tmp_path / "predicted" / "hippo_003.nii.gz"))
    assert predicted.GetSize() == source.GetSize() and predicted.GetSpacing() == source.GetSpacing()
    assert set(np.unique(sitk.GetArrayFromImage(predicted))) <= {0, 1, 2}
