"""The evaluation protocol every experiment reports with (README's "Results" says what each table
shows; docs/pendulum.md#setting walks through one): per-sequence errors, ratios to vanilla with
bootstrap intervals over test sequences and seeds, the worst-sequence share, embedding metrics,
one JSON shape and one table.

Errors enter as ``{row: array}`` of per-sequence mean squared errors, either
``(data_seeds, model_seeds, sequences)`` (the nested design: every data seed draws its own
trajectories, and every model seed is trained on one data seed's training set) or
``(seeds, sequences)``, read as ONE data seed whose model seeds share the same test sequences; so
every example differs from the others only in its physics.

Why the bootstrap is nested (data seeds, then model seeds within each drawn data seed, then that
data seed's test sequences, the same draw for the row and its reference): a data seed fixes the
training AND test trajectories, so the test sequences of two data seeds are different sequences
(sequence 3 of data seed 0 has nothing to do with sequence 3 of data seed 1), and a model seed is
only meaningful inside the data seed it was trained on. Resampling (data seed, model seed) pairs
as exchangeable "seeds" and sequence indices across all of them, as the flat bootstrap did,
treats the model seeds of one data seed as independent replicates of the data and pairs
unrelated sequences: when the data seed moves the ratio (it does: a different training set is a
different model) that interval is too narrow (tests/test_protocol.py measures both). With a
single data seed the outer level draws that one seed every time and the interval says nothing
about other data: it is an interval over model seeds and test sequences only.

Every JSON written by :func:`write_json` carries the raw per-(data seed, model seed, sequence)
errors of every row and the run's provenance, so ``experiments/rederive.py`` recomputes every
figure from the JSON alone.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from noether_wrap import NoetherWrapper
from noether_wrap.tuning import clearly_better

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Version of the metrics below; stored in the JSON so that a re-derivation knows what it redoes.
PROTOCOL_VERSION = 2
#: The row keys :func:`row_metrics` computes from the errors alone (experiments/rederive.py
#: recomputes exactly these from ``raw``; every other key of a row is an example's extra).
DERIVED_KEYS = (
    "error",
    "ratio",
    "ratio_ci",
    "ratio_to_control",
    "ratio_to_control_ci",
    "median_ratio",
    "improved",
    "n_test",
    "worst_share",
    "per_seed",
    "per_data_seed",
    "per_sequence",
    "finite",
)
_CHUNK = 4_000_000  # gathered elements per block of resamples


class Rows(dict):  # type: ignore[type-arg]
    """The ``{row: metrics}`` of :func:`row_metrics`, remembering the nested errors they came
    from (``.errors``: ``{row: (data_seeds, model_seeds, sequences)}``) and the reference rows,
    so that :func:`write_json` can store them as ``raw`` without the caller passing them."""

    errors: dict[str, np.ndarray]
    vanilla: str
    control: str | None


def nested(err: np.ndarray | Sequence[Any]) -> np.ndarray:
    """``(data_seeds, model_seeds, sequences)`` float64 errors; a 2-D ``(seeds, sequences)``
    input is one data seed, a 1-D one one model seed of one data seed."""
    a = np.asarray(err, dtype=np.float64)
    while a.ndim < 3:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"errors must be 1-, 2- or 3-D, got shape {a.shape}")
    return a


def rmse(per_sequence_mse: np.ndarray) -> float:
    """RMSE over every sequence and seed of per-sequence MSEs (any shape)."""
    return float(np.sqrt(np.mean(per_sequence_mse)))


def bootstrap_draws(
    shape: tuple[int, int, int], *, seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nested bootstrap's index draws for errors of ``shape`` ``(D, M, N)``: data seeds
    ``(resamples, D)``; per drawn data seed, its model seeds ``(resamples, D, M)`` and its test
    sequences ``(resamples, D, N)``. Drawn in this order from ``default_rng(seed)``, so every row
    (and a re-derivation from the JSON) sees the same draws."""
    d, m, n = shape
    rng = np.random.default_rng(seed)
    data = rng.integers(0, d, size=(resamples, d))
    models = rng.integers(0, m, size=(resamples, d, m))
    seqs = rng.integers(0, n, size=(resamples, d, n))
    return data, models, seqs


