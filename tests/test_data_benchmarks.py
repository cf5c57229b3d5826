"""Benchmark datasets: curated openclipart classes, ImageNet-style folders, Karpathy caption JSON."""

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from anybind.data import load_dataset
from anybind.data import openclipart_classes as oc
from anybind.data.images import load_image
from anybind.data.openclipart_classes import CURATED_CLASSES, curated_class, curated_labels
from anybind.errors import DataError

OPENCLIPART_PNG = Path("/usr/share/openclipart/png")


# ---- curated openclipart classes ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("item_id", "expected"),
    [
        ("animals/birds/owl_on_branch_ganson", "bird"),
        ("animals/mammals/dog_on_leash_gerald_g._01", "dog"),
        ("animals/bugs/lumaca_architetto_france_01", None),  # a snail
        ("shapes/stars/star", "star"),
        ("shapes/stars/star_05pt02step", "star"),
        ("shapes/stars/star_61pt02step", None),  # 61 points: a ring, not a star
        ("recreation/games/cards/simple/simple_c_10", "playing card"),
        ("recreation/party/cone1_ganson", "ice cream"),
        ("people/smilies/smiley001", "smiley face"),
        ("people/smilies/crossbones_linda_kim_01", None),
        ("people/bodypart/brain_jon_phillips_01", None),  # dropped before the "people" rule
        ("people/clothing/hats/bejewelled_crown_with_t_01", None),
        ("people/woman_doctor_gerald_g._01", "person"),
        ("signs_and_symbols/flags/europe/albania", "flag"),
        ("signs_and_symbols/flags/europe/extremadura_01", None),  # a map linked into flags
        ("signs_and_symbols/flags/semaphore/semaphore_alpha", None),
        ("geography/extremadura_01", "map"),
        ("transportation/roadsigns/stop", "road sign"),
        ("buildings/homes/lighthouse_matthew_gates_", None),
        ("food/desserts/pie_apple", None),  # passed on by the ice-cream rule, no fruit either
        ("computer/icons/lemon-theme/devices/camera_mount", None),
        ("unsorted/mucca", None),
        ("special/gradients/anything", None),
    ],
)
def test_curated_class_of_hand_picked_items(item_id, expected):
    assert curated_class(item_id) == expected


def test_curated_labels_and_class_list():
    ids = ["animals/birds/crow_01", "unsorted/mucca", "shapes/jigsaw/jigsaw_red_01"]
    assert curated_labels(ids) == ["bird", None, "puzzle piece"]
    assert len(set(CURATED_CLASSES)) == len(CURATED_CLASSES)
    assert {r.label for r in oc.RULES if r.label} == set(CURATED_CLASSES)
    assert "playing card" in CURATED_CLASSES and "road sign" in CURATED_CLASSES


def test_rules_first_match_wins(monkeypatch):
    rules = (
        oc.Rule("a", None, words=("skip",)),
        oc.Rule("a/b", "first"),
        oc.Rule("a", "second"),
        oc.Rule("a", "third", unless=("no",)),
    )
    monkeypatch.setattr(oc, "RULES", rules)
    assert curated_class("a/b/c/thing_01") == "first"
    assert curated_class("a/thing") == "second"
    assert curated_class("a/b/skip_1") is None  # a None rule ends the search
    assert curated_class("ab/thing") is None  # a folder prefix is a whole folder


def _real_ids() -> list[str]:
    if not OPENCLIPART_PNG.is_dir():
        pytest.skip("openclipart is not installed (apt-get install openclipart-png)")
    return sorted(
        p.relative_to(OPENCLIPART_PNG).with_suffix("").as_posix()
        for p in OPENCLIPART_PNG.rglob("*.png")
        if p.is_file()
    )


def _documented_counts() -> dict[str, int]:
    table = re.search(r"class +items\n=+ =+\n(.*?)\n=+ =+", oc.__doc__, re.S).group(1)
    rows = [re.match(r"(.+?)\s+(\d+)$", line).groups() for line in table.splitlines()]
    return {name: int(n) for name, n in rows}


def test_every_class_has_15_items_on_the_real_set():
    counts = Counter(label for label in curated_labels(_real_ids()) if label)
    assert set(counts) == set(CURATED_CLASSES)
    assert min(counts.values()) >= 15, counts
    assert dict(counts) == _documented_counts()  # the module docstring's table is measured


