"""Zero-shot classification: hand-worked metrics with ties, a synthetic model, template files."""

from __future__ import annotations

import json
import math
import re
import zlib

import numpy as np
import pytest
import torch

from anybind.errors import AnybindError
from anybind.evaluate.zeroshot import (
    available_templates,
    chance_metrics,
    class_embeddings,
    classification_metrics,
    fill_template,
    load_templates,
    true_class_rank,
    zeroshot_classify,
    zeroshot_evaluate,
)

S = 1 / math.sqrt(2)

# 6 items, 3 classes, imbalanced labels (four of class 0). Rank of the true class (0-based;
# ties pessimistic: other classes scoring >= the true one):
#   item 0  label 0  [0.9, 0.1, 0.0]  -> rank 0
#   item 1  label 0  [0.8, 0.2, 0.1]  -> rank 0
#   item 2  label 0  [0.7, 0.3, 0.0]  -> rank 0
#   item 3  label 0  [0.5, 0.5, 0.0]  -> rank 1 (tied with class 1: counts as below it)
#   item 4  label 1  [0.6, 0.3, 0.1]  -> rank 1
#   item 5  label 2  [0.5, 0.4, 0.1]  -> rank 2
# top1 = 3/6, top2 = 5/6, top5 (capped at C = 3) = 6/6.
# per-class recall: class 0 = 3/4, class 1 = 0/1, class 2 = 0/1 -> mean 0.25 (!= top1 0.5).
SCORES = np.array(
    [
        [0.9, 0.1, 0.0],
        [0.8, 0.2, 0.1],
        [0.7, 0.3, 0.0],
        [0.5, 0.5, 0.0],
        [0.6, 0.3, 0.1],
        [0.5, 0.4, 0.1],
    ],
    dtype=np.float32,
)
LABELS = np.array([0, 0, 0, 0, 1, 2])


def test_rank_and_metrics_hand_worked():
    assert true_class_rank(SCORES, LABELS).tolist() == [0, 0, 0, 1, 1, 2]
    m = classification_metrics(SCORES, LABELS, ks=(1, 2, 5))
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top2"] == pytest.approx(5 / 6)
    assert m["top5"] == pytest.approx(1.0)
    assert m["per_class_recall"] == pytest.approx({0: 0.75, 1: 0.0, 2: 0.0})
    assert m["mean_per_class_recall"] == pytest.approx(0.25)
    assert m["n"] == 6 and m["num_classes"] == 3


def test_default_ks_and_torch_inputs():
    m = classification_metrics(torch.from_numpy(SCORES), torch.from_numpy(LABELS))
    assert set(m) == {
        "top1",
        "top5",
        "mean_per_class_recall",
        "per_class_recall",
        "n",
        "num_classes",
    }
    assert m["top1"] == pytest.approx(0.5)


