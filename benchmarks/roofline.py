"""The roofline every performance benchmark prints beside its times: this machine's matmul rate.

A time alone says little on a shared, noisy machine; a time as a fraction of the dense matmul
rate measured in the same run says how far the work is from what the hardware allows.

    from roofline import Roofline
    roof = Roofline.measure()          # fp32 and bf16 GFLOP/s of a square matmul, now
    print(roof.header())
    print(roof.describe(seconds, flops))            # "1.23 s, 345 GFLOP/s, 0.82 of fp32 matmul"
    roof.remeasure()                                # again at the end: the spread shows the noise

`python benchmarks/roofline.py` prints the rates and how they vary with the matmul size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 7) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype`: the fastest of `reps` timed products (a shared
    machine only ever slows a product down, so the fastest is the closest to the roof)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: thread pool, kernel selection
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


@dataclass
class Roofline:
    """Matmul rates (GFLOP/s) by precision, measured in this process; a list per precision."""

    rates: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def measure(cls) -> Roofline:
        roof = cls()
        roof.remeasure()
        return roof

    def remeasure(self) -> None:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            self.rates.setdefault(name, []).append(matmul_gflops(dtype))

    def rate(self, precision: str = "fp32") -> float:
        """The best rate seen for `precision`: the roof (a shared machine only ever slows it)."""
        return max(self.rates[precision])

    def header(self) -> str:
        spread = ", ".join(f"{p} {' / '.join(f'{r:.0f}' for r in rs)}" for p, rs in self.rates.items())
        f32, bf16 = self.rate("fp32"), self.rate("bf16")
        return (f"matmul 2048^3 in this run (GFLOP/s): {spread}; roof fp32 {f32:.0f}, bf16 {bf16:.0f} "
                f"(bf16/fp32 = {bf16 / f32:.2f}), torch {torch.__version__}, {torch.get_num_threads()} threads")

    def gflops(self, seconds: float, flops: float) -> float:
        return flops / seconds / 1e9

    def fraction(self, seconds: float, flops: float, precision: str = "fp32") -> float:
        """Achieved rate as a fraction of the matmul rate of `precision`."""
        return self.gflops(seconds, flops) / self.rate(precision)

    def floor(self, flops: float, precision: str = "fp32") -> float:
        """Seconds the work would take at the matmul rate: its FLOP floor."""
        return flops / 1e9 / self.rate(precision)

    def describe(self, seconds: float, flops: float, precision: str = "fp32") -> str:
        """'1.23 s, 345 GFLOP/s = 0.82 of the fp32 matmul (1.22x its FLOP floor; 0.18 of bf16)'."""
        rate = self.gflops(seconds, flops)
        text = (f"{seconds:.3f} s, {rate:.0f} GFLOP/s = {rate / self.rate(precision):.2f} of the {precision} "
                f"matmul ({seconds / self.floor(flops, precision):.2f}x its FLOP floor")
        other = "bf16" if precision == "fp32" else "fp32"
        return text + f"; {rate / self.rate(other):.2f} of {other})"


def main() -> None:
    roof = Roofline.measure()
    print(roof.header())
    for n in (512, 1024, 2048, 4096):
        print(f"  n = {n:>4}: fp32 {matmul_gflops(torch.float32, n):6.0f}  bf16 {matmul_gflops(torch.bfloat16, n):6.0f}")


if __name__ == "__main__":
    main()
