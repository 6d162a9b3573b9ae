"""Learned vector fields of ideal Hamiltonian systems (HNN's tasks), tailored with Noether
networks, on the evaluation protocol of ``protocol.py``: everything the pendulum and the spring
share. A :class:`System` holds the physics; ``main(system, doc)`` runs an example.

Tailoring is PER STATE: for a state x the inner loss compares g(x) with g(one RK4 step of the
field from x); one step on the field's weights gives the tailored field f~(x), which the RK4
rollout evaluates wherever it needs the field.

**The paper's split** (default): vanilla, the formula, the learned g and the oracle's
normalisation are fitted on all 25 training trajectories; the 25 test trajectories only score.
Every choice (each row's step size or Polyak fraction, or "off"; the ``selected`` row) is made
by 5-fold cross-validation over the 25 training trajectories with everything refitted per fold
(:func:`noether_wrap.tune_cv`): each training trajectory is scored once, as a whole 44-step
rollout from its start, by models fitted without it, exactly like the test. The start is the
clean one where the data have it (these synthetic systems do; the test rolls out from clean
starts too); the targets are the noisy observations. ``--split extrapolation`` is the earlier
variant: the 5 highest-energy training trajectories validate, everything is fitted on the
other 20, so validation and the test's upper range are extrapolation.

Rows: vanilla; testtime_{oracle,formula,learned,labelled} (a fixed step) and polyak_* (the
scale-free Polyak fraction γ, up to the full Gauss–Newton step γ = 2); projection_{oracle,formula}
(the expert's baseline: project each RK4 step onto the level set g(x) = g(x0)); control and, with
``--meta``, the meta-training trial (:func:`meta_trial`): meta_{oracle,learned} (joint: the field
and the step, and the learned g), meta_learned_frozen (g and the step; the field frozen), each
trained on rollouts with the step a Parameter, the epoch chosen on validation, against a control
given the same seconds. Beside each tailoring row the JSON keeps its test-set best over the grid
(``bound``): a bound chosen on the test, never a result.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from noether_experiments import protocol
from noether_wrap import (
    NoetherWrapper,
    Rollout,
    TuneGridResult,
    denoise_with_labels,
    diagnose,
    fit_conserved,
    tune,
    tune_cv,
)
from noether_wrap.embeddings import FeatureLibrary, MLPEmbedding, Standardized
from noether_wrap.tuning import DEFAULT_POLYAK_CANDIDATES, TuningWarning
from noether_wrap.validation import kfold, window_targets

#: The true energy, the fitted formula, the learned network, and the network fitted for precision
#: (derivative labels, on the states they imply: docs/learning-g.md).
EMBEDDINGS = ("oracle", "formula", "learned", "labelled")
#: The fixed-step grid and the Polyak fractions (γ = 2 is the full Gauss–Newton step).
CANDIDATES = (0.01, 0.0316, 0.1, 0.316, 1.0)
POLYAK = DEFAULT_POLYAK_CANDIDATES
T_END, NOISE = 3.0, 0.1
EXTRAPOLATION_VALIDATION = 5
#: The labelled g's peak learning rate (cosine decay), chosen on the diagnostic's share on the
#: pendulum's clean training states (docs/learning-g.md: 1e-3 constant, the learned g's, gave
#: 0.37-0.69; 1e-3 cosine 0.57-0.63; 3e-3 cosine 0.73-0.79).
LABELLED_LR = 3e-3
#: The meta-training trial's outer loss: rollouts of this many steps from window starts.
META_WINDOW, META_BATCH, META_CHECKPOINTS = 10, 32, 10


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

    def splits(self, variant: str, folds: int = 5) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """``(splits, final)`` over the 25 training trajectories (positions in ``train``):
        ``"paper"``, ``folds`` folds by trajectory (seeded) and the final fit on all 25;
        ``"extrapolation"``, the 5 with the highest observed start energy validate and
        everything is fitted on the other 20."""
        n = self.train.numel()
        if variant == "paper":
            return kfold(n, folds, seed=0), torch.arange(n)
        h = self.system.energy(self.noisy[self.train, 0])
        val = torch.argsort(h, descending=True)[:EXTRAPOLATION_VALIDATION].sort().values
        fit = torch.tensor([i for i in range(n) if i not in set(val.tolist())])
        return [(fit, val)], fit


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


def validation_data(data: Data, start: str = "clean") -> tuple[Tensor, Tensor]:
    """``(starts, targets)``, ``(25, 2)`` and ``(25, points - 1, 2)``: every training trajectory
    as one validation unit, like the test: its start and its noisy observations after it. The
    start is the clean one (``"clean"``: these synthetic data have it, and the test rolls out
    from clean starts) or the noisy observed one (``"observed"``: what real data give)."""
    starts = data.clean[data.train, 0] if start == "clean" else data.noisy[data.train, 0]
    return starts, data.noisy[data.train, 1:]


def per_sequence_mse(pred: Tensor, truth: Tensor) -> np.ndarray:
    return ((pred - truth) ** 2).mean(dim=(1, 2)).double().numpy()


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
    g_steps: int
    #: The meta-training trial's steps per row (0: no trial; the control then gets this many).
    meta_steps: int
    meta: bool
    test_steps: list[int]
    #: A fixed step for the k-curves instead of the tuned one (to show the safeguard at a step
    #: the rule would not choose); None: the step tuned for k = 1.
    curve_step: float | None = None
    #: "paper" (k-fold CV over the 25 training trajectories) or "extrapolation".
    split: str = "paper"
    folds: int = 5
    #: The validation rollouts' starts: "clean" or "observed" (noisy).
    val_start: str = "clean"
    #: The fixed steps and the Polyak fractions searched.
    grids: tuple[tuple[float, ...], tuple[float, ...]] = (CANDIDATES, POLYAK)


class Fits:
    """Everything fitted on a set of training trajectories, fitted once per set: the vanilla
    field per model seed, the three g's (and the library, for its formula). Keys are the
    positions in ``data.train``."""

    def __init__(self, data: Data, cfg: Settings) -> None:
        self.data, self.cfg = data, cfg
        self._fields: dict[tuple[int, tuple[int, ...]], nn.Module] = {}
        self._gs: dict[tuple[int, ...], tuple[dict[str, nn.Module], FeatureLibrary]] = {}

    def vanilla(self, seed: int, idx: Tensor) -> nn.Module:
        """HNN's MLP (model seed ``seed``) fitted on the training trajectories ``idx``."""
        key = (seed, tuple(idx.tolist()))
        if key not in self._fields:
            rows = self.data.train[idx]
            x = self.data.noisy[rows].reshape(-1, 2)
            target = self.data.system.field(self.data.clean[rows].reshape(-1, 2))
            field = make_field(seed)
            fit(field.parameters(), lambda: field(x), target, self.cfg.vanilla_steps,
                f"seed {seed} vanilla ({len(key[1])} trajectories)")  # fmt: skip
            self._fields[key] = field
        return self._fields[key]

    def gs(self, idx: Tensor) -> dict[str, nn.Module]:
        """The three g's fitted on the training trajectories ``idx`` (standardised there)."""
        return self._g_and_library(idx)[0]

    def library(self, idx: Tensor) -> FeatureLibrary:
        return self._g_and_library(idx)[1]

    def _g_and_library(self, idx: Tensor) -> tuple[dict[str, nn.Module], FeatureLibrary]:
        key = tuple(idx.tolist())
        if key not in self._gs:
            self._gs[key] = embeddings_for(self.data, self.data.train[idx], self.cfg)
        return self._gs[key]


