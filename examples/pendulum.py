"""Ideal pendulum: Noether tailoring of a learned vector field, the paper's physics result.

    python examples/pendulum.py                 # 3 model seeds, about 2 minutes on 2 cores
    python examples/pendulum.py --quick         # a smoke run for tests
    python examples/pendulum.py --sweep --plot runs/pendulum.png
    python examples/pendulum.py --split extrapolate

Data (the standard HNN ideal pendulum, generated here): H(q, p) = 3 (1 - cos q) + p^2, so
dq/dt = 2p and dp/dt = -3 sin q; 50 trajectories on t in [0, 3] with 45 points, starting at radius
U[1.3, 2.3] in phase space; observation noise 0.1; targets are the clean derivatives. A 2-200-200-2
tanh MLP learns the vector field (``vanilla``). The Noether rows tailor the field PER STATE: for a
state x the inner loss compares g(x) with g(one RK4 step of the field from x), one SGD step on the
field's weights gives the tailored field f~(x), and the rollout evaluates f~ wherever RK4 needs the
field. In library terms::

    net = NoetherWrapper(Rollout(field, 1, dt=dt, method="rk4"), g, inner_lr=0.1,
                         learn_inner_lr=False, predict=lambda m, x: m.step(x))
    tailored_rollout = Rollout(net, horizon=44, dt=dt, method="rk4")

Rows: vanilla; control (vanilla fine-tuned as long as the Noether rows, without tailoring);
noether_learned (an MLP g learned end to end); noether_formula (a FeatureLibrary fitted in closed
form on the noisy training trajectories); noether_oracle (g = the true energy).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap.embeddings import FeatureLibrary, MLPEmbedding

TERMS = ["q", "p", "q^2", "p^2", "cos(q)", "sin(q)", "q*p"]
ROWS = ["vanilla", "control", "noether_learned", "noether_formula", "noether_oracle"]
BASELINE_ROWS = ["projection_formula", "projection_oracle"]
NOETHER_ROWS = ROWS[2:]
SWEEP_LRS = [0.0, 0.01, 0.0316, 0.1, 0.178, 0.316]
T_END, POINTS, NOISE = 3.0, 45, 0.1


def field_true(x: Tensor) -> Tensor:
    """The ideal pendulum's vector field, ``(N, 2) -> (N, 2)``."""
    return torch.stack([2.0 * x[:, 1], -3.0 * torch.sin(x[:, 0])], dim=-1)


def energy(x: Tensor) -> Tensor:
    """``H = 3 (1 - cos q) + p^2`` for states ``(..., 2)``."""
    return 3.0 * (1.0 - torch.cos(x[..., 0])) + x[..., 1] ** 2


@dataclass
class Data:
    clean: Tensor  # (50, 45, 2) float64
    noisy: Tensor  # (50, 45, 2) float64
    train: Tensor  # indices of training trajectories
    test: Tensor  # indices of test trajectories
    dt: float


def make_data(data_seed: int, split: str, trajectories: int = 50, substeps: int = 100) -> Data:
    """Integrate the pendulum with fine RK4 and add observation noise; split whole trajectories."""
    gen = torch.Generator().manual_seed(data_seed)
    radius = 1.3 + torch.rand(trajectories, generator=gen, dtype=torch.float64)
    angle = 2 * math.pi * torch.rand(trajectories, generator=gen, dtype=torch.float64)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=-1)
    dt = T_END / (POINTS - 1)
    fine = Rollout(_TrueField(), horizon=substeps, dt=dt / substeps, method="rk4")
    states = [x]
    for _ in range(POINTS - 1):
        x = fine(x)[:, -1]
        states.append(x)
    clean = torch.stack(states, dim=1)
    noisy = clean + NOISE * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    half = trajectories // 2
    if split == "paper":
        order = torch.arange(trajectories)
    else:  # extrapolate: train on the lowest energies, test on the highest
        order = torch.argsort(energy(clean[:, 0]))
    return Data(clean, noisy, order[:half], order[half:], dt)


class _TrueField(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return field_true(x)


def make_field(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 2)
    )


def fit(module: nn.Module, x: Tensor, target: Tensor, steps: int, desc: str) -> float:
    """Full-batch Adam (lr 1e-3, weight decay 1e-4) on the derivative MSE; seconds per step."""
    opt = torch.optim.Adam(module.parameters(), lr=1e-3, weight_decay=1e-4)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        loss = nn.functional.mse_loss(module(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / max(steps, 1)


def _field_of(rollout: Rollout, x: Tensor) -> Tensor:
    return rollout.step(x)


def tailored_field(
    field: nn.Module, g: nn.Module, dt: float, inner_lr: float, learn: bool, inner_steps: int
) -> NoetherWrapper:
    """The field tailored per state on its own one-step RK4 rollout; returns f~(x)."""
    return NoetherWrapper(
        Rollout(field, 1, dt=dt, method="rk4"),
        g,
        inner_steps=inner_steps,
        inner_lr=inner_lr,
        learn_inner_lr=learn,
        predict=_field_of,
    )


def rollout_error(field: nn.Module, data: Data) -> tuple[Tensor, Tensor]:
    """Roll ``field`` out with RK4 from each CLEAN test start; returns predictions ``(n, 44, 2)``
    and squared errors against the clean truth."""
    truth = data.clean[data.test].float()
    with torch.no_grad():
        pred = Rollout(field, POINTS - 1, dt=data.dt, method="rk4")(truth[:, 0])
    return pred, (pred - truth[:, 1:]) ** 2


def projected_rollout_error(field: nn.Module, g: nn.Module, data: Data) -> tuple[Tensor, Tensor]:
    """The expert's baseline: after every RK4 step, three Newton steps put the state back on the
    level set g(x) = g(x0) of a known conserved quantity."""
    truth = data.clean[data.test].float()
    step = Rollout(field, 1, dt=data.dt, method="rk4")
    x = truth[:, 0]
    with torch.no_grad():
        level = g(x)
    states = []
    for _ in range(POINTS - 1):
        with torch.no_grad():
            x = step(x)[:, 0]
        for _ in range(3):
            x = x.detach().requires_grad_()
            value = g(x)
            (grad,) = torch.autograd.grad(value.sum(), x)
            x = x - ((value - level) / grad.pow(2).sum(-1).clamp_min(1e-8)).unsqueeze(-1) * grad
        states.append(x.detach())
    pred = torch.stack(states, dim=1)
    return pred, (pred - truth[:, 1:]) ** 2


def energy_range_mask(data: Data) -> Tensor:
    """True for test trajectories whose energy lies inside the training energy range."""
    train_e = energy(data.clean[data.train, 0])
    test_e = energy(data.clean[data.test, 0])
    return (test_e >= train_e.min()) & (test_e <= train_e.max())


def fit_formula(data: Data) -> FeatureLibrary:
    lib = FeatureLibrary(TERMS, variables=["q", "p"]).fit_conserved(data.noisy[data.train], lag=1)
    coef = lib.coefficients(scale_to="p^2")
    return FeatureLibrary(
        TERMS, variables=["q", "p"], weights=torch.tensor([coef[t] for t in TERMS])
    )


def oracle() -> FeatureLibrary:
    return FeatureLibrary(
        TERMS, variables=["q", "p"], weights=torch.tensor([0.0, 0.0, 0.0, 1.0, -3.0, 0.0, 0.0])
    )


@dataclass
class Settings:
    baseline_steps: int
    meta_epochs: int
    inner_steps: int
    inner_lr: float
    learn_inner_lr: bool
    baselines: bool = False


def run_seed(
    seed: int,
    data: Data,
    formula: FeatureLibrary,
    cfg: Settings,
    lrs: dict[str, float],
    cache: dict[int, tuple[nn.Module, dict[str, dict[str, Any]]]],
) -> dict[str, dict[str, Any]]:
    """Train every row for one model seed; per row: predictions, squared errors, step size.

    ``cache`` keeps each seed's vanilla field and plain rows, so a sweep trains them once.
    """
    x = data.noisy[data.train].reshape(-1, 2).float()
    target = field_true(data.clean[data.train].reshape(-1, 2)).float()
    if seed not in cache:
        base = make_field(seed)
        fit(base, x, target, cfg.baseline_steps, f"seed {seed} vanilla")
        plain: dict[str, dict[str, Any]] = {}
        pred, err = rollout_error(base, data)
        plain["vanilla"] = {"pred": pred, "err": err, "inner_lr": 0.0}
        control = copy.deepcopy(base)
        fit(control, x, target, cfg.meta_epochs, f"seed {seed} control")
        pred, err = rollout_error(control, data)
        plain["control"] = {"pred": pred, "err": err, "inner_lr": 0.0}
        if cfg.baselines:
            for row, g in (("projection_formula", formula), ("projection_oracle", oracle())):
                pred, err = projected_rollout_error(base, g, data)
                plain[row] = {"pred": pred, "err": err, "inner_lr": 0.0}
        cache[seed] = (base, plain)
    base, plain = cache[seed]
    out = dict(plain)
    embeddings = {
        "noether_learned": lambda: MLPEmbedding(2, hidden=64),
        "noether_formula": lambda: copy.deepcopy(formula),
        "noether_oracle": oracle,
    }
    for row, make_g in embeddings.items():
        lr = lrs[row]
        if lr == 0.0:  # no tailoring at all: the control row
            out[row] = dict(out["control"])
            continue
        torch.manual_seed(seed)
        net = tailored_field(
            copy.deepcopy(base), make_g(), data.dt, lr, cfg.learn_inner_lr, cfg.inner_steps
        )
        seconds = fit(net, x, target, cfg.meta_epochs, f"seed {seed} {row}")
        pred, err = rollout_error(net, data)
        out[row] = {"pred": pred, "err": err, "inner_lr": net.inner_lr, "seconds": seconds}
    return out


def summarise(per_seed: list[dict[str, dict[str, Any]]], data: Data) -> dict[str, Any]:
    """Mean over seeds of every metric, per row; None where a subset has no trajectory."""
    inside = energy_range_mask(data)
    e0 = energy(data.clean[data.test, 0]).float()

    def rmse(err: Tensor, mask: Tensor | None = None) -> float | None:
        sel = err if mask is None else err[mask]
        return float(sel.mean().sqrt()) if sel.numel() else None

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if len(known) == len(values) else None

    keys = (
        "rmse",
        "rmse_per_seed",
        "rmse_in_range",
        "rmse_out_of_range",
        "energy_drift",
        "inner_lr",
    )
    result: dict[str, Any] = {k: {} for k in keys}
    for row in [r for r in ROWS + BASELINE_ROWS if r in per_seed[0]]:
        runs = [seed_out[row] for seed_out in per_seed]
        alls = [rmse(r["err"]) for r in runs]
        result["rmse"][row] = mean(alls)
        result["rmse_per_seed"][row] = alls
        result["rmse_in_range"][row] = mean([rmse(r["err"], inside) for r in runs])
        result["rmse_out_of_range"][row] = mean([rmse(r["err"], ~inside) for r in runs])
        drifts = [
            float(((energy(r["pred"]) - e0[:, None]).abs() / e0[:, None]).mean()) for r in runs
        ]
        result["energy_drift"][row] = statistics.fmean(drifts)
        result["inner_lr"][row] = statistics.fmean(float(r["inner_lr"]) for r in runs)
    result["n_test_out_of_range"] = int((~inside).sum())
    return result


def ratio(values: dict[str, float | None], row: str) -> float | None:
    """``values[row] / values["vanilla"]``, None where either is missing."""
    value, base = values[row], values["vanilla"]
    return None if value is None or base is None else value / base


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def print_table(summary: dict[str, Any], seeds: list[int]) -> None:
    print(
        f"\nrollout RMSE over {len(seeds)} seed(s); ratios to vanilla; "
        f"{summary['n_test_out_of_range']} test trajectories outside the training energy range"
    )
    print(
        f"{'row':<19}{'RMSE mean ± std':>20}{'ratio':>8}{'in-range':>10}{'out-range':>11}"
        f"{'E drift':>9}{'step':>8}"
    )
    for row in [r for r in ROWS + BASELINE_ROWS if r in summary["rmse"]]:
        vals = summary["rmse_per_seed"][row]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        cells = []
        for key, width in (("rmse", 7), ("rmse_in_range", 9), ("rmse_out_of_range", 10)):
            r = ratio(summary[key], row)
            cells.append(f"{'—':>{width}} " if r is None else f"{r:>{width}.3f}×")
        print(
            f"{row:<19}{summary['rmse'][row]:>11.4f} ± {std:<7.4f}{''.join(cells)}"
            f"{summary['energy_drift'][row]:>9.3f}{summary['inner_lr'][row]:>8.3g}"
        )


def plot_phase(per_seed: list[dict[str, dict[str, Any]]], data: Data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = data.clean[data.test].float()
    inside = energy_range_mask(data)
    fig, axes = plt.subplots(2, len(ROWS), figsize=(4 * len(ROWS), 7.5))
    t = data.dt * torch.arange(POINTS)
    for j, row in enumerate(ROWS):
        pred = per_seed[0][row]["pred"]
        assert isinstance(pred, Tensor)
        ax = axes[0, j]
        for i in range(truth.shape[0]):
            color = "tab:blue" if inside[i] else "tab:red"
            ax.plot(truth[i, :, 0], truth[i, :, 1], color="0.8", lw=2)
            ax.plot(pred[i, :, 0], pred[i, :, 1], color=color, lw=0.8)
        ax.set_title(row)
        ax.set_xlabel("q")
        ax.set_ylabel("p")
        ax = axes[1, j]
        full = torch.cat([truth[:, :1], pred], dim=1)
        for i in range(truth.shape[0]):
            color = "tab:blue" if inside[i] else "tab:red"
            ax.plot(t, energy(full[i]), color=color, lw=0.8)
        ax.set_xlabel("t")
        ax.set_ylabel("H along the rollout")
    fig.suptitle(
        "test rollouts (grey: truth; blue: energy inside the training range; red: outside)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_sweep(sweep: dict[str, dict[str, dict[str, float | None]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, part in zip(axes, ("in_range", "out_of_range")):
        for row in NOETHER_ROWS:
            xs = [float(lr) for lr in sweep]
            ys = [float("nan") if (v := sweep[lr][row][part]) is None else v for lr in sweep]
            ax.plot([max(v, 3e-3) for v in xs], ys, marker="o", label=row)
        ax.axhline(1.0, color="0.5", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner step size (0 plotted at 3e-3: no tailoring = control)")
        ax.set_title(f"test trajectories {part.replace('_', ' ')}")
    axes[0].set_ylabel("rollout RMSE / vanilla")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (< 30 s)")
    parser.add_argument("--seeds", type=int, default=None, help="number of model seeds (3)")
    parser.add_argument("--seed", type=int, default=0, help="first model seed")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--learn-inner-lr", action="store_true")
    parser.add_argument("--split", choices=["paper", "extrapolate"], default="paper")
    parser.add_argument("--sweep", action="store_true", help="Noether rows over step sizes")
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="add the expert's baseline: vanilla rollouts projected onto g(x) = g(x0) each step",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.inner_lr <= 0:
        parser.error(f"--inner-lr must be positive, got {args.inner_lr}")
    start = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = list(range(args.seed, args.seed + n_seeds))
    cfg = Settings(
        baseline_steps=100 if args.quick else 2000,
        meta_epochs=5 if args.quick else 100,
        inner_steps=args.inner_steps,
        inner_lr=args.inner_lr,
        learn_inner_lr=args.learn_inner_lr,
        baselines=args.baselines,
    )
    data = make_data(args.data_seed, args.split)
    formula = fit_formula(data)
    text = formula.formula(scale_to="p^2")
    print(f"fit_conserved on the noisy training trajectories (lag-1 scatter): g = {text}")

    lrs = {row: args.inner_lr for row in NOETHER_ROWS}
    cache: dict[int, tuple[nn.Module, dict[str, dict[str, Any]]]] = {}
    per_seed = [run_seed(s, data, formula, cfg, lrs, cache) for s in seeds]
    summary = summarise(per_seed, data)
    print_table(summary, seeds)
    meta_seconds = [r["noether_oracle"].get("seconds") for r in per_seed]
    if all(isinstance(v, float) for v in meta_seconds):
        mean_seconds = statistics.fmean(float(v) for v in meta_seconds)
        print(f"seconds per meta-training step (oracle row): {mean_seconds:.3f}")

    sweep: dict[str, dict[str, dict[str, float | None]]] = {}
    if args.sweep:
        for lr in tqdm(SWEEP_LRS, desc="sweep"):
            runs = [
                run_seed(s, data, formula, cfg, dict.fromkeys(NOETHER_ROWS, lr), cache)
                for s in seeds
            ]
            part = summarise(runs, data)
            sweep[str(lr)] = {
                row: {
                    key: ratio(part[f"rmse{suffix}"], row)
                    for key, suffix in (
                        ("all", ""),
                        ("in_range", "_in_range"),
                        ("out_of_range", "_out_of_range"),
                    )
                }
                for row in NOETHER_ROWS
            }
        print("\nsweep: RMSE ratio to vanilla (all / in-range / out-of-range)")
        for lr, rows in sweep.items():
            cells = "  ".join(
                f"{row[8:]} " + "/".join(_fmt(v[k]) for k in ("all", "in_range", "out_of_range"))
                for row, v in rows.items()
            )
            print(f"  step {float(lr):<7.4g} {cells}")

    if args.plot is not None:
        plot_phase(per_seed, data, args.plot)
        if sweep:
            plot_sweep(sweep, args.plot.with_name(args.plot.stem + "_sweep.png"))
    coefficients = formula.coefficients(scale_to="p^2")
    report = {
        **{k: summary[k] for k in ("rmse", "rmse_per_seed", "rmse_in_range", "rmse_out_of_range")},
        "n_test_out_of_range": summary["n_test_out_of_range"],
        "energy_drift": summary["energy_drift"],
        "formula": {"text": text, "coefficients": coefficients},
        "inner_lr": summary["inner_lr"],
        "split": args.split,
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        if sweep:
            args.json.with_name(args.json.stem + "_sweep.json").write_text(
                json.dumps(sweep, indent=2)
            )
    print(f"done in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
