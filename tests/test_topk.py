"""Ties in a bank's top k: the lowest column wins, in the model and in the torch-free runtime alike,
and exact copies in a bank tie exactly (openclipart's bank holds 1,887 rows with a copy)."""

import numpy as np
import pytest
import torch

from anybind.align.baselines import PairedArrays, build_baseline
from anybind.align.topk import Bank, bank_top_k, top_k
from anybind.runtime.blend import Baseline as RuntimeBaseline
from anybind.runtime.blend import _top_k


def test_the_lowest_column_wins_a_tie_at_the_kth_place():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    values, columns = top_k(scores, 2)
    assert columns.tolist() == [[1, 0], [0, 1]]
    assert values.flatten().tolist() == pytest.approx([0.9, 0.5, 0.2, 0.2])
    np_values, np_columns = _top_k(scores.numpy(), 2)
    assert np_columns.tolist() == [[1, 0], [0, 1]]
    np.testing.assert_array_equal(np_values, values.numpy())


@pytest.mark.parametrize("k", [1, 3, 7, 12, 20])
def test_torch_and_numpy_choose_the_same_columns_among_many_ties(k):
    scores = torch.randint(0, 4, (64, 20)).float()  # four values in 20 columns: ties everywhere
    values, columns = top_k(scores, k)
    np_values, np_columns = _top_k(scores.numpy(), k)
    np.testing.assert_array_equal(columns.numpy(), np_columns)
    np.testing.assert_array_equal(values.numpy(), np_values)
    for row, cols in zip(scores, columns):  # the k largest, largest first, then lowest column first
        assert cols.tolist() == sorted(range(20), key=lambda j: (-row[j].item(), j))[:k]


def test_exact_copies_in_a_bank_get_the_same_score():
    rng = np.random.default_rng(0)
    bank = torch.from_numpy(rng.normal(size=(40, 33)).astype(np.float32))
    bank = bank[torch.from_numpy(rng.integers(0, 40, 300))]  # 300 rows, most of them copies
    queries = torch.from_numpy(rng.normal(size=(9, 33)).astype(np.float32))
    values, columns = bank_top_k(queries, Bank.of(bank), 300, block=64)  # every column, scored in blocks
    scores = torch.empty(9, 300).scatter_(1, columns, values)
    for j in range(1, 300):
        copies = (bank == bank[j]).all(1).nonzero().squeeze(1)
        assert (scores[:, copies] == scores[:, j : j + 1]).all()


@pytest.mark.parametrize("n,d,distinct,share_first,zeros", [
    (1, 3, 1, False, False), (5, 1, 5, False, False), (300, 33, 40, False, False), (1000, 8, 1000, True, False),
    (1000, 8, 50, True, True), (2000, 4, 300, True, False), (500, 2, 100, False, True)])
def test_bank_rows_are_torch_uniques_rows(n, d, distinct, share_first, zeros):
    # grouped by a hash of each row, rows sharing a hash compared whole: the same distinct rows as
    # torch.unique(dim=0), which sorts every row, in the order of their first copies
    rng = np.random.default_rng(n + d)
    base = rng.normal(size=(distinct, d)).astype(np.float32)
    if share_first:  # many rows share a first value and differ later
        base[:, 0] = np.round(base[:, 0])
    if zeros and d > 1:  # -0.0 and 0.0 are one value
        base[::3, 1], base[1::3, 1], base[::2, 0] = 0.0, -0.0, 0.0
    bank = torch.from_numpy(base[rng.integers(0, distinct, n)])
    b = Bank.of(bank)
    want = torch.unique(bank, dim=0)
    assert len(b.rows) == len(want) and torch.equal(torch.unique(b.rows, dim=0), want)
    assert torch.equal(b.rows[b.inverse], bank)
    assert (b.columns[b.starts] == torch.sort(b.columns[b.starts]).values).all()  # by first copy


def whole_bank_scores(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The reference: every bank row's score, each copy given its distinct row's (torch.unique)."""
    unique, inverse = torch.unique(bank, dim=0, return_inverse=True)
    return (queries @ unique.T)[:, inverse]


@pytest.mark.parametrize("k,block", [(1, 7), (5, 40), (12, 1000), (30, 10**6), (200, 64)])
def test_bank_top_k_in_blocks_is_the_top_k_of_the_whole_bank(k, block):
    # small integers: every product is exact, so scores tie wherever they should, whatever the block
    rng = np.random.default_rng(k)
    distinct = torch.from_numpy(rng.integers(-2, 3, size=(40, 3)).astype(np.float32))  # rows repeat, scores tie
    bank = distinct[torch.from_numpy(rng.integers(0, 40, 200))]
    queries = torch.from_numpy(rng.integers(-2, 3, size=(9, 3)).astype(np.float32))
    want = top_k(whole_bank_scores(queries, bank), k)
    got = bank_top_k(queries, Bank.of(bank), k, block)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert bank_top_k(queries[:0], Bank.of(bank), k, block)[1].shape == (0, k)


def test_bank_keeps_each_rows_copies_in_column_order():
    bank = torch.tensor([[1.0, 0], [0, 1], [1, 0], [2, 2], [0, 1], [1, 0]])
    b = Bank.of(bank)
    assert torch.equal(b.rows, torch.tensor([[1.0, 0], [0, 1], [2, 2]]))  # by first copy
    assert b.inverse.tolist() == [0, 1, 0, 2, 1, 0] and b.counts.tolist() == [3, 2, 1]
    assert [b.columns[s:s + c].tolist() for s, c in zip(b.starts, b.counts)] == [[0, 2, 5], [1, 4], [3]]


@pytest.mark.parametrize("collide", [False, True])
@pytest.mark.parametrize("n,distinct,share_first", [(1, 1, False), (300, 40, False), (2000, 300, True)])
def test_bank_of_random_rows_matches_a_row_by_row_construction(n, distinct, share_first, collide, monkeypatch):
    import anybind.align.topk as topk

    if collide:  # distinct rows sharing a hash are told apart by comparing them whole
        monkeypatch.setattr(topk, "_row_hashes", lambda x: np.round(x[:, 0]).astype(np.int64).astype(np.uint64))
    rng = np.random.default_rng(n)
    base = rng.normal(size=(distinct, 5)).astype(np.float32)
    if share_first:
        base[:, 0] = np.round(base[:, 0])
    bank = torch.from_numpy(base[rng.integers(0, distinct, n)])
    b = Bank.of(bank)
    firsts, copies = {}, {}
    for column, row in enumerate(map(tuple, bank.tolist())):
        firsts.setdefault(row, column)
        copies.setdefault(row, []).append(column)
    want_rows = sorted(firsts, key=firsts.get)
    assert b.rows.tolist() == [list(r) for r in want_rows]
    assert torch.equal(b.rows[b.inverse], bank)
    assert [b.columns[s:s + c].tolist() for s, c in zip(b.starts, b.counts)] == [copies[r] for r in want_rows]


def duplicated_pairs(seed: int = 0) -> PairedArrays:
    """Images repeated up to 6 times, each copy with its own two captions (as openclipart files the
    same drawing in several folders)."""
    rng = np.random.default_rng(seed)
    distinct = rng.normal(size=(60, 24)).astype(np.float32)
    image = distinct[rng.integers(0, 60, 200)]
    owner = np.repeat(np.arange(200), 2)
    text = rng.normal(size=(400, 16)).astype(np.float32)
    return PairedArrays(image, text, owner)


@pytest.mark.parametrize("name", ["nn-transfer", "asif"])
def test_a_bank_with_copies_encodes_alike_in_any_chunk_and_in_the_runtime(tmp_path, name):
    train = duplicated_pairs()
    queries = np.concatenate([train.image[:20], np.random.default_rng(1).normal(size=(20, 24))]).astype(np.float32)
    model = build_baseline(name, k=4).fit(train)
    one_by_one = build_baseline(name, k=4, batch_size=1).fit(train)
    expected = model.encode("image", queries)
    # one query per matrix product moves the last bits, never which neighbours are chosen
    torch.testing.assert_close(one_by_one.encode("image", queries), expected, atol=1e-6, rtol=0)
    model.save(tmp_path / "b")
    assert not any("cache" in name for name in (tmp_path / "b" / "config.json").read_text().split('"'))
    runtime = RuntimeBaseline(tmp_path / "b")
    np.testing.assert_allclose(runtime.encode("image", queries), expected.numpy(), atol=1e-5)
