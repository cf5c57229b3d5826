"""Training-step throughput: pairs/s and achieved GFLOP/s, beside this machine's matmul rate.

In one run it measures
  - the dense matmul rate (fp32 and bf16) on this machine, as the roofline to compare with;
  - a full training step (projectors forward + InfoNCE on the batch + backward + AdamW) for the
    linear and star projectors at batch 4096 and 16384 (image 1280-d, text 384-d -> 512-d, the
    efficientnet-lite0 + minilm-l6 shapes), in pairs/s and GFLOP/s;
  - STRUCTURE's cost: the same step with the regulariser (levels 1 and 2) as a ratio to plain InfoNCE.
FLOPs counted: 3x the forward (forward + backward) of every Linear and of the B x B logits.

    python benchmarks/train_throughput.py            # ~2-4 minutes on 2 CPU cores
    python benchmarks/train_throughput.py --quick    # batch 4096 only
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from anybind.align.losses import build_objective
from anybind.align.optim import build_optimizer
from anybind.align.projectors import build_projector
from anybind.align.recipe import OptimizerConfig
from anybind.align.space import ProjectorSpace
from anybind.align.trainer import step_loss

D_IMAGE, D_TEXT, DIM = 1280, 384, 512


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def linear_flops(model: torch.nn.Module, batch: int) -> int:
    return sum(2 * batch * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def time_step(kind: str, batch: int, precision: str, structure_levels: int = 0, reps: int = 3) -> tuple[float, float]:
    """Seconds per training step and the FLOPs of one step."""
    torch.manual_seed(0)
    model = ProjectorSpace({"image": build_projector(kind, D_IMAGE, DIM), "text": build_projector(kind, D_TEXT, DIM)},
                           {"image": ["final"], "text": ["final"]})
    section = {"name": "infonce", "temperature": 0.05, "learn_temperature": False}
    if structure_levels:
        section |= {"structure_weight": 10.0, "structure_levels": structure_levels, "structure_max_batch": 4096}
    objective = build_objective(section)
    params = list(model.parameters()) + list(objective.contrastive.parameters())
    opt = build_optimizer(OptimizerConfig(), params)
    xa, xp = [torch.randn(batch, D_IMAGE)], [torch.randn(batch, D_TEXT)]
    item = torch.arange(batch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step():
        loss, _ = step_loss(model, objective, ["image", "text"], xa, xp, item, 0, autocast, seed=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        step()
    seconds = (time.perf_counter() - t) / reps
    flops = 3 * (linear_flops(model, batch) + 2 * 2 * batch * batch * DIM)  # both logit directions
    return seconds, flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 4096 only")
    args = ap.parse_args()
    f32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"matmul 2048^3: fp32 {f32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s (bf16/fp32 = {bf16 / f32:.2f})\n")
    print(f"{'projector':<9} {'batch':>6} {'prec':>5} {'s/step':>8} {'pairs/s':>9} {'GFLOP/s':>8} {'of matmul':>9}")
    batches = (4096,) if args.quick else (4096, 16384)
    for kind in ("linear", "star"):
        for batch in batches:
            for precision in ("fp32", "bf16"):
                s, flops = time_step(kind, batch, precision, reps=2 if batch > 4096 or kind == "star" else 3)
                rate = flops / s / 1e9
                roof = f32 if precision == "fp32" else bf16
                print(f"{kind:<9} {batch:>6} {precision:>5} {s:8.3f} {batch / s:9.0f} {rate:8.0f} {rate / roof:8.0%}")
    print("\nSTRUCTURE's cost (linear, batch 4096, fp32), as a ratio to plain InfoNCE:")
    base, _ = time_step("linear", 4096, "fp32")
    for levels in (1, 2):
        s, _ = time_step("linear", 4096, "fp32", structure_levels=levels)
        print(f"  levels={levels}: {s:.3f} s/step vs {base:.3f} -> x{s / base:.2f}")


if __name__ == "__main__":
    main()
