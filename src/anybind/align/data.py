"""Paired training data from feature stores: join modalities on item id, select a split.

An anchor store has one row per item (images); a partner store may have several rows per item
(captions). Every partner row whose item has an anchor row makes one pair; pairs of the same
item are all positives of each other. When both sides have several rows per item (the same
captions through two encoders, or spoken), rows join on (item, caption index) instead: row k of an
item pairs with row k of the same item. Features stay memory-mapped unless they fit comfortably
in memory, so a store larger than RAM still trains.

More than two stores (joint binding of N modalities): the first store after the anchor is the
partner, and each further store is an *extra* modality joined to every pair of its item: one
tuple per (pair, extra row) — the three renderings of a spoken caption make three tuples — or,
when the partner and the extra both have several rows per item, on (item, caption index). A pair
whose item has no extra row keeps it as -1 (absent): joint losses train it on what it has.
Stores of different datasets join only with ``across_datasets=True``, on the items they share,
and only when every shared item sits in the same group in each (else folds would leak).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import AnybindError, StoreError
from ..features import FeatureStore, LayerArray

log = logging.getLogger("anybind.align")
IN_MEMORY_BYTES = 4 << 30  # below this, features are copied to RAM (float32) for speed


class PairingError(AnybindError):
    """Stores that cannot be paired: different datasets, no common items, bad features."""


@dataclass
class Side:
    """One modality of the pairs: its store and the layers the projector reads."""

    name: str
    store: FeatureStore
    layers: list[str]
    arrays: list  # per layer: LayerArray (memory-mapped) or a float32 torch tensor (in memory)

    @property
    def dims(self) -> list[int]:
        return [self.store.layers[lay] for lay in self.layers]

    def rows(self, index: np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """Features of the given store rows, one float32 tensor per layer."""
        out = []
        for arr in self.arrays:
            if isinstance(arr, torch.Tensor):
                out.append(arr[torch.as_tensor(index, dtype=torch.long)])
            else:  # memory-mapped: read in file order (sequential pages), then put back in batch order
                index = np.asarray(index)
                order = np.argsort(index, kind="stable")
                rows = np.empty((len(index), arr.shape[1]), dtype=np.float32)
                rows[order] = arr.read(index[order])
                out.append(torch.from_numpy(rows))
        return out


@dataclass
class Pairs:
    """Pairs (tuples) of one split: anchor row, partner row, item code (equal codes = positives) and
    the rows of any extra modalities."""

    anchor_rows: np.ndarray
    partner_rows: np.ndarray
    item: np.ndarray
    extra_rows: dict[str, np.ndarray] = field(default_factory=dict)  # per extra modality: its row, or -1

    def __len__(self) -> int:
        return len(self.item)

    def rows_of(self, name: str, data: PairedFeatures) -> np.ndarray:
        """The store rows of modality `name` in these pairs (an extra modality's missing rows left out)."""
        if name == data.anchor_name:
            return self.anchor_rows
        if name == data.partner_name:
            return self.partner_rows
        rows = self.extra_rows[name]
        return rows[rows >= 0]

    def select(self, sel: np.ndarray) -> Pairs:
        """The pairs (tuples) picked by a boolean mask or an index array."""
        return Pairs(self.anchor_rows[sel], self.partner_rows[sel], self.item[sel],
                     {m: r[sel] for m, r in self.extra_rows.items()})


class PairedFeatures:
    """Two feature stores joined by item id, with the dataset index's splits.

    >>> data = PairedFeatures({"image": img_store, "text": txt_store})
    >>> train = data.pairs("train")
    """

    def __init__(self, stores: dict[str, FeatureStore], layers: dict[str, list[str]] | None = None,
                 in_memory: bool | None = None, check_values: bool = True, max_unpaired: float = 0.05,
                 fold: int | None = None, anchor: str | None = None, across_datasets: bool = False):
        self.max_unpaired = max_unpaired
        self.fold = fold  # None: the index's fixed split; 0-4: cross-validation (anybind.data.crossval)
        if len(stores) < 2:
            raise PairingError(f"training binds at least two stores (got {len(stores)}: {', '.join(stores) or 'none'})")
        layers = layers or {}
        self.across_datasets = _check_datasets(stores, across_datasets)
        anchor, self.by_row = _anchor_of(stores, anchor)
        others = [n for n in stores if n != anchor]
        self.anchor_name, self.partner_name, self.extra_names = anchor, others[0], others[1:]
        self.sides = {}
        total_bytes = 0
        for n in self.names:
            store = stores[n]
            want = layers.get(n) or ["final"]
            missing = [lay for lay in want if lay not in store.layers]
            if missing:
                raise PairingError(f"the {n} store {store.path.name} has no layer {', '.join(missing)}: "
                                   f"it has {', '.join(store.layers)}")
            total_bytes += sum(len(store) * store.layers[lay] * 4 for lay in want)
            self.sides[n] = Side(n, store, want, [store.array(lay) for lay in want])
        in_memory = total_bytes <= min(IN_MEMORY_BYTES, memory_budget() // 4) if in_memory is None else in_memory
        if in_memory:  # read once, then check the copy: no second pass over the files
            for side in self.sides.values():
                side.arrays = [torch.from_numpy(_read_all(a)) for a in side.arrays]
        if check_values:
            for side in self.sides.values():
                _check_finite(side)
        self._join()
        self.extra_rows_all: dict[str, np.ndarray] = {}
        for name in self.extra_names:  # each expands the pairs before it into tuples
            self.extra_rows_all[name] = self._join_extra(name)

    def _join(self) -> None:
        a, p = self.sides[self.anchor_name].store, self.sides[self.partner_name].store
        first_a, a_key, p_key = _join_keys(a, p, self.by_row)
        if self.by_row:
            order = np.argsort(a_key, kind="stable")
            at = np.minimum(np.searchsorted(a_key[order], p_key), len(order) - 1)
            keep = a_key[order][at] == p_key
            anchor_rows = order[at[keep]].astype(np.int64)
        else:  # one anchor row an item: a partner's key is its anchor row (-1: none), no sort needed
            keep = p_key >= 0
            anchor_rows = p_key[keep]
        if not keep.any():
            raise PairingError(f"the {self.anchor_name} and {self.partner_name} stores share no item ids: "
                               "were they extracted from the same dataset?")
        lost_a = len(a_key) - np.count_nonzero(np.bincount(anchor_rows, minlength=len(a_key)))
        self._check_unpaired(len(a_key), len(p_key), int((~keep).sum()), lost_a)
        self.partner_rows_all = np.nonzero(keep)[0]
        self.anchor_rows_all = anchor_rows
        if self.across_datasets:
            _check_same_groups(a, self.anchor_rows_all, p, self.partner_rows_all)
        self.split_of_pair = self.anchor_splits()[self.anchor_rows_all]
        # the anchor row identifies the item (joined by row: the anchor row of the item's first pair does)
        self.item_of_pair = anchor_rows.copy() if not self.by_row else _first_of_item(first_a, anchor_rows)

    def _check_unpaired(self, n_a: int, n_p: int, lost_p: int, lost_a: int) -> None:
        if self.across_datasets:  # the datasets overlap by design: the pairs are the shared items
            log.info("joined across datasets: %d %s items and %d %s rows are not shared", lost_a,
                     self.anchor_name, lost_p, self.partner_name)
            return
        share = max(lost_p / n_p, lost_a / n_a)
        if share > self.max_unpaired:
            raise PairingError(
                f"the stores hold different item sets: {lost_a} of {n_a} {self.anchor_name} items and "
                f"{lost_p} of {n_p} {self.partner_name} rows have no partner ({share:.0%} > "
                f"{self.max_unpaired:.0%}); extract both from the same dataset index")
        if lost_p or lost_a:  # a few items skipped at extraction (a corrupt image, an empty caption)
            log.warning("%d %s rows and %d %s items have no partner (skipped at extraction?) and are left out",
                        lost_p, self.partner_name, lost_a, self.anchor_name)

    def _join_extra(self, name: str) -> np.ndarray:
        """Join extra modality `name` to every pair (expanding the pairs into tuples); its rows."""
        if self.by_row:
            raise PairingError("binding more than two modalities needs an anchor with one row per item "
                               f"(images); {self.anchor_name} has several")
        a, p, e = (self.sides[n].store for n in (self.anchor_name, self.partner_name, name))
        pair_key, extra_key = _extra_keys(a, p, e, self.anchor_rows_all, self.partner_rows_all)
        if not (extra_key >= 0).any():
            raise PairingError(f"the {name} store shares no item ids with the {self.anchor_name} store")
        order = np.argsort(extra_key, kind="stable")
        lo = np.searchsorted(extra_key[order], pair_key, side="left")
        hi = np.searchsorted(extra_key[order], pair_key, side="right")
        count = np.where(pair_key < 0, 0, hi - lo)
        repeat = np.maximum(count, 1)  # a pair with no extra row stays, once, with -1
        tuple_of = np.repeat(np.arange(len(pair_key)), repeat)
        offset = np.arange(len(tuple_of)) - np.repeat(np.cumsum(repeat) - repeat, repeat)
        rows = np.where(np.repeat(count, repeat) > 0, order[np.minimum(np.repeat(lo, repeat) + offset,
                                                                       len(order) - 1)], -1).astype(np.int64)
        for attr in ("anchor_rows_all", "partner_rows_all", "split_of_pair", "item_of_pair"):
            setattr(self, attr, getattr(self, attr)[tuple_of])
        for other, other_rows in self.extra_rows_all.items():
            self.extra_rows_all[other] = other_rows[tuple_of]
        if self.across_datasets:
            have = rows >= 0
            _check_same_groups(a, self.anchor_rows_all[have], e, rows[have])
        log.info("%s joined: %d of %d tuples have it", name, int((rows >= 0).sum()), len(rows))
        return rows

    def anchor_splits(self) -> np.ndarray:
        """train/val/test per anchor row: the index's split, or the cross-validation fold's."""
        return row_splits(self.sides[self.anchor_name].store, self.fold)

    # ---- access --------------------------------------------------------------------------------
    def pairs(self, split: str | list[str] = "train") -> Pairs:
        splits = [split] if isinstance(split, str) else list(split)
        sel = np.isin(self.split_of_pair, splits)
        if not sel.any():
            raise PairingError(f"no pairs in split {', '.join(splits)}: the dataset index put none there")
        return Pairs(self.anchor_rows_all[sel], self.partner_rows_all[sel], self.item_of_pair[sel],
                     {m: r[sel] for m, r in self.extra_rows_all.items()})

    @property
    def splits_fingerprint(self) -> str:
        """A hash of which pairs are train, val and test: a resumed run or a logged result is only
        reused on the same split (a regrouped dataset index changes it)."""
        import hashlib

        h = hashlib.sha256(str(self.fold).encode())
        for name in ("split_of_pair", "anchor_rows_all", "partner_rows_all"):
            h.update(np.ascontiguousarray(getattr(self, name)).astype("U5" if name == "split_of_pair" else np.int64).tobytes())
        for name, rows in self.extra_rows_all.items():  # none for two modalities: their hash is as before
            h.update(name.encode() + np.ascontiguousarray(rows, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def side(self, name: str) -> Side:
        return self.sides[name]

    @property
    def names(self) -> list[str]:
        """The modalities: the anchor, the partner, then any extras."""
        return [self.anchor_name, self.partner_name, *self.extra_names]

    @property
    def layers(self) -> dict[str, list[str]]:
        """The layers each modality reads, anchor first."""
        return {n: list(self.sides[n].layers) for n in self.names}

    def summary(self) -> dict:
        out = {"anchor": self.anchor_name, "partner": self.partner_name, "fold": self.fold,
               **({"extras": list(self.extra_names)} if self.extra_names else {})}
        for s in ("train", "val", "test"):
            sel = self.split_of_pair == s
            out[s] = {"pairs": int(sel.sum()), "items": int(len(np.unique(self.item_of_pair[sel])))}
        return out


def row_splits(store: FeatureStore, fold: int | None) -> np.ndarray:
    """train/val/test per store row: the dataset index's split (`fold` None), or cross-validation
    fold `fold`'s (`anybind.data.crossval`)."""
    need = ["split"] if fold is None else ["group", "fold"]
    if any(c not in store.rows.column_names for c in need):
        raise StoreError(f"{store.path} has no per-row {' or '.join(need)}: re-extract it with this version of anybind")
    if fold is None:
        return store.rows.column("split").to_numpy(zero_copy_only=False).astype(str)
    from ..data.crossval import fold_splits

    return fold_splits(store.rows.column("group").to_pylist(), store.rows.column("fold").to_numpy(), fold)


def _join_keys(a: FeatureStore, p: FeatureStore, by_row: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per anchor row the first anchor row of its item, anchor keys, partner keys): integer keys,
    equal for rows that pair (the item; with `by_row`, the item and caption index). Hashed in
    Arrow, so a million-row store costs no Python object per row."""
    import pyarrow.compute as pc

    a_ids, p_ids = a.rows.column("item_id"), p.rows.column("item_id")
    first_a = pc.index_in(a_ids, value_set=a_ids).to_numpy().astype(np.int64)
    p_item = pc.index_in(p_ids, value_set=a_ids).to_numpy(zero_copy_only=False)
    p_item = np.where(np.isnan(p_item), -1, p_item).astype(np.int64) if p_item.dtype.kind == "f" else p_item.astype(np.int64)
    if not by_row:
        if not np.array_equal(first_a, np.arange(len(first_a))):  # each row its own first: ids unique
            raise PairingError(f"the anchor store {a.path.name} has several rows per item")
        return first_a, first_a, p_item
    span = int(max(a.caption_index.max(initial=0), p.caption_index.max(initial=0))) + 1
    a_key = first_a * span + a.caption_index.astype(np.int64)
    p_key = np.where(p_item < 0, -1, p_item * span + p.caption_index.astype(np.int64))
    if len(np.unique(a_key)) != len(a_key):
        raise PairingError(f"the anchor store {a.path.name} has several rows of one item and caption index")
    return first_a, a_key, p_key


def _first_of_item(first_a: np.ndarray, anchor_rows: np.ndarray) -> np.ndarray:
    """Per pair, the anchor row of the first pair of its item (`first_a`: each anchor row's item)."""
    _, first_pair, inverse = np.unique(first_a[anchor_rows], return_index=True, return_inverse=True)
    return anchor_rows[first_pair][inverse.ravel()]


def _anchor_of(stores: dict[str, FeatureStore], anchor: str | None) -> tuple[str, bool]:
    """The anchor modality: the one named, or the store with one row per item (images; the partner
    may have several rows per item: captions); and whether rows join by (item, caption index)
    because neither side has one row per item."""
    import pyarrow.compute as pc

    single = [n for n, s in stores.items() if len(s) == pc.count_distinct(s.rows.column("item_id")).as_py()]
    if anchor is not None and anchor not in stores:
        raise PairingError(f"the anchor '{anchor}' is not one of the stores ({', '.join(stores)})")
    if not single:
        if anchor is None:
            raise PairingError("neither store has exactly one row per item: name the anchor (e.g. images)")
        return anchor, True
    if anchor is None:
        return single[0], False
    if anchor not in single:
        raise PairingError(f"the anchor '{anchor}' has several rows per item: the anchor must have one row per "
                           f"item (here: {', '.join(single)})")
    return anchor, False


def _check_datasets(stores: dict[str, FeatureStore], across_datasets: bool) -> bool:
    """Whether the stores come from more than one dataset (refused unless `across_datasets`)."""
    datasets = {n: s.key["dataset"] for n, s in stores.items()}
    if len(set(datasets.values())) == 1:
        return False
    if not across_datasets:
        raise PairingError("the stores come from different datasets ("
                           + ", ".join(f"{n}: {d}" for n, d in datasets.items())
                           + "): pairs are joined by item id within one dataset; pass across_datasets=True "
                           "(--across-datasets) when the datasets share item ids and groups "
                           "(openclipart and openclipart-speech)")
    return True


def _check_same_groups(a: FeatureStore, a_rows: np.ndarray, b: FeatureStore, b_rows: np.ndarray) -> None:
    """Joined rows of two datasets must sit in the same group, or a fold's test items could leak."""
    ga = np.asarray(a.rows.column("group").to_pylist(), dtype=object)[a_rows]
    gb = np.asarray(b.rows.column("group").to_pylist(), dtype=object)[b_rows]
    bad = np.nonzero(ga != gb)[0]
    if len(bad):
        raise PairingError(f"{len(bad)} joined rows of {b.path.name} sit in another group than in {a.path.name} "
                           f"(e.g. item {a.item_ids[int(a_rows[bad[0]])]}): the datasets do not share their "
                           "grouping, so folds would leak")


def _extra_keys(a: FeatureStore, p: FeatureStore, e: FeatureStore, a_rows: np.ndarray,
                p_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer join keys of the pairs and of an extra store's rows (-1: no item in the anchor):
    the item (its anchor row), or (item, caption index) when the partner and the extra both hold
    several rows per item."""
    import pyarrow.compute as pc

    e_item = pc.index_in(e.rows.column("item_id"), value_set=a.rows.column("item_id")).to_numpy(zero_copy_only=False)
    e_item = np.where(np.isnan(e_item), -1, e_item).astype(np.int64) if e_item.dtype.kind == "f" else e_item.astype(np.int64)
    several = [len(s) > pc.count_distinct(s.rows.column("item_id")).as_py() for s in (p, e)]
    if not all(several):
        return a_rows.astype(np.int64), e_item
    span = int(max(p.caption_index.max(initial=0), e.caption_index.max(initial=0))) + 1
    pair_key = a_rows.astype(np.int64) * span + p.caption_index[p_rows].astype(np.int64)
    return pair_key, np.where(e_item < 0, -1, e_item * span + e.caption_index.astype(np.int64))


def _read_all(arr: LayerArray, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """All rows as float32, copied a few MiB at a time: one copy in memory, not a transient second."""
    out = np.empty(arr.shape, dtype=np.float32)
    step = max(1, chunk_bytes // (4 * max(1, arr.shape[1])))
    for lo in range(0, len(arr), step):
        out[lo : lo + step] = arr.read(slice(lo, lo + step))
    return out


def _check_finite(side: Side, chunk_bytes: int = 16 << 20) -> None:
    """NaN or inf features would poison training silently: refuse them up front, with where."""
    for lay, arr in zip(side.layers, side.arrays):
        if isinstance(arr, LayerArray):  # memory-mapped: scan in chunks of a few MiB, whatever the width
            chunk = max(1, chunk_bytes // (4 * max(1, arr.shape[1])))
            bad = sum(int((~np.isfinite(arr.read(slice(lo, lo + chunk)))).any(axis=1).sum())
                      for lo in range(0, len(arr), chunk))
        else:
            bad = int((~torch.isfinite(arr)).any(dim=1).sum())
        if bad:
            raise PairingError(f"the {side.name} store {side.store.path.name} has {bad} rows with NaN or inf "
                               f"in layer {lay}: re-extract with --precision fp32 or drop those items")


def memory_budget() -> int:
    """Bytes this process may fill: the least of the memory available, its cgroup's limit (v2 or
    v1), its data rlimit and ``ANYBIND_MEMORY_BUDGET`` (bytes, or with a K/M/G suffix). Features are
    copied to RAM only when they take a quarter of it, so a process capped below its stores still
    trains, from the memory-mapped files."""
    import os
    import resource

    limits = [_meminfo_available()]
    asked = os.environ.get("ANYBIND_MEMORY_BUDGET", "").strip().upper()
    if asked:
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(asked[-1], 1)
        number = asked[:-1] if asked[-1] in "KMG" else asked
        if not number.isdigit():
            raise AnybindError(f"ANYBIND_MEMORY_BUDGET must be bytes, or a number with K, M or G: not {asked!r}")
        limits.append(int(number) * scale)
    soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    limits.extend(_cgroup_limits())
    return min(limits)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # not Linux: no bound known


def _cgroup_limits() -> list[int]:
    """The memory limits of this process's cgroups (v2 memory.max, v1 memory.limit_in_bytes)."""
    from pathlib import Path

    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            candidate = Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            value = candidate.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:  # v1 writes "no limit" as a huge number
            out.append(int(value))
    return out


def block_permutation(n: int, rng: np.random.Generator, block: int = 256, window: int = 16) -> np.ndarray:
    """A shuffle of 0..n-1 that reads a memory-mapped store in runs: blocks of `block` consecutive
    positions in random order, then positions shuffled within each run of `window` blocks.

    A batch of B rows then touches about B / block stretches of each file instead of B scattered
    pages; every position appears once, and the order is a function of the generator only.

    >>> sorted(block_permutation(10, np.random.default_rng(0), block=3, window=2).tolist()) == list(range(10))
    True
    """
    starts = np.arange(0, n, block)[rng.permutation(-(-n // block))]
    order = np.concatenate([np.arange(s, min(s + block, n)) for s in starts]) if n else np.arange(0)
    span = block * window
    for lo in range(0, n, span):
        order[lo : lo + span] = order[lo : lo + span][rng.permutation(min(span, n - lo))]
    return order