def embeddings_for(
    data: Data, rows: Tensor, cfg: Settings
) -> tuple[dict[str, nn.Module], FeatureLibrary]:
    """The four g's, each fitted on the trajectories ``rows`` only (the formula's weights, the
    networks, the oracle's normalisation), and the raw library (for its formula). ``labelled``
    is the learned g's network fitted for precision: with the derivative labels vanilla is
    trained on (HNN's, the field at the clean states), on the states they imply
    (:func:`~noether_wrap.conservation.denoise_with_labels` of the noisy trajectories), the
    learning rate decayed to 0 (cosine) from ``LABELLED_LR``."""
    system = data.system
    library = FeatureLibrary(list(system.terms), variables=["q", "p"])
    train = data.noisy[rows]
    formula = fit_conserved(library, train, progress=False).embedding
    torch.manual_seed(0)
    mlp = MLPEmbedding(2, hidden=64)
    learned = fit_conserved(mlp, train, steps=cfg.g_steps, lr=1e-3, progress=False).embedding
    oracle = Standardized.fit(_Energy(system), train)
    labels = labels_of(data, rows)
    torch.manual_seed(0)
    labelled = fit_conserved(MLPEmbedding(2, hidden=64), denoise_with_labels(train, labels),
                             steps=cfg.g_steps, lr=LABELLED_LR, schedule="cosine",
                             progress=False, velocities=labels).embedding  # fmt: skip
    gs = {"oracle": oracle, "formula": formula, "learned": learned, "labelled": labelled}
    return gs, library


