"""Re-derive every table from the results JSON alone: the protocol's metrics and bootstrap
intervals are recomputed from each file's ``raw`` per-(data seed, model seed, sequence) errors
with the bootstrap seed and resample count the file records, and printed as markdown.

    python experiments/rederive.py docs/results/*.json              # the tables, recomputed
    python experiments/rederive.py --check docs/results/*.json      # exit 1 on any mismatch
    python experiments/rederive.py --write-docs docs/*.md -- docs/results/*.json

``--check`` compares every recomputed figure with the one stored in the JSON, exactly (the JSON
text of both); a protocol report without ``raw`` cannot be re-derived and fails the check.
``--write-docs PAGE...`` rewrites, in each page, every block between ``<!-- table:NAME -->`` and
``<!-- /table -->`` with a table generated from the JSONs, so that no table is typed:

- ``NAME``: the protocol table of ``NAME.json`` (recomputed from ``raw``);
- ``NAME.curves``: the test-time k-curves of ``NAME.json`` (``raw_test_steps``), plain and
  backtracking, ratios and intervals recomputed;
- ``NAME.embeddings``: the embedding metrics of ``NAME.json``'s ``g`` (``embeddings``, as
  stored: the example measures them on its test states, no raw inputs are kept);
- ``NAME.embeddings_rows``: the same, each ``g`` beside its protocol row (step, ratio with
  interval, median, improved; recomputed from ``raw``);
- ``real_pendulum.probes``: the real pendulum's diagnostic probes (``diagnostics``), ratio and
  interval recomputed from their raw errors;
- ``summary``: one line per example report given (README's results table);
- ``newcomer``: the newcomer's in-range / out-of-range table (per-seed ratios recomputed from
  the stored per-seed errors);
- ``tailoring``, ``tailoring.memory``, ``compat`` and ``compat.probe``: the benchmarks' JSONs
  (medians of the stored repetitions; peak memory).

An example's extra columns (drift, SSIM, ...) are the example's own figures, copied from the JSON;
only the protocol's columns are recomputed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from noether_experiments import protocol

#: Extra table columns per example: ``(key, header, format)`` as the examples print them.
EXTRA_COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "pendulum": [
        ("ratio_in_range", "in-range", ".3f"),
        ("ratio_out_of_range", "out-range", ".3f"),
        ("energy_drift", "H drift", ".3f"),
        ("bound", "test-best*", ".3f"),
    ],
    "spring": [
        ("ratio_in_range", "in-range", ".3f"),
        ("ratio_out_of_range", "out-range", ".3f"),
        ("energy_drift", "H drift", ".3f"),
        ("bound", "test-best*", ".3f"),
    ],
    "ising": [
        ("m_drift", "M drift", ".4f"),
        ("m_drift_final", "M drift@T", ".4f"),
        ("energy_error", "E error", ".4f"),
    ],
    "video": [("mse_last", "last MSE", ".5f"), ("ssim", "SSIM", ".3f")],
    "real_pendulum": [
        ("whole_ratio", "whole", ".3f"),
        ("validation_error", "val MSE", ".3g"),
        ("energy_change", "ΔE / window", "+.3f"),
        ("cost_ratio", "cost", ".0f"),
    ],
}
#: The quantity each example's ``g`` is compared with, as the embedding tables' headers name it.
INVARIANT_SYMBOL: dict[str, str] = {
    "pendulum": "H",
    "spring": "H",
    "ising": "M",
    "video": "E",
    "real_pendulum": "E",
}
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def is_report(report: Any) -> bool:
    """A protocol report (an example's results), not some other JSON."""
    return (
        isinstance(report, Mapping)
        and isinstance(report.get("rows"), Mapping)
        and not is_table_only(report)
    )


def is_table_only(report: Any) -> bool:
    """A JSON with tables but not the protocol's row schema, so nothing for ``--check``: a
    benchmark's timings, the newcomer's per-seed figures (no bootstrap), or the real pendulum
    split in time (its table is recomputed from its raw per-window errors)."""
    return isinstance(report, Mapping) and (
        bool(report.get("benchmark"))
        or report.get("example") in ("newcomer", "real_blocks", "precision", "invariants")
    )


def rederive_rows(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The protocol's figures (``protocol.DERIVED_KEYS``) of every row, recomputed from ``raw``
    with the JSON's bootstrap settings, as the JSON writes them (non-finite as null)."""
    raw = report.get("raw")
    if not raw:
        raise ValueError("no raw errors in the JSON: re-run the example to re-derive it")
    settings = report.get("protocol", {})
    errors = {row: np.asarray(values, dtype=np.float64) for row, values in raw.items()}
    rows = protocol.row_metrics(
        errors,
        vanilla=settings.get("vanilla", "vanilla"),
        control=settings.get("control", "control"),
        seed=settings.get("bootstrap_seed", protocol.BOOTSTRAP_SEED),
        resamples=settings.get("resamples", protocol.BOOTSTRAP_RESAMPLES),
    )
    derived = {name: {k: m[k] for k in protocol.DERIVED_KEYS if k in m} for name, m in rows.items()}
    parsed: dict[str, dict[str, Any]] = json.loads(protocol.json_text(derived))
    return parsed


def mismatches(report: Mapping[str, Any]) -> list[str]:
    """Every recomputed figure that differs from the stored one (as JSON text), and every row
    of the report that ``raw`` lacks or the other way round."""
    try:
        derived = rederive_rows(report)
    except ValueError as exc:
        return [str(exc)]
    stored = report["rows"]
    out = [f"row {name}: in raw, not in rows" for name in derived if name not in stored]
    out += [f"row {name}: in rows, not in raw" for name in stored if name not in derived]
    for name, metrics in derived.items():
        if name not in stored:
            continue
        for key, value in metrics.items():
            if json.dumps(stored[name].get(key)) != json.dumps(value):
                out.append(f"row {name} {key}: stored {stored[name].get(key)!r}, got {value!r}")
    return out


def rederived_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report with every row's protocol figures replaced by the recomputed ones (the
    example's extras, the step and the selection kept as stored)."""
    derived = rederive_rows(report)
    rows = {name: {**report["rows"].get(name, {}), **m} for name, m in derived.items()}
    return {**report, "rows": rows}


def table(report: Mapping[str, Any]) -> str:
    """The markdown table of a report, recomputed from ``raw``."""
    extra = EXTRA_COLUMNS.get(str(report.get("example")), [])
    return protocol.markdown_table(rederived_report(report), extra)


def _big(value: float) -> str:
    """A ratio to three decimals, or in scientific notation where a blown-up step made it huge."""
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1e}"


def curves_table(report: Mapping[str, Any]) -> str:
    """The k-curves (``--test-steps``) of a report: per k, plain and backtracking steps, the
    ratio to vanilla with its nested-bootstrap interval and the median per-sequence ratio
    (recomputed from ``raw_test_steps``), the validation error and seconds (as stored)."""
    raw = report.get("raw_test_steps")
    if not raw:
        raise ValueError("no raw_test_steps in the JSON: run the example with --test-steps")
    base = np.asarray(report["raw"]["vanilla"], dtype=np.float64)
    curves = report["test_steps"]
    names = [n for n in ("oracle_none", "oracle_backtrack") if n in raw]
    labels = {"oracle_none": "plain", "oracle_backtrack": "backtracking"}
    head = ["k"]
    for name in names:
        label = labels[name]
        head += [f"{label}: ratio [95% CI]", "median", "validation MSE", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for k in sorted(raw[names[0]], key=int):
        cells = [k]
        for name in names:
            err = np.asarray(raw[name][k], dtype=np.float64)
            finite = bool(np.isfinite(err).all())
            ratio = protocol.rmse(err) / protocol.rmse(base) if finite else math.inf
            ci = protocol.bootstrap_ratio(err, base) if finite else None
            with np.errstate(divide="ignore", invalid="ignore"):
                median = float(np.median(np.sqrt(err / base)))
            stored = curves[name][k]
            cells += [
                f"{_big(ratio)} [{_big(ci[0])}, {_big(ci[1])}]"
                if finite and ci is not None
                else "inf (non-finite)",
                f"{median:.3f}",
                # null in the JSON: a non-finite validation error (a step that blew up)
                "non-finite"
                if stored["validation_error"] is None
                else f"{stored['validation_error']:.5f}",
                f"{stored['seconds']:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The rows a domain expert would try before tailoring, by name.
EXPERT_PREFIXES = ("projection", "hnn", "expert")


def summary_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """README's results table: per protocol report, its seeds, vanilla's error, the selected
    row's ratio to vanilla with interval and per data seed, the experts' rows, how many tuned
    steps came out "off", and validation/test Spearman per data seed; all recomputed from
    ``raw`` but the steps and Spearman (as stored)."""
    head = [
        "results",
        "data × model seeds × test sequences",
        "vanilla error",
        "selected row: ratio [95% CI]",
        "per data seed",
        "experts' baselines",
        "tuned steps off",
        "Spearman(val, test)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for stem, report in reports.items():
        if not is_report(report) or report.get("selected") is None or not report.get("raw"):
            continue  # not an example's results (the newcomer's table is its own)
        if "test_steps" in report:
            continue  # a k-curve run: its own table
        rows = rederived_report(report)["rows"]
        shape = report["protocol"]["raw_shape"]
        selected = report["selected"]
        m = rows[selected]
        vanilla = report.get("protocol", {}).get("vanilla", "vanilla")
        experts = [
            f"{n} {r['ratio']:.3f}" for n, r in rows.items() if n.startswith(EXPERT_PREFIXES)
        ]
        # a tuned row's step per run; "off" is 0 (or None, as real_pendulum writes it)
        steps = [v for r in report["rows"].values() for v in (r.get("inner_lr_per_seed") or [])]
        off = sum(1 for v in steps if not v)
        spearman = report.get("spearman_val_test") or {}
        per_seed = m.get("per_data_seed") or []
        cells = [
            f"[{stem}](docs/results/{stem}.json)",
            " × ".join(str(v) for v in shape),
            f"{rows[vanilla]['error']:.4g}",
            f"`{selected}` {m['ratio']:.3f} {protocol.format_ci(m['ratio_ci'])}",
            ", ".join(f"{v:.3f}" for v in per_seed) if len(per_seed) > 1 else "—",
            "; ".join(experts) if experts else "—",
            f"{off} of {len(steps)}" if steps else "—",
            ", ".join("—" if v is None else f"{v:.2f}" for v in spearman.values()) or "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _median_ratio(seconds: Mapping[str, Sequence[float]], num: str, den: str) -> float:
    return float(np.median(seconds[num]) / np.median(seconds[den]))


def tailoring_table(report: Mapping[str, Any]) -> str:
    """docs/performance.md's table from ``benchmarks/tailoring.py``'s JSON: per cell the
    hand-written step's median ms and every method's median time as a ratio to it."""
    order = [
        "plain",
        "shared",
        "shared_polyak",
        "lowrank",
        "lowrank_polyak",
        "affine",
        "vmap",
        "higher",
        "torchopt",
    ]
    cells_ = report["timings"]
    present = [n for n in order if any(n in c for c in cells_)]
    head = ["hidden", "B", "k", "mode", "hand (ms)", *present]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in cells_:
        hand = float(np.median(c["hand"]["seconds"]))
        row = [str(c["hidden"]), str(c["batch"]), str(c["k"]), c["mode"], f"{1e3 * hand:.1f}"]
        for name in present:
            row.append(f"{np.median(c[name]['seconds']) / hand:.2f}" if name in c else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def memory_table(report: Mapping[str, Any]) -> str:
    """docs/performance.md's memory table from ``benchmarks/tailoring.py``'s JSON: the peak
    resident-set increase of one train step per method, and of the shared step against k."""
    memory = report["memory"]
    lines = ["| one train step, k = 1 | MB |", "| --- | --- |"]
    for name, mb in memory["per_method_mb"].items():
        lines.append(f"| {name} | {mb:.0f} |")
    lines.append(
        f"| one weight copy per sequence (for scale) | "
        f"{memory['one_weight_copy_per_sequence_mb']:.0f} |"
    )
    ks = list(memory["second_order_vs_k_mb"])
    lines += ["", "| k | " + " | ".join(ks) + " |", "|" + " --- |" * (len(ks) + 1)]
    for key, label in (
        ("second_order_vs_k_mb", "second order (shared)"),
        ("first_order_vs_k_mb", "first order (shared)"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{memory[key][k]:.0f}" for k in ks) + " |")
    return "\n".join(lines)


def compat_table(report: Mapping[str, Any]) -> str:
    """docs/compatibility.md's table from ``benchmarks/compat.py``'s JSON: per model its
    ``adapt``, the path it took, the median wrapped training step over the median unwrapped one
    (k and B in the header, from the JSON) and the hand-written shared step's (the floor)."""
    models = report["models"]
    first = next(iter(models.values()))
    head = [
        "model",
        "`adapt`",
        "path",
        f"wrapped step / unwrapped step (k = {first['inner_steps']}, B = {first['batch']})",
        "hand-written shared step / unwrapped",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in models.items():
        adapt = m["adapt"] if m["adapt"] == "all weights" else f"`{m['adapt']}`"
        ratio = _median_ratio(m["seconds"], "wrapped", "plain")
        hand = _median_ratio(m["seconds"], "hand", "plain") if "hand" in m["seconds"] else None
        floor = "—" if hand is None else f"{hand:.2f}×"
        lines.append(f"| {name} | {adapt} | {m['path']} | {ratio:.2f}× | {floor} |")
    return "\n".join(lines)


def compat_probe_table(report: Mapping[str, Any]) -> str:
    """The GRU probe of ``benchmarks/compat.py``'s JSON: per batch size the affine path's and
    the batch-shared step's training step against the unwrapped model's, and against each other."""
    head = ["GRU probe", "affine / unwrapped", "shared / unwrapped", "affine / shared"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in report["gru_probe"].items():
        s = m["seconds"]
        ratios = [("affine", "plain"), ("shared", "plain"), ("affine", "shared")]
        cells = [f"{_median_ratio(s, a, b):.2f}×" for a, b in ratios]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _embedding_columns(report: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The embedding table's headers and the ``embeddings`` keys they show, in the example's
    symbol for the invariant (``INVARIANT_SYMBOL``); a metric no ``g`` of the report has (the
    gradient-magnitude spread outside the Hamiltonian examples) is left out."""
    example = str(report.get("example"))
    if example not in INVARIANT_SYMBOL:
        raise KeyError(f"no invariant symbol for example {example!r} (see INVARIANT_SYMBOL)")
    sym = INVARIANT_SYMBOL[example]
    columns = [
        ("within_var_frac", "within-var fraction"),
        ("grad_cos", f"median \\|cos(∇g, ∇{sym})\\|"),
        ("grad_ratio_spread", f"\\|∇g\\|/\\|∇{sym}\\| top/bottom decile of {sym}"),
    ]
    metrics = report["embeddings"].values()
    present = [(k, h) for k, h in columns if any(k in m for m in metrics)]
    head = ["g", f"\\|r(g, {sym})\\| (init)", *(h for _, h in present)]
    return head, [k for k, _ in present]


def _embedding_cells(m: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """One ``g``'s embedding figures: |r| to four decimals with its value at initialisation
    (``—`` where ``g`` was not trained), the fractions and cosines to four, the spread to two."""
    formats = {"within_var_frac": ".4f", "grad_cos": ".4f", "grad_ratio_spread": ".2f"}
    init = m.get("abs_r_init")
    cells = [f"{protocol._num(m['abs_r'], '.4f')} ({protocol._num(init, '.3f')})"]
    return cells + [protocol._num(m.get(k), formats[k]) for k in keys]


def embeddings_table(report: Mapping[str, Any]) -> str:
    """The embedding metrics of every ``g`` of a report (``embeddings``, copied: the examples
    compute them on their test states and keep no raw inputs): |r(g, invariant)| on the test
    states (at initialisation in brackets), the within-trajectory variance fraction, the median
    |cos| between the gradients of ``g`` and of the invariant, and the ratio of the median
    gradient-magnitude ratio |∇g|/|∇H| in the top decile of the invariant to the bottom one."""
    if not report.get("embeddings"):
        raise ValueError("no embeddings in the JSON")
    head, keys = _embedding_columns(report)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in report["embeddings"].items():
        lines.append("| " + " | ".join([name, *_embedding_cells(m, keys)]) + " |")
    return "\n".join(lines)


def embeddings_rows_table(report: Mapping[str, Any]) -> str:
    """:func:`embeddings_table` with each ``g``'s protocol row beside it: the steps its runs
    chose, its ratio to vanilla with the 95 % interval, the median per-sequence ratio and the
    sequences improved, recomputed from ``raw`` (``—`` for a ``g`` with no row of its name)."""
    if not report.get("embeddings"):
        raise ValueError("no embeddings in the JSON")
    rows = rederived_report(report)["rows"]
    head, keys = _embedding_columns(report)
    head += ["step", "ratio to vanilla [95% CI]", "median", "improved"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in report["embeddings"].items():
        cells = [name, *_embedding_cells(m, keys)]
        r = rows.get(name)
        if r is None:
            cells += ["—"] * 4
        else:
            cells += [
                protocol.steps_cell(r.get("inner_lr_per_seed"), report["inner_lr"].get(name)),
                f"{protocol._num(r['ratio'], '.3f')} {protocol.format_ci(r['ratio_ci'])}",
                protocol._num(r["median_ratio"], ".3f"),
                f"{r['improved']}/{r['n_test']}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probes_table(report: Mapping[str, Any]) -> str:
    """The real pendulum's diagnostic probes (``diagnostics``; not rows, never selected): the
    error, the ratio to vanilla and its nested-bootstrap interval (recomputed from the probe's
    ``raw_errors`` against ``raw``'s vanilla, with the JSON's bootstrap settings), the
    whole-segment ratio (recomputed from ``raw_whole_errors``) and the mean energy change per
    window (as stored: the JSON keeps no per-window energies)."""
    probes = report.get("diagnostics")
    if not probes:
        raise ValueError("no diagnostics in the JSON")
    settings = report.get("protocol", {})
    vanilla = settings.get("vanilla", "vanilla")
    base = protocol.nested(np.asarray(report["raw"][vanilla], dtype=np.float64))
    base_whole = np.asarray(report["raw_whole_errors"][vanilla], dtype=np.float64)
    head = ["probe (not a row)", "error", "ratio", "95% CI", "whole", "ΔE / window"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, d in probes.items():
        err = protocol.nested(np.asarray(d["raw_errors"], dtype=np.float64))
        whole = np.asarray(d["raw_whole_errors"], dtype=np.float64)
        ci = protocol.bootstrap_ratio(
            err,
            base,
            seed=settings.get("bootstrap_seed", protocol.BOOTSTRAP_SEED),
            resamples=settings.get("resamples", protocol.BOOTSTRAP_RESAMPLES),
        )
        cells = [
            name,
            f"{protocol.rmse(err):.4f}",
            f"{protocol.rmse(err) / protocol.rmse(base):.3f}",
            protocol.format_ci(ci),
            f"{math.sqrt(whole.mean() / base_whole.mean()):.3f}",
            f"{d['energy_change']:+.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def newcomer_table(report: Mapping[str, Any]) -> str:
    """docs/newcomer.md's table from ``experiments/newcomer.py``'s JSON: per row and range, the
    mean over seeds of the RMSE, the mean over seeds of the ratio to ``plain`` with each seed's
    ratio (recomputed from the stored per-seed RMSEs), and the test trajectories improved (as
    stored: the JSON keeps no per-trajectory errors)."""
    ranges = [("in_range", "in range"), ("out_of_range", "out of range")]
    head = ["row"]
    for _, label in ranges:
        head += [f"{label}: error", "ratio (per seed)", "improved"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    plain = report["rows"]["plain"]
    for name, row in report["rows"].items():
        cells = [f"`{name}`"]
        for key, _ in ranges:
            m = row[key]
            errors = np.asarray(m["per_seed_error"], dtype=np.float64)
            ratios = errors / np.asarray(plain[key]["per_seed_error"], dtype=np.float64)
            cells += [
                f"{errors.mean():.4f}",
                f"{ratios.mean():.3f}× (" + ", ".join(f"{v:.3f}" for v in ratios) + ")",
                f"{m['improved']}/{m['n']}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def blocks_table(report: Mapping[str, Any]) -> str:
    """docs/real-pendulum.md's split-in-time table from ``experiments/real_blocks.py``'s JSON,
    recomputed from its raw per-window errors: per row and block, the ratio of mean window MSE
    to the plain field over all seeds, each seed's ratio, and the windows improved."""
    runs = report["runs"]
    blocks = list(runs[0]["errors"])
    head = ["row"] + [f"{b}{' (validation)' if i == 0 else ''}" for i, b in enumerate(blocks)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in runs[0]["errors"][blocks[0]]:
        if row == "vanilla":
            continue
        cells = [f"`{row}`"]
        for b in blocks:
            mine = [np.asarray(r["errors"][b][row], dtype=np.float64) for r in runs]
            base = [np.asarray(r["errors"][b]["vanilla"], dtype=np.float64) for r in runs]
            pooled = np.concatenate(mine).mean() / np.concatenate(base).mean()
            seeds = ", ".join(f"{m.mean() / v.mean():.3f}" for m, v in zip(mine, base))
            better = sum(int((m < v).sum()) for m, v in zip(mine, base))
            total = sum(m.size for m in mine)
            cells.append(f"{_big(pooled)}× ({seeds}); {better}/{total}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def field_table(report: Mapping[str, Any]) -> str:
    """docs/performance.md's vector-field table from ``benchmarks/field.py``'s JSON: per cell the
    medians' ratios, recomputed from the stored seconds (the hand-written floor's columns only
    where the JSON has it: runs before it was written lack them)."""
    floor = "hand_floor" in report["cells"][0]["seconds"]
    head = "| T | B | k | shared / hand shared | per-sample / hand shared | per-sample / unwrapped "
    head += "| hand floor / hand shared | per-sample / hand floor |" if floor else "|"
    lines = [head, "| --- " * (8 if floor else 6) + "|"]
    for cell in report["cells"]:
        med = {n: float(np.median(v)) for n, v in cell["seconds"].items()}
        row = (
            f"| {cell['T']} | {cell['B']} | {cell['k']} | {med['shared'] / med['hand_shared']:.2f} "
            f"| {med['per_sample'] / med['hand_shared']:.2f} | "
            f"{med['per_sample'] / med['plain']:.1f} |"
        )
        if floor:
            row += (
                f" {med['hand_floor'] / med['hand_shared']:.2f} | "
                f"{med['per_sample'] / med['hand_floor']:.2f} |"
            )
        lines.append(row)
    return "\n".join(lines)


def invariants_table(report: Mapping[str, Any]) -> str:
    """docs/learning-g.md's several-invariants table from ``experiments/invariants.py``'s JSON:
    per data seed, each output's conservation ratio and each energy's R² from the outputs."""
    lines = [
        "| data seed | ratios of the two outputs | R² of E1 | R² of E2 | steps |",
        "| --- | --- | --- | --- | --- |",
    ]
    for seed, r in report["seeds"].items():
        ratios = ", ".join(f"{x:.4f}" for x in r["ratios"])
        lines.append(f"| {seed} | {ratios} | {r['r2'][0]:.3f} | {r['r2'][1]:.3f} | {r['steps']} |")
    return "\n".join(lines)


def invariants_ranking_table(report: Mapping[str, Any]) -> str:
    """docs/learning-g.md's "which invariant" table from ``experiments/invariants.py``'s JSON:
    per data seed and output of the precision fit, the R² of each energy from that output
    alone, the diagnostic's share, the test-set best of tailoring with that output alone (a
    bound), and whether the larger share went with the lower bound."""
    lines = [
        "| data seed | output | R² of E1 | R² of E2 | share | test-best* | ranks agree |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seed, r in report["seeds"].items():
        fit = r["precision_fit"]
        for j, o in enumerate(fit["outputs"]):
            agree = ("yes" if fit["ranks_agree"] else "no") if j == 0 else ""
            lines.append(
                f"| {seed} | {j} | {o['r2'][0]:.3f} | {o['r2'][1]:.3f} | {o['share']:.3f} | "
                f"{o['bound']:.3f} | {agree} |"
            )
    return "\n".join(lines)


def precision_table(report: Mapping[str, Any]) -> str:
    """docs/learning-g.md's precision ladder from ``experiments/precision.py``'s JSON: per
    system and g, per data seed, the diagnostic's share (from the denoised training states, and
    from the clean ones) and drift ratio and the test-set best of
    Polyak tailoring with it (a bound), as stored."""
    lines = [
        "| system | g | share (per data seed) | share, clean states | drift ratio | verdict "
        "| test-best* |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for system, seeds in report["systems"].items():
        names = list(next(iter(seeds.values())))
        for name in names:
            cells = [seeds[s][name] for s in seeds]

            def column(key: str, cells: list[Any] = cells) -> str:
                return ", ".join(f"{c[key]:.3f}" for c in cells)

            verdicts = " / ".join(sorted({c["verdict"] for c in cells}))
            lines.append(
                f"| {system} | {name} | {column('share')} | {column('share_clean')} | "
                f"{column('drift_ratio')} | "
                f"{verdicts} | {column('bound')} |"
            )
    return "\n".join(lines)


def _agrees(verdict: str, on: bool) -> bool | None:
    """Whether a diagnostic verdict agrees with a cross-validated on/off decision: "may help"
    with on, "cannot help" with off; "marginal" makes no claim (None)."""
    if verdict == "marginal":
        return None
    return (verdict == "may help") == on


def diagnosis_table(report: Mapping[str, Any]) -> str:
    """Each ``g``'s diagnosis beside what cross-validation decided, from a Hamiltonian example's
    JSON: per data seed the diagnostic's share (mean over model seeds) and verdicts, the runs
    in which the fixed-step and the Polyak row were switched on (a step above 0), the runs where
    the verdict agrees with the decision ("marginal" makes no claim), and each row's test
    ratio to vanilla."""
    rows = rederived_report(report)["rows"]
    runs = len(report["data_seeds"]) * len(report["seeds"])
    per = len(report["seeds"])
    lines = [
        "| g | share (per data seed) | verdicts | fixed step on | Polyak on | verdict agrees "
        "| fixed / Polyak ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = [r.split("_", 1)[1] for r in rows if r.startswith("polyak_")]
    for name in names:
        fixed, polyak = rows[f"testtime_{name}"], rows[f"polyak_{name}"]
        found = polyak.get("diagnosis_per_run")
        if not found:
            continue
        shares = [d["share"] for d in found]
        seeds = ", ".join(f"{sum(shares[i : i + per]) / per:.3f}" for i in range(0, runs, per))
        verdicts = " / ".join(sorted({d["verdict"] for d in found}))
        on = {
            key: [lr > 0 for lr in row["inner_lr_per_seed"]]
            for key, row in (("fixed", fixed), ("polyak", polyak))
        }
        claims = [_agrees(d["verdict"], o) for key in on for d, o in zip(found, on[key])]
        made = [c for c in claims if c is not None]
        agree = f"{sum(made)}/{len(made)}" if made else "— (marginal)"
        lines.append(
            f"| {name} | {seeds} | {verdicts} | {sum(on['fixed'])}/{runs} | "
            f"{sum(on['polyak'])}/{runs} | {agree} | {_big(fixed['ratio'])} / "
            f"{_big(polyak['ratio'])} |"
        )
    return "\n".join(lines)


#: ``NAME.kind`` table kinds, each built from the one report ``NAME.json``.
KINDS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "curves": curves_table,
    "memory": memory_table,
    "probe": compat_probe_table,
    "embeddings": embeddings_table,
    "embeddings_rows": embeddings_rows_table,
    "probes": probes_table,
    "diagnosis": diagnosis_table,
    "ranking": invariants_ranking_table,
}


def named_table(name: str, reports: Mapping[str, Mapping[str, Any]]) -> str:
    """The table a ``<!-- table:NAME -->`` block names (see the module docstring)."""
    if name == "summary":
        return summary_table(reports)
    stem, _, kind = name.partition(".")
    if stem not in reports:
        raise KeyError(f"a table block names {name}, no {stem}.json given")
    report = reports[stem]
    if kind in KINDS:
        return KINDS[kind](report)
    if kind:
        raise KeyError(f"unknown table kind {kind!r} in {name}")
    if report.get("example") == "newcomer":
        return newcomer_table(report)
    if report.get("example") == "real_blocks":
        return blocks_table(report)
    if report.get("example") == "precision":
        return precision_table(report)
    if report.get("example") == "invariants":
        return invariants_table(report)
    if report.get("benchmark") == "tailoring":
        return tailoring_table(report)
    if report.get("benchmark") == "compat":
        return compat_table(report)
    if report.get("benchmark") == "field":
        return field_table(report)
    return table(report)


def write_docs(pages: Sequence[Path], reports: Mapping[str, Mapping[str, Any]]) -> list[Path]:
    """Rewrite every ``<!-- table:NAME -->`` ... ``<!-- /table -->`` block of ``pages`` with
    the recomputed table of ``reports[NAME]`` (the JSON's file stem); returns the pages changed.
    A block naming a report that is not given is an error."""
    changed = []
    for page in pages:
        text = page.read_text()

        def fill(match: re.Match[str], page: Path = page) -> str:
            try:
                body = named_table(match.group("name"), reports)
            except KeyError as exc:
                raise KeyError(f"{page}: {exc.args[0]}") from None
            return f"{match.group(1)}{body}\n{match.group(4)}"

        new = BLOCK.sub(fill, text)
        if new != text:
            page.write_text(new)
            changed.append(page)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--check", action="store_true", help="exit 1 if a figure differs")
    parser.add_argument(
        "--write-docs", nargs="+", type=Path, default=None, metavar="PAGE", help="docs pages"
    )
    args = parser.parse_args(argv)
    reports: dict[str, dict[str, Any]] = {}
    failed = False
    for path in args.files:
        report = json.loads(path.read_text())
        if not is_report(report):
            if is_table_only(report):
                reports[path.stem] = report  # stored figures: tables, nothing to check
            else:
                print(f"{path}: not a protocol report, skipped", file=sys.stderr)
            continue
        if args.check:
            bad = mismatches(report)
            print(f"{path}: {'OK' if not bad else f'{len(bad)} mismatches'}")
            for line in bad[:20]:
                print(f"  {line}")
            failed |= bool(bad)
            if bad:
                continue
        elif not report.get("raw"):
            print(f"{path}: no raw errors, cannot re-derive (re-run the example)", file=sys.stderr)
            failed = True
            continue
        reports[path.stem] = report
        if not args.check and args.write_docs is None:
            print(f"\n## {path.name}: {report.get('example')}, {report.get('metric')}\n")
            print(table(report))
    if args.write_docs is not None:
        for page in write_docs(args.write_docs, reports):
            print(f"rewrote {page}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
