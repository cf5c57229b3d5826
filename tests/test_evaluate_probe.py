"""Linear probe: separable data, a hand-checkable 1-D case, balanced accuracy, L2 selection, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anybind.errors import AnybindError
from anybind.evaluate.probe import (
    DEFAULT_WEIGHT_DECAYS,
    LinearProbe,
    fit_linear_probe,
    mean_per_class_recall,
    probe_metrics,
)


def _blobs(n: int, n_classes: int, dim: int, sep: float, seed: int):
    g = np.random.default_rng(seed)
    centers = g.normal(size=(n_classes, dim)) * sep
    y = g.integers(0, n_classes, size=n)
    x = centers[y] + g.normal(size=(n, dim))
    return x.astype(np.float32), y


def test_separable_data_is_classified_perfectly():
    x, y = _blobs(600, 4, 16, sep=10.0, seed=0)
    probe = fit_linear_probe(x[:400], y[:400])
    m = probe_metrics(probe, x[400:], y[400:])
    assert m["top1"] == 1.0 and m["mean_per_class_recall"] == 1.0 and m["n"] == 200
    assert probe.predict_scores(x[400:]).shape == (200, 4)
    assert probe.predict(torch.from_numpy(x[400:])).dtype == torch.int64


def test_one_dimensional_threshold_lies_between_the_classes():
    # class 0 at x in {0, 1}, class 1 at x in {3, 4}: symmetric, so the boundary is at 2.
    x = np.array([[0.0], [1.0], [3.0], [4.0]], dtype=np.float32)
    y = np.array([0, 0, 1, 1])
    for standardize in (True, False):
        probe = fit_linear_probe(x, y, weight_decay=1e-2, standardize=standardize)
        grid = torch.linspace(0, 4, 401)[:, None]
        s = probe.predict_scores(grid)
        margin = s[:, 1] - s[:, 0]
        crossing = float(grid[torch.nonzero(margin > 0)[0, 0], 0])
        assert 1.0 < crossing < 3.0
        assert crossing == pytest.approx(2.0, abs=0.02)
        assert probe.predict(x).tolist() == [0, 0, 1, 1]


def test_imbalanced_data_balanced_accuracy_differs_from_top1():
    # 95 of class 0, 5 of class 1; the two overlap completely, so the probe says 0 everywhere.
    g = np.random.default_rng(1)
    x = g.normal(size=(100, 3)).astype(np.float32)
    y = np.array([0] * 95 + [1] * 5)
    probe = fit_linear_probe(x, y, weight_decay=1.0)
    m = probe_metrics(probe, x, y)
    assert m["top1"] == pytest.approx(0.95)
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert m["majority_top1"] == pytest.approx(0.95)
    assert m["majority_mean_per_class_recall"] == pytest.approx(0.5)
    assert m["chance_top1"] == pytest.approx(0.5)


def test_mean_per_class_recall_by_hand():
    # class 0: 2 of 3 right; class 1: 1 of 1 right; class 2 absent from y_true, not averaged.
    assert mean_per_class_recall([0, 0, 0, 1], [0, 0, 2, 1]) == pytest.approx((2 / 3 + 1) / 2)


def test_weight_decay_is_chosen_on_val_and_reported():
    # few, noisy examples in many dimensions
    x, y = _blobs(2000, 3, 200, sep=0.15, seed=2)
    probe = fit_linear_probe(x[:60], y[:60], x[60:1000], y[60:1000], max_iter=100)
    cfg = probe.config()
    assert probe.weight_decay in DEFAULT_WEIGHT_DECAYS and cfg["weight_decay"] == probe.weight_decay
    assert [s["weight_decay"] for s in cfg["search"]] == sorted(DEFAULT_WEIGHT_DECAYS)
    best = max(s["val_top1"] for s in cfg["search"])
    assert (
        cfg["search"][[s["weight_decay"] for s in cfg["search"]].index(probe.weight_decay)][
            "val_top1"
        ]
        == best
    )
    assert cfg["n_train"] == 60 and cfg["n_features"] == 200 and cfg["n_classes"] == 3
    assert 1 <= cfg["n_iter"] <= cfg["max_iter"]


def test_val_ties_go_to_the_larger_weight_decay():
    x, y = _blobs(300, 2, 4, sep=20.0, seed=6)  # every L2 strength gets val top-1 = 1
    probe = fit_linear_probe(x[:100], y[:100], x[100:], y[100:], weight_decays=(1e-3, 1e-1))
    assert [s["val_top1"] for s in probe.search] == [1.0, 1.0]
    assert probe.weight_decay == 1e-1


def test_without_val_the_default_is_used_and_stats_are_kept():
    x, y = _blobs(200, 3, 5, sep=3.0, seed=3)
    x = x * 10 + 100  # far from standard
    probe = fit_linear_probe(x, y)
    assert probe.weight_decay == 1e-4 and probe.config()["search"] == []
    assert torch.allclose(probe.mean, torch.from_numpy(x).mean(0), rtol=1e-4)
    assert probe.std.shape == (5,) and probe.class_counts.sum() == 200


def test_deterministic():
    x, y = _blobs(300, 3, 20, sep=1.0, seed=4)
    a = fit_linear_probe(x[:200], y[:200], x[200:], y[200:], seed=0)
    b = fit_linear_probe(x[:200], y[:200], x[200:], y[200:], seed=0)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.config() == b.config()


def test_input_is_not_modified_and_constant_features_are_fine():
    x, y = _blobs(100, 2, 4, sep=3.0, seed=5)
    x[:, 2] = 7.0
    before = x.copy()
    probe = fit_linear_probe(x, y)
    assert np.array_equal(x, before)
    assert torch.isfinite(probe.predict_scores(x)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y_train": np.array([0, 1, 5, 1]), "n_classes": 2}, "labels in"),
        ({"y_train": np.array([0, -1, 1, 1])}, "labels in"),
        ({"y_train": np.array([0, 1, 1])}, "one label per row"),
        ({"x_train": np.array([[0.0], [np.nan], [1.0], [2.0]])}, "NaN"),
        ({"y_train": np.array([1, 1, 1, 1])}, "single class"),
        ({"y_train": np.array([0.0, 1.0, 0.0, 1.0])}, "integer"),
        ({"x_val": np.zeros((2, 1))}, "both x_val and y_val"),
        ({"x_val": np.zeros((2, 3)), "y_val": np.array([0, 1])}, "features"),
        ({"max_iter": 0}, "max_iter"),
        ({"weight_decay": -1.0}, "weight decay"),
        ({"weight_decays": ()}, "empty"),
    ],
)
def test_errors(kwargs, match):
    args = {
        "x_train": np.array([[0.0], [1.0], [3.0], [4.0]]),
        "y_train": np.array([0, 0, 1, 1]),
    }
    if "weight_decays" in kwargs:
        args.update(x_val=args["x_train"], y_val=args["y_train"])
    args.update(kwargs)
    with pytest.raises(AnybindError, match=match):
        fit_linear_probe(**args)


def test_metric_errors():
    probe = fit_linear_probe(np.array([[0.0], [1.0], [3.0], [4.0]]), np.array([0, 0, 1, 1]))
    assert isinstance(probe, LinearProbe)
    with pytest.raises(AnybindError, match="labels in"):
        probe_metrics(probe, np.zeros((2, 1)), np.array([0, 2]))
    with pytest.raises(AnybindError, match="fitted on 1"):
        probe_metrics(probe, np.zeros((2, 2)), np.array([0, 1]))
    with pytest.raises(AnybindError, match="LinearProbe"):
        probe_metrics("probe", np.zeros((2, 1)), np.array([0, 1]))
