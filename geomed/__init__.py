"""geomed: geometric shape analysis for medical imaging.

Every shape becomes a :class:`Measure` in world RAS millimetres; losses, registration and measurements take
measures. Meshes, images and label maps are read with :func:`read_mesh` / :func:`read_image`.
"""

from .image import Image
from .io import read_image, read_mesh, write_image, write_mesh
from .measure import Measure
from .mesh import Mesh
from .ot import OTResult, SinkhornLoss, sinkhorn_divergence
from .surface import mask_to_mesh

__all__ = [
    "Image",
    "Measure",
    "Mesh",
    "OTResult",
    "SinkhornLoss",
    "sinkhorn_divergence",
    "mask_to_mesh", "read_image", "read_mesh", "write_image", "write_mesh"]
__version__ = "0.1.0"
