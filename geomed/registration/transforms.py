r"""Spatial transforms found by registration, in world RAS mm: affine maps and kernel deformations.

Both map points of the *moving* shape onto the *fixed* one, ``y = φ(x)``, and act on any points, meshes or
measures. A :class:`KernelDeformation` is a velocity field carried by control points :math:`q_k` with momenta
:math:`p_k` and a Gaussian kernel of width σ (mm),

.. math:: v(x) = \sum_k e^{-|x - q_k|^2 / 2\sigma^2}\, p_k ,

applied after an ``initial`` transform (the affine stage, or a coarser deformation). With ``steps = 1`` it is
the smooth displacement :math:`x + v(x)` (fast; it can fold under large momenta). With ``steps > 1`` it is the
LDDMM geodesic of the momenta (Miller, Trouvé, Younes): control points and momenta follow Hamilton's equations
of :math:`H(q, p) = \tfrac12 \sum_{kl} p_k^\top K(q_k, q_l) p_l` and every point is carried by the time-dependent
velocity, one explicit step of length 1/steps at a time. Each step :math:`x \mapsto x + v_t(x)/T` is a
diffeomorphism when its Lipschitz constant is below 1 (checked by :attr:`KernelDeformation.is_invertible`), so the
map folds nothing and its inverse is the composition of the inverted steps, each solved by a fixed-point iteration
(a contraction) — inverse consistency to round-off.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from ..mesh import Mesh
from .kernel_velocity import _kernel, velocity

_INVERSE_ITERATIONS = 50
_INVERSE_TOLERANCE = 1e-13


def _as_tensor(points, reference: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Points as a tensor on the transform's device and dtype; whether they came as a NumPy array."""
    if isinstance(points, torch.Tensor):
        return points.to(reference.device, reference.dtype), False
    return torch.tensor(np.asarray(points, dtype=np.float64), dtype=reference.dtype, device=reference.device), True


class Transform(ABC):
    """A map φ of world points (mm) from the moving shape's space onto the fixed shape's."""

    @abstractmethod
    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """φ(points) for a tensor (N, D), differentiable."""

    @abstractmethod
    def backward(self, points: torch.Tensor) -> torch.Tensor:
        """φ⁻¹(points) for a tensor (N, D)."""

    @property
    @abstractmethod
    def is_invertible(self) -> bool:
        """Whether φ is provably an orientation-preserving diffeomorphism."""

    @property
    @abstractmethod
    def _reference(self) -> torch.Tensor:
        """A parameter tensor whose device and dtype the points are brought to."""

    def __call__(self, points):
        """φ(points) for a Tensor or array (N, D) (same type back), a :class:`~geomed.Mesh` (vertices moved) or a
        :class:`~geomed.Measure` (points moved; weights and normals kept — rebuild a surface measure from the
        warped mesh to move its normals too)."""
        from ..measure import Measure

        if isinstance(points, Mesh):
            return Mesh(self(points.vertices), points.triangles, dict(points.point_data), dict(points.cell_data))
        if isinstance(points, Measure):
            return Measure(self(points.points), points.weights, points.normals, points.labels)
        tensor, numpy = _as_tensor(points, self._reference)
        moved = self.forward(tensor)
        return moved.detach().cpu().numpy() if numpy else moved

    def inverse(self, points):
        """φ⁻¹(points) for a Tensor or array (N, D)."""
        tensor, numpy = _as_tensor(points, self._reference)
        moved = self.backward(tensor)
        return moved.detach().cpu().numpy() if numpy else moved

    def jacobian(self, points) -> torch.Tensor:
        """∂φ/∂x at each point, (N, D, D), by automatic differentiation (D backward passes)."""
        tensor, _ = _as_tensor(points, self._reference)
        with torch.enable_grad():
            x = tensor.detach().requires_grad_()
            y = self.forward(x)
            rows = [torch.autograd.grad(y[:, d].sum(), x, retain_graph=d < y.shape[1] - 1)[0]
                    for d in range(y.shape[1])]
        return torch.stack(rows, 1)

    def jacobian_determinant(self, points) -> torch.Tensor:
        """det ∂φ/∂x at each point (N,): local volume change (> 0 where nothing folds)."""
        return torch.linalg.det(self.jacobian(points))


