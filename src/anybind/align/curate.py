"""Concept-coverage curation (freeze-align): a training subset of n items that covers a vocabulary.

    pool = load_pool({"image": img_store, "text": txt_store}, fold=0)
    concepts = read_concepts("wordnet")                        # or a file, one concept a line
    result = curate_pool(pool, concepts, embed_concepts(txt_store, concepts), n=1000, cap=4)
    write_curation(result, "curated/")      # items.txt (for `anybind train --items`), coverage.json/.png

As Maniparambil et al. curate their pairs ("From Unimodal to Multimodal: Scaling up Projectors to
Align Modalities"): each concept is embedded by the text encoder that made the caption store, each
caption goes to its most similar concept (an item to the concept of its best caption), a concept
keeps at most `cap` items, and the subset is filled round-robin across concepts (each round every
concept offers its next most similar item; a round is taken in order of similarity) until n.
Near-duplicates: an item whose image features have a raw cosine above `duplicate_cosine` with an
item already selected is skipped (its concept offers its next item instead). The pool is the
train split only (the index's, or a cross-validation fold's), so val and test items are never chosen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_text, write_with
from ..errors import AnybindError

WORDNET_DIR = Path("/usr/share/wordnet")  # Debian's wordnet-base


class CurationError(AnybindError):
    """Curation asked for something the pool, the vocabulary or the settings cannot give."""


# ---- the vocabulary --------------------------------------------------------------------------------
def wordnet_nouns(root: str | os.PathLike = WORDNET_DIR, min_tagged: int = 1) -> list[str]:
    """Single-word WordNet nouns with at least `min_tagged` senses tagged in SemCor (1: the 9,246
    attested in running text, which drops rare and technical words), sorted."""
    index = Path(root) / "index.noun"
    if not index.is_file():
        raise CurationError(f"WordNet's noun index {index} is missing: install it (apt-get install wordnet-base) "
                            "or give --concepts FILE (one concept a line)")
    out = []
    for line in index.read_text(encoding="utf-8").splitlines():
        if line.startswith(" "):  # the licence header
            continue
        f = line.split()
        lemma, n_pointers = f[0], int(f[3])
        if lemma.isalpha() and int(f[5 + n_pointers]) >= min_tagged:  # f[5+p]: tagsense_cnt
            out.append(lemma)
    return sorted(out)


def read_concepts(spec: str) -> list[str]:
    """`wordnet`, `wordnet:MIN_TAGGED` (0: every single-word noun), or a text file, one concept a
    line (blank lines and `#` comments skipped, repeats dropped, first kept)."""
    name, _, arg = str(spec).partition(":")
    if name == "wordnet" and not Path(spec).exists():
        if arg and not arg.isdigit():
            raise CurationError(f"--concepts wordnet:MIN takes a whole number of tagged senses, not {arg!r}")
        concepts = wordnet_nouns(min_tagged=int(arg or 1))
    else:
        path = Path(spec)
        if not path.is_file():
            raise CurationError(f"--concepts {spec!r} is neither 'wordnet[:MIN]' nor a file (one concept a line)")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        concepts = list(dict.fromkeys(ln for ln in lines if ln and not ln.startswith("#")))
    if len(concepts) < 2:
        raise CurationError(f"--concepts {spec!r} gives {len(concepts)} concept(s): curation balances across at least 2")
    return concepts


def embed_concepts(text_store, concepts: Sequence[str], layer: str | None = None, batch_size: int = 256,
                   progress: bool = False) -> np.ndarray:
    """Concept features as `text_store` would hold them (its encoder, layer, pooling, precision)."""
    from tqdm.auto import tqdm

    from ..encoders import create_encoder
    from ..features.encode import encode_as_stored, store_encoding

    how = store_encoding(text_store)
    layer = layer or list(text_store.layers)[-1]
    encoder = create_encoder(how["encoder"])
    parts = []
    for lo in tqdm(range(0, len(concepts), batch_size), desc="embed concepts", unit="batch", disable=not progress):
        parts.append(encode_as_stored(encoder, list(concepts[lo : lo + batch_size]), [layer], how["pooling"],
                                      how["precision"], how["dtype"], batch_size)[0].numpy())
    return np.concatenate(parts)


# ---- the pool ---------------------------------------------------------------------------------------
@dataclass
class Pool:
    """The candidate items (one split's), their captions' and images' features."""

    item_ids: list[str]  # per item
    image: np.ndarray  # [items, d] the anchor's features
    captions: np.ndarray  # [captions, d]
    caption_item: np.ndarray  # per caption: its item's position in item_ids
    text_store: object = None  # the caption store: its encoder embeds the concepts
    text_layer: str = "final"  # the layer read (the concepts are embedded at it too)

    @property
    def encoder(self) -> str:
        return self.text_store.key["encoder"]["spec"] if self.text_store is not None else ""


def load_pool(stores: dict, layers: dict[str, list[str]] | None = None, fold: int | None = None,
              split: str = "train") -> Pool:
    """The `split` items of an image store and a caption store joined by item id; the last layer
    each side reads."""
    from .data import PairedFeatures

    data = PairedFeatures(stores, layers, fold=fold)
    text = data.partner_name
    if data.side(text).store.modality != "text" or data.by_row:
        raise CurationError("curation needs an image (or other one-row-per-item) store and a caption store: "
                            f"got {data.anchor_name} ({data.side(data.anchor_name).store.modality}) and "
                            f"{text} ({data.side(text).store.modality})")
    pairs = data.pairs(split)
    rows, caption_item = np.unique(pairs.item, return_inverse=True)
    anchor, captions = data.side(data.anchor_name), data.side(text)
    ids = anchor.store.item_ids
    return Pool([ids[int(r)] for r in rows], anchor.rows(rows)[-1].numpy(), captions.rows(pairs.partner_rows)[-1].numpy(),
                caption_item.ravel(), captions.store, captions.layers[-1])


# ---- assignment and selection -------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def assign_concepts(captions: np.ndarray, caption_item: np.ndarray, concepts: np.ndarray,
                    block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(concept, cosine) per item: the most similar concept of its best-matching caption (the first
    on ties, so the same input gives the same assignment)."""
    caption_item = np.asarray(caption_item)
    n_items = int(caption_item.max()) + 1 if len(caption_item) else 0
    c = _unit(concepts)
    best, score = np.empty(len(captions), np.int64), np.empty(len(captions), np.float32)
    for lo in range(0, len(captions), block):
        sim = _unit(captions[lo : lo + block]) @ c.T
        best[lo : lo + block] = sim.argmax(1)
        score[lo : lo + block] = sim[np.arange(len(sim)), best[lo : lo + block]]
    order = np.lexsort((np.arange(len(score)), -score, caption_item))  # per item, best caption first
    first = order[np.r_[True, caption_item[order][1:] != caption_item[order][:-1]]]
    concept, cosine = np.full(n_items, -1, np.int64), np.full(n_items, -np.inf, np.float32)
    concept[caption_item[first]], cosine[caption_item[first]] = best[first], score[first]
    return concept, cosine


class NearDuplicates:
    """The items selected so far, and which candidates have a raw cosine above `threshold` with any
    of them (worked out when asked): a selection of n from a pool of N items costs O(n^2 d), never
    the pool's N^2 pairs (a pool is the larger the better: 10^5-10^7 items). One per selection."""

    def __init__(self, features: np.ndarray, threshold: float, block: int = 8192):
        self.x, self.threshold, self.block = _unit(features), float(threshold), block
        self.chosen = np.empty((64, self.x.shape[1]), np.float32)  # rows of the selected items, in order
        self.count = 0
        self._known: dict[int, tuple[int, bool]] = {}  # item -> (selected count when checked, near one of them)

    def add(self, item: int) -> None:
        if self.count == len(self.chosen):  # doubling: O(n) copies in all
            self.chosen = np.concatenate([self.chosen, np.empty_like(self.chosen)])
        self.chosen[self.count] = self.x[item]
        self.count += 1

    def near(self, candidates: Sequence[int], since: int | Sequence[int] = 0) -> np.ndarray:
        """bool per candidate (pool positions): a near-duplicate of a selected item, the `since`-th on
        (one number, or one per candidate)."""
        since = np.broadcast_to(np.asarray(since, np.int64), (len(candidates),))
        hit = np.zeros(len(candidates), bool)
        if len(candidates) and self.count > since.min():
            q = self.x[np.asarray(candidates, np.int64)]
            for lo in range(int(since.min()), self.count, self.block):  # bounded memory however many are chosen
                hi = min(lo + self.block, self.count)
                over = q @ self.chosen[lo:hi].T > self.threshold
                hit |= (over & (np.arange(lo, hi) >= since[:, None])).any(axis=1)
        return hit

    def blocked(self, candidates: Sequence[int], ahead: Sequence[int] = ()) -> np.ndarray:
        """`near(candidates)`, remembering each answer with how many items were selected then, so a
        second question reads only the items selected since; `ahead` (items asked about soon) are
        worked out in the same pass: a few large products instead of one small one a round."""
        fresh = [c for c in dict.fromkeys([*candidates, *ahead]) if c not in self._known]
        for c, b in zip(fresh, self.near(fresh).tolist(), strict=True):
            self._known[c] = (self.count, b)
        upto = np.array([self._known[c][0] for c in candidates], np.int64)
        out = np.array([self._known[c][1] for c in candidates], bool)
        stale = np.flatnonzero(~out & (upto < self.count))
        out[stale] = self.near([candidates[i] for i in stale], since=upto[stale])
        for i in stale:
            self._known[candidates[i]] = (self.count, bool(out[i]))
        return out


def select_balanced(concept: np.ndarray, cosine: np.ndarray, n: int, *, cap: int | None = None,
                    min_similarity: float | None = None, duplicates: NearDuplicates | None = None) -> dict:
    """Round-robin selection across concepts: {"selected" (item positions, in selection order),
    "dropped_duplicates"}. Round r takes each concept's next item (most similar first, at most
    `cap` per concept), the round in order of similarity; an item that is a near-duplicate
    (`duplicates`) of one already selected is skipped. Fewer than n when the capped pool runs out."""
    check_selection(n, cap, min_similarity)
    concept, cosine = np.asarray(concept), np.asarray(cosine, dtype=np.float64)
    ok = concept >= 0
    if min_similarity is not None:
        ok &= cosine >= min_similarity
    idx = np.nonzero(ok)[0]
    idx = idx[np.lexsort((idx, -cosine[idx], concept[idx]))]  # by concept, most similar first
    queues = np.split(idx, np.nonzero(np.diff(concept[idx]))[0] + 1) if len(idx) else []
    heads, taken = np.zeros(len(queues), np.int64), np.zeros(len(queues), np.int64)
    if duplicates is not None and duplicates.count:
        raise CurationError("a NearDuplicates serves one selection: make a new one")
    selected, dropped = [], 0
    while len(selected) < n:
        offers, skipped = _offers(queues, heads, taken, cap, duplicates)
        dropped += skipped
        if not offers:
            break
        round_start = len(selected)
        for q, item in sorted(offers, key=lambda o: (-cosine[o[1]], o[1])):
            if len(selected) == n:
                break
            if duplicates is not None and duplicates.near([item], since=round_start)[0]:
                continue  # a near-duplicate of one taken earlier in this round: dropped when offered next round
            selected.append(int(item))
            if duplicates is not None:
                duplicates.add(item)
            taken[q] += 1
            heads[q] += 1
    return {"selected": np.asarray(selected, np.int64), "dropped_duplicates": dropped}


def _offers(queues, heads, taken, cap, duplicates, ahead: int = 32) -> tuple[list[tuple[int, int]], int]:
    """((concept queue, item) of every concept still under its cap with an item left that is no
    near-duplicate of a selected one, how many items were skipped as such on the way)."""
    live = [q for q, queue in enumerate(queues) if (cap is None or taken[q] < cap) and heads[q] < len(queue)]
    skipped = 0
    while duplicates is not None and live:  # heads that duplicate a selected item move on, all at once
        soon = [int(i) for q in live for i in queues[q][heads[q] + 1 : heads[q] + ahead]]
        blocked = duplicates.blocked([int(queues[q][heads[q]]) for q in live], ahead=soon)
        if not blocked.any():
            break
        for q in np.asarray(live)[blocked]:
            heads[q] += 1
        skipped += int(blocked.sum())
        live = [q for q in live if heads[q] < len(queues[q])]
    return [(q, int(queues[q][heads[q]])) for q in live], skipped


def check_selection(n, cap, min_similarity) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise CurationError(f"n (items to select) must be a whole number of at least 2, not {n!r}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1):
        raise CurationError(f"cap (items per concept) must be a whole number of at least 1, not {cap!r}")
    if min_similarity is not None and not -1.0 <= float(min_similarity) <= 1.0:
        raise CurationError(f"min_similarity is a cosine, between -1 and 1, not {min_similarity!r}")


# ---- the whole curation ------------------------------------------------------------------------------
@dataclass
class Curation:
    """The selected item ids (selection order) and the coverage report."""

    item_ids: list[str]
    report: dict = field(default_factory=dict)
    per_concept: dict[str, int] = field(default_factory=dict)


def curate_pool(pool: Pool, concepts: Sequence[str], concept_features: np.ndarray, n: int, *,
                cap: int | None = None, min_similarity: float | None = None,
                duplicate_cosine: float | None = 0.95) -> Curation:
    """Select n items of `pool` covering `concepts` (see the module's docstring)."""
    check_selection(n, cap, min_similarity)
    if len(concepts) != len(concept_features):
        raise CurationError(f"{len(concepts)} concepts but {len(concept_features)} concept features")
    if duplicate_cosine is not None and not -1.0 < float(duplicate_cosine) <= 1.0:
        raise CurationError(f"duplicate_cosine is a cosine in (-1, 1], or None for no removal, not {duplicate_cosine!r}")
    concept, cosine = assign_concepts(pool.captions, pool.caption_item, concept_features)
    dups = None if duplicate_cosine is None else NearDuplicates(pool.image, float(duplicate_cosine))
    got = select_balanced(concept, cosine, n, cap=cap, min_similarity=min_similarity, duplicates=dups)
    chosen = got["selected"]
    counts = np.bincount(concept[chosen], minlength=len(concepts))
    per_concept = {concepts[i]: int(counts[i]) for i in np.argsort(-counts, kind="stable") if counts[i]}
    report = {"schema": "anybind.curation/1", "n_requested": int(n), "n_selected": int(len(chosen)),
              "pool_items": len(pool.item_ids), "encoder": pool.encoder, "concepts": len(concepts),
              "concepts_in_pool": int(len(np.unique(concept[concept >= 0]))), "concepts_covered": len(per_concept),
              "cap": cap, "min_similarity": min_similarity, "duplicate_cosine": duplicate_cosine,
              "dropped_duplicates": got["dropped_duplicates"],
              "mean_cosine": round(float(cosine[chosen].mean()), 4) if len(chosen) else None}
    return Curation([pool.item_ids[i] for i in chosen], report, per_concept)


def write_curation(result: Curation, out: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """items.txt (one id a line, selection order), coverage.json and coverage.png (a histogram of
    items per concept); the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"items": write_text(out / "items.txt", "".join(f"{i}\n" for i in result.item_ids)),
             "coverage": write_text(out / "coverage.json", json.dumps(
                 result.report | {"per_concept": result.per_concept}, indent=1) + "\n")}
    if plot and result.per_concept:
        paths["plot"] = _coverage_plot(result, out / "coverage.png")
    return {k: Path(v) for k, v in paths.items()}


def _coverage_plot(result: Curation, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    counts = list(result.per_concept.values())
    ax.hist(counts, bins=np.arange(0.5, max(counts) + 1.5))
    r = result.report
    ax.set_title(f"{r['n_selected']} items over {r['concepts_covered']} of {r['concepts']} concepts", fontsize=9)
    ax.set_xlabel("items per concept")
    ax.set_ylabel("concepts")
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None}))
    fig.clf()
    return path


# ---- using a subset in training ------------------------------------------------------------------------
def read_items(path: str | os.PathLike) -> list[str]:
    """Item ids from a file, one a line (`items.txt` of `anybind curate`)."""
    p = Path(path)
    if not p.is_file():
        raise CurationError(f"--items {path}: no such file (one item id a line, e.g. anybind curate's items.txt)")
    ids = list(dict.fromkeys(ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()))
    if len(ids) < 2:
        raise CurationError(f"--items {path} lists {len(ids)} item id(s): training needs at least 2")
    return ids


def keep_items(pairs, item_ids: Sequence[str], wanted: Sequence[str]):
    """The pairs of the `wanted` items (ids; `item_ids` names each anchor row). Every wanted id
    must be among the pairs (the train split), else a clear error."""
    item_ids = np.asarray(item_ids, dtype=object)
    have = item_ids[np.unique(pairs.item)]
    missing = sorted(set(wanted) - set(have.tolist()))
    if missing:
        raise CurationError(f"{len(missing)} of the {len(set(wanted))} items to train on are not in the train "
                            f"split (e.g. {', '.join(missing[:3])}): curate from the same stores, split and fold")
    return pairs.select(np.isin(item_ids[pairs.item], list(wanted)))
