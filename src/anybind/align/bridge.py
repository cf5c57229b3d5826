"""Bridging two bound models through a modality they share (`anybind bridge A B --via text`).

A binds (image, text), B binds (audio, text) with *another* text encoder. The bridge maps B's
bound space into A's using the shared modality alone: a corpus of texts encoded by both models
gives pairs (B's bound text vector, A's bound text vector); a map fitted on those pairs carries
every other modality of B into A's space:

    audio -> B.encode("audio") (B's whole bound vector) -> map -> A's bound vector space of text

The result is A with B's other modalities *added* onto A's `via` (`BoundModel.with_added`): A's
parts are untouched, text queries use A's encoder, and B's text encoder served only to fit the map.

Maps (`BRIDGE_MAPS`), each a fixed-space map (`align/into.py`'s interface, saved alike):

- ``procrustes``, ``ridge``: `into.py`'s own (orthogonal Procrustes with scale; ridge).
- ``cca``: regularised CCA, landed in A's space: x -> B's canonical variates u (whitened), A's
  predicted as rho * u (the regression of A's variates on B's), then back to A's space through A's
  canonical loadings (the least-squares reconstruction of A's rows from their variates). With all
  components it equals least squares; keeping the top `dim` is a reduced-rank regression.
- ``mlp``: a small MLP trained on the corpus pairs (as C-MCR): symmetric InfoNCE between the mapped
  rows and A's rows (fixed temperature) plus the mean squared distance of the pairs (C-MCR's
  alignment term).

`choose_map` picks the map (and its options) on held-out corpus rows: text -> text retrieval
through the map, never any emergent pair.

    model_c, report = bridge_models(model_a, model_b, via="text", corpus=corpus_from_stores(sa, sb, a, b, "text"))
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .. import checks, saving
from ..errors import AnybindError
from ..registry import Registry
from .bound import BoundModel
from .into import IntoMap, ProcrustesInto, RidgeInto, _f32

KIND = "bridge"  # the saved-part kind of a bridged added modality
MAP_KIND = "into-map"  # maps save as into.py's do
VAL_SHARE = 0.1  # of the corpus groups, held out to choose the map
MIN_CORPUS = 20


class BridgeError(AnybindError, ValueError):
    """A bridge that cannot be built: a missing shared modality, clashing names, bad corpus."""


# ---- the maps ----------------------------------------------------------------------------------
def _inverse_sqrt(c: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    return (vecs / np.sqrt(np.maximum(vals, 1e-12))) @ vecs.T


def _regularised_cov(xc: np.ndarray, reg: float) -> np.ndarray:
    """Covariance + reg x its mean eigenvalue on the diagonal (scale-free shrinkage)."""
    c = xc.T @ xc / max(len(xc) - 1, 1)
    return c + reg * max(float(np.trace(c)) / len(c), 1e-12) * np.eye(len(c))


@dataclass(eq=False)
class CCAInto(IntoMap):
    """Regularised CCA landed in the fixed space (see the module docstring); ``dim`` 0 keeps every
    component, ``reg`` is each covariance's shrinkage relative to its mean eigenvalue."""

    dim: int = 0
    reg: float = 0.1
    batch_size: int = 4096

    name: ClassVar[str] = "cca"
    _STATE: ClassVar[tuple[str, ...]] = ("mean", "matrix", "bias", "correlations")

    def __post_init__(self) -> None:
        checks.integer("cca: dim", self.dim, minimum=0, error=BridgeError)
        checks.number("cca: reg", self.reg, minimum=0.0, error=BridgeError)

    def _fit(self, x: np.ndarray, y: np.ndarray, item: np.ndarray) -> None:
        xbar, ybar = x.mean(axis=0), y.mean(axis=0)
        xc, yc = x - xbar, y - ybar
        wx, wy = _inverse_sqrt(_regularised_cov(xc, self.reg)), _inverse_sqrt(_regularised_cov(yc, self.reg))
        u, rho, vt = np.linalg.svd(wx @ (xc.T @ yc / max(len(x) - 1, 1)) @ wy, full_matrices=False)
        k = min(self.dim or len(rho), len(rho))
        dir_x, dir_y = wx @ u[:, :k], wy @ vt[:k].T  # canonical directions of each side
        loadings = np.linalg.lstsq(yc @ dir_y, yc, rcond=None)[0]  # [k, dy]: A's rows from A's variates
        self.mean, self.bias, self.correlations = _f32(xbar), _f32(ybar), _f32(rho[:k])
        self.matrix = _f32((dir_x * rho[:k]) @ loadings)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.matrix + self.bias


@dataclass(eq=False)
class MLPInto(IntoMap):
    """A two-layer MLP (GELU) trained on the pairs: symmetric InfoNCE at a fixed ``temperature``
    + ``mse_weight`` x the mean squared distance of the normalised pairs; AdamW, seeded, CPU."""

    hidden: int = 1024
    epochs: int = 30
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05
    mse_weight: float = 1.0
    seed: int = 0
    batch_size: int = 4096

    name: ClassVar[str] = "mlp"
    _STATE: ClassVar[tuple[str, ...]] = ("w1", "b1", "w2", "b2")

    def __post_init__(self) -> None:
        for field in ("hidden", "epochs", "batch"):
            checks.integer(f"mlp: {field}", getattr(self, field), minimum=1, error=BridgeError)
        checks.number("mlp: lr", self.lr, minimum=0.0, strict=True, error=BridgeError)
        checks.number("mlp: temperature", self.temperature, minimum=0.0, strict=True, error=BridgeError)
        checks.number("mlp: mse_weight", self.mse_weight, minimum=0.0, error=BridgeError)

    def _fit(self, x: np.ndarray, y: np.ndarray, item: np.ndarray) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], self.hidden), torch.nn.GELU(),
                                  torch.nn.Linear(self.hidden, y.shape[1]))
        for layer in (net[0], net[2]):  # seeded init, whatever the global RNG holds
            torch.nn.init.kaiming_uniform_(layer.weight, a=5**0.5, generator=gen)
            torch.nn.init.zeros_(layer.bias)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        xs, ys = _f32(x), _f32(y)
        with torch.enable_grad():
            for _ in range(self.epochs):
                for rows in torch.randperm(len(xs), generator=gen).split(self.batch):
                    if len(rows) < 2:
                        continue
                    opt.zero_grad()
                    self._loss(F.normalize(net(xs[rows]), dim=1), ys[rows]).backward()
                    opt.step()
        self.w1, self.b1 = net[0].weight.detach().T.contiguous(), net[0].bias.detach().clone()
        self.w2, self.b2 = net[2].weight.detach().T.contiguous(), net[2].bias.detach().clone()

    def _loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = z @ y.T / self.temperature
        target = torch.arange(len(z))
        nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return nce + self.mse_weight * (z - y).pow(2).sum(dim=1).mean()

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2


#: name -> map class of the bridge (the closed-form ones are into.py's own)
BRIDGE_MAPS = Registry("bridge map")
for _cls in (ProcrustesInto, RidgeInto, CCAInto, MLPInto):
    BRIDGE_MAPS.register(_cls.name, _cls)
TRAINING_FREE = ("procrustes", "ridge", "cca")
#: what `choose_map` tries per map on the held-out corpus rows
CANDIDATES: dict[str, list[dict]] = {
    "procrustes": [{}],
    "ridge": [{"alpha": a} for a in (0.01, 0.1, 1.0)],
    "cca": [{"dim": d, "reg": r} for d in (64, 256, 0) for r in (0.01, 0.1)],
    "mlp": [{}],
}


def build_bridge_map(name: str, **options: Any) -> IntoMap:
    """A bridge map by name (procrustes, ridge, cca, mlp) with options."""
    try:
        return BRIDGE_MAPS.build(name, **options)
    except AnybindError as e:
        raise BridgeError(str(e)) from None


def load_bridge_map(directory: str | os.PathLike) -> IntoMap:
    """A fitted bridge map saved by its `save` (into.py's saved-map format)."""
    config, tensors = saving.read_part(directory, MAP_KIND)
    try:
        model = build_bridge_map(config["name"], **config["options"])
        for k in model._STATE:
            setattr(model, k, tensors[k])
        model._fitted = {k: int(config["fitted"][k]) for k in ("n", "n_items", "in_dim", "out_dim")}
    except (KeyError, TypeError) as e:
        raise BridgeError(f"{directory} holds a damaged bridge map ({e!r}): bridge the models again") from e
    return model


# ---- the corpus: the shared modality encoded by both models -----------------------------------
@dataclass
class Corpus:
    """Rows of the shared modality: A's features and B's of the same texts (per layer each model
    reads), and each row's group (rows of one group are held out together)."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]
    groups: np.ndarray
    name: str = ""

    def __len__(self) -> int:
        return len(self.groups)


def _joined_rows(store_a, store_b, keep: set[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs of two stores of the same items, joined on (item id, caption index)."""
    where = {(i, int(c)): r for r, (i, c) in enumerate(zip(store_b.item_ids, store_b.caption_index))}
    pairs = [(r, where[(i, int(c))]) for r, (i, c) in enumerate(zip(store_a.item_ids, store_a.caption_index))
             if (i, int(c)) in where and (keep is None or i in keep)]
    if not pairs:
        raise BridgeError(f"{store_a.path.name} and {store_b.path.name} share no item: the corpus must be the same "
                          "texts encoded by both models' encoders")
    rows = np.asarray(pairs, dtype=np.int64)
    return rows[:, 0], rows[:, 1]


def _store_features(store, model: BoundModel, via: str, rows: np.ndarray, which: str) -> list[torch.Tensor]:
    layers, dims = model.layers_of(via), model.input_dims(via)
    missing = [lay for lay in layers if lay not in store.layers]
    if missing:
        raise BridgeError(f"the corpus store of {which} ({store.path.name}) lacks layer(s) {', '.join(missing)} "
                          f"that {which}'s {via} side reads: extract it with --layers {','.join(layers)}")
    got = [store.layers[lay] for lay in layers]
    if dims is not None and got != dims:
        raise BridgeError(f"the corpus store of {which} ({store.path.name}) has {via} features of dims {got}, but "
                          f"{which} reads {dims}: it was extracted with another encoder than {which}'s")
    from .data import Side

    return Side(via, store, layers, [store.array(lay) for lay in layers]).rows(rows)


def corpus_from_stores(store_a, store_b, model_a: BoundModel, model_b: BoundModel, via: str,
                       keep: set[str] | None = None, name: str = "") -> Corpus:
    """The corpus from two feature stores of the same texts (A's encoder, B's encoder); `keep`
    limits it to some item ids (e.g. a fold's training items)."""
    rows_a, rows_b = _joined_rows(store_a, store_b, keep)
    cols = store_a.rows.column_names
    groups = store_a.rows.column("group" if "group" in cols else "item_id").to_pylist()
    return Corpus(_store_features(store_a, model_a, via, rows_a, "A"), _store_features(store_b, model_b, via, rows_b, "B"),
                  np.asarray([str(groups[r]) for r in rows_a]), name or store_a.key.get("dataset", ""))


def join_corpora(*corpora: Corpus) -> Corpus:
    """One corpus of several (e.g. WordNet glosses and a dataset's training captions)."""
    return Corpus([torch.cat(layer) for layer in zip(*(c.a for c in corpora))],
                  [torch.cat(layer) for layer in zip(*(c.b for c in corpora))],
                  np.concatenate([np.char.add(f"{c.name}|", c.groups.astype(str)) for c in corpora]),
                  " + ".join(c.name for c in corpora))


def held_out(groups: np.ndarray, share: float = VAL_SHARE) -> np.ndarray:
    """[n] bool: the rows whose group hashes into the held-out `share` (the same groups every run)."""
    def unit(g: str) -> float:
        return int(hashlib.sha256(f"bridge-val|{g}".encode()).hexdigest()[:8], 16) / 16**8

    return np.array([unit(g) < share for g in groups], dtype=bool)


# ---- fitting: each map's options chosen on held-out corpus rows --------------------------------------
@dataclass
class FittedMap:
    """One map family: the options chosen on validation, its validation scores, and the map
    refitted on every corpus row with them."""

    name: str
    options: dict
    val: dict  # text -> text retrieval through the map on the held-out rows (mean_R@1, mean_R@10)
    tried: list[dict]
    map: IntoMap


def val_retrieval(fitted: IntoMap, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Row i of x (B's side) should find row i of y (A's side) and back: recall@1/10 through the map."""
    from ..metrics.retrieval import retrieval_metrics

    z = fitted.encode("text", x)
    m = retrieval_metrics(image_emb=y, text_emb=z, text_to_image=np.arange(len(y)), ks=(1, 10))
    return {k: float(m[k]) for k in ("mean_R@1", "mean_R@10")}


def _options_of(name: str, seed: int) -> list[dict]:
    return [{**o, "seed": seed} if name == "mlp" else dict(o) for o in CANDIDATES[name]]


def fit_map(name: str, x: torch.Tensor, y: torch.Tensor, val: np.ndarray, seed: int = 0) -> FittedMap:
    """`name`'s options chosen on the held-out rows `val` (best mean_R@1, then mean_R@10), then
    the map refitted on all rows."""
    if name not in BRIDGE_MAPS:
        raise BridgeError(f"unknown bridge map '{name}'{checks.did_you_mean(name, BRIDGE_MAPS.names())}; "
                          f"known: {', '.join(BRIDGE_MAPS.names())}")
    tried = []
    for options in _options_of(name, seed):
        m = build_bridge_map(name, **options).fit(x[~val], y[~val])
        tried.append({"options": options, **val_retrieval(m, x[val], y[val])})
    best = max(tried, key=lambda t: (t["mean_R@1"], t["mean_R@10"]))  # first wins a tie: the list's order
    final = build_bridge_map(name, **best["options"]).fit(x, y)
    return FittedMap(name, best["options"], {k: best[k] for k in ("mean_R@1", "mean_R@10")}, tried, final)


def corpus_embeddings(a: BoundModel, b: BoundModel, via: str, corpus: Corpus) -> tuple[torch.Tensor, torch.Tensor]:
    """(B's bound vectors, A's bound vectors) of the corpus rows: the pairs every map fits on."""
    if len(corpus) < MIN_CORPUS:
        raise BridgeError(f"the corpus has {len(corpus)} rows of {via}; a bridge needs at least {MIN_CORPUS} "
                          "(thousands fit better)")
    with torch.no_grad():
        return b.encode(via, corpus.b).float().cpu(), a.encode(via, corpus.a).float().cpu()


def fit_bridge(a: BoundModel, b: BoundModel, via: str, corpus: Corpus, maps: Sequence[str] = TRAINING_FREE,
               seed: int = 0) -> dict[str, FittedMap]:
    """Every map of `maps` fitted on the corpus (options chosen on its held-out groups)."""
    check_bridgeable(a, b, via)
    x, y = corpus_embeddings(a, b, via, corpus)
    val = held_out(corpus.groups)
    if val.sum() < 2 or (~val).sum() < 2:
        raise BridgeError(f"the corpus's {len(set(corpus.groups))} groups leave too few rows to hold out: "
                          "give a larger corpus")
    return {name: fit_map(name, x, y, val, seed) for name in maps}


def best_map(fits: dict[str, FittedMap]) -> FittedMap:
    """The map with the best held-out mean_R@1 (then mean_R@10; then the order given)."""
    return max(fits.values(), key=lambda f: (f.val["mean_R@1"], f.val["mean_R@10"]))


def check_bridgeable(a: BoundModel, b: BoundModel, via: str) -> list[str]:
    """B's modalities to add onto A's `via`, or a clear refusal."""
    for which, model in (("A", a), ("B", b)):
        if via not in model.modalities:
            raise BridgeError(f"--via {via}: {which} binds {', '.join(model.modalities)}, not '{via}'; bridge "
                              "through a modality both models bind")
    others = [m for m in b.modalities if m != via]
    if not others:
        raise BridgeError(f"B binds nothing but '{via}': there is nothing to bridge into A")
    clash = [m for m in others if m in a.modalities]
    if clash:
        raise BridgeError(f"A already binds {', '.join(clash)}: B's modality of the same name would clash; bridge a B "
                          "without it, or rename it in B")
    return others


# ---- the composed added part --------------------------------------------------------------------
class BridgePart:
    """An added modality of the bridged model: B's encoding of `modality` (B's whole bound vector),
    then the bridge map into A's bound space of `via`. Saved as a part of kind ``bridge`` holding
    B's bound model (``source/``) and the map (``map/``)."""

    def __init__(self, source: BoundModel, modality: str, via: str, fitted: IntoMap, info: dict | None = None):
        if source.dim != fitted._fitted["in_dim"]:
            raise BridgeError(f"the bridge map reads {fitted._fitted['in_dim']}-d rows, but B's bound space has "
                              f"{source.dim} dims")
        self.source, self.modality, self.via, self.map = source, modality, via, fitted
        self.info = dict(info or {})

    @property
    def name(self) -> str:
        return self.map.name

    @property
    def added_kind(self) -> str:
        """What `Added.kind` records (and `_load_added` reads back)."""
        return f"{KIND}:{self.map.name}"

    def encode(self, modality: str, feats) -> torch.Tensor:
        """[n, A's dim] L2-normalised rows in A's space of B's `modality` features (per layer)."""
        return self.map.encode(modality, self.source.encode(self.modality, feats))

    def to(self, device) -> BridgePart:
        self.source.to(device)
        return self

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        self.source.save(directory / "source")
        self.map.save(directory / "map")
        return saving.save_part(directory, KIND, self.map.name, modality=self.modality, via=self.via, info=self.info)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BridgePart:
        directory = Path(directory)
        config = saving.read_config(directory, KIND)
        return cls(BoundModel.load(directory / "source"), config["modality"], config["via"],
                   load_bridge_map(directory / "map"), config.get("info"))


