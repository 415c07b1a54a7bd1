"""The training loop of the hippocampus_sinkhorn bundle: plain PyTorch steps, so no pytorch-ignite is needed."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def run(network: torch.nn.Module, loss_function: Callable, optimizer: torch.optim.Optimizer, dataloader: Iterable,
        device: torch.device | str, output_dir: str | Path | None = None, log_every: int = 10) -> list[float]:
    """One optimiser step per batch of ``dataloader``; save the final weights; return the loss of every step.

    Parameters
    ----------
    network, loss_function, optimizer
        As built by the bundle's ``train.json``.
    dataloader : iterable of dict
        Batches ``{"image": (B, 1, *spatial), "label": (B, 1, *spatial)}``; MetaTensors keep their affine, from
        which the loss reads the voxel spacing.
    device : torch.device or str
    output_dir : path, optional
        Folder for ``model.pt`` (the network's ``state_dict``); nothing is saved when None.
    log_every : int
        Log the loss every this many steps.

    Returns
    -------
    list of float
        The training loss of each step.

    Raises
    ------
    FloatingPointError
        When a loss is NaN or infinite (the step is not taken).
    """
    network.train()
    losses = []
    for step, batch in enumerate(dataloader, start=1):
        optimizer.zero_grad()
        loss = loss_function(network(batch["image"].to(device)), batch["label"].to(device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"step {step}: the loss is {loss.item()}")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0:
            logger.info("step %d: loss %.4f", step, losses[-1])
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), Path(output_dir) / "model.pt")
    return losses
