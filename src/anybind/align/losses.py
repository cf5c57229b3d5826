"""Losses on embeddings (never on models), so each one is testable on random tensors.

* `InfoNCE`: symmetric contrastive loss with a learnable, clamped temperature.
* `SigLIP`: pairwise sigmoid loss with a learnable scale and bias.
* `StructureRegulariser` (`anybind.align.structure`): STRUCTURE's term that keeps a projector's
  output neighbourhoods like its frozen input's, added to either by `build_objective`.

Both contrastive losses take an optional boolean ``pos`` matrix (``pos[i, j]``: ``za[i]`` and
``zb[j]`` are a positive pair), so several captions of one image in a batch all count as
positives, and a ``chunk_size`` that computes the logits in row chunks under activation
checkpointing: a 32k x 32k batch on a CPU needs O(chunk x B) memory instead of 4 GB, with the
same value and gradients. They work in fp32 whatever autocast says: a bf16 logit at scale 100
is off by up to about 0.4. Unchunked, InfoNCE computes its logits once for both directions and
STRUCTURE (one level, frozen input) takes a fast path with a hand-written backward; both are
tested against the code they replaced (tests/test_align_losses_speed.py).

Contrastive losses live in the `LOSSES` registry; a loss's keyword-only ``__init__`` options are
its settings. A recipe's ``loss:`` section is ``{name: <loss>, <its options>...,
structure_<option>: ...}`` (the ``structure_`` keys set the regulariser), and `build_objective`
turns it into what training minimises::

    @register_loss("cosine-mse")
    class CosineMSE(nn.Module):
        def __init__(self, *, margin: float = 0.0): ...
        def forward(self, za, zb, pos=None): ...
    # anybind train --set 'loss={name: cosine-mse, margin: 0.1}' --set loss.structure_weight=5
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..checks import choice, did_you_mean, flag, integer, number, positive
from ..errors import AnybindError
from ..registry import Registry, signature_options
from .blocks import fp32, row_blocks
from .structure import StructureRegulariser

#: InfoNCE's logit scale (1 / temperature) is clamped to this range, as in CLIP.
MIN_LOGIT_SCALE, MAX_LOGIT_SCALE = 1.0, 100.0

#: Contrastive losses by name (the STRUCTURE regulariser is separate: it adds to any of them).
LOSSES = Registry("loss", plural="losses")


class LossError(AnybindError, ValueError):
    """A loss section with an unknown loss, an unknown option or a bad value."""


def register_loss(name: str, target: Any = None, *, help: str = "", replace: bool = False):
    """Register a contrastive loss: an ``nn.Module`` whose keyword-only ``__init__`` options are
    its settings and whose ``forward(za, zb, pos=None)`` returns a scalar. A decorator without
    `target`; `target` may be a lazy ``"module:Class"``."""
    return LOSSES.register(name, target, help=help, replace=replace)


# ---- contrastive losses ----------------------------------------------------------------------------
@register_loss("infonce")
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
        temperature = number("infonce: temperature", temperature)
        if not 1.0 / MAX_LOGIT_SCALE <= temperature <= 1.0 / MIN_LOGIT_SCALE:
            raise AnybindError(
                f"infonce: temperature must be in [{1 / MAX_LOGIT_SCALE:g}, {1 / MIN_LOGIT_SCALE:g}] "
                f"(logit scale 1..100), not {temperature}"
            )
        self.learn_temperature = flag("infonce: learn_temperature", learn_temperature)
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
        with fp32():
            a, b = _normalised_pair("infonce", za, zb)
            pos = _check_pos("infonce", pos, a, b)
            scale = self.logit_scale().float()
            if self.chunk_size is None or self.chunk_size >= max(a.shape[0], b.shape[0]):
                return _infonce_both_directions(a, b, scale, pos)
            a_to_b = _chunked_mean(_infonce_rows, a, b, scale, pos, self.chunk_size)
            b_to_a = _chunked_mean(
                _infonce_rows, b, a, scale, None if pos is None else pos.T, self.chunk_size
            )
            return 0.5 * (a_to_b + b_to_a)


@register_loss("siglip")
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
        scale_init = positive("siglip: scale_init", scale_init)
        bias_init = number("siglip: bias_init", bias_init)
        self.learn_scale_bias = flag("siglip: learn_scale_bias", learn_scale_bias)
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
        with fp32():
            a, b = _normalised_pair("siglip", za, zb)
            pos = _check_pos("siglip", pos, a, b)
            scale_bias = torch.stack([self.scale(), self.bias]).float()
            return _chunked_mean(_siglip_rows, a, b, scale_bias, pos, self.chunk_size)


def _infonce_both_directions(a: Tensor, b: Tensor, scale: Tensor, pos: Tensor | None) -> Tensor:
    """The unchunked InfoNCE from one logits matrix: a -> b over its rows, b -> a over its columns
    (``b @ a.T`` is its transpose), so the B x B product and its gradients are computed once."""
    if pos is None:  # row i's positive (and column i's) is the diagonal
        rows = cols = torch.arange(a.shape[0], device=a.device)
    else:
        rows, cols = pos.nonzero(as_tuple=True)
    return _InfoNCEBoth.apply(scale * a, b, rows, cols)


class _InfoNCEBoth(torch.autograd.Function):
    """``(mean_i [lse_j L_ij - lse_{j in pos(i)} L_ij] + mean_j [lse_i L_ij - lse_{i in pos(j)} L_ij]) / 2``
    for ``L = A B^T``, the positives listed as (`rows`, `cols`).

    Its gradient, ``dL = softmax_rows(L) / 2na + softmax_cols(L) / 2nb`` less the same two softmaxes
    over the positives only, is formed in place in L's buffer, row block by row block.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        logits = a @ b.T
        row_lse, col_lse = _row_and_column_logsumexp(logits)
        positive = logits[rows, cols]
        pos_row_lse = _segment_logsumexp(positive, rows, a.shape[0])
        pos_col_lse = _segment_logsumexp(positive, cols, b.shape[0])
        ctx.save_for_backward(a, b, logits, row_lse, col_lse, rows, cols, positive, pos_row_lse, pos_col_lse)
        ctx.used = False
        return 0.5 * ((row_lse - pos_row_lse).mean() + (col_lse - pos_col_lse).mean())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        if ctx.used:  # the logits are turned into their gradient in place
            raise AnybindError("infonce: the fused loss supports one backward pass")
        ctx.used = True
        a, b, logits, row_lse, col_lse, rows, cols, positive, pos_row_lse, pos_col_lse = ctx.saved_tensors
        with fp32():
            w_a, w_b = 0.5 / a.shape[0], 0.5 / b.shape[0]
            # w * exp(L - lse) as exp(L - (lse - log w)): one pass over each block
            row_shift, col_shift = row_lse - math.log(w_a), (col_lse - math.log(w_b))[None, :]
            for start, block in row_blocks(logits):
                by_col = torch.sub(block, col_shift).exp_()
                block.sub_(row_shift[start:start + block.shape[0], None]).exp_().add_(by_col)
            on_positives = (w_a * (positive - pos_row_lse[rows]).exp()
                            + w_b * (positive - pos_col_lse[cols]).exp())
            logits.index_put_((rows, cols), -on_positives, accumulate=True)
            return (logits @ b) * grad, (logits.T @ a) * grad, None, None


