"""Sinkhorn barycenters against closed forms (translates, 1-D quantiles, Gaussian blobs), POT, and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch

from geomed import (
    Measure,
    grid_sinkhorn_barycenter,
    grid_sinkhorn_divergence,
    sinkhorn_barycenter,
    sinkhorn_divergence,
)


def _cloud(n: int, seed: int, scale=(3.0, 1.0), dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(scale), generator=generator, dtype=dtype) * torch.tensor(scale, dtype=dtype)


def _moments(points: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    points = points.double().numpy()
    return points.mean(0), np.cov(points.T)


# ------------------------------------------------------------------------------------------------ free support
def test_translates_give_the_translate_by_the_mean_shift():
    """Translates x + t_k of one cloud: the W2 barycenter is x + Σ λ_k t_k, with objective Σ λ_k |t_k − t̄|²/2
    (S_ε is |t|²/2 between translates). One debiased step from the first translate lands on it, point by point."""
    shape = _cloud(60, 0)
    shifts = torch.tensor([[0.0, 0.0], [10.0, 4.0], [-3.0, 8.0]])
    lam = torch.tensor([0.2, 0.5, 0.3])
    measures = [Measure.from_points(shape + shift) for shift in shifts]
    result = sinkhorn_barycenter(measures, lam, blur=0.5)
    mean_shift = (lam.unsqueeze(-1) * shifts).sum(0)
    assert result.converged
    torch.testing.assert_close(result.measure.points, shape + mean_shift, atol=2e-3, rtol=0)
    expected = float((lam * (shifts - mean_shift).square().sum(-1)).sum() / 2)
    assert result.history[-1] == pytest.approx(expected, rel=1e-3)
    assert result.history[0] > result.history[-1]


def test_debiasing_keeps_the_spread_of_the_inputs():
    """The biased OT_ε barycenter of translates is shrunk (its maps average over ~blur); the debiased one is not."""
    shape = _cloud(60, 1)
    measures = [Measure.from_points(shape), Measure.from_points(shape + torch.tensor([6.0, -2.0]))]
    _, covariance = _moments(shape)
    debiased = sinkhorn_barycenter(measures, blur=1.0).measure
    biased = sinkhorn_barycenter(measures, blur=1.0, debias=False, max_iter=10).measure
    spread = np.trace(covariance)
    assert np.trace(_moments(debiased.points)[1]) == pytest.approx(spread, rel=1e-3)
    assert np.trace(_moments(biased.points)[1]) < 0.9 * spread
    for result in (debiased, biased):
        np.testing.assert_allclose(_moments(result.points)[0], shape.double().mean(0).numpy() + [3.0, -1.0],
                                   atol=1e-3)


def test_one_dimensional_barycenter_averages_quantile_functions():
    """In 1-D the W2 barycenter of empirical measures with n points each has sorted points Σ λ_k sort(x_k)
    (averaged quantile functions; exact reference by numpy sorting). The entropic barycenter approaches it
    as the blur decreases, and the debiased one is closer than the biased one."""
    rng = np.random.default_rng(0)
    samples = [rng.normal(0, 2, 24), rng.uniform(5, 15, 24), rng.exponential(3, 24) - 10]
    lam = np.array([0.2, 0.5, 0.3])
    reference = sum(weight * np.sort(sample) for weight, sample in zip(lam, samples, strict=True))
    measures = [Measure.from_points(torch.tensor(sample, dtype=torch.float32)[:, None]) for sample in samples]

    def error(blur, debias=True):
        points = sinkhorn_barycenter(measures, lam, blur=blur, debias=debias).measure.points[:, 0].numpy()
        return np.abs(np.sort(points) - reference)

    coarse, fine, biased = error(0.5), error(0.3), error(0.5, debias=False)
    assert coarse.mean() < 0.2 * 0.5 and coarse.max() < 0.6 * 0.5
    assert fine.mean() < 0.7 * coarse.mean()
    assert coarse.mean() < 0.7 * biased.mean()


def test_weight_one_on_a_measure_recovers_it():
    """λ = (1, 0) from the other measure's points: the barycenter converges to the first measure itself."""
    first, second = _cloud(40, 2), _cloud(40, 3, scale=(1.0, 2.0)) + torch.tensor([4.0, 1.0])
    measures = [Measure.from_points(first), Measure.from_points(second)]
    result = sinkhorn_barycenter(measures, [1.0, 0.0], blur=0.3, support=measures[1], max_iter=25)
    distances = torch.cdist(result.measure.points.double(), first.double())
    assert float(distances.amin(1).max()) < 0.1 and float(distances.amin(0).max()) < 0.1
    start = float(sinkhorn_divergence(measures[1], measures[0], blur=0.3).value)
    assert result.history[-1] < 1e-3 * start


