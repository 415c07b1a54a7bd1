"""What the data-curation tools share: whether two SimpleITK images lie on one voxel grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """True when ``a`` and ``b`` have the same size, origin, spacing and direction (to float tolerance)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )
