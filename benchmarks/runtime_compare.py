"""The torch path (`anybind.load`) against the torch-free runtime (`anybind.runtime.load`) on one bundle, in one run.

Speed: both embed the same openclipart images and captions (decoding and tokenising included, as a
caller sees it), each with the same number of threads (torch's intra-op threads, onnxruntime's
intra-op threads), alternating which goes first in each of `--repeats` rounds; the median of the
rounds is printed as images/s and captions/s, with the worst cosine between the two runtimes'
embeddings. Start-up: a fresh process that loads the bundle and embeds one caption and one image,
in each venv (`.venv` with torch, `.venv-runtime` without), the median of three.

Install size: the bytes under each venv's site-packages, and the CPU torch wheel (compressed and
unpacked) from pip's find-links folder or `--torch-wheel`.

    anybind export --run runs/default --out bundles/clipart --onnx
    python benchmarks/runtime_compare.py --bundle bundles/clipart                     # 256 images, 512 captions
    python benchmarks/runtime_compare.py --bundle B --images 64 --captions 128 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="a bundle exported with `anybind export --onnx`")
    p.add_argument("--images", type=int, default=256, help="openclipart images to embed")
    p.add_argument("--captions", type=int, default=512, help="openclipart captions to embed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="threads of both runtimes (default: torch's)")
    p.add_argument("--venv", default=str(ROOT / ".venv"), help="the venv with torch")
    p.add_argument("--runtime-venv", default=str(ROOT / ".venv-runtime"), help="the venv without torch")
    p.add_argument("--torch-wheel", help="a CPU torch wheel (default: the newest +cpu one in pip's find-links)")
    p.add_argument("--json", help="also write the numbers here")
    return p.parse_args(argv)


def openclipart_items(n_images: int, n_captions: int) -> tuple[list[str], list[str]]:
    """Spread openclipart items (not the first ones: a bundle trained on a spread sees other items)."""
    from anybind.data import load_dataset

    data = load_dataset("openclipart")
    rows = data.take(range(len(data) // 2, len(data) // 2 + max(n_images, n_captions)))
    images = [rows.resolve(p) for p in rows.column("image")][:n_images]
    captions = [c for cs in rows.column("caption") for c in cs][:n_captions]
    return images, captions


def timed_rounds(models: dict, images: list[str], captions: list[str], repeats: int) -> dict:
    """{runtime: {modality: [seconds per round]}}, alternating which runtime goes first; plus the embeddings."""
    seconds = {name: {"image": [], "text": []} for name in models}
    embeddings: dict = {}
    for r in range(repeats):
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            for modality, items in (("image", images), ("text", captions)):
                start = time.perf_counter()
                z = models[name](modality, items)
                seconds[name][modality].append(time.perf_counter() - start)
                embeddings.setdefault((name, modality), z)
    return {"seconds": seconds, "embeddings": embeddings}


def start_up(python: Path, bundle: str, image: str, torch_path: bool) -> float:
    """Median seconds of a fresh process: import, load the bundle, embed one caption and one image."""
    load = "import anybind; m = anybind.load(b)" if torch_path else "from anybind.runtime import load; m = load(b)"
    code = f"import sys; b = sys.argv[1]; {load}; m.encode_text(['a bird']); m.encode_image([sys.argv[2]])"
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([str(python), "-c", code, bundle, image], check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total


def site_packages(venv: str) -> Path | None:
    found = sorted(Path(venv).glob("lib/python*/site-packages"))
    return found[0] if found else None


def torch_wheel_sizes(wheel: str | None) -> dict:
    """The CPU torch wheel: its name, compressed and unpacked bytes."""
    if wheel is None:
        links = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                               capture_output=True, text=True).stdout.strip() or "/opt/wheels"
        found = sorted(glob.glob(os.path.join(links, "torch-*+cpu-*.whl")))
        wheel = found[-1] if found else None
    if wheel is None:
        return {}
    with zipfile.ZipFile(wheel) as z:
        unpacked = sum(i.file_size for i in z.infolist())
    return {"wheel": Path(wheel).name, "compressed": os.path.getsize(wheel), "unpacked": unpacked}


def install_sizes(args) -> dict:
    sizes = {}
    for name, venv in (("torch venv", args.venv), ("runtime venv", args.runtime_venv)):
        sp = site_packages(venv)
        if sp is not None:
            sizes[name] = tree_bytes(sp)
            if (sp / "torch").is_dir():
                sizes[f"{name}: torch/"] = tree_bytes(sp / "torch")
    return {"site_packages": sizes, "cpu_torch_wheel": torch_wheel_sizes(args.torch_wheel)}


def worst_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def speed(args, images: list[str], captions: list[str]) -> dict:
    import torch

    import anybind
    from anybind import runtime

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch_model, onnx_model = anybind.load(args.bundle), runtime.load(args.bundle, threads=threads)
    models = {"torch": lambda m, items: torch_model.encode(m, items).numpy(),
              "onnx": lambda m, items: onnx_model.encode(m, items, batch_size=64 if m == "image" else 256)}
    models["torch"]("text", captions[:4]), models["onnx"]("text", captions[:4])  # load the encoders: not timed
    models["torch"]("image", images[:2]), models["onnx"]("image", images[:2])
    rounds = timed_rounds(models, images, captions, args.repeats)
    out = {"threads": threads, "items": {"image": len(images), "text": len(captions)}, "per_second": {},
           "worst_cosine": {}}
    for name, by_modality in rounds["seconds"].items():
        out["per_second"][name] = {m: len(images if m == "image" else captions) / statistics.median(s)
                                   for m, s in by_modality.items()}
    for m in ("image", "text"):
        out["worst_cosine"][m] = worst_cosine(rounds["embeddings"][("onnx", m)], rounds["embeddings"][("torch", m)])
    return out


def report(results: dict) -> None:
    s = results["speed"]
    print(f"same {s['items']['image']} images and {s['items']['text']} captions, {s['threads']} threads, "
          f"median of {results['repeats']} alternating rounds")
    print(f"{'runtime':<10}{'images/s':>10}{'captions/s':>12}{'start-up s':>12}")
    for name in ("torch", "onnx"):
        ps = s["per_second"][name]
        print(f"{name:<10}{ps['image']:>10.1f}{ps['text']:>12.1f}{results['start_up'].get(name, float('nan')):>12.2f}")
    print(f"worst cosine onnx vs torch: image {s['worst_cosine']['image']:.6f}, text {s['worst_cosine']['text']:.6f}")
    for name, n in results["install"]["site_packages"].items():
        print(f"{name:<28}{n / 2**20:>10.0f} MiB")
    wheel = results["install"]["cpu_torch_wheel"]
    if wheel:
        print(f"CPU torch wheel {wheel['wheel']}: {wheel['compressed'] / 2**20:.0f} MiB, "
              f"{wheel['unpacked'] / 2**20:.0f} MiB unpacked")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (Path(args.bundle) / "onnx" / "onnx.json").is_file():
        sys.exit(f"{args.bundle} has no ONNX graphs: export it with `anybind export --run RUN --out OUT --onnx`")
    images, captions = openclipart_items(args.images, args.captions)
    results = {"bundle": str(args.bundle), "repeats": args.repeats, "speed": speed(args, images, captions),
               "start_up": {}, "install": install_sizes(args)}
    for name, venv in (("torch", args.venv), ("onnx", args.runtime_venv)):
        python = Path(venv) / "bin" / "python"
        if python.exists():
            results["start_up"][name] = start_up(python, args.bundle, images[0], torch_path=name == "torch")
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
