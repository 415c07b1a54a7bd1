r"""Block-sparse softmins over compressed column ranges: memory O(N + kept ranges), never one entry per kept pair.

A truncation pattern (:class:`RangePattern`) cuts the rows — points in Morton order — into *chunks* of consecutive
rows, and gives each chunk a few *ranges* ``[start, stop)`` of consecutive columns: in Morton order a cluster of
any level is a range of the points below it, so a pattern of kept cluster pairs is a few ranges per chunk (KeOps'
``ranges`` format, compressed as CSR). It is built straight from the pruning tests, never from a list of point
pairs.

A softmin over a pattern visits the chunks in *groups* of similar width (sorted once), each group stacked, padded,
into one batched tile of at most ``_GROUP_ENTRIES`` (2²²) entries: its column indices are expanded from the ranges
on the fly, the columns gathered, and the logits computed by one ``baddbmm`` and one exponential pass
(:class:`geomed.ot.softmin.TileGeometry`), so that nothing outlives the group.

Memory model (float32, D = 3, int32 indices)
    persistent, per pattern: 8 bytes per column range, 28 bytes per row chunk (its rows, its range pointer, its
    width and its place in the group plan) — O(N + kept ranges);
    working, per call: one group, ≤ 2²² entries × 4 bytes of logits plus ≈ 30 bytes per stacked column (its index,
    gathered point, h and padding flag), ≈ 20 MB;
    cached, per softmin given a ``cache_bytes`` budget (the refined patterns of the final blur, where most
    iterations run): the expanded column indices of every group (4 bytes per stacked column) and, if they fit
    too, its prepared tiles (≈ 20 bytes more per stacked column and per row) — this saves a third of an
    iteration (100k cube: 0.83 → 0.54 s); beyond the budget (1M points: ≈ 1 GB of indices per problem) they are
    rebuilt at every call, and memory stays O(N + kept ranges). :mod:`geomed.ot.multiscale` gives each solve's
    two cross problems 128 MB each.

Measured (peak resident memory of one fwd+bwd call at blur 1% of the diameter, float32, 2 cores, including
≈ 250 MB of interpreter, libraries and inputs; ``benchmarks/sinkhorn.py``): 100k points 0.51–0.73 GB on a
uniform cube, femur surfaces and tibia voxels, 1M cube 1.38 GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._spatial import expand_ranges, index_dtype, shifted_logsumexp, tile_average, tile_logsumexp
from .softmin import TiledSoftmin, TileGeometry

_GROUP_ENTRIES = 2**22
_WIDTH_GROWTH = 1.5


@dataclass(eq=False)
class RangePattern:
    """Rows cut into chunks of consecutive rows, each meeting a few ranges of consecutive columns.

    Attributes
    ----------
    chunk_start, chunk_stop : Tensor (K,) int64
        Rows ``[chunk_start[k], chunk_stop[k])`` of chunk k; the chunks are disjoint and cover every row.
    range_ptr : Tensor (K + 1,) int64
        The column ranges of chunk k are ``range_ptr[k]:range_ptr[k + 1]``: sorted, disjoint, non-empty.
    range_start, range_stop : Tensor (R,) int32 (int64 beyond 2³¹ columns)
        Columns ``[range_start[r], range_stop[r])``.
    n_rows, n_cols : int
    """

    chunk_start: torch.Tensor
    chunk_stop: torch.Tensor
    range_ptr: torch.Tensor
    range_start: torch.Tensor
    range_stop: torch.Tensor
    n_rows: int
    n_cols: int
    widths: torch.Tensor = field(init=False)

    def __post_init__(self):
        lengths = (self.range_stop - self.range_start).long()
        cumulative = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        self.widths = cumulative[self.range_ptr[1:]] - cumulative[self.range_ptr[:-1]]

    @classmethod
    def dense(cls, n_rows: int, n_cols: int, chunk_rows: int, device: torch.device) -> RangePattern:
        """Every column for every row, in chunks of ``chunk_rows`` rows."""
        starts = torch.arange(0, n_rows, chunk_rows, device=device)
        stops = (starts + chunk_rows).clamp_max(n_rows)
        dtype = index_dtype(n_cols + 1)
        return cls(starts, stops, torch.arange(len(starts) + 1, device=device),
                   torch.zeros(len(starts), dtype=dtype, device=device),
                   torch.full((len(starts),), n_cols, dtype=dtype, device=device), n_rows, n_cols)

    @property
    def entries(self) -> int:
        """Number of (row, column) pairs the pattern keeps."""
        return int(((self.chunk_stop - self.chunk_start) * self.widths).sum())

    @property
    def kept(self) -> float:
        """Fraction of the n_rows × n_cols matrix the pattern keeps."""
        return self.entries / max(self.n_rows * self.n_cols, 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.chunk_start, self.chunk_stop, self.range_ptr,
                                                          self.range_start, self.range_stop, self.widths))

    def children(self, row_offsets: torch.Tensor | None, col_offsets: torch.Tensor | None,
                 chunk_rows: int) -> RangePattern:
        """The pattern one level finer: a row (column) ``i`` of this pattern stands for the rows (columns)
        ``[offsets[i], offsets[i + 1])`` below it; None keeps that side as it is. Chunks longer than
        ``chunk_rows`` rows are split, each piece keeping the chunk's ranges."""
        start, stop, ptr = self.chunk_start, self.chunk_stop, self.range_ptr
        range_start, range_stop, n_rows, n_cols = self.range_start, self.range_stop, self.n_rows, self.n_cols
        if col_offsets is not None:
            dtype = index_dtype(int(col_offsets[-1]) + 1)
            range_start = col_offsets[range_start.long()].to(dtype)
            range_stop = col_offsets[range_stop.long()].to(dtype)
            n_cols = int(col_offsets[-1])
        if row_offsets is not None:
            start, stop, n_rows = row_offsets[start], row_offsets[stop], int(row_offsets[-1])
        pieces = torch.div(stop - start + chunk_rows - 1, chunk_rows, rounding_mode="floor")
        if bool((pieces > 1).any()):
            chunk = torch.repeat_interleave(torch.arange(len(start), device=start.device), pieces)
            first = torch.cumsum(pieces, 0) - pieces
            piece = torch.arange(len(chunk), device=start.device) - first[chunk]
            new_start = start[chunk] + piece * chunk_rows
            new_stop = torch.minimum(new_start + chunk_rows, stop[chunk])
            counts = (ptr[1:] - ptr[:-1])[chunk]
            ranges = expand_ranges(ptr[:-1][chunk], counts).long()
            ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            start, stop, range_start, range_stop = new_start, new_stop, range_start[ranges], range_stop[ranges]
        return RangePattern(start, stop, ptr, range_start, range_stop, n_rows, n_cols)


