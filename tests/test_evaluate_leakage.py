"""Leakage check: hand-made duplicate/orthogonal cases, the strict threshold, chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anybind.errors import AnybindError
from anybind.evaluate.leakage import leakage_warning, near_duplicate_share


def test_exact_duplicates_share_one():
    train = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    r = near_duplicate_share(train, train[[3, 1]] * 2.0)  # scale does not matter (cosine)
    assert r["share"] == 1.0 and r["count"] == 2 and r["n_test"] == 2 and r["n_train"] == 5
    assert r["nearest_train"].tolist() == [3, 1]
    assert np.allclose(r["max_cosine"], 1.0, atol=1e-6)
    assert isinstance(r["max_cosine"], np.ndarray)


def test_orthogonal_share_zero():
    eye = np.eye(4, dtype=np.float32)
    r = near_duplicate_share(eye[:2], eye[2:])
    assert r["share"] == 0.0 and r["count"] == 0
    assert r["max_cosine"].tolist() == [0.0, 0.0]
    assert leakage_warning(r) is None


def test_threshold_is_strict():
    # test item at 60 degrees from the only train item: cosine exactly 0.5 (exact in float32).
    train = np.array([[1.0, 0.0]], dtype=np.float32)
    test = np.array([[0.5, math.sqrt(3) / 2]], dtype=np.float32)
    cos = float(near_duplicate_share(train, test)["max_cosine"][0])
    assert near_duplicate_share(train, test, threshold=cos)["count"] == 0
    assert near_duplicate_share(train, test, threshold=np.nextafter(cos, -1.0))["count"] == 1
    # and an exact duplicate does not exceed threshold 1.0
    assert near_duplicate_share(train, train, threshold=1.0)["count"] == 0


def test_chunked_equals_unchunked():
    g = np.random.default_rng(1)
    train = g.normal(size=(53, 6)).astype(np.float32)
    test = np.concatenate([train[:7] + 0.01 * g.normal(size=(7, 6)), g.normal(size=(30, 6))])
    full = near_duplicate_share(train, test, threshold=0.9, chunk_size=10_000)
    for chunk in (1, 4, 16):
        r = near_duplicate_share(torch.from_numpy(train), test.astype(np.float32), chunk_size=chunk)
        assert r["count"] == full["count"] and r["share"] == full["share"]
        np.testing.assert_allclose(r["max_cosine"], full["max_cosine"], atol=1e-6)
        assert np.array_equal(r["nearest_train"], full["nearest_train"])
    assert full["count"] >= 7


def test_warning_text():
    r = {"share": 0.123, "count": 123, "n_test": 1000, "threshold": 0.9}
    text = leakage_warning(r)
    assert text is not None
    assert text.startswith(
        "12.3% of test items (123 of 1000) have a near-duplicate (cosine > 0.90)"
    )
    assert "group near-duplicates in the dataset index" in text
    assert leakage_warning({**r, "share": 0.05}) is None  # at the limit: no warning
    assert leakage_warning(r, limit=0.2) is None


def test_errors():
    with pytest.raises(AnybindError, match="same width"):
        near_duplicate_share(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(AnybindError, match="NaN"):
        near_duplicate_share(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    with pytest.raises(AnybindError, match="empty"):
        near_duplicate_share(np.ones((2, 2)), np.zeros((0, 2)))
    with pytest.raises(AnybindError, match="threshold"):
        near_duplicate_share(np.ones((2, 2)), np.ones((2, 2)), threshold=1.5)
    with pytest.raises(AnybindError, match="chunk_size"):
        near_duplicate_share(np.ones((2, 2)), np.ones((2, 2)), chunk_size=0)
    with pytest.raises(AnybindError, match="near_duplicate_share"):
        leakage_warning({"share": 0.5})
