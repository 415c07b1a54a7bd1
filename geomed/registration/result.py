"""What a registration returns, and its export to SimpleITK transforms that ITK and 3D Slicer read.

ITK stores the *resampling* transform, which maps points of the fixed image's space to the moving one's (the
inverse of φ), in LPS coordinates; geomed's φ maps moving onto fixed in RAS. The export converts both: an affine φ
becomes ``sitk.AffineTransform`` of F φ⁻¹ F with F = diag(−1, −1, 1); a deformation becomes a
``sitk.DisplacementFieldTransform`` sampled on a grid over the fixed shape, d(y) = F φ⁻¹(F y) − y.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..measure import Measure
from ..mesh import Mesh
from .transforms import AffineTransform, Transform

_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class RegistrationResult:
    """The outcome of :func:`geomed.register`.

    Attributes
    ----------
    transform : Transform
        φ, moving → fixed (:class:`AffineTransform` or :class:`KernelDeformation`); call it on points, meshes or
        measures; ``transform.inverse(points)`` maps back.
    warped : Mesh or Measure
        The moving shape moved by φ (a mesh gets point arrays ``displacement`` (mm, 3 components),
        ``normal displacement`` (mm, along the moving surface's outward normal) and ``jacobian``).
    displacement : ndarray (N, D)
        φ(x) − x at the moving vertices or points (mm).
    normal_displacement : ndarray (N,) or None
        Its component along the moving mesh's outward vertex normals (mm; > 0 outwards); None for point measures.
    jacobian : ndarray (N,)
        det ∂φ/∂x at the moving vertices or points (volume ratio; ≤ 0 would mean a fold).
    history : list of (stage, iteration, value)
        The loss after every correspondence step or objective evaluation.
    timings : dict
        Seconds per stage ("rigid", "affine", "deformable", …) and "total".
    model, backend : str
        The model asked for, and where it ran ("cpu" or the CUDA device).
    """

    transform: Transform
    warped: Mesh | Measure
    displacement: np.ndarray
    normal_displacement: np.ndarray | None
    jacobian: np.ndarray
    history: list = field(repr=False)
    timings: dict
    model: str
    backend: str

    @property
    def min_jacobian(self) -> float:
        """The smallest Jacobian determinant over the moving shape (> 0: nothing folded)."""
        return float(self.jacobian.min())

    def to_sitk(self, spacing: float = 2.0, margin: float = 10.0, region: np.ndarray | None = None):
        """The SimpleITK transform (fixed → moving in LPS, as ITK and Slicer expect).

        Parameters
        ----------
        spacing : float
            Grid spacing (mm) of a displacement field (deformations only).
        margin : float
            Margin (mm) of the field's grid around ``region``.
        region : array (M, 3), optional
            Points (RAS mm) the field must cover; default the warped shape.
        """
        import SimpleITK as sitk

        if isinstance(self.transform, AffineTransform):
            inverse = np.linalg.inv(self.transform.homogeneous)
            exported = sitk.AffineTransform(3)
            exported.SetMatrix((_LPS @ inverse[:3, :3] @ _LPS).ravel().tolist())
            exported.SetTranslation((_LPS @ inverse[:3, 3]).tolist())
            return exported
        if region is None:
            warped = self.warped
            region = warped.vertices if isinstance(warped, Mesh) else warped.points.detach().cpu().numpy()
        lower, upper = region.min(0) - margin, region.max(0) + margin
        shape = np.ceil((upper - lower) / spacing).astype(int) + 1
        axes = [lower[k] + spacing * np.arange(shape[k]) for k in range(3)]
        grid_ras = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        source = np.asarray(self.transform.inverse(grid_ras))
        displacement = (source - grid_ras) @ _LPS
        field_zyx = displacement.reshape(*shape, 3).transpose(2, 1, 0, 3)
        image = sitk.GetImageFromArray(np.ascontiguousarray(field_zyx), isVector=True)
        image.SetSpacing([spacing] * 3)
        image.SetOrigin((_LPS @ lower).tolist())
        image.SetDirection(_LPS.ravel().tolist())
        return sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))

    def write_transform(self, path: str | Path, **options) -> Path:
        """Write the transform for ITK / Slicer: ``.tfm`` or ``.h5`` (any transform), or ``.nii.gz`` / ``.nrrd``
        (a deformation's displacement field image). ``options`` go to :meth:`to_sitk`."""
        import SimpleITK as sitk

        path = Path(path)
        exported = self.to_sitk(**options)
        image_suffixes = (".nii", ".nii.gz", ".nrrd", ".mha")
        if any(path.name.endswith(suffix) for suffix in image_suffixes):
            if isinstance(self.transform, AffineTransform):
                raise ValueError(f"{path}: an affine transform is written as .tfm or .h5, not as an image")
            sitk.WriteImage(exported.GetDisplacementField(), str(path))
        elif path.suffix in (".tfm", ".h5", ".txt"):
            sitk.WriteTransform(exported, str(path))
        else:
            raise ValueError(f"{path}: transform files end in .tfm, .h5 or .txt; displacement fields in "
                             f"{', '.join(image_suffixes)}")
        return path


def summarise(transform: Transform, moving, *, history, timings, model, backend) -> RegistrationResult:
    """The result of moving ``moving`` (Mesh or Measure) by ``transform``."""
    if isinstance(moving, Mesh):
        points = torch.tensor(moving.vertices, dtype=torch.float64)
    else:
        points = moving.points.detach().double().cpu()
    with torch.no_grad():
        moved = transform.forward(points)
    jacobian = transform.jacobian_determinant(points).detach().numpy()
    displacement = (moved - points).numpy()
    normal = None
    if isinstance(moving, Mesh):
        normal = np.einsum("ij,ij->i", displacement, moving.vertex_normals())
        warped = Mesh(moved.numpy(), moving.triangles, dict(moving.point_data), dict(moving.cell_data))
        warped = warped.with_point_data(**{"displacement": displacement, "normal displacement": normal,
                                           "jacobian": jacobian})
    else:
        warped = Measure(moved.to(moving.dtype), moving.weights, moving.normals, moving.labels)
    return RegistrationResult(transform, warped, displacement, normal, jacobian, history, timings, model, backend)