def test_copies_of_one_picture_never_get_two_classes():
    ids = _real_ids()
    labelled = {i: c for i, c in zip(ids, curated_labels(ids), strict=True) if c}
    by_picture: dict[str, set[str]] = {}
    for item_id, label in labelled.items():
        path = OPENCLIPART_PNG / f"{item_id}.png"
        digest = hashlib.blake2b(path.read_bytes(), digest_size=12).hexdigest()
        by_picture.setdefault(digest, set()).add(label)
        target = os.path.relpath(os.path.realpath(path), OPENCLIPART_PNG)[: -len(".png")]
        other = curated_class(target)
        assert other in (None, label), (item_id, label, target, other)
    assert all(len(labels) == 1 for labels in by_picture.values())


# ---- ImageNet-style folders ---------------------------------------------------------------------
WNIDS = ["n01440764", "n01443537", "n01484850"]
NAMES = ["tench", "goldfish", "great white shark"]


def _img(path: Path, colour, fmt: str | None = None, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)


def _imagenet(root: Path) -> Path:
    _img(root / WNIDS[0] / "ILSVRC2012_val_00000293.JPEG", (200, 0, 0), "JPEG", (16, 12))
    _img(root / WNIDS[0] / "extra.png", (0, 200, 0))
    _img(root / WNIDS[1] / "ILSVRC2012_val_00002138.jpg", (0, 0, 200), "JPEG")
    (root / WNIDS[1] / "readme.txt").write_text("not an image")
    _img(root / WNIDS[2] / "ILSVRC2012_val_00000001.png", (10, 20, 30))
    return root


