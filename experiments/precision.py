"""The precision ladder: how precise must a learned g be before tailoring with it helps?

    python experiments/precision.py --json docs/results/precision.json   # ~4 min
    python experiments/precision.py --quick                              # a smoke run

For the pendulum and the spring (HNN's data, the paper's split; experiments/hamiltonian.py), per
data seed: vanilla (model seed 0) and the g's fitted on all 25 training trajectories, and a
ladder of g's between the true energy and the learned g, ``(1 − w) H + w g_learned`` (both
standardised, the learned g's sign aligned with H), the formula, and the network fitted for
precision (``labelled``: derivative labels on the states they imply). For each rung, the
diagnostic of ``noether_wrap.diagnose`` from what a user has (``hamiltonian.diagnosis``: the
training trajectories denoised with their labels, and the labels; the share of the Noether loss
that is the model's error, and g's drift ratio; beside it the share on the clean training
states, which only a simulation has: the residual per-trajectory offset of the denoised states
counts as drift), and the test-set best
of Polyak tailoring over the grid (γ chosen ON THE TEST SET: a bound on what tailoring with that
g can do, never a result). The ladder calibrates ``SHARE_TO_HELP``; the verdict is compared with
the paper-split experiments' cross-validated on/off decisions in docs/learning-g.md.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from noether_experiments import hamiltonian, pendulum, protocol, spring
from noether_wrap import diagnose

MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)


class Mix(nn.Module):
    """``(1 − w) oracle + w · sign · learned`` on states ``(N, 2) -> (N,)``."""

    def __init__(self, oracle: nn.Module, learned: nn.Module, w: float, sign: float) -> None:
        super().__init__()
        self.oracle, self.learned, self.w, self.sign = oracle, learned, w, sign

    def forward(self, x: Tensor) -> Tensor:
        return (1 - self.w) * self.oracle(x).reshape(-1) + self.w * self.sign * self.learned(
            x
        ).reshape(-1)


def ladder(system: hamiltonian.System, data_seed: int, cfg: hamiltonian.Settings) -> dict[str, Any]:
    data = hamiltonian.make_data(system, data_seed)
    fits = hamiltonian.Fits(data, cfg)
    everything = torch.arange(data.train.numel())
    field, gs = fits.vanilla(0, everything), fits.gs(everything)
    states = data.clean[data.train].reshape(-1, 2)
    with torch.no_grad():
        pair = torch.stack([gs["oracle"](states).reshape(-1), gs["learned"](states).reshape(-1)])
        sign = float(torch.sign(torch.corrcoef(pair)[0, 1]))
    candidates: dict[str, nn.Module] = {f"mix {w:g}": Mix(gs["oracle"], gs["learned"], w, sign)
                                        for w in MIXES}  # fmt: skip
    candidates["formula"] = gs["formula"]
    candidates["labelled"] = gs["labelled"]
    starts, truth = data.clean[data.test, 0], data.clean[data.test, 1:]
    vanilla = protocol.rmse(hamiltonian.per_sequence_mse(hamiltonian.rollout(field, starts, data),
                                                         truth)[None, None])  # fmt: skip
    known = hamiltonian.user_states(data, data.train)
    out: dict[str, Any] = {}
    for name, g in candidates.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = hamiltonian.diagnosis(g, field, known)
            clean = diagnose(g, field, states, system.field(states), dt=1e-3, warn_if_not=False)
            net = hamiltonian.tailored_field(field, g, data.dt, 1.0)
            net.step_rule = "polyak"
            bound = hamiltonian.test_bound(
                net, starts, truth, "polyak", cfg.grids[1],
                lambda n, x: hamiltonian.rollout(n, x, data),
            )  # fmt: skip
        out[name] = {**d, "share_clean": clean.share,
                     "bound": protocol.rmse(bound[None, None]) / vanilla}  # fmt: skip
        print(f"  {system.name} data seed {data_seed} {name:<10} share {d['share']:.3f} (clean "
              f"{clean.share:.3f})  drift {d['drift_ratio']:.3f}  {d['verdict']:<12} test-best* "
              f"{out[name]['bound']:.3f}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, for tests")
    parser.add_argument("--data-seeds", type=int, default=3)
    protocol.add_threads_argument(parser)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    protocol.set_threads(args.threads)
    start = time.perf_counter()
    cfg = hamiltonian.Settings(
        vanilla_steps=100 if args.quick else 2000, g_steps=100 if args.quick else 2000,
        meta_steps=0, meta=False, test_steps=[],
        grids=((), (1.0, 2.0)) if args.quick else ((), hamiltonian.POLYAK),
    )  # fmt: skip
    seeds = range(1 if args.quick else args.data_seeds)
    systems = (pendulum.PENDULUM,) if args.quick else (pendulum.PENDULUM, spring.SPRING)
    report: dict[str, Any] = {
        "example": "precision",
        "mixes": list(MIXES),
        "systems": {s.name: {str(ds): ladder(s, ds, cfg) for ds in seeds} for s in systems},
        "note": "bound: Polyak γ chosen ON THE TEST SET over the grid, off included",
    }
    protocol.finish_report(report, start, args.json)


if __name__ == "__main__":
    main()
