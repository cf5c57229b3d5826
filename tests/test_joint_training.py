"""Joint binding of N modalities in the one training loop: tuples joined across stores (and
datasets that share items and groups), absent modalities, every-pair validation, refusals."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from anybind.align import load_recipe
from anybind.align.bound import BoundModel
from anybind.align.data import PairedFeatures, PairingError
from anybind.align.trainer import train
from anybind.errors import AnybindError
from anybind.features import write_store

sys.path.insert(0, str(Path(__file__).parent))
from _synthetic import planted_stores  # noqa: E402

FAST = ["train.batch_size=256", "train.val_every=10", "train.checkpoint_every=10", "optimizer.warmup_steps=5",
        "train.patience=100"]
RENDERINGS = 3


def _audio_store(root: Path, img, dataset: str, *, every: int = 5, shift_groups: bool = False, seed: int = 1):
    """Three renderings per item of a noisy linear view of the image features' latent; every
    `every`-th item has no audio (absent in its tuples)."""
    rng = np.random.default_rng(seed)
    feats = img.array("final").read(np.arange(len(img)))
    mix = rng.standard_normal((feats.shape[1], 24)).astype(np.float32)
    ids, groups, rows, splits = [], [], [], []
    item_groups = img.rows.column("group").to_pylist()
    for i, item in enumerate(img.item_ids):
        if i % every == every - 1:
            continue
        for _ in range(RENDERINGS):
            ids.append(item)
            groups.append(item_groups[i] + ("x" if shift_groups and i == 3 else ""))
            splits.append(img.splits[i])
            rows.append(feats[i] @ mix + 0.05 * rng.standard_normal(24).astype(np.float32))
    return write_store(root, {"final": np.stack(rows)}, ids, modality="audio", field="audio", dataset=dataset,
                       caption_index=[0] * len(ids), splits=splits, groups=groups)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    img, txt = planted_stores(root / "stores", captions=1)
    return {"image": img, "text": txt, "audio": _audio_store(root / "audio", img, "planted")}


def test_tuples_join_extras_by_item_with_absent_rows(three):
    data = PairedFeatures(three)
    assert data.names == ["image", "text", "audio"]
    train = data.pairs("train")
    audio = train.extra_rows["audio"]
    ids = np.asarray(three["image"].item_ids)
    a_ids = np.asarray(three["audio"].item_ids)
    have = audio >= 0
    # every tuple's audio row is of its own item; an item with audio appears once per rendering
    assert (a_ids[audio[have]] == ids[train.anchor_rows[have]]).all()
    counts = np.bincount(train.anchor_rows[have], minlength=len(ids))
    assert set(counts[counts > 0]) == {RENDERINGS}
    # items without audio stay, once, with -1
    lacking = train.anchor_rows[~have]
    assert len(lacking) == len(np.unique(lacking)) > 0
    assert all(int(i[4:]) % 5 == 4 for i in ids[lacking])


def test_two_store_pairs_and_fingerprint_are_unchanged_by_the_extension(three):
    two = PairedFeatures({"image": three["image"], "text": three["text"]})
    assert two.extra_names == [] and two.pairs("train").extra_rows == {}
    three_way = PairedFeatures(three)
    assert three_way.splits_fingerprint != two.splits_fingerprint


def test_a_joint_loss_binds_three_modalities(three, tmp_path):
    recipe = load_recipe("freeze-align", FAST + ["train.max_steps=60", "optimizer.lr=0.003",
                                                 "loss.name=all-pairs"])
    result = train(recipe, three, out=tmp_path / "run", progress=False, baselines=False)
    for pair in ("image-text", "image-audio", "text-audio"):
        assert result.val[f"{pair}/mean_R@10"] > 0.6, (pair, result.val)
    assert result.val["mean_R@10"] == pytest.approx(np.mean([result.val[f"{p}/mean_R@10"] for p in
                                                             ("image-text", "image-audio", "text-audio")]))
    model = BoundModel.load(tmp_path / "run" / "model")
    assert model.modalities == ["image", "text", "audio"] and not model.added
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("text-audio/mean_R@10" in r for r in lines if r["split"] == "val")


def test_joint_training_is_deterministic(three, tmp_path):
    recipe = load_recipe("freeze-align", FAST + ["train.max_steps=12", "loss.name=symile"])
    for name in ("a", "b"):
        train(recipe, three, out=tmp_path / name, progress=False, baselines=False)
    for m in ("image", "text", "audio"):
        f = Path("model/projectors") / m / "weights.safetensors"
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_stores_of_two_datasets_join_only_when_asked_and_grouped_alike(three, tmp_path):
    spoken = _audio_store(tmp_path / "spoken", three["image"], "planted-speech")
    stores = {"image": three["image"], "text": three["text"], "audio": spoken}
    with pytest.raises(PairingError, match="different datasets.*across_datasets"):
        PairedFeatures(stores)
    data = PairedFeatures(stores, across_datasets=True)
    assert (data.pairs("train").extra_rows["audio"] >= 0).any()
    moved = _audio_store(tmp_path / "moved", three["image"], "planted-speech", shift_groups=True)
    with pytest.raises(PairingError, match="another group"):
        PairedFeatures({**stores, "audio": moved}, across_datasets=True)


def test_more_than_two_modalities_are_refused_with_a_two_sided_recipe(three, tmp_path):
    with pytest.raises(AnybindError, match="joint loss"):
        train(load_recipe("freeze-align", FAST), three, out=tmp_path / "a", progress=False)
    with pytest.raises(AnybindError, match="blend"):
        train(load_recipe("default", FAST + ["loss.name=symile"]), three, out=tmp_path / "b", progress=False)
    with pytest.raises(AnybindError, match="joint queries.*train.metric=mean_R@10"):
        train(load_recipe("freeze-align", FAST + ["loss.name=symile", "train.metric=text_to_image_R@10"]), three,
              out=tmp_path / "c", progress=False)


def _joint_recall_by_loops(model, data, pairs, gallery: str, k: int) -> float:
    """The joint query's recall@k with explicit loops: distinct (other rows) combinations of the
    full tuples, each ranked by MIP against the distinct gallery rows (ties count against it)."""
    import torch.nn.functional as F

    from anybind.align.fit import tuple_rows

    rows = tuple_rows(data, pairs)
    others = [m for m in data.names if m != gallery]
    full = [i for i in range(len(rows[gallery])) if all(rows[m][i] >= 0 for m in data.names)]
    queries = {}
    for i in full:
        queries.setdefault(tuple(int(rows[m][i]) for m in others), int(rows[gallery][i]))
    g_rows = sorted({int(rows[gallery][i]) for i in full})
    zg = F.normalize(model.encode(gallery, data.side(gallery).rows(np.array(g_rows))), dim=-1)
    hits = 0
    for key, positive in queries.items():
        product = 1
        for m, r in zip(others, key):
            product = product * F.normalize(model.encode(m, data.side(m).rows(np.array([r]))), dim=-1)[0]
        scores = [float((product * zg[j]).sum()) for j in range(len(g_rows))]
        own = scores[g_rows.index(positive)]
        hits += sum(s >= own for j, s in enumerate(scores) if g_rows[j] != positive) < k
    return hits / len(queries)


def test_a_symile_run_validates_by_its_joint_queries(three, tmp_path):
    from anybind.align.fit import joint_query_retrieval

    recipe = load_recipe("freeze-align", FAST + ["train.max_steps=60", "optimizer.lr=0.003", "loss.name=symile"])
    result = train(recipe, three, out=tmp_path / "run", progress=False, baselines=False)
    queries = ("text+audio->image", "image+audio->text", "image+text->audio")
    for q in queries:
        assert result.val[f"{q}/R@10"] > 0.6, (q, result.val)
    assert result.val["mean_R@10"] == pytest.approx(np.mean([result.val[f"{q}/R@10"] for q in queries]))
    assert not any(k.startswith("image-text/") for k in result.val)  # pairwise cosines: not what it trains
    data = PairedFeatures(three)
    val = data.pairs("val")
    for gallery in ("image", "audio"):
        for k in (1, 10):
            got = joint_query_retrieval(result.model, data, val, gallery, "multilinear", ks=(k,))[f"R@{k}"]
            assert got == pytest.approx(_joint_recall_by_loops(result.model, data, val, gallery, k))
