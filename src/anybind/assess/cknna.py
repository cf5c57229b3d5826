"""CKNNA for every layer pair from neighbour lists alone: no n x n matrix is ever built.

`anybind.assess.metrics.cknna` is HSIC_u(M*K, M*L) / sqrt(HSIC_u(Mx*K, Mx*K) HSIC_u(My*L, My*L))
with K = X X^T, L = Y Y^T, the 0/1 masks Mx_ij = [j in N_x(i)], My_ij = [j in N_y(i)],
M = Mx * My, and the unbiased HSIC of `metrics.hsic_unbiased_sums`:

    HSIC_u(A, B) = [sum_ij A_ij B_ji + sum(A) sum(B) / ((n-1)(n-2)) - 2 (1^T A)(B 1) / (n-2)] / (n(n-3))

The neighbour lists exclude each item itself, so every masked diagonal is already zero. With
A = M*K, B = M*L, each term is a sum over the matched pairs (i, j) (j in N_x(i) and in N_y(i),
at most n k of them), and needs only K_ij and L_ij:

* sum(A) = sum over matched (i, j) of K_ij; sum(B) likewise of L_ij;
* (1^T A)(B 1) = sum_j c_j r_j, c_j = sum_i A_ij (scatter-add of K_ij at j), r_i = sum_j B_ij;
* sum_ij A_ij B_ji = sum over matched (i, j) whose reverse (j, i) is also matched of K_ij L_ij
  (L symmetric). (j, i) is matched when i in N_x(j) and i in N_y(j): the product of two
  per-layer flags ("reciprocal in x", "reciprocal in y"), so no pair-level lookup is needed.

Per layer (once): its [n, k] neighbour lists (`metrics.nearest_neighbors`), the k similarities to
them (float64 dot products of gathered rows, O(n k d)), and the reciprocity flags (edges i n + j
sorted, reverses looked up: O(n k log(n k))). Per pair: row i's x-list is looked up in its
sorted y-list (searchsorted, O(k log k) per row), vectorised over [A x layers, B y layers,
rows, k] in row blocks so every temporary stays ~2^20 elements, plus [A, B, n] column and row
sums. The self terms HSIC_u(Mx*K, Mx*K) are the same sums with every
neighbour matched. Results equal `metrics.cknna` pair by pair up to float rounding.
"""

from __future__ import annotations

import numpy as np
import torch

import anybind.assess.metrics as M
from anybind.errors import AnybindError

_BLOCK = 1 << 20  # elements per [A, B, rows, k] temporary (8 MiB in float64)
_GATHER_BLOCK = 1 << 19  # gathered neighbour features at once (4 MiB: measured fastest here)


def batched_cknna(
    fxs: list[torch.Tensor], fys: list[torch.Tensor], k: int | str = 10
) -> np.ndarray:
    """[len(fxs), len(fys)] CKNNA scores of prepared layers (float64, L2-normalised rows).

    Equal to ``metrics.cknna(x, y, k)`` on every layer pair. Beyond each layer's neighbour search
    (O(n^2 d), done once per layer): O(n k (d + log(n k))) per layer and O(n k log k) per pair
    in time, O(n k) per layer plus ~2^20-element blocks in memory.
    """
    n = fxs[0].shape[0]
    kk = M.knn_k(n, k)
    if kk < 2:
        raise AnybindError("CKNNA needs k >= 2 (as platonic-rep): use a larger k")
    M._need_n(n, 4, "CKNNA")
    xs = _stack([neighbour_terms(f, kk) for f in fxs])
    ys = _stack([neighbour_terms(f, kk) for f in fys])
    sx = self_hsic(*xs, n).tolist()
    sy = self_hsic(*ys, n).tolist()
    cross = cross_hsic(xs, ys, n)
    out = np.empty((len(fxs), len(fys)))
    for a in range(len(fxs)):
        for b in range(len(fys)):
            out[a, b] = M._ratio(float(cross[a, b]), sx[a], sy[b])
    return out


def _stack(per_layer: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(parts) for parts in zip(*per_layer))