@dataclass(frozen=True)
class _Group:
    """Chunks of similar width stacked into one tile: ``chunks`` (k,) ids, their first rows (k,), row counts (k,),
    padded row count R and width W."""

    chunks: torch.Tensor
    first_row: torch.Tensor
    row_count: torch.Tensor
    rows: int
    width: int


def _plan_groups(pattern: RangePattern) -> list[_Group]:
    """Chunks sorted by width and cut into groups of ≤ ``_GROUP_ENTRIES`` stacked entries whose widths differ by at
    most ``_WIDTH_GROWTH``× (so that padding costs little)."""
    counts = pattern.chunk_stop - pattern.chunk_start
    order = torch.argsort(pattern.widths, stable=True)
    widths, rows = pattern.widths[order].tolist(), counts[order].tolist()
    groups, begin = [], 0
    while begin < len(order):
        end, first, most = begin + 1, widths[begin], rows[begin]
        while end < len(order):
            width, height = widths[end], max(most, rows[end])
            if width > _WIDTH_GROWTH * first + 32 or (end + 1 - begin) * height * width > _GROUP_ENTRIES:
                break
            most, end = height, end + 1
        ids = order[begin:end]
        groups.append(_Group(ids, pattern.chunk_start[ids], counts[ids], max(most, 1), max(widths[end - 1], 1)))
        begin = end
    return groups


