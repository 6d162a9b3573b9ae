"""A newcomer's own system: a learned vector field of a double-well (Duffing) oscillator,
tailored with Noether networks the way docs/learning-g.md tells a new user to.

System: H = p^2/2 - q^2/2 + q^4/4, dq/dt = p, dp/dt = q - q^3. Training trajectories start
with energies in the band [-0.2, 0.3] (inside the two wells and just above the barrier at 0),
integrated by ``solve_ivp`` (rtol 1e-9), observed every 0.1 for 60 steps with observation noise
sigma 0.02. 20 % of them are held out for validation; the field, the fitted g and the energy's
standardisation use only the other 80 %. Test: fresh trajectories from the same band ("in
range") and from H in [0.5, 1.0] ("out of range"), clean.

Model: an MLP vector field 2-64-64-2 (tanh), trained by full-batch Adam on one-step RK4
predictions of the noisy observations, a fixed number of steps set here up front.

Tailoring is WHOLE-ROLLOUT, as the README's one line does it: the wrapper wraps the 30-step RK4
``Rollout`` of the field, the inner loss is the anchor loss |g(x0) - g(x~_t)|^2 along that
rollout, each test sequence gets its own adapted field weights, and the prediction is the
rollout of the adapted field. For each g (the true energy, standardised; an MLP g from
``fit_conserved`` with its default convergence rule): the untuned scale-free Polyak step at its
default (gamma = 1, k = 1), and ``tune(..., inner_steps=(1, 2), step_rules=("fixed",
"polyak"))`` (default step grids) on 30-step windows of the held-out training trajectories (the
test's horizon, so the tailoring sees the same rollout length), whose starts are denoised
through the plain field (``estimate_starts``), scored against the noisy observations, "off"
always a candidate.

Metric: RMSE of 30-step RK4 rollouts from the clean test starts against the clean truth, per
test trajectory; ratio to the plain field per seed (RMSE over the seed's test trajectories),
then the mean over seeds; ``improved``: test trajectories (all seeds) whose RMSE is below the
plain field's. Each seed draws its own data, field and g.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from noether_experiments import protocol
from noether_wrap import (
    NoetherWrapper,
    Rollout,
    TailoringDoesNotHelp,
    TuningWarning,
    fit_conserved,
    tune,
)
from noether_wrap.embeddings import MLPEmbedding, Standardized
from noether_wrap.validation import estimate_starts, window_targets

DT, NOISE, HORIZON = 0.1, 0.02, 30
BAND_IN, BAND_OUT = (-0.2, 0.3), (0.5, 1.0)
VAL_SHARE, VAL_WINDOW, VAL_STRIDE = 0.2, HORIZON, 10
ROWS = ("plain", "energy_polyak_default", "energy_tuned", "fitted_polyak_default", "fitted_tuned")
RANGES = ("in_range", "out_of_range")


@dataclass(frozen=True)
class Sizes:
    train: int  # training trajectories (fit + validation)
    train_steps: int  # observed steps per training trajectory
    test: int  # test trajectories per range
    model_steps: int  # Adam steps for the field
    g_max_steps: int  # fit_conserved's cap (its default rule stops earlier when converged)
    #: tune's step grids; None: the library's defaults (7 fixed steps, 4 Polyak fractions)
    candidates: dict[str, tuple[float, ...]] | None = None


FULL = Sizes(train=40, train_steps=60, test=30, model_steps=1000, g_max_steps=20_000)
QUICK = Sizes(
    train=15,
    train_steps=50,
    test=6,
    model_steps=150,
    g_max_steps=300,
    candidates={"fixed": (0.01, 0.1, 1.0), "polyak": (0.25, 1.0)},
)


def energy(x: Tensor) -> Tensor:
    """H for states ``(..., 2)``."""
    q, p = x[..., 0], x[..., 1]
    return 0.5 * p**2 - 0.5 * q**2 + 0.25 * q**4


class Energy(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return energy(x)


def _dynamics(_: float, y: np.ndarray) -> np.ndarray:
    q, p = y
    return np.array([p, q - q**3])


def sample_starts(rng: np.random.Generator, n: int, band: tuple[float, float]) -> np.ndarray:
    """``n`` states with H in ``band``, uniform in phase space (rejection from a box)."""
    out: list[np.ndarray] = []
    while len(out) < n:
        x = rng.uniform([-1.8, -1.7], [1.8, 1.7], size=(4096, 2))
        h = 0.5 * x[:, 1] ** 2 - 0.5 * x[:, 0] ** 2 + 0.25 * x[:, 0] ** 4
        out.extend(x[(h >= band[0]) & (h <= band[1])])
    return np.stack(out[:n])


def integrate(starts: np.ndarray, steps: int) -> Tensor:
    """Clean trajectories ``(n, steps + 1, 2)`` observed every ``DT``."""
    from scipy.integrate import solve_ivp

    t_eval = np.arange(steps + 1) * DT
    paths = [
        solve_ivp(_dynamics, (0.0, t_eval[-1]), y0, t_eval=t_eval, rtol=1e-9, atol=1e-11).y.T
        for y0 in starts
    ]
    return torch.tensor(np.stack(paths), dtype=torch.float32)


@dataclass
class Data:
    fit: Tensor  # noisy, the 80 % everything is fitted on
    val: Tensor  # noisy, the 20 % held out for the tuning
    test: dict[str, Tensor]  # clean, per range


def make_data(seed: int, sizes: Sizes) -> Data:
    rng = np.random.default_rng(seed)
    clean = integrate(sample_starts(rng, sizes.train, BAND_IN), sizes.train_steps)
    noise = torch.tensor(rng.normal(0.0, NOISE, size=tuple(clean.shape)), dtype=torch.float32)
    noisy = clean + noise
    n_val = max(2, round(VAL_SHARE * sizes.train))
    test = {
        "in_range": integrate(sample_starts(rng, sizes.test, BAND_IN), HORIZON),
        "out_of_range": integrate(sample_starts(rng, sizes.test, BAND_OUT), HORIZON),
    }
    return Data(fit=noisy[n_val:], val=noisy[:n_val], test=test)


def make_field(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    )


def train_field(field: nn.Module, noisy: Tensor, steps: int) -> float:
    """Full-batch Adam (lr 3e-3, cosine to 0) on one-step RK4 predictions of the noisy
    observations; returns the last training MSE."""
    x, y = noisy[:, :-1].reshape(-1, 2), noisy[:, 1:].reshape(-1, 2)
    step = Rollout(field, 1, dt=DT, method="rk4")
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        loss = nn.functional.mse_loss(step(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return loss.item()


def tailored_rollout(field: nn.Module, g: nn.Module, **options: Any) -> NoetherWrapper:
    """The 30-step RK4 rollout of the field, tailored per sequence on that rollout."""
    return NoetherWrapper(
        Rollout(field, HORIZON, dt=DT, method="rk4"), g, learn_inner_lr=False, **options
    )


def predict(net: nn.Module, starts: Tensor) -> Tensor:
    """``(n, 2) -> (n, HORIZON, 2)`` without autograd (a wrapper still tailors)."""
    with torch.no_grad():
        out: Tensor = net(starts)
    return out


def rmse_per_sequence(pred: Tensor, truth: Tensor) -> np.ndarray:
    return ((pred - truth) ** 2).mean(dim=(1, 2)).sqrt().double().numpy()


def pearson_abs(a: Tensor, b: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].abs())


def tuned(
    net: NoetherWrapper, val: tuple[Tensor, Tensor], candidates: dict[str, tuple[float, ...]] | None
) -> tuple[NoetherWrapper, dict[str, Any]]:
    """``tune`` on the validation windows; what it chose and what it warned."""
    starts, targets = val
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tune(
            net,
            starts,
            targets,
            inner_steps=(1, 2),
            step_rules=("fixed", "polyak"),
            candidates=candidates,
        )
    config = result.config
    best = min(result.losses, key=lambda c: result.losses[c])
    record = {
        "chosen": "off" if config is None else config.label(),
        "off": config is None,
        "inner_steps": result.inner_steps,
        "step_rule": None if config is None else config.step_rule,
        "step": result.best,
        "warned_does_not_help": any(issubclass(w.category, TailoringDoesNotHelp) for w in caught),
        "warnings": [
            f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
            for w in caught
            if issubclass(w.category, TuningWarning)
        ],
        "val_untailored": result.untailored,
        "val_best_candidate": best.label(),
        "val_best_candidate_loss": result.losses[best],
        "val_best_candidate_se": result.stderr[best],
        "val_sequences": result.sequences,
    }
    return net, record


def run_seed(seed: int, sizes: Sizes) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = make_data(seed, sizes)
    field = make_field(seed)
    train_mse = train_field(field, data.fit, sizes.model_steps)
    t_model = time.perf_counter() - t0

    # the two g's, fitted / standardised on the 80 % only
    g_energy = Standardized.fit(Energy(), data.fit)
    torch.manual_seed(seed)
    t1 = time.perf_counter()
    fit = fit_conserved(
        MLPEmbedding(2, hidden=32),
        data.fit,
        seed=seed,
        progress=False,
        max_steps=sizes.g_max_steps,
    )
    t_g = time.perf_counter() - t1
    g_fitted = fit.embedding
    g_info: dict[str, Any] = {"ratio": float(fit.ratios[0]), "seconds": t_g}
    with torch.no_grad():
        for name, paths in data.test.items():
            states = paths.reshape(-1, 2)
            g_info[f"abs_r_{name}"] = pearson_abs(g_fitted(states), energy(states))
        # "which well": |r| with sign(q) on the in-range test states inside a well (H < 0)
        states = data.test["in_range"].reshape(-1, 2)
        inside = energy(states) < 0
        if int(inside.sum()) > 2:
            g_info["abs_r_sign_q_in_wells"] = pearson_abs(
                g_fitted(states[inside]), torch.sign(states[inside, 0])
            )

    # validation windows of the held-out training trajectories, starts denoised through the field
    starts, targets = window_targets(data.val, VAL_WINDOW, VAL_STRIDE)
    observed = torch.cat([starts.unsqueeze(1), targets[:, :2]], dim=1)
    starts = estimate_starts(Rollout(field, 2, dt=DT, method="rk4"), observed, frames=3)
    val = (starts, targets)

    nets: dict[str, nn.Module] = {"plain": Rollout(field, HORIZON, dt=DT, method="rk4")}
    chosen: dict[str, Any] = {}
    for gname, g in (("energy", g_energy), ("fitted", g_fitted)):
        nets[f"{gname}_polyak_default"] = tailored_rollout(field, g, step_rule="polyak")
        net, record = tuned(tailored_rollout(field, g), val, sizes.candidates)
        nets[f"{gname}_tuned"] = net
        chosen[f"{gname}_tuned"] = record
    default = nets["energy_polyak_default"]
    assert isinstance(default, NoetherWrapper)
    assert default.inner_steps == 1 and default.step_rule == "polyak"
    assert math.isclose(default.inner_lr, 1.0)

    out: dict[str, Any] = {
        "seed": seed,
        "train_mse": train_mse,
        "g": g_info,
        "chosen": chosen,
        "rmse": {},
        "equal_to_plain": {},
    }
    for rng_name, paths in data.test.items():
        truth = paths[:, 1:]
        preds = {row: predict(net, paths[:, 0]) for row, net in nets.items()}
        out["rmse"][rng_name] = {row: rmse_per_sequence(p, truth) for row, p in preds.items()}
        out["equal_to_plain"][rng_name] = {
            row: bool(torch.equal(p, preds["plain"])) for row, p in preds.items()
        }
    out["seconds"] = {"model": t_model, "g": t_g, "total": time.perf_counter() - t0}
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        rows[row] = {}
        for rng_name in RANGES:
            errors, ratios, improved, n = [], [], 0, 0
            for r in runs:
                e, base = r["rmse"][rng_name][row], r["rmse"][rng_name]["plain"]
                seed_rmse = math.sqrt(float(np.mean(e**2)))
                errors.append(seed_rmse)
                ratios.append(seed_rmse / math.sqrt(float(np.mean(base**2))))
                improved += int((e < base).sum())
                n += e.size
            rows[row][rng_name] = {
                "error": statistics.fmean(errors),
                "ratio": statistics.fmean(ratios),
                "improved": improved,
                "n": n,
                "per_seed_ratio": ratios,
                "per_seed_error": errors,
                "equal_to_plain": [r["equal_to_plain"][rng_name][row] for r in runs],
            }
    return rows


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['metric']}\nseeds {report['seeds']}; ratio = mean over seeds of the seed's "
        "RMSE ratio to plain; improved = test trajectories below plain"
    )
    print(f"{'row':<24} {'in range':>28} {'out of range':>28}")
    for row, ranges in report["rows"].items():
        cells = []
        for rng_name in RANGES:
            c = ranges[rng_name]
            cells.append(
                f"{c['error']:.4f} {c['ratio']:.3f}x {c['improved']:>3}/{c['n']:<3}".rjust(28)
            )
        print(f"{row:<24} {cells[0]} {cells[1]}")
    print("\nchosen by tune on validation windows (per seed):")
    for row, picks in report["chosen"].items():
        text = ", ".join(
            p["chosen"]
            + (" (warned: does not help)" if p["warned_does_not_help"] else "")
            + (
                " (warned: edge of grid)"
                if any("edge" in w or "smallest" in w or "largest" in w for w in p["warnings"])
                else ""
            )
            for p in picks
        )
        print(f"  {row:<14} {text}")
    print(
        f"tuned configurations 'off': {report['tuned_off']['off']} of {report['tuned_off']['of']}"
    )
    g = report["fitted_g"]
    print(
        f"fitted g: |r(g, H)| in range {g['abs_r_in_range']}, out of range "
        f"{g['abs_r_out_of_range']}, |r(g, sign q)| inside the wells {g['abs_r_sign_q_in_wells']}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds, each its own data, field and g (2; --quick 1)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (<= 20 s)")
    parser.add_argument("--json", type=Path, default=Path("docs/results/newcomer.json"))
    protocol.add_threads_argument(parser)
    args = parser.parse_args(argv)
    protocol.set_threads(args.threads)
    start = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    if args.seeds is None:
        args.seeds = 1 if args.quick else 2
    runs = []
    for seed in range(args.seeds):
        runs.append(run_seed(seed, sizes))
        print(f"seed {seed}: {runs[-1]['seconds']}", flush=True)
    rows = summarise(runs)
    chosen = {row: [r["chosen"][row] for r in runs] for row in ("energy_tuned", "fitted_tuned")}
    picks = [p for ps in chosen.values() for p in ps]

    def per_seed(key: str) -> list[float | None]:
        return [r["g"].get(key) for r in runs]

    def mean(key: str) -> float | None:
        values = per_seed(key)
        return None if None in values else statistics.fmean(values)  # type: ignore[arg-type]

    report: dict[str, Any] = {
        "example": "newcomer",
        "system": "double well H = p^2/2 - q^2/2 + q^4/4; train/test in range H in "
        f"{list(BAND_IN)}, out of range H in {list(BAND_OUT)}; noise sigma {NOISE}, dt {DT}",
        "tailoring": f"whole rollout: NoetherWrapper(Rollout(field, {HORIZON}, dt={DT}, "
        "method='rk4'), g), anchor loss, per-sequence weights",
        "metric": f"rollout RMSE over {HORIZON} RK4 steps from the clean test starts vs the "
        "clean truth",
        "seeds": list(range(args.seeds)),
        "quick": args.quick,
        "sizes": sizes.__dict__,
        "rows": rows,
        "chosen": chosen,
        "tuned_off": {"off": sum(p["off"] for p in picks), "of": len(picks)},
        "fitted_g": {
            "abs_r_in_range": mean("abs_r_in_range"),
            "abs_r_out_of_range": mean("abs_r_out_of_range"),
            "abs_r_sign_q_in_wells": mean("abs_r_sign_q_in_wells"),
            "per_seed": [r["g"] for r in runs],
        },
        "train_mse": [r["train_mse"] for r in runs],
        "seconds": time.perf_counter() - start,
        "seconds_per_seed": [r["seconds"] for r in runs],
        "threads": args.threads,
        "command": [Path(sys.executable).name, *sys.argv],
    }
    report["provenance"] = protocol.provenance(report["seconds"])
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(protocol.json_text(report) + "\n")
    print(f"done in {report['seconds']:.1f} s -> {args.json}")
    return report


if __name__ == "__main__":
    main()