def test_initial_support_subsampling_mass_and_dtype():
    """n_points subsamples the first measure; output weights carry the weighted mean mass; dtype/device kept."""
    points = _cloud(50, 4, dtype=torch.float64)
    small = Measure.from_points(points, torch.full((50,), 2.0, dtype=torch.float64))
    large = Measure.from_points(points + 1.0, torch.full((50,), 6.0, dtype=torch.float64))
    result = sinkhorn_barycenter([small, large], [0.25, 0.75], blur=1.0, n_points=20, max_iter=3)
    assert result.measure.points.shape == (20, 2) and result.measure.dtype == torch.float64
    assert float(result.measure.total_mass) == pytest.approx(0.25 * 100 + 0.75 * 300)
    assert not result.measure.points.requires_grad and result.iterations <= 3


# ------------------------------------------------------------------------------------------------------ grid
def _blob(shape, spacing, centre, sigma) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float64) * s for n, s in zip(shape, spacing, strict=True)]
    grids = torch.meshgrid(*axes, indexing="ij")
    return torch.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) / (2 * sigma**2))


def _grid_moments(density: torch.Tensor, spacing) -> tuple[np.ndarray, np.ndarray]:
    density = density.double() / density.double().sum()
    axes = [torch.arange(n, dtype=torch.float64) * s for n, s in zip(density.shape, spacing, strict=True)]
    grids = torch.meshgrid(*axes, indexing="ij")
    mean = np.array([float((density * g).sum()) for g in grids])
    std = np.array([math.sqrt(float((density * (g - m) ** 2).sum())) for g, m in zip(grids, mean, strict=True)])
    return mean, std


def test_grid_barycenter_of_gaussian_blobs_on_an_anisotropic_grid():
    """Two Gaussian blobs (σ = 4 mm) on a 40 × 56 grid of 1.2 × 0.8 mm voxels: the debiased barycenter is the
    blob at λ₁c₁ + λ₂c₂ with the same width (W2 barycenter of translates); the biased one is visibly wider
    (variance σ² + ε), and the mass is the weighted mean of the inputs' masses."""
    shape, spacing, sigma, blur = (40, 56), (1.2, 0.8), 4.0, 2.0
    centres = [(14.0, 15.0), (32.0, 30.0)]
    lam = (0.3, 0.7)
    densities = torch.stack([_blob(shape, spacing, c, sigma) for c in centres]).float()
    densities[1] *= 3.0
    debiased = grid_sinkhorn_barycenter(densities, lam, blur=blur, spacing=spacing)
    biased = grid_sinkhorn_barycenter(densities, lam, blur=blur, spacing=spacing, debias=False)
    expected_centre = lam[0] * np.array(centres[0]) + lam[1] * np.array(centres[1])
    assert debiased.shape == shape and debiased.dtype == torch.float32
    for density in (debiased, biased):
        mean, _ = _grid_moments(density, spacing)
        np.testing.assert_allclose(mean, expected_centre, atol=2e-2)
        mass = float(lam[0] * densities[0].sum() + lam[1] * densities[1].sum())
        assert float(density.sum()) == pytest.approx(mass, rel=1e-5)
    _, input_std = _grid_moments(densities[0], spacing)
    np.testing.assert_allclose(_grid_moments(debiased, spacing)[1], input_std, rtol=1e-2)
    assert np.all(_grid_moments(biased, spacing)[1] > 1.08 * input_std)
    wider = np.sqrt(input_std**2 + blur**2)
    np.testing.assert_allclose(_grid_moments(biased, spacing)[1], wider, rtol=2e-2)


@pytest.mark.parametrize("debias", [True, False])
def test_grid_barycenter_matches_pot(debias):
    """POT's log-domain convolutional barycenters on a square grid over [0, 1]² with kernel exp(−d²/reg): the
    same problem for spacing 1/(n−1) and ε = reg/2, i.e. blur = √(reg/2)."""
    n, reg, lam = 32, 0.004, np.array([0.4, 0.6])
    unit = (1.0 / (n - 1),) * 2
    densities = torch.stack([_blob((n, n), unit, c, 0.07) for c in ((0.3, 0.3), (0.7, 0.6))])
    densities = densities / densities.sum((1, 2), keepdim=True)
    solver = ot.bregman.convolutional_barycenter2d_debiased if debias else ot.bregman.convolutional_barycenter2d
    reference = solver(densities.numpy(), reg, lam, method="sinkhorn_log", numItermax=2000, stopThr=1e-8,
                       warn=False)
    reference = reference / reference.sum()
    blur = math.sqrt(reg / 2)
    ours = grid_sinkhorn_barycenter(densities.float(), lam, blur=blur, spacing=unit, debias=debias, tol=1e-6)
    assert float(np.abs(ours.double().numpy() - reference).sum()) < 1e-4
    if debias:  # independent check: the objective Σ λ_k S_ε(b, a_k), |t_k − t̄|²/2 averaged for these translates
        values = [grid_sinkhorn_divergence(density.expand(2, 1, n, n).contiguous(), densities[:, None], blur=blur,
                                           spacing=unit, tol=1e-6).value[:, 0] for density in (ours.double(),
                                                                                             torch.tensor(reference))]
        objective, pot_objective = (float((torch.tensor(lam) * value).sum()) for value in values)
        assert objective == pytest.approx(0.4 * 0.6 * 0.25 / 2, rel=1e-4)
        assert objective <= pot_objective * (1 + 1e-6)