@dataclass(frozen=True)
class AffineTransform(Transform):
    """φ(x) = A x + t, with ``matrix`` A (D, D) and ``translation`` t (D,) in mm (float64)."""

    matrix: torch.Tensor
    translation: torch.Tensor

    @classmethod
    def identity(cls, dim: int, dtype: torch.dtype = torch.float64, device=None) -> AffineTransform:
        return cls(torch.eye(dim, dtype=dtype, device=device), torch.zeros(dim, dtype=dtype, device=device))

    @property
    def _reference(self) -> torch.Tensor:
        return self.matrix

    @property
    def homogeneous(self) -> np.ndarray:
        """The (D+1, D+1) homogeneous matrix, as in NIfTI affines."""
        dim = self.matrix.shape[0]
        out = np.eye(dim + 1)
        out[:dim, :dim] = self.matrix.detach().cpu().numpy()
        out[:dim, dim] = self.translation.detach().cpu().numpy()
        return out

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return points @ self.matrix.T + self.translation

    def backward(self, points: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.matrix, (points - self.translation).T).T

    @property
    def is_invertible(self) -> bool:
        """Whether the linear part has a positive determinant (an orientation-preserving, invertible map)."""
        return float(torch.linalg.det(self.matrix)) > 0

    def then(self, other: AffineTransform) -> AffineTransform:
        """other ∘ self."""
        return AffineTransform(other.matrix @ self.matrix, other.matrix @ self.translation + other.translation)

    def rotation_angle(self) -> float:
        """Angle (degrees) of the rotation closest to the linear part (polar decomposition)."""
        u, _, vt = torch.linalg.svd(self.matrix)
        rotation = u @ vt
        cosine = (torch.trace(rotation) - (rotation.shape[0] - 2)) / 2
        return math.degrees(math.acos(float(cosine.clamp(-1, 1))))


@dataclass(frozen=True)
class KernelDeformation(Transform):
    """φ = deformation ∘ ``initial``: Gaussian-kernel velocities on ``control_points`` (K, D) with ``momenta`` (K, D)
    (mm per unit time), kernel width ``scale`` (mm), integrated in ``steps`` explicit steps (1: a plain smooth
    displacement; more: the LDDMM geodesic, see the module docstring)."""

    initial: Transform
    control_points: torch.Tensor
    momenta: torch.Tensor
    scale: float
    steps: int

    @property
    def _reference(self) -> torch.Tensor:
        return self.control_points

    @property
    def diffeomorphic(self) -> bool:
        return self.steps > 1

    def trajectory(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(q_t, p_t) at the start of each step: Hamilton's equations of the kernel energy, explicit Euler."""
        q, p = self.control_points, self.momenta
        states = [(q, p)]
        for _ in range(self.steps - 1):
            q, p = _hamiltonian_step(q, p, self.scale, 1.0 / self.steps)
            states.append((q, p))
        return states

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        x = self.initial.forward(points)
        dt = 1.0 / self.steps
        for q, p in self.trajectory():
            x = x + dt * velocity(x, q, p, self.scale)
        return x

    def backward(self, points: torch.Tensor) -> torch.Tensor:
        """Each step x ↦ x + dt v(x) inverted by the fixed point x = y − dt v(x) (a contraction when the step is
        invertible), last step first, iterated until it moves no point by more than 1e-13 σ."""
        y = points
        dt = 1.0 / self.steps
        with torch.no_grad():
            for q, p in reversed(self.trajectory()):
                x = y - dt * velocity(y, q, p, self.scale)
                for _ in range(_INVERSE_ITERATIONS):
                    previous, x = x, y - dt * velocity(x, q, p, self.scale)
                    if float((x - previous).abs().max()) <= _INVERSE_TOLERANCE * self.scale:
                        break
                y = x
        return self.initial.backward(y)

    def energy(self) -> torch.Tensor:
        """Kinetic energy ½ Σ p_k·K(q_k, q_l) p_l of the initial momenta (mm², constant along the geodesic)."""
        return 0.5 * (self.momenta * velocity(self.control_points, self.control_points, self.momenta,
                                               self.scale)).sum()

    def step_lipschitz(self) -> float:
        """An upper bound of the Lipschitz constant of the largest step's displacement dt·v_t:
        Σ_k |p_k| dt / (σ √e)."""
        bound = max(float(p.norm(dim=-1).sum()) for _, p in self.trajectory())
        return bound / (self.steps * self.scale * math.sqrt(math.e))

    @property
    def is_invertible(self) -> bool:
        """Whether every step is provably a diffeomorphism (:meth:`step_lipschitz` < 1) and so is ``initial``."""
        return self.step_lipschitz() < 1 and self.initial.is_invertible


def _hamiltonian_step(q: torch.Tensor, p: torch.Tensor, scale: float,
                      dt: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One explicit step of q̇ = K(q, q) p, ṗ = −∂_q H = Σ_l (p_k·p_l) K(q_k, q_l) (q_k − q_l) / σ²."""
    kernel = _kernel(q, q, scale)
    dots = (p @ p.T) * kernel
    dp = (dots.sum(1, keepdim=True) * q - dots @ q) / scale**2
    return q + dt * kernel @ p, p + dt * dp
