"""Cross-modal retrieval recall@k, as pure functions.

Definition (as CLIP_benchmark's ``recall_at_k``): a query is retrieved at k when ANY of its
positives is among the k gallery items with the highest cosine similarity; recall@k is the
fraction of queries retrieved. Image -> text: an image's positives are all its captions.
Text -> image: a caption has exactly one positive, its image.

Ties, one rule, pessimistic: a positive tied with a negative ranks below it. So the rank
(0-based) of a query's best positive is the number of negatives scoring >= that positive's
score, and the query is retrieved at k when that number is < k. Ties among positives do not
matter (any positive counts). A model that maps everything to one point therefore scores 0,
never a lucky 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import integer
from ..errors import AnybindError

ArrayLike = Any  # numpy array or torch tensor
ScoreFn = Callable[[Tensor, "Tensor | None"], Tensor]  # (cosine block, offsets) -> keys


def best_positive_rank(scores: ArrayLike, positives: ArrayLike) -> Tensor:
    """Per query, the 0-based rank of its best positive: negatives scoring >= it (ties pessimistic).

    `scores` is [Nq, Ng]; `positives` a boolean [Nq, Ng] matrix with >= 1 positive per row.
    """
    s = _as_float_tensor("scores", scores)
    pos = torch.as_tensor(np.asarray(positives) if not isinstance(positives, Tensor) else positives)
    if s.ndim != 2 or tuple(pos.shape) != tuple(s.shape) or pos.dtype != torch.bool:
        raise AnybindError(
            f"scores must be [Nq, Ng] and positives a boolean matrix of the same shape, got "
            f"{tuple(s.shape)} and {tuple(pos.shape)} of {pos.dtype}"
        )
    pos = pos.to(s.device)
    if not bool(pos.any(dim=1).all()):
        missing = torch.nonzero(~pos.any(dim=1)).flatten()[:5].tolist()
        raise AnybindError(f"queries {missing} have no positive: every query needs at least one")
    best = s.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)
    return ((s >= best) & ~pos).sum(dim=1)


def recall_at_k(
    scores: ArrayLike, positives: ArrayLike, ks: Iterable[int] = (1, 5, 10)
) -> dict[int, float]:
    """Recall@k for each k on a full score matrix: ``{k: fraction of queries retrieved at k}``.

    The low-level definition; `retrieval_metrics` computes the same from embeddings in chunks.
    """
    ks = _check_ks(ks)
    rank = best_positive_rank(scores, positives)
    return {k: float((rank < k).double().mean()) for k in ks}


def retrieval_metrics(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int = 4096,
    *,
    image_offset: ArrayLike | None = None,
    text_offset: ArrayLike | None = None,
    score_fn: ScoreFn | None = None,
    image_gallery_emb: ArrayLike | None = None,
    text_gallery_emb: ArrayLike | None = None,
) -> dict[str, float]:
    """Image <-> text recall@k from embeddings (cosine), never holding the full score matrix.

    `text_to_image[j]` is the row in `image_emb` of caption j's image; an image may have several
    captions, and every image needs at least one. Scores are computed in blocks of
    ``chunk_size x chunk_size``, keeping per query only its best positive score and its ``max(ks)``
    highest negative scores, so memory is O(chunk_size^2 + N max(ks)) whatever the sizes
    (100k images x 500k captions fits). Returns ``image_to_text_R@k``, ``text_to_image_R@k`` and
    ``mean_R@k`` (the mean of the two directions) for each k.

    Hubness corrections (`anybind.align.corrections`, through its `apply_correction`) rank by
    a corrected score instead: `image_offset` (one value per image) is subtracted from every score
    of that image when images are the gallery (text -> image), `text_offset` (one per caption)
    likewise for image -> text. `score_fn(scores, offset)`, when given, replaces that subtraction:
    it maps a block of cosine scores [queries, gallery items] and the block's offsets
    ([gallery items], or None) to the ranking keys. `image_gallery_emb` / `text_gallery_emb`
    (same shapes as `image_emb` / `text_emb`) replace the embeddings of the gallery side only;
    the queries stay `image_emb` / `text_emb`. Ties stay pessimistic, on the keys.

    >>> retrieval_metrics(img, txt, np.arange(len(img)))["mean_R@1"]   # one caption per image
    """
    ks = _check_ks(ks)
    integer("chunk_size", chunk_size, minimum=1, error=AnybindError)
    images, texts, owner = _checked_pairs(image_emb, text_emb, text_to_image)
    image_gallery = _gallery_embeddings("image", image_gallery_emb, images)
    text_gallery = _gallery_embeddings("text", text_gallery_emb, texts)
    image_off = _offset("image_offset", image_offset, len(images), "image", images.device)
    text_off = _offset("text_offset", text_offset, len(texts), "caption", images.device)
    if score_fn is not None and not callable(score_fn):
        raise AnybindError(
            f"score_fn must be a function (scores, offset) -> keys, not {score_fn!r}"
        )
    i2t = _streamed_recall(
        images, text_gallery, partial(_captions_of_query_images, owner), ks, chunk_size,
        text_off, score_fn,
    )
    t2i = _streamed_recall(
        texts, image_gallery, partial(_images_of_query_texts, owner), ks, chunk_size,
        image_off, score_fn,
    )
    return _both_directions(i2t, t2i, ks)


def chance_recall(n_gallery: int, n_positives_per_query: int | Sequence[int], k: int) -> float:
    """Expected recall@k of a random ranking, exactly: ``1 - C(n - p, k) / C(n, k)``.

    The chance that k items drawn without replacement from a gallery of n miss all p positives,
    subtracted from 1. With a sequence of p (one per query), the mean over queries.
    """
    n = integer("n_gallery", n_gallery, minimum=1, error=AnybindError)
    k = integer("k", k, minimum=1, error=AnybindError)
    if isinstance(n_positives_per_query, (Sequence, np.ndarray)):
        counts = [int(p) for p in np.asarray(n_positives_per_query).ravel()]
        if not counts:
            raise AnybindError("n_positives_per_query is empty: give one count per query")
        return float(np.mean([chance_recall(n, p, k) for p in counts]))
    p = integer("n_positives_per_query", n_positives_per_query, minimum=1, error=AnybindError)
    if p > n:
        raise AnybindError(f"a query cannot have {p} positives in a gallery of {n}")
    if k > n - p:
        return 1.0
    miss = 1.0
    for i in range(k):  # C(n-p, k) / C(n, k) as a product: no huge integers
        miss *= (n - p - i) / (n - i)
    return 1.0 - miss


def chance_retrieval_metrics(anchor_of_partner: ArrayLike, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected image <-> text recall@k of a random ranking on one split, keyed as `retrieval_metrics`.

    `anchor_of_partner[j]` names the anchor (image) of partner row j (caption): any integer id,
    such as a row of the anchor table or an index into the split's images (`text_to_image`).
    Image -> text: the gallery is every caption of the split and an image's positives are its
    own captions (any one counts), averaged over images. Text -> image: the gallery is the
    split's images, one positive each. ``mean_R@k`` is the mean of the two directions.

    >>> chance_retrieval_metrics(np.array([0, 0, 1]), ks=(1,))["image_to_text_R@1"]  # (2/3 + 1/3) / 2
    0.5
    """
    ks = _check_ks(ks)
    captions_per_image = _captions_per_image(anchor_of_partner)
    n_captions, n_images = int(captions_per_image.sum()), len(captions_per_image)
    out: dict[str, float] = {}
    for k in ks:
        i2t = float(np.mean([chance_recall(n_captions, int(c), k) for c in captions_per_image]))
        t2i = chance_recall(n_images, 1, k)
        out[f"image_to_text_R@{k}"], out[f"text_to_image_R@{k}"] = i2t, t2i
        out[f"mean_R@{k}"] = (i2t + t2i) / 2
    return out