def compose(a: BoundModel, b: BoundModel, via: str, fitted: IntoMap, info: dict | None = None) -> BoundModel:
    """A plus each of B's other modalities, added onto A's `via` through `fitted` (A unchanged)."""
    others = check_bridgeable(a, b, via)
    if fitted._fitted["out_dim"] != a.dim:
        raise BridgeError(f"the bridge map lands in {fitted._fitted['out_dim']} dims, but A's space has {a.dim}")
    model = a
    for modality in others:
        model = model.with_added(modality, BridgePart(b, modality, via, fitted, info), via, b.layers_of(modality))
    return model


def bridge_models(a: BoundModel, b: BoundModel, via: str, corpus: Corpus, maps: Sequence[str] | str = "auto",
                  seed: int = 0) -> tuple[BoundModel, dict]:
    """The bridged model (A's space, B's other modalities added through the map chosen on held-out
    corpus rows among `maps`: "auto" tries the training-free ones and the MLP) and a report."""
    names = [*TRAINING_FREE, "mlp"] if maps == "auto" else [maps] if isinstance(maps, str) else list(maps)
    fits = fit_bridge(a, b, via, corpus, names, seed)
    chosen = best_map(fits)
    report = {"via": via, "corpus": {"name": corpus.name, "rows": len(corpus), "groups": len(set(corpus.groups)),
                                     "held_out_rows": int(held_out(corpus.groups).sum())},
              "chosen": {"map": chosen.name, "options": chosen.options},
              "maps": {n: {"options": f.options, "val": f.val, "tried": f.tried} for n, f in fits.items()}}
    info = {"map": chosen.name, "options": chosen.options, "corpus": report["corpus"], "val": chosen.val}
    return compose(a, b, via, chosen.map, info), report


__all__ = ["BRIDGE_MAPS", "BridgeError", "BridgePart", "CCAInto", "Corpus", "FittedMap", "MLPInto", "best_map",
           "bridge_models", "build_bridge_map", "check_bridgeable", "compose", "corpus_from_stores", "fit_bridge",
           "fit_map", "held_out", "join_corpora", "load_bridge_map"]
