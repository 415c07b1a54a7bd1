"""The block-sparse Triton kernels (geomed.ot.triton_ranges), run on the CPU through Triton's interpreter: the same
softmins, soft averages and p = 1 gradients as the torch tiles over the same range pattern and as a dense masked
reference (with torch.autograd's gradients), and the same solve.

``TRITON_INTERPRET=1`` is set by ``tests/conftest.py`` before anything imports Triton (on a machine with a GPU the
kernels are compiled).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install -e '.[test]' brings it)", allow_module_level=True)

from geomed import Measure, sinkhorn_divergence  # noqa: E402
from geomed.ot.blocksparse import RangePattern, RangeSoftmin  # noqa: E402
from geomed.ot.triton_ranges import TritonRangeSoftmin  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pattern(n: int, m: int) -> RangePattern:
    """Chunks of 7, 20 (more than a row block), 1 and the rest of the rows; each with a few column ranges, one
    longer than a column block, one of a single column."""
    starts = torch.tensor([0, 7, 27, 28])
    stops = torch.tensor([7, 27, 28, n])
    ranges = [[(0, 5), (10, 50)], [(3, 4)], [(0, m)], [(20, 21), (30, m)]]
    counts = torch.tensor([len(r) for r in ranges])
    pointer = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    flat = [pair for chunk in ranges for pair in chunk]
    return RangePattern(starts.to(DEVICE), stops.to(DEVICE), pointer.to(DEVICE),
                        torch.tensor([a for a, _ in flat], dtype=torch.int32, device=DEVICE),
                        torch.tensor([b for _, b in flat], dtype=torch.int32, device=DEVICE), n, m)


@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("dim", [3, 6])
def test_range_kernels_match_the_torch_tiles(p, dtype, rtol, dim):
    generator = torch.Generator().manual_seed(dim + p)
    n, m = 45, 61
    x = (torch.randn(1, n, dim, generator=generator, dtype=dtype) * 3).to(DEVICE)
    y = (torch.randn(1, m, dim, generator=generator, dtype=dtype) * 3).to(DEVICE)
    y[0, 4] = x[0, 2]  # a coincident pair (p = 1: zero distance)
    h = torch.randn(1, m, generator=generator, dtype=dtype).to(DEVICE)
    h[0, 12] = -torch.inf  # a column without mass
    values = torch.randn(1, m, 5, generator=generator, dtype=dtype).to(DEVICE)
    pattern = _pattern(n, m)
    tiles, fused = RangeSoftmin(p, pattern), TritonRangeSoftmin(p, pattern)
    eps = 0.7
    softmin = tiles(eps, x, y, h)
    torch.testing.assert_close(fused(eps, x, y, h), softmin, rtol=rtol, atol=rtol)
    torch.testing.assert_close(fused.average(eps, x, y, h, softmin, values),
                               tiles.average(eps, x, y, h, softmin, values), rtol=rtol, atol=rtol)
    torch.testing.assert_close(fused.cost_gradient(eps, x, y, h, softmin),
                               tiles.cost_gradient(eps, x, y, h, softmin), rtol=rtol, atol=rtol)


def _kept(pattern: RangePattern) -> torch.Tensor:
    """The (n, m) mask of the cost entries that the pattern keeps."""
    mask = torch.zeros(pattern.n_rows, pattern.n_cols, dtype=torch.bool)
    pointer = pattern.range_ptr.tolist()
    for chunk, (start, stop) in enumerate(zip(pattern.chunk_start.tolist(), pattern.chunk_stop.tolist())):
        for r in range(pointer[chunk], pointer[chunk + 1]):
            mask[start:stop, int(pattern.range_start[r]) : int(pattern.range_stop[r])] = True
    return mask


@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("dim", [3, 6])
def test_range_kernels_match_a_dense_masked_reference_with_autograd_gradients(p, dim):
    """Against an independent dense reference — −ε logsumexp over the kept entries of the full cost matrix
    |x − y|^p / p, in float64 — the fused softmin agrees, and the gradient it implies for the points (x − A(y) for
    p = 2, the p = 1 cost gradient) equals torch.autograd's gradient of the reference."""
    generator = torch.Generator().manual_seed(10 * dim + p)
    n, m = 45, 61
    x = torch.randn(1, n, dim, generator=generator, dtype=torch.float64) * 3
    y = torch.randn(1, m, dim, generator=generator, dtype=torch.float64) * 3
    h = torch.randn(1, m, generator=generator, dtype=torch.float64)
    weights = torch.randn(n, generator=generator, dtype=torch.float64)  # a vector-Jacobian product's weights
    pattern, eps = _pattern(n, m), 0.7
    x_grad = x.clone().requires_grad_()
    cost = torch.cdist(x_grad[0], y[0]) ** p / p
    logits = (h[0] - cost / eps).masked_fill(~_kept(pattern), -torch.inf)
    reference = -eps * torch.logsumexp(logits, -1)
    (gradient,) = torch.autograd.grad((weights * reference).sum(), x_grad)
    fused = TritonRangeSoftmin(p, pattern)
    on = {name: tensor.to(DEVICE) for name, tensor in dict(x=x, y=y, h=h).items()}
    softmin = fused(eps, on["x"], on["y"], on["h"])
    torch.testing.assert_close(softmin[0].cpu(), reference.detach(), rtol=1e-12, atol=1e-12)
    if p == 2:
        implied = on["x"] - fused.average(eps, on["x"], on["y"], on["h"], softmin, on["y"])
    else:
        implied = fused.cost_gradient(eps, on["x"], on["y"], on["h"], softmin)
    torch.testing.assert_close(weights[:, None] * implied[0].cpu(), gradient[0], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 1])
def test_the_kernels_on_the_pattern_of_a_real_multiscale_solve(p):
    """The refined pattern a multiscale solve prunes to at its final blur (a few percent of the cost matrix, in
    ranges of 32-row chunks): the Triton kernels give the torch tiles' softmin and soft average on it."""
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(2500, 3, generator=generator) * 30
    y = torch.rand(2000, 3, generator=generator) * 30 + 1.0
    result = sinkhorn_divergence(Measure.from_points(x), Measure.from_points(y), blur=0.6, p=p, backend="multiscale")
    item = result._problem.items[0]
    tiles = item.softmin_xy
    assert isinstance(tiles, RangeSoftmin) and tiles.kept < 0.5
    fused = TritonRangeSoftmin(p, tiles.pattern)
    eps = result.schedule[-1].eps
    h = (item.beta.log() + item.g / eps)
    softmin = tiles(eps, item.x, item.y, h)
    torch.testing.assert_close(fused(eps, item.x, item.y, h), softmin, rtol=1e-5, atol=1e-4)
    values = torch.cat([item.y, torch.ones_like(item.y[..., :1])], -1)
    torch.testing.assert_close(fused.average(eps, item.x, item.y, h, softmin, values),
                               tiles.average(eps, item.x, item.y, h, softmin, values), rtol=1e-4, atol=1e-4)
