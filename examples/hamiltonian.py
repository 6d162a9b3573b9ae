"""Learned vector fields of ideal Hamiltonian systems (HNN's tasks), tailored with Noether
networks, on the evaluation protocol of ``protocol.py``: everything the pendulum and the spring
share. A :class:`System` holds the physics; ``main(system, doc)`` runs an example.

Tailoring is PER STATE: for a state x the inner loss compares g(x) with g(one RK4 step of the
field from x); one SGD step on the field's weights gives the tailored field f~(x), which the RK4
rollout evaluates wherever it needs the field. Every step size is chosen by ``tune_inner_lr`` on
a validation split of the TRAINING trajectories (the 5 with the highest observed start energy,
cut into 35 windows of 10 steps whose starts are denoised through vanilla, scored against the
noisy states), per row and seed, and the
``selected`` row is the row with the lowest validation error, vanilla included (the untailored
field scored on the same trajectories), so tailoring is recommended only where it beats the plain
model on validation. Test-time rows come in both step rules: ``testtime_*`` (a fixed step) and
``polyak_*`` (the scale-free Polyak fraction). Nothing validation scores
is fitted on the validation trajectories: the vanilla field, the formula, the learned g, the
oracle's normalisation, the control's extra steps and every meta-training run use only the other
20 (``--vanilla-data all`` trains vanilla on all 25 as the paper does, and says in the JSON that
its validation scores are then in-sample for vanilla and every row built on it); the test
trajectories only score. Rows: vanilla, control (vanilla trained as many more steps as the meta
rows, no tailoring), testtime_{oracle,formula,learned}, meta_{oracle,formula,learned}
(+ _untailored), meta_learned_frozen (g and the step meta-trained, field frozen),
projection_{oracle,formula} (the expert's baseline: project each RK4 step onto the level set
g(x) = g(x0)).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol  # noqa: E402

from noether_wrap import NoetherWrapper, Rollout, TuneResult, fit_conserved, tune_inner_lr  # noqa: E402
from noether_wrap.embeddings import FeatureLibrary, MLPEmbedding, Standardized  # noqa: E402
from noether_wrap.validation import estimate_starts, window_targets  # noqa: E402

EMBEDDINGS = ("oracle", "formula", "learned")
CANDIDATES = (0.01, 0.0316, 0.1, 0.316, 1.0)
T_END, NOISE = 3.0, 0.1
VALIDATION = 5
#: Validation units: windows of this many steps, one every ``VAL_STRIDE`` observations, along the
#: validation trajectories (45 points and 5 trajectories give 35 windows), each from a start
#: denoised through vanilla (:func:`noether_wrap.validation.estimate_starts`): the test rolls out
#: from clean starts, and a noisy start's error swamps what the rows change.
VAL_WINDOW, VAL_STRIDE = 10, 5


@dataclass(frozen=True)
class System:
    """The physics of one example; everything else is shared."""

    name: str
    #: ``dH/dp, -dH/dq`` for states ``(..., 2)`` (torch), the field the MLP learns.
    field: Callable[[Tensor], Tensor]
    #: ``H`` for states ``(..., 2)``.
    energy: Callable[[Tensor], Tensor]
    #: HNN's radius draw, ``np.random`` in HNN's order.
    radius: Callable[[], float]
    #: Observed points per trajectory on t in [0, 3].
    points: int
    #: The FeatureLibrary terms over ``q, p``; the formula is printed scaled to ``p^2``.
    terms: tuple[str, ...]
    #: The paper's Table 1 figures (rollout RMSE).
    paper: dict[str, float]

    def dynamics(self, _: float, y: np.ndarray) -> np.ndarray:
        """The field in numpy for ``solve_ivp``."""
        return self.field(torch.tensor(y, dtype=torch.float64)).numpy()


@dataclass
class Data:
    system: System
    clean: Tensor  # (50, points, 2) float32
    noisy: Tensor  # (50, points, 2) float32
    train: Tensor  # indices 0-24
    test: Tensor  # indices 25-49
    dt: float

    @property
    def points(self) -> int:
        return self.clean.shape[1]

    @property
    def validation(self) -> Tensor:
        """The 5 training trajectories with the highest observed start energy: every step size
        and the selected row are chosen on their rollouts (the gain is expected above the
        training range, which these come closest to)."""
        h = self.system.energy(self.noisy[self.train, 0])
        return self.train[torch.argsort(h, descending=True)[:VALIDATION]]

    @property
    def fit(self) -> Tensor:
        """The other 20 training trajectories: what everything validation scores is fitted on
        (the field, the formula, the learned g, the oracle's normalisation)."""
        keep = ~torch.isin(self.train, self.validation)
        return self.train[keep]


def make_data(system: System, data_seed: int, sampler: str = "hnn", trajectories: int = 50) -> Data:
    """HNN's sampler, in its random-number order (``--sampler wide``: a uniform start angle):
    ``np.random.seed(data_seed)``; per trajectory ``y0 = rand(2) * 2 - 1``, the radius draw,
    ``y0 = y0 / |y0| * radius``, ``solve_ivp(rtol=1e-10)``, then ``randn * 0.1`` on q, then p."""
    from scipy.integrate import solve_ivp

    np.random.seed(data_seed)
    t_eval = np.linspace(0.0, T_END, system.points)
    clean, noisy = [], []
    for _ in range(trajectories):
        if sampler == "hnn":
            y0 = np.random.rand(2) * 2.0 - 1.0
        else:
            angle = np.random.rand() * 2.0 * np.pi
            y0 = np.array([np.cos(angle), np.sin(angle)])
        radius = system.radius()
        y0 = y0 / np.sqrt((y0**2).sum()) * radius
        sol = solve_ivp(system.dynamics, (0.0, T_END), y0, t_eval=t_eval, rtol=1e-10)
        q, p = sol.y[0], sol.y[1]
        clean.append(np.stack([q, p], -1))
        q = q + np.random.randn(*q.shape) * NOISE
        p = p + np.random.randn(*p.shape) * NOISE
        noisy.append(np.stack([q, p], -1))
    half = trajectories // 2
    return Data(
        system,
        torch.tensor(np.stack(clean), dtype=torch.float32),
        torch.tensor(np.stack(noisy), dtype=torch.float32),
        torch.arange(half),
        torch.arange(half, trajectories),
        T_END / (system.points - 1),
    )


class _Energy(nn.Module):
    def __init__(self, system: System) -> None:
        super().__init__()
        self.system = system

    def forward(self, x: Tensor) -> Tensor:
        return self.system.energy(x)


def make_field(seed: int) -> nn.Sequential:
    """HNN's MLP: orthogonal weights, tanh, no bias on the last layer."""
    torch.manual_seed(seed)
    layers = [
        nn.Linear(2, 200),
        nn.Tanh(),
        nn.Linear(200, 200),
        nn.Tanh(),
        nn.Linear(200, 2, False),
    ]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight)
    return nn.Sequential(*layers)


