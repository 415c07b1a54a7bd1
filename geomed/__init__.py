"""geomed: geometric shape analysis for medical imaging.

Every shape becomes a :class:`Measure` in world RAS millimetres; losses, registration and measurements take
measures. Meshes, images and label maps are read with :func:`read_image` / :func:`read_mesh`.

The file readers and writers (SimpleITK, VTK) are imported on first use, so that ``import geomed`` for losses in a
training script pulls in torch alone.
"""

from importlib import import_module

from ._spatial import keops_available
from .image import Image
from .kernels import KernelLoss, VarifoldLoss, mmd, varifold_distance
from .measure import Measure, VoxelGrid
from .mesh import Mesh
from .ot import (BarycenterResult, OTResult, SinkhornLoss, grid_sinkhorn_barycenter, grid_sinkhorn_divergence,
                 sinkhorn_barycenter, sinkhorn_divergence)
from .registration import RegistrationResult, register

_LAZY = {"read_image": "io", "read_mesh": "io", "write_image": "io", "write_mesh": "io", "mask_to_mesh": "surface",
         "probability_to_mesh": "surface"}

__all__ = ["BarycenterResult", "Image", "KernelLoss", "Measure", "Mesh", "OTResult", "RegistrationResult",
           "SinkhornLoss", "VarifoldLoss", "VoxelGrid", "grid_sinkhorn_barycenter", "grid_sinkhorn_divergence",
           "keops_available", "mmd",
           "register", "sinkhorn_barycenter", "sinkhorn_divergence", "varifold_distance", *_LAZY]
__version__ = "0.1.0"


_SUBMODULES = ("datasets", "morphometry")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
