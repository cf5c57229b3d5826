"""Small datasets for store/extract tests (importable by subprocess scripts too)."""

from anybind.data.index import DatasetIndex


def toy_text_index(n: int = 60, name: str = "toy") -> DatasetIndex:
    recs = []
    for i in range(n):
        caps = [f"a drawing of thing number {i}", f"item {i} in words"]
        if i % 11 == 3:
            caps[0] = "   "  # an empty caption: skipped and reported
        recs.append({"item_id": f"item{i:04d}", "caption": caps, "group": f"g{i % 13}"})
    return DatasetIndex.from_records(name, recs, {"caption": "text"})
