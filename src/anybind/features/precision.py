"""Compute precision: bf16 autocast where it is faithful and faster, fp32 otherwise.

On CPUs, bf16 autocast can be 2-5x faster than fp32 (AVX-512 bf16 / AMX) or slower (no bf16
units); and some networks lose accuracy in bf16. So it is measured, not assumed, once per
encoder and remembered in the cache so every later run decides the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import torch

from .._hashing import hash_obj
from ..atomic import write_json
from ..config import cache_root
from ..encoders import Encoder
from ..errors import DataError

log = logging.getLogger("anybind.extract")
BF16_MIN_COSINE = 0.995  # bf16 is used only where features stay this close to fp32
CALIBRATION_ITEMS = 32


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def choose_precision(enc: Encoder, refs: list, layers: list[str], pooling: str, device: torch.device, cache=None) -> str:
    """bf16 autocast where features stay within cosine 0.995 of fp32 and it is faster, else fp32.

    Measured once per encoder (weights, preprocessing, pooling, layers, device) on a few real
    items, and remembered in the cache so every later run decides the same.
    """
    if not enc.supports_autocast:
        return "fp32"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "fp32"
    memo_key = hash_obj([enc.fingerprint(pooling, "?"), sorted(layers), device.type])
    memo_file = cache_root(cache) / "precision.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]["precision"]
    items = []
    for ref in refs:
        try:
            items.append(enc.preprocess(enc.load_item(ref)))
        except DataError:
            continue
        if len(items) >= CALIBRATION_ITEMS:
            break
    if not items:
        return "fp32"
    batch = _to(enc.collate(items), device)

    def timed(precision: str):
        with torch.inference_mode(), autocast(precision, device):
            enc.encode(batch, layers, pooling)  # warm-up: first calls pay for kernel selection
            t = time.perf_counter()
            out = enc.encode(batch, layers, pooling)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out, time.perf_counter() - t

    ref32, t32 = timed("fp32")
    low, t16 = timed("bf16")
    worst = min(
        torch.nn.functional.cosine_similarity(ref32[k].float(), low[k].float(), dim=-1).min().item() for k in layers
    )
    # bf16 only where it is both faithful and faster: on some CPUs (no AMX) it is slower than fp32
    precision = "bf16" if worst >= BF16_MIN_COSINE and t16 < 0.9 * t32 else "fp32"
    log.info("precision: bf16 vs fp32 min cosine %.4f, time %.3fs vs %.3fs over %d items -> %s",
             worst, t16, t32, len(items), precision)
    memo[memo_key] = {"precision": precision, "min_cosine": round(worst, 5), "seconds_fp32": round(t32, 4),
                      "seconds_bf16": round(t16, 4), "spec": str(enc.spec)}
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(memo_file, memo)
    return precision


def _to(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch
