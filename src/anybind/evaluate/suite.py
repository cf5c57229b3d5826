"""The evaluation suite: one model, every task, on a cross-validation fold.

    suite = Suite.builtin()                       # openclipart + Fashion-MNIST, from the cache
    metrics, per_class, info = suite.evaluate(model, fold=0)

Tasks (each optional):

- **retrieval** on the fold's test pairs, image->text and text->image recall@1/5/10 with every
  caption of an image a positive (CLIP_benchmark's definition), plus ``mean_recall``, the mean of
  the six. The share of test images with a near-duplicate in train (raw encoder cosine > 0.9) is
  measured once per fold and reported beside it.
- **zero-shot** over the test images that carry a class (for openclipart, the curated noun
  classes of `anybind.data.openclipart_classes`): prompts from a template set, embedded by the
  text side's own encoder at its stored layers, projected, averaged per class.
  ``balanced_accuracy`` (mean per-class recall) is the headline: the classes are unbalanced.
- **probe**: a logistic-regression probe on the projected image features of a labelled store
  (Fashion-MNIST 10k/2k by default), beside the same probe on the frozen features.

``suite/score`` is the mean of the three headline numbers (retrieval mean_recall, zero-shot
balanced accuracy, probe top-1): the single figure recipes are compared on.

The model is a `BoundModel` (`anybind.align.bound`): trained projectors, a training-free
baseline, or both blended, with its retrieval correction; the suite scores it exactly as the
trainer validated it (`anybind.align.fit.split_retrieval`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import AnybindError
from ..features import FeatureStore

log = logging.getLogger("anybind.eval")

PROBE_TRAIN, PROBE_TEST = 10_000, 2_000
RETRIEVAL_KS = (1, 5, 10)
LEAKAGE_THRESHOLD = 0.9
HEADLINE = ("retrieval/mean_recall", "zeroshot/balanced_accuracy", "probe/top1")


# ---- the built-in probe set ------------------------------------------------------------------------
def probe_index(n_train: int = PROBE_TRAIN, n_test: int = PROBE_TEST, cache=None):
    """A fixed Fashion-MNIST subset for the linear probe: `n_train` official-train and `n_test`
    official-test images, evenly spread (all 70k would take ~15 minutes to extract here)."""
    from ..data import load_dataset

    idx = load_dataset("fashion-mnist", cache=cache)
    ids = idx.item_ids
    rows = {s: [i for i, item in enumerate(ids) if item.startswith(f"{s}-")] for s in ("train", "test")}

    def spread(r: list[int], n: int) -> list[int]:
        if n >= len(r):
            return r
        return [r[j] for j in np.unique(np.linspace(0, len(r) - 1, num=n).round().astype(np.int64))]

    keep = spread(rows["train"], n_train) + spread(rows["test"], n_test)
    return idx.take(keep, name=f"fashion-mnist-probe{n_train}-{n_test}")


@dataclass
class LabelledFeatures:
    """Encoder features of labelled items, with a train/test partition (for the probe)."""

    name: str
    feats: list[torch.Tensor]  # per layer, [N, D]
    labels: np.ndarray  # int class index per row
    classes: list[str]
    is_train: np.ndarray  # bool per row

    @classmethod
    def from_store(cls, name: str, store: FeatureStore, layers: list[str], index, train_of: Callable[[str], bool]):
        label_of = dict(zip(index.item_ids, index.column("label"), strict=True))
        ids = store.item_ids
        names = [label_of.get(i) for i in ids]
        keep = np.array([n is not None for n in names])
        classes = sorted({n for n in names if n is not None})
        code = {c: k for k, c in enumerate(classes)}
        rows = np.nonzero(keep)[0]
        feats = [torch.from_numpy(store.array(lay).read(rows)) for lay in layers]
        return cls(name, feats, np.array([code[names[r]] for r in rows]), classes,
                   np.array([train_of(ids[r]) for r in rows]))


# ---- fold data -------------------------------------------------------------------------------------
@dataclass
class FoldData:
    """What every model of one fold is evaluated on (built once per fold, shared by all models)."""

    data: Any  # PairedFeatures with this fold's splits
    fold: int | None
    split_pairs: dict = field(default_factory=dict)  # split -> Pairs
    leakage: dict = field(default_factory=dict)  # split -> near-duplicate share


class Suite:
    """Stores and tasks of one evaluation; `evaluate(model, fold)` runs every task on one fold."""

    def __init__(self, image_store: FeatureStore | str | os.PathLike, text_store: FeatureStore | str | os.PathLike,
                 layers: dict[str, list[str]] | None = None, *, zeroshot_labels: Callable | None = None,
                 class_names: Sequence[str] | None = None, templates: str | Sequence[str] = "clipart",
                 probe: LabelledFeatures | None = None, prompt_features: list[torch.Tensor] | None = None,
                 zeroshot_set: LabelledFeatures | None = None, name: str = "custom", anchor: str | None = None):
        from ..align.data import PairedFeatures

        self.stores = {"image": _open(image_store), "text": _open(text_store)}
        self.layers = {k: list(v) for k, v in (layers or {}).items()}
        self.name, self.anchor = name, anchor  # anchor None: the store with one row per item
        self._paired = PairedFeatures  # imported lazily: the align package pulls torch modules in
        self._folds: dict = {}
        self.zeroshot_labels = zeroshot_labels
        self.zeroshot_set = zeroshot_set  # a separate labelled image set (ImageNet-style); else the paired test images
        self.class_names = list(zeroshot_set.classes if zeroshot_set is not None else class_names or [])
        self.templates = templates
        self.probe = probe
        self._prompt_features = prompt_features
        self._frozen_probe: dict | None = None

    # -- construction of the built-in suite ------------------------------------------------------
    @classmethod
    def builtin(cls, image: str = "efficientnet-lite0", text: str = "minilm-l6",
                layers: dict[str, list[str]] | None = None, cache=None, probe: bool = True,
                progress: bool = True, items: int | None = None,
                probe_sizes: tuple[int, int] = (PROBE_TRAIN, PROBE_TEST)) -> Suite:
        """openclipart (group folds, curated zero-shot classes) + the Fashion-MNIST probe subset.

        Stores come from the cache; missing ones are extracted first. `items` evaluates on an
        evenly spread subset of openclipart instead of all 8,121 (for quick checks)."""
        from ..data import load_dataset

        layers = layers or {}
        data = load_dataset("openclipart", cache=cache)
        if items is not None:
            data = data.spread(items)
        img = _store_for(image, data, layers.get("image"), cache, progress)
        txt = _store_for(text, data, layers.get("text"), cache, progress)
        pidx = probe_index(*probe_sizes, cache=cache) if probe else None
        pstore = _store_for(image, pidx, layers.get("image"), cache, progress) if probe else None
        return cls.builtin_from_stores(img, txt, layers, pstore, pidx)

    @classmethod
    def builtin_from_stores(cls, image: FeatureStore, text: FeatureStore, layers: dict[str, list[str]] | None = None,
                            probe_store: FeatureStore | None = None, probe_idx=None) -> Suite:
        """The built-in suite over stores already extracted (no encoder is loaded)."""
        from ..data.openclipart_classes import CURATED_CLASSES, curated_class

        layers = layers or {}
        probe_feats = None
        if probe_store is not None:
            probe_feats = LabelledFeatures.from_store("fashion-mnist", probe_store, layers.get("image") or ["final"],
                                                      probe_idx, train_of=lambda i: i.startswith("train-"))
        return cls(image, text, layers, zeroshot_labels=lambda ids: [curated_class(i) for i in ids],
                   class_names=CURATED_CLASSES, templates="clipart", probe=probe_feats, name="builtin")

    @classmethod
    def from_datasets(cls, image: str, text: str, data: str = "openclipart", *, zeroshot: str | None = None,
                      probe: str | None = None, templates: str | Sequence[str] = "default",
                      layers: dict[str, list[str]] | None = None, cache=None, progress: bool = True) -> Suite:
        """Any paired dataset for retrieval, any labelled image set for zero-shot (an ImageNet-style
        folder, `folder:`, a table with labels) and for the probe (its train split fits, the rest tests).

        >>> Suite.from_datasets("efficientnet-lite0", "minilm-l6", "karpathy:dataset_coco.json",
        ...                     zeroshot="imagenet:/data/imagenet/val")  # doctest: +SKIP
        """
        from ..data import load_dataset

        layers = layers or {}
        paired = load_dataset(data, cache=cache) if isinstance(data, str) else data  # or a listed DatasetIndex
        img = _store_for(image, paired, layers.get("image"), cache, progress)
        txt = _store_for(text, paired, layers.get("text"), cache, progress)

        def labelled(spec: str) -> LabelledFeatures:
            idx = load_dataset(spec, cache=cache)
            if not any(lab is not None for lab in idx.column("label")):
                raise AnybindError(f"{spec} has no labels: zero-shot and the probe need a labelled image set")
            store = _store_for(image, idx, layers.get("image"), cache, progress)
            split = dict(zip(idx.item_ids, idx.column("split"), strict=True))
            if "train" in split.values():
                train_of = lambda i: split[i] == "train"  # noqa: E731
            else:  # an evaluation-only set (an ImageNet val folder): its group folds 1-4 fit a probe, fold 0 tests
                fold = dict(zip(idx.item_ids, idx.column("fold"), strict=True))
                train_of = lambda i: fold[i] != 0  # noqa: E731
            return LabelledFeatures.from_store(idx.name, store, layers.get("image") or ["final"], idx, train_of=train_of)

        return cls(img, txt, layers, templates=templates, name=paired.name,
                   zeroshot_set=labelled(zeroshot) if zeroshot else None,
                   probe=labelled(probe) if probe else None)

    # -- per fold ----------------------------------------------------------------------------------
    def fold_data(self, fold: int | None) -> FoldData:
        if fold not in self._folds:
            data = self._paired(self.stores, self.layers, fold=fold, anchor=self.anchor)
            fd = FoldData(data, fold)
            for split in ("train", "val", "test"):
                fd.split_pairs[split] = data.pairs(split)
            self._folds[fold] = fd
        return self._folds[fold]

    @property
    def splits_fingerprint(self) -> str:
        """A hash of the stores' split, fold and group per row: logged results and trained runs are
        reused only on the same grouping (a regrouped dataset index must re-run them)."""
        if getattr(self, "_splits_fp", None) is None:
            import hashlib

            h = hashlib.sha256()
            for name in sorted(self.stores):
                rows = self.stores[name].rows
                for col in ("item_id", "split", "fold", "group"):
                    h.update("\x1f".join(map(str, rows.column(col).to_pylist())).encode() + b"\x1e")
            self._splits_fp = h.hexdigest()[:16]
        return self._splits_fp

    def leakage(self, fold: int | None, split: str = "test") -> float:
        """Share of `split` images with a near-duplicate (raw cosine > 0.9) among the train images."""
        from .leakage import near_duplicate_share

        fd = self.fold_data(fold)
        if split not in fd.leakage:
            a = fd.data.side(fd.data.anchor_name)
            train = np.unique(fd.split_pairs["train"].anchor_rows)
            test = np.unique(fd.split_pairs[split].anchor_rows)
            fd.leakage[split] = float(near_duplicate_share(a.rows(train)[-1], a.rows(test)[-1], LEAKAGE_THRESHOLD)["share"])
        return fd.leakage[split]

    # -- tasks -----------------------------------------------------------------------------------
    def evaluate(self, model, fold: int | None, split: str = "test",
                 tasks: Sequence[str] = ("retrieval", "zeroshot", "probe")) -> tuple[dict, dict, dict]:
        """(metrics, per_class, info) of `model` on the fold's `split`; metrics are flat names."""
        metrics: dict[str, float] = {}
        per_class: dict[str, dict[str, float]] = {}
        info: dict[str, Any] = {}
        fd = self.fold_data(fold)
        if "retrieval" in tasks:
            metrics.update(self.retrieval(model, fd, split))
            info["leakage_share"] = self.leakage(fold, split)
        if "zeroshot" in tasks and self.has_zeroshot:
            zs, pc = self.zeroshot(model, fd, split)
            metrics.update(zs)
            per_class["zeroshot"] = pc
        if "probe" in tasks and self.probe is not None:
            metrics.update(self.probe_task(model))
        if all(h in metrics for h in HEADLINE):
            metrics["suite/score"] = float(np.mean([metrics[h] for h in HEADLINE]))
        return metrics, per_class, info

    def retrieval(self, model, fd: FoldData, split: str) -> dict[str, float]:
        from ..align.fit import split_retrieval

        m = split_retrieval(model, fd.data, fd.split_pairs[split], ks=RETRIEVAL_KS)
        out = {f"retrieval/{_short(k)}": float(v) for k, v in m.items() if isinstance(v, float)}
        out["retrieval/mean_recall"] = float(np.mean([m[f"{d}_R@{k}"] for d in ("image_to_text", "text_to_image")
                                                      for k in RETRIEVAL_KS]))
        return out

    @property
    def has_zeroshot(self) -> bool:
        return self.zeroshot_labels is not None or self.zeroshot_set is not None

    def zeroshot_rows(self, fd: FoldData, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Anchor rows of `split` that carry a class, their class codes, and the classes present."""
        store = fd.data.side(fd.data.anchor_name).store
        anchors = np.unique(fd.split_pairs[split].anchor_rows)
        ids = store.item_ids
        labels = self.zeroshot_labels([ids[r] for r in anchors])
        code = {c: k for k, c in enumerate(self.class_names)}
        keep = np.array([lab is not None and lab in code for lab in labels], dtype=bool)
        return anchors[keep], np.array([code[lab] for lab, k in zip(labels, keep) if k], dtype=np.int64), self.class_names

    def zeroshot(self, model, fd: FoldData, split: str) -> tuple[dict[str, float], dict[str, float]]:
        from .zeroshot import classification_metrics, zeroshot_classify

        if self.zeroshot_set is not None:  # a separate labelled set: every one of its evaluation images
            zs = self.zeroshot_set
            rows = np.nonzero(~zs.is_train)[0] if (~zs.is_train).any() else np.arange(len(zs.labels))
            y, classes = zs.labels[rows], zs.classes
            zi = model.encode(fd.data.anchor_name, [f[torch.as_tensor(rows)] for f in zs.feats])
        else:
            rows, y, classes = self.zeroshot_rows(fd, split)
            if len(rows) == 0:
                raise AnybindError(f"no {split} image of fold {fd.fold} carries one of the zero-shot classes")
            zi = model.encode(fd.data.anchor_name, fd.data.side(fd.data.anchor_name).rows(rows))
        cls = self.class_embeddings(model, fd)
        m = classification_metrics(zeroshot_classify(zi, cls), y, ks=(1, 5))
        out = {"zeroshot/top1": m["top1"], "zeroshot/top5": m["top5"],
               "zeroshot/balanced_accuracy": m["mean_per_class_recall"]}
        return out, {classes[c]: r for c, r in m["per_class_recall"].items()}

    def class_embeddings(self, model, fd: FoldData) -> torch.Tensor:
        from .zeroshot import load_templates

        templates = load_templates(self.templates) if isinstance(self.templates, str) else list(self.templates)
        feats = self.prompt_features(fd, templates)
        z = model.encode(fd.data.partner_name, feats)  # [C*T, D], normalised
        return F.normalize(z.reshape(len(self.class_names), len(templates), -1).mean(dim=1), dim=1)

    def prompt_features(self, fd: FoldData, templates: list[str]) -> list[torch.Tensor]:
        """The text encoder's features of every (class, template) prompt at the text side's layers."""
        if self._prompt_features is None:
            from .zeroshot import fill_template

            side = fd.data.side(fd.data.partner_name)
            prompts = [fill_template(t, c) for c in self.class_names for t in templates]
            self._prompt_features = encode_texts(side.store, side.layers, prompts)
        return self._prompt_features

    def frozen_probe(self) -> dict[str, float]:
        """The probe on the frozen encoder features (the reference the projected probe is read against)."""
        if self._frozen_probe is None:
            self._frozen_probe = _probe(self.probe, self.probe.feats)
        return self._frozen_probe

    def probe_task(self, model) -> dict[str, float]:
        z = model.encode(model.anchor, self.probe.feats)
        return _probe(self.probe, [z])

    # -- what knowing nothing scores -------------------------------------------------------------
    def chance(self, fold: int | None, split: str = "test") -> dict[str, float]:
        """A uniformly random ranking / guess on every task (`metrics` and `zeroshot` definitions)."""
        from ..metrics import chance_retrieval_metrics

        pairs = self.fold_data(fold).split_pairs[split]
        out = {f"retrieval/{_short(k)}": v for k, v in chance_retrieval_metrics(pairs.anchor_rows, RETRIEVAL_KS).items()}
        out["retrieval/mean_recall"] = float(np.mean([out[f"retrieval/mean_R@{k}"] for k in RETRIEVAL_KS]))
        if self.has_zeroshot:
            zs = self._zeroshot_reference(fold, split)
            out |= {"zeroshot/top1": zs["chance_top1"], "zeroshot/top5": zs["chance_top5"],
                    "zeroshot/balanced_accuracy": zs["chance_mean_per_class_recall"]}
        if self.probe is not None:
            out["probe/top1"] = out["probe/balanced_accuracy"] = 1 / len(self.probe.classes)
        if all(h in out for h in HEADLINE):
            out["suite/score"] = float(np.mean([out[h] for h in HEADLINE]))
        return out

    def majority(self, fold: int | None, split: str = "test") -> dict[str, float]:
        """Always answering the most frequent class (of the test labels for zero-shot, which
        trains nothing; of the train labels for the probe)."""
        out = {}
        if self.has_zeroshot:
            zs = self._zeroshot_reference(fold, split)
            out |= {"zeroshot/top1": zs["majority_top1"], "zeroshot/balanced_accuracy": zs["majority_mean_per_class_recall"]}
        if self.probe is not None:
            tr = self.probe.labels[self.probe.is_train]
            te = self.probe.labels[~self.probe.is_train]
            out["probe/top1"] = float(np.mean(te == np.bincount(tr).argmax()))
        return out

    def _zeroshot_reference(self, fold: int | None, split: str) -> dict:
        from .zeroshot import chance_metrics

        if self.zeroshot_set is not None:
            zs = self.zeroshot_set
            y = zs.labels[~zs.is_train] if (~zs.is_train).any() else zs.labels
            return chance_metrics(y, len(zs.classes), ks=(1, 5))
        _, y, classes = self.zeroshot_rows(self.fold_data(fold), split)
        return chance_metrics(y, len(classes), ks=(1, 5))


# ---- helpers ---------------------------------------------------------------------------------------
def _short(key: str) -> str:
    return key.replace("image_to_text", "i2t").replace("text_to_image", "t2i")


def _open(store) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore.open(store)


def _probe(lf: LabelledFeatures, feats: list[torch.Tensor]) -> dict[str, float]:
    """Logistic regression on the concatenated layers; L2 strength chosen on a held-out tenth of train."""
    from .probe import fit_linear_probe, probe_metrics

    x = torch.cat([f.float() for f in feats], dim=1)
    tr, te = np.nonzero(lf.is_train)[0], np.nonzero(~lf.is_train)[0]
    rng = np.random.default_rng(0)
    val = np.zeros(len(tr), dtype=bool)
    val[rng.permutation(len(tr))[: max(1, len(tr) // 10)]] = True
    probe = fit_linear_probe(x[tr[~val]], lf.labels[tr[~val]], x[tr[val]], lf.labels[tr[val]],
                             n_classes=len(lf.classes))
    m = probe_metrics(probe, x[te], lf.labels[te])
    return {"probe/top1": m["top1"], "probe/balanced_accuracy": m["mean_per_class_recall"]}


def encode_texts(store: FeatureStore, layers: list[str], texts: list[str], batch_size: int = 128) -> list[torch.Tensor]:
    """Features of new texts from the encoder that made `store`, as the store holds them
    (same spec, layers, pooling, compute precision, stored dtype): prompts for zero-shot."""
    from ..encoders import create_encoder
    from ..features.encode import encode_as_stored, store_encoding

    how = store_encoding(store)
    return encode_as_stored(create_encoder(how["encoder"]), texts, layers, how["pooling"], how["precision"],
                            how["dtype"], batch_size)


def _store_for(spec: str, dataset, layers, cache, progress: bool) -> FeatureStore:
    """The store of `spec` over `dataset` holding `layers`: a cache hit, or extracted now."""
    from ..encoders import create_encoder
    from ..features.extract import extract

    enc = create_encoder(spec)
    field_name = "image" if enc.modality == "image" else "caption"
    return extract(enc, dataset, field=field_name, layers=layers, cache=cache, progress=progress)
