"""A user's own dataset lister, registered from outside anybind (see test_extending.py)."""

from anybind.data.index import DatasetIndex


def list_mine(path: str, **options) -> DatasetIndex:
    records = [{"item_id": f"t{i}", "caption": [f"{path} caption {i}"]} for i in range(12)]
    return DatasetIndex.from_records("mine", records, {"caption": "text"})
