"""The FLOPs of the work a benchmark times, for the roofline view of benchmarks/roofline.py.

One convention throughout: a multiply-add is 2 FLOPs, and only the matmul-like work is counted
(matmuls, convolutions, attention), as `torch.utils.flop_counter.FlopCounterMode` counts it;
normalisations, activations and softmaxes are left out (memory-bound, small beside the products).

- torch models: `FlopCounterMode` over one real forward (`torch_flops`), once per batch shape;
- Whisper tiny.en under CTranslate2 (not a torch module): from its dimensions
  (`whisper_encoder_flops`), checked against FlopCounterMode on a torch Whisper encoder of the
  same shape in tests/test_benchmark_flops.py;
- anything else that is not torch: not counted, with the reason. Never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

#: printed for stages that do no matmul work: their rate is items/s, not a fraction of a roof
NOT_FLOP_BOUND = "not FLOP-bound (no matmul work)"


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def torch_flops(fn: Callable, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the torch matmul work `fn(*args, **kwargs)` runs, as FlopCounterMode counts them.

    FlopCounterMode has no formula for the CPU flash-attention kernel that SDPA runs on a CPU, so
    attention counted 0 there (a Whisper encoder lost 4% of its FLOPs); it gets the SDPA formula."""
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_sdpa: _cpu_attention_flops} if cpu_sdpa is not None else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def whisper_encoder_flops(mel_frames: int, *, n_mels: int = 80, width: int = 384, blocks: int = 4,
                          mlp_mult: int = 4) -> int:
    """FLOPs of one clip through Whisper's encoder (tiny.en by default) on `mel_frames` log-mel frames.

    The conv stem (k=3: n_mels -> width at stride 1, width -> width at stride 2) halves the frames
    to F; each block then runs q, k, v and out projections (4 F width^2 multiply-adds), the F x F
    scores and their weighted sum (2 F^2 width) and the MLP (2 F width mlp_mult width)."""
    frames = -(-mel_frames // 2)
    stem = mel_frames * width * n_mels * 3 + frames * width * width * 3
    block = 4 * frames * width**2 + 2 * frames**2 * width + 2 * frames * width * mlp_mult * width
    return 2 * (stem + blocks * block)


def encoder_flops(enc, batches: Iterable, layers: list[str], pooling: str) -> tuple[float | None, str]:
    """(FLOPs of `enc.encode` over `batches`, how they were counted), or (None, why not)."""
    from anybind.encoders.whisper import WhisperCT2Encoder

    batches = list(batches)
    if isinstance(enc, WhisperCT2Encoder):
        flops = sum(whisper_encoder_flops(clip.mel.shape[-1]) for b in batches for clip in b)
        return flops, "analytic: Whisper tiny.en conv stem + 4 blocks x 384 over each clip's padded frames"
    if not enc._modules():
        return None, f"{type(enc).__name__} runs outside torch (no model dimensions to count from)"
    flops, by_shape = 0, {}
    with torch.inference_mode():
        for b in batches:  # a stacked batch is counted once per shape; lists (text, audio) each time
            key = tuple(b.shape) if isinstance(b, torch.Tensor) else None
            if key is None or key not in by_shape:
                n = torch_flops(enc.encode, b.to(enc.device) if key else b, layers, pooling)
                if key is None:
                    flops += n
                    continue
                by_shape[key] = n
            flops += by_shape[key]
    if flops == 0:
        return None, "FlopCounterMode saw no matmul in the forward"
    return flops, "FlopCounterMode over the real forward, once per batch shape"


def train_step_flops(space, objective, names: list[str], dims: list[list[int]], batch: int) -> float:
    """FLOPs of one training step at `batch` pairs: 3x the forward (forward + backward), the forward
    being the projectors and the loss (its B x B logits) as `step_loss` runs them, counted by
    FlopCounterMode on random features of each side's layer dimensions (`dims`: the count depends
    on shapes only)."""
    from contextlib import nullcontext

    from anybind.align.trainer import step_loss

    device = next(space.parameters()).device
    xa, xp = ([torch.randn(batch, d, device=device) for d in side] for side in dims)
    item = torch.arange(batch, device=device)
    return 3 * torch_flops(step_loss, space, objective, names, xa, xp, item, 0, nullcontext(), seed=0)


def flat_search_flops(parts: dict) -> tuple[float | None, str]:
    """FLOPs of one query against an index's parts (index.json's ``parts``): a flat index scores
    every row (2 x rows x dim); IVF and HNSW visit a data-dependent subset, so they are not counted."""
    kinds = {p.get("kind") for p in parts.values()}
    if kinds != {"flat"}:
        return None, f"search FLOPs not counted: {', '.join(sorted(map(str, kinds)))} index visits a data-dependent subset"
    return sum(2 * p["count"] * p["vector_dim"] for p in parts.values()), "flat index: 2 x rows x dim"


def flops_line(flops: float | None, items: int, how: str, unit: str = "item") -> str:
    """'FLOPs: 0.770 GFLOP per item (how)' or 'FLOPs not counted: why'."""
    return f"FLOPs: {flops / items / 1e9:.3f} GFLOP per {unit} ({how})" if flops else f"FLOPs not counted: {how}"


def roofline_text(roof, seconds: float, flops: float | None, precision: str) -> str:
    """A timed stage's place under the roof ('   345 GFLOP/s = 0.82 of the fp32 matmul ...'), or '' uncounted."""
    return f"   {roof.describe(seconds, flops, precision)}" if flops else ""