# ---- internals -------------------------------------------------------------------------------------
def _streamed_recall(
    queries: Tensor,
    gallery: Tensor,
    positives_in_block: Callable[[int, int, int, int], tuple[Tensor, Tensor]],
    ks: list[int],
    chunk: int,
    offset: Tensor | None = None,
    score_fn: ScoreFn | None = None,
) -> dict[int, float]:
    """Recall@k by blocks: a query is retrieved at k when its best positive beats its k-th best negative.

    That is the pessimistic rule: (negatives >= best positive) < k  <=>  k-th largest negative < best.
    Per query only the best positive score and the top ``max(ks)`` negative scores are kept; the
    positives of a block come as sparse (row, column) indices (a query has few). Scores are the
    cosine minus the gallery item's `offset`, or ``score_fn(cosine, offset)`` when given.
    """
    kmax = max(ks)
    hits = dict.fromkeys(ks, 0)
    ninf = float("-inf")
    with torch.no_grad():
        for q0 in range(0, len(queries), chunk):
            q1 = min(q0 + chunk, len(queries))
            q = queries[q0:q1]
            best = top_neg = None
            for g0 in range(0, len(gallery), chunk):
                g1 = min(g0 + chunk, len(gallery))
                scores = q @ gallery[g0:g1].T
                off = None if offset is None else offset[g0:g1]
                if score_fn is not None:
                    scores = score_fn(scores, off)
                elif off is not None:
                    scores = scores - off
                if tuple(scores.shape) != (q1 - q0, g1 - g0):
                    raise AnybindError(
                        f"score_fn returned shape {tuple(scores.shape)} for a block of "
                        f"{(q1 - q0, g1 - g0)} scores: it must return one key per score"
                    )
                if best is None:  # the keys' dtype (a score_fn may rank in float64)
                    best = scores.new_full((q1 - q0,), ninf)
                    top_neg = scores.new_full((q1 - q0, kmax), ninf)
                rows, cols = positives_in_block(q0, q1, g0, g1)
                best.scatter_reduce_(0, rows, scores[rows, cols], reduce="amax")
                scores[rows, cols] = ninf  # what is left are the negatives
                block_top = scores.topk(min(kmax, g1 - g0), dim=1).values
                top_neg = torch.cat([top_neg, block_top], dim=1).topk(kmax, dim=1).values
            for k in ks:
                hits[k] += int((best > top_neg[:, k - 1]).sum())
    return {k: hits[k] / len(queries) for k in ks}


