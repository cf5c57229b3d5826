"""Concept-coverage curation (`anybind curate`, `anybind.align.curate`): the selection by hand,
the vocabulary, and the whole verb on a real caption encoder (minilm-l6) down to training on it."""

import json

import numpy as np
import pytest

from anybind.align.curate import (
    CurationError,
    NearDuplicates,
    assign_concepts,
    keep_items,
    read_concepts,
    read_items,
    select_balanced,
    wordnet_nouns,
)
from anybind.cli import main

# six items over three concepts: 0 has items 0,1,2 (0.9, 0.8, 0.7), 1 has 3,4 (0.95, 0.6), 2 has 5 (0.5)
CONCEPT = np.array([0, 0, 0, 1, 1, 2])
COSINE = np.array([0.9, 0.8, 0.7, 0.95, 0.6, 0.5])


def test_round_robin_covers_every_concept_before_any_second_item():
    got = select_balanced(CONCEPT, COSINE, 6)["selected"].tolist()
    # round 1: each concept's best, most similar first (3, 0, 5); round 2: 1 then 4; round 3: 2
    assert got == [3, 0, 5, 1, 4, 2]
    assert select_balanced(CONCEPT, COSINE, 4)["selected"].tolist() == [3, 0, 5, 1]


def test_the_cap_is_respected_even_when_fewer_than_n_remain():
    got = select_balanced(CONCEPT, COSINE, 6, cap=1)["selected"].tolist()
    assert got == [3, 0, 5]  # one a concept: 3 items, not the 6 asked for
    counts = np.bincount(CONCEPT[select_balanced(CONCEPT, COSINE, 6, cap=2)["selected"]])
    assert counts.tolist() == [2, 2, 1]


def test_a_similarity_floor_drops_weak_matches():
    assert select_balanced(CONCEPT, COSINE, 6, min_similarity=0.75)["selected"].tolist() == [3, 0, 1]


def test_near_duplicates_are_not_both_selected_and_the_concept_offers_its_next():
    features = np.eye(6, dtype=np.float32)
    features[1] = [1, 0.01, 0, 0, 0, 0]  # item 1 looks like item 0
    got = select_balanced(CONCEPT, COSINE, 4, duplicates=NearDuplicates(features, 0.95))
    assert got["selected"].tolist() == [3, 0, 5, 2]  # 1 is 0's near-duplicate: concept 0 offers 2 instead
    assert got["dropped_duplicates"] == 1


def test_a_near_duplicate_within_one_round_waits_and_is_then_dropped():
    # items 0 (concept 0) and 3 (concept 1) look alike and are both offered in round 1: 3 is taken
    # first (0.95), 0 is skipped, then dropped when concept 0 offers it again in round 2
    features = np.eye(6, dtype=np.float32)
    features[0] = features[3]
    got = select_balanced(CONCEPT, COSINE, 5, duplicates=NearDuplicates(features, 0.95))
    assert got["selected"].tolist() == [3, 5, 1, 4, 2] and got["dropped_duplicates"] == 1


def test_ties_break_by_position_so_the_selection_is_deterministic():
    concept, cosine = np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])
    first = select_balanced(concept, cosine, 3)["selected"].tolist()
    assert first == [0, 1, 2] == select_balanced(concept, cosine, 3)["selected"].tolist()


@pytest.mark.parametrize("kwargs", [{"n": 1}, {"n": True}, {"n": 2.5}, {"n": 3, "cap": 0}, {"n": 3, "min_similarity": 2.0}])
def test_bad_selection_settings_are_clear_errors(kwargs):
    with pytest.raises(CurationError):
        select_balanced(CONCEPT, COSINE, **kwargs)


def test_an_item_takes_the_concept_of_its_best_caption():
    concepts = np.eye(3, dtype=np.float32)
    captions = np.array([[1, 0.2, 0], [0.1, 0, 1], [0, 1, 0.1], [0.6, 0.5, 0]], dtype=np.float32)
    concept, cosine = assign_concepts(captions, np.array([0, 0, 1, 1]), concepts)
    # item 0: caption 1 (cosine 0.995 with concept 2) beats caption 0 (0.981 with concept 0)
    assert concept.tolist() == [2, 1]
    assert cosine.tolist() == pytest.approx([1 / np.sqrt(1.01)] * 2, abs=1e-6)