def bootstrap_means(
    err: np.ndarray, draws: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> np.ndarray:
    """The mean error of every resample, ``(resamples,)``, vectorised in blocks."""
    err = nested(err)
    data, models, seqs = draws
    resamples, d = data.shape
    m, n = models.shape[2], seqs.shape[2]
    out = np.empty(resamples)
    block = max(1, _CHUNK // max(1, d * m * n))
    for i in range(0, resamples, block):
        dd = data[i : i + block, :, None, None]
        mm = models[i : i + block, :, :, None]
        nn_ = seqs[i : i + block, :, None, :]
        out[i : i + block] = err[dd, mm, nn_].mean(axis=(1, 2, 3))
    return out


def bootstrap_ratio(
    row: np.ndarray,
    base: np.ndarray,
    *,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float] | None:
    """95 % percentile interval of ``rmse(row) / rmse(base)`` under the nested bootstrap (see
    the module docstring): data seeds, then model seeds within each drawn data seed, then that
    data seed's test sequences, the same draw for ``row`` and ``base`` (paired).

    Args:
        row, base: per-sequence MSEs, ``(data_seeds, model_seeds, sequences)`` or ``(seeds,
            sequences)`` (one data seed).

    Returns:
        ``(low, high)``, or None when an error is infinite or NaN, or ``base`` is all zero (no
        interval exists; :func:`row_metrics` flags the row ``finite: False``), never NaN bounds.
    """
    a, b = nested(row), nested(base)
    if a.shape != b.shape:
        raise ValueError(f"row {a.shape} and base {b.shape} differ in shape")
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or not b.any():
        return None
    draws = bootstrap_draws(a.shape, seed=seed, resamples=resamples)
    num, den = bootstrap_means(a, draws), bootstrap_means(b, draws)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.sqrt(num / den)
    # a resample that drew only sequences the base predicts perfectly has no ratio: +inf if the
    # row errs there (the row is worse), 1 if neither does
    ratios = np.where(den > 0, ratios, np.where(num > 0, np.inf, 1.0))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_ratio_flat(
    row: np.ndarray,
    base: np.ndarray,
    *,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float]:
    """The interval examples reported before the nested design, kept to show its failure mode
    (tests/test_protocol.py): (data seed, model seed) pairs flattened into exchangeable "seeds",
    and one draw of sequence indices shared by all of them."""
    a = nested(row).reshape(-1, nested(row).shape[-1])
    b = nested(base).reshape(a.shape)
    rng = np.random.default_rng(seed)
    s, n = a.shape
    seeds = rng.integers(0, s, size=(resamples, s))
    seqs = rng.integers(0, n, size=(resamples, n))
    num = a[seeds[:, :, None], seqs[:, None, :]].mean(axis=(1, 2))
    den = b[seeds[:, :, None], seqs[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(np.sqrt(num / den), [2.5, 97.5])
    return float(lo), float(hi)


def row_metrics(
    errors: Mapping[str, np.ndarray],
    *,
    vanilla: str = "vanilla",
    control: str | None = "control",
    extras: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> Rows:
    """Every row's protocol metrics.

    Args:
        errors: ``{row: (data_seeds, model_seeds, sequences)}`` per-sequence MSEs, or ``{row:
            (seeds, sequences)}`` (one data seed); all rows on the same sequences.
        vanilla, control: the reference rows.
        extras: per-row additions (e.g. in/out-of-range ratios, drift), merged in.
        seed, resamples: the bootstrap's (every row gets the same draws).

    Returns:
        ``{row: {"error", "ratio", "ratio_ci", "ratio_to_control", "ratio_to_control_ci",
        "median_ratio", "improved", "n_test", "worst_share", "per_seed", "per_data_seed",
        "per_sequence", "finite", ...}}`` (a :class:`Rows`, which also holds the nested errors).
        ``per_seed``: RMSE per (data seed, model seed), data seed major; ``per_data_seed``: the
        ratio to vanilla within each data seed; ``per_sequence``: the MSE per test sequence
        averaged over model seeds, data seed major. ``finite`` is False when the row (or
        vanilla) has an infinite or NaN error: its intervals are then None and its ratios may be
        inf or NaN (written as null in the JSON).
    """
    nest = {name: nested(err) for name, err in errors.items()}
    base = nest[vanilla]
    ctrl = None if control is None or control not in nest else nest[control]
    out = Rows()
    out.errors, out.vanilla = nest, vanilla
    out.control = control if ctrl is not None else None

    def ratio(a: np.ndarray, b: np.ndarray) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.float64(rmse(a)) / np.float64(rmse(b)))

    for name, err in nest.items():
        finite = bool(np.isfinite(err).all() and np.isfinite(base).all())
        with np.errstate(divide="ignore", invalid="ignore"):
            per_seq_ratio = np.sqrt(err / np.maximum(base, 1e-300))
            per_seq = err.mean(axis=1)  # (data seeds, sequences): over model seeds
            total = per_seq.sum()
            worst = float(per_seq.max() / total) if total > 0 else 0.0
        d, m, _ = err.shape
        ci = bootstrap_ratio(err, base, seed=seed, resamples=resamples)
        ctrl_ci = (
            None if ctrl is None else bootstrap_ratio(err, ctrl, seed=seed, resamples=resamples)
        )
        metrics: dict[str, Any] = {
            "error": rmse(err),
            "ratio": ratio(err, base),
            "ratio_ci": None if ci is None else list(ci),
            "ratio_to_control": None if ctrl is None else ratio(err, ctrl),
            "ratio_to_control_ci": None if ctrl_ci is None else list(ctrl_ci),
            "median_ratio": float(np.median(per_seq_ratio)),
            "improved": int((err < base).sum()),
            "n_test": int(err.size),
            "worst_share": worst,
            "per_seed": [rmse(err[i, j]) for i in range(d) for j in range(m)],
            "per_data_seed": [ratio(err[i], base[i]) for i in range(d)],
            "per_sequence": per_seq.reshape(-1).tolist(),
            "finite": finite,
        }
        if extras and name in extras:
            metrics.update(extras[name])
        out[name] = metrics
    return out


def nested_errors(runs: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """``{row: (data_seeds, model_seeds, sequences)}`` from runs holding ``err`` ``{row:
    (sequences,)}``, grouped by each run's ``data_seed`` (runs without one are one data seed), in
    the order the data seeds first appear; every data seed must have as many model seeds."""
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r.get("data_seed"), []).append(r)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"every data seed needs as many model seeds, got {sorted(sizes)}")
    names = list(runs[0]["err"])
    return {
        row: np.stack(
            [
                np.stack([np.asarray(r["err"][row], dtype=np.float64) for r in g])
                for g in groups.values()
            ]
        )
        for row in names
    }


def summarise_runs(
    runs: Sequence[Mapping[str, Any]], extras: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, float | None], str]:
    """Rows, steps and the selected row from runs (one per data and model seed) that each hold
    ``err`` ``{row: (sequences,)}`` per-sequence MSEs, ``val`` ``{noether row: validation
    error}``, ``lr`` ``{noether row: chosen step}`` and ``data_seed`` (runs of one data seed
    share its test sequences; without it all runs are one data seed).

    Returns:
        ``(rows, inner_lr, selected)``: :func:`row_metrics` plus each Noether row's validation
        error and per-seed steps; the mean step per row (None for rows without tailoring); the
        Noether row with the lowest mean validation error.
    """
    names = list(runs[0]["err"])
    errors = nested_errors(runs)
    rows = row_metrics(errors, extras=extras)
    scored = list(runs[0]["val"])
    val = {row: float(np.mean([r["val"][row] for r in runs])) for row in scored}
    inner_lr: dict[str, float | None] = dict.fromkeys(names)
    for row in scored:
        rows[row]["validation_error"] = val[row]
        if row in runs[0]["lr"]:
            rows[row]["inner_lr_per_seed"] = [r["lr"][row] for r in runs]
            inner_lr[row] = float(np.mean(rows[row]["inner_lr_per_seed"]))
    per_sequence = None
    if all("val_seq" in r for r in runs):
        per_sequence = {
            row: np.concatenate([np.asarray(r["val_seq"][row], dtype=np.float64) for r in runs])
            for row in runs[0]["val_seq"]
        }
    return rows, inner_lr, select_row(val, per_sequence)


def pearson(a: Tensor, b: Tensor) -> float:
    """``|r|`` between two tensors of equal size."""
    x = torch.stack([a.flatten().double(), b.flatten().double()])
    return float(torch.corrcoef(x)[0, 1].abs())


def within_var_frac(codes: Tensor) -> float:
    """Within-trajectory variance of a scalar ``g`` over its total variance, ``codes``
    ``(trajectories, T)``: 0 = conserved."""
    c = codes.double()
    return float(((c - c.mean(1, keepdim=True)) ** 2).mean() / c.var(unbiased=False))


def gradient_alignment(
    g: Callable[[Tensor], Tensor], truth: Callable[[Tensor], Tensor], states: Tensor
) -> tuple[Tensor, Tensor]:
    """Per state: ``|cos(grad g, grad H)|`` and ``|grad g| / |grad H|``, for scalar ``g``."""
    x = states.detach().double().requires_grad_()
    (dg,) = torch.autograd.grad(g(x.float()).double().sum(), x)
    x2 = states.detach().double().requires_grad_()
    (dh,) = torch.autograd.grad(truth(x2).sum(), x2)
    cos = torch.nn.functional.cosine_similarity(dg, dh, dim=-1).abs()
    ratio = dg.norm(dim=-1) / dh.norm(dim=-1).clamp_min(1e-12)
    return cos, ratio


def tuned_step(result: Any) -> tuple[float, float, float]:
    """``(step, validation loss, start step)`` from a ``tune_inner_lr`` result: the step is 0.0
    and the loss the untailored one where tuning switched tailoring off (``best`` None, the
    wrapper then at ``inner_steps = 0``); the start step is the best-scoring candidate even then,
    what a meta-training run initialised from this row starts from (a step of 0 learns nothing)."""
    start = min(result.losses, key=lambda c: result.losses[c])
    if result.best is None:
        return 0.0, float(result.untailored), float(start)
    return float(result.best), float(result.losses[result.best]), float(result.best)


def select_row(
    validation: Mapping[str, float], per_sequence: Mapping[str, np.ndarray] | None = None
) -> str:
    """The row a training-data rule picks, among every row scored on validation (vanilla
    included where the example scores it): the lowest validation error; with ``per_sequence``
    validation errors (paired: the same validation sequences, in the same order, for every row),
    vanilla unless that row is ``noether_wrap.tuning.clearly_better`` (better on more sequences
    than it is worse on, and by more than the paired standard error: the rule the library's
    tuning applies to every step). Ties go to vanilla."""
    best = min(validation, key=lambda r: (validation[r], r != "vanilla"))
    if per_sequence is None or best == "vanilla" or "vanilla" not in per_sequence:
        return best
    if best not in per_sequence:
        return best
    if per_sequence[best].size < 2:
        return "vanilla"
    return best if clearly_better(per_sequence[best], per_sequence["vanilla"]) else "vanilla"


def clip_groups(net: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The parameter groups a row optimises, each clipped to norm 1 on its own: the predictor's
    weights (the one group control has, so a joint meta row's predictor takes steps clipped
    exactly as control's are, however large g's gradient is) and the tailoring parameters (g,
    and the step when learned)."""
    if not isinstance(net, NoetherWrapper):
        return [[p for p in net.parameters() if p.requires_grad]]
    model = [p for p in net.model.parameters() if p.requires_grad]
    tailoring = list(net.tailoring_parameters())
    return [group for group in (model, tailoring) if group]


def new_run() -> dict[str, Any]:
    """An empty record for one (data seed, model seed) run: per-sequence test errors (``err``),
    extra metrics, tuned steps (``lr``), start steps, validation errors (``val``, ``val_seq``),
    embeddings, predictions and seconds, each ``{row: value}``."""
    keys = ("err", "extra", "lr", "start", "val", "val_seq", "g", "pred", "seconds")
    return {key: {} for key in keys}


def record_validation(out: dict[str, Any], row: str, per_sequence: Sequence[float]) -> None:
    """Store the per-sequence validation errors of a row that is not tuned (vanilla, a
    projection): it competes for ``selected`` on the same sequences as the tuned rows."""
    scores = [float(v) for v in per_sequence]
    out["val"][row] = float(np.mean(scores))
    out.setdefault("val_seq", {})[row] = scores


def record_tuning(
    out: dict[str, Any], row: str, result: Any, *, untailored: str | None = None
) -> None:
    """Store a ``tune_inner_lr`` result for ``row`` in a run's ``out``: its step, validation
    error and start step (:func:`tuned_step`) and its per-sequence validation errors
    (``val_seq``). ``untailored``: the row the tailored model is without tailoring (vanilla for
    test-time rows); its validation scores are recorded too, once, so it competes for
    ``selected``."""
    out["lr"][row], out["val"][row], out["start"][row] = tuned_step(result)
    out.setdefault("val_seq", {})[row] = tuned_scores(result)
    if untailored is not None and untailored not in out["val"]:
        out["val"][untailored] = float(result.untailored)
        out["val_seq"][untailored] = [float(v) for v in result.per_sequence[None]]


def base_report(
    example: str,
    runs: Sequence[Mapping[str, Any]],
    rows: Mapping[str, Any],
    inner_lr: Mapping[str, float | None],
    selected: str,
    *,
    seeds: Sequence[int],
    data_seeds: Sequence[int],
    start: float,
    metric: str,
    embeddings: Mapping[str, Any],
    threads: int,
) -> dict[str, Any]:
    """The keys every experiment's JSON starts with (the rest are the experiment's own); the
    Spearman agreement is over the rows with a tuned step."""
    return {
        "example": example,
        "data_seeds": list(data_seeds),
        "seeds": list(seeds),
        "seconds": time.perf_counter() - start,
        "metric": metric,
        "inner_lr": dict(inner_lr),
        "selected": selected,
        "spearman_val_test": rank_agreement(
            runs, rows, [r for r, v in inner_lr.items() if v is not None]
        ),
        "rows": rows,
        "embeddings": embeddings,
        "threads": threads,
    }


def tailoring_rows(
    out: dict[str, Any],
    name: str,
    make: Callable[[float], NoetherWrapper],
    tune: Callable[[NoetherWrapper], Any],
    score: Callable[[str, NoetherWrapper], None],
    *,
    fixed_step: float,
    untailored: str,
) -> None:
    """The two test-time rows of a ``g``: ``testtime_<name>`` (a fixed step, starting at
    ``fixed_step``) and ``polyak_<name>`` (the Polyak rule, γ = 1, unclipped so γ is the fraction
    removed), each built by ``make(step)``, tuned by ``tune(net)`` (recorded with
    :func:`record_tuning`) and scored by ``score(row, net)``."""
    for prefix, rule, step in (("testtime", "fixed", fixed_step), ("polyak", "polyak", 1.0)):
        net = make(step)
        if rule == "polyak":
            net.step_rule = rule
            net.max_inner_grad_norm = None
        row = f"{prefix}_{name}"
        record_tuning(out, row, tune(net), untailored=untailored)
        score(row, net)


def tuned_scores(result: Any) -> list[float]:
    """Every validation sequence's loss under a ``tune_inner_lr`` result's outcome (the chosen
    step, or the untailored model where tuning switched tailoring off): the paired scores
    :func:`select_row` compares rows with."""
    return [float(v) for v in result.chosen_scores()]


def rank_agreement(
    runs: Sequence[Mapping[str, Any]], rows: Mapping[str, Mapping[str, Any]], noether: Sequence[str]
) -> dict[str, float | None]:
    """Per data seed, the Spearman correlation between the validation errors of the ``noether``
    rows that are on (a row switched off in every run of the data seed, step 0, is left out: its
    validation error is vanilla's) and their test ratios to vanilla: whether validation ranks
    rows as the test does (None with fewer than 3 rows on, or a constant column)."""
    from noether_wrap.validation import spearman

    seeds = sorted({r.get("data_seed", 0) for r in runs})
    out: dict[str, float | None] = {}
    for i, seed in enumerate(seeds):
        mine = [r for r in runs if r.get("data_seed", 0) == seed]
        names = [
            n
            for n in noether
            if n in mine[0]["val"]
            and n in rows
            and not all(r["lr"].get(n, None) == 0.0 for r in mine)
        ]
        if len(names) < 3:
            out[str(seed)] = None
            continue
        val = torch.tensor([float(np.mean([r["val"][n] for r in mine])) for n in names])
        test = torch.tensor([float(rows[n]["per_data_seed"][i]) for n in names])
        rho = float(spearman(val, test))
        out[str(seed)] = None if math.isnan(rho) else rho
    return out


def print_table(
    title: str,
    rows: Mapping[str, Mapping[str, Any]],
    *,
    inner_lr: Mapping[str, float | None],
    selected: str | None,
    extra_columns: Sequence[tuple[str, str, str]] = (),
) -> None:
    """One line per row: error, ratio and its interval, to control, median, improved, worst.

    ``extra_columns``: ``(key, header, format)`` read from each row's metrics.
    """
    head = (
        f"{'row':<26}{'error':>9}{'ratio':>8}{'95% CI':>16}{'/ctrl':>7}{'median':>8}"
        f"{'improved':>10}{'worst':>7}{'step':>8}"
    )
    head += "".join(f"{h:>{max(len(h) + 1, 9)}}" for _, h, _ in extra_columns)
    print(f"\n{title}\n{head}")
    for name, m in rows.items():
        ctrl = m["ratio_to_control"]
        step = inner_lr.get(name)
        improved = f"{m['improved']}/{m['n_test']}"
        line = (
            f"{name + (' *' if name == selected else ''):<26}{_num(m['error'], '.4f'):>9}"
            f"{_num(m['ratio'], '.3f'):>8}"
            f"{format_ci(m['ratio_ci']):>16}{'—' if ctrl is None else _num(ctrl, '.3f'):>7}"
            f"{_num(m['median_ratio'], '.3f'):>8}{improved:>10}"
            f"{_num(m['worst_share'], '.2f'):>7}{'—' if step is None else f'{step:.3g}':>8}"
        )
        for key, h, fmt in extra_columns:
            value = m.get(key)
            cell = "—" if value is None else format(value, fmt)
            line += f"{cell:>{max(len(h) + 1, 9)}}"
        print(line)
    if selected is not None:
        print(f"* selected by validation error on training data: {selected}")
    bad = [name for name, m in rows.items() if m.get("finite") is False]
    if bad:
        print("non-finite errors (no interval): " + ", ".join(bad))


def _num(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—" if value is None else str(value)
    return format(value, fmt)


def format_ci(ci: Sequence[float] | None) -> str:
    """``[lo, hi]`` to three decimals, or ``n/a (non-finite)`` where no interval exists."""
    if ci is None:
        return "n/a (non-finite)"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def add_threads_argument(parser: Any) -> None:
    """``--threads`` (default 1): results depend on the thread count (reductions split
    differently), so every example fixes it and records it in the JSON's provenance."""
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (fixed: results depend on it)"
    )


def add_run_arguments(parser: Any) -> None:
    """The arguments every seeded experiment takes: ``--quick``, ``--data-seed(s)``,
    ``--seed(s)`` (model seeds: 2, or 1 with ``--quick``), ``--threads``, ``--json``, ``--plot``.
    Add the experiment's own after it; read the seeds with :func:`run_seeds`."""
    parser.add_argument("--quick", action="store_true", help="a smoke run, for the tests")
    parser.add_argument("--data-seed", type=int, default=0, help="first data seed")
    parser.add_argument("--data-seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="first model seed")
    parser.add_argument("--seeds", type=int, default=None, help="model seeds (2; --quick 1)")
    add_threads_argument(parser)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)


def run_seeds(args: Any) -> tuple[list[int], list[int]]:
    """``(model seeds, data seeds)`` from :func:`add_run_arguments`' arguments; sets the
    thread count as a side effect (every experiment's first act)."""
    set_threads(args.threads)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    seeds = list(range(args.seed, args.seed + n_seeds))
    return seeds, list(range(args.data_seed, args.data_seed + args.data_seeds))


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write (80 dpi, the parent folders made) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)``, at startup, before any work."""
    if threads < 1:
        raise ValueError(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_state() -> tuple[str | None, bool | None]:
    commit = _git("rev-parse", "HEAD")
    status = None if commit is None else _git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


#: The commit and dirty flag when the run started (a long run outlives later commits).
_STARTED_AT = _git_state()


def provenance(seconds: float | None = None) -> dict[str, Any]:
    """What produced a result: package version, git commit (None outside a repository) and
    whether the tracked files differed from it, both as the run started; torch version, torch's
    thread count, the command line, Python, the platform, the run's seconds and when it was
    written (UTC)."""
    try:
        import noether_wrap

        version: str | None = noether_wrap.__version__
    except Exception:  # noqa: BLE001 - a broken install still gets its provenance written
        try:
            from importlib.metadata import version as _version

            version = _version("noether_wrap")
        except Exception:  # noqa: BLE001
            version = None
    commit, dirty = _STARTED_AT
    return {
        "package_version": version,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy_version": np.__version__,
        "command": [Path(sys.executable).name, *sys.argv],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "seconds": seconds,
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _json_safe(value: Any) -> Any:
    """Non-finite floats as null (strict JSON has no inf or NaN; ``finite`` says which rows)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def json_text(report: Mapping[str, Any]) -> str:
    """The JSON text :func:`write_json` writes (non-finite floats as null)."""
    return json.dumps(_json_safe(report), indent=2, allow_nan=False)


def finish_report(report: dict[str, Any], start: float, path: Path | None) -> None:
    """A table-only experiment's end: record ``seconds`` since ``start`` (``perf_counter``)
    and the provenance, write the JSON to ``path`` (if given), and say how long it took."""
    report["seconds"] = time.perf_counter() - start
    report["provenance"] = provenance(report["seconds"])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json_text(report))
    print(f"done in {report['seconds']:.0f} s")


