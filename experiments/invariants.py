"""Several invariants: does ``fit_conserved(out_features=2)`` recover both of a system's?

    python experiments/invariants.py --json docs/results/invariants.json   # ~40 s
    python experiments/invariants.py --quick                               # a smoke run

Two uncoupled oscillators (frequencies 1 and √2, states ``(q1, p1, q2, p2)``): two independent
invariants, the two energies. Per data seed: 25 noisy training trajectories of 60 steps (noise
0.05), ``MLPEmbedding(4, out_features=2, hidden=64)`` fitted until converged, then on 20 clean
held-out trajectories the linear R² of each energy from the two outputs, beside each output's
conservation ratio (``fit.ratios``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from noether_experiments import protocol
from noether_wrap import fit_conserved
from noether_wrap.embeddings import MLPEmbedding


def oscillators(n: int, seed: int, noise: float) -> tuple[Tensor, Tensor]:
    """``(n, 60, 4)`` states and their two energies ``(n, 60, 2)``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, math.sqrt(2.0)])
    amp = 0.3 + 0.9 * torch.rand(n, 2, generator=g)
    phase = 2 * math.pi * torch.rand(n, 2, generator=g)
    angle = w * (0.1 * torch.arange(60.0))[None, :, None] + phase[:, None]
    q, p = amp[:, None] * angle.cos(), -amp[:, None] * w * angle.sin()
    x = torch.stack([q[..., 0], p[..., 0], q[..., 1], p[..., 1]], -1)
    return x + noise * torch.randn(x.shape, generator=g), 0.5 * (p**2 + (w * q) ** 2)


def r_squared(codes: Tensor, target: Tensor) -> float:
    """Linear R² of ``target`` ``(N,)`` from ``codes`` ``(N, m)`` (with an intercept)."""
    design = torch.cat([codes, torch.ones(len(codes), 1, dtype=codes.dtype)], 1)
    residual = target - design @ torch.linalg.lstsq(design, target).solution
    return 1 - float(residual.var() / target.var())


def run(seed: int, quick: bool) -> dict[str, Any]:
    train, _ = oscillators(25, seed, 0.05)
    test, energies = oscillators(20, 100 + seed, 0.0)
    torch.manual_seed(0)
    fit = fit_conserved(MLPEmbedding(4, out_features=2, hidden=64), train, progress=False,
                        steps=200 if quick else None)  # fmt: skip
    with torch.no_grad():
        codes = fit.embedding(test.reshape(-1, 4)).double()
    r2 = [r_squared(codes, e) for e in energies.reshape(-1, 2).double().T]
    print(f"data seed {seed}: ratios {[round(r, 4) for r in fit.ratios]}, R² of E1 {r2[0]:.3f}, "
          f"E2 {r2[1]:.3f} ({fit.steps} steps)")  # fmt: skip
    return {"ratios": fit.ratios, "r2": r2, "steps": fit.steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, for tests")
    parser.add_argument("--data-seeds", type=int, default=3)
    protocol.add_threads_argument(parser)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    protocol.set_threads(args.threads)
    start = time.perf_counter()
    seeds = range(1 if args.quick else args.data_seeds)
    report: dict[str, Any] = {
        "example": "invariants",
        "seeds": {str(s): run(s, args.quick) for s in seeds},
    }
    protocol.finish_report(report, start, args.json)


if __name__ == "__main__":
    main()
