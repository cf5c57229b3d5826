"""The bounded caption-transfer bank (`nn-transfer`'s `bank`): reduced to exactly `bank` rows by a
seeded k-means, identical to the full bank when the cap is not reached, saved and served as before."""

import json

import numpy as np
import pytest
import torch

import anybind
from _toy import replicas
from anybind.align.baselines import Baseline, BaselineError, PairedArrays, build_baseline
from anybind.cli import main
from anybind.runtime.blend import Baseline as RuntimeBaseline


def random_pairs(n_images: int = 300, seed: int = 0) -> PairedArrays:
    """Images with two captions each, captions a noisy linear map of their image."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n_images, 24)).astype(np.float32)
    owner = np.repeat(np.arange(n_images), 2)
    text = (image[owner] @ rng.normal(size=(24, 16)) + 0.3 * rng.normal(size=(2 * n_images, 16))).astype(np.float32)
    return PairedArrays(image, text, owner)


def test_a_cap_below_the_images_reduces_the_bank_to_exactly_that_many_rows():
    train = random_pairs()
    model = build_baseline("nn-transfer", bank=40).fit(train)
    assert model._anchor_image.shape == (40, 24) and model._anchor_text.shape == (40, 16)
    assert int(model._anchor_members.sum()) == train.n_images  # every image belongs to one row
    torch.testing.assert_close(model._anchor_image.norm(dim=1), torch.ones(40))  # still a cosine bank
    assert model.config()["fitted"] | {} == {"n_images": 300, "n_texts": 600, "bank": 40, "bank_from": 300,
                                             "out_dim": 16, "k": 10}
    assert build_baseline("nn-transfer", bank=40, bank_reduction="subsample").fit(train)._anchor_image.shape == (40, 24)


def test_the_reduction_is_seeded_and_deterministic(tmp_path):
    train = random_pairs()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_baseline("nn-transfer", bank=30, bank_seed=seed).fit(train).save(tmp_path / name)
    weights = {name: (tmp_path / name / "weights.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"]  # same seed: the same bytes
    assert weights["a"] != weights["c"]  # another seed starts k-means elsewhere


@pytest.mark.parametrize("bank", [None, 0, 300, 10_000])
def test_a_cap_at_or_above_the_images_is_the_full_bank(bank):
    train, queries = random_pairs(), np.random.default_rng(5).normal(size=(20, 24)).astype(np.float32)
    full = build_baseline("nn-transfer").fit(train)
    capped = build_baseline("nn-transfer", bank=bank).fit(train)
    assert torch.equal(capped._anchor_image, full._anchor_image) and torch.equal(capped._anchor_text, full._anchor_text)
    assert torch.equal(capped.encode("image", queries), full.encode("image", queries))
    assert not hasattr(capped, "_anchor_members") and "bank" not in capped.config()["fitted"]


def two_clusters() -> tuple[PairedArrays, np.ndarray]:
    """Three images near e1 and three near e2 (4-d), one caption each; the caption of image i is
    one-hot at i (6-d), so a cluster's mean caption is plain to read."""
    image = np.array([[1, 0.2, 0, 0], [1, -0.2, 0, 0], [1, 0, 0, 0],
                      [0, 0, 0.2, 1], [0, 0, -0.2, 1], [0, 0, 0, 1]], np.float32)
    return PairedArrays.one_to_one(image, np.eye(6, dtype=np.float32)), image


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_separated_clusters_reduce_to_their_means(seed):
    train, image = two_clusters()
    model = build_baseline("nn-transfer", bank=2, center=False, bank_seed=seed).fit(train)
    unit = image / np.linalg.norm(image, axis=1, keepdims=True)
    means = np.stack([unit[:3].mean(0), unit[3:].mean(0)])
    order = np.argsort(model._anchor_image[:, 0].numpy())[::-1]  # the e1 cluster first
    np.testing.assert_allclose(model._anchor_image.numpy()[order], means / np.linalg.norm(means, axis=1, keepdims=True),
                               atol=1e-6)
    captions = np.zeros((2, 6), np.float32)
    captions[0, :3], captions[1, 3:] = 1 / 3, 1 / 3  # each image counts once
    np.testing.assert_allclose(model._anchor_text.numpy()[order], captions, atol=1e-6)
    assert model._anchor_members.tolist() == [3.0, 3.0]


def test_the_subsample_keeps_the_member_nearest_each_centroid():
    train, image = two_clusters()
    model = build_baseline("nn-transfer", bank=2, center=False, bank_reduction="subsample").fit(train)
    unit = image / np.linalg.norm(image, axis=1, keepdims=True)
    rows = sorted(int(np.flatnonzero((unit == r).all(1))[0]) for r in model._anchor_image.numpy())
    assert rows == [2, 5]  # the middle of each cluster
    assert sorted(model._anchor_text.argmax(1).tolist()) == rows  # with their own captions


@pytest.mark.parametrize(("options", "match"), [
    ({"bank": -1}, "bank"), ({"bank": 2.5}, "bank"), ({"bank": "many"}, "bank"), ({"bank": True}, "bank"),
    ({"bank_reduction": "median"}, "bank_reduction"), ({"bank_seed": -3}, "bank_seed"),
    ({"member_weighted": "yes"}, "member_weighted"),
])
def test_bad_bank_options_are_refused(options, match):
    with pytest.raises(BaselineError, match=match):
        build_baseline("nn-transfer", **options)


@pytest.mark.parametrize("member_weighted", [False, True])
def test_a_capped_bank_round_trips_through_save_load_and_the_numpy_runtime(tmp_path, member_weighted):
    train, queries = random_pairs(), np.random.default_rng(6).normal(size=(25, 24)).astype(np.float32)
    model = build_baseline("nn-transfer", bank=50, member_weighted=member_weighted).fit(train)
    model.save(tmp_path / "b")
    loaded = Baseline.load(tmp_path / "b")
    assert torch.equal(loaded.encode("image", queries), model.encode("image", queries))
    runtime = RuntimeBaseline(tmp_path / "b")
    np.testing.assert_allclose(runtime.encode("image", queries), model.encode("image", queries).numpy(), atol=2e-5)
    if member_weighted:  # the counts move the weights: not the unweighted encoding
        plain = build_baseline("nn-transfer", bank=50).fit(train)
        assert not torch.allclose(plain.encode("image", queries), model.encode("image", queries))


def test_a_bundle_of_a_run_with_a_capped_blend_loads_and_encodes(tmp_path, cache):
    karpathy, *_ = replicas(tmp_path)
    run, out = tmp_path / "run", tmp_path / "bundle"
    assert main(["train", "--recipe", "default", "--store", f"image=random:image+karpathy:{karpathy}",
                 "--store", f"text=random:text+karpathy:{karpathy}", "--set", "train.max_steps=10",
                 "--set", "train.batch_size=32", "--set", "blend={name: nn-transfer, weight: 0.5, k: 4, bank: 8}",
                 "--out", str(run), "-q"]) == 0
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    config = json.loads((out / "model" / "baseline" / "config.json").read_text())
    assert config["options"]["bank"] == 8
    model = anybind.load(out)
    assert model.bound.baseline._anchor_image.shape[0] == 8  # 40 training images, a bank of 8
    z = model.encode_text(["a red square number 3", "something blue"])
    assert z.shape == (2, model.dim) and torch.allclose(z.norm(dim=1), torch.ones(2))
    runtime = RuntimeBaseline(out / "model" / "baseline")
    assert len(runtime.state["_anchor_image"]) == 8