def test_mean_per_class_recall_matches_balanced_accuracy_without_ties():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 7))
    labels = rng.choice(7, size=200, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    pred = scores.argmax(1)
    recalls = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    m = classification_metrics(scores, labels)
    assert m["top1"] == pytest.approx(np.mean(pred == labels))
    assert m["mean_per_class_recall"] == pytest.approx(np.mean(recalls))
    top5 = np.argsort(-scores, axis=1)[:, :5]
    assert m["top5"] == pytest.approx(np.mean([labels[i] in top5[i] for i in range(200)]))


def test_all_ties_score_zero_not_chance():
    scores = np.zeros((4, 3))
    m = classification_metrics(scores, [0, 1, 2, 0], ks=(1, 2, 3))
    assert m["top1"] == 0.0 and m["top2"] == 0.0 and m["top3"] == 1.0
    assert m["mean_per_class_recall"] == 0.0


def test_absent_classes_are_left_out_of_mean_recall():
    # class 2 never occurs: mean over classes 0 and 1 only
    scores = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    m = classification_metrics(scores, [0, 0, 1])
    assert m["per_class_recall"] == {0: 0.5, 1: 1.0}
    assert m["mean_per_class_recall"] == pytest.approx(0.75)


def test_chance_metrics():
    c = chance_metrics(LABELS, 3)
    assert c["chance_top1"] == pytest.approx(1 / 3)
    assert c["chance_top5"] == pytest.approx(1.0)  # min(5, 3) / 3
    assert c["chance_mean_per_class_recall"] == pytest.approx(1 / 3)
    assert c["majority_class"] == 0
    assert c["majority_top1"] == pytest.approx(4 / 6)
    assert c["majority_mean_per_class_recall"] == pytest.approx(1 / 3)
    # the majority baseline scored by the metric function gives the same numbers
    always0 = np.tile([1.0, 0.0, 0.0], (6, 1))
    m = classification_metrics(always0, LABELS)
    assert m["top1"] == pytest.approx(c["majority_top1"])
    assert m["mean_per_class_recall"] == pytest.approx(c["majority_mean_per_class_recall"])
    c10 = chance_metrics([0, 1, 1], 10)
    assert c10["chance_top5"] == pytest.approx(0.5)
    assert c10["chance_top1"] == pytest.approx(0.1)
    assert c10["majority_mean_per_class_recall"] == pytest.approx(0.5)  # 2 classes present


def test_zeroshot_classify_is_cosine():
    img = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    cls = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert zeroshot_classify(img, cls).flatten().tolist() == pytest.approx([1.0, 0.0, S, S])


def test_class_embeddings_normalise_each_prompt_before_averaging():
    table = {"A cat": [2.0, 0.0], "B cat": [0.0, 3.0], "A dog": [0.0, -1.0], "B dog": [0.0, -5.0]}
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return torch.tensor([table[t] for t in texts])

    emb = class_embeddings(["cat", "dog"], embed, ["A {c}", "B {c}"], batch_size=3)
    # cat: mean([1, 0], [0, 1]) = [.5, .5] -> [S, S]  (raw mean [1, 1.5] would differ)
    assert emb.flatten().tolist() == pytest.approx([S, S, 0.0, -1.0])
    assert emb.dtype == torch.float32
    assert calls == [["A cat", "B cat", "A dog"], ["B dog"]]  # batched, class-major order


def test_fill_template_leaves_other_braces():
    assert fill_template("{c} in {braces}", "cat") == "cat in {braces}"


# ---------------------------------------------------------------- a synthetic model

D = 32
CLASSES = ["zebra", "kettle", "violin", "tulip", "anchor", "cactus", "lantern", "walrus"]


def _vec(key: str, dim: int = D) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    v = torch.randn(dim, generator=g)
    return v / v.norm()


def synthetic_embed(texts: list[str]) -> torch.Tensor:
    """A 'text encoder' whose answer is known: the class word's fixed vector, plus a large
    noise term that depends on the whole prompt (so different templates add different noise)."""
    rows = []
    for t in texts:
        words = [w for w in CLASSES if re.search(rf"\b{w}\b", t)]
        assert len(words) == 1, t
        rows.append(_vec(words[0]) + 2.5 * _vec("noise:" + t))
    return torch.stack(rows) * 7.0  # an arbitrary scale: only directions matter


def _images(per_class: int = 6) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(1)
    labels = np.repeat(np.arange(len(CLASSES)), per_class)
    protos = torch.stack([_vec(c) for c in CLASSES])
    return protos[labels] + 0.05 * torch.randn(len(labels), D, generator=g), labels


def test_synthetic_model_template_averaging_removes_prompt_noise():
    images, labels = _images()
    many = load_templates("openai_imagenet")
    one = many[:1]
    protos = torch.stack([_vec(c) for c in CLASSES])
    emb_many = class_embeddings(CLASSES, synthetic_embed, many)
    emb_one = class_embeddings(CLASSES, synthetic_embed, one)
    # averaging 80 prompts brings each class embedding close to its true vector
    assert (emb_many * protos).sum(1).min() > 0.85
    assert (emb_one * protos).sum(1).max() < 0.7  # 1 / sqrt(1 + 2.5^2) ~ 0.37 expected
    res = zeroshot_evaluate(images, labels, CLASSES, synthetic_embed, templates="openai_imagenet")
    assert res["top1"] == 1.0 and res["top5"] == 1.0 and res["mean_per_class_recall"] == 1.0
    assert res["num_templates"] == 80 and res["templates"] == "openai_imagenet"
    assert res["chance"]["chance_top1"] == pytest.approx(1 / len(CLASSES))
    assert res["n"] == len(labels)
    single = zeroshot_evaluate(images, labels, CLASSES, synthetic_embed, templates=one)
    assert single["templates"] == "custom" and single["num_templates"] == 1
    assert single["top1"] < res["top1"]


def test_batch_size_does_not_change_the_classifier():
    t = load_templates("clipart")
    a = class_embeddings(CLASSES, synthetic_embed, t, batch_size=1)
    b = class_embeddings(CLASSES, synthetic_embed, t, batch_size=1000)
    assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------- template files


def test_builtin_template_sets():
    assert {"default", "clipart", "openai_imagenet"} <= set(available_templates())
    oi = load_templates("openai_imagenet")
    assert len(oi) == 80 and len(set(oi)) == 80
    assert oi[:2] == ["a bad photo of a {c}.", "a photo of many {c}."]
    assert oi[-1] == "a tattoo of the {c}."
    for name in available_templates():
        ts = load_templates(name)
        assert ts and all(t.count("{c}") == 1 for t in ts)
    assert load_templates() == load_templates("default")
    assert "a clip art of a {c}." in load_templates("clipart")


def test_load_templates_from_a_file(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(["a scan of a {c}.", "{c}"]))
    assert load_templates(str(p)) == ["a scan of a {c}.", "{c}"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "content, match",
    [
        (["a photo of a cat."], "exactly one"),
        (["{c} and {c}"], "exactly one"),
        ([], "empty"),
        ([3], "not a string"),
        ({"t": "{c}"}, "list of strings"),
    ],
)
def test_bad_template_files(tmp_path, content, match):
    p = tmp_path / "t.json"
    p.write_text(json.dumps(content))
    with pytest.raises(AnybindError, match=match):
        load_templates(str(p))


def test_template_errors():
    with pytest.raises(AnybindError, match="unknown template set 'imagenet9'.*default"):
        load_templates("imagenet9")
    with pytest.raises(AnybindError, match="exactly one"):
        class_embeddings(["cat"], synthetic_embed, ["a photo"])


def test_not_json(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("a photo of a {c}.")
    with pytest.raises(AnybindError, match="not valid JSON"):
        load_templates(str(p))


def test_label_errors():
    with pytest.raises(AnybindError, match="label 3 is out of range for 3 classes"):
        classification_metrics(SCORES, [0, 0, 0, 0, 1, 3])
    with pytest.raises(AnybindError, match="out of range"):
        classification_metrics(SCORES, [0, 0, 0, 0, 1, -1])
    with pytest.raises(AnybindError, match="integer"):
        classification_metrics(SCORES, LABELS.astype(float))
    with pytest.raises(AnybindError, match="6 images"):
        classification_metrics(SCORES, [0, 1])
    with pytest.raises(AnybindError, match="out of range"):
        chance_metrics([0, 5], 3)
    images, _ = _images(1)
    with pytest.raises(AnybindError, match="out of range"):
        zeroshot_evaluate(images, np.arange(len(CLASSES)) + 1, CLASSES, synthetic_embed)


def test_class_and_shape_errors():
    with pytest.raises(AnybindError, match="class_names is empty"):
        class_embeddings([], synthetic_embed, ["{c}"])
    with pytest.raises(AnybindError, match="non-empty name"):
        class_embeddings(["cat", ""], synthetic_embed, ["{c}"])
    with pytest.raises(AnybindError, match="same"):
        zeroshot_classify(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(AnybindError, match="one row per prompt"):
        class_embeddings(["zebra"], lambda t: torch.ones(1, 4), ["{c}", "a {c}"])
    with pytest.raises(AnybindError, match="NaN"):
        class_embeddings(["zebra"], lambda t: torch.full((len(t), 4), float("nan")), ["{c}"])
    with pytest.raises(AnybindError, match="ks"):
        classification_metrics(SCORES, LABELS, ks=())
    with pytest.raises(AnybindError, match="k must be"):
        classification_metrics(SCORES, LABELS, ks=(0,))
