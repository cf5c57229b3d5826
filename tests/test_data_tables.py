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


# ---- text encodings: a byte that is not UTF-8 is refused by line, or read in the named encoding ----
def _latin1_tables(folder):
    """The same three rows as CSV, TSV and JSONL, written in Latin-1: line 3 holds 0xE9 (é)."""
    Image.new("RGB", (8, 8), (200, 0, 0)).save(folder / "café.png")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(folder / "plain.png")
    rows = [("plain.png", "a green square"), ("café.png", "un café au lait")]
    tables = {
        "pairs.csv": "image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows),
        "pairs.tsv": "image\tcaption\n" + "".join(f"{i}\t{c}\n" for i, c in rows),
        # a blank first line, so that the byte is on line 3 here too
        "pairs.jsonl": "\n" + "".join(json.dumps({"image": i, "caption": c}, ensure_ascii=False) + "\n"
                                      for i, c in rows),
    }
    for name, text in tables.items():
        (folder / name).write_bytes(text.encode("latin-1"))
    return [folder / name for name in tables]


@pytest.mark.parametrize("name,column", [("pairs.csv", 4), ("pairs.tsv", 4), ("pairs.jsonl", 15)])
def test_a_non_utf8_byte_is_refused_naming_file_line_and_byte(tmp_path, name, column):
    _latin1_tables(tmp_path)
    path = tmp_path / name
    with pytest.raises(DataError) as info:
        list_table(path)
    message = str(info.value)
    assert message.startswith(f"{path} line 3: byte 0xe9 at column {column} is not UTF-8")
    assert "--encoding latin-1" in message
    # the same file read as Latin-1: every value is the right text and the image is found
    idx = list_table(path, encoding="latin-1")
    rows = _by_id(idx)
    assert rows["café.png"][1] == ["un café au lait"] and rows["plain.png"][1] == ["a green square"]
    ids, _, refs = idx.field_rows("image")
    assert load_image(refs[ids.index("café.png")]).getpixel((0, 0)) == (200, 0, 0)
    assert idx.meta["encoding"] == "latin-1"


def test_encoding_is_a_table_spec_option_and_a_bad_one_is_named(tmp_path):
    from anybind.data import load_dataset

    csv_path = _latin1_tables(tmp_path)[0]
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="line 3: byte 0xe9"):
        load_dataset(f"table:{csv_path}", cache=cache)
    idx = load_dataset(f"table:{csv_path}", cache=cache, encoding="latin-1")
    assert sorted(idx.item_ids) == ["café.png", "plain.png"]
    with pytest.raises(DataError, match="unknown encoding 'klingon'"):
        list_table(csv_path, encoding="klingon")
    pq.write_table(pa.table({"image": ["a.png"], "caption": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="Parquet text is always UTF-8"):
        list_table(tmp_path / "t.parquet", encoding="latin-1")
    assert len(list_table(tmp_path / "t.parquet", encoding="utf-8")) == 1
    # a valid UTF-8 file (and its BOM) reads as before
    (tmp_path / "ok.csv").write_bytes("\ufeffimage,caption\ncafé.png,un café\n".encode())
    assert _by_id(list_table(tmp_path / "ok.csv"))["café.png"][1] == ["un café"]


def test_the_check_counts_lines_across_chunks(tmp_path, monkeypatch):
    """The check reads big files in chunks of whole lines: the line number stays exact."""
    import anybind.data.tables as tables

    monkeypatch.setattr(tables, "CHECK_CHUNK", 64)
    lines = ["image,caption"] + [f"img{i}.png,caption number {i} é" for i in range(200)]
    data = "\n".join(lines).encode("utf-8")
    bad = data.replace("caption number 150 é".encode(), b"caption number 150 \xff")
    (tmp_path / "big.csv").write_bytes(bad)
    with pytest.raises(DataError, match=r"big.csv line 152: byte 0xff at column 31 is not UTF-8"):
        list_table(tmp_path / "big.csv")
    (tmp_path / "good.csv").write_bytes(data)
    assert len(list_table(tmp_path / "good.csv")) == 200


def test_cli_extract_refuses_a_latin1_table_then_reads_it_with_encoding(tmp_path, cache, capsys):
    from anybind.cli import main

    csv_path = _latin1_tables(tmp_path)[0]
    args = ["extract", "-e", "random:image", "-d", f"table:{csv_path}", "-q", "--workers", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{csv_path} line 3: byte 0xe9 at column 4 is not UTF-8" in err and "Traceback" not in err
    assert not (cache / "stores").exists()  # refused before any store was started
    assert main(args + ["--encoding", "latin-1"]) == 0
    out = capsys.readouterr().out
    assert "2 rows" in out and "0 skipped" in out  # café.png found, not skipped as missing
    assert main(["extract", "-e", "random:image", "-d", "openclipart", "--encoding", "latin-1", "-q"]) == 2
    assert "takes no option encoding" in capsys.readouterr().err


def test_a_run_reads_a_latin1_table_with_its_encoding(tmp_path, cache, capsys):
    """`anybind run` on a Latin-1 table: refused by line without an encoding, read whole with
    `--encoding latin-1` (or the run file's `encoding:`), a bad encoding refused by its key."""
    from anybind.cli import main

    lines = ["image,caption"]
    for i in range(40):
        Image.new("RGB", (8, 8), (6 * i, 100, 200)).save(tmp_path / f"café{i}.png")
        lines.append(f"café{i}.png,une tasse de café numéro {i}")
    table = tmp_path / "cafés.csv"
    table.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    runfile = tmp_path / "run.yaml"
    text = f"""
name: cafes
data: "table:{table}"
encoders: {{image: {{spec: "random:image"}}, text: {{spec: "random:text"}}}}
assess: {{enabled: false}}
recipe: linear
overrides: [train.max_steps=4, train.val_every=2, train.batch_size=16]
evaluate: {{suite: custom, tasks: [retrieval], baselines: []}}
export: false
"""
    runfile.write_text(text)
    out = tmp_path / "out"
    assert main(["run", str(runfile), "--out", str(out), "-q"]) == 2
    assert "line 2: byte 0xe9 at column 4 is not UTF-8" in capsys.readouterr().err
    assert not (cache / "stores").exists()
    assert main(["run", str(runfile), "--out", str(out), "--encoding", "latin-1", "-q"]) == 0
    stores = [json.loads(p.read_text()) for p in (cache / "stores").rglob("manifest.json")]
    # every image found: none skipped as "file not found"
    assert sorted((m["modality"], m["rows"], m["skipped"]) for m in stores) == [("image", 40, 0), ("text", 40, 0)]
    runfile.write_text(text + "encoding: klingon\n")
    assert main(["run", str(runfile), "--out", str(tmp_path / "out2"), "-q"]) == 2
    assert "encoding: unknown text encoding 'klingon'" in capsys.readouterr().err