def test_near_duplicates_by_raw_cosine_against_the_selected_only():
    x = np.array([[1, 0, 0], [2, 0.02, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)  # 1 is 0 scaled: raw cosine
    dups = NearDuplicates(x, 0.99, block=1)
    assert dups.near([0, 1]).tolist() == [False, False]  # nothing selected yet
    for item in (2, 3, 0):
        dups.add(item)
    assert dups.near([1, 2, 3]).tolist() == [True, True, True]  # 0 found in the third block
    assert dups.near([1], since=2).tolist() == [True] and dups.near([1], since=3).tolist() == [False]
    assert dups.near([]).tolist() == []
    with pytest.raises(CurationError, match="one selection"):
        select_balanced(CONCEPT, COSINE, 2, duplicates=dups)
    many = NearDuplicates(np.eye(200, dtype=np.float32), 0.5)
    for item in range(150):  # past the first buffer: it grows
        many.add(item)
    assert many.near([149, 150]).tolist() == [True, False]


def test_concept_files_and_wordnet(tmp_path):
    f = tmp_path / "concepts.txt"
    f.write_text("# my classes\ndog\n\ncat\ndog\n")
    assert read_concepts(str(f)) == ["dog", "cat"]
    with pytest.raises(CurationError, match="neither"):
        read_concepts(str(tmp_path / "missing.txt"))
    (tmp_path / "one.txt").write_text("dog\n")
    with pytest.raises(CurationError, match="at least 2"):
        read_concepts(str(tmp_path / "one.txt"))
    with pytest.raises(CurationError, match="whole number"):
        read_concepts("wordnet:many")
    with pytest.raises(CurationError, match="wordnet-base"):
        wordnet_nouns(tmp_path)
    nouns = wordnet_nouns()  # Debian's wordnet-base (scripts/install.sh)
    assert len(nouns) == 9246 and {"dog", "bicycle", "star"} <= set(nouns) and nouns == sorted(nouns)


def test_items_files_and_unknown_items(tmp_path):
    from anybind.align.data import Pairs

    with pytest.raises(CurationError, match="no such file"):
        read_items(tmp_path / "none.txt")
    (tmp_path / "items.txt").write_text("a\nb\na\n\n")
    assert read_items(tmp_path / "items.txt") == ["a", "b"]
    pairs = Pairs(np.array([0, 1, 2]), np.array([0, 1, 2]), np.array([0, 1, 2]))
    assert keep_items(pairs, ["a", "b", "c"], ["a", "c"]).item.tolist() == [0, 2]
    with pytest.raises(CurationError, match="1 of the 2 items .* not in the train split"):
        keep_items(pairs, ["a", "b", "c"], ["a", "zz"])


# ---- the verb, on a real caption encoder ----------------------------------------------------------------
ANIMALS = {"dog": ["a dog barking", "a puppy on a leash", "a dog chasing a ball", "a sleeping hound"],
           "bicycle": ["a red bicycle", "a bike with two wheels", "a racing bicycle", "a cyclist's bike"],
           "tree": ["an oak tree", "a tall pine tree", "a tree with green leaves", "a palm tree"]}


@pytest.fixture()
def stores(tmp_path, cache):
    from anybind.data.index import DatasetIndex
    from anybind.features import extract
    from anybind.features.store import write_store

    recs, feats = [], []
    rng = np.random.default_rng(0)
    for concept, captions in ANIMALS.items():
        for i, caption in enumerate(captions):
            recs.append({"item_id": f"{concept}{i}", "caption": [caption], "split": "train"})
            feats.append(rng.normal(size=16))
    recs += [{"item_id": f"val{i}", "caption": [f"a picture {i}"], "split": "val"} for i in range(4)]
    feats += [rng.normal(size=16) for _ in range(4)]
    feats[1], feats[2] = feats[0] + 1e-3, feats[0] - 1e-3  # dog0-2: near-identical copies of one drawing
    index = DatasetIndex.from_records("curatetoy", recs, {"caption": "text"})
    text = extract("minilm-l6", index, field="caption", progress=False)
    image = write_store(tmp_path / "img", {"final": np.array(feats, np.float32)}, index.item_ids, modality="image",
                        field="image", dataset=text.key["dataset"], splits=index.column("split"))
    return image, text, tmp_path


@pytest.mark.slow  # loads minilm-l6: ~10 s on 2 cores
def test_curate_verb_balances_concepts_and_training_uses_the_items(stores):
    image, text, tmp_path = stores
    (tmp_path / "concepts.txt").write_text("dog\nbicycle\ntree\nvolcano\n")
    args = ["curate", "--store", f"image={image.path}", "--store", f"text={text.path}", "--n", "9",
            "--concepts", str(tmp_path / "concepts.txt"), "--out", str(tmp_path / "cur"), "-q"]
    assert main(args + ["--duplicate-cosine", "1"]) == 0  # near-duplicates kept: three rounds of three
    report = json.loads((tmp_path / "cur" / "coverage.json").read_text())
    assert report["per_concept"] == {"dog": 3, "bicycle": 3, "tree": 3} and report["dropped_duplicates"] == 0
    assert main(args) == 0
    items = (tmp_path / "cur" / "items.txt").read_text().split()
    report = json.loads((tmp_path / "cur" / "coverage.json").read_text())
    assert len(items) == 9 and not any(i.startswith("val") for i in items)
    assert len({"dog0", "dog1", "dog2"} & set(items)) == 1  # one of the three copies
    assert report["per_concept"]["dog"] == 2 and report["dropped_duplicates"] == 2  # the dog3 and one copy
    assert sum(report["per_concept"].values()) == 9 and report["concepts_covered"] == 3 and report["concepts"] == 4
    assert (tmp_path / "cur" / "coverage.png").read_bytes()[:4] == b"\x89PNG"
    first = (tmp_path / "cur" / "items.txt").read_bytes()
    assert main(args) == 0 and (tmp_path / "cur" / "items.txt").read_bytes() == first  # same input, same bytes

    run = tmp_path / "run"
    assert main(["train", "--store", f"image={image.path}", "--store", f"text={text.path}", "--items",
                 str(tmp_path / "cur" / "items.txt"), "--set", "train.max_steps=2", "--set", "train.batch_size=4",
                 "--out", str(run), "-q"]) == 0
    assert json.loads((run / "summary.json").read_text())["train_pairs"] == 9  # one caption per chosen item


def test_curate_verb_refuses_bad_input_before_work(stores, capsys):
    image, text, tmp_path = stores
    base = ["curate", "--store", f"image={image.path}", "--store", f"text={text.path}"]
    assert main(base + ["--n", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(base + ["--n", "5", "--concepts", str(tmp_path / "nope.txt")]) == 2
    assert "neither" in capsys.readouterr().err
    (tmp_path / "items.txt").write_text("dog0\nnot-an-item\n")
    assert main(["train", "--store", f"image={image.path}", "--store", f"text={text.path}", "--items",
                 str(tmp_path / "items.txt"), "--out", str(tmp_path / "run"), "-q"]) == 2
    assert "not in the train split" in capsys.readouterr().err


def _select_with_all_pairs(concept, cosine, n, features, threshold):
    """The selection as it was first written: every pair of the pool compared up front."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    dup = (x @ x.T > threshold) & ~np.eye(len(x), dtype=bool)
    queues = [[i for i in sorted(np.flatnonzero(concept == c), key=lambda i: (-cosine[i], i))] for c in np.unique(concept)]
    heads, blocked, selected, dropped = [0] * len(queues), np.zeros(len(x), bool), [], set()
    while len(selected) < n:
        offers = []
        for q, queue in enumerate(queues):
            while heads[q] < len(queue) and blocked[queue[heads[q]]]:
                dropped.add(queue[heads[q]])
                heads[q] += 1
            if heads[q] < len(queue):
                offers.append((q, queue[heads[q]]))
        if not offers:
            break
        for q, item in sorted(offers, key=lambda o: (-cosine[o[1]], o[1])):
            if len(selected) < n and not blocked[item]:
                selected.append(item)
                heads[q] += 1
                blocked[item] = True
                blocked[dup[item]] = True
    return selected, len(dropped - set(selected))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checking_against_the_selected_picks_what_all_pairs_would(seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, 16))
    features = (centres[rng.integers(0, 40, 600)] + 0.15 * rng.standard_normal((600, 16))).astype(np.float32)
    concept, cosine = rng.integers(0, 7, 600), rng.random(600)
    for n in (50, 200, 600):
        want, dropped = _select_with_all_pairs(concept, cosine, n, features, 0.97)
        got = select_balanced(concept, cosine, n, duplicates=NearDuplicates(features, 0.97, block=64))
        assert got["selected"].tolist() == want and got["dropped_duplicates"] == dropped
        assert dropped > 0 or n == 50