def write_json(
    path: Path | None,
    report: Mapping[str, Any],
    *,
    errors: Mapping[str, np.ndarray] | None = None,
    vanilla: str | None = None,
    control: str | None = None,
) -> dict[str, Any] | None:
    """Write the protocol's JSON (``example``, ``data_seeds``, ``seeds``, ``seconds``,
    ``metric``, ``inner_lr``, ``selected``, ``rows``, ``embeddings`` and the example's extras),
    adding:

    - ``raw``: ``{row: [[[mse per test sequence] per model seed] per data seed]}``, from
      ``errors`` or else from the :class:`Rows` of :func:`row_metrics` / :func:`summarise_runs`
      in ``report["rows"]``;
    - ``protocol``: what re-derives the rows from ``raw`` (``version``, ``vanilla``,
      ``control``, ``bootstrap_seed``, ``resamples``, ``raw_shape``: data seeds, model seeds,
      sequences);
    - ``provenance``: see :func:`provenance`.

    Non-finite floats are written as null. Returns the dict written (None without a path).
    """
    if path is None:
        return None
    required = {"example", "data_seeds", "seeds", "seconds", "metric", "inner_lr", "selected"}
    missing = (required | {"rows", "embeddings"}) - set(report)
    if missing:
        raise ValueError(f"report lacks {sorted(missing)}")
    rows = report["rows"]
    if errors is None and isinstance(rows, Rows):
        errors = rows.errors
    if vanilla is None:
        vanilla = rows.vanilla if isinstance(rows, Rows) else "vanilla"
    if control is None and isinstance(rows, Rows):
        control = rows.control
    elif control is None and "control" in rows:
        control = "control"
    out = dict(report)
    if errors is not None:
        raw = {row: nested(e) for row, e in errors.items()}
        shapes = {a.shape for a in raw.values()}
        if len(shapes) != 1:
            raise ValueError(f"raw errors differ in shape: {sorted(shapes)}")
        out["raw"] = {row: a.tolist() for row, a in raw.items()}
        out["protocol"] = {
            "version": PROTOCOL_VERSION,
            "vanilla": vanilla,
            "control": control,
            "bootstrap_seed": BOOTSTRAP_SEED,
            "resamples": BOOTSTRAP_RESAMPLES,
            "raw_shape": list(shapes.pop()),
        }
    elif "raw" not in out:
        print("warning: no raw errors for the JSON: it cannot be re-derived", file=sys.stderr)
        out["raw"] = None
    out["provenance"] = provenance(report.get("seconds"))
    text = json_text(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def steps_cell(per_run: Sequence[float] | None, mean: float | None) -> str:
    """The steps the runs of a row used, as they were chosen (never their average, which no run
    used): ``0.1`` when every run chose it, else each value with its count, ``off`` for a
    tailoring switched off (step 0)."""
    if not per_run:
        return "—" if mean is None else f"{mean:.3g}"
    counts: dict[str, int] = {}
    for value in per_run:
        key = "off" if value is None or value == 0 else f"{value:.3g}"
        counts[key] = counts.get(key, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{k}×{n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def markdown_table(
    report: Mapping[str, Any], extra_columns: Sequence[tuple[str, str, str]] = ()
) -> str:
    """The report's rows as a markdown table (the docs quote these, never rounder numbers)."""
    head = ["row", "error", "ratio", "95% CI", "/ control", "median", "improved", "worst", "step"]
    per_data_seed = len(report.get("data_seeds", [])) > 1
    if per_data_seed:
        head.insert(4, "per data seed")
    head += [h for _, h, _ in extra_columns]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in report["rows"].items():
        step = report["inner_lr"].get(name)
        ctrl = m["ratio_to_control"]
        label = f"**{name}** (selected)" if name == report["selected"] else name
        cells = [
            label,
            _num(m["error"], ".4f"),
            _num(m["ratio"], ".3f"),
            format_ci(m["ratio_ci"]),
            "—" if ctrl is None else _num(ctrl, ".3f"),
            _num(m["median_ratio"], ".3f"),
            f"{m['improved']}/{m['n_test']}",
            _num(m["worst_share"], ".2f"),
            steps_cell(m.get("inner_lr_per_seed"), step),
        ]
        if per_data_seed:
            values = m.get("per_data_seed")
            cells.insert(4, "—" if not values else ", ".join(_num(v, ".3f") for v in values))
        for key, _, fmt in extra_columns:
            value = m.get(key)
            cells.append("—" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        print(markdown_table(json.loads(Path(arg).read_text())))
