"""2-D Ising spin dynamics: does tailoring remove magnetisation drift, and does g find the law?

    python examples/ising.py                    # Kawasaki dynamics, one seed, a few minutes
    python examples/ising.py --quick            # smoke run for tests
    python examples/ising.py --seeds 3 --json runs/ising.json --plot runs/ising.png
    python examples/ising.py --dynamics q2r     # energy-conserving automaton

Kawasaki (default): spins +-1 on an L x L torus, H = -sum_<ij> s_i s_j; a sweep is L^2 attempted
exchanges of opposite nearest-neighbour spins with Metropolis acceptance at temperature T = 2.
Every exchange keeps the total magnetisation, so M is conserved exactly in each realisation, while
the dynamics is random: a predictor can only learn the ensemble mean, and is scored against it.

Rows (all from one trained CNN): vanilla (one-step MSE); control (vanilla trained further on
10-step rollouts — the honest baseline); projection (control with every predicted lattice shifted
to the start's mean spin: the hand-coded conservation a physicist would write); noether_oracle
(control meta-tailored with g = mean spin); noether_learned (g a conv net with an even activation,
meta-trained end to end).

Q2R (``--dynamics q2r``): the deterministic automaton that conserves the Ising energy (sublattices
of a checkerboard in turn; a spin flips when its four neighbours sum to zero). Reported as "does g
discover the energy": |r(g, H)|, |r(g, M)| and the within-trajectory variance fraction of g.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from noether_wrap import NoetherWrapper, Rollout

ROWS = ["vanilla", "control", "projection", "noether_oracle", "noether_learned"]
#: Test-time-only tailoring of control's output bias with the oracle g (printed, not in --json).
EXTRA_ROWS = ["noether_oracle_bias"]


# --- dynamics ----------------------------------------------------------------------------------


def neighbour_sum(s: Tensor) -> Tensor:
    """Sum of the four nearest neighbours on the torus; ``s`` is ``(..., L, L)``."""
    return s.roll(1, -1) + s.roll(-1, -1) + s.roll(1, -2) + s.roll(-1, -2)


def energy_per_bond(s: Tensor) -> Tensor:
    """``H / (2 L^2)`` for real-valued fields ``(..., L, L)``: -mean over bonds of s_i s_j."""
    return -(s * s.roll(1, -1) + s * s.roll(1, -2)).mean(dim=(-2, -1)) / 2.0


def _pair_masks(size: int) -> list[tuple[Tensor, int]]:
    """The 16 classes of non-interacting bonds: a mask of each bond's first site and its axis.

    Bonds of one class share no site and no neighbour, so their exchanges can be tried at once.
    """
    i = torch.arange(size)[:, None]
    j = torch.arange(size)[None, :]
    masks = []
    for a in range(2):
        for b in range(4):
            masks.append((((i % 2) == a) & ((j % 4) == b), -1))  # horizontal bond (i,j)-(i,j+1)
            masks.append((((j % 2) == a) & ((i % 4) == b), -2))  # vertical bond (i,j)-(i+1,j)
    return masks


def kawasaki_sweep(s: Tensor, temperature: float, gen: torch.Generator) -> Tensor:
    """One sweep (L^2 attempted exchanges) of Kawasaki dynamics on ``s`` ``(N, L, L)`` of +-1."""
    size = s.shape[-1]
    masks = _pair_masks(size)
    for _ in range(8):  # 8 classes of L^2 / 8 bonds: L^2 attempts
        mask, axis = masks[int(torch.randint(len(masks), (1,), generator=gen))]
        partner = s.roll(-1, axis)  # the bond's second site, seen from its first
        h = neighbour_sum(s)
        delta = 2.0 * (s * h + partner * h.roll(-1, axis)) + 4.0
        accept = torch.rand(s.shape, generator=gen) < torch.exp(-delta / temperature)
        swap = mask & (s != partner) & accept
        # exchanging two opposite spins flips both: the bond's first site and the one after it
        s = torch.where(swap | swap.roll(1, axis), -s, s)
    return s


def q2r_step(s: Tensor) -> Tensor:
    """One Q2R step: update the even sublattice, then the odd one; ``s`` ``(N, L, L)``."""
    size = s.shape[-1]
    idx = torch.arange(size)
    parity = (idx[:, None] + idx[None, :]) % 2
    for p in (0, 1):
        flip = (parity == p) & (neighbour_sum(s) == 0)
        s = torch.where(flip, -s, s)
    return s


def initial_states(n: int, size: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    prob = low + (high - low) * torch.rand(n, 1, 1, generator=gen)
    return torch.where(torch.rand(n, size, size, generator=gen) < prob, 1.0, -1.0)


@dataclass
class Data:
    train: Tensor  # (n_train, 1 + T_train, L, L)
    test: Tensor  # (n_test, ensemble, 1 + T, L, L)
    dynamics: str


def simulate(
    x0: Tensor, steps: int, dynamics: str, temperature: float, gen: torch.Generator
) -> Tensor:
    """``(N, L, L)`` -> ``(N, 1 + steps, L, L)``."""
    states = [x0]
    s = x0
    for _ in range(steps):
        s = kawasaki_sweep(s, temperature, gen) if dynamics == "kawasaki" else q2r_step(s)
        states.append(s)
    return torch.stack(states, dim=1)


def make_data(
    dynamics: str,
    size: int,
    horizon: int,
    n_train: int,
    n_test: int,
    ensemble: int,
    seed: int = 1234,
) -> Data:
    gen = torch.Generator().manual_seed(seed)
    low, high = (0.1, 0.9) if dynamics == "kawasaki" else (0.05, 0.95)
    train = simulate(initial_states(n_train, size, low, high, gen), 10, dynamics, 2.0, gen)
    starts = initial_states(n_test, size, low, high, gen)
    if dynamics == "q2r":
        ensemble = 1  # deterministic: every realisation is the same
    reps = starts.repeat_interleave(ensemble, dim=0)
    test = simulate(reps, horizon, dynamics, 2.0, gen)
    return Data(train, test.reshape(n_test, ensemble, *test.shape[1:]), dynamics)


# --- models ------------------------------------------------------------------------------------


class LatticeStep(nn.Module):
    """A small circular-padded CNN: lattice ``(B, 1, L, L)`` in [-1, 1] -> next lattice (tanh).

    With ``parity=True`` a fixed checkerboard channel is appended to the input, so the translation-
    invariant convolutions can tell the two sublattices apart (Q2R updates them differently).
    """

    def __init__(self, hidden: int = 16, parity: bool = False) -> None:
        super().__init__()
        self.parity = parity
        c_in = 2 if parity else 1
        self.net = nn.Sequential(
            nn.Conv2d(c_in, hidden, 3, padding=1, padding_mode="circular"),
            nn.Tanh(),
            nn.Conv2d(hidden, hidden, 3, padding=1, padding_mode="circular"),
            nn.Tanh(),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, s: Tensor) -> Tensor:
        x = s
        if self.parity:
            size = s.shape[-1]
            idx = torch.arange(size, device=s.device)
            board = ((idx[:, None] + idx[None, :]) % 2).to(s.dtype) * 2 - 1
            x = torch.cat([s, board.expand(s.shape[0], 1, size, size)], dim=1)
        return torch.tanh(self.net(x) + 2.0 * s)


class EvenConvEmbedding(nn.Module):
    """g: a 3x3 conv, an even activation (square), a 1x1 conv and the global mean:
    ``(N, 1, L, L) -> (N,)``. The conv's bias keeps g from being forced even in the spins."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, hidden, 3, padding=1, padding_mode="circular")
        self.head = nn.Conv2d(hidden, 1, 1)

    def forward(self, s: Tensor) -> Tensor:
        out: Tensor = self.head(self.conv(s).pow(2)).mean(dim=(1, 2, 3))
        return out


