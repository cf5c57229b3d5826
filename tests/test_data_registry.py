"""The dataset registries: DATASETS (built-ins by name) and DATA_PREFIXES (listers by prefix),
with the help and licence the CLI lists; a user's dataset or prefix plugs in by one call."""

from pathlib import Path

import pytest

from anybind.data import (
    DATA_PREFIXES,
    DATASETS,
    DatasetIndex,
    dataset_spec_forms,
    describe_datasets,
    list_datasets,
    load_dataset,
    register_dataset,
    register_dataset_prefix,
)
from anybind.errors import DataError
from anybind.registry import Registry, RegistryError

CALLS = []


def list_notes(root="/default/notes", colour="red") -> DatasetIndex:
    CALLS.append((root, colour))
    records = [{"item_id": f"n{i}", "caption": [f"{colour} note {i} in {root}"]} for i in range(4)]
    return DatasetIndex.from_records("notes", records, {"caption": "text"})


def list_lines(path: str) -> DatasetIndex:
    CALLS.append((path,))
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    records = [{"item_id": f"l{i}", "caption": [line]} for i, line in enumerate(lines)]
    return DatasetIndex.from_records("lines", records, {"caption": "text"})


def stamp_lines(location):
    return [location]


@pytest.fixture()
def registered():
    CALLS.clear()
    register_dataset("notes", list_notes, help="four notes", licence="CC0", install="nothing to install",
                     fields={"caption": "text"})
    register_dataset_prefix("lines", f"{__name__}:list_lines", form="lines:FILE",
                            stamp=f"{__name__}:stamp_lines", help="one caption per line of a text file")
    yield
    DATASETS.unregister("notes")
    DATA_PREFIXES.unregister("lines")


def test_the_tables_are_registries():
    assert isinstance(DATASETS, Registry) and isinstance(DATA_PREFIXES, Registry)
    assert set(DATASETS.names()) == {"openclipart", "fashion-mnist", "skimage-photos", "openclipart-speech",
                                     "wordnet-speech"}
    assert {"table", "folder", "wds", "imagenet", "karpathy"} <= set(DATA_PREFIXES.names())
    assert DATASETS.entry("openclipart").meta["licence"] == "public domain"
    assert isinstance(DATA_PREFIXES.entry("table").target, str)  # lazy: nothing imported


def test_describe_datasets_has_help_and_licence_for_every_form():
    rows = {r["spec"]: r for r in describe_datasets()}
    assert rows["openclipart"]["kind"] == "built-in" and rows["openclipart"]["licence"] == "public domain"
    assert rows["table:PATH"]["kind"] == "prefix" and "CSV" in rows["table:PATH"]["help"]
    assert rows["wds:PATTERN"]["licence"]
    assert all(r["help"] for r in rows.values())
    assert "karpathy:FILE" in dataset_spec_forms() and "fashion-mnist" in dataset_spec_forms()


def test_a_registered_dataset_lists_caches_and_takes_a_root(registered, cache):
    assert "notes" in {r["name"] for r in list_datasets()}
    assert load_dataset("notes").column("caption")[0] == ["red note 0 in /default/notes"]
    load_dataset("notes")
    assert CALLS == [("/default/notes", "red")]  # the second load is a cache hit
    assert load_dataset("notes:/elsewhere", colour="blue").column("caption")[0] == ["blue note 0 in /elsewhere"]
    with pytest.raises(DataError, match=r"takes no option color: .*did you mean 'colour'"):
        load_dataset("notes", color="blue")


def test_a_registered_prefix_is_stamped_by_its_stamp_function(registered, cache, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first\nsecond\n")
    assert len(load_dataset(f"lines:{path}")) == 2
    path.write_text("first\nsecond\nthird\n")
    assert len(load_dataset(f"lines:{path}")) == 3  # the stamp saw the edit
    row = next(r for r in describe_datasets() if r["name"] == "lines")
    assert row == {"name": "lines", "spec": "lines:FILE", "kind": "prefix",
                   "help": "one caption per line of a text file", "licence": "that of your data",
                   "installed": True, "install": ""}


def test_names_are_checked(registered):
    with pytest.raises(RegistryError, match="already registered"):
        register_dataset_prefix("lines", "elsewhere:list_lines")
    with pytest.raises(DataError, match="a word before ':'"):
        register_dataset_prefix("a:b", list_lines)
    register_dataset_prefix("broken", "anybind.data:no_such_lister")
    try:
        with pytest.raises(DataError, match=r"the broken lister 'anybind.data:no_such_lister' does not exist"):
            load_dataset("broken:x")
    finally:
        DATA_PREFIXES.unregister("broken")
