"""Built-in dataset: the sample photos that ship inside scikit-image (BSD), with captions.

Nineteen real photographs (astronaut, cat, coffee, rocket, microscopy, ...), each with a short
caption written by hand from looking at the picture. Synthetic images (colour wheel, logo,
horse silhouette, phantoms, checkerboards) and the files scikit-image must download are left
out. Tiny, but real: a smoke test for zero-shot retrieval with no network at all.
"""

from __future__ import annotations

from ..errors import DataError, MissingDependencyError
from .index import DatasetIndex

LISTING_VERSION = 1

# name -> (caption, label); `cat` is the same picture as `chelsea`, so only one is listed
PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": (
        "an astronaut in an orange spacesuit smiling, with an American flag and a model space shuttle behind her",
        "person",
    ),
    "camera": (
        "a black and white photo of a man looking through a camera on a tripod in a field",
        "person",
    ),
    "chelsea": ("a close-up of a tabby cat's face with green eyes", "animal"),
    "coffee": ("a cup of espresso on a red saucer with a spoon, on a wooden table", "food"),
    "rocket": (
        "a rocket on a launch pad at dusk, lit by floodlights between lightning towers",
        "vehicle",
    ),
    "stereo_motorcycle#0": (
        "a red motorcycle parked in a garage with shelves behind it",
        "vehicle",
    ),
    "coins": ("a black and white photo of rows of old coins on a dark background", "object"),
    "clock": ("a blurred grey photo of a small round clock against a plain wall", "object"),
    "page": ("a grey photo of a printed page of text about image segmentation", "text"),
    "text": ("a grey photo of handwritten symbols on a sheet of paper seen at an angle", "text"),
    "brick": ("a grey close-up of a brick wall", "texture"),
    "grass": ("a grey close-up of a lawn of grass", "texture"),
    "gravel": ("a grey close-up of gravel stones", "texture"),
    "moon": ("a grey close-up of the surface of the moon with craters", "space"),
    "hubble_deep_field": (
        "the Hubble deep field: many small colourful galaxies on a black sky",
        "space",
    ),
    "retina": (
        "a photo of the back of a human eye: an orange retina with red blood vessels",
        "medical",
    ),
    "microaneurysms": ("a grey close-up of blood vessels in a retina", "medical"),
    "immunohistochemistry": (
        "a microscope image of stained tissue with brown cell membranes and blue nuclei",
        "medical",
    ),
    "cell": ("a grey microscope image of a single round cell floating in liquid", "medical"),
}


def list_skimage_photos() -> DatasetIndex:
    """List the scikit-image sample photos; images are ``skimage://<name>`` references."""
    try:
        import skimage  # noqa: F401 - only checks that the photos are installed
    except ImportError as exc:
        raise MissingDependencyError("the skimage-photos dataset", "scikit-image") from exc
    from skimage import data

    missing = [n for n in PHOTOS if not callable(getattr(data, n.partition("#")[0], None))]
    if missing:
        raise DataError(f"this scikit-image has no {', '.join(missing)}: upgrade scikit-image")
    records = [
        {
            "item_id": name.replace("#", "-"),
            "image": f"skimage://{name}",
            "caption": caption,
            "label": label,
        }
        for name, (caption, label) in PHOTOS.items()
    ]
    meta = {
        "source": f"scikit-image {skimage.__version__}",
        "licence": "BSD-3-Clause (scikit-image sample data)",
    }
    return DatasetIndex.from_records(
        "skimage-photos", records, {"image": "image", "caption": "text"}, meta=meta
    )
