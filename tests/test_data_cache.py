"""load_dataset: spec resolution, the Parquet listing cache (hit, re-list on edit), errors."""

import os

import pytest
from PIL import Image

from anybind.data import list_datasets, load_dataset, tables
from anybind.errors import DataError


@pytest.fixture()
def table(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\na.png,first caption\n")
    return path


@pytest.fixture()
def count_listings(monkeypatch):
    calls = []
    real = tables.list_table

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tables, "list_table", spy)
    return calls


def test_second_load_hits_the_cache(table, cache, count_listings):
    first = load_dataset(f"table:{table}")
    second = load_dataset(f"table:{table}")
    assert len(count_listings) == 1
    assert second.fingerprint == first.fingerprint and second.root == first.root
    files = list((cache / "datasets").glob("table-pairs-*.parquet"))
    assert len(files) == 1
    load_dataset(f"table:{table}", refresh=True)
    assert len(count_listings) == 2


def test_an_edited_table_is_listed_again(table, cache, count_listings):
    assert load_dataset(str(table)).column("caption") == [
        ["first caption"]
    ]  # bare path: auto-detected
    table.write_text("image,caption\na.png,first caption\na.png,a second one\n")
    st = table.stat()
    os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert load_dataset(str(table)).column("caption") == [["first caption", "a second one"]]
    assert len(count_listings) == 2


def test_options_key_the_cache(table, cache, count_listings):
    load_dataset(f"table:{table}")
    load_dataset(f"table:{table}", caption="caption", name="other")
    assert len(count_listings) == 2


def test_unknown_name_lists_the_builtins(cache):
    # registries list their names sorted
    with pytest.raises(DataError, match="fashion-mnist, openclipart, openclipart-speech, skimage-photos, wordnet-speech"):
        load_dataset("no-such-dataset")
    with pytest.raises(DataError, match=r"table:PATH, wds:PATTERN"):
        load_dataset("no-such-dataset")


def test_a_typo_gets_a_did_you_mean(table, cache):
    with pytest.raises(DataError, match=r"unknown dataset 'openclipar' \(did you mean 'openclipart'\?\)"):
        load_dataset("openclipar")
    with pytest.raises(DataError, match=r"did you mean 'table:'"):
        load_dataset("tabel:pairs.csv")
    with pytest.raises(DataError, match=r"takes no option captoin: it takes .*did you mean 'caption'"):
        load_dataset(f"table:{table}", captoin="x")


def test_unknown_option(table, cache):
    with pytest.raises(DataError, match="takes no option colour"):
        load_dataset(f"table:{table}", colour="red")


def test_an_existing_path_of_no_known_kind(tmp_path, cache):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a table"):
        load_dataset(str(tmp_path / "empty"))


def test_list_datasets():
    rows = {r["name"]: r for r in list_datasets()}
    assert set(rows) == {"openclipart", "fashion-mnist", "skimage-photos", "openclipart-speech", "wordnet-speech"}
    for name, r in rows.items():
        spoken = name.endswith("-speech")
        assert r["fields"] == ({"audio": "audio", "caption": "text"} if spoken else {"image": "image", "caption": "text"})
        assert isinstance(r["installed"], bool) and r["licence"] and r["install"]
