"""Real pendulum (Schmidt & Lipson 2009): Noether tailoring on motion-tracked data, on HNN's
protocol and the evaluation protocol of ``protocol.py``.

    python experiments/real_pendulum.py                     # 2 model seeds, 2 processes x 1 thread
    python experiments/real_pendulum.py --json docs/results/real_pendulum.json
    python experiments/real_pendulum.py --quick             # a smoke run on a slice, for the tests

Data (experiments/data/real_pend_h_1.txt, sha256-checked on load): 556 rows (t, angle, angular
velocity) at 1/6 s with 10 gaps where tracking dropped frames. HNN's protocol: a state and its
time derivative per pair of consecutive rows, by the midpoint rule (the state is the pair's mean,
the derivative its difference over the ACTUAL time difference, so gaps are handled); 555 states,
the first 80 % in time (444) train, the last 111 (18.3 s) test. The field is HNN's MLP (2-200-200-2,
tanh, orthogonal weights, no last bias), 2,000 full-batch Adam steps (lr 1e-3, weight decay 1e-4)
on the derivative MSE.

Evaluation: RK4 rollouts at dt = 1/6 s of the learned field from a recorded state; the units of
the bootstrap are the 30-step (5 s) windows from every 5th test state (17 windows), and the
rollout over the whole test segment from its first state (110 steps) is reported beside them.
Windows are restricted to gap-free stretches (the test and validation segments have no gap).

Choices, on training data only: every row is built twice per model seed. A *validation stage*
trains on the first 80 % of the training states (355) and scores 30-step windows from every 5th
of the last 89 training states (12 windows, a forward-in-time split that mirrors the test); there
each step is chosen among off and an ascending half-decade grid 1e-4 ... 1 (Polyak rows: the
fraction gamma in 0.125 ... 2), each with the prediction guards of noether_wrap.tune (none, 0.1,
0.3, 1), off kept unless a setting is ``noether_wrap.tuning.clearly_better`` over the windows
(better on more windows than it is worse on, and by more than the paired standard error: tune's
rule; the grid is cut once a step is 2x worse than off), and ``selected`` is the row (vanilla
included) with the lowest validation error, again kept at vanilla unless clearly better. The
*test stage* retrains on all 444 training states with those choices and only scores the test.

Rows: vanilla; control (vanilla + as many more Adam steps as the meta row); hnn (a Hamiltonian
network, same data, optimiser and steps); projection_energy (after every RK4 step, back onto the
level set of the reference energy 2.4 (1 - cos q) + p^2 of the start); testtime_{energy,formula,
learned} (the vanilla field tailored per state, as experiments/hamiltonian.py does, with g the
standardised reference energy, the FeatureLibrary formula fitted on training windows, or an MLP g
fitted by fit_conserved); meta_learned_frozen (g and the step meta-trained, field frozen);
window_energy (the whole 30-step rollout tailored, anchor form) and chain_{energy,formula_local}
(chain form on the first 5 steps only: energy conserved only locally, the pendulum being damped;
formula_local fitted on 6-state windows); polyak_* rows when ``NoetherWrapper`` has ``step_rule``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import io
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from noether_experiments import hamiltonian, protocol
from noether_wrap import NoetherWrapper, Rollout, fit_conserved
from noether_wrap.embeddings import FeatureLibrary, MLPEmbedding, Standardized
from noether_wrap.tuning import (
    DEFAULT_GUARDS,
    DEFAULT_POLYAK_CANDIDATES,
    choose,
    clearly_better,
)

DATA = Path(__file__).resolve().parent / "data" / "real_pend_h_1.txt"
SHA256 = "45d92988198b89a5933f5a53e67aa819d06937516f71a462ac09e1307d8b3411"
DT = 1.0 / 6.0
TRAIN_FRACTION = 0.8
STRIDE = 5
#: Half-decade steps, ascending (the grid is cut once a step is GIVE_UP x worse than off): the
#: examples' usual 0.01-1 grid starts too high here, where vanilla's validation error is small.
CANDIDATES = tuple(round(10 ** (k / 2), 6) for k in range(-8, 1))
#: Outer batches (states) of the meta row and of the control, the same draws for both.
META_BATCH = 128
#: Polyak fractions gamma (the library's grid, to the Gauss–Newton step 2), ascending.
POLYAK_CANDIDATES = DEFAULT_POLYAK_CANDIDATES
#: Prediction guards scored beside every step (the library's grid; None: no guard).
GUARDS = DEFAULT_GUARDS
TERMS = ("q", "p", "q^2", "p^2", "cos(q)", "sin(q)", "q*p")
#: Stop the (ascending) step grid once a step's validation error exceeds this times off's.
GIVE_UP = 2.0
LOCAL = 5  # the chain rows' inner horizon, and the local formula's window (LOCAL + 1 states)
PAPER = {
    "claim": "Noether Networks (Alet et al. 2021) report the real pendulum's long-horizon "
    "rollout error more than 10x below a plain MLP's, in a figure (no table, no number)",
    "ratio_upper_bound": 0.1,
}


class ChecksumError(ValueError):
    """The recording on disk is not the vendored one."""


def load(path: Path = DATA) -> np.ndarray:
    """The recording's ``(556, 4)`` rows (trial, t, angle, velocity), after checking its sha256.

    Raises:
        ChecksumError: the file's sha256 is not the vendored recording's.
    """
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise ChecksumError(
            f"{path}: sha256 {digest} does not match the vendored recording's {SHA256}; the "
            "file was changed or corrupted. Restore experiments/data/real_pend_h_1.txt from the "
            "repository (provenance: experiments/data/README.md)."
        )
    return np.loadtxt(io.StringIO(raw.decode()), comments="%", ndmin=2)


def energy(x: Tensor) -> Tensor:
    """The reference energy ``2.4 (1 - cos q) + p^2`` (HNN's fitted constant) of ``(..., 2)``."""
    return 2.4 * (1.0 - torch.cos(x[..., 0])) + x[..., 1] ** 2


class Energy(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return energy(x)


@dataclass
class Recording:
    """States and midpoint derivatives of consecutive rows; the train/test split in time."""

    states: Tensor  # (n, 2) float32
    derivs: Tensor  # (n, 2) float32
    times: np.ndarray  # (n,) float64
    n_train: int
    first: Tensor  # (n, 2): the first row of each pair, where HNN's code puts the derivative

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> Recording:
        t, x = rows[:, 1], rows[:, 2:4]
        dt = np.diff(t)[:, None]
        states = 0.5 * (x[1:] + x[:-1])
        derivs = (x[1:] - x[:-1]) / dt  # the actual time difference: gaps are 2-3 frames
        n = len(states)
        return cls(
            torch.tensor(states, dtype=torch.float32),
            torch.tensor(derivs, dtype=torch.float32),
            0.5 * (t[1:] + t[:-1]),
            int(n * TRAIN_FRACTION),
            torch.tensor(x[:-1], dtype=torch.float32),
        )


@dataclass
class Stage:
    """One fit/evaluate split: models are trained on states ``[0, fit_end)`` and scored on the
    gap-free windows of ``[fit_end, end)``."""

    name: str
    rec: Recording
    fit_end: int
    end: int
    horizon: int
    starts: list[int] = field(init=False)
    whole: int = field(init=False)  # steps of the whole-segment rollout

    def __post_init__(self) -> None:
        self.starts = windows(self.rec.times, self.fit_end, self.end, self.horizon, STRIDE)
        run = gap_free_run(self.rec.times, self.fit_end, self.end)
        self.whole = run - 1
        if not self.starts or self.whole < 1:
            raise ValueError(f"{self.name}: no gap-free {self.horizon}-step window to score")

    @property
    def x(self) -> Tensor:
        return self.rec.states[: self.fit_end]

    @property
    def target(self) -> Tensor:
        return self.rec.derivs[: self.fit_end]

    def window_starts(self) -> Tensor:
        return self.rec.states[self.starts]

    def window_truth(self) -> Tensor:
        idx = torch.tensor(self.starts)[:, None] + torch.arange(1, self.horizon + 1)
        return self.rec.states[idx]

    def whole_truth(self) -> Tensor:
        return self.rec.states[self.fit_end + 1 : self.fit_end + 1 + self.whole][None]

    def whole_start(self) -> Tensor:
        return self.rec.states[self.fit_end : self.fit_end + 1]

    def fit_windows(self, length: int, stride: int) -> list[Tensor]:
        """Gap-free windows of ``length`` states in the fitting segment (for fitting g)."""
        starts = windows(self.rec.times, 0, self.fit_end, length - 1, stride)
        return [self.rec.states[s : s + length] for s in starts]


def regular(times: np.ndarray) -> np.ndarray:
    return np.isclose(np.diff(times), DT, atol=1e-6)


def windows(times: np.ndarray, begin: int, end: int, horizon: int, stride: int) -> list[int]:
    """Starts ``begin, begin + stride, ...`` of gap-free ``horizon``-step windows in
    ``[begin, end)``."""
    ok = regular(times)
    return [
        s
        for s in range(begin, end - horizon, stride)
        if s + horizon < end and ok[s : s + horizon].all()
    ]


def gap_free_run(times: np.ndarray, begin: int, end: int) -> int:
    """States from ``begin`` up to the first gap (or ``end``)."""
    ok = regular(times)
    n = 1
    while begin + n < end and ok[begin + n - 1]:
        n += 1
    return n


# ----------------------------------------------------------------------------------- models


class HNNField(nn.Module):
    """A Hamiltonian neural network: an MLP ``H(q, p)`` (HNN's 2-200-200-1, tanh, orthogonal,
    no last bias) whose symplectic gradient ``(dH/dp, -dH/dq)`` is the field.

    ``dH/dx`` is written out by the chain rule through the two tanh layers (what
    ``autograd.grad(H, x, create_graph=True)`` computes, without a double backward)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.l2 = nn.Linear(2, 200), nn.Linear(200, 200)
        self.l3 = nn.Linear(200, 1, bias=False)
        for layer in (self.l1, self.l2, self.l3):
            nn.init.orthogonal_(layer.weight)

    def hamiltonian(self, x: Tensor) -> Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))[..., 0]

    def forward(self, x: Tensor) -> Tensor:
        h1 = torch.tanh(self.l1(x))
        h2 = torch.tanh(self.l2(h1))
        d2 = self.l3.weight * (1 - h2**2)  # dH/dz2
        d1 = (d2 @ self.l2.weight) * (1 - h1**2)  # dH/dz1
        dh = d1 @ self.l1.weight  # dH/dx
        return torch.stack([dh[..., 1], -dh[..., 0]], dim=-1)


def rollout(f: nn.Module, starts: Tensor, horizon: int) -> Tensor:
    with torch.no_grad():
        return Rollout(f, horizon, dt=DT, method="rk4")(starts)


def has_step_rule() -> bool:
    return "step_rule" in inspect.signature(NoetherWrapper).parameters


@dataclass(frozen=True)
class Tailoring:
    """How a Noether row tailors: per state (the field, on its one-step RK4 rollout) or per
    window (the whole rollout, anchor or chain, on the first ``inner_horizon`` steps)."""

    g: str
    per_state: bool
    loss_form: str = "anchor"
    inner_horizon: int | None = None
    polyak: bool = False

    def candidates(self) -> tuple[float, ...]:
        return POLYAK_CANDIDATES if self.polyak else CANDIDATES

    def predict(
        self, f: nn.Module, g: nn.Module, lr: float, starts: Tensor, horizon: int,
        guard: float | None = None,
    ) -> Tensor:  # fmt: skip
        extra: dict[str, Any] = {"step_rule": "polyak"} if self.polyak else {}
        extra["guard"] = guard
        if self.per_state:
            net = NoetherWrapper(
                Rollout(f, 1, dt=DT, method="rk4"),
                g,
                inner_lr=lr,
                learn_inner_lr=False,
                predict=_field_of,
                per_sample=starts.shape[0] > 1,  # one sequence: the shared step is the same
                **extra,
            )
            return rollout(net, starts, horizon)
        net = NoetherWrapper(
            Rollout(f, horizon, dt=DT, method="rk4"),
            g,
            inner_lr=lr,
            learn_inner_lr=False,
            loss_form=self.loss_form,  # type: ignore[arg-type]
            inner_horizon=None if self.inner_horizon is None else min(self.inner_horizon, horizon),
            **extra,
        )
        with torch.no_grad():
            out = net(starts)
        assert isinstance(out, Tensor)
        return out


def _field_of(model: Rollout, x: Tensor) -> Tensor:
    return model.step(x)


def noether_rows(polyak: bool) -> dict[str, Tailoring]:
    rows = {
        "testtime_energy": Tailoring("energy", True),
        "testtime_formula": Tailoring("formula", True),
        "testtime_learned": Tailoring("learned", True),
        "meta_learned_frozen": Tailoring("meta", True),
        "window_energy": Tailoring("energy", False),
        "chain_energy": Tailoring("energy", False, "chain", LOCAL),
        "chain_formula_local": Tailoring("formula_local", False, "chain", LOCAL),
    }
    if polyak:
        rows["polyak_energy"] = Tailoring("energy", True, polyak=True)
        rows["polyak_window_energy"] = Tailoring("energy", False, polyak=True)
        rows["polyak_chain_energy"] = Tailoring("energy", False, "chain", LOCAL, polyak=True)
    return rows


@dataclass
class Settings:
    vanilla_steps: int
    meta_steps: int
    g_steps: int
    horizon: int
    polyak: bool
    candidates_cap: int | None = None


@dataclass
class Built:
    """Everything trained for one stage and model seed."""

    fields: dict[str, nn.Module]
    gs: dict[str, nn.Module]
    library: FeatureLibrary
    r_init: float
    seconds: dict[str, float]
    meta_lr: float | None = None  # the meta row's step after meta-training


def build(stage: Stage, seed: int, cfg: Settings) -> Built:
    """Vanilla, control, HNN, the embeddings and the meta-trained g on the stage's fit states."""
    x, target = stage.x, stage.target
    seconds: dict[str, float] = {}
    tag = f"{stage.name} seed {seed}"
    vanilla = hamiltonian.make_field(seed)
    seconds["vanilla"] = hamiltonian.fit(
        vanilla.parameters(), lambda: vanilla(x), target, cfg.vanilla_steps, f"{tag} vanilla"
    )
    control = copy.deepcopy(vanilla)
    seconds["control"] = fit_batches(
        control.parameters(), control, x, target, cfg, f"{tag} control"
    )
    hnn = HNNField(seed)
    seconds["hnn"] = hamiltonian.fit(
        hnn.parameters(), lambda: hnn(x), target, cfg.vanilla_steps, f"{tag} hnn"
    )
    trajs = stage.fit_windows(cfg.horizon + 1, STRIDE)
    library = FeatureLibrary(list(TERMS), variables=["q", "p"])
    formula = fit_conserved(library, trajs, progress=False).embedding
    local = fit_conserved(
        FeatureLibrary(list(TERMS), variables=["q", "p"]),
        stage.fit_windows(LOCAL + 1, 1),
        progress=False,
    ).embedding
    torch.manual_seed(seed)
    mlp = MLPEmbedding(2, hidden=64)
    test_states = stage.rec.states[stage.fit_end : stage.end]
    with torch.no_grad():
        r_init = protocol.pearson(mlp(test_states)[:, 0], energy(test_states))
    learned = fit_conserved(mlp, trajs, steps=cfg.g_steps, lr=1e-3, progress=False).embedding
    gs: dict[str, nn.Module] = {
        "energy": Standardized.fit(Energy(), trajs),
        "formula": formula,
        "formula_local": local,
        "learned": learned,
    }
    fields = {"vanilla": vanilla, "control": control, "hnn": hnn}
    return Built(fields, gs, library, r_init, seconds)


def fit_batches(
    params: Any,
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    target: Tensor,
    cfg: Settings,
    desc: str,
) -> float:
    """Adam (lr 1e-3, weight decay 1e-4, as the vanilla fit) on ``cfg.meta_steps`` random
    batches of ``META_BATCH`` states, the same batches for every caller; seconds per step."""
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1234)
    start = time.perf_counter()
    for _ in tqdm(range(cfg.meta_steps), desc=desc, leave=False):
        idx = torch.randperm(len(x), generator=gen)[:META_BATCH]
        loss = nn.functional.mse_loss(forward(x[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / max(cfg.meta_steps, 1)


def meta_train(built: Built, stage: Stage, cfg: Settings, lr: float, desc: str) -> None:
    """``g`` and the step meta-trained through per-state tailoring with the field frozen at
    vanilla (``net.tailoring_parameters()``), from the learned g and the given step."""
    g = copy.deepcopy(built.gs["learned"])
    net = hamiltonian.tailored_field(built.fields["vanilla"], g, DT, lr, learn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        built.seconds["meta_learned_frozen"] = fit_batches(
            list(net.tailoring_parameters()), net, stage.x, stage.target, cfg, desc
        )
    built.gs["meta"] = net.embedding
    built.meta_lr = net.inner_lr


def projected(f: nn.Module, starts: Tensor, horizon: int, method: str = "rk4") -> Tensor:
    """The expert's baseline (experiments/hamiltonian.py's ``project``): after every step of the
    integrator, three Newton steps back onto the level set of the reference energy."""
    step = Rollout(f, 1, dt=DT, method=method)  # type: ignore[arg-type]
    return hamiltonian.project(step, energy, starts, horizon)


def diagnostics(built: Built, stage: Stage, seed: int, cfg: Settings) -> dict[str, Any]:
    """Probes of how the paper's plain MLP may differ from our vanilla (not rows: nothing
    selects them): the same field rolled out with Euler instead of RK4, the expert's projection
    of those Euler rollouts, and a field trained as HNN's code pairs data (the forward
    difference at the FIRST row of each pair, not the midpoint), all on the test windows."""
    f = built.fields["vanilla"]
    first = hamiltonian.make_field(seed)
    x, target = stage.rec.first[: stage.fit_end], stage.target
    hamiltonian.fit(first.parameters(), lambda: first(x), target, cfg.vanilla_steps, "diag")
    out: dict[str, Any] = {"pred": {}, "whole": {}}
    for where, starts, horizon in (
        ("pred", stage.window_starts(), cfg.horizon),
        ("whole", stage.whole_start(), stage.whole),
    ):
        with torch.no_grad():
            out[where]["vanilla_euler"] = Rollout(f, horizon, dt=DT, method="euler")(starts)
        out[where]["projection_energy_euler"] = projected(f, starts, horizon, method="euler")
        out[where]["vanilla_first_row_states"] = rollout(first, starts, horizon)
    return out


def window_mse(pred: Tensor, truth: Tensor) -> np.ndarray:
    return ((pred - truth) ** 2).mean(dim=(1, 2)).double().numpy()


def beats(base: np.ndarray, cand: np.ndarray) -> bool:
    """``cand`` is ``noether_wrap.tuning.clearly_better`` than ``base`` (per window)."""
    return np.size(base) > 1 and clearly_better(torch.as_tensor(cand), torch.as_tensor(base))


def plain_rows(built: Built, starts: Tensor, horizon: int) -> dict[str, Tensor]:
    f = built.fields
    return {
        "vanilla": rollout(f["vanilla"], starts, horizon),
        "control": rollout(f["control"], starts, horizon),
        "hnn": rollout(f["hnn"], starts, horizon),
        "projection_energy": projected(f["vanilla"], starts, horizon),
    }


def validate(stage: Stage, seed: int, cfg: Settings, rows: dict[str, Tailoring]) -> dict[str, Any]:
    """The validation stage of one model seed: the chosen step per Noether row (None = off) and
    every row's per-window validation errors at its choice."""
    built = build(stage, seed, cfg)
    starts, truth = stage.window_starts(), stage.window_truth()
    val = {r: window_mse(p, truth) for r, p in plain_rows(built, starts, cfg.horizon).items()}
    lrs: dict[str, float | None] = {}
    guards: dict[str, float | None] = {}
    grids: dict[str, dict[str, float]] = {}
    for name, tail in tqdm(rows.items(), desc=f"validation seed {seed}", leave=False):
        if tail.g == "meta":  # from the test-time learned row's step (rows are in order)
            lr0 = lrs["testtime_learned"] or tail.candidates()[0]
            meta_train(built, stage, cfg, lr0, f"{stage.name} seed {seed} meta")
        g = built.gs[tail.g]
        scores: dict[tuple[float, float | None], np.ndarray] = {}
        for c in tail.candidates()[: cfg.candidates_cap]:  # ascending
            for guard in GUARDS:
                with warnings.catch_warnings():  # a diverging candidate is scored, not reported
                    warnings.simplefilter("ignore", RuntimeWarning)
                    pred = tail.predict(
                        built.fields["vanilla"], g, c, starts, cfg.horizon, guard=guard
                    )
                scores[c, guard] = window_mse(pred, truth)
            if not scores[c, None].mean() < GIVE_UP * val["vanilla"].mean():
                break  # larger steps only diverge further
        # the library's rule (noether_wrap.tune's): ties, guards that bind on no window, go to
        # the tightest guard
        chosen = choose(
            {k: torch.as_tensor(e) for k, e in scores.items()},
            torch.as_tensor(val["vanilla"]),
            tiebreak=lambda k: math.inf if k[1] is None else k[1],
        )
        lrs[name] = None if chosen is None else chosen[0]
        guards[name] = None if chosen is None else chosen[1]
        val[name] = val["vanilla"] if chosen is None else scores[chosen]
        grids[name] = {"off": float(val["vanilla"].mean())} | {
            f"{c}" + ("" if guard is None else f" guard {guard}"): float(e.mean())
            for (c, guard), e in scores.items()
        }
    return {"lr": lrs, "guard": guards, "val": val, "grid": grids, "seconds": built.seconds}


def test(
    stage: Stage,
    seed: int,
    cfg: Settings,
    rows: dict[str, Tailoring],
    lrs: dict[str, float | None],
    guards: dict[str, float | None],
) -> dict[str, Any]:
    """The test stage of one model seed: every row's window and whole-segment predictions."""
    built = build(stage, seed, cfg)
    lr0 = lrs["testtime_learned"] or CANDIDATES[0]
    meta_train(built, stage, cfg, lr0, f"{stage.name} seed {seed} meta")
    starts, w0 = stage.window_starts(), stage.whole_start()
    pred = plain_rows(built, starts, cfg.horizon)
    whole = plain_rows(built, w0, stage.whole)
    seconds: dict[str, float] = {}
    for name, tail in tqdm(rows.items(), desc=f"test seed {seed}", leave=False):
        lr = lrs[name]
        if lr is None:  # off: the untailored vanilla field
            pred[name], whole[name] = pred["vanilla"], whole["vanilla"]
            continue
        g = built.gs[tail.g]
        t0 = time.perf_counter()
        guard = guards[name]
        pred[name] = tail.predict(built.fields["vanilla"], g, lr, starts, cfg.horizon, guard)
        seconds[name] = time.perf_counter() - t0
        whole[name] = tail.predict(built.fields["vanilla"], g, lr, w0, stage.whole, guard)
    diag = diagnostics(built, stage, seed, cfg)
    return {
        "pred": pred,
        "whole": whole,
        "built": built,
        "rollout_seconds": seconds,
        "diagnostics": diag,
    }


# ---------------------------------------------------------------------------------- report


def embedding_metrics(g: nn.Module, stage: Stage, r_init: float | None) -> dict[str, Any]:
    truth = torch.cat([stage.window_starts()[:, None], stage.window_truth()], dim=1)
    states = truth.reshape(-1, 2)
    with torch.no_grad():
        codes = g(states).reshape(truth.shape[:2])
    cos, _ = protocol.gradient_alignment(g, energy, states)
    return {
        "abs_r": protocol.pearson(codes, energy(truth)),
        "abs_r_init": r_init,
        "within_var_frac": protocol.within_var_frac(codes),
        "grad_cos": float(cos.median()),
    }


def spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def run_info(threads: int, workers: int) -> dict[str, Any]:
    """This run's settings beside the protocol's provenance (which write_json adds)."""
    return {
        "threads_per_process": threads,
        "workers": workers,
        "data_sha256": SHA256,
        "step_rule_polyak": has_step_rule(),
    }


def summarise(
    runs: list[dict[str, Any]],
    stage: Stage,
    seeds: list[int],
    noether: dict[str, Tailoring],
    cfg: Settings,
    threads: int,
    start: float,
) -> dict[str, Any]:
    names = list(runs[0]["err"])
    errors = {r: np.stack([run["err"][r] for run in runs]) for r in names}
    whole = {r: np.array([run["whole_err"][r] for run in runs]) for r in names}
    truth = torch.cat([stage.window_starts()[:, None], stage.window_truth()], dim=1)
    e_true = energy(truth)
    extras: dict[str, dict[str, Any]] = {}
    for r in names:
        drift, change = [], []
        for run in runs:
            e_pred = energy(run["pred"][r])
            drift.append(float((e_pred - e_true[:, 1:]).abs().mean()))
            change.append(float((e_pred[:, -1] - e_true[:, 0]).mean()))
        we = np.array([float(energy(run["whole"][r][0, -1])) for run in runs])
        extras[r] = {
            "whole_error": float(np.sqrt(whole[r].mean())),
            "whole_ratio": float(np.sqrt(whole[r].mean() / whole["vanilla"].mean())),
            "whole_ratio_per_seed": np.sqrt(whole[r] / whole["vanilla"]).tolist(),
            "whole_ratio_to_control": float(np.sqrt(whole[r].mean() / whole["control"].mean())),
            "energy_error": statistics.fmean(drift),
            "energy_change": statistics.fmean(change),
            "whole_end_energy": float(we.mean()),
        }
        val = np.concatenate([run["val"][r] for run in runs])
        extras[r]["validation_error"] = float(val.mean())
        if r in noether:
            extras[r]["inner_lr_per_seed"] = [run["lr"][r] for run in runs]
            extras[r]["guard_per_seed"] = [run["guard"][r] for run in runs]
            extras[r]["validation_grid"] = [run["grid"][r] for run in runs]
        if r in runs[0]["rollout_seconds"] or r in noether:
            secs = [run["rollout_seconds"][r] for run in runs if r in run["rollout_seconds"]]
            extras[r]["rollout_seconds"] = statistics.fmean(secs) if secs else None
    rows = protocol.row_metrics(errors, extras=extras)
    inner_lr: dict[str, float | None] = {}
    for r in names:
        chosen = [x for x in extras[r].get("inner_lr_per_seed", []) if x is not None]
        inner_lr[r] = statistics.fmean(chosen) if chosen else None
    selected, selection = select(runs, names)
    vanilla_rollout = statistics.fmean(run["vanilla_rollout_seconds"] for run in runs)
    for r in names:
        secs = rows[r].get("rollout_seconds")
        rows[r]["cost_ratio"] = None if secs is None else secs / vanilla_rollout
    spear = []
    for run in runs:
        tailored = [r for r in noether if run["lr"][r] is not None]
        v = [float(run["val"][r].mean()) for r in tailored]
        t = [
            float(math.sqrt(run["err"][r].mean() / run["err"]["vanilla"].mean())) for r in tailored
        ]
        spear.append(spearman(v, t))
    embeddings: dict[str, dict[str, Any]] = {}
    for key, row in (
        ("testtime_energy", "energy"),
        ("testtime_formula", "formula"),
        ("testtime_learned", "learned"),
        ("chain_formula_local", "formula_local"),
        ("meta_learned_frozen", "meta"),
    ):
        ms = [run["embed"][row] for run in runs]
        embeddings[key] = {
            k: None if any(m[k] is None for m in ms) else statistics.fmean(m[k] for m in ms)
            for k in ms[0]
        }
    e_all = energy(stage.rec.states)
    return {
        "example": "real_pendulum",
        "data_seeds": [0],
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
        "metric": f"RMSE of {cfg.horizon}-step RK4 rollouts (dt 1/6 s) from every {STRIDE}th "
        "test state against the recorded states (angle, velocity); whole: one rollout over the "
        "test segment from its first state",
        "inner_lr": inner_lr,
        "selected": selected,
        "selection": selection,
        "rows": rows,
        "embeddings": embeddings,
        "spearman_validation_vs_test": spear,
        "raw_whole_errors": {r: whole[r].tolist() for r in names},
        "windows": {
            "horizon": cfg.horizon,
            "stride": STRIDE,
            "test_starts": stage.starts,
            "whole_steps": stage.whole,
            "n_states": int(len(stage.rec.states)),
            "n_train": stage.rec.n_train,
            "n_test": stage.end - stage.fit_end,
            "test_seconds": float(stage.rec.times[stage.end - 1] - stage.rec.times[stage.fit_end]),
        },
        "data": {
            "energy_first_10": float(e_all[:10].mean()),
            "energy_last_10": float(e_all[-10:].mean()),
            "energy_test_start": float(e_all[stage.fit_end]),
            "energy_test_end": float(e_all[stage.end - 1]),
            "energy_change_per_window_truth": float((e_true[:, -1] - e_true[:, 0]).mean()),
        },
        "formula": [run["formula"] for run in runs],
        "meta_learned_step": [run["meta_learned_step"] for run in runs],
        "diagnostics": diagnostic_summary(runs),
        "formula_local": [run["formula_local"] for run in runs],
        "paper": PAPER,
        "training_seconds": [run["seconds"] for run in runs],
    }


def diagnostic_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios of the diagnostic probes to vanilla (windows, with the bootstrap; whole segment)."""
    base = np.stack([run["err"]["vanilla"] for run in runs])
    base_whole = np.array([run["whole_err"]["vanilla"] for run in runs])
    out: dict[str, Any] = {}
    for name in runs[0]["diag_err"]:
        err = np.stack([run["diag_err"][name] for run in runs])
        whole = np.array([run["diag_whole_err"][name] for run in runs])
        out[name] = {
            "error": protocol.rmse(err),
            "ratio": protocol.rmse(err) / protocol.rmse(base),
            "ratio_ci": list(protocol.bootstrap_ratio(err, base) or (math.nan, math.nan)),
            "whole_ratio": float(np.sqrt(whole.mean() / base_whole.mean())),
            "energy_change": statistics.fmean(run["diag_energy_change"][name] for run in runs),
            "raw_errors": err.tolist(),
            "raw_whole_errors": whole.tolist(),
        }
    return out


def select(runs: list[dict[str, Any]], names: list[str]) -> tuple[str, dict[str, Any]]:
    """The row with the lowest validation error over every (seed, window), kept at vanilla
    unless it beats vanilla by more than the paired standard error."""
    val = {r: np.concatenate([run["val"][r] for run in runs]) for r in names}
    best = min(names, key=lambda r: (val[r].mean(), r != "vanilla"))
    chosen = best if best == "vanilla" or beats(val["vanilla"], val[best]) else "vanilla"
    return chosen, {
        "rule": "lowest validation error; vanilla unless beaten by more than the paired SE",
        "best_by_validation": best,
        "validation_error": {r: float(v.mean()) for r, v in val.items()},
    }


def print_report(report: dict[str, Any]) -> None:
    protocol.print_table(
        f"real pendulum, model seeds {report['seeds']}: {report['metric']}; ratios to vanilla, "
        "95% bootstrap over seeds and windows",
        report["rows"],
        inner_lr=report["inner_lr"],
        selected=report["selected"],
        extra_columns=[
            ("whole_ratio", "whole", ".3f"),
            ("validation_error", "val MSE", ".4f"),
            ("energy_error", "|dE|", ".3f"),
            ("cost_ratio", "cost", ".1f"),
        ],
    )
    data = report["data"]
    print(
        f"\nreference energy: {data['energy_first_10']:.2f} (first rows) -> "
        f"{data['energy_last_10']:.2f} (last rows); test segment {data['energy_test_start']:.2f} "
        f"-> {data['energy_test_end']:.2f}; per window "
        f"{data['energy_change_per_window_truth']:+.3f}"
    )
    print(f"formula per seed: {report['formula']}; local: {report['formula_local']}")
    print("diagnostics (not rows): ratio to vanilla [95% CI], whole-segment ratio, energy change")
    for name, d in report["diagnostics"].items():
        lo, hi = d["ratio_ci"]
        print(
            f"  {name:<26}{d['ratio']:>8.3f} [{lo:.3f}, {hi:.3f}]  {d['whole_ratio']:.3f}  "
            f"{d['energy_change']:+.3f}"
        )
    print(f"Spearman(validation, test ratio) per seed: {report['spearman_validation_vs_test']}")
    print(f"paper: {report['paper']['claim']}")


def stages(rows_raw: np.ndarray, cfg: Settings) -> tuple[Stage, Stage]:
    """The validation stage (fit on the first 80 % of the training states, score the rest of
    training) and the test stage (fit on all training states, score the test segment)."""
    rec = Recording.from_rows(rows_raw)
    n_fit_val = int(rec.n_train * TRAIN_FRACTION)
    return (
        Stage("validation", rec, n_fit_val, rec.n_train, cfg.horizon),
        Stage("test", rec, rec.n_train, len(rec.states), cfg.horizon),
    )


def run_seed(seed: int, rows_raw: np.ndarray, cfg: Settings, threads: int) -> dict[str, Any]:
    """Both stages for one model seed (a process of its own when ``--workers`` > 1)."""
    torch.set_num_threads(threads)
    val_stage, test_stage = stages(rows_raw, cfg)
    noether = noether_rows(cfg.polyak)
    v = validate(val_stage, seed, cfg, noether)
    t = test(test_stage, seed, cfg, noether, v["lr"], v["guard"])
    truth, whole_truth = test_stage.window_truth(), test_stage.whole_truth()
    built: Built = t["built"]
    starts = test_stage.window_starts()
    t0 = time.perf_counter()
    rollout(built.fields["vanilla"], starts, cfg.horizon)
    vanilla_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    rollout(built.fields["hnn"], starts, cfg.horizon)
    t["rollout_seconds"]["hnn"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    projected(built.fields["vanilla"], starts, cfg.horizon)
    t["rollout_seconds"]["projection_energy"] = time.perf_counter() - t0
    embed = {
        name: embedding_metrics(
            built.gs[name], test_stage, built.r_init if name in ("learned", "meta") else None
        )
        for name in ("energy", "formula", "learned", "formula_local", "meta")
    }
    return {
        "err": {r: window_mse(p, truth) for r, p in t["pred"].items()},
        "whole_err": {r: float(window_mse(p, whole_truth)[0]) for r, p in t["whole"].items()},
        "pred": t["pred"],
        "whole": t["whole"],
        "val": v["val"],
        "lr": v["lr"],
        "guard": v["guard"],
        "grid": v["grid"],
        "meta_learned_step": built.meta_lr,
        "diag_err": {r: window_mse(p, truth) for r, p in t["diagnostics"]["pred"].items()},
        "diag_whole_err": {
            r: float(window_mse(p, whole_truth)[0]) for r, p in t["diagnostics"]["whole"].items()
        },
        "diag_energy_change": {
            r: float((energy(p[:, -1]) - energy(starts)).mean())
            for r, p in t["diagnostics"]["pred"].items()
        },
        "seconds": {"validation": v["seconds"], "test": built.seconds},
        "rollout_seconds": t["rollout_seconds"],
        "vanilla_rollout_seconds": vanilla_seconds,
        "embed": embed,
        "formula": built.library.formula(scale_to="p^2"),
        "formula_local": built.gs["formula_local"].embedding.formula(scale_to="p^2"),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=2, help="model seeds (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="first model seed")
    parser.add_argument("--quick", action="store_true", help="a slice of the data, tiny steps")
    protocol.add_threads_argument(parser)  # per process
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="model seeds run in parallel processes of --threads threads each (default: "
        "min(seeds, CPU cores, 2); 1 with --quick)",
    )
    parser.add_argument("--data", type=Path, default=DATA, help="the recording (sha256-checked)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    protocol.set_threads(args.threads)
    rows_raw = load(args.data)
    polyak = has_step_rule()
    if args.quick:
        rows_raw = rows_raw[-120:]
        cfg = Settings(10, 2, 5, 5, polyak, candidates_cap=1)
    else:
        cfg = Settings(2000, 100, 500, 30, polyak)
    _, test_stage = stages(rows_raw, cfg)
    seeds = list(range(args.seed, args.seed + args.seeds))
    workers = args.workers
    if workers is None:
        workers = 1 if args.quick else min(len(seeds), os.cpu_count() or 1, 2)
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(run_seed, s, rows_raw, cfg, args.threads) for s in seeds]
            runs = [f.result() for f in futures]
    else:
        runs = [run_seed(s, rows_raw, cfg, args.threads) for s in seeds]
    report = summarise(runs, test_stage, seeds, noether_rows(polyak), cfg, args.threads, start)
    report["run"] = run_info(args.threads, workers)
    print_report(report)
    protocol.write_json(args.json, report)
    print(f"done in {report['seconds']:.0f} s ({workers} process(es) x {args.threads} thread(s))")
    return report


if __name__ == "__main__":
    main()