def _expand_group(pattern: RangePattern, group: _Group) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices (k, W) of a group's chunks, padded with column 0, and the padding mask (k, W)."""
    ids = group.chunks
    ptr = pattern.range_ptr
    ranges = expand_ranges(ptr[ids], ptr[ids + 1] - ptr[ids]).long()
    starts = pattern.range_start[ranges]
    flat = expand_ranges(starts, pattern.range_stop[ranges] - starts)
    widths = pattern.widths[ids]
    k, width = len(ids), group.width
    shift = torch.arange(k, device=ids.device) * width - (torch.cumsum(widths, 0) - widths)
    position = torch.arange(len(flat), device=ids.device) + torch.repeat_interleave(shift, widths)
    cols = torch.zeros(k * width, dtype=flat.dtype, device=ids.device)
    cols[position] = flat
    padding = torch.arange(width, device=ids.device) >= widths.unsqueeze(-1)
    return cols.view(k, width), padding


def _group_rows(group: _Group) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (k, R) of a group (padded with each chunk's first row) and which of them are real (k, R)."""
    offsets = torch.arange(group.rows, device=group.first_row.device)
    valid = offsets < group.row_count.unsqueeze(-1)
    rows = group.first_row.unsqueeze(-1) + torch.where(valid, offsets, 0)
    return rows, valid


class RangeSoftmin(TiledSoftmin):
    """The softmin (and soft averages) of one problem over a :class:`RangePattern` (batch of one, B = 1).

    Each group's column indices point padding at a last, extra column (h = −∞ there), so that one gather gives
    the padded h. Within a ``cache_bytes`` budget (given to the refined patterns of the final blur, which serve
    many iterations on the same points — the solver changes only h between them) the groups' expanded column
    indices, and if they fit too their prepared tiles (:class:`~geomed.ot.softmin.TileGeometry`), are kept
    between calls. A call on the same points at the same ε as the previous one computes each row's logits minus
    its previous log-sum-exp, inside the matrix product, and reduces them in two passes fewer
    (:func:`geomed._spatial.shifted_logsumexp`); the rows whose log-sum-exp moved too far are recomputed.
    """

    name = "multiscale"

    def __init__(self, p: int, pattern: RangePattern, cache_bytes: int = 0):
        super().__init__(p)
        self.pattern = pattern
        self.kept = pattern.kept
        self._planned: list[_Group] | None = None
        self._cache_columns = self._cache_tiles = False
        if cache_bytes > 0:
            stacked = sum(len(group.chunks) * group.width for group in self._groups)
            rows = sum(len(group.chunks) * group.rows for group in self._groups)
            self._cache_columns = 4 * stacked <= cache_bytes
            self._cache_tiles = 4 * stacked + 20 * stacked + 20 * rows <= cache_bytes
        self._columns: list | None = None
        self._tiles_key: tuple | None = None
        self._tiles: list = []
        self._previous: tuple | None = None

    @property
    def _groups(self) -> list[_Group]:
        """The chunks' group plan, made on first use (the Triton kernels never need it)."""
        if self._planned is None:
            self._planned = _plan_groups(self.pattern)
        return self._planned

    def stacked_tiles(self):
        """(rows (k, R), valid rows (k, R), columns (k, W), padding (k, W)) of every group, in turn; padded
        columns point at column ``n_cols``."""
        if self._columns is not None:
            yield from self._columns
            return
        columns = []
        for group in self._groups:
            rows, valid = _group_rows(group)
            cols, padding = _expand_group(self.pattern, group)
            tile = rows, valid, cols.masked_fill_(padding, self.pattern.n_cols), padding
            if self._cache_columns:
                columns.append(tile)
            yield tile
        if self._cache_columns:
            self._columns = columns

    def tiles(self, b, n, m):
        for rows, valid, cols, padding in self.stacked_tiles():
            for k in range(len(rows)):
                yield rows[k][valid[k]], cols[k][~padding[k]]

    def _prepared(self, x, y):
        """(rows, valid, cols, tile geometry) of every group for the points x (1, N, D), y (1, M, D)."""
        key = (x.data_ptr(), y.data_ptr(), x._version, y._version, x.shape, y.shape, x.dtype)
        if self._cache_tiles and self._tiles_key == key:
            return self._tiles
        y_padded = torch.cat([y[0], y[0, :1]])
        prepared = ((rows, valid, cols, TileGeometry(x[0][rows], y_padded[cols], self.p))
                    for rows, valid, cols, _ in self.stacked_tiles())
        if self._cache_tiles:
            self._tiles, self._tiles_key = list(prepared), key
            return self._tiles
        return prepared

    def __call__(self, eps, x, y, h):
        key = (x.data_ptr(), y.data_ptr(), x._version, y._version, x.shape, y.shape, eps)
        previous = self._previous[1] if self._previous is not None and self._previous[0] == key else None
        out = torch.empty(x.shape[1], dtype=x.dtype, device=x.device)
        h_padded = torch.cat([h[0], h.new_full((1,), -math.inf)])
        for rows, valid, cols, tile in self._prepared(x, y):
            h_tile = h_padded[cols]
            if previous is None:
                lse = tile_logsumexp(tile.logits(h_tile, eps))
            else:
                shift = previous[rows]
                lse, served = shifted_logsumexp(tile.logits(h_tile, eps, shift), shift)
                if not bool(served[valid].all()):
                    lse = tile_logsumexp(tile.logits(h_tile, eps))
            out[rows[valid]] = lse[valid]
        self._previous = (key, out.clone())
        return out.mul_(-eps).unsqueeze(0)

    def average(self, eps, x, y, h, softmin, values):
        out = torch.empty(*x.shape[:-1], values.shape[-1], dtype=x.dtype, device=x.device)
        lse = -softmin[0] / eps
        h_padded = torch.cat([h[0], h.new_full((1,), -math.inf)])
        values_padded = torch.cat([values[0], values.new_zeros(1, values.shape[-1])])
        for rows, valid, cols, tile in self._prepared(x, y):
            logits = tile.logits(h_padded[cols], eps, lse[rows])
            out[0, rows[valid]] = tile_average(logits, None, values_padded[cols])[valid]
        return out


def runs_to_pattern(keep: torch.Tensor, cols: torch.Tensor, chunk_start: torch.Tensor, chunk_stop: torch.Tensor,
                    n_rows: int, n_cols: int, gap: int = 0) -> RangePattern:
    """A pattern from kept columns: ``keep`` (K, W) marks which of each chunk's candidate columns ``cols`` (K, W)
    (ascending along W where kept) to keep; runs of kept columns separated by at most ``gap`` columns become one
    range (the columns in the gap are added: a few more entries for fewer ranges)."""
    chunk, position = keep.nonzero(as_tuple=True)
    values = cols[chunk, position].long()
    if len(values):
        new = torch.ones_like(values, dtype=torch.bool)
        new[1:] = (chunk[1:] != chunk[:-1]) | (values[1:] - values[:-1] > gap + 1)
        first = new.nonzero().squeeze(-1)
        last = torch.cat([first[1:] - 1, first.new_tensor([len(values) - 1])])
        starts, stops, owner = values[first], values[last] + 1, chunk[first]
    else:
        starts = stops = owner = chunk
    counts = torch.bincount(owner, minlength=len(keep))
    dtype = index_dtype(n_cols + 1)
    return RangePattern(chunk_start, chunk_stop, torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
                        starts.to(dtype), stops.to(dtype), n_rows, n_cols)


def concatenate(patterns: list[RangePattern]) -> RangePattern:
    """One pattern from patterns over disjoint chunks of the same rows and columns."""
    first = patterns[0]
    counts = torch.cat([p.range_ptr[1:] - p.range_ptr[:-1] for p in patterns])
    return RangePattern(torch.cat([p.chunk_start for p in patterns]), torch.cat([p.chunk_stop for p in patterns]),
                        torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
                        torch.cat([p.range_start for p in patterns]), torch.cat([p.range_stop for p in patterns]),
                        first.n_rows, first.n_cols)