def labels_of(data: Data, rows: Tensor) -> Tensor:
    """HNN's derivative labels of the trajectories ``rows``: the field at the clean states,
    ``(len(rows), points, 2)``."""
    return data.system.field(data.clean[rows])


def user_states(data: Data, rows: Tensor) -> tuple[Tensor, Tensor]:
    """What a user of these data has for :func:`diagnosis`: the states of the training
    trajectories ``rows`` denoised with their labels, and the labels, both ``(N, 2)``."""
    labels = labels_of(data, rows)
    states = denoise_with_labels(data.noisy[rows], labels)
    assert isinstance(states, Tensor)
    return states.reshape(-1, 2), labels.reshape(-1, 2)


def diagnosis(g: nn.Module, field: nn.Module, states: tuple[Tensor, Tensor]) -> dict[str, Any]:
    """:func:`noether_wrap.diagnose` of ``g`` for ``field`` on ``(states, labels)``
    (:func:`user_states`)."""
    d = diagnose(g, field, *states, dt=1e-3, warn_if_not=False)
    return {"share": d.share, "drift_ratio": d.drift_ratio, "verdict": d.verdict}


def initial_r(data: Data) -> float:
    """|r(g, H)| on test states of the learned g's network before fitting (seed 0)."""
    torch.manual_seed(0)
    mlp = MLPEmbedding(2, hidden=64)
    states = data.clean[data.test].reshape(-1, 2)
    with torch.no_grad():
        return protocol.pearson(mlp(states)[:, 0], data.system.energy(states))


def record(out: dict[str, Any], row: str, result: TuneGridResult) -> None:
    """A cross-validated tuning of ``row``: its step (0.0 where "off"), its validation error
    and per-sequence scores under the outcome, and the best candidate by mean even where "off"
    won (what the meta-training trial starts from)."""
    configs = [c for c in result.losses]
    out["lr"][row] = 0.0 if result.best is None else float(result.best)
    scores = result.chosen_scores()
    out["val"][row] = float(scores.mean())
    out["val_seq"][row] = scores.tolist()
    out["start"][row] = float(min(configs, key=lambda c: result.losses[c]).step)
    if "vanilla" not in out["val"]:
        protocol.record_validation(out, "vanilla", result.per_sequence[None].tolist())