def _row_and_column_logsumexp(m: Tensor) -> tuple[Tensor, Tensor]:
    """``m.logsumexp(1), m.logsumexp(0)`` in one pass over blocks of rows (after the column peaks)."""
    col_peak = m.amax(dim=0)
    row_lse, col_sum = m.new_empty(m.shape[0]), m.new_zeros(m.shape[1])
    for start, block in row_blocks(m):
        row_lse[start:start + block.shape[0]] = block.logsumexp(dim=1)
        col_sum += torch.sub(block, col_peak).exp_().sum(dim=0)
    return row_lse, col_peak + col_sum.log()


def _segment_logsumexp(values: Tensor, segment: Tensor, n: int) -> Tensor:
    """logsumexp of `values` within each of `n` segments (each one non-empty)."""
    peak = values.new_full((n,), float("-inf")).scatter_reduce(0, segment, values, "amax")
    total = values.new_zeros(n).index_add_(0, segment, (values - peak[segment]).exp())
    return peak + total.log()


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


# ---- building by name, and a recipe's loss section -------------------------------------------------
def build_loss(name: str, **options: Any) -> nn.Module:
    """Build a contrastive loss by name; an option it does not take is refused with a did-you-mean.

    >>> build_loss("infonce", temperature=0.05, chunk_size=4096)
    """
    return LOSSES.build(name, **options)