def mean_spin(s: Tensor) -> Tensor:
    """The oracle g for Kawasaki dynamics: the magnetisation per site, ``(N, 1, L, L) -> (N,)``."""
    return s.mean(dim=(1, 2, 3))


def bond_energy(s: Tensor) -> Tensor:
    """The oracle g for Q2R: the Ising energy per bond, ``(N, 1, L, L) -> (N,)``."""
    return energy_per_bond(s.squeeze(1))


# --- training ----------------------------------------------------------------------------------


def train_one_step(
    model: nn.Module, data: Data, steps: int, batch: int, gen: torch.Generator, desc: str
) -> None:
    x = data.train[:, :-1].reshape(-1, 1, *data.train.shape[-2:])
    y = data.train[:, 1:].reshape(-1, 1, *data.train.shape[-2:])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(x.shape[0], (batch,), generator=gen)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_rollout(
    net: nn.Module,
    data: Data,
    steps: int,
    batch: int,
    gen: torch.Generator,
    desc: str,
    lr: float = 1e-3,
) -> float:
    """Train ``net`` (x0 -> 10 predicted lattices) on the training trajectories; s per step."""
    x0 = data.train[:, 0].unsqueeze(1)
    target = data.train[:, 1:].unsqueeze(2)  # (n, 10, 1, L, L)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(x0.shape[0], (batch,), generator=gen)
        loss = nn.functional.mse_loss(net(x0[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return (time.perf_counter() - start) / max(steps, 1)


class Projected(nn.Module):
    """Shift every predicted lattice by a constant so its mean spin equals the start's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x0: Tensor) -> Tensor:
        pred: Tensor = self.model(x0)
        shift = x0.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1, 1) - pred.mean(dim=(2, 3, 4), keepdim=True)
        return pred + shift


def noether(
    model: Rollout, g: nn.Module | Callable[[Tensor], Tensor], inner_lr: float
) -> NoetherWrapper:
    """Meta-trained rows: one second-order step on a 3-step inner horizon, per-sample clip 1."""
    return NoetherWrapper(
        model, g, inner_steps=1, inner_lr=inner_lr, inner_horizon=3, max_inner_grad_norm=1.0
    )


def bias_tailoring(
    step: nn.Module, horizon: int, inner_lr: float, g: Callable[[Tensor], Tensor]
) -> NoetherWrapper:
    """Test-time only: 10 steps on the output bias, full horizon, oracle g, no meta-training."""
    return NoetherWrapper(
        Rollout(step, horizon=horizon),
        g,
        inner_steps=10,
        inner_lr=inner_lr,
        adapt="step.net.4.bias",
    )


# --- evaluation --------------------------------------------------------------------------------


def predict(net: nn.Module, data: Data, chunk: int = 16) -> Tensor:
    """Predictions ``(n_test, T, L, L)`` from each test start."""
    x0 = data.test[:, 0, 0].unsqueeze(1)
    outs = []
    with torch.no_grad():
        for i in range(0, x0.shape[0], chunk):
            outs.append(net(x0[i : i + chunk]).squeeze(2))
    return torch.cat(outs)


def metrics(pred: Tensor, data: Data) -> dict[str, float]:
    ens = data.test[:, :, 1:].mean(dim=1)  # (n_test, T, L, L)
    m0 = data.test[:, 0, 0].mean(dim=(-2, -1))  # (n_test,)
    drift = (pred.mean(dim=(-2, -1)) - m0[:, None]).abs()
    return {
        "rmse_ensemble": float((pred - ens).pow(2).mean().sqrt()),
        "m_drift": float(drift.mean()),
        "m_drift_final": float(drift[:, -1].mean()),
        "energy_error": float((energy_per_bond(pred) - energy_per_bond(ens)).abs().mean()),
    }


def embedding_stats(g: nn.Module, data: Data) -> dict[str, float]:
    """Within-trajectory variance fraction of g and its |Pearson r| with M and H on test data."""
    states = data.test[:, 0]  # (n_test, 1 + T, L, L): one realisation per start
    with torch.no_grad():
        values = g(states.reshape(-1, 1, *states.shape[-2:])).reshape(states.shape[:2]).double()
    m = states.mean(dim=(-2, -1)).double()
    h = energy_per_bond(states).double()
    within = (values - values.mean(dim=1, keepdim=True)).pow(2).mean()
    total = (values - values.mean()).pow(2).mean()

    def r(a: Tensor, b: Tensor) -> float:
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))

    return {
        "within": float(within / (total + 1e-30)),
        "r_m": abs(r(values, m)),
        "r_h": abs(r(values, h)),
    }


@dataclass
class Settings:
    one_step: int
    rollout: int
    meta: int
    batch: int
    inner_lr: float
    bias_lr: float


def run_seed(
    seed: int, data: Data, cfg: Settings
) -> tuple[
    dict[str, dict[str, float]], dict[str, float], dict[str, float], dict[str, Tensor], float
]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    parity = data.dynamics == "q2r"
    step = LatticeStep(parity=parity)
    train_one_step(step, data, cfg.one_step, 64, gen, f"seed {seed} vanilla")
    vanilla = Rollout(step, horizon=data.test.shape[2] - 1)
    preds = {"vanilla": predict(vanilla, data)}
    control = Rollout(copy.deepcopy(step), horizon=10)
    train_rollout(control, data, cfg.rollout, cfg.batch, gen, f"seed {seed} control")
    control_eval = Rollout(control.step, horizon=vanilla.horizon)
    preds["control"] = predict(control_eval, data)
    preds["projection"] = predict(Projected(control_eval), data)
    conserved = mean_spin if data.dynamics == "kawasaki" else bond_energy
    preds["noether_oracle_bias"] = predict(
        bias_tailoring(control.step, vanilla.horizon, cfg.bias_lr, conserved), data
    )

    oracle = noether(Rollout(copy.deepcopy(control.step), horizon=10), conserved, cfg.inner_lr)
    train_rollout(oracle, data, cfg.meta, cfg.batch, gen, f"seed {seed} oracle")
    oracle.model.horizon = vanilla.horizon
    preds["noether_oracle"] = predict(oracle, data)

    torch.manual_seed(seed)
    g = EvenConvEmbedding()
    init_stats = embedding_stats(g, data)
    learned = noether(Rollout(copy.deepcopy(control.step), horizon=10), g, cfg.inner_lr)
    seconds = train_rollout(learned, data, cfg.meta, cfg.batch, gen, f"seed {seed} learned")
    learned.model.horizon = vanilla.horizon
    preds["noether_learned"] = predict(learned, data)
    stats = embedding_stats(g, data)
    return {row: metrics(p, data) for row, p in preds.items()}, stats, init_stats, preds, seconds


def plot(data: Data, preds: dict[str, Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizon = data.test.shape[2] - 1
    times = sorted({t for t in (1, 5, 10, horizon) if t <= horizon})
    k = 0
    columns = ["truth", "ensemble mean", *ROWS]
    fig, axes = plt.subplots(len(times) + 1, len(columns), figsize=(2.1 * len(columns), 2.1 * 5.6))
    ens = data.test[k, :, 1:].mean(0)
    for j, name in enumerate(columns):
        for i, t in enumerate(times):
            if name == "truth":
                img = data.test[k, 0, t]
            elif name == "ensemble mean":
                img = ens[t - 1]
            else:
                img = preds[name][k, t - 1]
            ax = axes[i, j]
            ax.imshow(img, vmin=-1, vmax=1, cmap="coolwarm")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"t = {t}")
    for j in range(len(columns)):
        axes[-1, j].axis("off")
    ax = fig.add_subplot(len(times) + 1, 1, len(times) + 1)
    m0 = data.test[:, 0, 0].mean(dim=(-2, -1))
    for name in ROWS:
        drift = (preds[name].mean(dim=(-2, -1)) - m0[:, None]).abs().mean(0)
        ax.plot(range(1, len(drift) + 1), drift, label=name)
    ax.set_xlabel("predicted sweep")
    ax.set_ylabel("|M(pred) - M(x0)| per site")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dynamics", choices=["kawasaki", "q2r"], default="kawasaki")
    parser.add_argument("--size", type=int, default=16, help="lattice side L (a multiple of 4)")
    parser.add_argument("--horizon", type=int, default=20, help="predicted sweeps T")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inner-lr", type=float, default=0.01, help="initial inner step size")
    parser.add_argument(
        "--bias-lr", type=float, default=1e-4, help="step size of the test-time bias row"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.size < 4 or args.size % 4:
        parser.error(f"--size must be a positive multiple of 4, got {args.size}")
    if args.horizon < 1:
        parser.error(f"--horizon must be positive, got {args.horizon}")
    start = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    quick = args.quick
    data = make_data(
        args.dynamics,
        args.size,
        4 if quick else args.horizon,
        n_train=32 if quick else 300,
        n_test=8 if quick else 64,
        ensemble=4 if quick else 32,
    )
    cfg = Settings(
        one_step=30 if quick else 1500,
        rollout=5 if quick else 300,
        meta=3 if quick else 600,
        batch=8,
        inner_lr=args.inner_lr,
        bias_lr=args.bias_lr,
    )
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = []
    for s in seeds:
        results.append(run_seed(s, data, cfg))
    per_row = {row: [r[0][row] for r in results] for row in ROWS + EXTRA_ROWS}

    def mean(row: str, key: str) -> float:
        return statistics.fmean(m[key] for m in per_row[row])

    stats = {k: statistics.fmean(r[1][k] for r in results) for k in ("within", "r_m", "r_h")}
    init = {k: statistics.fmean(r[2][k] for r in results) for k in ("within", "r_m", "r_h")}
    seconds_per_step = statistics.fmean(r[4] for r in results)
    report = {
        "dynamics": args.dynamics,
        "seeds": seeds,
        "rmse_ensemble": {row: mean(row, "rmse_ensemble") for row in ROWS},
        "rmse_ensemble_per_seed": {row: [m["rmse_ensemble"] for m in per_row[row]] for row in ROWS},
        "m_drift": {row: mean(row, "m_drift") for row in ROWS},
        "m_drift_final": {row: mean(row, "m_drift_final") for row in ROWS},
        "energy_error": {row: mean(row, "energy_error") for row in ROWS},
        "g_within_var_frac": stats["within"],
        "g_within_var_frac_init": init["within"],
        "g_abs_pearson_m": stats["r_m"],
        "g_abs_pearson_m_init": init["r_m"],
        "g_abs_pearson_h": stats["r_h"],
        "seconds": time.perf_counter() - start,
    }
    ctrl = report["rmse_ensemble"]["control"]  # type: ignore[index]
    drift_ctrl = report["m_drift"]["control"]  # type: ignore[index]
    print(
        f"\n{args.dynamics}, L = {args.size}, T = {data.test.shape[2] - 1}, {len(seeds)} seed(s); "
        "ratios to control"
    )
    print(
        f"{'row':<20}{'RMSE vs ens. mean':>19}{'ratio':>8}{'M drift':>9}{'ratio':>8}"
        f"{'M drift @T':>11}{'E error':>9}"
    )
    for row in ROWS + EXTRA_ROWS:
        rm = mean(row, "rmse_ensemble")
        per_seed = [m["rmse_ensemble"] for m in per_row[row]]
        std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        dr = mean(row, "m_drift")
        print(
            f"{row:<20}{rm:>11.4f} ± {std:<6.4f}{rm / ctrl:>7.3f}×{dr:>9.4f}"
            f"{dr / drift_ctrl:>7.3f}×{mean(row, 'm_drift_final'):>11.4f}"
            f"{mean(row, 'energy_error'):>9.4f}"
        )  # type: ignore[index]
    print(
        f"learned g: within-trajectory variance fraction {stats['within']:.4f} "
        f"(at init {init['within']:.4f}); |r(g, M)| {stats['r_m']:.3f} (init {init['r_m']:.3f}); "
        f"|r(g, H)| {stats['r_h']:.3f} (init {init['r_h']:.3f})"
    )
    print(f"seconds per meta-training step (learned row): {seconds_per_step:.3f}")
    if args.plot is not None:
        plot(data, results[0][3], args.plot)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    print(f"done in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
