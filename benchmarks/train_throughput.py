"""Training-step throughput against the roofline: pairs/s, GFLOP/s and the fraction of the matmul rate.

In one run it measures
  - the dense matmul rate (fp32 and bf16) on this machine, at the start and at the end
    (benchmarks/roofline.py): the roof every step is compared with;
  - a full training step (projectors forward + InfoNCE on the batch + backward + AdamW, exactly the
    trainer's `step_loss`) for the linear and star projectors at batch 4096 and 16384 (image
    1280-d, text 384-d -> 512-d: the efficientnet-lite0 + minilm-l6 shapes), fp32 and bf16;
  - STRUCTURE's cost: the same step with the regulariser (levels 1 and 2) as a ratio to plain
    InfoNCE, for the linear projector (the `structure` recipe's) and the star projector.
FLOPs are counted, not estimated: torch's FlopCounterMode over one forward + backward of the step
(every matmul torch runs, the B x B logits and STRUCTURE's Gram matrices included).

    python benchmarks/train_throughput.py            # ~4-6 minutes on 2 CPU cores
    python benchmarks/train_throughput.py --quick    # batch 4096 only
    python benchmarks/train_throughput.py --profile  # and where the star and STRUCTURE steps spend time
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from anybind.align.losses import build_objective
from anybind.align.optim import build_optimizer
from anybind.align.projectors import build_projector
from anybind.align.recipe import OptimizerConfig
from anybind.align.space import ProjectorSpace
from anybind.align.trainer import step_loss
from flops import torch_flops
from roofline import Roofline

D_IMAGE, D_TEXT, DIM = 1280, 384, 512


def make_step(kind: str, batch: int, precision: str, structure_levels: int = 0):
    """The trainer's step on random features: (step(), count_flops())."""
    torch.manual_seed(0)
    model = ProjectorSpace({"image": build_projector(kind, D_IMAGE, DIM), "text": build_projector(kind, D_TEXT, DIM)},
                           {"image": ["final"], "text": ["final"]})
    section = {"name": "infonce", "temperature": 0.05, "learn_temperature": False}
    if structure_levels:
        section |= {"structure_weight": 10.0, "structure_levels": structure_levels, "structure_max_batch": 4096}
    objective = build_objective(section)
    opt = build_optimizer(OptimizerConfig(), list(model.parameters()) + list(objective.contrastive.parameters()))
    xa, xp = [torch.randn(batch, D_IMAGE)], [torch.randn(batch, D_TEXT)]
    item = torch.arange(batch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def loss():
        return step_loss(model, objective, ["image", "text"], xa, xp, item, 0, autocast, seed=0)[0]

    def step():
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    def count_flops() -> int:
        flops = torch_flops(lambda: loss().backward())
        opt.zero_grad(set_to_none=True)
        return flops

    return step, count_flops


def time_steps(steps: dict, reps: int) -> dict[str, float]:
    """Median seconds per step of each, the steps interleaved (a shared machine drifts)."""
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def throughput(batches: tuple[int, ...]) -> list[tuple]:
    """(projector, batch, precision, s/step, FLOPs) of each step, timed now, shown at the end."""
    rows = []
    for kind in ("linear", "star"):
        for batch in batches:
            made = {p: make_step(kind, batch, p) for p in ("fp32", "bf16")}
            secs = time_steps({p: s for p, (s, _) in made.items()}, reps=2 if batch > 4096 or kind == "star" else 3)
            rows += [(kind, batch, p, secs[p], count()) for p, (_, count) in made.items()]
    return rows


def show_throughput(rows: list[tuple], roof: Roofline) -> None:
    print(f"{'projector':<9} {'batch':>6} {'prec':>5} {'s/step':>8} {'pairs/s':>9} {'GFLOP/s':>8} "
          f"{'of fp32 mm':>10} {'of bf16 mm':>10}")
    for kind, batch, precision, s, flops in rows:
        rate = flops / s / 1e9
        print(f"{kind:<9} {batch:>6} {precision:>5} {s:8.3f} {batch / s:9.0f} {rate:8.0f} "
              f"{rate / roof.rate('fp32'):10.0%} {rate / roof.rate('bf16'):10.0%}")


def structure_cost(roof: Roofline) -> None:
    print("\nSTRUCTURE's cost (batch 4096, fp32), as a ratio to plain InfoNCE (interleaved, median of 5):")
    for kind in ("linear", "star"):
        made = {lv: make_step(kind, 4096, "fp32", structure_levels=lv) for lv in (0, 1, 2)}
        secs = time_steps({lv: s for lv, (s, _) in made.items()}, reps=5 if kind == "linear" else 2)
        base = secs[0]
        for lv in (1, 2):
            extra = made[lv][1]() - made[0][1]()
            print(f"  {kind:<6} levels={lv}: {secs[lv]:.3f} s/step vs {base:.3f} -> x{secs[lv] / base:.2f}; "
                  f"its extra {extra / 1e9:.0f} GFLOP run at {extra / max(secs[lv] - base, 1e-9) / 1e9:.0f} GFLOP/s "
                  f"= {extra / max(secs[lv] - base, 1e-9) / 1e9 / roof.rate('fp32'):.0%} of fp32 matmul")


def profile(kind: str, levels: int) -> None:
    step, _ = make_step(kind, 4096, "fp32", structure_levels=levels)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(f"\nprofile: {kind}, batch 4096, fp32, STRUCTURE levels {levels} (top ops by self time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 4096 only")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables of the star and STRUCTURE steps")
    args = ap.parse_args()
    roof = Roofline.measure()
    rows = throughput((4096,) if args.quick else (4096, 16384))
    roof.remeasure()  # the roof is the best of the measurements around the timings
    show_throughput(rows, roof)
    structure_cost(roof)
    if args.profile:
        profile("star", 0)
        profile("linear", 1)
    roof.remeasure()
    print("\n" + roof.header())


if __name__ == "__main__":
    main()
