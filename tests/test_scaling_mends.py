"""The mends found by benchmarks/scaling.py: near-duplicate grouping past O(n^2), training past memory."""

import sys
from pathlib import Path

import numpy as np
import pytest

from anybind.data.groups import group_by_keys
from anybind.data.near_duplicates import components, exact_pairs, look_keys, lsh_pairs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from scaling import exponent, synthetic_thumbnails  # noqa: E402


def _partition(keys):
    ids = [f"{i:06d}" for i in range(len(keys))]
    return group_by_keys(ids, [[k] if k else [] for k in keys])


@pytest.fixture(scope="module")
def thumbs():
    return list(synthetic_thumbnails(4000, np.random.default_rng(3)))


def test_lsh_path_groups_as_the_exact_one(thumbs):
    exact = look_keys(thumbs, exact_below=10**9)
    approx = look_keys(thumbs, exact_below=0)
    assert exact == approx  # same groups, same names (the smallest position in each group)
    assert sum(k is not None and k != "look:blank" for k in exact) > 250  # the planted copies were found
    assert "look:blank" in exact


def test_lsh_never_joins_below_the_threshold_and_misses_little(thumbs):
    z = np.stack(thumbs[:3000]).astype(np.float64)
    z = z[z.std(axis=1) >= 3.0] - z[z.std(axis=1) >= 3.0].mean(axis=1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    truth = {tuple(p) for p in exact_pairs(z, 0.95).tolist()}
    found = {tuple(p) for p in lsh_pairs(z, 0.95).tolist()}
    assert found <= truth  # every pair checked exactly
    assert len(found) >= 0.99 * len(truth) and len(truth) > 100
    assert all(i < j for i, j in found)


def test_none_and_unreadable_thumbnails_keep_their_place():
    a = np.arange(256, dtype=np.float32)
    keys = look_keys([None, a, None, a + 1, a[::-1].copy()], exact_below=0)
    assert keys == [None, "look:1", None, "look:1", None]
    assert look_keys([None, None]) == [None, None]


def test_components_name_each_group_by_its_smallest_row():
    label = components(6, np.array([[4, 5], [1, 4], [2, 3]]))
    assert label.tolist() == [0, 1, 2, 2, 1, 1]
    assert components(3, np.empty((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]


def test_grouping_is_the_same_as_the_old_all_pairs_join(thumbs):
    # the join as it was before the mend: every pair, union-find roots as names
    from anybind.data.groups import UnionFind

    x = np.stack(thumbs).astype(np.float64)
    live = np.nonzero(x.std(axis=1) >= 3.0)[0]
    z = x[live] - x[live].mean(axis=1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    uf = UnionFind(len(live))
    rows, cols = np.nonzero(np.triu(z @ z.T > 0.95, k=1))
    for r, c in zip(rows, cols, strict=True):
        uf.union(int(r), int(c))
    old = [None] * len(thumbs)
    for j, i in enumerate(live):
        if uf.size[uf.find(j)] > 1:
            old[i] = f"look:{uf.find(j)}"
    for i in np.nonzero(x.std(axis=1) < 3.0)[0]:
        old[i] = "look:blank"
    assert _partition(old) == _partition(look_keys(thumbs, exact_below=0))


def test_every_pair_inside_each_run_of_one_code():
    from anybind.data.near_duplicates import _same_code_pairs

    code = np.array([5, 3, 5, 5, 3, 7], dtype=np.int64)
    flat = np.sort(_same_code_pairs(code, 6))
    assert flat.tolist() == sorted([0 * 6 + 2, 0 * 6 + 3, 2 * 6 + 3, 1 * 6 + 4])
    many = _same_code_pairs(np.r_[np.full(100, 9), 1, 2].astype(np.int64), 102)  # a run of 100 alike images
    assert len(many) == len(set(many.tolist())) == 100 * 99 // 2
    assert _same_code_pairs(np.arange(4, dtype=np.int64), 4).tolist() == []


def test_centred_rows_do_not_depend_on_the_chunk_or_the_dtype(thumbs):
    from anybind.data.near_duplicates import centred_unit_rows

    live = np.arange(len(thumbs))
    z, blank = centred_unit_rows(thumbs, live, 3.0)
    small, _ = centred_unit_rows(thumbs, live, 3.0, chunk=7)
    some = np.array([3, 17, 900, 2500])
    part, _ = centred_unit_rows(thumbs, some, 3.0)
    assert np.array_equal(z, small, equal_nan=True) and np.array_equal(z[some], part, equal_nan=True)
    z32, blank32 = centred_unit_rows(thumbs, live, 3.0, np.float32)
    assert np.array_equal(z.astype(np.float32), z32, equal_nan=True) and np.array_equal(blank, blank32)


def test_float32_rows_keep_exactly_the_float64_pairs(thumbs):
    from anybind.data.near_duplicates import _confirmed

    x = np.stack(thumbs[:3000]).astype(np.float64)
    z = x[x.std(axis=1) >= 3.0] - x[x.std(axis=1) >= 3.0].mean(axis=1, keepdims=True)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    z32 = z.astype(np.float32)
    assert np.array_equal(lsh_pairs(z, 0.95), lsh_pairs(z32, 0.95, exact_rows=lambda rows: z[rows]))
    # pairs a hair either side of the threshold: float32 alone cannot tell them apart
    pairs = np.array([[i, j] for i in range(40) for j in range(i + 1, 400)])
    flat = pairs[:, 0] * len(z) + pairs[:, 1]
    cos = np.einsum("ij,ij->i", z[pairs[:, 0]], z[pairs[:, 1]])
    for threshold in (*np.sort(cos)[-3:], np.nextafter(np.sort(cos)[-2], 0.0)):
        want = pairs[cos > threshold]
        assert np.array_equal(_confirmed(z, flat, threshold), want)
        assert np.array_equal(_confirmed(z32, flat, threshold, exact_rows=lambda rows: z[rows]), want)
        assert np.array_equal(_confirmed(z32, flat, threshold, exact_rows=lambda rows: z[rows], chunk=7), want)


def test_growth_exponent_of_the_two_largest_sizes():
    rows = [{"n": 10, "seconds": 1.0}, {"n": 100, "seconds": 2.0}, {"n": 1000, "seconds": 200.0}]
    assert exponent(rows) == pytest.approx(2.0)
    assert exponent(rows[:1]) is None
    assert exponent([*rows[:2], {"n": 1000, "error": "killed"}]) == pytest.approx(np.log10(2.0))


# ---- training past memory -------------------------------------------------------------------------
def test_block_permutation_is_a_seeded_shuffle_in_runs():
    from anybind.align.data import block_permutation

    order = block_permutation(10_000, np.random.default_rng(5), block=256, window=4)
    assert sorted(order.tolist()) == list(range(10_000))
    assert np.array_equal(order, block_permutation(10_000, np.random.default_rng(5), block=256, window=4))
    assert not np.array_equal(order, np.arange(10_000))
    # a window of 4 blocks holds 4 stretches of 256 consecutive rows: few distinct blocks per batch
    assert len(np.unique(order[:1024] // 256)) <= 8
    assert len(np.unique(np.random.default_rng(5).permutation(10_000)[:1024] // 256)) > 30
    assert block_permutation(0, np.random.default_rng(0)).tolist() == []


def test_mapped_rows_equal_in_memory_rows(tmp_path):
    from anybind.align.data import PairedFeatures
    from anybind.features.store import write_store

    rng = np.random.default_rng(0)
    ids = [f"i{k:04d}" for k in range(500)]
    stores = {m: write_store(tmp_path / m, {"final": rng.standard_normal((500, 24)).astype(np.float32)}, ids,
                             modality=m, field=m, dataset="t") for m in ("image", "text")}
    mapped, copied = PairedFeatures(stores, in_memory=False), PairedFeatures(stores, in_memory=True)
    rows = rng.permutation(500)[:77]  # unsorted, as a shuffled batch asks
    for m in ("image", "text"):
        assert np.array_equal(mapped.side(m).rows(rows)[0].numpy(), copied.side(m).rows(rows)[0].numpy())


def test_memory_budget_honours_the_data_rlimit():
    import subprocess

    code = ("import resource; resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, resource.RLIM_INFINITY)); "
            "from anybind.align.data import memory_budget; print(memory_budget())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0 < int(out.stdout) <= 3 << 30


def test_memory_budget_from_the_environment_keeps_stores_mapped(tmp_path, monkeypatch):
    from anybind.align.data import PairedFeatures, memory_budget
    from anybind.errors import AnybindError
    from anybind.features import LayerArray
    from anybind.features.store import write_store

    monkeypatch.setenv("ANYBIND_MEMORY_BUDGET", "64K")
    assert memory_budget() == 64 << 10
    ids = [f"i{k:04d}" for k in range(300)]
    rng = np.random.default_rng(1)
    stores = {m: write_store(tmp_path / m, {"final": rng.standard_normal((300, 32)).astype(np.float32)}, ids,
                             modality=m, field=m, dataset="t") for m in ("image", "text")}
    assert isinstance(PairedFeatures(stores).side("image").arrays[0], LayerArray)  # 75 KiB > 64 KiB / 4
    monkeypatch.setenv("ANYBIND_MEMORY_BUDGET", "1G")
    assert not isinstance(PairedFeatures(stores).side("image").arrays[0], LayerArray)
    monkeypatch.setenv("ANYBIND_MEMORY_BUDGET", "lots")
    with pytest.raises(AnybindError, match="ANYBIND_MEMORY_BUDGET"):
        memory_budget()


# ---- search index breadth ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_an_approximate_index_searches_as_broadly_as_its_measured_recall_needs(kind):
    faiss = pytest.importorskip("faiss")
    from anybind.serve.index import TARGET_RECALL, _make_index

    x = np.random.default_rng(0).standard_normal((20_000, 64)).astype(np.float32)  # isotropic: hard to search
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, params, built = _make_index(x, kind)
    name = "ef_search" if kind == "hnsw" else "nprobe"
    assert built == kind and params["recall_at_10"] >= TARGET_RECALL
    # recall measured independently, on queries that are not indexed rows
    q = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = faiss.knn(q, x, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
    got = index.search(q, 10)[1]
    assert np.mean([len(set(a) & set(b)) for a, b in zip(got, truth, strict=True)]) / 10 >= TARGET_RECALL - 0.03
    narrower = {"hnsw": 64, "ivf": 8}[kind]  # the ladder's first rung misses more on these vectors
    assert params[name] > narrower


def test_duplicate_rows_are_not_counted_as_misses():
    pytest.importorskip("faiss")
    from anybind.serve.index import _make_index

    x = np.repeat(np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32), 20, axis=0)  # 20 copies each
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    _, params, _ = _make_index(x, "hnsw")
    assert params["ef_search"] == 64 and params["recall_at_10"] >= 0.99  # counted by id: about half of 19 tied copies
