"""Image preprocessing as a frozen dataclass: it travels with the encoder and keys the cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize the short side to `resize`, centre-crop `size`, scale to [0, 1], normalise.

    ``resize_mode="squash"`` instead resizes the whole image to ``resize x resize`` (aspect ratio
    not kept), then centre-crops ``size``: SigLIP-style models (resize == size, nothing cropped)
    and timm's ``crop_mode="squash"`` expect that.
    """

    size: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    channels_first: bool = True
    resize_mode: str = "shortest"  # "shortest" (resize + centre crop) or "squash"

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(
                f"resize_mode must be 'shortest' or 'squash', not {self.resize_mode!r}"
            )

    def config(self) -> dict:
        cfg = asdict(self)
        if cfg["resize_mode"] == "shortest":  # the default stays out: older cache keys still match
            del cfg["resize_mode"]
        return cfg

    def __call__(self, image) -> np.ndarray:
        """PIL image (RGB) -> float32 array [3, size, size] (or [size, size, 3])."""
        from PIL import Image

        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[
            self.interpolation
        ]
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        if self.resize_mode == "squash":
            nw = nh = max(self.size, self.resize)
        else:
            scale = self.resize / min(w, h)
            nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        # reducing_gap: a cheap box reduce first, then an exact resample; big images stay fast
        image = image.resize((nw, nh), resample, reducing_gap=3.0)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return self._to_array(image)

    def _to_array(self, image) -> np.ndarray:
        arr = np.asarray(image, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1) if self.channels_first else arr)
