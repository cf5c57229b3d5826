"""Fitting the parts of a bound model that need no gradient, and scoring a bound model on a split.

The trainer (`align.trainer.train`) calls these for a recipe (blend before training, so that
validation and early stopping read the blended model; correction after); `baseline_model` makes
a training-free bound model. Every caller that scores retrieval calls `split_retrieval`, so a
number means the same thing in training, evaluation and a bundle.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..metrics.retrieval import recall_at_k, retrieval_metrics
from .bound import ANCHOR_SIDE, PARTNER_SIDE, BoundModel
from .data import PairedFeatures, Pairs
from .joint_losses import joint_scores

BANK_SIZE = 4096  # training items a retrieval correction's bank holds
RETRIEVAL_KS = (1, 5, 10)


def fit_baseline(name: str, options: dict, data: PairedFeatures, train_pairs: Pairs):
    """A training-free baseline fitted on the train pairs (the last layer of each side)."""
    from .baselines import PairedArrays, build_baseline

    a, p = data.side(data.anchor_name), data.side(data.partner_name)
    anchors, inverse = np.unique(train_pairs.anchor_rows, return_inverse=True)
    fit = PairedArrays(a.rows(anchors)[-1].numpy(), p.rows(train_pairs.partner_rows)[-1].numpy(),
                       inverse.astype(np.int64))
    return build_baseline(name, **options).fit(fit)


def fit_blend(blend: dict, data: PairedFeatures, train_pairs: Pairs) -> tuple[Any, float]:
    """(fitted baseline, weight of the trained space) for a recipe's `blend`, or (None, 1.0)."""
    if not blend or blend.get("name", "none") == "none":
        return None, 1.0
    options = {k: v for k, v in blend.items() if k not in ("name", "weight")}
    return fit_baseline(blend["name"], options, data, train_pairs), float(blend.get("weight", 0.5))


def fit_correction(cfg: dict | None, model: BoundModel, data: PairedFeatures, train_pairs: Pairs, seed: int):
    """The retrieval correction of `cfg`, fitted on a seeded bank of at most BANK_SIZE training
    items' embeddings (every caption of a kept item), or None."""
    if not cfg or cfg.get("name", "none") == "none":
        return None
    from .corrections import build_correction

    items = np.unique(train_pairs.item)
    rng = np.random.default_rng([max(seed, 0), 7])
    keep = np.isin(train_pairs.item, rng.choice(items, size=min(BANK_SIZE, len(items)), replace=False))
    za = model.encode(data.anchor_name, data.side(data.anchor_name).rows(np.unique(train_pairs.anchor_rows[keep])))
    zp = model.encode(data.partner_name, data.side(data.partner_name).rows(train_pairs.partner_rows[keep]))
    params = {k: v for k, v in cfg.items() if k != "name"}
    return build_correction(cfg["name"], **params).fit({ANCHOR_SIDE: za, PARTNER_SIDE: zp})


INTO_MAP_BASELINES = ("ridge", "procrustes", "nn-transfer", "asif")  # what --add reports beside training


def added_map_model(name: str, options: dict, source: BoundModel, modality: str, data: PairedFeatures,
                    train_pairs: Pairs) -> BoundModel:
    """Progressive binding with no training: `source` plus `modality` mapped onto the frozen bound
    space of the other side of `data` by a training-free map (`align/into.py`), fitted on the train
    pairs (each partner row's target: its anchor's bound embedding, blend included)."""
    from .into import build_into_map

    to = data.anchor_name if modality == data.partner_name else data.partner_name
    rows = train_pairs.anchor_rows if to == data.anchor_name else train_pairs.partner_rows
    own = train_pairs.partner_rows if to == data.anchor_name else train_pairs.anchor_rows
    targets, inverse = np.unique(rows, return_inverse=True)
    y = source.encode(to, data.side(to).rows(targets)).cpu().numpy()[inverse]
    x = data.side(modality).rows(own)[-1].numpy()
    part = build_into_map(name, **options).fit(x, y, item=train_pairs.item)
    return source.with_added(modality, part, to, data.side(modality).layers)


def baseline_model(name: str, options: dict, data: PairedFeatures, train_pairs: Pairs,
                   correction: dict | None = None, seed: int = 0) -> BoundModel:
    """A training-free bound model: a fitted baseline (+ its correction)."""
    model = BoundModel(data.layers, data.anchor_name, baseline=fit_baseline(name, options, data, train_pairs))
    model.correction = fit_correction(correction, model, data, train_pairs, seed)
    return model


