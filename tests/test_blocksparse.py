"""The block-sparse layer of the multiscale engine against brute force: range patterns, their softmins and soft
averages, their refinement to a finer level, the shifted log-sum-exp, and the solver's adaptive over-relaxation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geomed._spatial import shifted_logsumexp, tile_logsumexp
from geomed.ot.blocksparse import RangePattern, RangeSoftmin, runs_to_pattern
from geomed.ot.solver import _Overrelaxation


def _mask(pattern: RangePattern) -> torch.Tensor:
    """The dense (n_rows, n_cols) boolean mask of a pattern, built entry by entry."""
    mask = torch.zeros(pattern.n_rows, pattern.n_cols, dtype=torch.bool)
    for k in range(len(pattern.chunk_start)):
        for r in range(int(pattern.range_ptr[k]), int(pattern.range_ptr[k + 1])):
            mask[int(pattern.chunk_start[k]):int(pattern.chunk_stop[k]),
                 int(pattern.range_start[r]):int(pattern.range_stop[r])] = True
    return mask


def _random_pattern(seed: int, n_rows: int, n_cols: int, chunk_rows: int, density: float, gap: int):
    generator = torch.Generator().manual_seed(seed)
    starts = torch.arange(0, n_rows, chunk_rows)
    stops = (starts + chunk_rows).clamp_max(n_rows)
    keep = torch.rand(len(starts), n_cols, generator=generator) < density
    keep[:, int(torch.randint(n_cols, (1,), generator=generator))] = True
    cols = torch.arange(n_cols).expand(len(starts), n_cols)
    return runs_to_pattern(keep, cols, starts, stops, n_rows, n_cols, gap=gap), keep, starts, stops


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n_rows=st.integers(1, 70), n_cols=st.integers(1, 90),
       chunk_rows=st.integers(1, 17), density=st.floats(0.05, 1.0), gap=st.integers(0, 3))
def test_runs_to_pattern_keeps_the_kept_columns_and_closes_only_short_gaps(seed, n_rows, n_cols, chunk_rows,
                                                                           density, gap):
    pattern, keep, starts, stops = _random_pattern(seed, n_rows, n_cols, chunk_rows, density, gap)
    mask = _mask(pattern)
    for k in range(len(starts)):
        kept = keep[k].nonzero().squeeze(-1)
        row = mask[int(starts[k])]
        assert bool(row[kept].all())
        assert torch.equal(mask[int(starts[k]):int(stops[k])], row.expand(int(stops[k] - starts[k]), -1))
        expected = torch.zeros(n_cols, dtype=torch.bool)
        for a, b in zip(kept[:-1].tolist(), kept[1:].tolist()):
            expected[a:b + 1] = b - a <= gap + 1
        expected[kept] = True
        assert torch.equal(row, expected)
    assert pattern.entries == int(mask.sum())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n_rows=st.integers(1, 12), n_cols=st.integers(1, 12),
       chunk_rows=st.integers(1, 9), density=st.floats(0.1, 1.0), split=st.integers(1, 7))
def test_children_of_a_pattern_cover_exactly_the_children_of_its_entries(seed, n_rows, n_cols, chunk_rows, density,
                                                                          split):
    generator = torch.Generator().manual_seed(seed + 1)
    pattern, *_ = _random_pattern(seed, n_rows, n_cols, chunk_rows, density, gap=0)
    row_sizes = torch.randint(1, 4, (n_rows,), generator=generator)
    col_sizes = torch.randint(1, 4, (n_cols,), generator=generator)
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.long), row_sizes.cumsum(0)])
    col_offsets = torch.cat([torch.zeros(1, dtype=torch.long), col_sizes.cumsum(0)])
    finer = pattern.children(row_offsets, col_offsets, chunk_rows=split)
    coarse = _mask(pattern)
    expected = coarse.repeat_interleave(row_sizes, 0).repeat_interleave(col_sizes, 1)
    assert torch.equal(_mask(finer), expected)
    assert bool((finer.chunk_stop - finer.chunk_start <= split).all())
    assert torch.equal(_mask(pattern.children(None, col_offsets, chunk_rows)),
                       coarse.repeat_interleave(col_sizes, 1))


def _brute_softmin(x, y, h, eps, mask):
    logits = h[None, :] - ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / (2 * eps)
    return -eps * torch.logsumexp(logits.masked_fill(~mask, -math.inf), -1), logits.masked_fill(~mask, -math.inf)


@pytest.mark.parametrize("cache_bytes", [0, 2**30])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), eps=st.floats(0.05, 5.0))
def test_range_softmin_and_averages_equal_brute_force_on_the_kept_entries(cache_bytes, seed, eps):
    generator = torch.Generator().manual_seed(seed)
    n, m = 53, 41
    pattern, *_ = _random_pattern(seed, n, m, chunk_rows=8, density=0.3, gap=2)
    x = torch.randn(1, n, 3, dtype=torch.float64, generator=generator)
    y = torch.randn(1, m, 3, dtype=torch.float64, generator=generator)
    h = torch.randn(1, m, dtype=torch.float64, generator=generator)
    values = torch.randn(1, m, 2, dtype=torch.float64, generator=generator)
    softmin = RangeSoftmin(2, pattern, cache_bytes=cache_bytes)
    expected, logits = _brute_softmin(x[0], y[0], h[0], eps, _mask(pattern))
    first = softmin(eps, x, y, h)
    torch.testing.assert_close(first[0], expected, rtol=1e-10, atol=1e-10)
    # The same points at the same ε: the shifted log-sum-exp reuses the first output; a large move of h makes
    # some rows fall outside its guard and recomputed.
    for step in (0.3, 80.0):
        moved = h + step * torch.randn(1, m, dtype=torch.float64, generator=generator)
        again, _ = _brute_softmin(x[0], y[0], moved[0], eps, _mask(pattern))
        torch.testing.assert_close(softmin(eps, x, y, moved)[0], again, rtol=1e-10, atol=1e-9)
    weights = torch.softmax(logits, -1)
    average = softmin.average(eps, x, y, h, first, values)
    torch.testing.assert_close(average[0], weights @ values[0], rtol=1e-9, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), offset=st.floats(-60.0, 60.0), scale=st.floats(0.1, 30.0))
def test_shifted_logsumexp_equals_logsumexp_where_it_serves_the_row(seed, offset, scale):
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(6, 20, dtype=torch.float64, generator=generator)
    exact = torch.logsumexp(logits, -1)
    guess = exact + offset * torch.rand(6, dtype=torch.float64, generator=generator)
    value, served = shifted_logsumexp(logits - guess[:, None], guess)
    torch.testing.assert_close(value[served], exact[served], rtol=1e-12, atol=1e-12)
    gap = (exact - guess).abs()
    clear = (gap - 40.0).abs() > 1e-6
    assert torch.equal(served[clear], (gap < 40.0)[clear])
    torch.testing.assert_close(tile_logsumexp(logits.clone()), exact, rtol=1e-12, atol=1e-12)


def test_overrelaxation_moves_to_the_optimal_factor_that_the_observed_rate_implies():
    rule = _Overrelaxation()
    omega = rule.omega
    theta2 = 0.999  # plain Sinkhorn's rate at a small blur
    optimal = 2 / (1 + math.sqrt(1 - theta2))
    # The error of over-relaxation with ω decays at the largest root of (ρ + ω − 1)² = ρ ω² θ².
    a = omega**2 * theta2
    rate = ((a - 2 * (omega - 1)) + math.sqrt((a - 2 * (omega - 1)) ** 2 - 4 * (omega - 1) ** 2)) / 2
    error = 1.0
    for _ in range(20):
        error *= rate
        new = rule.update(error)
    assert new == pytest.approx(optimal, rel=1e-6)
    assert new > omega


def test_overrelaxation_ignores_plateaus_and_falls_back_to_one_when_the_error_grows_tenfold():
    rule = _Overrelaxation()
    start = rule.omega
    for error in [1.0, 0.5] * 15:
        assert rule.update(error) == start
    assert rule.update(6.0) == 1.0
    assert all(rule.update(1e-3 * 0.9**k) == 1.0 for k in range(40))
