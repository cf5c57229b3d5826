"""Passes over B x B matrices (a batch's logits or Gram matrix) in cache-sized blocks of rows.

The losses' fast paths (InfoNCE from one logits matrix, STRUCTURE's one level) do their
elementwise work block by block, so each pass reads a block already in the CPU's cache instead of
streaming the whole matrix from memory once per operation, and they compute symmetric products
once per tile pair. Each helper here is equal to the plain torch expression named in its docstring
(tests/test_align_losses_speed.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor


@contextmanager
def fp32() -> Iterator[None]:
    """Disable autocast (CPU and CUDA) for the block: the losses are computed in fp32."""
    with ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
        yield


#: Elements in a block of rows of a B x B matrix (4 MB of fp32) that the elementwise passes work
#: through in a CPU's cache, instead of streaming the whole matrix from memory once per pass
#: (large enough that the per-op overhead stays small: 1/4 to 16 MB measured the same).
BLOCK_ELEMENTS = 1 << 20


def row_blocks(m: Tensor) -> Iterator[tuple[int, Tensor]]:
    """(first row, view) of the blocks of rows of `m`, each about `BLOCK_ELEMENTS` large (one
    block off the CPU: an accelerator streams the whole matrix faster than it launches kernels)."""
    step = max(1, BLOCK_ELEMENTS // max(1, m.shape[1])) if m.device.type == "cpu" else m.shape[0]
    for start in range(0, m.shape[0], step):
        yield start, m[start:start + step]


def softmax_rows_(m: Tensor) -> Tensor:
    """Row softmax in place, block by block."""
    for _, block in row_blocks(m):
        block.copy_(torch.softmax(block, dim=1))
    return m


#: Rows per strip of a symmetric Gram's product, and the side of the tiles transposed in place:
#: small tiles, as a whole-row transpose (a power-of-two row stride) thrashes the cache.
GRAM_STRIP, TILE = 512, 256


def gram_logits(y: Tensor, tau: float) -> Tensor:
    """``(Y Y^T) / tau``: each strip of rows times the rows from its own on, the rest mirrored
    (the matrix is symmetric), which is about half the FLOPs of the full product."""
    n = y.shape[0]
    out = y.new_empty(n, n)
    for start in range(0, n, GRAM_STRIP):
        strip = out[start:start + GRAM_STRIP, start:]
        torch.addmm(strip, y[start:start + GRAM_STRIP], y[start:].T, beta=0, alpha=1 / tau, out=strip)
    for a in range(0, n, TILE):  # mirror the tiles below the diagonal
        for b in range(a + TILE, n, TILE):
            out[b:b + TILE, a:a + TILE].copy_(out[a:a + TILE, b:b + TILE].T)
    return out


def add_transpose_(m: Tensor) -> Tensor:
    """``m <- m + m^T`` in place, tile by tile (a whole-matrix transpose reads memory badly)."""
    n = m.shape[0]
    for a in range(0, n, TILE):
        for b in range(a, n, TILE):
            upper, lower = m[a:a + TILE, b:b + TILE], m[b:b + TILE, a:a + TILE]
            both = upper + lower.T
            upper.copy_(both)
            lower.copy_(both.T)
    return m


def row_dots(a: Tensor, b: Tensor) -> Tensor:
    return torch.einsum("ij,ij->i", a, b)
