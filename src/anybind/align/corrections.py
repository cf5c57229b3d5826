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
    same = RetrievalCorrection.load("bundle/correction")    # correction.json + bank.safetensors

Registered: ``none``, ``qb-norm`` (inverted softmax), ``dual-softmax`` (DSL with a bank),
``invgc`` (inverse graph convolution with LocalAdj).
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import AnybindError
from ..metrics.retrieval import ArrayLike, ScoreFn, _embeddings

MODALITIES = ("image", "text")
CONFIG_FILE = "correction.json"
BANK_FILE = "bank.safetensors"
FORMAT = 1

C = TypeVar("C", bound="RetrievalCorrection")

#: name -> correction class; filled by `register_correction`.
CORRECTIONS: dict[str, type[RetrievalCorrection]] = {}


def register_correction(name: str) -> Callable[[type[C]], type[C]]:
    """Class decorator: make a `RetrievalCorrection` subclass buildable and loadable by `name`."""

    def register(cls: type[C]) -> type[C]:
        known = CORRECTIONS.get(name)
        if known is not None and known is not cls:
            raise AnybindError(
                f"correction name '{name}' is already registered by {known.__qualname__}: "
                "choose another name"
            )
        cls.name = name
        CORRECTIONS[name] = cls
        return cls

    return register