#: Default loss of a section without a name.
DEFAULT_LOSS = "infonce"
#: Section keys ``structure_<option>`` set the STRUCTURE regulariser's options.
STRUCTURE_PREFIX = "structure_"


@dataclass
class Objective:
    """What training minimises: ``contrastive(za, zb, pos)`` plus, per side,
    ``weight(step) * structure(x, z)`` when the recipe turns STRUCTURE on (``structure_weight > 0``).

    >>> objective = build_objective({"name": "infonce", "temperature": 0.05, "structure_weight": 10})
    >>> loss = objective.contrastive(za, zb) + objective.weight(step) * objective.structure(xa, za)
    """

    contrastive: nn.Module
    structure: StructureRegulariser | None = None

    def weight(self, step: int) -> float:
        """The regulariser's warmed-up lambda at a (0-based) step; 0 when it is off."""
        return 0.0 if self.structure is None else self.structure.weight(step)


class LossSection(dict):
    """A checked loss section: ``{name, <the loss's options>, structure_<option>...}`` with every
    default filled in, so the resolved recipe says what ran. Keys read as attributes too
    (``recipe.loss.name``, ``recipe.loss.structure_weight``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"the loss section has no '{key}' (it has {', '.join(self)})") from None


def build_objective(
    loss_section: Mapping[str, Any] | None = None, *, error: type[Exception] = LossError
) -> Objective:
    """The contrastive loss and the STRUCTURE regulariser (None when its weight is 0) that a
    recipe's ``loss:`` section names; unknown keys and bad values raise `error` naming the key."""
    name, options, structure = _split_section(loss_section, error)
    contrastive, regulariser = _build_parts(name, options, structure, error)
    return Objective(contrastive, regulariser if regulariser.lam > 0 else None)


def resolve_loss_section(
    loss_section: Mapping[str, Any] | None = None, *, error: type[Exception] = LossError
) -> LossSection:
    """The section checked (names, keys, and values: the parts are built once to check them)
    and completed with every default. ``structure_<option>: null`` means the default."""
    name, options, structure = _split_section(loss_section, error)
    _build_parts(name, options, structure, error)
    prefixed = {f"{STRUCTURE_PREFIX}{key}": value for key, value in structure.items()}
    return LossSection({"name": name, **options, **prefixed})