def _captions_of_query_images(owner: Tensor, q0: int, q1: int, g0: int, g1: int) -> tuple[Tensor, Tensor]:
    """(row, column) in the block of each positive: images q0..q1 x captions g0..g1."""
    cols = torch.nonzero((owner[g0:g1] >= q0) & (owner[g0:g1] < q1)).flatten()
    return owner[g0 + cols] - q0, cols


def _images_of_query_texts(owner: Tensor, q0: int, q1: int, g0: int, g1: int) -> tuple[Tensor, Tensor]:
    """(row, column) in the block of each positive: captions q0..q1 x images g0..g1."""
    rows = torch.nonzero((owner[q0:q1] >= g0) & (owner[q0:q1] < g1)).flatten()
    return rows, owner[q0 + rows] - g0


def _both_directions(i2t: dict[int, float], t2i: dict[int, float], ks: list[int]) -> dict[str, float]:
    """The result keys: every k of image -> text, then of text -> image, then their mean."""
    out = {f"image_to_text_R@{k}": i2t[k] for k in ks}
    out.update({f"text_to_image_R@{k}": t2i[k] for k in ks})
    out.update({f"mean_R@{k}": (i2t[k] + t2i[k]) / 2 for k in ks})
    return out


def _checked_pairs(image_emb: ArrayLike, text_emb: ArrayLike,
                   text_to_image: ArrayLike) -> tuple[Tensor, Tensor, Tensor]:
    """The L2-normalised image and text embeddings and each caption's image row, all checked."""
    images = _embeddings("image_emb", image_emb)
    texts = _embeddings("text_emb", text_emb).to(images.device)
    if images.shape[1] != texts.shape[1]:
        raise AnybindError(
            f"image_emb and text_emb must share the embedding dimension, got {images.shape[1]} "
            f"and {texts.shape[1]}"
        )
    owner = _text_to_image(text_to_image, len(texts), len(images)).to(images.device)
    return F.normalize(images, dim=-1), F.normalize(texts, dim=-1), owner


