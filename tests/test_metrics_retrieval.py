"""Retrieval recall@k: hand-made cases with several captions per image and ties; chunking; chance."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from anybind.errors import AnybindError
from anybind.metrics import (
    best_positive_rank,
    chance_recall,
    chance_retrieval_metrics,
    recall_at_k,
    retrieval_metrics,
)

S = 1 / math.sqrt(2)

# 3 images, 4 captions. Image i is the unit vector e_i.
#   caption 0 = e0        (of image 0)
#   caption 1 = e1        (of image 0: a caption that looks like image 1)
#   caption 2 = e1        (of image 1)
#   caption 3 = (e0+e2)/sqrt2  (of image 2: equally close to image 0)
IMAGES = np.eye(3, dtype=np.float32)
TEXTS = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [S, 0, S]], dtype=np.float32)
TEXT_TO_IMAGE = np.array([0, 0, 1, 2])

# text -> image scores (rows: captions, columns: images) and the rank of the positive
# (0-based; ties pessimistic: negatives scoring >= the positive):
#   c0: [1, 0, 0]       positive i0 = 1; no negative >= 1                  -> rank 0
#   c1: [0, 1, 0]       positive i0 = 0; i1 = 1 >= 0 and i2 = 0 >= 0 (tie) -> rank 2
#   c2: [0, 1, 0]       positive i1 = 1                                    -> rank 0
#   c3: [S, 0, S]       positive i2 = S; i0 = S (tie)                      -> rank 1
# R@1 = 2/4, R@2 = 3/4, R@3 = 4/4.
#
# image -> text scores (rows: images, columns: captions); positives: all of the image's captions:
#   i0: [1, 0, 0, S]    positives c0 = 1, c1 = 0; best 1; negatives c2 = 0, c3 = S < 1 -> rank 0
#   i1: [0, 1, 1, 0]    positive c2 = 1; negative c1 = 1 (tie)                  -> rank 1
#   i2: [0, 0, 0, S]    positive c3 = S; negatives all 0                        -> rank 0
# R@1 = 2/3, R@2 = 3/3, R@3 = 3/3.
EXPECTED = {
    "image_to_text_R@1": 2 / 3,
    "image_to_text_R@2": 1.0,
    "image_to_text_R@3": 1.0,
    "text_to_image_R@1": 2 / 4,
    "text_to_image_R@2": 3 / 4,
    "text_to_image_R@3": 1.0,
    "mean_R@1": (2 / 3 + 2 / 4) / 2,
    "mean_R@2": (1.0 + 3 / 4) / 2,
    "mean_R@3": 1.0,
}


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4096])
def test_hand_made_case_with_several_captions_and_ties(chunk_size):
    got = retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(1, 2, 3), chunk_size=chunk_size)
    assert got == pytest.approx(EXPECTED)
    assert list(got) == list(EXPECTED)


def test_norms_do_not_matter_and_torch_inputs_work():
    scale = np.array([[3.0], [0.5], [7.0]], dtype=np.float32)
    got = retrieval_metrics(
        torch.from_numpy(IMAGES * scale),
        torch.from_numpy(TEXTS * 2),
        torch.from_numpy(TEXT_TO_IMAGE),
        ks=(1, 2, 3),
    )
    assert got == pytest.approx(EXPECTED)


def test_low_level_recall_on_the_same_score_matrix():
    t2i_scores = TEXTS @ IMAGES.T
    t2i_pos = TEXT_TO_IMAGE[:, None] == np.arange(3)[None, :]
    assert best_positive_rank(t2i_scores, t2i_pos).tolist() == [0, 2, 0, 1]
    assert recall_at_k(t2i_scores, t2i_pos, ks=(1, 2, 3)) == pytest.approx(
        {1: 0.5, 2: 0.75, 3: 1.0}
    )
    i2t_pos = t2i_pos.T
    assert best_positive_rank(t2i_scores.T, i2t_pos).tolist() == [0, 1, 0]
    assert recall_at_k(t2i_scores.T, i2t_pos, ks=(1, 2)) == pytest.approx({1: 2 / 3, 2: 1.0})


def test_ties_are_pessimistic():
    # one query, gallery scores [0.5, 0.5, 0.5]: the positive (column 1) ties with both negatives,
    # so it ranks below both (rank 2): missed at 1 and 2, found at 3. A collapsed model scores 0.
    scores = np.array([[0.5, 0.5, 0.5]])
    pos = np.array([[False, True, False]])
    assert best_positive_rank(scores, pos).tolist() == [2]
    assert recall_at_k(scores, pos, ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}
    # ties among positives do not hurt: any positive counts
    both = np.array([[True, True, False]])
    assert best_positive_rank(scores, both).tolist() == [1]
    collapsed = retrieval_metrics(np.ones((4, 3)), np.ones((4, 3)), np.arange(4), ks=(1, 3))
    assert collapsed["mean_R@1"] == 0.0 and collapsed["mean_R@3"] == 0.0


def test_chunked_equals_unchunked_on_random_data():
    g = torch.Generator().manual_seed(0)
    n_img, n_txt = 37, 90
    images = torch.randn(n_img, 8, generator=g)
    t2i = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=g)])
    texts = images[t2i] + 1.2 * torch.randn(n_txt, 8, generator=g)
    ks = (1, 5, 10, 50)
    full = retrieval_metrics(images, texts, t2i, ks=ks, chunk_size=10_000)
    for chunk in (1, 5, 7, 36, 89):
        assert retrieval_metrics(images, texts, t2i, ks=ks, chunk_size=chunk) == full
    # and both equal the definition on the full cosine matrix
    a = torch.nn.functional.normalize(images, dim=-1)
    b = torch.nn.functional.normalize(texts, dim=-1)
    pos = t2i[:, None] == torch.arange(n_img)[None, :]
    t2i_ref = recall_at_k(b @ a.T, pos, ks)
    i2t_ref = recall_at_k(a @ b.T, pos.T, ks)
    for k in ks:
        assert full[f"text_to_image_R@{k}"] == pytest.approx(t2i_ref[k])
        assert full[f"image_to_text_R@{k}"] == pytest.approx(i2t_ref[k])
        assert full[f"mean_R@{k}"] == pytest.approx((t2i_ref[k] + i2t_ref[k]) / 2)
    assert 0 < full["mean_R@1"] < full["mean_R@10"] < 1  # a non-trivial case
    assert full["text_to_image_R@50"] == 1.0  # k beyond the gallery: everything is found


def test_bad_inputs_are_clear_errors():
    with pytest.raises(AnybindError, match="one image row per caption"):
        retrieval_metrics(IMAGES, TEXTS, [0, 1, 2])
    with pytest.raises(AnybindError, match="outside 0..2"):
        retrieval_metrics(IMAGES, TEXTS, [0, 1, 2, 3])
    with pytest.raises(AnybindError, match="1 images have no caption"):
        retrieval_metrics(IMAGES, TEXTS, [0, 0, 1, 1])
    with pytest.raises(AnybindError, match="integer image rows"):
        retrieval_metrics(IMAGES, TEXTS, [0.0, 0.0, 1.0, 2.0])
    with pytest.raises(AnybindError, match="embedding dimension"):
        retrieval_metrics(IMAGES, TEXTS[:, :2], TEXT_TO_IMAGE)
    bad = TEXTS.copy()
    bad[1, 1] = np.nan
    with pytest.raises(AnybindError, match="NaN or inf"):
        retrieval_metrics(IMAGES, bad, TEXT_TO_IMAGE)
    with pytest.raises(AnybindError, match="k must be at least 1, not 0"):
        retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(0,))
    with pytest.raises(AnybindError, match="no positive"):
        recall_at_k(np.zeros((2, 2)), np.array([[True, False], [False, False]]), ks=(1,))


# ---- chance ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "p", "k"), [(6, 1, 1), (6, 2, 3), (7, 3, 2), (5, 2, 4), (5, 5, 1)])
def test_chance_recall_is_exact(n, p, k):
    # brute force: every k-subset of the gallery is equally likely to be the top k;
    # count the subsets that contain at least one of the p positives (items 0..p-1)
    subsets = list(itertools.combinations(range(n), k))
    hit = sum(any(i < p for i in s) for s in subsets)
    assert chance_recall(n, p, k) == pytest.approx(hit / len(subsets), rel=1e-12)


def test_chance_recall_matches_random_rankings():
    rng = np.random.default_rng(0)
    n, p, k, trials = 50, 3, 5, 20_000
    scores = rng.random((trials, n))  # random scores = a random ranking
    positives = np.zeros((trials, n), dtype=bool)
    positives[:, :p] = True
    simulated = recall_at_k(scores, positives, ks=(k,))[k]
    expected = chance_recall(n, p, k)  # 1 - C(47, 5) / C(50, 5)
    assert expected == pytest.approx(1 - math.comb(47, 5) / math.comb(50, 5))
    assert simulated == pytest.approx(
        expected, abs=4 * math.sqrt(expected * (1 - expected) / trials)
    )


def test_chance_recall_edges_and_per_query_counts():
    assert chance_recall(10, 1, 1) == pytest.approx(0.1)
    assert chance_recall(10, 3, 8) == 1.0  # k > n - p: cannot miss
    assert chance_recall(10, [1, 3], 1) == pytest.approx((0.1 + 0.3) / 2)
    assert chance_recall(500_000, 1, 10) == pytest.approx(10 / 500_000)
    with pytest.raises(AnybindError, match="cannot have 4 positives"):
        chance_recall(3, 4, 1)
    with pytest.raises(AnybindError, match="k must be at least 1, not 0"):
        chance_recall(3, 1, 0)


# ---- chance on a split -------------------------------------------------------------------------------
def test_chance_retrieval_metrics_hand_worked():
    # 3 images (ids 5, 7, 9) with 2, 1 and 3 captions: 6 captions in all.
    # image -> text, gallery 6 captions, k=1: (2/6 + 1/6 + 3/6) / 3 = 1/3.
    #   k=5: p=2 and p=3 cannot miss (k > 6 - p); p=1 misses with C(5,5)/C(6,5) = 1/6.
    #   So (1 + 5/6 + 1) / 3 = 17/18.
    # text -> image, gallery 3 images, one positive: k=1 -> 1/3; k=5 -> 1.
    got = chance_retrieval_metrics(np.array([9, 5, 7, 9, 5, 9]), ks=(1, 5))
    expected = {
        "image_to_text_R@1": 1 / 3, "text_to_image_R@1": 1 / 3, "mean_R@1": 1 / 3,
        "image_to_text_R@5": 17 / 18, "text_to_image_R@5": 1.0, "mean_R@5": (17 / 18 + 1) / 2,
    }
    assert list(got) == list(expected)  # the key order of the trainer's chance_metrics
    assert got == pytest.approx(expected, rel=1e-12)


def test_chance_retrieval_metrics_one_caption_each_is_k_over_n():
    got = chance_retrieval_metrics(torch.arange(20), ks=(1, 10))
    for k in (1, 10):
        for d in ("image_to_text", "text_to_image", "mean"):
            assert got[f"{d}_R@{k}"] == pytest.approx(k / 20)


def test_chance_retrieval_metrics_matches_random_rankings():
    # the definition, simulated: random scores ranked by retrieval_metrics' rule
    rng = np.random.default_rng(1)
    owner = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5])
    expected = chance_retrieval_metrics(owner, ks=(1, 3))
    n_img, trials = owner.max() + 1, 4000
    i2t = t2i = 0.0
    for _ in range(trials):
        scores = rng.random((n_img, len(owner)))
        positives = owner[None, :] == np.arange(n_img)[:, None]
        i2t += recall_at_k(scores, positives, ks=(3,))[3]
        t2i += recall_at_k(scores.T, positives.T, ks=(3,))[3]
    assert i2t / trials == pytest.approx(expected["image_to_text_R@3"], abs=0.02)
    assert t2i / trials == pytest.approx(expected["text_to_image_R@3"], abs=0.02)


def test_chance_retrieval_metrics_errors():
    with pytest.raises(AnybindError, match="non-empty 1-D"):
        chance_retrieval_metrics(np.array([], dtype=np.int64))
    with pytest.raises(AnybindError, match="integer anchor ids"):
        chance_retrieval_metrics(np.array([0.0, 1.0]))
    with pytest.raises(AnybindError, match="ks is empty"):
        chance_retrieval_metrics(np.array([0, 1]), ks=())