def test_grid_barycenter_of_one_density_is_itself():
    """K = 1 on a 3-D anisotropic grid: S_ε(b, a) = 0 only for b = a, so the debiased barycenter is the input."""
    density = _blob((20, 16, 12), (1.0, 1.5, 2.0), (9.0, 11.0, 12.0), 3.0).float() * 5.0
    result = grid_sinkhorn_barycenter(density[None], blur=1.0, spacing=(1.0, 1.5, 2.0), tol=1e-5)
    torch.testing.assert_close(result, density, atol=2e-3 * float(density.max()), rtol=0)


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    ("weights", "match"),
    [([1.0], "one number per measure"), ([1.0, -0.5], "non-negative"), ([0.0, 0.0], "positive sum"),
     ([1.0, float("nan")], "finite"), ("ab", "weights must be")],
)
def test_bad_barycentric_weights(weights, match):
    measures = [Measure.from_points(_cloud(5, 0)), Measure.from_points(_cloud(5, 1))]
    with pytest.raises((ValueError, TypeError), match=match):
        sinkhorn_barycenter(measures, weights, blur=1.0)
    with pytest.raises((ValueError, TypeError), match=match):
        grid_sinkhorn_barycenter(torch.rand(2, 6, 6), weights, blur=1.0)


def test_bad_measures_and_supports():
    cloud = Measure.from_points(_cloud(5, 0))
    with pytest.raises(ValueError, match="empty"):
        sinkhorn_barycenter([], blur=1.0)
    with pytest.raises(TypeError, match="sequence of geomed.Measure"):
        sinkhorn_barycenter(cloud, blur=1.0)
    with pytest.raises(TypeError, match=r"measures\[1\]"):
        sinkhorn_barycenter([cloud, torch.zeros(5, 2)], blur=1.0)
    with pytest.raises(ValueError, match="one dimension"):
        sinkhorn_barycenter([cloud, Measure.from_points(_cloud(5, 1, scale=(1.0, 1.0, 1.0)))], blur=1.0)
    with pytest.raises(ValueError, match="batch shape"):
        sinkhorn_barycenter([Measure.from_points(torch.zeros(2, 5, 2))], blur=1.0)
    with pytest.raises(ValueError, match="support must be one measure"):
        sinkhorn_barycenter([cloud], blur=1.0, support=Measure.from_points(torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="positive weights"):
        zero_weight = Measure.from_points(torch.zeros(3, 2), torch.tensor([1.0, 0.0, 1.0]))
        sinkhorn_barycenter([cloud], blur=1.0, support=zero_weight)
    with pytest.raises(ValueError, match="not both"):
        sinkhorn_barycenter([cloud], blur=1.0, support=cloud, n_points=3)
    with pytest.raises(ValueError, match="n_points"):
        sinkhorn_barycenter([cloud], blur=1.0, n_points=6)
    with pytest.raises(ValueError, match="blur"):
        sinkhorn_barycenter([cloud], blur=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        sinkhorn_barycenter([cloud], blur=1.0, max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        sinkhorn_barycenter([cloud], blur=1.0, tol=0.0)


def test_bad_densities():
    with pytest.raises(ValueError, match="empty"):
        grid_sinkhorn_barycenter([], blur=1.0)
    with pytest.raises(ValueError, match="empty"):
        grid_sinkhorn_barycenter(torch.rand(0, 4, 4), blur=1.0)
    with pytest.raises(ValueError, match="one grid"):
        grid_sinkhorn_barycenter([torch.rand(4, 4), torch.rand(4, 5)], blur=1.0)
    with pytest.raises(TypeError, match="floating tensor"):
        grid_sinkhorn_barycenter(torch.ones(2, 4, 4, dtype=torch.int64), blur=1.0)
    with pytest.raises(ValueError, match="spatial axes"):
        grid_sinkhorn_barycenter(torch.rand(2, 3, 3, 3, 3), blur=1.0)
    with pytest.raises(ValueError, match="no mass"):
        grid_sinkhorn_barycenter(torch.stack([torch.rand(4, 4), torch.zeros(4, 4)]), blur=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        grid_sinkhorn_barycenter(-torch.rand(2, 4, 4), blur=1.0)
    with pytest.raises(ValueError, match="spacing"):
        grid_sinkhorn_barycenter(torch.rand(2, 4, 4), blur=1.0, spacing=(1.0,))
    with pytest.raises(ValueError, match="spacing"):
        grid_sinkhorn_barycenter(torch.rand(2, 4, 4), blur=1.0, spacing=(1.0, 0.0))