def neighbour_terms(f: torch.Tensor, kk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's neighbour lists nb [n, k], similarities sim[i, p] = f_i . f_nb[i,p] (float64),
    and reciprocity recip[i, p] = (i in nb[nb[i, p]]); similarities gathered in row blocks."""
    n, d = f.shape
    nb = M.nearest_neighbors(f, kk)
    f64 = f.to(torch.float64)
    sim = torch.empty(n, kk, dtype=torch.float64)
    step = max(1, _GATHER_BLOCK // (kk * d))
    buffer = torch.empty(step * kk, d, dtype=torch.float64)  # reused: no page faults per block
    for s in range(0, n, step):
        e = min(n, s + step)
        near = torch.index_select(f64, 0, nb[s:e].reshape(-1), out=buffer[: (e - s) * kk])
        near = near.view(e - s, kk, d).mul_(f64[s:e, None, :])
        torch.sum(near, dim=2, out=sim[s:e])
    return nb, sim, reciprocal(nb)


def reciprocal(nb: torch.Tensor) -> torch.Tensor:
    """[n, k] flags: i is among the neighbours of its neighbour nb[i, p].

    The edges (i, j) are encoded as i n + j and sorted; (j, i) is then looked up by searchsorted,
    O(n k log(n k)) time and O(n k) memory.
    """
    n = nb.shape[0]
    rows = torch.arange(n)[:, None]
    edges = (rows * n + nb).reshape(-1).sort().values
    reverse = (nb * n + rows).reshape(-1)
    pos = torch.searchsorted(edges, reverse).clamp_(max=edges.numel() - 1)
    return (edges[pos] == reverse).view_as(nb)


def self_hsic(nb: torch.Tensor, sim: torch.Tensor, recip: torch.Tensor, n: int) -> torch.Tensor:
    """[L] HSIC_u(Mx*K, Mx*K) for stacked layers nb, sim, recip [L, n, k]: every neighbour is
    matched, so sum(A) = sum(sim), r = row sums of sim, c = sim scattered to its columns."""
    layers = nb.shape[0]
    offsets = (torch.arange(layers) * n)[:, None, None]
    col = torch.zeros(layers * n, dtype=torch.float64)
    col.index_add_(0, (nb + offsets).reshape(-1), sim.reshape(-1))
    row = sim.sum(dim=2)
    total = row.sum(dim=1)
    tr = (sim * sim * recip).sum(dim=(1, 2))
    dot = (col.view(layers, n) * row).sum(dim=1)
    return M.hsic_unbiased_sums(tr, total, total, dot, n)


def cross_hsic(xs: tuple[torch.Tensor, ...], ys: tuple[torch.Tensor, ...], n: int) -> torch.Tensor:
    """[A, B] HSIC_u(M*K, M*L) for every x layer a against every y layer b.

    Row i's x-neighbours are looked up in its sorted y-list; a hit at x position p (neighbour j)
    gives K_ij = sim_x[i, p] and L_ij = sim_y at the found position. Rows go in blocks of
    ~_BLOCK / (A B k) so every [A, B, rows, k] temporary stays small.
    """
    nx, kx, rx = xs
    ny, ly, ry = ys
    n_a, n_b, kk = nx.shape[0], ny.shape[0], nx.shape[2]
    ny_sorted, order = ny.sort(dim=2)
    ly_sorted = ly.gather(2, order)
    lr_sorted = (ly * ry).gather(2, order)  # L_ij where i is also a y-neighbour of j
    kxr = kx * rx  # K_ij where i is also an x-neighbour of j
    offsets = (torch.arange(n_a * n_b) * n).view(n_a, n_b, 1, 1)
    col = torch.zeros(n_a * n_b * n, dtype=torch.float64)
    row = torch.empty(n_a, n_b, n, dtype=torch.float64)
    tr = torch.zeros(n_a, n_b, dtype=torch.float64)
    sum_a = torch.zeros(n_a, n_b, dtype=torch.float64)
    step = max(1, _BLOCK // (n_a * n_b * kk))
    for s in range(0, n, step):
        e = min(n, s + step)
        shape = (n_a, n_b, e - s, kk)
        q = nx[:, None, s:e].expand(shape)
        seq = ny_sorted[None, :, s:e].expand(shape).contiguous()
        pos = torch.searchsorted(seq, q.contiguous()).clamp_(max=kk - 1)
        hit = seq.gather(3, pos) == q
        l_hit = ly_sorted[None, :, s:e].expand(shape).gather(3, pos) * hit
        lr_hit = lr_sorted[None, :, s:e].expand(shape).gather(3, pos) * hit
        k_hit = kx[:, None, s:e] * hit
        tr += (kxr[:, None, s:e] * lr_hit).sum(dim=(2, 3))
        sum_a += k_hit.sum(dim=(2, 3))
        row[:, :, s:e] = l_hit.sum(dim=3)
        col.index_add_(0, (q + offsets).reshape(-1), k_hit.reshape(-1))
    dot = (col.view(n_a, n_b, n) * row).sum(dim=2)
    return M.hsic_unbiased_sums(tr, sum_a, row.sum(dim=2), dot, n)