def run_seed(seed: int, data: Data, fits: Fits, cfg: Settings) -> dict[str, Any]:
    """Every row for one model seed: per-sequence test MSEs, chosen steps, validation errors
    (cross-validated), the test-set bound of each tailoring row, and the meta-training trial."""
    splits, final = data.splits(cfg.split, cfg.folds)
    starts_val, targets_val = validation_data(data, cfg.val_start)
    starts, truth = data.clean[data.test, 0], data.clean[data.test, 1:]
    out = protocol.new_run()
    out["bound"] = {}

    def score(row: str, pred: Tensor) -> None:
        out["pred"][row] = pred
        out["err"][row] = per_sequence_mse(pred, truth)

    def forward(net: nn.Module, x: Tensor) -> Tensor:
        return rollout(net, x, data)

    vanilla = fits.vanilla(seed, final)
    score("vanilla", rollout(vanilla, starts, data))
    known = user_states(data, data.train[final])
    out["diagnosis"] = {name: diagnosis(g, vanilla, known) for name, g in fits.gs(final).items()}
    for name in ("oracle", "formula"):
        row = f"projection_{name}"
        score(row, projected(vanilla, fits.gs(final)[name], starts, data))
        val = np.full(starts_val.shape[0], np.nan)
        for train, held in splits:
            pred = projected(
                fits.vanilla(seed, train), fits.gs(train)[name], starts_val[held], data
            )
            val[held.numpy()] = per_sequence_mse(pred, targets_val[held])
        protocol.record_validation(out, row, val[np.isfinite(val)].tolist())

    for name in EMBEDDINGS:
        fixed, polyak = cfg.grids
        for rule, prefix, grid in (("fixed", "testtime", fixed), ("polyak", "polyak", polyak)):
            row = f"{prefix}_{name}"

            def build(idx: Tensor, name: str = name, rule: str = rule) -> NoetherWrapper:
                net = tailored_field(fits.vanilla(seed, idx), fits.gs(idx)[name], data.dt, 0.1)
                net.step_rule = rule
                return net

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TuningWarning)
                warnings.simplefilter("ignore", RuntimeWarning)  # a large candidate blowing up
                net, result = tune_cv(
                    build, starts_val, targets_val, folds=splits, final=final,
                    step_rules=(rule,), candidates=grid, guards=(None,), forward=forward,
                )  # fmt: skip
            record(out, row, result)
            score(row, rollout(net, starts, data))
            out["bound"][row] = test_bound(build(final), starts, truth, rule, grid, forward)
            if cfg.test_steps and name == "oracle" and rule == "fixed":
                for control in ("none", "backtrack"):
                    # the best candidate for k = 1 (even where tuning switched tailoring off)
                    step = out["start"][row] if cfg.curve_step is None else cfg.curve_step
                    out.setdefault("curve", {})[f"oracle_{control}"] = test_time_curve(
                        build, step, control, data, cfg.test_steps, splits, final
                    )
    if cfg.meta:
        meta_trial(seed, data, fits, splits, out, cfg)
    else:
        control, _ = train_on_rollouts(
            fits.vanilla(seed, splits[0][0]), data, splits[0], steps=cfg.meta_steps, seed=seed
        )
        out["trial"] = {}
        score("control", rollout(control, starts, data))
    return out


