"""Train a MONAI 3-D UNet to segment the hippocampi, with MONAI's Dice loss and with geomed's Dice + Sinkhorn loss.

The image is the shipped crop of the MNI152 2009a T1 template around both hippocampi
(:func:`geomed.datasets.mni_hippocampi`, 92×53×52 voxels of 1 mm) with its Desikan-Killiany labels, mapped to
two classes: background and hippocampus (left and right together — the template is left-right symmetric, so a
convolutional network cannot tell the sides apart from the image). It becomes a pair of MONAI ``MetaTensor`` s
that carry the image's affine (RAS mm), so the losses read the voxel spacing from the data.

A small ``monai.networks.nets.UNet`` (channels 8, 16, 32; strides 2, 2) is trained on random crops centred on
hippocampus or background voxels, augmented by MONAI (small rotations and scalings, Gaussian noise, intensity
scaling), once per loss, from the same initial weights and on the same crops:

``dice``           ``monai.losses.DiceLoss(softmax=True, to_onehot_y=True)``
``dice_sinkhorn``  ``monai_losses.losses.DiceSinkhornLoss(softmax=True, to_onehot_y=True, blur=2.0)``: the same
                   Dice plus 0.1 × the debiased, unbalanced Sinkhorn divergence (mm², blur 2 mm, reach 10 mm)
                   between each predicted and true class, seen as measures on the voxel grid, so a misplaced voxel
                   costs by how far it is from the true shape.

Every ``--val-every`` iterations the network segments the whole crop in one pass and MONAI's ``DiceMetric``
and ``HausdorffDistanceMetric`` (95th percentile, mm) score the hippocampi. There is a single image, so this
validation measures how well each loss fits it, not generalisation. Run::

    python tutorials/monai_training.py --output tutorial_output/monai_training

It prints a summary table and writes ``monai_training.png`` (loss, Dice and HD95 curves) and
``monai_training.csv`` (one row per loss and iteration) into ``--output``. ``--quick`` is the version that CI runs.

Outcome (defaults: 600 iterations of two 40³ crops, seed 0, 2-core CPU): ``dice`` Dice 0.897, HD95 2.0 mm
(about 30 s on an idle machine); ``dice_sinkhorn`` Dice 0.879, HD95 1.4 mm (134 s). Over the second half of
training the Dice loss alone left false-positive blobs far from the hippocampi at some validations (HD95 up to
22.4 mm), the Dice + Sinkhorn loss never (HD95 at most 2.2 mm): the transport term pays for mass by its distance
to the target. One image and one seed show the behaviour; they are not a benchmark.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks import one_hot
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    RandAffined,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandScaleIntensityd,
)
from tqdm import tqdm

from geomed import datasets
from monai_losses.losses import DiceSinkhornLoss

logger = logging.getLogger("monai_training")

LOSSES = ("dice", "dice_sinkhorn")
HIPPOCAMPI = (40, 81)  # Desikan-Killiany labels of the left and right hippocampus, class 1 here
QUICK = (60, 24, 20)  # iterations, crop edge (voxels), validation period of the CI version (--quick)


def hippocampus_sample() -> dict[str, MetaTensor]:
    """The shipped T1 crop (z-scored intensities) and its class map (0 background, 1 hippocampus).

    Returns
    -------
    dict
        ``{"image": MetaTensor (1, 92, 53, 52) float32, "label": MetaTensor (1, 92, 53, 52) float32}``, both with
        the crop's affine (voxel → RAS mm).
    """
    t1, labels = datasets.mni_hippocampi()
    classes = np.isin(labels.array, HIPPOCAMPI).astype(np.float32)
    intensities = t1.array.astype(np.float32)
    image = (intensities - intensities.mean()) / intensities.std()
    affine = torch.tensor(t1.affine)
    return {"image": MetaTensor(image[None], affine=affine), "label": MetaTensor(classes[None], affine=affine)}


def make_loss(name: str) -> torch.nn.Module:
    """The loss called ``name`` (one of :data:`LOSSES`), on raw network outputs and class-index targets."""
    if name == "dice":
        return DiceLoss(softmax=True, to_onehot_y=True)
    if name == "dice_sinkhorn":
        return DiceSinkhornLoss(softmax=True, to_onehot_y=True, blur=2.0)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")


def make_network() -> UNet:
    """The small 3-D UNet trained here: one input channel, two output channels (background, hippocampus)."""
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2))


def _augmentation(crop: int, batch: int) -> Compose:
    return Compose([
        RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=(crop,) * 3, pos=2.0, neg=1.0,
                               num_samples=batch),
        RandAffined(keys=("image", "label"), prob=0.8, rotate_range=(0.15,) * 3, scale_range=(0.1,) * 3,
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandGaussianNoised(keys="image", prob=0.5, std=0.1),
        RandScaleIntensityd(keys="image", prob=0.5, factors=0.1),
    ])


def _gradient_norm(network: torch.nn.Module) -> float:
    gradients = [parameter.grad.detach().reshape(-1) for parameter in network.parameters()]
    return float(torch.linalg.vector_norm(torch.cat(gradients)))


def _validate(network: torch.nn.Module, sample: dict[str, MetaTensor]) -> tuple[float, float]:
    window = tuple(-(-size // 4) * 4 for size in sample["image"].shape[1:])
    network.eval()
    with torch.no_grad():
        logits = sliding_window_inference(sample["image"][None], window, 1, network)
    network.train()
    prediction = one_hot(logits.argmax(1, keepdim=True), num_classes=2)
    truth = one_hot(sample["label"][None], num_classes=2)
    dice = DiceMetric(include_background=False)(prediction, truth)
    distance = HausdorffDistanceMetric(include_background=False, percentile=95)(
        prediction, truth, spacing=sample["image"].pixdim.tolist())
    return float(dice), float(distance)


def train(loss_name: str, iterations: int, *, crop: int = 40, batch: int = 2, learning_rate: float = 5e-3,
          val_every: int = 50, seed: int = 0, progress: bool = True) -> dict:
    """Train :func:`make_network` on the hippocampus crop with one loss and record its curves.

    Parameters
    ----------
    loss_name : str
        One of :data:`LOSSES`: ``"dice"`` or ``"dice_sinkhorn"``.
    iterations : int
        Optimiser steps (Adam), one batch of random crops each.
    crop : int
        Edge of the cubic training crops, voxels; a multiple of 4. Validation segments the whole image at once
        (padded to a multiple of 4).
    batch : int
        Crops per batch.
    learning_rate : float
        Adam's step size.
    val_every : int
        Validate on the whole image every this many iterations (and after the last one).
    seed : int
        Seeds the initial weights and the crops and augmentations: two losses trained with one seed start from the
        same network and see the same batches. No global random state is changed.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    dict
        ``loss`` (the name), ``iteration``, ``train_loss`` and ``grad_norm`` (the gradient norm over all
        parameters, before the step) per iteration; ``val_iteration``, ``val_dice`` and ``val_hd95`` (Dice and
        95th-percentile Hausdorff distance in mm of the hippocampi on the whole crop, per validation; the
        distance is NaN or infinite while no voxel is predicted); ``seconds`` (wall time, validation included)
        and ``network`` (the trained UNet, holding the gradients of its last step).
    """
    if crop % 4:
        raise ValueError(f"crop must be a multiple of 4 (the UNet halves it twice), got {crop}")
    sample = hippocampus_sample()
    loader = DataLoader(Dataset([sample], transform=_augmentation(crop, batch)), batch_size=1, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = make_network()
    loss_function = make_loss(loss_name)
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    history = {"loss": loss_name, "iteration": [], "train_loss": [], "grad_norm": [], "val_iteration": [],
               "val_dice": [], "val_hd95": []}
    start = time.perf_counter()
    batches = iter(())
    for iteration in tqdm(range(1, iterations + 1), desc=loss_name, disable=not progress, leave=False):
        batch_data = next(batches, None)
        if batch_data is None:
            batches = iter(loader)
            batch_data = next(batches)
        optimizer.zero_grad()
        loss = loss_function(network(batch_data["image"]), batch_data["label"])
        loss.backward()
        history["iteration"].append(iteration)
        history["train_loss"].append(loss.item())
        history["grad_norm"].append(_gradient_norm(network))
        optimizer.step()
        if iteration % val_every == 0 or iteration == iterations:
            dice, distance = _validate(network, sample)
            history["val_iteration"].append(iteration)
            history["val_dice"].append(dice)
            history["val_hd95"].append(distance)
            logger.info("%s, iteration %d: loss %.4f, Dice %.3f, HD95 %.1f mm", loss_name, iteration,
                        history["train_loss"][-1], dice, distance)
    history["seconds"] = time.perf_counter() - start
    history["network"] = network
    return history


def _write_csv(histories: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["loss", "iteration", "train_loss", "grad_norm", "val_dice", "val_hd95_mm"])
        for history in histories:
            validation = {iteration: (f"{dice:.4f}", f"{distance:.3f}") for iteration, dice, distance
                          in zip(history["val_iteration"], history["val_dice"], history["val_hd95"])}
            for iteration, loss, norm in zip(history["iteration"], history["train_loss"], history["grad_norm"]):
                writer.writerow([history["loss"], iteration, f"{loss:.6f}", f"{norm:.6g}",
                                 *validation.get(iteration, ("", ""))])


def _smoothed(values: list[float], window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def _figure(histories: list[dict], path: Path) -> None:
    figure, (losses, dices, distances) = plt.subplots(1, 3, figsize=(15, 3.8))
    for history, colour in zip(histories, ("tab:blue", "tab:red")):
        window = max(1, len(history["train_loss"]) // 20)
        steps = history["iteration"][window - 1:]
        losses.plot(steps, _smoothed(history["train_loss"], window) / history["train_loss"][0], color=colour,
                    label=history["loss"])
        for axis, key in ((dices, "val_dice"), (distances, "val_hd95")):
            axis.plot(history["val_iteration"], history[key], "o-", color=colour, markersize=3, label=history["loss"])
    losses.set_ylabel("training loss / its first value")
    losses.set_yscale("log")
    losses.set_title("training loss (moving average)")
    dices.set_ylabel("Dice")
    dices.set_ylim(0, 1)
    dices.set_title("hippocampi Dice, whole crop")
    distances.set_ylabel("HD95 (mm)")
    distances.set_ylim(bottom=0)
    distances.set_title("95% Hausdorff distance, whole crop")
    for axis in (losses, dices, distances):
        axis.set_xlabel("iteration")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=600, help="optimiser steps per loss (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the crops (default 0)")
    parser.add_argument("--output", type=Path, default=Path("tutorial_output/monai_training"),
                        help="folder for monai_training.png and .csv (default tutorial_output/monai_training)")
    parser.add_argument("--crop", type=int, default=40, help="training crop edge, voxels, multiple of 4 (default 40)")
    parser.add_argument("--val-every", type=int, default=50, help="validate every N iterations (default 50)")
    parser.add_argument("--quick", action="store_true",
                        help="the CI version: 60 iterations on 24³ crops, validation every 20 "
                             "(overrides the three options above)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    iterations, crop, val_every = QUICK if args.quick else (args.iterations, args.crop, args.val_every)
    logger.info("training %s for %d iterations on %d³ crops, seed %d", " and ".join(LOSSES), iterations, crop,
                args.seed)
    histories = [train(name, iterations, crop=crop, val_every=val_every, seed=args.seed) for name in LOSSES]
    args.output.mkdir(parents=True, exist_ok=True)
    _write_csv(histories, args.output / "monai_training.csv")
    _figure(histories, args.output / "monai_training.png")
    print(f"{'loss':>14} {'first loss':>11} {'last loss':>10} {'Dice':>6} {'best Dice':>10} {'HD95 mm':>8} "
          f"{'worst HD95, 2nd half':>21} {'time s':>7}")
    for history in histories:
        late = [hd95 for step, hd95 in zip(history["val_iteration"], history["val_hd95"]) if step > iterations / 2]
        print(f"{history['loss']:>14} {history['train_loss'][0]:>11.4f} {history['train_loss'][-1]:>10.4f} "
              f"{history['val_dice'][-1]:>6.3f} {max(history['val_dice']):>10.3f} {history['val_hd95'][-1]:>8.2f} "
              f"{max(late):>21.2f} {history['seconds']:>7.1f}")
    print(f"wrote {args.output / 'monai_training.png'} and {args.output / 'monai_training.csv'}")


if __name__ == "__main__":
    main()