def _names_files(tmp: Path) -> dict[str, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    synsets = tmp / "LOC_synset_mapping.txt"
    synsets.write_text(
        "n01440764 tench, Tinca tinca\n"
        "n01443537 goldfish, Carassius auratus\n"
        "n01484850 great white shark, white shark, man-eater, Carcharodon carcharias\n"
        "n01491361 tiger shark, Galeocerdo cuvieri\n"  # a class with no folder: fine
    )
    as_list = tmp / "classes.json"
    as_list.write_text(json.dumps(NAMES))
    as_map = tmp / "class_map.json"
    as_map.write_text(json.dumps({**dict(zip(WNIDS, NAMES, strict=True)), "n09999999": "x"}))
    as_index = tmp / "imagenet_class_index.json"
    as_index.write_text(json.dumps({str(k): [w, n] for k, (w, n) in enumerate(zip(WNIDS, NAMES))}))
    return {"synsets": synsets, "list": as_list, "map": as_map, "index": as_index}


@pytest.mark.parametrize("form", ["synsets", "list", "map", "index"])
def test_imagenet_folder_with_class_names(tmp_path, cache, form):
    root = _imagenet(tmp_path / "val")
    names = _names_files(tmp_path / "names")[form]
    idx = load_dataset(f"imagenet:{root}", class_names=str(names))
    assert idx.fields == {"image": "image"}
    assert idx.item_ids == [
        "n01440764/ILSVRC2012_val_00000293.JPEG",
        "n01440764/extra.png",
        "n01443537/ILSVRC2012_val_00002138.jpg",
        "n01484850/ILSVRC2012_val_00000001.png",
    ]
    assert idx.column("label") == ["tench", "tench", "goldfish", "great white shark"]
    assert set(idx.column("split")) == {"test"}
    assert idx.column("group") == idx.item_ids
    assert idx.meta["classes"] == NAMES and idx.meta["class_dirs"] == WNIDS
    assert idx.meta["source"] == str(root) and idx.meta["class_names"] == str(names)
    ids, _, refs = idx.field_rows("image")
    assert load_image(refs[ids.index("n01484850/ILSVRC2012_val_00000001.png")]).getpixel(
        (0, 0)
    ) == (10, 20, 30)
    assert load_image(refs[0]).size == (16, 12)


def test_imagenet_folder_names_from_folders(tmp_path, cache):
    _img(tmp_path / "pets" / "golden_retriever" / "1.jpg", (1, 2, 3), "JPEG")
    _img(tmp_path / "pets" / "tabby-cat" / "2.PNG", (4, 5, 6), "PNG")
    idx = load_dataset(f"imagenet:{tmp_path / 'pets'}")
    assert idx.column("label") == ["golden retriever", "tabby cat"]
    assert idx.meta["classes"] == ["golden retriever", "tabby cat"]
    assert idx.meta["class_names"] is None


def test_imagenet_folder_relists_when_the_names_file_changes(tmp_path, cache):
    root = _imagenet(tmp_path / "val")
    names = tmp_path / "classes.json"
    names.write_text(json.dumps(NAMES))
    assert load_dataset(f"imagenet:{root}", class_names=str(names)).column("label")[0] == "tench"
    names.write_text(json.dumps(["Tinca tinca", *NAMES[1:]]))
    assert load_dataset(f"imagenet:{root}", class_names=str(names)).column("label")[0] == (
        "Tinca tinca"
    )


def test_imagenet_folder_duplicate_names_are_reported(tmp_path, cache):
    _img(tmp_path / "val" / "n02012849" / "a.JPEG", (1, 1, 1), "JPEG")
    _img(tmp_path / "val" / "n03126707" / "b.JPEG", (2, 2, 2), "JPEG")
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n02012849 crane\nn03126707 crane\n")
    idx = load_dataset(f"imagenet:{tmp_path / 'val'}", class_names=str(names))
    assert idx.meta["duplicate_class_names"] == {"crane": ["n02012849", "n03126707"]}


def test_imagenet_folder_errors(tmp_path, cache):
    with pytest.raises(DataError, match="ImageNet-style folder not found"):
        load_dataset(f"imagenet:{tmp_path / 'nowhere'}")
    (tmp_path / "empty" / WNIDS[0]).mkdir(parents=True)
    with pytest.raises(DataError, match="no images in class folders"):
        load_dataset(f"imagenet:{tmp_path / 'empty'}")
    _img(tmp_path / "loose" / "a.JPEG", (0, 0, 0), "JPEG")
    with pytest.raises(DataError, match="put them in class folders"):
        load_dataset(f"imagenet:{tmp_path / 'loose'}")

    root = _imagenet(tmp_path / "val")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "short.json").write_text(json.dumps(NAMES[:2]))
    with pytest.raises(DataError, match="lists 2 class names but there are 3 class folders"):
        load_dataset(f"imagenet:{root}", class_names=str(bad / "short.json"))
    (bad / "map.json").write_text(json.dumps({WNIDS[0]: "tench"}))
    with pytest.raises(DataError, match="names no class for the folders n01443537, n01484850"):
        load_dataset(f"imagenet:{root}", class_names=str(bad / "map.json"))
    (bad / "synsets.txt").write_text("n01440764 tench\nn01443537 goldfish\nn09999999 other\n")
    with pytest.raises(DataError, match="names no class for the folders n01484850"):
        load_dataset(f"imagenet:{root}", class_names=str(bad / "synsets.txt"))
    (bad / "nameless.txt").write_text("n01440764\n")
    with pytest.raises(DataError, match="line 1 .* has no class name"):
        load_dataset(f"imagenet:{root}", class_names=str(bad / "nameless.txt"))
    with pytest.raises(DataError, match="class-name file not found"):
        load_dataset(f"imagenet:{root}", class_names=str(bad / "absent.json"))
    with pytest.raises(DataError, match="takes no option images: it takes class_names"):
        load_dataset(f"imagenet:{root}", images=str(root))


# ---- Karpathy-split caption JSON ----------------------------------------------------------------
def _sentences(*raws):
    return [{"raw": r, "tokens": r.lower().split(), "sentid": k} for k, r in enumerate(raws)]


def _coco(root: Path) -> Path:
    """dataset_coco.json with images in root/val2014 and root/train2014."""
    entries = [
        (
            "val2014",
            "COCO_val2014_000000391895.jpg",
            "test",
            [" A man riding a bike down a dirt road. ", "", "A cyclist on a trail."],
        ),
        ("val2014", "COCO_val2014_000000522418.jpg", "restval", ["A woman cutting a cake."]),
        ("train2014", "COCO_train2014_000000000009.jpg", "train", ["A plate of food."]),
        ("val2014", "COCO_val2014_000000184613.jpg", "val", ["A boy and cows."]),
        ("val2014", "COCO_val2014_000000000042.jpg", "test", ["   ", ""]),  # no caption left
    ]
    images = []
    for k, (folder, name, split, raws) in enumerate(entries):
        _img(root / folder / name, (k * 40, 100, 0), "JPEG")
        images.append(
            {"filepath": folder, "filename": name, "split": split, "imgid": k,
             "cocoid": int(name[-10:-4]), "sentids": list(range(len(raws))),
             "sentences": _sentences(*raws)}
        )  # fmt: skip
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def _flickr(root: Path) -> tuple[Path, Path]:
    """dataset_flickr30k.json in root/ and its images in root/flickr30k-images (no filepath)."""
    images = []
    for k, (name, split) in enumerate(
        [("1000092795.jpg", "train"), ("10002456.jpg", "val"), ("1007129816.jpg", "test")]
    ):
        _img(root / "flickr30k-images" / name, (0, k * 50, 100), "JPEG")
        raws = [f"Caption {j} of image {k}." for j in range(5)]
        images.append(
            {"filename": name, "split": split, "imgid": k, "sentids": list(range(5)),
             "sentences": _sentences(*raws)}
        )  # fmt: skip
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path, root / "flickr30k-images"


