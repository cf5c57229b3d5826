"""The whole training loop's speed, steps/s, with the features read per step or preloaded on the device.

`train()` at a fixed number of steps (validation and checkpoints once, at the end) on real
stores, for a recipe, twice in one run: batches gathered on the host and copied per step
(`preload=False`), and features copied to the device once (`preload=True`, the default on a GPU
when they fit). On a CPU both read the same memory, so the ratio should be about 1.

    python benchmarks/train_loop.py                                  # openclipart stores from the cache
    python benchmarks/train_loop.py --image STORE --text STORE --recipes freeze-align,sail --steps 500
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from anybind.align.recipe import load_recipe
from anybind.align.trainer import train
from anybind.features import extract


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", help="image store folder (default: efficientnet-lite0 on openclipart, from the cache)")
    ap.add_argument("--text", help="text store folder (default: minilm-l6 on openclipart, from the cache)")
    ap.add_argument("--recipes", default="freeze-align,sail")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    image = args.image or extract("efficientnet-lite0", "openclipart", progress=False)
    text = args.text or extract("minilm-l6", "openclipart", progress=False)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}), {args.steps} steps per run, torch {torch.__version__}")
    print(f"{'recipe':<14}{'per-step copy':>16}{'preloaded':>14}{'ratio':>8}")
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


if __name__ == "__main__":
    main()
