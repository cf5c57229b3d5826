"""Losses on embeddings (never on models), so each one is testable on random tensors.

* `InfoNCE`: symmetric contrastive loss with a learnable, clamped temperature.
* `SigLIP`: pairwise sigmoid loss with a learnable scale and bias.
* `structure_regulariser` / `StructureRegulariser`: STRUCTURE's term that keeps a projector's
  output neighbourhoods like its frozen input's.

Both contrastive losses take an optional boolean ``pos`` matrix (``pos[i, j]``: ``za[i]`` and
``zb[j]`` are a positive pair), so several captions of one image in a batch all count as
positives, and a ``chunk_size`` that computes the logits in row chunks under activation
checkpointing: a 32k x 32k batch on a CPU needs O(chunk x B) memory instead of 4 GB, with the
same value and gradients. They work in fp32 whatever autocast says: a bf16 logit at scale 100
is off by up to about 0.4.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import AnybindError

#: InfoNCE's logit scale (1 / temperature) is clamped to this range, as in CLIP.
MIN_LOGIT_SCALE, MAX_LOGIT_SCALE = 1.0, 100.0

#: STRUCTURE's default softmax temperature. The authors' code uses the contrastive loss's own
#: temperature for it, and their tuned configurations set that to 0.05 (with lambda 10).
STRUCTURE_TAU = 0.05


# ---- contrastive losses ----------------------------------------------------------------------------
class InfoNCE(nn.Module):
    """Symmetric InfoNCE (CLIP's loss) with a learnable temperature and several positives per row.

    Per row i of the a -> b direction::

        loss_i = -log( sum_{j in pos(i)} exp(l_ij) / sum_j exp(l_ij) ),   l_ij = s * <a_i, b_j>

    with ``a``, ``b`` L2-normalised and ``s = 1 / temperature`` clamped to [1, 100]; the loss is
    the mean over rows, averaged over the a -> b and b -> a (``pos.T``) directions.

    >>> loss = InfoNCE(temperature=0.07)(za, zb)          # row i of za pairs with row i of zb
    """

    def __init__(
        self,
        *,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__()
        temperature = _number("infonce", "temperature", temperature)
        if not 1.0 / MAX_LOGIT_SCALE <= temperature <= 1.0 / MIN_LOGIT_SCALE:
            raise AnybindError(
                f"infonce: temperature must be in [{1 / MAX_LOGIT_SCALE:g}, {1 / MIN_LOGIT_SCALE:g}] "
                f"(logit scale 1..100), not {temperature}"
            )
        self.learn_temperature = _flag("infonce", "learn_temperature", learn_temperature)
        self.chunk_size = _chunk("infonce", chunk_size)
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if self.learn_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    def logit_scale(self) -> Tensor:
        """The clamped logit scale ``s = 1 / temperature`` in use."""
        return self.log_logit_scale.clamp(
            math.log(MIN_LOGIT_SCALE), math.log(MAX_LOGIT_SCALE)
        ).exp()

    def temperature_value(self) -> float:
        """The current temperature, for logs."""
        return float(1.0 / self.logit_scale().detach())

    def forward(self, za: Tensor, zb: Tensor, pos: Tensor | None = None) -> Tensor:
        with _fp32():
            a, b = _normalised_pair("infonce", za, zb)
            pos = _check_pos("infonce", pos, a, b)
            scale = self.logit_scale().float()
            a_to_b = _chunked_mean(_infonce_rows, a, b, scale, pos, self.chunk_size)
            b_to_a = _chunked_mean(
                _infonce_rows, b, a, scale, None if pos is None else pos.T, self.chunk_size
            )
            return 0.5 * (a_to_b + b_to_a)


class SigLIP(nn.Module):
    """SigLIP's pairwise sigmoid loss with a learnable scale ``t`` and bias ``b``::

        loss = -(1/B) sum_{i,j} log sigmoid( z_ij * (t * <a_i, b_j> + b) )

    with ``z_ij = +1`` for positives (``pos``; default the diagonal), -1 otherwise, ``a``, ``b``
    L2-normalised, ``t`` stored as ``log t``. The paper's initialisation ``t = 10, b = -10``
    starts the loss near the 1:B balance of positives and negatives.
    """

    def __init__(
        self,
        *,
        scale_init: float = 10.0,
        bias_init: float = -10.0,
        learn_scale_bias: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__()
        scale_init = _number("siglip", "scale_init", scale_init)
        if scale_init <= 0:
            raise AnybindError(f"siglip: scale_init must be positive, not {scale_init}")
        bias_init = _number("siglip", "bias_init", bias_init)
        self.learn_scale_bias = _flag("siglip", "learn_scale_bias", learn_scale_bias)
        self.chunk_size = _chunk("siglip", chunk_size)
        log_scale, bias = torch.tensor(math.log(scale_init)), torch.tensor(float(bias_init))
        if self.learn_scale_bias:
            self.log_scale, self.bias = nn.Parameter(log_scale), nn.Parameter(bias)
        else:
            self.register_buffer("log_scale", log_scale)
            self.register_buffer("bias", bias)

    def scale(self) -> Tensor:
        """The current scale ``t``."""
        return self.log_scale.exp()

    def forward(self, za: Tensor, zb: Tensor, pos: Tensor | None = None) -> Tensor:
        with _fp32():
            a, b = _normalised_pair("siglip", za, zb)
            pos = _check_pos("siglip", pos, a, b)
            scale_bias = torch.stack([self.scale(), self.bias]).float()
            return _chunked_mean(_siglip_rows, a, b, scale_bias, pos, self.chunk_size)


def _infonce_rows(q: Tensor, g: Tensor, scale: Tensor, pos: Tensor | None, offset: int) -> Tensor:
    """Sum over these query rows of -log(sum of positive softmax mass); rows start at `offset`."""
    logits = scale * (q @ g.T)
    if pos is None:  # row r's positive is column offset + r
        idx = torch.arange(offset, offset + q.shape[0], device=q.device)
        positive = logits.gather(1, idx[:, None]).squeeze(1)
    else:
        positive = logits.masked_fill(~pos, float("-inf")).logsumexp(dim=1)
    return (logits.logsumexp(dim=1) - positive).sum()


def _siglip_rows(
    q: Tensor, g: Tensor, scale_bias: Tensor, pos: Tensor | None, offset: int
) -> Tensor:
    """Sum over these query rows (and every column) of -log sigmoid(z * logit)."""
    logits = scale_bias[0] * (q @ g.T) + scale_bias[1]
    if pos is None:
        sign = torch.full_like(logits, -1.0)
        rows = torch.arange(q.shape[0], device=q.device)
        sign[rows, rows + offset] = 1.0
    else:
        sign = pos.to(logits.dtype) * 2.0 - 1.0
    return -F.logsigmoid(sign * logits).sum()


def _chunked_mean(
    rows_fn: Callable[..., Tensor],
    q: Tensor,
    g: Tensor,
    params: Tensor,
    pos: Tensor | None,
    chunk_size: int | None,
) -> Tensor:
    """Mean over query rows of `rows_fn`, in chunks of rows each recomputed in backward."""
    n = q.shape[0]
    if chunk_size is None or chunk_size >= n:
        return rows_fn(q, g, params, pos, 0) / n
    total = q.new_zeros(())
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        part = None if pos is None else pos[start:stop]
        total = total + checkpoint(
            rows_fn, q[start:stop], g, params, part, start, use_reentrant=False
        )
    return total / n


# ---- STRUCTURE -------------------------------------------------------------------------------------
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
    Computed in fp32 whatever autocast says.
    """
    levels = _count("structure", "levels", levels)
    tau = _number("structure", "tau", tau)
    if tau <= 0:
        raise AnybindError(f"structure: tau must be positive, not {tau}")
    weights = _level_weights(levels, level_weighting)
    max_batch = _count("structure", "max_batch", max_batch)
    if max_batch < 2:
        raise AnybindError(f"structure: max_batch must be at least 2, not {max_batch}")
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
    with _fp32():
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

    ``lam`` and ``warmup_steps`` are carried for `weight`, the linearly warmed-up lambda
    (STRUCTURE's recipe: lambda 10, warmed up so the contrastive loss shapes the space first).
    """

    def __init__(
        self,
        *,
        levels: int = 1,
        tau: float = STRUCTURE_TAU,
        level_weighting: str = "uniform",
        max_batch: int = 4096,
        lam: float = 10.0,
        warmup_steps: int = 0,
    ):
        super().__init__()
        self.levels = _count("structure", "levels", levels)
        self.tau = _number("structure", "tau", tau)
        if self.tau <= 0:
            raise AnybindError(f"structure: tau must be positive, not {self.tau}")
        _level_weights(self.levels, level_weighting)
        self.level_weighting = level_weighting
        self.max_batch = _count("structure", "max_batch", max_batch)
        if self.max_batch < 2:
            raise AnybindError(f"structure: max_batch must be at least 2, not {self.max_batch}")
        self.lam = _number("structure", "lam", lam)
        self.warmup_steps = _count("structure", "warmup_steps", warmup_steps, minimum=0)

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
            f"levels={self.levels}, tau={self.tau}, level_weighting={self.level_weighting}, "
            f"max_batch={self.max_batch}, lam={self.lam}, warmup_steps={self.warmup_steps}"
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


def _random_walk(y: Tensor, tau: float) -> Tensor:
    """Row-stochastic P = softmax_rows(Y Y^T / tau) of L2-normalised, batch-centred rows."""
    y = F.normalize(y, dim=-1)
    y = y - y.mean(dim=0, keepdim=True)
    return torch.softmax((y @ y.T) / tau, dim=-1)


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


def _level_weights(levels: int, level_weighting: str) -> list[float]:
    if level_weighting == "uniform":
        raw = [1.0] * levels
    elif level_weighting == "inverse":
        raw = [1.0 / level for level in range(1, levels + 1)]
    else:
        raise AnybindError(
            f"structure: level_weighting must be 'uniform' or 'inverse', not {level_weighting!r}"
        )
    return [w / sum(raw) for w in raw]


# ---- registry --------------------------------------------------------------------------------------
#: Contrastive losses by name (the regulariser is separate: it adds to either).
LOSSES: dict[str, type[nn.Module]] = {"infonce": InfoNCE, "siglip": SigLIP}


def build_loss(name: str, **options: Any) -> nn.Module:
    """Build a contrastive loss by name.

    >>> build_loss("infonce", temperature=0.05, chunk_size=4096)
    """
    cls = LOSSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise AnybindError(
            f"unknown loss '{name}'{_did_you_mean(str(name), LOSSES)}; "
            f"registered: {', '.join(sorted(LOSSES))}"
        )
    accepted = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    for key in options:
        if key not in accepted:
            raise AnybindError(
                f"loss '{name}' has no option '{key}'{_did_you_mean(key, accepted)}; "
                f"it accepts: {', '.join(sorted(accepted))}"
            )
    return cls(**options)


# ---- checks ----------------------------------------------------------------------------------------
@contextmanager
def _fp32() -> Iterator[None]:
    """Disable autocast (CPU and CUDA) for the block: the losses are computed in fp32."""
    with ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type="cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast(device_type="cuda", enabled=False))
        yield


def _normalised_pair(loss: str, za: Tensor, zb: Tensor) -> tuple[Tensor, Tensor]:
    if not (isinstance(za, Tensor) and isinstance(zb, Tensor)) or za.ndim != 2 or zb.ndim != 2:
        raise AnybindError(f"{loss}: za and zb must be [B, D] tensors")
    if za.shape[1] != zb.shape[1]:
        raise AnybindError(
            f"{loss}: za and zb must share the embedding dimension, got {za.shape[1]} and "
            f"{zb.shape[1]}: both projectors need the same out_dim"
        )
    if za.shape[0] == 0 or zb.shape[0] == 0:
        raise AnybindError(f"{loss}: got an empty batch")
    return F.normalize(za.float(), dim=-1), F.normalize(zb.float(), dim=-1)


def _check_pos(loss: str, pos: Tensor | None, a: Tensor, b: Tensor) -> Tensor | None:
    na, nb = a.shape[0], b.shape[0]
    if pos is None:
        if na != nb:
            raise AnybindError(
                f"{loss}: za has {na} rows and zb {nb}: pass pos, the [{na}, {nb}] boolean matrix "
                "of positive pairs"
            )
        return None
    if not isinstance(pos, Tensor) or pos.dtype != torch.bool or tuple(pos.shape) != (na, nb):
        shape = tuple(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
        raise AnybindError(
            f"{loss}: pos must be a boolean [{na}, {nb}] tensor, got {shape}"
            + (f" of {pos.dtype}" if isinstance(pos, Tensor) else "")
        )
    if not bool(pos.any(dim=1).all()) or not bool(pos.any(dim=0).all()):
        raise AnybindError(f"{loss}: every row and every column of pos needs at least one positive")
    return pos.to(a.device)


def _chunk(loss: str, chunk_size: int | None) -> int | None:
    return None if chunk_size is None else _count(loss, "chunk_size", chunk_size)


def _count(what: str, option: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AnybindError(f"{what}: {option} must be an integer >= {minimum}, not {value!r}")
    return int(value)


def _number(what: str, option: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AnybindError(f"{what}: {option} must be a finite number, not {value!r}")
    return float(value)


def _flag(what: str, option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise AnybindError(f"{what}: {option} must be true or false, not {value!r}")
    return value


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
