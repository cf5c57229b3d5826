"""STRUCTURE (Gröger et al., 2025): a regulariser that keeps a projector's output neighbourhoods
like its frozen input's, added to any contrastive loss.

`structure_regulariser` is the term; `StructureRegulariser` holds its settings and the warm-up of
its weight (lambda) for a training loop. With one level and a frozen input (the training case) it
takes a fast path: the frozen side without autograd, symmetric Gram matrices computed once per
tile pair, and a hand-written backward that reuses the forward's B x B buffers, with the same
value and gradient as the general path (tests/test_align_losses_speed.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import choice, integer, number, positive
from ..errors import AnybindError
from .blocks import add_transpose_, fp32, gram_logits, row_blocks, row_dots, softmax_rows_

#: STRUCTURE's default softmax temperature. The authors' code uses the contrastive loss's own
#: temperature for it, and their tuned configurations set that to 0.05 (with lambda 10).
STRUCTURE_TAU = 0.05


def structure_regulariser(
    x: Tensor,
    z: Tensor,
    *,
    levels: int = 1,
    tau: float = STRUCTURE_TAU,
    level_weighting: str = "uniform",
    max_batch: int = 4096,
    generator: torch.Generator | None = None,
) -> Tensor:
    """STRUCTURE (Gröger et al., 2025): keep the projected batch's neighbourhoods like the input's.

    For frozen features ``x`` [B, Dx] and their projections ``z`` [B, Dz] (rows paired), each is
    L2-normalised, then mean-centred over the batch (the authors' order); with ``S = Y Y^T``
    (the diagonal kept, as in the authors' code) and ``P = softmax_rows(S / tau)``, the term is::

        sum_l w_l * mean_i JS( P_x^l[i] || P_z^l[i] ),   l = 1..levels,   sum_l w_l = 1

    where ``P^l`` is the l-step random walk (matrix power) and ``w_l`` is uniform or
    proportional to 1/l (``level_weighting="inverse"``). It is 0 when ``z`` keeps the geometry
    (``z = c x Q`` for an orthogonal ``Q``, any scale ``c > 0``, or rows rescaled). Cost is
    O(B^2 D) plus O(B^3) per extra level, so a batch larger than ``max_batch`` is replaced by a
    random sub-batch of ``max_batch`` rows: ``torch.randperm(B, generator=generator)[:max_batch]``.
    Computed in fp32 whatever autocast says. With one level and a frozen ``x`` (the training
    case) it takes `_structure_one_level`'s fast path: the same value and gradient.
    """
    levels, tau, weights, max_batch = _structure_settings(levels, tau, level_weighting, max_batch)
    if x.ndim != 2 or z.ndim != 2 or x.shape[0] != z.shape[0]:
        raise AnybindError(
            f"structure: x and z must be [B, D] matrices with the same rows, got {tuple(x.shape)} "
            f"and {tuple(z.shape)}"
        )
    if x.shape[0] < 2:
        raise AnybindError(
            "structure: needs a batch of at least 2 rows (it compares neighbourhoods)"
        )
    if x.shape[0] > max_batch:
        keep = torch.randperm(x.shape[0], generator=generator)[:max_batch].to(x.device)
        x, z = x[keep], z[keep.to(z.device)]
    with fp32():
        if levels == 1 and not x.requires_grad:
            return _structure_one_level(x.float(), z.float(), tau)
        p_x = _random_walk(x.float(), tau)
        p_z = _random_walk(z.float(), tau)
        total = z.new_zeros((), dtype=torch.float32)
        step_x, step_z = p_x, p_z
        for level, w in enumerate(weights, start=1):
            if level > 1:
                step_x, step_z = step_x @ p_x, step_z @ p_z
            total = total + w * _js_rows(step_x, step_z).mean()
        return total


class StructureRegulariser(nn.Module):
    """`structure_regulariser` with its settings held, for a training loop.

    ``weight`` (lambda; 0 = off) and ``warmup_steps`` are the schedule read by `weight(step)`,
    the linearly warmed-up lambda (STRUCTURE's recipe: lambda 10, warmed up so the contrastive
    loss shapes the space first); the other options are `structure_regulariser`'s. A recipe sets
    them as ``loss.structure_<option>``.
    """

    def __init__(
        self,
        *,
        weight: float = 0.0,
        levels: int = 1,
        tau: float = STRUCTURE_TAU,
        level_weighting: str = "uniform",
        warmup_steps: int = 0,
        max_batch: int = 4096,
    ):
        super().__init__()
        self.levels, self.tau, _, self.max_batch = _structure_settings(
            levels, tau, level_weighting, max_batch
        )
        self.level_weighting = level_weighting
        self.lam = number("structure: weight", weight, minimum=0)
        self.warmup_steps = integer("structure: warmup_steps", warmup_steps, minimum=0)

    def weight(self, step: int) -> float:
        """Lambda at a (0-based) training step."""
        return warmup_weight(step, self.lam, self.warmup_steps)

    def forward(self, x: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return structure_regulariser(
            x,
            z,
            levels=self.levels,
            tau=self.tau,
            level_weighting=self.level_weighting,
            max_batch=self.max_batch,
            generator=generator,
        )

    def extra_repr(self) -> str:
        return (
            f"weight={self.lam}, levels={self.levels}, tau={self.tau}, "
            f"level_weighting={self.level_weighting}, warmup_steps={self.warmup_steps}, "
            f"max_batch={self.max_batch}"
        )


def warmup_weight(step: int, lam: float, warmup_steps: int) -> float:
    """``lam * min(1, step / warmup_steps)``: 0 at step 0, `lam` from `warmup_steps` on."""
    if step < 0 or warmup_steps < 0:
        raise AnybindError(
            f"warmup_weight: step and warmup_steps must be >= 0, got {step} and {warmup_steps}"
        )
    if warmup_steps == 0:
        return float(lam)
    return float(lam) * min(1.0, step / warmup_steps)


def _structure_settings(
    levels: Any, tau: Any, level_weighting: Any, max_batch: Any
) -> tuple[int, float, list[float], int]:
    """The checked settings: levels, tau, the per-level weights, max_batch."""
    levels = integer("structure: levels", levels, minimum=1)
    tau = positive("structure: tau", tau)
    weights = _level_weights(levels, level_weighting)
    max_batch = integer("structure: max_batch", max_batch, minimum=2)
    return levels, tau, weights, max_batch


def _random_walk(y: Tensor, tau: float) -> Tensor:
    """Row-stochastic P = softmax_rows(Y Y^T / tau) of L2-normalised, batch-centred rows."""
    y = _centred_rows(y)
    return torch.softmax((y @ y.T) / tau, dim=-1)


# The one-level fast path: the frozen side without autograd, symmetric Grams computed once per
# tile pair, and a hand-written backward that reuses the forward's B x B buffers in place.
def _structure_one_level(x: Tensor, z: Tensor, tau: float) -> Tensor:
    """``mean_i JS(P_x[i] || P_z[i])`` (levels 1): `structure_regulariser`'s value and gradient
    w.r.t. `z`, for an `x` that needs no gradient."""
    with torch.no_grad():
        p = softmax_rows_(gram_logits(_centred_rows(x), tau))
    return _OneLevelJS.apply(_centred_rows(z), p, tau)


def _centred_rows(y: Tensor) -> Tensor:
    """L2-normalised rows, then centred over the batch (the authors' order)."""
    y = F.normalize(y, dim=-1)
    return y - y.mean(dim=0, keepdim=True)


class _OneLevelJS(torch.autograd.Function):
    """``mean_i max(0, JS(p_i || q_i))`` with ``q = softmax_rows(Y Y^T / tau)``, from the centred
    rows ``Y``; `p` is constant, and its buffer is reused (the caller's `p` is consumed).

    With ``m = (p + q) / 2`` and ``d = log q - log m``, ``dJS_i / dq_ij = d_ij / 2`` (the terms
    through ``m`` cancel), so through the softmax ``dJS_i / dlogit_ij = q_ij (d_ij - q_i . d_i) / 2``
    and ``dY = (G + G^T) Y / tau`` for that logit gradient ``G``. Logs are of values clamped to
    the smallest normal float, and a zero probability adds nothing, as in `_js_rows`.
    """

    @staticmethod
    def forward(ctx, y: Tensor, p: Tensor, tau: float) -> Tensor:
        q = softmax_rows_(gram_logits(y, tau))
        js, q_d = y.new_empty(y.shape[0]), y.new_empty(y.shape[0])
        for start, q_rows in row_blocks(q):
            rows = slice(start, start + q_rows.shape[0])
            js[rows], q_d[rows], p[rows] = _js_block(p[rows], q_rows)  # p's rows now hold d
        kept = js >= 0  # clamp_min(0)'s gradient mask: rounding can dip below 0
        ctx.save_for_backward(y, q, p, q_d, kept)
        ctx.tau, ctx.used = tau, False
        return js.clamp_min(0.0).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:
        if ctx.used:  # d is turned into the logit gradient in place
            raise AnybindError("structure: the one-level fast path supports one backward pass")
        ctx.used = True
        y, q, d, q_d, kept = ctx.saved_tensors
        with fp32():
            weight = kept.to(q.dtype)[:, None]
            for start, block in row_blocks(d):
                rows = slice(start, start + block.shape[0])
                block.sub_(q_d[rows, None]).mul_(q[rows]).mul_(weight[rows])
            scale = grad * (0.5 / (y.shape[0] * ctx.tau))
            return (add_transpose_(d) @ y) * scale, None, None


def _js_block(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For these rows: JS(p || q) (unclamped), q . d and d = log q - log m."""
    tiny = torch.finfo(q.dtype).tiny
    log_m = torch.lerp(p, q, 0.5).clamp_min_(tiny).log_()
    p_to_m = row_dots(p, torch.clamp_min(p, tiny).log_().sub_(log_m))  # KL(p || m)
    d = torch.clamp_min(q, tiny).log_().sub_(log_m)
    q_d = row_dots(q, d)  # KL(q || m)
    return 0.5 * (p_to_m + q_d), q_d, d


def _js_rows(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence (natural log) between matching rows of two row-stochastic matrices."""
    m = 0.5 * (p + q)
    tiny = torch.finfo(p.dtype).tiny
    log_m = m.clamp_min(tiny).log()

    def kl_to_m(a: Tensor) -> Tensor:  # 0 * log 0 = 0
        return torch.where(a > 0, a * (a.clamp_min(tiny).log() - log_m), torch.zeros_like(a)).sum(
            dim=-1
        )

    return (0.5 * (kl_to_m(p) + kl_to_m(q))).clamp_min(0.0)  # rounding can dip below 0


#: Per-level weights before normalising: uniform (1) or inverse (1/l).
_LEVEL_WEIGHTINGS: dict[str, Callable[[int], float]] = {
    "uniform": lambda level: 1.0,
    "inverse": lambda level: 1.0 / level,
}


def _level_weights(levels: int, level_weighting: str) -> list[float]:
    choice("structure: level_weighting", level_weighting, _LEVEL_WEIGHTINGS)
    raw = [_LEVEL_WEIGHTINGS[level_weighting](level) for level in range(1, levels + 1)]
    return [w / sum(raw) for w in raw]