def _split_section(section: Any, error: type[Exception]) -> tuple[str, dict, dict]:
    """(loss name, its options, the regulariser's options), defaults filled, keys checked."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise error(f"loss must be a mapping such as {{name: infonce, temperature: 0.05}}, not {section!r}")
    section = dict(section)
    name = choice("loss.name", section.pop("name", DEFAULT_LOSS), LOSSES.names(), error=error)
    accepted = LOSSES.options(name)  # empty when the loss takes **kwargs: it checks its own
    defaults = _defaults_given(LOSSES.get(name))
    structure_defaults = signature_options(StructureRegulariser)
    options, structure = {}, {}
    for key, value in section.items():
        option = key[len(STRUCTURE_PREFIX):] if key.startswith(STRUCTURE_PREFIX) else None
        if option in structure_defaults:
            structure[option] = _like(structure_defaults[option], value)
        elif key in accepted or (not accepted and option is None):
            options[key] = _like(accepted.get(key), value)
        else:
            raise error(_unknown_key(name, key, accepted, structure_defaults))
    filled = {k: options.get(k, defaults.get(k)) for k in accepted if k in options or k in defaults}
    structure = {k: d if structure.get(k) is None else structure[k] for k, d in structure_defaults.items()}
    return name, {**filled, **options}, structure


def _defaults_given(obj: Callable) -> dict[str, Any]:
    """The keyword options that have a default (a required one has none to fill in)."""
    params = inspect.signature(obj).parameters.values()
    return {p.name: p.default for p in params
            if p.default is not p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _unknown_key(name: str, key: str, loss_options: dict, structure_options: dict) -> str:
    structure_keys = [f"{STRUCTURE_PREFIX}{k}" for k in structure_options]
    known = ["name", *loss_options, *structure_keys]
    return (f"unknown recipe key 'loss.{key}'{did_you_mean(key, known)}: loss '{name}' takes "
            f"{', '.join(loss_options) or 'no options'}; the STRUCTURE regulariser takes "
            f"{', '.join(structure_keys)} (another loss's option? replace the whole section: "
            f"--set 'loss={{name: {name}, ...}}')")


def _like(default: Any, value: Any) -> Any:
    """`value` as the type of the option's default: YAML reads 1e-3 (no dot) and nan as text."""
    if isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    if type(default) is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _build_parts(
    name: str, options: dict, structure: dict, error: type[Exception]
) -> tuple[nn.Module, StructureRegulariser]:
    contrastive = _built(lambda **o: LOSSES.build(name, **o), options, "loss.", error)
    regulariser = _built(lambda **o: StructureRegulariser(**o), structure, "loss.structure_", error)
    return contrastive, regulariser


def _built(build: Callable[..., Any], options: dict, prefix: str, error: type[Exception]) -> Any:
    """``build(**options)``; a refused value is re-raised as `error` naming its section key (the
    first option refused on its own), so `--set loss.temperature=nan` says which key to fix."""
    try:
        return build(**options)
    except (AnybindError, ValueError) as e:
        for key, value in options.items():
            try:
                build(**{key: value})
            except (AnybindError, ValueError) as alone:
                raise error(f"{prefix}{key}: {alone}") from e
            except TypeError:  # a required option missing: not this key's fault
                continue
        raise error(f"{prefix.rstrip('._')}: {e}") from e
    except TypeError as e:  # e.g. a user loss's required option is missing
        raise error(f"{prefix.rstrip('._')}: {e}") from e


# ---- checks ----------------------------------------------------------------------------------------
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


def _chunk(loss: str, chunk_size: Any) -> int | None:
    return None if chunk_size is None else integer(f"{loss}: chunk_size", chunk_size, minimum=1)


# ---- losses over N modalities at once (anybind.align.joint_losses; imported on first use) ----------
register_loss("anchor-infonce", "anybind.align.joint_losses:AnchorInfoNCE",
              help="N modalities: InfoNCE of every modality against the anchor, mean over modalities")
register_loss("anchor-siglip", "anybind.align.joint_losses:AnchorSigLIP",
              help="N modalities: SigLIP of every modality against the anchor, mean over modalities")
register_loss("all-pairs", "anybind.align.joint_losses:AllPairs",
              help="N modalities: InfoNCE or SigLIP (pair_loss) over every modality pair, averaged")
register_loss("symile", "anybind.align.joint_losses:Symile",
              help="N modalities: Symile's multilinear inner product loss (negatives: n | all)")