def test_bound(
    net: NoetherWrapper, starts: Tensor, truth: Tensor, rule: str, grid: Any, forward: Any
) -> np.ndarray:
    """The per-sequence test errors of the grid's best configuration ON THE TEST SET ("off"
    included): a bound on what any rule choosing from this grid can reach, never a result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tune(net, starts, truth, step_rules=(rule,), candidates=grid, guards=(None,),
                      forward=forward)  # fmt: skip
    best = min(result.per_sequence, key=lambda c: float(result.per_sequence[c].mean()))
    return result.per_sequence[best].numpy()


def train_on_rollouts(
    model: nn.Module,
    data: Data,
    split: tuple[Tensor, Tensor],
    *,
    steps: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    learn: str = "all",
    desc: str = "control",
) -> tuple[nn.Module, dict[str, Any]]:
    """The meta-training trial's training: Adam on rollouts of ``META_WINDOW`` steps from the
    clean window starts of the fit trajectories against their noisy observations (the test's
    kind of prediction), ``META_BATCH`` windows a step, the predictor's group at lr 1e-3 and the
    tailoring's (g, the step as log η at lr 1e-2), each clipped to norm 1 on its own; run for
    ``steps`` or for ``seconds``. Scored every tenth of the run on the validation trajectories
    (whole rollouts, as the CV scores every row); returns a copy of the model at the best
    checkpoint (step 0 included) and the curve.

    ``learn``: "all" (every parameter of a plain model, or the wrapper's field, g and step),
    or "tailoring" (g and the step only, the field frozen)."""
    fit_idx, val_idx = split
    rows = data.train[fit_idx]
    w_starts, _ = window_targets(data.clean[rows], META_WINDOW, META_WINDOW)
    _, w_targets = window_targets(data.noisy[rows], META_WINDOW, META_WINDOW)
    starts_val, targets_val = validation_data(data)
    v_starts, v_targets = starts_val[val_idx], targets_val[val_idx]
    model = copy.deepcopy(model)
    groups: list[dict[str, Any]] = []
    if isinstance(model, NoetherWrapper):
        field = [p for p in model.model.parameters()]
        g = [p for p in model.embedding.parameters()]
        if learn == "all":  # "tailoring": the field is adapted per state but never trained
            groups.append({"params": field, "lr": 1e-3})
        if g and any(p.requires_grad for p in g):
            groups.append({"params": g, "lr": 1e-3})
        groups.append({"params": [model.log_inner_lr], "lr": 1e-2})
    else:
        groups.append({"params": list(model.parameters()), "lr": 1e-3})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(seed)
    horizon = Rollout(model, META_WINDOW, dt=data.dt, method="rk4")

    def validate() -> float:
        return float(per_sequence_mse(rollout(model, v_starts, data), v_targets).mean())

    curve = [(0, validate())]
    best_state, best = copy.deepcopy(model.state_dict()), curve[0][1]
    every = max(1, (steps or 100) // META_CHECKPOINTS)
    t0, step, spent = time.perf_counter(), 0, 0.0
    bar = tqdm(desc=desc, total=steps, leave=False)
    while (steps is not None and step < steps) or (seconds is not None and spent < seconds):
        pick = torch.randperm(w_starts.shape[0], generator=gen)[:META_BATCH]
        loss = nn.functional.mse_loss(horizon(w_starts[pick]), w_targets[pick])
        opt.zero_grad()
        loss.backward()
        for group in groups:
            torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
        opt.step()
        step += 1
        bar.update()
        spent = time.perf_counter() - t0
        if seconds is not None and steps is None:
            every = max(1, int(seconds / max(spent / step, 1e-9)) // META_CHECKPOINTS)
        if step % every == 0:
            curve.append((step, validate()))
            if curve[-1][1] < best:
                best_state, best = copy.deepcopy(model.state_dict()), curve[-1][1]
            spent = time.perf_counter() - t0
    bar.close()
    model.load_state_dict(best_state)
    chosen = min(curve, key=lambda c: c[1])[0]
    info = {
        "steps": step,
        "seconds": time.perf_counter() - t0,
        "chosen_step": chosen,
        "curve": curve,
        "flattened": chosen < step,  # the best checkpoint is not the last one
        "validation": [
            float(v) for v in per_sequence_mse(rollout(model, v_starts, data), v_targets)
        ],
    }
    if isinstance(model, NoetherWrapper):
        info["learned_step"] = float(model.inner_lr)
    return model, info


def meta_trial(
    seed: int, data: Data, fits: Fits, splits: list[tuple[Tensor, Tensor]], out: dict[str, Any],
    cfg: Settings,
) -> None:  # fmt: skip
    """The paper's method, given a fair trial: on the first fold (fitted on its 20 training
    trajectories, validated on its 5), each meta row starts from that fold's vanilla and g and
    the step its test-time row scored best (even where tuning said "off"), learns the step as a
    Parameter on rollouts (:func:`train_on_rollouts`), and keeps the checkpoint with the best
    validation error; the control trains the plain field the same way for the same seconds
    (the mean of the meta rows'). Nothing is re-tuned afterwards."""
    split = splits[0]
    base, gs = fits.vanilla(seed, split[0]), fits.gs(split[0])
    starts = data.clean[data.test, 0]
    truth = data.clean[data.test, 1:]
    trial: dict[str, Any] = {}
    specs = (("meta_oracle", "oracle", "all"), ("meta_learned", "learned", "all"),
             ("meta_learned_frozen", "learned", "tailoring"))  # fmt: skip
    for row, name, learn in specs:
        g = copy.deepcopy(gs[name])
        g.requires_grad_(name == "learned")
        net = tailored_field(base, g, data.dt, out["start"][f"testtime_{name}"], learn=True)
        trained, info = train_on_rollouts(
            net,
            data,
            split,
            steps=cfg.meta_steps,
            seed=seed,
            learn=learn,
            desc=f"seed {seed} {row}",
        )
        trial[row] = info
        pred = rollout(trained, starts, data)
        out["pred"][row], out["err"][row] = pred, per_sequence_mse(pred, truth)
        if learn == "all":
            plain = rollout(trained.model.step, starts, data)
            out["pred"][f"{row}_untailored"] = plain
            out["err"][f"{row}_untailored"] = per_sequence_mse(plain, truth)
        if name == "learned":
            out["g"][row] = trained.embedding
    budget = statistics.fmean(trial[r]["seconds"] for r, _, _ in specs)
    control, info = train_on_rollouts(base, data, split, seconds=budget, seed=seed,
                                      desc=f"seed {seed} control")  # fmt: skip
    trial["control"] = info
    pred = rollout(control, starts, data)
    out["pred"]["control"], out["err"]["control"] = pred, per_sequence_mse(pred, truth)
    out["trial"] = trial


def test_time_curve(
    build: Callable[[Tensor], NoetherWrapper], step: float, control: str, data: Data,
    ks: list[int], splits: list[tuple[Tensor, Tensor]], final: Tensor,
) -> dict[str, Any]:  # fmt: skip
    """Error against k at test time, the step fixed at ``step`` (plain or backtracking steps,
    ``control``): test errors, the cross-validated validation error, seconds."""
    starts, truth = data.clean[data.test, 0], data.clean[data.test, 1:]
    starts_val, targets_val = validation_data(data)

    def configured(idx: Tensor, k: int) -> NoetherWrapper:
        net = build(idx)
        net.inner_lr, net.inner_steps, net.step_control = step, k, control
        return net

    curve: dict[str, Any] = {}
    for k in ks:
        net = configured(final, k)
        t0 = time.perf_counter()
        pred = rollout(net, starts, data)
        seconds = time.perf_counter() - t0
        val = [per_sequence_mse(rollout(configured(tr, k), starts_val[va], data), targets_val[va])
               for tr, va in splits]  # fmt: skip
        curve[str(k)] = {
            "err": per_sequence_mse(pred, truth),
            "val": float(np.concatenate(val).mean()),
            "seconds": seconds,
        }
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
    protocol.add_run_arguments(parser)
    parser.add_argument("--sampler", choices=["hnn", "wide"], default="hnn")
    parser.add_argument(
        "--meta",
        action="store_true",
        help="the meta-training trial (the paper's method, against a control given the same "
        "seconds); slow: about 3 min per model seed",
    )
    parser.add_argument("--test-steps", default="", help="e.g. 1,2,4,8: the k-curve at test time")
    parser.add_argument(
        "--curve-step",
        type=float,
        default=None,
        help="a fixed step for the --test-steps curves (default: the step tuned for k = 1)",
    )
    parser.add_argument(
        "--val-start",
        choices=["clean", "observed"],
        default="clean",
        help="the validation rollouts' starts: clean (default; the test's) or the noisy observed "
        "ones (what real data give)",
    )
    parser.add_argument(
        "--split",
        choices=["paper", "extrapolation"],
        default="paper",
        help="paper (default): everything fitted on all 25 training trajectories, every choice "
        "by 5-fold cross-validation over them; extrapolation: the 5 highest-energy training "
        "trajectories validate, everything is fitted on the other 20",
    )
    args = parser.parse_args()
    seeds, data_seeds = protocol.run_seeds(args)
    start = time.perf_counter()
    cfg = Settings(
        vanilla_steps=100 if args.quick else 2000,
        g_steps=100 if args.quick else 2000,
        meta_steps=4 if args.quick else 300,
        meta=args.meta,
        test_steps=[int(k) for k in args.test_steps.split(",") if k],
        curve_step=args.curve_step,
        split=args.split,
        val_start=args.val_start,
        # --quick: a smoke run (every tailored rollout costs the same per-call overhead)
        folds=2 if args.quick else 5,
        grids=((0.1, 1.0), (1.0, 2.0)) if args.quick else (CANDIDATES, POLYAK),
    )
    runs: list[dict[str, Any]] = []
    formulas: list[dict[str, float]] = []
    embed_rows: dict[str, list[dict[str, Any]]] = {}
    last_data = None
    for data_seed in data_seeds:
        data = make_data(system, data_seed, args.sampler)
        last_data = data
        fits = Fits(data, cfg)
        _, final = data.splits(cfg.split, cfg.folds)
        gs, library, r_init = fits.gs(final), fits.library(final), initial_r(data)
        formulas.append(library.coefficients(scale_to="p^2"))
        print(f"data seed {data_seed}: fit_conserved -> g = {library.formula(scale_to='p^2')}")
        for name in EMBEDDINGS:
            init = {"oracle": 1.0, "formula": None, "learned": r_init, "labelled": r_init}[name]
            embed_rows.setdefault(f"testtime_{name}", []).append(
                embedding_metrics(gs[name], data, init)
            )
        for seed in seeds:
            run = run_seed(seed, data, fits, cfg)
            run["data"] = data
            run["data_seed"] = data_seed
            run["trained_on"] = data.train[final]
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
            trained = r["trained_on"]
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
        name = row.split("_", 1)[-1]
        if row.startswith(("testtime_", "polyak_")) and name in runs[0]["diagnosis"]:
            extras[row]["diagnosis_per_run"] = [r["diagnosis"][name] for r in runs]
        if row in runs[0]["bound"]:
            bound = protocol.nested_errors(
                [{"err": {"b": r["bound"][row], "v": r["err"]["vanilla"]},
                  "data_seed": r["data_seed"]} for r in runs]
            )  # fmt: skip
            extras[row]["bound"] = protocol.rmse(bound["b"]) / protocol.rmse(bound["v"])
            extras[row]["bound_per_data_seed"] = [
                protocol.rmse(b) / protocol.rmse(v) for b, v in zip(bound["b"], bound["v"])
            ]
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
        "split": "the paper's: everything fitted on all 25 training trajectories, every choice "
        "by 5-fold cross-validation over them (refits per fold, whole rollouts against the noisy "
        "observations)"
        if args.split == "paper"
        else "extrapolation: the 5 highest-energy training trajectories validate, everything "
        "is fitted on the other 20",
        "validation_starts": args.val_start,
        "threads": args.threads,
        "inner_lr": inner_lr,
        "selected": selected,
        "spearman_val_test": protocol.rank_agreement(
            runs, rows, [r for r in rows if r in runs[0]["val"] and r != "vanilla"]
        ),
        "rows": rows,
        "embeddings": embeddings,
        "formula": {"text": _formula_text(system, coefficients), "coefficients": coefficients},
        "paper": {**system.paper, "metric": "rollout RMSE"},
    }
    if runs[0]["trial"]:
        report["meta_trial"] = trial_summary(runs)
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