def embed_split(model, data: PairedFeatures, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Shared-space rows of a split: unique anchors, every partner row, partner -> anchor index."""
    anchors, inverse = np.unique(pairs.anchor_rows, return_inverse=True)
    za = model.encode(data.anchor_name, data.side(data.anchor_name).rows(anchors))
    zp = model.encode(data.partner_name, data.side(data.partner_name).rows(pairs.partner_rows))
    return za, zp, inverse.astype(np.int64)


def split_retrieval(model: BoundModel, data: PairedFeatures, pairs: Pairs, ks=RETRIEVAL_KS) -> dict:
    """Recall@k both ways on a split, ranked as the model ranks (its correction applied)."""
    za, zp, t2i = embed_split(model, data, pairs)
    return retrieval_metrics(**model.ranking_inputs(za, zp), text_to_image=t2i, ks=ks)


def tuple_rows(data: PairedFeatures, pairs: Pairs) -> dict[str, np.ndarray]:
    """Per modality, the store row of each tuple (-1 where the tuple lacks it)."""
    return {data.anchor_name: pairs.anchor_rows, data.partner_name: pairs.partner_rows, **pairs.extra_rows}


def pair_retrieval(model: BoundModel, data: PairedFeatures, pairs: Pairs, gallery: str, query: str,
                   ks=RETRIEVAL_KS) -> dict:
    """Recall@k both ways between two modalities on the tuples holding both: the gallery side's
    distinct rows, each query row ranked against them (its positive: the gallery row of its tuple,
    the first one when it joins several), CLIP_benchmark's recall."""
    rows = tuple_rows(data, pairs)
    both = (rows[gallery] >= 0) & (rows[query] >= 0)
    g_rows, q_first = rows[gallery][both], np.unique(rows[query][both], return_index=True)[1]
    g_unique, g_index = np.unique(g_rows, return_inverse=True)
    zg = model.encode(gallery, data.side(gallery).rows(g_unique))
    zq = model.encode(query, data.side(query).rows(rows[query][both][q_first]))
    return retrieval_metrics(image_emb=zg, text_emb=zq, text_to_image=g_index.ravel()[q_first].astype(np.int64), ks=ks)


def tuple_retrieval(model: BoundModel, data: PairedFeatures, pairs: Pairs, ks=RETRIEVAL_KS) -> dict:
    """Recall@k of every pair of modalities (keys ``"image-audio/mean_R@10"``, gallery first) and
    their mean under the plain names (``mean_R@10``): what N-modality training validates by."""
    names, out, per_pair = data.names, {}, []
    for i, gallery in enumerate(names):
        for query in names[i + 1:]:
            metrics = pair_retrieval(model, data, pairs, gallery, query, ks)
            per_pair.append(metrics)
            out.update({f"{gallery}-{query}/{k}": v for k, v in metrics.items()})
    mean = {k: float(np.mean([m[k] for m in per_pair])) for k in per_pair[0]}
    return {**mean, **out}


def joint_query_retrieval(model: BoundModel, data: PairedFeatures, pairs: Pairs, gallery: str, rule: str,
                          ks=RETRIEVAL_KS) -> dict:
    """Recall@k of the joint query "every other modality -> `gallery`" (`joint_scores` with
    `rule`) on the tuples holding every modality: one query per distinct combination of the
    other modalities' rows, its positive the gallery row of its tuple, ranked against the distinct
    gallery rows (ties count against it, as CLIP_benchmark's recall). Keys ``R@k``."""
    rows = tuple_rows(data, pairs)
    full = np.all([r >= 0 for r in rows.values()], axis=0)
    others = [m for m in data.names if m != gallery]
    query_rows = np.stack([rows[m][full] for m in others], axis=1)
    _, first = np.unique(query_rows, axis=0, return_index=True)
    g_unique, g_index = np.unique(rows[gallery][full], return_inverse=True)
    zg = model.encode(gallery, data.side(gallery).rows(g_unique))
    zq = {m: model.encode(m, data.side(m).rows(query_rows[first, i])) for i, m in enumerate(others)}
    scores = joint_scores(zq, zg, rule=rule)
    positives = torch.zeros(scores.shape, dtype=torch.bool)
    positives[torch.arange(len(first)), torch.as_tensor(g_index.ravel()[first])] = True
    return {f"R@{k}": v for k, v in recall_at_k(scores, positives, ks).items()}


def joint_retrieval(model: BoundModel, data: PairedFeatures, pairs: Pairs, rule: str, ks=RETRIEVAL_KS) -> dict:
    """`joint_query_retrieval` with each modality in turn as the gallery (keys
    ``"text+audio->image/R@10"``) and their mean under the plain names (``mean_R@10``): what a
    model scored by the multilinear rule (Symile) validates by, since its pairwise cosines are not
    what it trains."""
    out, per_gallery = {}, []
    for gallery in data.names:
        metrics = joint_query_retrieval(model, data, pairs, gallery, rule, ks)
        per_gallery.append(metrics)
        query = "+".join(m for m in data.names if m != gallery)
        out.update({f"{query}->{gallery}/{k}": v for k, v in metrics.items()})
    mean = {f"mean_{k}": float(np.mean([m[k] for m in per_gallery])) for k in per_gallery[0]}
    return {**mean, **out}
