"""Paired tables: every format, several captions per image, merged rows, column detection."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from anybind.data.images import load_image
from anybind.data.tables import detect_columns, list_table
from anybind.errors import DataError


@pytest.fixture()
def images(tmp_path):
    (tmp_path / "img").mkdir()
    for name, colour in [("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("c.png", (0, 0, 255))]:
        Image.new("RGB", (8, 8), colour).save(tmp_path / "img" / name)
    return tmp_path


def _by_id(idx):
    return {
        i: (img, caps, label)
        for i, img, caps, label in zip(
            idx.item_ids,
            idx.column("image"),
            idx.column("caption"),
            idx.column("label"),
            strict=True,
        )
    }


def test_csv_with_several_caption_columns(images):
    path = images / "pairs.csv"
    path.write_text(
        "image,caption_1,caption_2,label\n"
        'img/a.png,a red square,"red, all red",red\n'
        "img/b.png,a green square,,green\n"
    )
    idx = list_table(path)
    rows = _by_id(idx)
    assert rows["img/a.png"] == ("img/a.png", ["a red square", "red, all red"], "red")
    assert rows["img/b.png"][1] == ["a green square"]  # an empty cell adds no caption
    assert idx.root == str(images.resolve())
    ids, subs, refs = idx.field_rows("image")
    assert load_image(refs[ids.index("img/a.png")]).getpixel((0, 0)) == (255, 0, 0)
    ids, subs, texts = idx.field_rows("caption")
    assert [t for i, t in zip(ids, texts, strict=True) if i == "img/a.png"] == [
        "a red square",
        "red, all red",
    ]
    assert subs[:2] == [0, 1]


def test_tsv_rows_with_the_same_image_merge(images):
    path = images / "pairs.tsv"
    path.write_text(
        "filepath\ttext\n./img/a.png\tfirst\nimg/a.png\tsecond\nimg/c.png\tblue\nimg/a.png\tfirst\n"
    )
    idx = list_table(path)
    rows = _by_id(idx)
    assert len(idx) == 2
    assert rows["img/a.png"][1] == ["first", "second"]  # merged, deduplicated, in order


def test_jsonl_caption_lists_and_ids(images):
    path = images / "pairs.jsonl"
    lines = [
        {"id": 17, "file_name": "img/a.png", "captions": ["one", "two"], "class": "x"},
        {"id": 18, "file_name": "img/b.png", "captions": ["three"], "class": "y"},
        {"id": 17, "file_name": "img/a.png", "captions": ["four"], "class": "x"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    idx = list_table(path)
    rows = _by_id(idx)
    assert set(rows) == {"17", "18"}  # the id column keys items
    assert rows["17"] == ("img/a.png", ["one", "two", "four"], "x")


def test_parquet_and_explicit_columns(images, tmp_path):
    table = pa.table(
        {
            "pic": ["img/a.png", "img/b.png"],
            "words": [["p", "q"], ["r"]],
            "title": ["ignored", "ignored"],
            "family": ["g1", "g1"],
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path)
    idx = list_table(path, image="pic", caption="words", group="family")
    assert _by_id(idx)["img/a.png"][1] == ["p", "q"]
    assert set(idx.column("group")) == {"g1"}
    assert len(set(idx.column("split"))) == 1  # one group, one split


def test_json_list_in_a_csv_cell(images):
    path = images / "p.csv"
    path.write_text('path,captions\nimg/a.png,"[""x"", ""y""]"\n')
    assert _by_id(list_table(path))["img/a.png"][1] == ["x", "y"]


def test_root_option_and_absolute_paths(images, tmp_path):
    sub = tmp_path / "tables"
    sub.mkdir()
    path = sub / "p.csv"
    path.write_text(f"image,caption\nimg/a.png,rel\n{images / 'img' / 'b.png'},abs\n")
    idx = list_table(path, root=images)
    refs = dict(zip(idx.item_ids, idx.field_rows("image")[2], strict=True))
    assert load_image(refs["img/a.png"]).getpixel((0, 0)) == (255, 0, 0)
    assert refs[str(images / "img" / "b.png")] == str(images / "img" / "b.png")


def test_detection_errors_name_the_columns(images):
    with pytest.raises(DataError, match="no image column.*foo"):
        detect_columns(["foo", "caption"])
    with pytest.raises(DataError, match="no caption column"):
        detect_columns(["image", "bar"])
    with pytest.raises(DataError, match="has no column 'nope'"):
        detect_columns(["image", "caption"], caption="nope")
    roles = detect_columns(["Image_Path", "Caption", "caption 2", "title"])
    assert roles["image"] == "Image_Path" and roles["caption"] == ["Caption", "caption 2"]
    assert detect_columns(["url", "title", "description"])["caption"] == ["title", "description"]


def test_unreadable_table(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list_table(tmp_path / "missing.csv")
    bad = tmp_path / "x.xlsx"
    bad.write_text("?")
    with pytest.raises(DataError, match="unknown table format"):
        list_table(bad)
