"""Registration of shapes (meshes, masks, measures) by geomed's losses: rigid, similarity, affine, deformable and
diffeomorphic, with anatomy presets and SimpleITK export. Entry point: :func:`register`."""

from .losses import LOSSES, deformable_loss
from .presets import PRESETS, Preset
from .register import MODELS, RegistrationCancelled, register
from .result import RegistrationResult
from .transforms import AffineTransform, KernelDeformation, Transform

__all__ = ["LOSSES", "MODELS", "PRESETS", "AffineTransform", "KernelDeformation", "Preset", "RegistrationCancelled",
           "RegistrationResult", "Transform", "deformable_loss", "register"]
