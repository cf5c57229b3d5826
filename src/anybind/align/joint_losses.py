"""Losses for N modalities at once, on embeddings, and the scores of joint queries.

Every loss here is a `JointLoss` (``joint = True``) whose ``forward(z, present, pos, *, anchor)``
takes every modality of a batch of tuples: ``z[m]`` is modality m's [B, D] projected embeddings
(row i of every modality belongs to sample i), ``present[m]`` a [B] bool mask (False: sample i
lacks m; its row may hold anything, NaN included, and changes neither the value nor a gradient:
rows are selected, never multiplied by 0), ``pos`` the [B, B] bool "same item" matrix as in
`InfoNCE` (None: the identity), ``anchor`` the anchor modality. They work in fp32, on
L2-normalised rows, with a learnable temperature (``learn_temperature``).

* ``anchor-infonce`` / ``anchor-siglip``: every other modality against the anchor (ImageBind's
  way), the mean over those modalities of `InfoNCE` / `SigLIP` (one temperature, shared).
* ``all-pairs``: `InfoNCE` or `SigLIP` (``pair_loss``) over every pair of modalities, **averaged**
  by default (``reduction: mean``), so the loss stays on one pair loss's scale (log B at chance)
  whatever M and however many pairs a batch with missing modalities has, comparable with the other
  joint losses; ``reduction: sum`` is the Symile authors' CLIP baseline (their
  ``experiments/losses.py:clip`` sums the three pairs). Under Adam the two differ only in scale.
* ``symile``: Symile (Saporta et al., NeurIPS 2024), below.

Missing modalities. A pair term (anchor, all-pairs) uses the rows where both modalities are
present; Symile groups the rows by the set of modalities they have: a group with all M contributes
Symile over the M, a group with a subset S of 3+ Symile over S, a group with exactly two the
pairwise InfoNCE of the two (a MIP with a missing factor is undefined; Symile over two modalities
with every candidate *is* InfoNCE), a group with one modality nothing. A term over fewer than 2
rows is skipped. The pair losses average their terms (each modality pair counts the same, as
with every modality present); Symile weights each group's term by its rows (each sample counts
the same, so a 3-row group of pairs does not weigh as much as 250 full tuples). With no term at
all the loss is a zero that still backpropagates (all gradients 0). The authors instead feed a
learned "missing" embedding or an out-of-support placeholder to the encoder, so every sample
keeps M representations; on cached features there is no such input, hence this rule.

Symile, as the paper and the authors' package ``symile`` 0.1.0 (github.com/rajesh-lab/symile,
``symile/loss.py``; its ``experiments/losses.py`` is the same for M = 3) define it:

* the multilinear inner product ``MIP(a, b, c) = sum_d a_d b_d c_d``; the caller L2-normalises
  each modality (the README's example, the binary-XOR experiment; the Symile-M3 models end in a
  LayerNorm instead) and passes ``logit_scale`` = exp(a learned log scale, initialised at
  log(1/0.07) as CLIP, not clamped); logits = logit_scale x MIP. Here the scale is clamped to
  [1, ``max_logit_scale``] (100, CLIP's, by default).
* ``normalise``: ``l2`` is that MIP of L2-normalised rows (the package's value, tested equal).
  ``rms`` (the default) is the mean over d of the product of RMS-normalised rows (each row scaled
  to unit mean square, the scale a LayerNorm leaves, as in the Symile-M3 models), which equals the
  L2 MIP x D^((M-2)/2): a dense, perfectly aligned tuple scores 1, as a cosine does, and M = 2 is
  InfoNCE unchanged. Why: the L2 MIP of dense unit rows is about D^(-(M-2)/2) (0.044 at M = 3,
  D = 512), so at a CLIP logit scale the loss can only grow its logits by concentrating each
  embedding on a few coordinates. On the spoken-openclipart triples (fold 0, 240 steps) the l2
  model's embeddings put 77% of their norm on one coordinate (InfoNCE's: 14%) and its joint
  queries reached mean R@10 32.5% on validation, against 56.6% with ``rms`` (chosen there;
  `benchmarks/joint_vs_progressive.py`).
* each modality in turn is the query; its row i is a cross-entropy over candidates built from
  the other modalities, the positive being sample i's own tuple; the loss is the mean over the M
  query modalities.
* ``negatives: n`` (the package's ``"n"``, O(B) per row): each other modality's rows are shuffled
  by its own ``torch.randperm(B)`` (drawn from torch's global generator, per query modality, for
  each other modality in order: a seeded run repeats), the shuffled rows multiplied elementwise,
  and the diagonal replaced by the positive tuple: candidate j != i of row i is
  ``(y[p(j)], z[q(j)])``, a *mix* of samples, not sample j's tuple: negatives drawn from the
  product of the marginals, which is what makes Symile's optimum the total correlation.
  A shuffled candidate that happens to be the query's own tuple (p(j) = q(j) = i; probability
  (B-1)/B^2 per row, about one row per batch and query modality) is a negative in the package;
  so it is here when ``pos`` is None (the package's value, tested equal), and a positive when
  ``pos`` is given (a candidate is positive iff every factor's sample is the query's item).
* ``negatives: all`` (the package's ``"n_squared"``, O(B^(M-1)) per row): every combination of
  other-modality rows; a warning logs the cost (B^(M-1) logits per row). With ``pos``, candidate
  ``(y[j], z[k])`` is positive iff j and k are both the query's item.

Joint queries (two modalities in, a third out): `joint_scores` with ``rule="multilinear"`` (the
MIP of the query rows' elementwise product with each gallery row, Symile's zero-shot score) or
``rule="sum-cosine"`` (the sum of the query modalities' cosines with each gallery row; the
authors' CLIP score adds the queries' own pairwise dot product, a constant per query that does
not change a ranking, left out here); `joint_rule(loss_name)` picks the rule a loss implies.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import choice, did_you_mean, flag, number
from .blocks import fp32
from .losses import LOSSES, MAX_LOGIT_SCALE, MIN_LOGIT_SCALE, InfoNCE, LossError, SigLIP

log = logging.getLogger(__name__)

#: How a joint query (several modalities in) scores a gallery row.
JOINT_RULES = ("multilinear", "sum-cosine")
#: Symile's negative candidates: O(B) shuffled tuples, or every combination, O(B^(M-1)).
SYMILE_NEGATIVES = ("n", "all")
SYMILE_NORMALISE = ("l2", "rms")  # the MIP of L2-normalised rows (the package), or its D^((M-2)/2) multiple
PAIR_LOSSES = ("infonce", "siglip")
REDUCTIONS = ("mean", "sum")


class JointLoss(nn.Module):
    """A loss over every modality of a batch of tuples at once (see the module docstring)."""

    #: Marks a loss that takes every modality at once: the trainer calls it with all of them.
    joint = True
    #: The joint-query rule a model trained with this loss is scored with (`joint_rule`).
    query_rule = "sum-cosine"

    def forward(self, z: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None,
                pos: Tensor | None = None, *, anchor: str) -> Tensor:
        raise NotImplementedError


# ---- pair losses: anchor, all pairs ----------------------------------------------------------------
class _PairwiseLoss(JointLoss):
    """A two-modality loss (`pair`) over modality pairs: their mean (or sum)."""

    name = "pairwise"

    def __init__(self, pair: nn.Module, reduction: str = "mean"):
        super().__init__()
        self.pair = pair
        self.reduction = choice(f"{self.name}: reduction", reduction, REDUCTIONS, error=LossError)

    def pairs(self, names: Sequence[str], anchor: str) -> list[tuple[str, str]]:
        raise NotImplementedError

    def temperature_value(self) -> float:
        """The current temperature (1 / logit scale), for logs."""
        scale = self.pair.logit_scale() if isinstance(self.pair, InfoNCE) else self.pair.scale()
        return float(1.0 / scale.detach())

    def forward(self, z: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None,
                pos: Tensor | None = None, *, anchor: str) -> Tensor:
        with fp32():
            z, present, pos = checked_batch(self.name, z, present, pos, anchor)
            terms = []
            for a, b in self.pairs(list(z), anchor):
                rows = _rows(present[a] & present[b])
                if rows is None or len(rows) >= 2:
                    terms.append(self.pair(_take(z[a], rows), _take(z[b], rows), _take_pos(pos, rows)))
            if not terms:
                return _zero(z)
            total = torch.stack(terms).sum()
            return total / len(terms) if self.reduction == "mean" else total


class AnchorInfoNCE(_PairwiseLoss):
    """InfoNCE of every other modality against the anchor (ImageBind's way), mean over modalities."""

    name = "anchor-infonce"

    def __init__(self, *, temperature: float = 0.07, learn_temperature: bool = True,
                 chunk_size: int | None = None):
        super().__init__(InfoNCE(temperature=temperature, learn_temperature=learn_temperature,
                                 chunk_size=chunk_size))

    def pairs(self, names: Sequence[str], anchor: str) -> list[tuple[str, str]]:
        return [(anchor, m) for m in names if m != anchor]


class AnchorSigLIP(_PairwiseLoss):
    """SigLIP of every other modality against the anchor, mean over modalities (one scale ``t``
    and bias, shared; ``learn_temperature`` learns both)."""

    name = "anchor-siglip"

    def __init__(self, *, scale_init: float = 10.0, bias_init: float = -10.0,
                 learn_temperature: bool = True, chunk_size: int | None = None):
        super().__init__(SigLIP(scale_init=scale_init, bias_init=bias_init,
                                learn_scale_bias=learn_temperature, chunk_size=chunk_size))

    def pairs(self, names: Sequence[str], anchor: str) -> list[tuple[str, str]]:
        return [(anchor, m) for m in names if m != anchor]


class AllPairs(_PairwiseLoss):
    """``pair_loss`` (InfoNCE or SigLIP) over every pair of modalities, averaged (``reduction:
    sum`` adds them, as the Symile authors' CLIP baseline). ``temperature`` is InfoNCE's option,
    ``scale_init`` / ``bias_init`` SigLIP's; setting the other loss's option is refused."""

    name = "all-pairs"

    def __init__(self, *, pair_loss: str = "infonce", reduction: str = "mean", temperature: float = 0.07,
                 scale_init: float = 10.0, bias_init: float = -10.0, learn_temperature: bool = True,
                 chunk_size: int | None = None):
        pair_loss = choice("all-pairs: pair_loss", pair_loss, PAIR_LOSSES, error=LossError)
        unused = ({"scale_init": (scale_init, 10.0), "bias_init": (bias_init, -10.0)} if pair_loss == "infonce"
                  else {"temperature": (temperature, 0.07)})
        for key, (value, default) in unused.items():
            if value != default:
                raise LossError(f"all-pairs: {key} is an option of the other pair loss, not of "
                                f"pair_loss: {pair_loss}")
        if pair_loss == "infonce":
            pair = InfoNCE(temperature=temperature, learn_temperature=learn_temperature, chunk_size=chunk_size)
        else:
            pair = SigLIP(scale_init=scale_init, bias_init=bias_init, learn_scale_bias=learn_temperature,
                          chunk_size=chunk_size)
        super().__init__(pair, reduction)

    def pairs(self, names: Sequence[str], anchor: str) -> list[tuple[str, str]]:
        return list(itertools.combinations(names, 2))


# ---- Symile ----------------------------------------------------------------------------------------
class Symile(JointLoss):
    """Symile's loss (Saporta et al., NeurIPS 2024): for each modality as the query, cross-entropy
    of ``logit_scale x MIP`` over candidates from the other modalities; the mean over the queries.
    ``negatives``: ``n`` (shuffled tuples, O(B) per row, the default) or ``all`` (every
    combination, O(B^(M-1)) per row); ``normalise``: ``rms`` (the default: the MIP at a cosine's
    scale) or ``l2`` (equal to the authors' ``symile`` package on full tuples); see the module."""

    query_rule = "multilinear"

    def __init__(self, *, negatives: str = "n", normalise: str = "rms", temperature: float = 0.07,
                 learn_temperature: bool = True, max_logit_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        self.negatives = choice("symile: negatives", negatives, SYMILE_NEGATIVES, error=LossError)
        self.normalise = choice("symile: normalise", normalise, SYMILE_NORMALISE, error=LossError)
        self.max_logit_scale = number("symile: max_logit_scale", max_logit_scale,
                                      minimum=MIN_LOGIT_SCALE, error=LossError)
        temperature = number("symile: temperature", temperature, error=LossError)
        if not 1.0 / self.max_logit_scale <= temperature <= 1.0 / MIN_LOGIT_SCALE:
            raise LossError(f"symile: temperature must be in [{1 / self.max_logit_scale:g}, 1] "
                            f"(logit scale 1..max_logit_scale {self.max_logit_scale:g}), not {temperature}")
        self.learn_temperature = flag("symile: learn_temperature", learn_temperature, error=LossError)
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if self.learn_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        self._warned: set[tuple[int, int]] = set()

    def logit_scale(self) -> Tensor:
        """The clamped logit scale ``1 / temperature`` in use."""
        return self.log_logit_scale.clamp(math.log(MIN_LOGIT_SCALE), math.log(self.max_logit_scale)).exp()

    def temperature_value(self) -> float:
        return float(1.0 / self.logit_scale().detach())

    def forward(self, z: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None,
                pos: Tensor | None = None, *, anchor: str) -> Tensor:
        with fp32():
            z, present, pos = checked_batch("symile", z, present, pos, anchor)
            scale = self.logit_scale().float()
            total, weight = None, 0
            for names, rows in _present_groups(present):
                n = len(next(iter(z.values()))) if rows is None else len(rows)
                if len(names) < 2 or n < 2:
                    continue
                reps = [F.normalize(_take(z[m], rows).float(), dim=-1) for m in names]
                term = self._term(reps, scale, _take_pos(pos, rows)) * n
                total, weight = (term, n) if total is None else (total + term, weight + n)
            return _zero(z) if total is None else total / weight

    def _term(self, reps: list[Tensor], scale: Tensor, pos: Tensor | None) -> Tensor:
        """Symile over these modalities' rows (InfoNCE for two: every candidate, O(B))."""
        if len(reps) == 2:
            logits = scale * (reps[0] @ reps[1].T)
            positive = _eye_or(pos, len(logits), logits.device)
            return 0.5 * (_cross_entropy(logits, positive) + _cross_entropy(logits.T, positive.T))
        if self.negatives == "all":
            self._warn_cost(len(reps[0]), len(reps))
        if self.normalise == "rms":  # the mean over d of RMS-normalised rows' product: a cosine's scale
            scale = scale * reps[0].shape[1] ** ((len(reps) - 2) / 2)
        losses = []
        for q, query in enumerate(reps):
            others = reps[:q] + reps[q + 1:]
            build = symile_logits_n if self.negatives == "n" else symile_logits_all
            logits, positive = build(query, others, pos)
            losses.append(_cross_entropy(scale * logits, positive))
        return torch.stack(losses).mean()

    def _warn_cost(self, n: int, m: int) -> None:
        if (n, m) not in self._warned:
            self._warned.add((n, m))
            log.warning("symile with negatives: all scores every combination of the other modalities' "
                        "rows: %d^%d = %d logits per row, %d per query modality (negatives: n scores %d)",
                        n, m - 1, n ** (m - 1), n ** m, n * n)


def symile_logits_n(query: Tensor, others: list[Tensor], pos: Tensor | None) -> tuple[Tensor, Tensor]:
    """The package's O(B) candidates: ``logits[i, j] = MIP(query[i], *shuffled others[j])`` with
    each other modality shuffled by its own ``torch.randperm`` and the diagonal replaced by the
    positive tuple's MIP; the [B, B] positive mask (the diagonal; with `pos`, also the shuffled
    candidates whose every factor is the query's item)."""
    n = query.shape[0]
    perms = [torch.randperm(o.shape[0]).to(o.device) for o in others]
    shuffled, together = others[0][perms[0]], query.clone()
    for other, perm in zip(others[1:], perms[1:]):
        shuffled = shuffled * other[perm]
    for other in others:
        together = together * other
    eye = torch.eye(n, dtype=torch.bool, device=query.device)
    logits = torch.where(eye, together.sum(dim=1), query @ shuffled.T)
    if pos is None:
        return logits, eye
    every_factor = pos[:, perms[0]]
    for perm in perms[1:]:
        every_factor = every_factor & pos[:, perm]
    return logits, eye | every_factor


def symile_logits_all(query: Tensor, others: list[Tensor], pos: Tensor | None) -> tuple[Tensor, Tensor]:
    """Every combination: ``logits[i, (j1, j2, ...)] = MIP(query[i], others[0][j1], others[1][j2], ...)``
    as [B, B^(M-1)] (row-major combinations); positive iff every factor's sample is the query's item."""
    n, d = query.shape
    product = others[0]
    for other in others[1:]:
        product = (product[:, None, :] * other[None, :, :]).reshape(-1, d)
    positive_pairs = _eye_or(pos, n, query.device)
    positive = positive_pairs
    for _ in others[1:]:
        positive = (positive[:, :, None] & positive_pairs[:, None, :]).reshape(n, -1)
    return query @ product.T, positive


# ---- joint queries ---------------------------------------------------------------------------------
def joint_scores(queries: Mapping[str, Tensor], gallery: Tensor, *, rule: str) -> Tensor:
    """[Q, G] scores of joint queries (``queries[m]``: [Q, D], row q of every modality is query q)
    against gallery rows [G, D], all L2-normalised: ``multilinear`` = ``MIP(q_1, q_2, ..., g)``,
    ``sum-cosine`` = ``sum_m cos(q_m, g)``.

    >>> joint_scores({"text": t, "audio": a}, images, rule=joint_rule("symile"))   # image from text + speech
    """
    rule = choice("joint_scores: rule", rule, JOINT_RULES, error=LossError)
    if not isinstance(queries, Mapping) or not queries:
        raise LossError("joint_scores: queries must map one or more modality names to [Q, D] tensors")
    if not isinstance(gallery, Tensor) or gallery.ndim != 2:
        raise LossError("joint_scores: gallery must be a [G, D] tensor")
    first = next(iter(queries.values()))
    for m, q in queries.items():
        if not isinstance(q, Tensor) or q.ndim != 2 or q.shape != first.shape or q.shape[1] != gallery.shape[1]:
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise LossError(f"joint_scores: query '{m}' is {shape}; every query must be [Q, D] with the "
                            f"same Q, and D = the gallery's {gallery.shape[1]}")
    with fp32():
        g = F.normalize(gallery.float(), dim=-1)
        normalised = [F.normalize(q.float(), dim=-1) for q in queries.values()]
        if rule == "sum-cosine":
            return sum(q @ g.T for q in normalised)
        product = normalised[0]
        for q in normalised[1:]:
            product = product * q
        return product @ g.T


def joint_rule(loss_name: str) -> str:
    """The joint-query rule for a model trained with `loss_name`: ``multilinear`` for a loss scored
    by the MIP (Symile), ``sum-cosine`` for the others (pairwise losses, two-modality losses)."""
    choice("loss", loss_name, LOSSES.names(), error=LossError)
    return getattr(LOSSES.get(loss_name), "query_rule", "sum-cosine")


# ---- checks and row selection ----------------------------------------------------------------------
def checked_batch(loss: str, z: Mapping[str, Tensor], present: Mapping[str, Tensor] | None,
                  pos: Tensor | None, anchor: str) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None]:
    """(z, present for every modality as [B] bool, pos or None), every shape checked."""
    if not isinstance(z, Mapping) or len(z) < 2:
        raise LossError(f"{loss}: z must map two or more modality names to [B, D] tensors")
    first = next(iter(z.values()))
    for m, v in z.items():
        if not isinstance(v, Tensor) or v.ndim != 2 or v.shape != first.shape:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise LossError(f"{loss}: z['{m}'] is {shape}: every modality must be [B, D] with one B "
                            f"(row i = sample i) and one D (the projectors' out_dim)")
    n = first.shape[0]
    if n == 0:
        raise LossError(f"{loss}: got an empty batch")
    if anchor not in z:
        raise LossError(f"{loss}: the anchor '{anchor}' is not among the modalities "
                        f"{', '.join(z)}{did_you_mean(str(anchor), z)}")
    return dict(z), _checked_present(loss, z, present, n, first.device), _checked_pos(loss, pos, n, first.device)


def _checked_present(loss: str, z: Mapping[str, Tensor], present: Mapping[str, Tensor] | None,
                     n: int, device: torch.device) -> dict[str, Tensor]:
    present = dict(present or {})
    unknown = [m for m in present if m not in z]
    if unknown:
        raise LossError(f"{loss}: present names {', '.join(map(str, unknown))}, not among the modalities "
                        f"{', '.join(z)}")
    out = {}
    for m in z:
        mask = present.get(m)
        if mask is None:
            mask = torch.ones(n, dtype=torch.bool, device=device)
        elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
            raise LossError(f"{loss}: present['{m}'] must be a boolean [{n}] tensor")
        out[m] = mask.to(device)
    return out


def _checked_pos(loss: str, pos: Tensor | None, n: int, device: torch.device) -> Tensor | None:
    if pos is None:
        return None
    if not isinstance(pos, Tensor) or pos.dtype != torch.bool or tuple(pos.shape) != (n, n):
        raise LossError(f"{loss}: pos must be a boolean [{n}, {n}] tensor (pos[i, j]: samples i and j "
                        "are the same item)")
    pos = pos.to(device)
    if not bool(pos.diagonal().all()):
        raise LossError(f"{loss}: pos must hold its diagonal: every sample is its own item")
    return pos


def _rows(mask: Tensor) -> Tensor | None:
    """The indices of the True rows; None when every row is (no copy then)."""
    return None if bool(mask.all()) else mask.nonzero().squeeze(1)


def _take(x: Tensor, rows: Tensor | None) -> Tensor:
    return x if rows is None else x.index_select(0, rows)


def _take_pos(pos: Tensor | None, rows: Tensor | None) -> Tensor | None:
    return pos if pos is None or rows is None else pos[rows][:, rows]


def _present_groups(present: dict[str, Tensor]) -> list[tuple[list[str], Tensor | None]]:
    """(modalities, rows) of each set of present modalities, every modality's set first, so a full
    batch is one group (and draws its permutations as the package does)."""
    names = list(present)
    code = sum(present[m].long() << k for k, m in enumerate(names))
    groups = []
    for value in sorted(torch.unique(code).tolist(), reverse=True):
        members = [m for k, m in enumerate(names) if value >> k & 1]
        groups.append((members, _rows(code == value)))
    return groups


def _eye_or(pos: Tensor | None, n: int, device: torch.device) -> Tensor:
    return torch.eye(n, dtype=torch.bool, device=device) if pos is None else pos


def _cross_entropy(logits: Tensor, positive: Tensor) -> Tensor:
    """Mean over rows of ``-log(sum of the softmax over the positive columns)``; with one positive
    per row, `F.cross_entropy` with that column as the label."""
    return (logits.logsumexp(dim=1) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)).mean()


def _zero(z: Mapping[str, Tensor]) -> Tensor:
    """A zero on the graph (an empty sum: no NaN row touched), for a batch without any term."""
    return torch.stack([v[:0].float().sum() for v in z.values()]).sum()