def fit(params: Any, forward: Callable[[], Tensor], target: Tensor, steps: int, desc: str) -> float:
    """Full-batch Adam (lr 1e-3, weight decay 1e-4) on the derivative MSE; seconds per step."""
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        loss = nn.functional.mse_loss(forward(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / max(steps, 1)


def _field_of(rollout: Rollout, x: Tensor) -> Tensor:
    return rollout.step(x)


def tailored_field(
    field: nn.Module, g: nn.Module, dt: float, lr: float, learn: bool = False
) -> NoetherWrapper:
    """The field tailored per state on its own one-step RK4 rollout; returns f~(x)."""
    return NoetherWrapper(
        Rollout(field, 1, dt=dt, method="rk4"),
        g,
        inner_lr=lr,
        learn_inner_lr=learn,
        predict=_field_of,
    )


def rollout(field: nn.Module, starts: Tensor, data: Data, steps: int | None = None) -> Tensor:
    """RK4 rollouts over the observed times, ``(n, 2) -> (n, steps, 2)`` (default
    ``points - 1``), no autograd."""
    horizon = data.points - 1 if steps is None else steps
    with torch.no_grad():
        return Rollout(field, horizon, dt=data.dt, method="rk4")(starts)


def validation_set(vanilla: nn.Module, data: Data) -> tuple[Tensor, Tensor]:
    """``(starts, targets)``, ``(N, 2)`` and ``(N, VAL_WINDOW, 2)``: windows of the validation
    trajectories (training data), each start fitted through vanilla's rollout to the window's
    first 3 noisy observations; the targets are the noisy observations."""
    starts, targets = window_targets(data.noisy[data.validation], VAL_WINDOW, VAL_STRIDE)
    observed = torch.cat([starts.unsqueeze(1), targets[:, :2]], dim=1)
    model = Rollout(vanilla, 2, dt=data.dt, method="rk4")
    return estimate_starts(model, observed, frames=3), targets


def per_sequence_mse(pred: Tensor, truth: Tensor) -> np.ndarray:
    return ((pred - truth) ** 2).mean(dim=(1, 2)).double().numpy()


def tune(net: NoetherWrapper, val: tuple[Tensor, Tensor], data: Data) -> TuneResult:
    """``tune_inner_lr`` on the validation windows (:func:`validation_set`, training data),
    "off" always a candidate; the grid is the rule's (fixed steps, or Polyak fractions).
    Recorded by :func:`protocol.record_tuning`."""
    starts, targets = val
    net.inner_steps = 1
    return tune_inner_lr(
        net,
        starts,
        targets,
        candidates=CANDIDATES if net.step_rule == "fixed" else None,
        forward=lambda n, x: rollout(n, x, data, VAL_WINDOW),
    )


def projected(field: nn.Module, g: nn.Module, starts: Tensor, data: Data) -> Tensor:
    """The expert's baseline: after every RK4 step, three Newton steps back onto g(x) = g(x0)."""
    return project(Rollout(field, 1, dt=data.dt, method="rk4"), g, starts, data.points - 1)


def project(step: Rollout, g: Callable[[Tensor], Tensor], starts: Tensor, horizon: int) -> Tensor:
    """``(n, 2) -> (n, horizon, 2)``: ``step``'s one-step rollouts, each followed by three Newton
    steps back onto the level set ``g(x) = g(x0)`` of the start."""
    x = starts
    with torch.no_grad():
        level = g(x)
    states = []
    for _ in range(horizon):
        with torch.no_grad():
            x = step(x)[:, 0]
        for _ in range(3):
            x = x.detach().requires_grad_()
            value = g(x)
            (grad,) = torch.autograd.grad(value.sum(), x)
            x = x - ((value - level) / grad.pow(2).sum(-1).clamp_min(1e-8)).unsqueeze(-1) * grad
        states.append(x.detach())
    return torch.stack(states, dim=1)


@dataclass
class Settings:
    vanilla_steps: int
    meta_steps: int
    g_steps: int
    meta: bool
    test_steps: list[int]
    #: A fixed step for the k-curves instead of the tuned one (to show the safeguard at a step
    #: the rule would not choose); None: the step tuned for k = 1.
    curve_step: float | None = None
    #: What vanilla is trained on: "fit" (the 20 non-validation training trajectories, so that
    #: validation is out of sample for every row) or "all" (the 25, the paper's protocol).
    vanilla_data: str = "fit"


def embeddings_for(data: Data, cfg: Settings) -> tuple[dict[str, nn.Module], FeatureLibrary, float]:
    """The three g's, standardised on the noisy training trajectories; the raw library (for its
    formula) and the learned g's |r| before fitting.

    Every g (the formula's weights, the network, the oracle's normalisation) is fitted on the 20
    non-validation training trajectories only: validation scores the rows these g's tailor, so
    fitting on the validation trajectories would make that score in-sample."""
    system = data.system
    library = FeatureLibrary(list(system.terms), variables=["q", "p"])
    train = data.noisy[data.fit]
    formula = fit_conserved(library, train, progress=False).embedding
    torch.manual_seed(0)
    mlp = MLPEmbedding(2, hidden=64)
    states = data.clean[data.test].reshape(-1, 2)
    with torch.no_grad():
        r_init = protocol.pearson(mlp(states)[:, 0], system.energy(states))
    learned = fit_conserved(mlp, train, steps=cfg.g_steps, lr=1e-3, progress=False).embedding
    oracle = Standardized.fit(_Energy(system), train)
    return {"oracle": oracle, "formula": formula, "learned": learned}, library, r_init


def run_seed(seed: int, data: Data, gs: dict[str, nn.Module], cfg: Settings) -> dict[str, Any]:
    """Every row for one model seed: per-sequence test MSEs, chosen steps, validation errors."""
    # vanilla on the 20 fit trajectories (or, --vanilla-data all, the paper's 25); everything
    # trained on top of it (control, meta rows) on the 20 fit trajectories only, so that the
    # validation trajectories score each row out of sample
    vanilla_idx = data.fit if cfg.vanilla_data == "fit" else data.train
    x = data.noisy[vanilla_idx].reshape(-1, 2)
    target = data.system.field(data.clean[vanilla_idx].reshape(-1, 2))
    x_fit = data.noisy[data.fit].reshape(-1, 2)
    target_fit = data.system.field(data.clean[data.fit].reshape(-1, 2))
    starts, truth = data.clean[data.test, 0], data.clean[data.test, 1:]
    out = protocol.new_run()

    def score(row: str, pred: Tensor) -> None:
        out["pred"][row] = pred
        out["err"][row] = per_sequence_mse(pred, truth)

    vanilla = make_field(seed)
    out["seconds"]["vanilla"] = fit(
        vanilla.parameters(), lambda: vanilla(x), target, cfg.vanilla_steps, f"seed {seed} vanilla"
    )
    score("vanilla", rollout(vanilla, starts, data))
    val = validation_set(vanilla, data)
    control = copy.deepcopy(vanilla)
    fit(
        control.parameters(),
        lambda: control(x_fit),
        target_fit,
        cfg.meta_steps,
        f"seed {seed} control",
    )
    score("control", rollout(control, starts, data))
    for name in ("oracle", "formula"):
        score(f"projection_{name}", projected(vanilla, gs[name], starts, data))

    for name in EMBEDDINGS:
        net = tailored_field(vanilla, gs[name], data.dt, 0.1)
        row = f"testtime_{name}"
        protocol.record_tuning(out, row, tune(net, val, data), untailored="vanilla")
        score(row, rollout(net, starts, data))
        polyak = tailored_field(vanilla, gs[name], data.dt, 1.0)
        polyak.step_rule = "polyak"  # scale-free: γ, the fraction of the loss a step removes
        prow = f"polyak_{name}"
        protocol.record_tuning(out, prow, tune(polyak, val, data), untailored="vanilla")
        score(prow, rollout(polyak, starts, data))
        if cfg.test_steps and name == "oracle":
            for control in ("none", "backtrack"):
                # the best candidate for k = 1 (even where tuning switched tailoring off)
                step = out["start"][row] if cfg.curve_step is None else cfg.curve_step
                curve_net = tailored_field(vanilla, gs[name], data.dt, step)
                curve_net.step_control = control
                out.setdefault("curve", {})[f"oracle_{control}"] = test_time_curve(
                    curve_net, data, cfg.test_steps, val
                )

    if not cfg.meta:
        return out
    for name in EMBEDDINGS:  # joint meta-training, as the paper; the step fixed at test time's
        row = f"meta_{name}"
        g = copy.deepcopy(gs[name])
        if name != "learned":
            g.requires_grad_(False)
        net = tailored_field(copy.deepcopy(vanilla), g, data.dt, out["start"][f"testtime_{name}"])
        out["seconds"][row] = fit(
            net.parameters(),
            lambda net=net: net(x_fit),
            target_fit,
            cfg.meta_steps,
            f"seed {seed} {row}",
        )
        protocol.record_tuning(out, row, tune(net, val, data))
        score(row, rollout(net, starts, data))
        score(f"{row}_untailored", rollout(net.model.step, starts, data))
        if name == "learned":
            out["g"][row] = net.embedding
    row = "meta_learned_frozen"  # g and the step only; the field stays vanilla
    net = tailored_field(
        vanilla, copy.deepcopy(gs["learned"]), data.dt, out["start"]["testtime_learned"], learn=True
    )
    out["seconds"][row] = fit(
        list(net.tailoring_parameters()),
        lambda: net(x_fit),
        target_fit,
        cfg.meta_steps,
        f"seed {seed} {row}",
    )
    protocol.record_tuning(out, row, tune(net, val, data))
    score(row, rollout(net, starts, data))
    out["g"][row] = net.embedding
    return out


def test_time_curve(
    net: NoetherWrapper, data: Data, ks: list[int], val: tuple[Tensor, Tensor]
) -> dict[str, Any]:
    """Error against k at test time, the step fixed at the one tuned for k = 1 (plain or
    backtracking steps, as ``net.step_control`` says): test errors, validation error, seconds."""
    lr = net.inner_lr
    starts, truth = data.clean[data.test, 0], data.clean[data.test, 1:]
    val_starts, val_targets = val
    curve: dict[str, Any] = {}
    for k in ks:
        net.inner_steps = k
        t0 = time.perf_counter()
        pred = rollout(net, starts, data)
        seconds = time.perf_counter() - t0
        val_pred = rollout(net, val_starts, data, VAL_WINDOW)
        curve[str(k)] = {
            "err": per_sequence_mse(pred, truth),
            "val": float(((val_pred - val_targets) ** 2).mean()),
            "seconds": seconds,
        }
    net.inner_steps = 1
    assert net.inner_lr == lr
    return curve


def embedding_metrics(g: nn.Module, data: Data, r_init: float | None) -> dict[str, Any]:
    """|r(g, H)| on test states, its within-trajectory variance fraction, the median
    |cos(grad g, grad H)| and the spread of |grad g| / |grad H| (top vs bottom decile of H)."""
    clean = data.clean[data.test]
    states = clean.reshape(-1, 2)
    with torch.no_grad():
        codes = g(states).reshape(clean.shape[:2])
    energy = data.system.energy
    cos, ratio = protocol.gradient_alignment(g, energy, states)
    h = energy(states)
    lo, hi = torch.quantile(h, 0.1), torch.quantile(h, 0.9)
    spread = float(ratio[h >= hi].median() / ratio[h <= lo].median())
    return {
        "abs_r": protocol.pearson(codes, energy(clean)),
        "abs_r_init": r_init,
        "within_var_frac": protocol.within_var_frac(codes),
        "grad_cos": float(cos.median()),
        "grad_ratio_spread": spread,
    }


def main(system: System, doc: str) -> None:
    """The example's command line; ``doc`` is the script's docstring (its --help)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for tests")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--data-seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="first model seed")
    parser.add_argument("--seeds", type=int, default=None, help="model seeds (2; --quick 1)")
    parser.add_argument("--sampler", choices=["hnn", "wide"], default="hnn")
    parser.add_argument("--no-meta", action="store_true", help="test-time rows only")
    parser.add_argument("--test-steps", default="", help="e.g. 1,2,4,8: the k-curve at test time")
    parser.add_argument(
        "--curve-step",
        type=float,
        default=None,
        help="a fixed step for the --test-steps curves (default: the step tuned for k = 1)",
    )
    parser.add_argument(
        "--vanilla-data",
        choices=["fit", "all"],
        default="fit",
        help="vanilla's training trajectories: the 20 non-validation ones (default: validation "
        "out of sample) or all 25 (the paper's; validation in-sample for vanilla)",
    )
    protocol.add_threads_argument(parser)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    protocol.set_threads(args.threads)
    start = time.perf_counter()
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    seeds = list(range(args.seed, args.seed + n_seeds))
    data_seeds = list(range(args.data_seed, args.data_seed + args.data_seeds))
    cfg = Settings(
        vanilla_steps=100 if args.quick else 2000,
        meta_steps=5 if args.quick else 100,
        g_steps=100 if args.quick else 2000,
        meta=not args.no_meta,
        test_steps=[int(k) for k in args.test_steps.split(",") if k],
        curve_step=args.curve_step,
        vanilla_data=args.vanilla_data,
    )
    runs: list[dict[str, Any]] = []
    formulas: list[dict[str, float]] = []
    embed_rows: dict[str, list[dict[str, Any]]] = {}
    last_data = None
    for data_seed in data_seeds:
        data = make_data(system, data_seed, args.sampler)
        last_data = data
        gs, library, r_init = embeddings_for(data, cfg)
        formulas.append(library.coefficients(scale_to="p^2"))
        print(f"data seed {data_seed}: fit_conserved -> g = {library.formula(scale_to='p^2')}")
        for name in EMBEDDINGS:
            init = {"oracle": 1.0, "formula": None, "learned": r_init}[name]
            embed_rows.setdefault(f"testtime_{name}", []).append(
                embedding_metrics(gs[name], data, init)
            )
        for seed in seeds:
            run = run_seed(seed, data, gs, cfg)
            run["data"] = data
            run["data_seed"] = data_seed
            for row, g in run["g"].items():
                embed_rows.setdefault(row, []).append(embedding_metrics(g, data, r_init))
            runs.append(run)
    report = summarise(system, runs, formulas, embed_rows, args, data_seeds, seeds, start)
    print_report(report, args)
    if args.plot is not None and last_data is not None:
        plot_phase(runs[0], last_data, args.plot)
    protocol.write_json(args.json, report)
    print(f"done in {report['seconds']:.0f} s")


def summarise(
    system: System,
    runs: list[dict[str, Any]],
    formulas: list[dict[str, float]],
    embed_rows: dict[str, list[dict[str, Any]]],
    args: argparse.Namespace,
    data_seeds: list[int],
    seeds: list[int],
    start: float,
) -> dict[str, Any]:
    """The protocol's JSON; the runs' errors nested by data seed (each draws its own
    trajectories), then model seed."""
    energy = system.energy
    names = list(runs[0]["err"])
    extras: dict[str, dict[str, Any]] = {}
    for row in names:
        inside, outside, drift = [], [], []
        for r in runs:
            data: Data = r["data"]
            # the training range: the energies of the trajectories vanilla was trained on
            trained = data.fit if args.vanilla_data == "fit" else data.train
            train_e = energy(data.clean[trained, 0])
            test_e = energy(data.clean[data.test, 0])
            mask = ((test_e >= train_e.min()) & (test_e <= train_e.max())).numpy()
            inside.append((r["err"][row][mask], r["err"]["vanilla"][mask]))
            outside.append((r["err"][row][~mask], r["err"]["vanilla"][~mask]))
            pred = r["pred"][row]
            drift.append(float(((energy(pred) - test_e[:, None]).abs() / test_e[:, None]).mean()))

        def split_ratio(parts: list[tuple[np.ndarray, np.ndarray]]) -> float | None:
            a = np.concatenate([p[0] for p in parts])
            b = np.concatenate([p[1] for p in parts])
            return None if a.size == 0 else float(np.sqrt(a.mean() / b.mean()))

        extras[row] = {
            "ratio_in_range": split_ratio(inside),
            "ratio_out_of_range": split_ratio(outside),
            "n_out_of_range": int(sum(p[0].size for p in outside)),
            "energy_drift": statistics.fmean(drift),
        }
    rows, inner_lr, selected = protocol.summarise_runs(runs, extras)
    coefficients = {t: statistics.fmean(f[t] for f in formulas) for t in system.terms}
    embeddings = {
        row: {k: _mean_or_none([m[k] for m in ms]) for k in ms[0]} for row, ms in embed_rows.items()
    }
    report: dict[str, Any] = {
        "example": system.name,
        "data_seeds": data_seeds,
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
        "metric": f"rollout RMSE over {system.points - 1} RK4 steps from the clean test starts, "
        "against the clean truth",
        "sampler": args.sampler,
        "vanilla_data": "the 20 non-validation training trajectories"
        if args.vanilla_data == "fit"
        else "all 25 training trajectories (the paper's): validation in-sample for vanilla",
        "threads": args.threads,
        "inner_lr": inner_lr,
        "selected": selected,
        "spearman_val_test": protocol.rank_agreement(
            runs, rows, [r for r, v in inner_lr.items() if v is not None]
        ),
        "rows": rows,
        "embeddings": embeddings,
        "formula": {"text": _formula_text(system, coefficients), "coefficients": coefficients},
        "paper": {**system.paper, "metric": "rollout RMSE"},
    }
    if "curve" in runs[0]:
        report["test_steps"] = curve_summary(runs)
        report["raw_test_steps"] = {
            name: {
                k: protocol.nested_errors(
                    [
                        {"err": {"e": r["curve"][name][k]["err"]}, "data_seed": r["data_seed"]}
                        for r in runs
                    ]
                )["e"].tolist()
                for k in runs[0]["curve"][name]
            }
            for name in runs[0]["curve"]
        }
    return report


def curve_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per curve and k: the protocol's ratio (and interval) to vanilla, the validation error,
    the seconds for the 25 test rollouts; and the k the validation error picks, with its test
    ratio to k = 1 and that ratio's interval."""

    def nest(get: Callable[[dict[str, Any]], np.ndarray]) -> np.ndarray:
        """``(data seeds, model seeds, sequences)``, for the nested bootstrap."""
        return protocol.nested_errors(
            [{"err": {"e": get(r)}, "data_seed": r.get("data_seed")} for r in runs]
        )["e"]

    def interval(a: np.ndarray, b: np.ndarray) -> list[float] | None:
        ci = protocol.bootstrap_ratio(a, b)
        return None if ci is None else list(ci)

    base = nest(lambda r: r["err"]["vanilla"])
    out: dict[str, Any] = {}
    for name in runs[0]["curve"]:
        out[name] = {}
        for k in runs[0]["curve"][name]:
            err = nest(lambda r, name=name, k=k: r["curve"][name][k]["err"])
            out[name][k] = {
                "ratio": protocol.rmse(err) / protocol.rmse(base),
                "ratio_ci": interval(err, base),
                "median_ratio": float(np.median(np.sqrt(err / base))),
                "validation_error": statistics.fmean(r["curve"][name][k]["val"] for r in runs),
                "seconds": statistics.fmean(r["curve"][name][k]["seconds"] for r in runs),
            }
        best = min(out[name], key=lambda k: out[name][k]["validation_error"])
        first = min(out[name], key=int)
        err_best = nest(lambda r, name=name, best=best: r["curve"][name][best]["err"])
        err_first = nest(lambda r, name=name, first=first: r["curve"][name][first]["err"])
        out[name]["best_k"] = {
            "k": int(best),
            "ratio_to_k1": protocol.rmse(err_best) / protocol.rmse(err_first),
            "ratio_to_k1_ci": interval(err_best, err_first),
        }
    return out


def _mean_or_none(values: list[Any]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known and len(known) == len(values) else None


def _formula_text(system: System, coefficients: dict[str, float]) -> str:
    weights = torch.tensor([coefficients[t] for t in system.terms])
    lib = FeatureLibrary(list(system.terms), variables=["q", "p"], weights=weights)
    return lib.formula(scale_to="p^2")


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    title = (
        f"{report['example']} ({report['sampler']} sampler), data seeds {report['data_seeds']}, "
        f"model seeds "
        f"{report['seeds']}: {report['metric']}; ratios to vanilla, 95% nested bootstrap "
        f"(data seeds, model seeds, test trajectories)"
    )
    protocol.print_table(
        title,
        report["rows"],
        inner_lr=report["inner_lr"],
        selected=report["selected"],
        extra_columns=[
            ("ratio_in_range", "in-range", ".3f"),
            ("ratio_out_of_range", "out-range", ".3f"),
            ("energy_drift", "H drift", ".3f"),
        ],
    )
    print(f"\nformula (mean over data seeds): g = {report['formula']['text']}")
    paper = report["paper"]
    print(
        f"paper (rollout RMSE): vanilla {paper['vanilla']}, Noether formula "
        f"{paper['noether_formula']}, oracle {paper['oracle']}"
    )
    print(
        "\nembeddings on test states: |r(g,H)| (init), within-var frac, median "
        "|cos(grad g, grad H)|, |grad g|/|grad H| top/bottom decile of H"
    )
    for row, m in report["embeddings"].items():
        init = "—" if m["abs_r_init"] is None else f"{m['abs_r_init']:.3f}"
        print(
            f"  {row:<22} {m['abs_r']:.4f} ({init})  {m['within_var_frac']:.4f}  "
            f"{m['grad_cos']:.4f}  {m['grad_ratio_spread']:.2f}"
        )
    if "test_steps" in report:
        print(
            "\ntest-time k (step tuned for k = 1): ratio to vanilla [95% CI], median, "
            "validation MSE, seconds"
        )
        for name, curve in report["test_steps"].items():
            best = curve["best_k"]
            print(
                f"  {name}: validation picks k = {best['k']}: test RMSE {best['ratio_to_k1']:.3f}x "
                f"k = 1's {protocol.format_ci(best['ratio_to_k1_ci'])}"
            )
            for k, c in curve.items():
                if k == "best_k":
                    continue
                print(
                    f"  {name:<8} k={k:<3} {c['ratio']:.3f} {protocol.format_ci(c['ratio_ci'])}  "
                    f"{c['median_ratio']:.3f}  "
                    f"{c['validation_error']:.5f}  {c['seconds']:.2f}"
                )


def plot_phase(run: dict[str, Any], data: Data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r
        for r in ("vanilla", "control", "testtime_oracle", "testtime_formula", "testtime_learned")
        if r in run["pred"]
    ]
    truth = data.clean[data.test]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.6), sharey=True)
    for ax, row in zip(axes, rows):
        pred = run["pred"][row]
        for i in range(truth.shape[0]):
            ax.plot(truth[i, :, 0], truth[i, :, 1], color="0.8", lw=2)
            ax.plot(pred[i, :, 0], pred[i, :, 1], color="tab:blue", lw=0.8)
        ax.set_title(row)
        ax.set_xlabel("q")
    axes[0].set_ylabel("p")
    fig.suptitle("test rollouts (grey: truth), first data and model seed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
