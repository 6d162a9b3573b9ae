"""The evaluation protocol every example reports with (../shared/EVALUATION.md in the repo's
steering notes; summarised in docs/evaluation.md): per-sequence errors, ratios to vanilla with
bootstrap intervals over test sequences and seeds, the worst-sequence share, embedding metrics,
one JSON shape and one table.

Errors enter as ``{row: array (seeds, sequences)}`` of per-sequence mean squared errors, so every
example differs from the others only in its physics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

BOOTSTRAP_RESAMPLES = 2000


def rmse(per_sequence_mse: np.ndarray) -> float:
    """RMSE over every sequence (and seed) of ``(seeds, sequences)`` per-sequence MSEs."""
    return float(np.sqrt(np.mean(per_sequence_mse)))


def bootstrap_ratio(
    row: np.ndarray, base: np.ndarray, *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """95 % percentile interval of ``rmse(row) / rmse(base)``, resampling seeds and test
    sequences (paired: the same draw for both).

    Args:
        row, base: ``(seeds, sequences)`` per-sequence MSEs.
    """
    rng = np.random.default_rng(seed)
    s, n = row.shape
    seeds = rng.integers(0, s, size=(resamples, s))
    seqs = rng.integers(0, n, size=(resamples, n))
    ratios = np.empty(resamples)
    for i in range(resamples):
        a = row[seeds[i]][:, seqs[i]]
        b = base[seeds[i]][:, seqs[i]]
        ratios[i] = math.sqrt(a.mean() / b.mean()) if b.mean() > 0 else math.nan
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def row_metrics(
    errors: Mapping[str, np.ndarray],
    *,
    vanilla: str = "vanilla",
    control: str | None = "control",
    extras: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every row's protocol metrics.

    Args:
        errors: ``{row: (seeds, sequences)}`` per-sequence MSEs; all rows on the same sequences.
        vanilla, control: the reference rows.
        extras: per-row additions (e.g. in/out-of-range ratios, drift), merged in.

    Returns:
        ``{row: {"error", "ratio", "ratio_ci", "ratio_to_control", "median_ratio", "improved",
        "n_test", "worst_share", "per_seed", ...}}``.
    """
    base = errors[vanilla]
    out: dict[str, dict[str, Any]] = {}
    for name, err in errors.items():
        per_seq_ratio = np.sqrt(err / np.maximum(base, 1e-300))
        worst = err.mean(axis=0).max() / err.mean(axis=0).sum() if err.sum() > 0 else 0.0
        metrics: dict[str, Any] = {
            "error": rmse(err),
            "ratio": rmse(err) / rmse(base),
            "ratio_ci": list(bootstrap_ratio(err, base)),
            "ratio_to_control": None
            if control is None or control not in errors
            else rmse(err) / rmse(errors[control]),
            "median_ratio": float(np.median(per_seq_ratio)),
            "improved": int((err < base).sum()),
            "n_test": int(err.size),
            "worst_share": float(worst),
            "per_seed": [rmse(e[None]) for e in err],
            "per_sequence": err.mean(axis=0).tolist(),
        }
        if extras and name in extras:
            metrics.update(extras[name])
        out[name] = metrics
    return out


def summarise_runs(
    runs: Sequence[Mapping[str, Any]], extras: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[dict[str, dict[str, Any]], dict[str, float | None], str]:
    """Rows, steps and the selected row from runs (one per data and model seed) that each hold
    ``err`` ``{row: (sequences,)}`` per-sequence MSEs, ``val`` ``{noether row: validation
    error}`` and ``lr`` ``{noether row: chosen step}``.

    Returns:
        ``(rows, inner_lr, selected)``: :func:`row_metrics` plus each Noether row's validation
        error and per-seed steps; the mean step per row (None for rows without tailoring); the
        Noether row with the lowest mean validation error.
    """
    names = list(runs[0]["err"])
    errors = {row: np.stack([r["err"][row] for r in runs]) for row in names}
    rows = row_metrics(errors, extras=extras)
    noether = list(runs[0]["val"])
    val = {row: float(np.mean([r["val"][row] for r in runs])) for row in noether}
    inner_lr: dict[str, float | None] = dict.fromkeys(names)
    for row in noether:
        rows[row]["validation_error"] = val[row]
        rows[row]["inner_lr_per_seed"] = [r["lr"][row] for r in runs]
        inner_lr[row] = float(np.mean(rows[row]["inner_lr_per_seed"]))
    return rows, inner_lr, select_row(val)


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


def select_row(validation: Mapping[str, float]) -> str:
    """The Noether row a training-data rule picks: the lowest validation error."""
    return min(validation, key=lambda r: validation[r])


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
        ci = m["ratio_ci"]
        ctrl = m["ratio_to_control"]
        step = inner_lr.get(name)
        improved = f"{m['improved']}/{m['n_test']}"
        line = (
            f"{name + (' *' if name == selected else ''):<26}{m['error']:>9.4f}{m['ratio']:>8.3f}"
            f"{f'[{ci[0]:.3f}, {ci[1]:.3f}]':>16}{'—' if ctrl is None else f'{ctrl:.3f}':>7}"
            f"{m['median_ratio']:>8.3f}{improved:>10}"
            f"{m['worst_share']:>7.2f}{'—' if step is None else f'{step:.3g}':>8}"
        )
        for key, h, fmt in extra_columns:
            value = m.get(key)
            cell = "—" if value is None else format(value, fmt)
            line += f"{cell:>{max(len(h) + 1, 9)}}"
        print(line)
    if selected is not None:
        print(f"* selected by validation error on training data: {selected}")


def write_json(path: Path | None, report: Mapping[str, Any]) -> None:
    """Write the protocol's JSON (``example``, ``data_seeds``, ``seeds``, ``seconds``,
    ``metric``, ``inner_lr``, ``selected``, ``rows``, ``embeddings`` and the example's extras)."""
    if path is None:
        return
    required = {"example", "data_seeds", "seeds", "seconds", "metric", "inner_lr", "selected"}
    missing = (required | {"rows", "embeddings"}) - set(report)
    if missing:
        raise ValueError(f"report lacks {sorted(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def markdown_table(
    report: Mapping[str, Any], extra_columns: Sequence[tuple[str, str, str]] = ()
) -> str:
    """The report's rows as a markdown table (the docs quote these, never rounder numbers)."""
    head = ["row", "error", "ratio", "95% CI", "/ control", "median", "improved", "worst", "step"]
    head += [h for _, h, _ in extra_columns]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in report["rows"].items():
        step = report["inner_lr"].get(name)
        ctrl = m["ratio_to_control"]
        label = f"**{name}** (selected)" if name == report["selected"] else name
        cells = [
            label,
            f"{m['error']:.4f}",
            f"{m['ratio']:.3f}",
            f"[{m['ratio_ci'][0]:.3f}, {m['ratio_ci'][1]:.3f}]",
            "—" if ctrl is None else f"{ctrl:.3f}",
            f"{m['median_ratio']:.3f}",
            f"{m['improved']}/{m['n_test']}",
            f"{m['worst_share']:.2f}",
            "—" if step is None else f"{step:.3g}",
        ]
        for key, _, fmt in extra_columns:
            value = m.get(key)
            cells.append("—" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        print(markdown_table(json.loads(Path(arg).read_text())))
