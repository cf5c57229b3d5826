"""Compute precision for ``--precision auto``: a rule, so every run and every cache decides the same.

The decision depends on the encoder (its fingerprint, pooling included) and the device type only:
never on a timing (one timing is noise: the same command chose bf16 in two fresh caches and fp32
in two others), on the dataset, or on the layers asked for (so a store holding more layers stays
a hit for fewer):

- policy per device type: on CUDA, bf16 autocast where faithful; on a CPU, bf16 only for
  convolutional encoders (``Encoder.channels_last``), whose bf16 convolutions beat fp32 there
  (efficientnet-lite0 1.46x), while matmul-bound transformers stay fp32 (bf16 matmul ran at
  0.56-0.60x fp32 on the CPUs measured: README, performance); other devices fp32;
- audio: fp32. No calibration batch exists for audio, and none is needed yet: the packaged
  Whisper runs in CTranslate2 (``supports_autocast`` False; its own float32 compute type) and
  no bf16 measurement of an ``hf:`` audio model has been made; ``--precision bf16`` forces it;
- fidelity: bf16 only where the encoder's output embedding (``final``, which carries the error of
  every block before it) stays within cosine ``BF16_MIN_COSINE`` of fp32 for every item of a
  fixed calibration batch: ``CALIBRATION_ITEMS`` items drawn from a seeded generator (shapes on
  a background for images, sentences from a fixed vocabulary for text), the same on every
  machine and for every dataset. It catches networks that break under bf16; it is not a
  measurement on your data.

Speed is measured on the same batch and logged as advice only. A measured decision is
remembered in the cache (``precision.json``), keyed by everything it depends on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time

import torch

from .._hashing import hash_obj
from ..atomic import write_json
from ..config import cache_root
from ..encoders import Encoder

log = logging.getLogger("anybind.extract")
PRECISIONS = ("auto", "fp32", "bf16")  # compute precisions (--precision); auto = the rule above
BF16_MIN_COSINE = 0.995  # bf16 is used only where features stay this close to fp32
CALIBRATION_ITEMS = 32
CALIBRATION_SEED = 0
CALIBRATION_LAYER = "final"
POLICY = "precision-rule/2"  # part of the memo key: decisions of the timing-based rule are not reused
MEMO_FILE = "precision.json"
CALIBRATED = ("image", "text")  # modalities with a calibration batch; any other computes in fp32


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_policy(enc: Encoder, device: torch.device) -> str | None:
    """Why bf16 may be considered for `enc` on `device`, or None when the rule says fp32."""
    if not enc.supports_autocast:
        return None
    if device.type == "cuda":
        return "cuda" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and enc.channels_last:
        return "cpu, convolutional"
    return None


def choose_precision(enc: Encoder, pooling: str, device: torch.device, cache=None) -> str:
    """"bf16" where the device type's policy allows it and the calibration batch stays faithful, else "fp32"."""
    policy = bf16_policy(enc, device)
    if policy is None or enc.modality not in CALIBRATED:  # audio and others: fp32 (see the module docstring)
        return "fp32"
    memo_key = hash_obj([POLICY, enc.fingerprint(pooling, "?"), device.type])
    memo_file = cache_root(cache) / MEMO_FILE
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]["precision"]
    worst, speedup = _calibrate(enc, [CALIBRATION_LAYER], pooling, device)
    precision = "bf16" if worst >= BF16_MIN_COSINE else "fp32"
    log.info("precision %s for %s on %s (%s): min cosine bf16 vs fp32 %.4f over %d calibration items "
             "(threshold %.3f)", precision, enc.spec, device.type, policy, worst, CALIBRATION_ITEMS, BF16_MIN_COSINE)
    _advise(precision, speedup)
    memo[memo_key] = {"precision": precision, "min_cosine": round(worst, 4), "spec": str(enc.spec),
                      "device_type": device.type, "layer": CALIBRATION_LAYER, "rule": POLICY}
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(memo_file, memo)
    return precision


def _calibrate(enc: Encoder, layers: list[str], pooling: str, device: torch.device) -> tuple[float, float]:
    """(min cosine of bf16 to fp32 features over the calibration batch and layers, fp32/bf16 time)."""
    batch = _to(enc.collate([enc.preprocess(x) for x in calibration_items(enc)]), device)

    def run(precision: str):
        with torch.inference_mode(), autocast(precision, device):
            enc.encode(batch, layers, pooling)  # warm-up: first calls pay for kernel selection
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = enc.encode(batch, layers, pooling)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out, time.perf_counter() - t

    (ref32, t32), (low, t16) = run("fp32"), run("bf16")
    worst = min(torch.nn.functional.cosine_similarity(ref32[k].float(), low[k].float(), dim=-1).min().item()
                for k in layers)
    return worst, t32 / max(t16, 1e-9)


def _advise(precision: str, speedup: float) -> None:
    """Speed as advice: one timing is too noisy to decide on, but worth a line when it is large."""
    if precision == "bf16" and speedup < 0.8:
        log.info("bf16 ran %.1fx slower than fp32 in one timing here; --precision fp32 may be faster "
                 "(it makes a different store)", 1 / speedup)
    elif precision == "fp32" and speedup > 1.25:
        log.info("bf16 ran %.1fx faster in one timing here but was not faithful enough on the calibration "
                 "batch; --precision bf16 forces it (it makes a different store)", speedup)


# ---- the calibration batch ---------------------------------------------------------------------
_WORDS = {
    "adj": ["red", "small", "old", "bright", "striped", "wooden", "blue", "tall", "round", "quiet", "green", "broken"],
    "noun": ["cat", "house", "tree", "bicycle", "flower", "boat", "clock", "bird", "mountain", "chair", "lamp", "dog"],
    "verb": ["standing near", "drawn beside", "sitting on", "next to", "in front of", "under", "behind", "above"],
}


def calibration_items(enc: Encoder) -> list | None:
    """The fixed raw items (before `preprocess`) for `enc`'s modality; None where there are none."""
    rng = random.Random(CALIBRATION_SEED)
    if enc.modality == "text":
        return [_sentence(rng) for _ in range(CALIBRATION_ITEMS)]
    if enc.modality == "image":
        return [_drawing(rng) for _ in range(CALIBRATION_ITEMS)]
    return None


def _sentence(rng: random.Random) -> str:
    w = {k: rng.choice(v) for k, v in _WORDS.items()}
    tail = rng.choice(["", " on a sunny day", " in a simple line drawing", " with a shadow", ", seen from above"])
    return f"a {w['adj']} {w['noun']} {w['verb']} a {rng.choice(_WORDS['adj'])} {rng.choice(_WORDS['noun'])}{tail}"


def _drawing(rng: random.Random, side: int = 256):
    """Filled shapes and lines on a plain background, lightly blurred: clipart-like, seeded."""
    from PIL import Image, ImageDraw, ImageFilter

    image = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(3, 12)):
        x0, x1 = sorted(rng.randrange(side) for _ in range(2))
        y0, y1 = sorted(rng.randrange(side) for _ in range(2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x1 + 1, y1 + 1], fill=tuple(rng.randrange(256) for _ in range(3)), outline=(0, 0, 0),
              width=rng.randrange(1, 5))
        draw.line([(rng.randrange(side), rng.randrange(side)) for _ in range(3)], fill=(0, 0, 0),
                  width=rng.randrange(1, 6))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def _to(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch
