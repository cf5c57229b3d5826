"""Synthetic paired stores with a planted correspondence (importable by subprocess scripts)."""

from pathlib import Path

import numpy as np

from anybind.features import write_store


def planted_stores(root: Path, n_items: int = 600, captions: int = 2, latent: int = 16,
                   d_image: int = 48, d_text: int = 32, noise: float = 0.05, seed: int = 0, dataset: str = "planted"):
    """Images and captions that are noisy linear views of one shared latent per item."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_items, latent)).astype(np.float32)
    a = rng.standard_normal((latent, d_image)).astype(np.float32)
    b = rng.standard_normal((latent, d_text)).astype(np.float32)
    ids = [f"item{i:05d}" for i in range(n_items)]
    image = z @ a + noise * rng.standard_normal((n_items, d_image)).astype(np.float32)
    mid = np.tanh(image[:, : d_image // 2])  # a second "layer" for layer-mixing tests
    zt = np.repeat(z, captions, axis=0)
    text = zt @ b + noise * rng.standard_normal((len(zt), d_text)).astype(np.float32)
    img = write_store(root / "image", {"final": image, "layer.1": mid}, ids, modality="image", field="image",
                      dataset=dataset)
    splits = dict(zip(img.item_ids, img.splits))
    t_ids = [i for i in ids for _ in range(captions)]
    txt = write_store(root / "text", {"final": text}, t_ids, modality="text", field="caption", dataset=dataset,
                      caption_index=[j for _ in ids for j in range(captions)], splits=[splits[i] for i in t_ids],
                      groups=t_ids)
    return img, txt
