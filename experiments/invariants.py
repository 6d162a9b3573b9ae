"""Several invariants: does ``fit_conserved(out_features=2)`` recover both of a system's?

    python experiments/invariants.py --json docs/results/invariants.json   # ~2 min
    python experiments/invariants.py --quick                               # a smoke run

Two uncoupled oscillators (frequencies 1 and √2, states ``(q1, p1, q2, p2)``): two independent
invariants, the two energies. Per data seed: 25 noisy training trajectories of 60 steps (noise
0.05), ``MLPEmbedding(4, out_features=2, hidden=64)`` fitted until converged, then on 20 clean
held-out trajectories the linear R² of each energy from the two outputs, beside each output's
conservation ratio (``fit.ratios``).

Which invariant does tailoring rely on? The same network fitted for precision (the derivative
labels, on the states they imply: ``denoise_with_labels``; 2,000 steps, cosine decay from
``hamiltonian.LABELLED_LR``), a vector field (an MLP fitted for
300 steps on the noisy states with the clean labels, HNN's convention), and per output: its R²
of each energy alone, the diagnostic's share (``diagnose`` on the denoised training states with
their labels), and the test-set best of Polyak tailoring with that output alone (γ chosen ON
THE TEST SET over the grid, "off" included: a bound, never a result). The diagnostic ranks the
outputs as tailoring does when the output with the larger share has the lower bound.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noether_experiments import hamiltonian, protocol
from noether_wrap import Rollout, denoise_with_labels, diagnose, fit_conserved
from noether_wrap.embeddings import MLPEmbedding

FREQUENCIES = (1.0, math.sqrt(2.0))
STEP = 0.1


def oscillators(n: int, seed: int, noise: float) -> tuple[Tensor, Tensor]:
    """``(n, 60, 4)`` states and their two energies ``(n, 60, 2)``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(FREQUENCIES)
    amp = 0.3 + 0.9 * torch.rand(n, 2, generator=g)
    phase = 2 * math.pi * torch.rand(n, 2, generator=g)
    angle = w * (STEP * torch.arange(60.0))[None, :, None] + phase[:, None]
    q, p = amp[:, None] * angle.cos(), -amp[:, None] * w * angle.sin()
    x = torch.stack([q[..., 0], p[..., 0], q[..., 1], p[..., 1]], -1)
    return x + noise * torch.randn(x.shape, generator=g), 0.5 * (p**2 + (w * q) ** 2)


def field(x: Tensor) -> Tensor:
    """The oscillators' time derivative at states ``(..., 4)``."""
    w2 = torch.tensor(FREQUENCIES) ** 2
    q1, p1, q2, p2 = x.unbind(-1)
    return torch.stack([p1, -w2[0] * q1, p2, -w2[1] * q2], -1)


class Output(nn.Module):
    """One output of a multi-output ``g``: ``(N, 4) -> (N,)``."""

    def __init__(self, g: nn.Module, index: int) -> None:
        super().__init__()
        self.g, self.index = g, index

    def forward(self, x: Tensor) -> Tensor:
        return self.g(x)[..., self.index]


def which_invariant(seed: int, quick: bool) -> dict[str, Any]:
    """Per output of the precision fit: its R² of each energy, its diagnostic share and the
    test-set bound of tailoring with it alone (see the module docstring)."""
    train, _ = oscillators(25, seed, 0.05)
    clean, _ = oscillators(25, seed, 0.0)
    test, energies = oscillators(20, 100 + seed, 0.0)
    labels = field(clean)
    states = denoise_with_labels(train, labels)
    assert isinstance(states, Tensor)
    torch.manual_seed(0)
    fit = fit_conserved(MLPEmbedding(4, out_features=2, hidden=64), states, velocities=labels,
                        progress=False,
                        steps=200 if quick else 2000, lr=hamiltonian.LABELLED_LR,
                        schedule="cosine")  # fmt: skip
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 4))  # fmt: skip
    x, target = train.reshape(-1, 4), labels.reshape(-1, 4)
    hamiltonian.fit(model.parameters(), lambda: model(x), target, 50 if quick else 300, "field")
    starts, truth = test[:, 0], test[:, 1:]

    def rollout(net: nn.Module, s: Tensor) -> Tensor:
        with torch.no_grad():
            return Rollout(net, truth.shape[1], dt=STEP, method="rk4")(s)

    vanilla = float(((rollout(model, starts) - truth) ** 2).mean().sqrt())
    grid = (1.0, 2.0) if quick else hamiltonian.POLYAK
    with torch.no_grad():
        codes = fit.embedding(test.reshape(-1, 4)).double()
    outputs = []
    for j in range(2):
        g = Output(fit.embedding, j)
        d = diagnose(g, model, states.reshape(-1, 4), labels.reshape(-1, 4), dt=1e-3,
                     warn_if_not=False)  # fmt: skip
        net = hamiltonian.tailored_field(model, g, STEP, 1.0)
        net.step_rule = "polyak"
        bound = hamiltonian.test_bound(net, starts, truth, "polyak", grid, rollout)
        outputs.append({
            "r2": [r_squared(codes[:, [j]], e) for e in energies.reshape(-1, 2).double().T],
            "share": d.share,
            "bound": float(math.sqrt(bound.mean())) / vanilla,
        })  # fmt: skip
        o = outputs[-1]
        print(f"  output {j}: R² of E1 {o['r2'][0]:.3f}, E2 {o['r2'][1]:.3f}; share "
              f"{o['share']:.3f}; test-best* {o['bound']:.3f}")  # fmt: skip
    better_share = max(range(2), key=lambda j: outputs[j]["share"])
    better_bound = min(range(2), key=lambda j: outputs[j]["bound"])
    r2 = [r_squared(codes, e) for e in energies.reshape(-1, 2).double().T]
    return {"outputs": outputs, "r2": r2, "ranks_agree": better_share == better_bound}


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
    return {"ratios": fit.ratios, "r2": r2, "steps": fit.steps,
            "precision_fit": which_invariant(seed, quick)}  # fmt: skip


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