def test_karpathy_coco(tmp_path, cache):
    path = _coco(tmp_path / "coco")
    idx = load_dataset(f"karpathy:{path}")
    assert idx.fields == {"image": "image", "caption": "text"}
    rows = {
        i: (c, s)
        for i, c, s in zip(idx.item_ids, idx.column("caption"), idx.column("split"), strict=True)
    }
    assert rows == {
        "val2014/COCO_val2014_000000391895": (
            ["A man riding a bike down a dirt road.", "A cyclist on a trail."],
            "test",
        ),
        "val2014/COCO_val2014_000000522418": (["A woman cutting a cake."], "train"),
        "train2014/COCO_train2014_000000000009": (["A plate of food."], "train"),
        "val2014/COCO_val2014_000000184613": (["A boy and cows."], "val"),
    }
    assert idx.column("group") == idx.item_ids
    assert idx.column("image")[0] == "val2014/COCO_val2014_000000391895.jpg"
    assert idx.meta["dropped_without_caption"] == 1
    assert idx.meta["karpathy_splits"] == {"test": 2, "restval": 1, "train": 1, "val": 1}
    assert idx.meta["dataset"] == "coco" and idx.meta["captions"] == 5
    ids, _, refs = idx.field_rows("image")
    image = load_image(refs[ids.index("train2014/COCO_train2014_000000000009")])
    assert image.size == (6, 5) and abs(image.getpixel((2, 2))[1] - 100) < 10


def test_karpathy_flickr_with_images_option(tmp_path, cache):
    path, images = _flickr(tmp_path / "f30k")
    with pytest.raises(DataError, match="images="):  # the images are not in the JSON's folder
        load_dataset(f"karpathy:{path}", images=str(tmp_path / "f30k" / "nothing"))
    idx = load_dataset(f"karpathy:{path}", images=str(images))
    assert idx.item_ids == ["1000092795", "10002456", "1007129816"]
    assert idx.column("split") == ["train", "val", "test"]
    assert idx.column("caption")[2] == [f"Caption {j} of image 2." for j in range(5)]
    assert idx.meta["images"] == str(images.absolute())
    ids, _, refs = idx.field_rows("image")
    assert refs[1] == str(images / "10002456.jpg")
    assert load_image(refs[1]).size == (6, 5)


def test_karpathy_errors(tmp_path, cache):
    with pytest.raises(DataError, match="Karpathy-split JSON not found"):
        load_dataset(f"karpathy:{tmp_path / 'dataset_coco.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="top-level key 'images' is missing"):
        load_dataset(f"karpathy:{bad}")
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}))
    with pytest.raises(DataError, match=r"images\[0\] has no key 'sentences'"):
        load_dataset(f"karpathy:{bad}")
    bad.write_text(
        json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{}]}]})
    )
    with pytest.raises(DataError, match=r"images\[0\]\['sentences'\]\[0\] has no key 'raw'"):
        load_dataset(f"karpathy:{bad}")
    bad.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "dev",
                                           "sentences": _sentences("x")}]}))  # fmt: skip
    with pytest.raises(DataError, match="split 'dev'"):
        load_dataset(f"karpathy:{bad}")

    path = _coco(tmp_path / "coco")
    for p in (tmp_path / "coco" / "train2014").iterdir():
        p.unlink()
    (tmp_path / "coco" / "train2014").rmdir()
    with pytest.raises(DataError, match="image folders not found under .*: train2014"):
        load_dataset(f"karpathy:{path}")