def _captions_per_image(anchor_of_partner: ArrayLike) -> np.ndarray:
    """How many partner rows each distinct anchor has (in anchor-id order)."""
    anchors = np.asarray(
        anchor_of_partner.cpu() if isinstance(anchor_of_partner, Tensor) else anchor_of_partner
    )
    if anchors.ndim != 1 or anchors.size == 0:
        raise AnybindError(
            f"anchor_of_partner must be a non-empty 1-D array (one anchor per partner row), got "
            f"shape {anchors.shape}"
        )
    if not np.issubdtype(anchors.dtype, np.integer):
        raise AnybindError(f"anchor_of_partner must hold integer anchor ids, not {anchors.dtype}")
    return np.unique(anchors, return_counts=True)[1]


def _as_float_tensor(what: str, x: ArrayLike) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise AnybindError(f"{what} must hold numbers, not {t.dtype}")
    return t.float()


def _embeddings(what: str, x: ArrayLike) -> Tensor:
    t = _as_float_tensor(what, x)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise AnybindError(f"{what} must be a non-empty [N, D] matrix, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise AnybindError(
            f"{what} holds NaN or inf values: check the features and the projector that made them"
        )
    return t


def _gallery_embeddings(modality: str, x: ArrayLike | None, queries: Tensor) -> Tensor:
    """The (normalised) embeddings of `modality` as a gallery: `x`, or the query ones."""
    if x is None:
        return queries
    what = f"{modality}_gallery_emb"
    t = _embeddings(what, x).to(queries.device)
    if t.shape != queries.shape:
        raise AnybindError(
            f"{what} must have the shape of {modality}_emb {tuple(queries.shape)} (the same "
            f"items, corrected), got {tuple(t.shape)}"
        )
    return F.normalize(t, dim=-1)


def _offset(
    what: str, x: ArrayLike | None, n: int, item: str, device: torch.device
) -> Tensor | None:
    """A per-gallery-item score offset: 1-D, one finite value per item, or None."""
    if x is None:
        return None
    t = _as_float_tensor(what, x)
    if t.ndim != 1 or len(t) != n:
        raise AnybindError(
            f"{what} must give one value per {item} ({n}), got shape {tuple(t.shape)}: compute "
            "it on the same gallery that is passed as the embeddings"
        )
    if not bool(torch.isfinite(t).all()):
        raise AnybindError(f"{what} holds NaN or inf values: check the correction that made it")
    return t.to(device)


def _text_to_image(text_to_image: ArrayLike, n_texts: int, n_images: int) -> Tensor:
    owner = torch.as_tensor(
        np.asarray(text_to_image) if not isinstance(text_to_image, Tensor) else text_to_image
    )
    if owner.ndim != 1 or len(owner) != n_texts:
        raise AnybindError(
            f"text_to_image must give one image row per caption ({n_texts}), got shape "
            f"{tuple(owner.shape)}"
        )
    if owner.is_floating_point() or owner.dtype == torch.bool:
        raise AnybindError(f"text_to_image must hold integer image rows, not {owner.dtype}")
    owner = owner.long()
    if int(owner.min()) < 0 or int(owner.max()) >= n_images:
        raise AnybindError(
            f"text_to_image holds image rows outside 0..{n_images - 1} "
            f"(min {int(owner.min())}, max {int(owner.max())})"
        )
    captions = torch.bincount(owner.cpu(), minlength=n_images)
    if bool((captions == 0).any()):
        lonely = torch.nonzero(captions == 0).flatten()[:5].tolist()
        raise AnybindError(
            f"{int((captions == 0).sum())} images have no caption (rows {lonely}...): "
            "image -> text recall needs at least one per image; drop those images"
        )
    return owner


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = list(ks)
    if not ks:
        raise AnybindError("ks is empty: give the k of recall@k, e.g. (1, 5, 10)")
    return [integer("k", k, minimum=1, error=AnybindError) for k in ks]
