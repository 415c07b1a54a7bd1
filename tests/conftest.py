"""Shared fixtures: the full data set in ../shared/data (present in CI) and small synthetic shapes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decides between compiling and interpreting when it is first imported, and other test modules import it
    # indirectly (nnU-Net does, through torch.compile): set before any test module is collected, so that the GPU
    # kernels run on the CPU through Triton's interpreter (on a machine with a GPU they are compiled instead).
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(os.environ.get("GEOMED_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full anatomical data set beside the repository (../shared/data); tests using it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"needs the full data set at {SHARED_DATA} (set GEOMED_SHARED_DATA); "
            "it holds the uncropped originals that the shipped demo data is checked against"
        )
    return SHARED_DATA
