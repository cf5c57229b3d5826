"""Grouping items that must stay on one side of a split: near-duplicates, series, collections.

Splits and folds are a hash of the group (see `index.split_of`). Items that share any key (an
identical caption, a collection title, a file-name series, identical bytes) are joined into
one group, transitively, so a test item never has its twin in train.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


def group_by_keys(item_ids: Sequence[str], keys: Sequence[Iterable[str]]) -> list[str]:
    """One group name per item: items sharing any key are in one group (transitively).

    A group is named by its smallest item id, so names are stable and human-readable;
    items with no shared key are their own group. ``None``/empty keys are ignored.
    """
    uf = UnionFind(len(item_ids))
    first: dict[str, int] = {}
    for i, item_keys in enumerate(keys):
        for key in item_keys:
            if not key:
                continue
            j = first.setdefault(key, i)
            if j != i:
                uf.union(i, j)
    names: dict[int, str] = {}
    for i, item_id in enumerate(item_ids):
        root = uf.find(i)
        if root not in names or item_id < names[root]:
            names[root] = item_id
    return [names[uf.find(i)] for i in range(len(item_ids))]


def group_stats(groups: Sequence[str], top: int = 10) -> dict:
    """How many groups, how big the largest are, and how many items sit in singletons."""
    sizes = Counter(groups)
    return {
        "groups": len(sizes),
        "singletons": sum(1 for n in sizes.values() if n == 1),
        "largest": sizes.most_common(top),
    }


def oversized_groups(groups: Sequence[str], max_share: float) -> set[str]:
    """Groups holding more than `max_share` of all items.

    Such a group (1,375 near-identical star polygons in openclipart) would be most of a 10%
    test split if its hash sent it there, and its items would dominate every test metric; the
    listers send these to train instead (recorded in the index meta) and hash all the others.
    """
    if max_share <= 0:
        return set()
    limit = max_share * len(groups)
    return {g for g, n in Counter(groups).items() if n > limit}
