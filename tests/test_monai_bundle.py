"""The example MONAI bundle monai_losses/bundle/hippocampus_sinkhorn: metadata, config parsing, a short training."""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.nets import UNet

import geomed
from monai_losses.losses import DiceSinkhornLoss

BUNDLE = Path(str(resources.files("monai_losses") / "bundle" / "hippocampus_sinkhorn"))


@pytest.fixture
def parser(tmp_path) -> ConfigParser:
    config = ConfigParser()
    config.read_config(BUNDLE / "configs" / "train.json")
    config.read_meta(BUNDLE / "configs" / "metadata.json")
    config.update({"iterations": 3, "crop_size": [16, 16, 16], "output_dir": str(tmp_path / "output")})
    return config


def test_metadata_follows_the_bundle_schema():
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text(encoding="utf-8"))
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors",
                "copyright", "network_data_format"):
        assert metadata[key], key
    assert metadata["required_packages_version"]["geomed"] == geomed.__version__
    inputs, outputs = metadata["network_data_format"]["inputs"], metadata["network_data_format"]["outputs"]
    assert inputs["image"]["num_channels"] == 1 and outputs["pred"]["num_channels"] == 2
    assert "Montreal Neurological Institute" in metadata["copyright"]


def test_config_builds_our_loss_and_a_unet(parser):
    assert parser["loss"]["_target_"] == "monai_losses.losses.DiceSinkhornLoss"
    assert type(parser.get_parsed_content("loss")) is DiceSinkhornLoss
    network = parser.get_parsed_content("network")
    assert isinstance(network, UNet)
    assert network(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_batches_are_metatensors_with_the_crop_geometry(parser):
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    assert batch["image"].shape == batch["label"].shape == (2, 1, 16, 16, 16)
    assert isinstance(batch["label"], MetaTensor) and batch["label"].affine.shape == (2, 4, 4)
    assert set(torch.unique(batch["label"]).tolist()) <= {0.0, 1.0}


@pytest.mark.slow
def test_three_training_iterations(parser, tmp_path):
    losses = parser.get_parsed_content("run")[0]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    weights = torch.load(tmp_path / "output" / "model.pt", weights_only=True)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
