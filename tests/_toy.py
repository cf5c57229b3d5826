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


def replicas(root):
    """A Flickr30k-style Karpathy JSON and an ImageNet-style folder, tiny, in their usual layouts."""
    import json

    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    images = root / "flickr"  # the Flickr30k JSON sits beside its images here (default images=)
    images.mkdir(parents=True)
    entries = []
    for i in range(60):
        name = list(colours)[i % 3]
        Image.new("RGB", (8, 8), tuple(min(255, c + i) for c in colours[name])).save(images / f"{1000 + i}.jpg")
        entries.append({"filename": f"{1000 + i}.jpg", "imgid": i, "split": "train" if i < 40 else "val" if i < 50 else "test",
                        "sentences": [{"raw": f"a {name} square number {i}"}, {"raw": f"something {name}"}]})
    karpathy = root / "flickr" / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    val = root / "imagenet" / "val"
    for k, name in enumerate(colours):
        (val / f"n0000{k}").mkdir(parents=True)
        for j in range(12):
            Image.new("RGB", (8, 8), tuple(min(255, c + 3 * j) for c in colours[name])).save(val / f"n0000{k}" / f"{j}.png")
    (root / "imagenet" / "names.txt").write_text("".join(f"n0000{k} {n}, other\n" for k, n in enumerate(colours)))
    return karpathy, images, val, root / "imagenet" / "names.txt"
