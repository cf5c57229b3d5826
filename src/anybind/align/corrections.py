"""Inference-time corrections for retrieval hubness, saved with the model and evaluated as shipped.

A hub is a gallery item that is the nearest neighbour of many queries it does not match. Each
correction here keeps retrieval streamable: it either transforms the gallery embeddings or gives
each gallery item a score offset, so ranking stays a chunked ``q @ g.T`` minus an offset vector
(`retrieval_metrics`' ``image_offset`` / ``text_offset``); queries are never changed. The one
exception, ``dual-softmax``, multiplies by the similarity as well, so it ranks through
``score_fn`` (still a fixed function of the cosine and the gallery item's offset).

Fitted on a *bank*: L2-normalised shared-space embeddings of training items per modality
(``{"image": [Ni, D], "text": [Nt, D]}``), never on the evaluation items themselves::

    corr = build_correction("qb-norm", beta=20).fit({"image": zi_train, "text": zt_train})
    retrieval_metrics(**apply_correction(corr, zi_test, zt_test), text_to_image=t2i, ks=(1, 5))
    corr.save("bundle/correction")
    same = RetrievalCorrection.load("bundle/correction")    # config.json + weights.safetensors

As for the baselines, ``"image"`` and ``"text"`` name the pair's first and second side
(``"first"``/``"second"`` and ``0``/``1`` are accepted too): a caller with other modality names
maps them to the two sides.

Registered: ``none``, ``qb-norm`` (inverted softmax), ``dual-softmax`` (DSL with a bank),
``invgc`` (inverse graph convolution with LocalAdj).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, saving
from ..errors import AnybindError
from ..metrics.retrieval import ArrayLike, ScoreFn, _embeddings
from ..registry import Registry
from .baselines import MODALITIES, resolve_modality

KIND = "correction"  # the saved-part kind
LEGACY_FILE = "correction.json"  # saved-part format 1 (with bank.safetensors)

C = TypeVar("C", bound="RetrievalCorrection")

#: name -> correction class; filled by `register_correction`.
CORRECTIONS = Registry("correction")


class CorrectionError(AnybindError, ValueError):
    """A correction built with a bad parameter, fitted on a bad bank, or a damaged saved one."""


def register_correction(name: str, *, help: str = "") -> Callable[[type[C]], type[C]]:
    """Class decorator: make a `RetrievalCorrection` subclass buildable and loadable by `name`."""
    return CORRECTIONS.subclass_decorator(name, RetrievalCorrection, help=help, error=CorrectionError)


def correction_options(name: str) -> dict[str, Any]:
    """The parameters a registered correction accepts, with their defaults."""
    return CORRECTIONS.options(name)


def build_correction(name: str, **params: Any) -> RetrievalCorrection:
    """Build a registered correction by name (unfitted): ``build_correction("qb-norm", beta=20)``.

    ``build_correction(**corr.config())`` rebuilds the same correction.
    """
    return CORRECTIONS.build(name, **params)


def apply_correction(
    correction: RetrievalCorrection,
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    chunk_size: int = 4096,
) -> dict[str, Any]:
    """The embeddings, corrected galleries, offsets and score function, as `retrieval_metrics` kwargs.

    ``retrieval_metrics(**apply_correction(c, zi, zt), text_to_image=t2i, ks=(1, 5, 10))``.
    Images are corrected as the gallery of text queries, texts as the gallery of image queries;
    queries stay as they are (``image_emb`` / ``text_emb``), as in a deployed index. The
    ``*_gallery_emb`` entries are None when the correction leaves the gallery embeddings alone.
    """
    if not isinstance(correction, RetrievalCorrection):
        raise CorrectionError(
            f"apply_correction takes a RetrievalCorrection (see build_correction), not "
            f"{type(correction).__name__}"
        )
    images = _embeddings("image_emb", image_emb)
    texts = _embeddings("text_emb", text_emb)
    image_gallery, image_offset = correction.gallery("image", images, chunk_size=chunk_size)
    text_gallery, text_offset = correction.gallery("text", texts, chunk_size=chunk_size)
    moved = correction.transforms_gallery
    return {
        "image_emb": images,
        "text_emb": texts,
        "image_gallery_emb": image_gallery if moved else None,
        "text_gallery_emb": text_gallery if moved else None,
        "image_offset": image_offset,
        "text_offset": text_offset,
        "score_fn": correction.score_fn,
    }


class RetrievalCorrection:
    """Base class: a correction of the gallery side of cross-modal retrieval.

    Subclasses take their parameters as keyword-only ``__init__`` arguments (that is how
    `build_correction` knows which exist), pass the validated values to ``super().__init__`` and
    implement `_gallery`. Those with ``needs_bank`` are fitted on a bank of both modalities.
    """

    name: ClassVar[str] = ""
    needs_bank: ClassVar[bool] = True
    #: False for corrections whose `gallery` returns the embeddings untouched (offsets only).
    transforms_gallery: ClassVar[bool] = False

    def __init__(self, params: Mapping[str, Any] | None = None):
        if not self.name or self.name not in CORRECTIONS or CORRECTIONS.get(self.name) is not type(self):
            raise CorrectionError(
                f"{type(self).__qualname__} is not registered: decorate it with "
                "@register_correction('some-name')"
            )
        self._params = dict(params or {})
        self.bank: dict[str, Tensor] | None = None

    # ---- public API ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild it unfitted: ``{"name", **params}``."""
        return {"name": self.name, **self._params}

    @property
    def fitted(self) -> bool:
        return self.bank is not None or not self.needs_bank

    @property
    def score_fn(self) -> ScoreFn | None:
        """Ranking keys from (cosine block, offsets), or None for the default cosine - offset."""
        return None

    def fit(self: C, bank: Mapping[str, ArrayLike]) -> C:
        """Keep the bank: L2-normalised training embeddings per modality (``"image"``, ``"text"``)."""
        if not self.needs_bank:
            return self
        self.bank = _check_bank(self.name, bank)
        return self

    def gallery(
        self, modality: str, emb: ArrayLike, chunk_size: int = 4096
    ) -> tuple[Tensor, Tensor | None]:
        """``(corrected embeddings, per-item offset or None)`` of `emb` as the gallery of `modality`.

        The other modality queries; the offset is subtracted from every score of its item.
        """
        modality = _side(modality)
        checks.integer("chunk_size", chunk_size, minimum=1, error=CorrectionError)
        x = _embeddings(f"{modality} gallery embeddings", emb)
        if not self.needs_bank:
            return self._gallery(modality, x, chunk_size)
        if self.bank is None:
            raise CorrectionError(
                f"correction '{self.name}' is not fitted: call fit(bank) with training "
                "embeddings of both modalities first (or load a saved one)"
            )
        dim = next(iter(self.bank.values())).shape[1]
        if x.shape[1] != dim:
            raise CorrectionError(
                f"correction '{self.name}' was fitted on {dim}-dim embeddings, but the "
                f"{modality} gallery is {x.shape[1]}-dim: use the same model's embeddings"
            )
        return self._gallery(modality, x, chunk_size)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the saved part: ``config.json`` (name, parameters) and, when fitted on a bank,
        the bank in ``weights.safetensors`` (no pickles)."""
        if self.needs_bank and self.bank is None:
            raise CorrectionError(f"correction '{self.name}' is not fitted: call fit(bank) before saving it")
        return saving.save_part(directory, KIND, self.name, options=self._params, tensors=self.bank)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RetrievalCorrection:
        """Rebuild a saved correction from its folder, bank included, exactly as it was saved."""
        directory = Path(directory)
        if (directory / LEGACY_FILE).is_file() and not (directory / saving.CONFIG_FILE).is_file():
            raise saving.SavedPartError(f"{directory} was written in saved-part format 1 ({LEGACY_FILE}); this "
                                        f"anybind reads format {saving.FORMAT}: fit the correction (or export "
                                        "the bundle) again with this version")
        config, bank = saving.read_part(directory, KIND)
        name = config.get("name")
        correction = build_correction(name, **config.get("options", {}))
        if cls is not RetrievalCorrection and not isinstance(correction, cls):
            raise CorrectionError(f"{directory} holds a '{name}' correction, not a {cls.__qualname__}: load it "
                                  "with RetrievalCorrection.load")
        if correction.needs_bank:
            if not bank:
                raise CorrectionError(f"no {saving.WEIGHTS_FILE} in {directory}: the save was interrupted; "
                                      "save the correction again")
            correction.bank = _check_bank(name, bank, normalise=False)
        return correction

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        state = "" if self.fitted else ", unfitted"
        return f"{type(self).__name__}({params}{state})"

    # ---- for subclasses --------------------------------------------------------------------------
    def _gallery(self, modality: str, x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _bank(self, modality: str, device: torch.device) -> Tensor:
        assert self.bank is not None
        return self.bank[modality].to(device)


# ---- the registered corrections --------------------------------------------------------------------
@register_correction("none")
class NoCorrection(RetrievalCorrection):
    """Identity: plain cosine ranking (the embeddings are returned untouched, no offset)."""

    needs_bank = False

    def __init__(self) -> None:
        super().__init__()

    def _gallery(self, modality: str, x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor | None]:
        return x, None


@register_correction("qb-norm")
class QBNorm(RetrievalCorrection):
    """Querybank normalisation with the inverted softmax (Bogolin et al., CVPR 2022).

    score'(q, g) = exp(beta s(q, g)) / sum_{b in B} exp(beta s(b, g)), B the bank of the query
    modality. Per query this ranks as s(q, g) - offset_g with
    offset_g = logsumexp_{b in B}(beta s(b, g)) / beta (on the cosine scale). Plain IS, not the
    dynamic (activation-set) variant.
    """

    def __init__(self, *, beta: float = 20.0):
        super().__init__({"beta": _beta(self.name, beta)})

    def _gallery(self, modality: str, x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor | None]:
        beta = self._params["beta"]
        queries = self._bank(_other(modality), x.device)
        return x, _logsumexp_scores(x, queries, beta, chunk_size) / beta


@register_correction("dual-softmax")
class DualSoftmax(RetrievalCorrection):
    """Dual softmax (DSL, Cheng et al. 2021) at inference, with a bank of queries as the prior.

    score'(q, g) = s(q, g) * exp(beta s(q, g)) / sum_{b in B} exp(beta s(b, g)), B the bank of the
    query modality (the prior softmax over queries, temperature 1/beta, taken over the bank instead
    of the test queries), i.e. s(q, g) * exp(beta (s(q, g) - offset_g)) with qb-norm's offset.
    Not an alias of ``qb-norm``: the extra factor s(q, g) changes the ranking (ranking by
    log s + beta s - L_g, not beta s - L_g, where s > 0; the tests show a hub that qb-norm demotes
    and this keeps first), so it ranks through `score_fn`, in float64 so that small products do
    not underflow into ties.
    """

    _gallery = QBNorm._gallery  # the same offsets

    def __init__(self, *, beta: float = 20.0):
        super().__init__({"beta": _beta(self.name, beta)})

    @property
    def score_fn(self) -> ScoreFn:
        return self._keys

    def _keys(self, scores: Tensor, offset: Tensor | None) -> Tensor:
        if offset is None:
            raise CorrectionError(
                "dual-softmax ranks with its offsets: pass both to retrieval_metrics"
            )
        s = scores.double()
        return s * torch.exp(self._params["beta"] * (s - offset.double()))


@register_correction("invgc")
class InvGC(RetrievalCorrection):
    """Inverse graph convolution with LocalAdj (Jian & Wang, EMNLP 2023 Findings, "InvGC").

    Each gallery item is pushed away from its nearest neighbours in the gallery-modality bank G
    and in the query-modality bank Q, weighted by similarity, then renormalised:
        g' = g - r_g / k sum_{j in topk(g, G)} s(g, G_j) G_j - r_q / k sum_{j in topk(g, Q)} s(g, Q_j) Q_j
    LocalAdj keeps the k most similar bank items (adjacency = their cosine, others 0); the 1/k
    row normalisation follows the authors' release, which sets k as a fraction of the bank (its
    default 1% of a 100k bank is k=1000 here) and averages two separately renormalised updates
    (one per bank) instead of the single update above. Queries are not changed; offsets are None.
    The rates need tuning on held-out data: too large, they erase the items' own signal.
    """

    transforms_gallery = True

    def __init__(self, *, r_g: float = 0.1, r_q: float = 0.1, k: int = 10):
        # a negative rate would smooth the gallery towards its neighbours, not separate it
        rate = {"minimum": 0.0, "error": CorrectionError}
        super().__init__({
            "r_g": checks.number("correction 'invgc': r_g", r_g, **rate),
            "r_q": checks.number("correction 'invgc': r_q", r_q, **rate),
            "k": checks.integer("correction 'invgc': k", k, minimum=1, error=CorrectionError),
        })

    def _gallery(self, modality: str, x: Tensor, chunk_size: int) -> tuple[Tensor, Tensor | None]:
        p = self._params
        x = F.normalize(x, dim=-1)
        banks = [
            (p["r_g"], self._bank(modality, x.device)),
            (p["r_q"], self._bank(_other(modality), x.device)),
        ]
        out = torch.empty_like(x)
        with torch.no_grad():
            for lo in range(0, len(x), chunk_size):
                g = x[lo : lo + chunk_size]
                update = g.clone()
                for rate, bank in banks:
                    if rate == 0.0:
                        continue
                    k = min(p["k"], len(bank))
                    sims, idx = _topk_scores(g, bank, k, chunk_size)
                    for j in range(k):  # sum_j s_j b_j without a [chunk, k, D] tensor
                        update -= (rate / k) * sims[:, j : j + 1] * bank[idx[:, j]]
                out[lo : lo + chunk_size] = F.normalize(update, dim=-1)
        return out, None


# ---- internals -------------------------------------------------------------------------------------
def _logsumexp_scores(gallery: Tensor, bank: Tensor, beta: float, chunk: int) -> Tensor:
    """Per gallery item, logsumexp over the bank of beta * cosine, in [chunk, chunk] blocks."""
    g_all = F.normalize(gallery, dim=-1)
    out = torch.empty(len(g_all), dtype=torch.float32, device=g_all.device)
    with torch.no_grad():
        for g0 in range(0, len(g_all), chunk):
            g = g_all[g0 : g0 + chunk]
            acc = torch.full((len(g),), float("-inf"), device=g.device)
            for b0 in range(0, len(bank), chunk):
                block = beta * (bank[b0 : b0 + chunk] @ g.T)  # [bank chunk, gallery chunk]
                acc = torch.logaddexp(acc, torch.logsumexp(block, dim=0))
            out[g0 : g0 + chunk] = acc
    return out


def _topk_scores(g: Tensor, bank: Tensor, k: int, chunk: int) -> tuple[Tensor, Tensor]:
    """The k highest cosines of each row of `g` against the bank, and their bank rows, by chunks."""
    vals = g.new_empty((len(g), 0))
    idx = torch.empty((len(g), 0), dtype=torch.long, device=g.device)
    for b0 in range(0, len(bank), chunk):
        block = g @ bank[b0 : b0 + chunk].T
        top = block.topk(min(k, block.shape[1]), dim=1)
        vals = torch.cat([vals, top.values], dim=1)
        idx = torch.cat([idx, top.indices + b0], dim=1)
        if vals.shape[1] > k:
            keep = vals.topk(k, dim=1)
            vals, idx = keep.values, idx.gather(1, keep.indices)
    return vals, idx


def _check_bank(name: str, bank: Mapping[str, ArrayLike], normalise: bool = True) -> dict[str, Tensor]:
    if not isinstance(bank, Mapping):
        raise CorrectionError(f"correction '{name}' fits on a bank {{'image': [Ni, D], 'text': [Nt, D]}} of "
                              f"training embeddings, not {type(bank).__name__}")
    bank = _bank_by_side(name, bank)
    out = {}
    for m in MODALITIES:
        t = _embeddings(f"bank['{m}']", bank[m])
        out[m] = (F.normalize(t, dim=-1) if normalise else t).contiguous()
    dims = {m: t.shape[1] for m, t in out.items()}
    if len(set(dims.values())) != 1:
        raise CorrectionError(f"the bank's modalities must share the embedding dimension, got {dims}: use "
                              "shared-space embeddings of one bound model")
    return out


def _bank_by_side(name: str, bank: Mapping[Any, ArrayLike]) -> dict[str, ArrayLike]:
    """The bank keyed by side ("image", "text"), whichever accepted names the caller used."""
    by_side: dict[str, ArrayLike] = {}
    unknown = []
    for key, value in bank.items():
        try:
            side = resolve_modality(key)
        except AnybindError:
            unknown.append(key)
            continue
        if side in by_side:
            raise CorrectionError(f"the bank for correction '{name}' gives the {side} side twice: name each "
                                  "side once")
        by_side[side] = value
    missing = [m for m in MODALITIES if m not in by_side]
    if unknown or missing:
        what = f"lacks {', '.join(repr(m) for m in missing)}" if missing else ""
        if unknown:
            what += (" and " if what else "") + f"has unknown {', '.join(map(repr, unknown))}"
        raise CorrectionError(f"the bank for correction '{name}' {what}: give training embeddings of both "
                              f"{' and '.join(MODALITIES)} (the query bank of one is the other's)")
    return by_side


def _side(modality: Any) -> str:
    """ "image" or "text" (the pair's first and second side) from any accepted name."""
    try:
        return resolve_modality(modality)
    except AnybindError:
        raise CorrectionError(f"modality must be one of {', '.join(MODALITIES)} (the pair's first and second "
                              f"side; 'first'/'second' and 0/1 are accepted too), not {modality!r}") from None


def _other(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(modality)]


def _beta(name: str, value: Any) -> float:
    return checks.positive(f"correction '{name}': beta", value, error=CorrectionError)
