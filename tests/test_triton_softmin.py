"""The ``triton`` GPU kernels, run on the CPU through Triton's interpreter: same numbers as the dense torch tiles.

``TRITON_INTERPRET=1`` is set by ``tests/conftest.py`` before anything imports Triton (on a machine with a GPU the
kernels are compiled instead).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed (pip install -e '.[test]' brings it)", allow_module_level=True)

from geomed import Measure, sinkhorn_divergence  # noqa: E402
from geomed.ot.softmin import DenseSoftmin  # noqa: E402
from geomed.ot.triton_softmin import TritonSoftmin  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(dtype, batch=2, n=37, m=53, dim=3, seed=0):
    """Sizes that are no multiple of the blocks, a coincident pair, a zero-weight column (h = −∞)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=generator, dtype=dtype) * 3
    y = torch.randn(batch, m, dim, generator=generator, dtype=dtype) * 3
    y[0, 5] = x[0, 3]
    h = torch.randn(batch, m, generator=generator, dtype=dtype)
    h[-1, 7] = -torch.inf
    values = torch.randn(batch, m, 5, generator=generator, dtype=dtype)
    return (t.to(DEVICE) for t in (x, y, h, values))


@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("dim", [3, 6])
def test_kernels_match_dense_tiles(p, dtype, rtol, dim):
    x, y, h, values = _inputs(dtype, dim=dim)
    eps = 0.7
    dense, fused = DenseSoftmin(p), TritonSoftmin(p)
    softmin = dense(eps, x, y, h)
    torch.testing.assert_close(fused(eps, x, y, h), softmin, rtol=rtol, atol=rtol)
    torch.testing.assert_close(fused.average(eps, x, y, h, softmin, values),
                               dense.average(eps, x, y, h, softmin, values), rtol=rtol, atol=rtol)
    torch.testing.assert_close(fused.cost_gradient(eps, x, y, h, softmin),
                               dense.cost_gradient(eps, x, y, h, softmin), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("p, reach", [(2, None), (1, None), (2, 8.0)])
def test_divergence_and_gradients_match_dense(p, reach):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(30, 3, generator=generator, dtype=torch.float64) * 5
    y = torch.randn(40, 3, generator=generator, dtype=torch.float64) * 5 + 4.0
    results = {}
    for backend in ("dense", "triton"):
        points = x.clone().to(DEVICE).requires_grad_(True)
        result = sinkhorn_divergence(Measure.from_points(points), Measure.from_points(y.to(DEVICE)), blur=1.5, p=p,
                                     reach=reach, backend=backend, tol=1e-6)
        assert result.backend == backend
        results[backend] = (result.value.detach(), torch.autograd.grad(result.value, points)[0])
    torch.testing.assert_close(results["triton"][0], results["dense"][0], rtol=1e-9, atol=0)
    torch.testing.assert_close(results["triton"][1], results["dense"][1], rtol=1e-7, atol=1e-10)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    a = Measure.from_points(torch.randn(10, 3))
    with pytest.raises(ValueError, match="backend='triton'.*CUDA tensors"):
        sinkhorn_divergence(a, a, blur=1.0, backend="triton")