def trial_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The meta-training trial per row: the test ratio to the control with its nested-bootstrap
    interval, the validation error (the first fold's 5 trajectories) beside the control's, the
    learned step, the steps run and the checkpoint chosen, and whether the validation curve had
    flattened (its best checkpoint not the last) in every run."""
    errors = protocol.nested_errors(runs)
    control = errors["control"]
    out: dict[str, Any] = {}
    for row in runs[0]["trial"]:
        infos = [r["trial"][row] for r in runs]
        ci = protocol.bootstrap_ratio(errors[row], control)
        out[row] = {
            "ratio_to_control": protocol.rmse(errors[row]) / protocol.rmse(control),
            "ratio_to_control_ci": None if ci is None else list(ci),
            "validation_error": statistics.fmean(statistics.fmean(i["validation"]) for i in infos),
            "learned_step": [i.get("learned_step") for i in infos],
            "steps": [i["steps"] for i in infos],
            "chosen_step": [i["chosen_step"] for i in infos],
            "flattened": all(i["flattened"] for i in infos),
            "seconds": statistics.fmean(i["seconds"] for i in infos),
            "curves": [i["curve"] for i in infos],
        }
    return out


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
            ("bound", "test-best*", ".3f"),
        ],
    )
    print(
        "* test-best: the grid's best configuration chosen ON THE TEST SET, a bound, not a result"
    )
    if "meta_trial" in report:
        print("\nmeta-training trial (first fold: fit on 20, epoch by validation on 5):")
        for row, t in report["meta_trial"].items():
            steps = ", ".join(f"{c}/{n}" for c, n in zip(t["chosen_step"], t["steps"]))
            learned = ", ".join("—" if v is None else f"{v:.3g}" for v in t["learned_step"])
            print(
                f"  {row:<22} test/control {t['ratio_to_control']:.3f} "
                f"{protocol.format_ci(t['ratio_to_control_ci'])}  val {t['validation_error']:.5f}"
                f"  checkpoint/steps {steps}  step {learned}"
                f"{'' if t['flattened'] else '  (validation still falling at the end)'}"
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
    protocol.save_figure(fig, path)
