"""The whole training loop's speed, steps/s, with the features read per step or preloaded on the device.

`train()` at a fixed number of steps (validation and checkpoints once, at the end) on real
stores, for a recipe, twice in one run: batches gathered on the host and copied per step
(`preload=False`), and features copied to the device once (`preload=True`, the default on a GPU
when they fit). On a CPU both read the same memory, so the ratio should be about 1.

Roofline: the matmul rate (fp32, bf16) is measured at the start and the end of the run
(benchmarks/roofline.py), and each recipe's rate is printed as GFLOP/s and a fraction of the
matmul rate of the precision training computes in. FLOPs per step (benchmarks/flops.py): 3x the
forward (forward + backward) of the projectors and the loss's B x B logits, counted by
FlopCounterMode at each step's batch size. The time is the whole `train()` call (setup, one
validation, checkpoint and the saved model included), so the fraction is a floor on the step's.

    python benchmarks/train_loop.py                                  # openclipart stores from the cache
    python benchmarks/train_loop.py --image STORE --text STORE --recipes freeze-align,sail --steps 500
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from anybind.align.data import PairedFeatures
from anybind.align.losses import build_objective
from anybind.align.recipe import load_recipe
from anybind.align.trainer import build_model, epoch_batches, resolve_precision, train
from anybind.features import FeatureStore, extract
from flops import train_step_flops
from roofline import Roofline


def run_flops(recipe, stores: dict, steps: int, device: str) -> tuple[float, int]:
    """(FLOPs of the first `steps` training steps of `recipe` on `stores`, the full batch size):
    each step counted at its own batch size (an epoch's last batch may be smaller)."""
    data = PairedFeatures({k: v if isinstance(v, FeatureStore) else FeatureStore.open(v) for k, v in stores.items()})
    pairs, cfg = data.pairs("train"), recipe.train
    batch = min(cfg.batch_size, len(pairs))
    sizes, epoch = [], 0
    while len(sizes) < steps:
        sizes += [len(b) for b in epoch_batches(pairs, batch, epoch, cfg.seed, cfg.captions, 1)]
        epoch += 1
    space = build_model(recipe, data).to(device)
    objective = build_objective(recipe.loss)
    objective.contrastive.to(device)
    dims = [data.side(n).dims for n in data.names]
    per_size = {b: train_step_flops(space, objective, data.names, dims, b) for b in set(sizes[:steps])}
    return sum(per_size[b] for b in sizes[:steps]), batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", help="image store folder (default: efficientnet-lite0 on openclipart, from the cache)")
    ap.add_argument("--text", help="text store folder (default: minilm-l6 on openclipart, from the cache)")
    ap.add_argument("--recipes", default="freeze-align,sail")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    roof = Roofline.measure()
    image = args.image or extract("efficientnet-lite0", "openclipart", progress=False)
    text = args.text or extract("minilm-l6", "openclipart", progress=False)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}), {args.steps} steps per run, torch {torch.__version__}")
    print(f"{'recipe':<14}{'per-step copy':>16}{'preloaded':>14}{'ratio':>8}")
    counted = {}
    for recipe_name in args.recipes.split(","):
        recipe = load_recipe(recipe_name, [f"train.max_steps={args.steps}", f"train.val_every={args.steps}",
                                           f"train.checkpoint_every={args.steps}", "train.patience=1000"])
        rates = {}
        for preload in (False, True, False, True):  # alternated, best of two: the machines are shared
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                train(recipe, {"image": image, "text": text}, out=out, device=args.device, progress=False,
                      baselines=False, preload=preload)
                rate = args.steps / (time.perf_counter() - t0)
            rates[preload] = max(rates.get(preload, 0.0), rate)
        print(f"{recipe_name:<14}{rates[False]:>12.1f} st/s{rates[True]:>10.1f} st/s{rates[True] / rates[False]:>7.2f}x")
        flops, batch = run_flops(recipe, {"image": image, "text": text}, args.steps, args.device)
        counted[recipe_name] = (flops, batch, resolve_precision(recipe.train.precision, torch.device(args.device)), rates)
    roof.remeasure()
    print(roof.header())
    for recipe_name, (flops, batch, precision, rates) in counted.items():
        print(f"{recipe_name}: {flops / args.steps / 1e9:.2f} GFLOP per step (batch {batch}, {precision}; 3x forward "
              f"of projectors + logits, FlopCounterMode)")
        for label, preload in (("per-step copy", False), ("preloaded", True)):
            print(f"  {label:<14} {roof.describe(args.steps / rates[preload], flops, precision)}")


if __name__ == "__main__":
    main()
