"""A store's folder name: readable parts made file-name safe by anybind.checks.slug, then hashes."""

from anybind._hashing import hash_obj
from anybind.features.store import StoreKey


def _key(field: str, spec: str = "hf:org/model", dataset: str = "table:/data/pairs.csv") -> StoreKey:
    return StoreKey(encoder={"spec": spec}, dataset=dataset, dataset_fingerprint="fp", field=field)


def test_every_readable_part_is_a_single_safe_name():
    name = _key("captions/en: long").folder_name(["final"])
    assert "/" not in name and ":" not in name and " " not in name  # one folder, not nested ones
    assert name.startswith("hf_org_model--table__data_pairs.csv--captions_en__long--")


def test_names_of_ordinary_stores_are_unchanged():
    """Folders written before stay where a new run looks for them."""
    key = _key("caption", spec="minilm-l6", dataset="openclipart")
    assert key.folder_name(["final", "layer.3"]) == (f"minilm-l6--openclipart--caption--{key.hash[:12]}-"
                                                     f"{hash_obj(['final', 'layer.3'], 6)}")
    long = _key("image", spec="hf:" + "x" * 100).folder_name(["final"])
    assert long.split("--")[0] == "hf_" + "x" * 57  # each part at most 60 characters
