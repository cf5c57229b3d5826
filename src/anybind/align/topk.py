"""The k largest scores of each row, with ties broken by the lowest column; scores against a bank
whose duplicate rows tie exactly.

`torch.topk` and `numpy.argpartition` each choose arbitrarily among equal scores, and a bank of
training images holds exact duplicates (openclipart: 1,887 of 6,937 rows), so a query's k-th and
(k+1)-th neighbours tie often (134 of 761 test queries on fold 0). Which duplicate is kept
decides which captions are transferred, so the choice must be a rule, the same in the model and in
the torch-free runtime (`anybind.runtime.blend` applies the same one): the lowest column wins. And
the copies must tie in both: a matrix product can give two equal rows scores one ulp apart, so
`bank_top_k` scores each distinct row once and gives every copy that score.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

BLOCK_FLOATS = 1 << 25  # scores of one block of queries x bank rows (128 MiB)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, columns) of the k largest of each row of `scores` [b, n], largest first; among
    equal scores the lowest column comes first, so the set chosen does not depend on the kernel."""
    if k >= scores.shape[1]:
        return torch.sort(scores, dim=1, descending=True, stable=True)
    values, columns = _canonical(*scores.topk(k + 1, dim=1))
    tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
    if len(tied):  # the k-th place is contested: settle those rows by a stable sort of the whole row
        sorted_values, sorted_columns = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        values[tied], columns[tied] = sorted_values[:, : k + 1], sorted_columns[:, : k + 1]
    return values[:, :k], columns[:, :k]


def _canonical(values: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same entries ordered by value descending, then column ascending."""
    by_column = columns.argsort(dim=1)
    values, columns = values.gather(1, by_column), columns.gather(1, by_column)
    by_value = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_value), columns.gather(1, by_value)


def _equal_row_runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): an order of the rows of `x` [n, d] (n > 0) in which equal rows are adjacent,
    copies in ascending row order; and whether each position starts a run of equal rows.

    Rows are sorted by a 64-bit hash of their values (a 1-d sort), and rows sharing a hash are
    compared whole. ``torch.unique(dim=0)`` sorts every row lexicographically: 81 s at 10M rows of
    32 against 2 s at 1M; sorting by the first column ties ever more rows as n grows (float32 has
    few values). Values compare as floats (-0.0 equals 0.0; finite rows assumed)."""
    hashes = _row_hashes(x)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    starts = np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]]
    tied = np.flatnonzero(~starts)  # positions whose row shares its hash with the one before
    if len(tied):
        run = np.cumsum(starts) - 1
        differs = np.any(x[order[tied]] != x[order[np.flatnonzero(starts)[run[tied]]]], axis=1)
        if differs.any():  # distinct rows with one hash (chance about n^2 / 2^65): sort those runs whole
            collided = np.isin(run, run[tied[differs]])
            at = np.flatnonzero(collided)
            rows = x[order[at]]
            within = np.lexsort((*rows.T[::-1], run[at]))  # stable: copies stay in row order
            order[at], rows = order[at][within], rows[within]
            starts[at[1:]] |= np.any(rows[1:] != rows[:-1], axis=1)
    return order, starts


def _row_hashes(x: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """A 64-bit hash a row: its values' bits (-0.0 as 0.0) times fixed odd multipliers, summed."""
    multipliers = np.random.default_rng(0).integers(1, 2**63, size=x.shape[1], dtype=np.uint64) | np.uint64(1)
    out = np.empty(len(x), dtype=np.uint64)
    for start in range(0, len(x), block):
        bits = (x[start:start + block] + x.dtype.type(0)).view(f"u{x.dtype.itemsize}").astype(np.uint64)
        out[start:start + block] = (bits * multipliers).sum(axis=1, dtype=np.uint64)  # wraps modulo 2^64
    return out


class Bank(NamedTuple):
    """A non-empty bank [n, d] for `bank_top_k`: its distinct rows in the order of their first copy, each bank
    row's position among them, and each distinct row's copies (`columns[starts[u]:][:counts[u]]`,
    ascending)."""

    rows: torch.Tensor
    inverse: torch.Tensor
    columns: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def of(cls, bank: torch.Tensor) -> Bank:
        x = bank.detach().cpu().contiguous().numpy()
        order, starts = _equal_row_runs(x)
        begin = np.flatnonzero(starts)  # each run's first sorted position: its first copy, order[begin]
        counts = np.diff(np.r_[begin, len(x)])
        by_first = np.argsort(order[begin])  # runs in the order of their first copies
        rank = np.empty(len(begin), dtype=np.int64)
        rank[by_first] = np.arange(len(begin))
        run_of = np.cumsum(starts) - 1  # per sorted position
        inverse = np.empty(len(x), dtype=np.int64)
        inverse[order] = rank[run_of]
        first_slot = np.cumsum(counts[by_first]) - counts[by_first]  # per rank
        columns = np.empty(len(x), dtype=np.int64)  # each run's copies in row order, runs by rank
        columns[first_slot[rank[run_of]] + np.arange(len(x)) - begin[run_of]] = order
        rows = x[np.sort(order[begin])]  # gathered in ascending row order
        return cls(*(torch.from_numpy(a) for a in (rows, inverse, columns, first_slot, counts[by_first])))


def bank_top_k(queries: torch.Tensor, bank: Bank, k: int, block: int = BLOCK_FLOATS) -> tuple[torch.Tensor, torch.Tensor]:
    """``top_k`` of the queries' scores against every bank row, each copy given its distinct row's
    score (``(queries @ bank.rows.T)[:, bank.inverse]``), without the [b, n] scores: the distinct rows are
    scored a block at a time, keeping the k best so far by (score, first copy), one pass over the
    bank (blocks of queries would pass over it once a block: traffic quadratic in n). The k best
    columns are copies of those k rows: a row beaten by k others by score or by first copy cannot
    hold one of the k lowest columns among the best scores."""
    kk = min(k, len(bank.rows))
    values = torch.empty(len(queries), 0, dtype=queries.dtype)
    rows = torch.empty(len(queries), 0, dtype=torch.int64)
    step = max(1, block // max(1, len(queries)))
    for start in range(0, len(bank.rows), step):
        v, r = top_k(queries @ bank.rows[start:start + step].T, min(kk, len(bank.rows) - start))
        values, rows = _canonical(torch.cat([values, v], 1), torch.cat([rows, r + start], 1))
        values, rows = values[:, :kk], rows[:, :kk]
    return _copies_top_k(values, rows, bank, k, block)


def _copies_top_k(values: torch.Tensor, rows: torch.Tensor, bank: Bank, k: int,
                  block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score, column) among the copies of each query's best distinct `rows`."""
    out_values = torch.empty(len(rows), k, dtype=values.dtype)
    out_columns = torch.empty(len(rows), k, dtype=torch.int64)
    if not len(rows):
        return out_values, out_columns
    offsets = torch.arange(min(k, int(bank.counts[rows].max())))
    step = max(1, block // (rows.shape[1] * len(offsets)))
    for start in range(0, len(rows), step):
        part = slice(start, start + step)
        have = offsets < bank.counts[rows[part]][..., None]  # [b, k, copies]: the first copies of each row
        at = (bank.starts[rows[part]][..., None] + offsets).clamp(max=len(bank.columns) - 1)
        columns = torch.where(have, bank.columns[at], len(bank.columns)).flatten(1)
        v, c = _canonical(torch.where(have, values[part, :, None], -torch.inf).flatten(1), columns)
        out_values[part], out_columns[part] = v[:, :k], c[:, :k]
    return out_values, out_columns