def correction_options(name: str) -> dict[str, Any]:
    """The parameters a registered correction accepts, with their defaults."""
    return {
        p.name: p.default
        for p in inspect.signature(_correction_class(name).__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def build_correction(name: str, **params: Any) -> RetrievalCorrection:
    """Build a registered correction by name (unfitted): ``build_correction("qb-norm", beta=20)``.

    ``build_correction(**corr.config())`` rebuilds the same correction.
    """
    accepted = correction_options(name)
    for key in params:
        if key not in accepted:
            raise AnybindError(
                f"correction '{name}' has no parameter '{key}'{_did_you_mean(key, accepted)}; "
                f"it accepts: {', '.join(sorted(accepted)) or 'no parameters'}"
            )
    return _correction_class(name)(**params)


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
        raise AnybindError(
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
        if not self.name or CORRECTIONS.get(self.name) is not type(self):
            raise AnybindError(
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
        if modality not in MODALITIES:
            raise AnybindError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise AnybindError(f"chunk_size must be a positive integer, not {chunk_size!r}")
        x = _embeddings(f"{modality} gallery embeddings", emb)
        if not self.needs_bank:
            return self._gallery(modality, x, chunk_size)
        if self.bank is None:
            raise AnybindError(
                f"correction '{self.name}' is not fitted: call fit(bank) with training "
                "embeddings of both modalities first (or load a saved one)"
            )
        dim = next(iter(self.bank.values())).shape[1]
        if x.shape[1] != dim:
            raise AnybindError(
                f"correction '{self.name}' was fitted on {dim}-dim embeddings, but the "
                f"{modality} gallery is {x.shape[1]}-dim: use the same model's embeddings"
            )
        return self._gallery(modality, x, chunk_size)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``correction.json`` (and ``bank.safetensors`` when fitted on a bank; no pickles)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.needs_bank:
            if self.bank is None:
                raise AnybindError(
                    f"correction '{self.name}' is not fitted: call fit(bank) before saving it"
                )
            bank = {m: t.detach().to("cpu").contiguous() for m, t in self.bank.items()}
            _atomic_write(
                directory / BANK_FILE,
                lambda tmp: save_file(
                    bank, str(tmp), metadata={"format": "pt", "correction": self.name}
                ),
            )
        text = json.dumps({"format": FORMAT, **self.config()}, indent=2, sort_keys=True)
        _atomic_write(directory / CONFIG_FILE, lambda tmp: tmp.write_text(text + "\n"))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RetrievalCorrection:
        """Rebuild a saved correction from its folder, bank included, exactly as it was saved."""
        from safetensors.torch import load_file

        directory = Path(directory)
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise AnybindError(
                f"no {CONFIG_FILE} in {directory}: give the folder that RetrievalCorrection.save wrote"
            )
        try:
            config = json.loads(path.read_text())
            fmt, name = config.pop("format"), config.pop("name")
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise AnybindError(f"{path} is corrupt ({e}): save the correction again") from e
        if fmt != FORMAT:
            raise AnybindError(
                f"{path} has format {fmt!r}; this anybind reads format {FORMAT}: upgrade anybind"
            )
        correction = build_correction(name, **config)
        if cls is not RetrievalCorrection and not isinstance(correction, cls):
            raise AnybindError(
                f"{directory} holds a '{name}' correction, not a {cls.__qualname__}: load it "
                "with RetrievalCorrection.load"
            )
        if correction.needs_bank:
            bank_path = directory / BANK_FILE
            if not bank_path.is_file():
                raise AnybindError(
                    f"no {BANK_FILE} in {directory}: the save was interrupted; save it again"
                )
            try:
                bank = load_file(str(bank_path), device="cpu")
            except Exception as e:  # safetensors raises its own error types for garbled files
                raise AnybindError(
                    f"{bank_path} is corrupt ({e}): save the correction again"
                ) from e
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
        super().__init__({"beta": _positive_float(self.name, "beta", beta)})

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
        super().__init__({"beta": _positive_float(self.name, "beta", beta)})

    @property
    def score_fn(self) -> ScoreFn:
        return self._keys

    def _keys(self, scores: Tensor, offset: Tensor | None) -> Tensor:
        if offset is None:
            raise AnybindError(
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
        super().__init__(
            {
                "r_g": _nonnegative_float(self.name, "r_g", r_g),
                "r_q": _nonnegative_float(self.name, "r_q", r_q),
                "k": _positive_int(self.name, "k", k),
            }
        )

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


def _check_bank(
    name: str, bank: Mapping[str, ArrayLike], normalise: bool = True
) -> dict[str, Tensor]:
    if not isinstance(bank, Mapping):
        raise AnybindError(
            f"correction '{name}' fits on a bank {{'image': [Ni, D], 'text': [Nt, D]}} of "
            f"training embeddings, not {type(bank).__name__}"
        )
    unknown = sorted(set(bank) - set(MODALITIES))
    missing = [m for m in MODALITIES if m not in bank]
    if unknown or missing:
        what = f"lacks {', '.join(repr(m) for m in missing)}" if missing else ""
        if unknown:
            what += (" and " if what else "") + f"has unknown {', '.join(map(repr, unknown))}"
        raise AnybindError(
            f"the bank for correction '{name}' {what}: give training embeddings of both "
            f"{' and '.join(MODALITIES)} (the query bank of one is the other's)"
        )
    out = {}
    for m in MODALITIES:
        t = _embeddings(f"bank['{m}']", bank[m])
        out[m] = (F.normalize(t, dim=-1) if normalise else t).contiguous()
    dims = {m: t.shape[1] for m, t in out.items()}
    if len(set(dims.values())) != 1:
        raise AnybindError(
            f"the bank's modalities must share the embedding dimension, got {dims}: use "
            "shared-space embeddings of one bound model"
        )
    return out


def _other(modality: str) -> str:
    return MODALITIES[1 - MODALITIES.index(modality)]


def _correction_class(name: str) -> type[RetrievalCorrection]:
    if not isinstance(name, str) or name not in CORRECTIONS:
        raise AnybindError(
            f"unknown correction {name!r}{_did_you_mean(str(name), CORRECTIONS)}; known: "
            f"{', '.join(sorted(CORRECTIONS))}"
        )
    return CORRECTIONS[name]


def _did_you_mean(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _positive_float(name: str, what: str, value: Any) -> float:
    v = _finite_float(name, what, value)
    if v <= 0:
        raise AnybindError(f"correction '{name}': {what} must be > 0, not {value!r}")
    return v


def _nonnegative_float(name: str, what: str, value: Any) -> float:
    v = _finite_float(name, what, value)
    if v < 0:
        raise AnybindError(
            f"correction '{name}': {what} must be >= 0 (a negative rate would smooth, not "
            f"separate), not {value!r}"
        )
    return v


def _finite_float(name: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AnybindError(f"correction '{name}': {what} must be a finite number, not {value!r}")
    return float(value)


def _positive_int(name: str, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AnybindError(f"correction '{name}': {what} must be an integer >= 1, not {value!r}")
    return int(value)


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file and rename, so a killed save never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AnybindError(
            f"could not write {path} ({e.strerror or e}): check the folder is writable "
            "and the disk is not full"
        ) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
