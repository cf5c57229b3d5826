"""benchmarks/flops.py: the FLOP counts the benchmarks print beside their times, checked by hand
and against torch's own FlopCounterMode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("bench_flops", Path(__file__).parents[1] / "benchmarks" / "flops.py")
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)


def test_torch_flops_of_a_linear_layer_is_two_per_multiply_add():
    layer = torch.nn.Linear(7, 5)
    assert flops.torch_flops(layer, torch.randn(3, 7)) == 2 * 3 * 7 * 5


def test_whisper_count_by_hand_for_a_tiny_shape():
    # 4 mel frames -> 2 encoder frames; n_mels 2, width 3, 1 block, MLP x4:
    # stem 4*3*2*3 + 2*3*3*3 = 72 + 54; block 4*2*9 + 2*4*3 + 2*2*3*12 = 72 + 24 + 144
    assert flops.whisper_encoder_flops(4, n_mels=2, width=3, blocks=1) == 2 * (72 + 54 + 72 + 24 + 144)


def test_whisper_count_equals_flopcountermode_on_a_torch_whisper_encoder():
    transformers = pytest.importorskip("transformers")
    frames = 200  # a 2-s trimmed clip: 100 encoder frames
    cfg = transformers.WhisperConfig(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536,
                                     num_mel_bins=80, max_source_positions=frames // 2)
    torch.manual_seed(0)
    encoder = transformers.models.whisper.modeling_whisper.WhisperEncoder(cfg).eval()
    with torch.inference_mode():
        counted = flops.torch_flops(encoder, torch.randn(2, 80, frames))
    assert counted == 2 * flops.whisper_encoder_flops(frames)


def test_train_step_is_three_forwards_of_the_linears_and_one_logit_product():
    from anybind.align.losses import build_objective
    from anybind.align.projectors import build_projector
    from anybind.align.space import ProjectorSpace

    space = ProjectorSpace({"image": build_projector("linear", 12, 8), "text": build_projector("linear", 6, 8)},
                           {"image": ["final"], "text": ["final"]})
    objective = build_objective({"name": "infonce"})
    batch = 10
    expected = 3 * (2 * batch * (12 * 8 + 6 * 8) + 2 * batch * batch * 8)  # the B x B logits once
    assert flops.train_step_flops(space, objective, ["image", "text"], [[12], [6]], batch) == expected


def test_only_flat_indexes_have_a_search_count():
    parts = {"image": {"kind": "flat", "count": 100, "vector_dim": 16}, "text": {"kind": "flat", "count": 5, "vector_dim": 16}}
    assert flops.flat_search_flops(parts)[0] == 2 * 105 * 16
    count, why = flops.flat_search_flops({"image": {"kind": "hnsw", "count": 100, "vector_dim": 16}})
    assert count is None and "hnsw" in why


def test_attention_on_the_cpu_is_counted():
    q = torch.randn(2, 6, 100, 64)
    with torch.inference_mode():
        counted = flops.torch_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert counted == 2 * (2 * 2 * 6 * 100 * 100 * 64)  # q k^T and the weighted sum of v
