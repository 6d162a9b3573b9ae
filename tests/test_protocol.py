"""The evaluation protocol (experiments/protocol.py) and its re-derivation
(experiments/rederive.py): the nested bootstrap's coverage on synthetic experiments with a
known ratio, non-finite errors, the JSON's raw errors and provenance, and the round trip
JSON -> recomputed tables."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from noether_experiments import protocol, rederive

TRUTH = 0.8  # the population RMSE ratio of every synthetic experiment


def _lognormal(rng: np.random.Generator, sigma: float, size: tuple[int, ...]) -> np.ndarray:
    """Mean-one multiplicative noise."""
    return np.exp(sigma * rng.standard_normal(size) - sigma**2 / 2)


def synthetic(
    rng: np.random.Generator, d: int, m: int, n: int, data_effect: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """``(row, base)`` per-sequence MSEs ``(d, m, n)``: base = data-seed scale x sequence
    difficulty (per data seed: its own trajectories) x model noise; row = base x TRUTH^2 x a
    per-data-seed effect on the ratio x a per-model-seed effect x per-sequence noise. Every
    factor is independent with mean one, so E[row] / E[base] = TRUTH^2 exactly."""
    base = _lognormal(rng, 0.5, (d, 1, 1)) * _lognormal(rng, 1.0, (d, 1, n))
    base = base * _lognormal(rng, 0.2, (d, m, n))
    row = base * TRUTH**2 * _lognormal(rng, data_effect, (d, 1, 1))
    row = row * _lognormal(rng, 0.1, (d, m, 1)) * _lognormal(rng, 0.3, (d, m, n))
    return row, base


@functools.cache
def coverage(nested: bool, experiments: int = 200) -> float:
    """The share of ``experiments`` synthetic experiments (6 data seeds x 3 model seeds x 15
    sequences, 500 resamples each) whose 95 % interval holds the true ratio."""
    interval = protocol.bootstrap_ratio if nested else protocol.bootstrap_ratio_flat
    rng = np.random.default_rng(2024)
    hits = 0
    for i in range(experiments):
        row, base = synthetic(rng, 6, 3, 15)
        ci = interval(row, base, seed=i, resamples=500)
        assert ci is not None
        hits += ci[0] <= TRUTH <= ci[1]
    return hits / experiments


def test_nested_interval_covers_the_true_ratio() -> None:
    # measured: 0.95 of 200 (with 8 x 3 x 25 and 1000 resamples: 0.89)
    assert coverage(True) >= 0.85


def test_flat_interval_undercovers_with_a_data_seed_effect() -> None:
    """The old bootstrap treats a data seed's model seeds as independent replicates and pairs
    unrelated sequences: with a data-seed effect its interval is too narrow (measured 0.815 of
    200, against the nested 0.95; with 8 x 3 x 25: 0.74 against 0.89)."""
    flat = coverage(False)
    assert flat < 0.85
    assert flat < coverage(True) - 0.1


def test_bootstrap_is_vectorised_and_deterministic() -> None:
    row, base = synthetic(np.random.default_rng(0), 3, 3, 25)
    start = time.perf_counter()
    ci = protocol.bootstrap_ratio(row, base)
    assert time.perf_counter() - start < 0.5  # 2000 resamples: milliseconds, not a Python loop
    assert ci == protocol.bootstrap_ratio(row, base)
    assert ci is not None and ci[0] < math.sqrt(row.mean() / base.mean()) < ci[1]


def test_two_dimensional_errors_are_one_data_seed() -> None:
    row, base = synthetic(np.random.default_rng(1), 1, 3, 10)
    assert protocol.bootstrap_ratio(row[0], base[0]) == protocol.bootstrap_ratio(row, base)
    flat = protocol.row_metrics({"vanilla": base[0], "row": row[0]}, control=None)["row"]
    deep = protocol.row_metrics({"vanilla": base, "row": row}, control=None)["row"]
    assert json.dumps(flat) == json.dumps(deep)
    assert len(flat["per_seed"]) == 3 and len(flat["per_data_seed"]) == 1
    assert len(flat["per_sequence"]) == 10


def test_per_data_seed_ratios_and_interval_to_control() -> None:
    rng = np.random.default_rng(3)
    base = _lognormal(rng, 0.5, (2, 2, 6))
    row = base * np.array([0.25, 1.0])[:, None, None]  # data seed 0: ratio 0.5; 1: ratio 1
    rows = protocol.row_metrics({"vanilla": base, "control": base * 4.0, "row": row})
    m = rows["row"]
    assert np.allclose(m["per_data_seed"], [0.5, 1.0])
    assert math.isclose(m["ratio_to_control"], m["ratio"] / 2.0)
    lo, hi = m["ratio_to_control_ci"]
    assert lo <= m["ratio_to_control"] <= hi
    assert rows["vanilla"]["ratio_ci"] == [1.0, 1.0]
    assert m["n_test"] == 24 and len(m["per_seed"]) == 4 and len(m["per_sequence"]) == 12


def test_non_finite_errors_give_no_interval_never_nan_bounds() -> None:
    base = np.ones((1, 2, 5))
    row = base.copy()
    row[0, 1, 2] = math.inf
    assert protocol.bootstrap_ratio(row, base) is None
    nan_row = base.copy()
    nan_row[0, 0, 0] = math.nan
    assert protocol.bootstrap_ratio(nan_row, base) is None
    assert protocol.bootstrap_ratio(base, np.zeros_like(base)) is None
    rows = protocol.row_metrics({"vanilla": base, "bad": row, "good": base * 0.5}, control=None)
    assert rows["bad"]["finite"] is False and rows["bad"]["ratio_ci"] is None
    assert rows["good"]["finite"] is True and rows["good"]["ratio_ci"] is not None
    text = protocol.json_text({"rows": rows})
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["rows"]["bad"]["ratio"] is None
    table = protocol.markdown_table(
        {"rows": json.loads(text)["rows"], "inner_lr": {}, "selected": None}
    )
    assert "n/a (non-finite)" in table


def test_summarise_runs_nests_by_data_seed() -> None:
    rng = np.random.default_rng(4)
    runs = []
    for data_seed in (0, 1):
        for _ in range(3):
            err = {"vanilla": rng.random(4) + 0.1, "t": rng.random(4) + 0.1}
            runs.append({"err": err, "val": {"t": 1.0}, "lr": {"t": 0.1}, "data_seed": data_seed})
    rows, inner_lr, selected = protocol.summarise_runs(runs)
    assert rows.errors["t"].shape == (2, 3, 4)
    assert len(rows["t"]["per_data_seed"]) == 2 and selected == "t" and inner_lr["vanilla"] is None
    with pytest.raises(ValueError, match="as many model seeds"):
        protocol.summarise_runs(runs[:-1])


def _report(tmp_path: Path, name: str = "toy") -> tuple[Path, dict]:  # type: ignore[type-arg]
    rng = np.random.default_rng(5)
    row, base = synthetic(rng, 2, 2, 7)
    errors = {"vanilla": base, "control": base * 0.9, "testtime_oracle": row}
    extras = {name: {"energy_drift": 0.01} for name in errors}
    rows = protocol.row_metrics(errors, extras=extras)
    report = {
        "example": "pendulum",
        "data_seeds": [0, 1],
        "seeds": [0, 1],
        "seconds": 1.5,
        "metric": "toy RMSE",
        "inner_lr": {"vanilla": None, "control": None, "testtime_oracle": 0.1},
        "selected": "testtime_oracle",
        "rows": rows,
        "embeddings": {},
    }
    path = tmp_path / f"{name}.json"
    protocol.write_json(path, report)
    return path, report


def test_write_json_adds_raw_protocol_and_provenance(tmp_path: Path) -> None:
    path, report = _report(tmp_path)
    stored = json.loads(path.read_text())
    assert np.array(stored["raw"]["testtime_oracle"]).shape == (2, 2, 7)
    assert stored["raw"]["control"] == report["rows"].errors["control"].tolist()
    assert stored["protocol"]["vanilla"] == "vanilla" and stored["protocol"]["control"] == "control"
    assert stored["protocol"]["raw_shape"] == [2, 2, 7]
    prov = stored["provenance"]
    for key in ("package_version", "git_commit", "git_dirty", "torch_version", "torch_threads"):
        assert key in prov, key
    assert prov["command"] and prov["python"] and prov["platform"] and prov["seconds"] == 1.5
    assert prov["torch_threads"] >= 1 and prov["package_version"]
    with pytest.raises(ValueError, match="lacks"):
        protocol.write_json(tmp_path / "x.json", {"example": "x"})


def test_rederive_reproduces_every_figure_byte_for_byte(tmp_path: Path) -> None:
    path, report = _report(tmp_path)
    stored = json.loads(path.read_text())
    assert rederive.mismatches(stored) == []
    derived = rederive.rederive_rows(stored)
    for name, metrics in derived.items():
        for key, value in metrics.items():
            assert json.dumps(value) == json.dumps(stored["rows"][name][key]), (name, key)
    extra = rederive.EXTRA_COLUMNS["pendulum"]
    assert rederive.table(stored) == protocol.markdown_table(stored, extra)
    assert rederive.main([str(path), "--check"]) == 0
    # a typed figure that the raw errors do not give is caught
    stored["rows"]["testtime_oracle"]["ratio_ci"][0] += 1e-12
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(stored))
    assert rederive.main([str(bad), "--check"]) == 1
    no_raw = {**stored, "raw": None}
    bad.write_text(json.dumps(no_raw))
    assert rederive.main([str(bad), "--check"]) == 1


def test_rederive_writes_marked_docs_blocks(tmp_path: Path) -> None:
    path, _ = _report(tmp_path, "pendulum_toy")
    page = tmp_path / "page.md"
    page.write_text(
        "Intro.\n\n<!-- table:pendulum_toy -->\n| typed | table |\n<!-- /table -->\n\nAfter.\n"
    )
    other = tmp_path / "other.md"
    other.write_text("no blocks here\n")
    assert rederive.main([str(path), "--write-docs", str(page), str(other)]) == 0
    text = page.read_text()
    assert "typed" not in text and text.startswith("Intro.") and text.endswith("After.\n")
    assert rederive.table(json.loads(path.read_text())) in text
    assert other.read_text() == "no blocks here\n"
    before = page.read_text()
    assert rederive.write_docs([page], {"pendulum_toy": json.loads(path.read_text())}) == []
    assert page.read_text() == before  # idempotent
    with pytest.raises(KeyError, match="pendulum_toy"):
        rederive.write_docs([page], {})


def test_rederive_skips_json_that_is_not_a_report(tmp_path: Path) -> None:
    path = tmp_path / "compat.json"
    path.write_text(json.dumps({"threads": 1}))
    assert rederive.main([str(path)]) == 0


def test_summary_table_recomputes_the_selected_row(tmp_path: Path) -> None:
    """README's summary: the selected row's ratio and interval come from ``raw``, a tampered
    stored figure does not reach the table, and reports without a selection are left out."""
    path, _ = _report(tmp_path, "toy")
    stored = json.loads(path.read_text())
    derived = rederive.rederive_rows(stored)["testtime_oracle"]
    tampered = json.loads(path.read_text())
    tampered["rows"]["testtime_oracle"]["ratio"] = 123.0
    text = rederive.summary_table({"toy": tampered, "other": {"rows": {}, "selected": None}})
    lines = text.splitlines()
    assert len(lines) == 3  # header, rule, one report
    assert f"`testtime_oracle` {derived['ratio']:.3f}" in lines[2]
    assert protocol.format_ci(derived["ratio_ci"]) in lines[2]
    assert "123" not in lines[2] and "2 × 2 × 7" in lines[2]


def test_curves_table_recomputes_ratios_from_raw_test_steps(tmp_path: Path) -> None:
    path, _ = _report(tmp_path, "toy")
    report = json.loads(path.read_text())
    base = np.asarray(report["raw"]["vanilla"])
    report["raw_test_steps"] = {
        "oracle_none": {"1": (base * 0.81).tolist(), "2": (base * np.inf).tolist()},
    }
    report["test_steps"] = {
        "oracle_none": {k: {"validation_error": 0.5, "seconds": 1.0} for k in ("1", "2")}
    }
    lines = rederive.named_table("toy.curves", {"toy": report}).splitlines()
    assert lines[2].startswith("| 1 | 0.900 [0.900, 0.900] | 0.900 | 0.50000 | 1.0")
    assert "inf (non-finite)" in lines[3]
    with pytest.raises(KeyError, match="kind"):
        rederive.named_table("toy.nope", {"toy": report})


def test_benchmark_tables_are_medians_of_the_stored_repetitions() -> None:
    bench = {
        "benchmark": "tailoring",
        "timings": [
            {
                "hidden": 8,
                "batch": 2,
                "k": 1,
                "mode": "train",
                "hand": {"seconds": [1.0, 2.0, 3.0]},
                "shared": {"seconds": [2.0, 4.0, 9.0]},
            }
        ],
    }
    assert rederive.named_table("b", {"b": bench}).splitlines()[2] == (
        "| 8 | 2 | 1 | train | 2000.0 | 2.00 |"
    )
    compat = {
        "benchmark": "compat",
        "models": {
            "GRU": {
                "path": "affine",
                "adapt": 'Affine("decoder")',
                "batch": 16,
                "inner_steps": 1,
                "seconds": {"plain": [1, 2, 3], "wrapped": [3, 6, 9]},
            }
        },
        "gru_probe": {"B=16": {"seconds": {"plain": [1], "affine": [2], "shared": [4]}}},
    }
    lines = rederive.named_table("c", {"c": compat}).splitlines()
    assert "k = 1, B = 16" in lines[0]
    assert lines[2] == '| GRU | `Affine("decoder")` | affine | 3.00× | — |'
    probe = rederive.named_table("c.probe", {"c": compat}).splitlines()
    assert probe[2] == "| B=16 | 2.00× | 4.00× | 0.50× |"


def test_embeddings_tables_format_the_stored_metrics(tmp_path: Path) -> None:
    """``STEM.embeddings``: the example's symbol in the headers, a metric no ``g`` has left
    out, ``—`` for an untrained ``g``'s initial |r|; ``STEM.embeddings_rows`` adds each ``g``'s
    protocol row, recomputed from ``raw``."""
    g = {"abs_r": 0.99304, "abs_r_init": 0.05071, "within_var_frac": 0.00676, "grad_cos": 0.9996}
    pendulum = {
        "example": "pendulum",
        "embeddings": {
            "testtime_formula": {**g, "abs_r_init": None, "grad_ratio_spread": 1.0052},
            "testtime_learned": {**g, "grad_ratio_spread": 0.5544},
        },
    }
    lines = rederive.named_table("p.embeddings", {"p": pendulum}).splitlines()
    assert lines[0] == (
        "| g | \\|r(g, H)\\| (init) | within-var fraction | median \\|cos(∇g, ∇H)\\| "
        "| \\|∇g\\|/\\|∇H\\| top/bottom decile of H |"
    )
    assert lines[2] == "| testtime_formula | 0.9930 (—) | 0.0068 | 0.9996 | 1.01 |"
    assert lines[3] == "| testtime_learned | 0.9930 (0.051) | 0.0068 | 0.9996 | 0.55 |"
    ising = {"example": "ising", "embeddings": {"meta_learned": {**g, "grad_cos": None}}}
    lines = rederive.named_table("i.embeddings", {"i": ising}).splitlines()
    assert "∇M" in lines[0] and "decile" not in lines[0]
    assert lines[2] == "| meta_learned | 0.9930 (0.051) | 0.0068 | — |"
    with pytest.raises(KeyError, match="symbol"):
        rederive.named_table("x.embeddings", {"x": {**ising, "example": "other"}})

    path, _ = _report(tmp_path, "toy")
    report = json.loads(path.read_text())
    report["embeddings"] = {"testtime_oracle": g, "no_such_row": g}
    derived = rederive.rederive_rows(report)["testtime_oracle"]
    report["rows"]["testtime_oracle"]["ratio"] = 123.0  # a tampered figure does not reach it
    lines = rederive.named_table("toy.embeddings_rows", {"toy": report}).splitlines()
    assert lines[0].endswith("| step | ratio to vanilla [95% CI] | median | improved |")
    ratio = f"{derived['ratio']:.3f} {protocol.format_ci(derived['ratio_ci'])}"
    assert lines[2] == (
        f"| testtime_oracle | 0.9930 (0.051) | 0.0068 | 0.9996 | 0.1 | {ratio} "
        f"| {derived['median_ratio']:.3f} | {derived['improved']}/{derived['n_test']} |"
    )
    assert lines[3].endswith("| — | — | — | — |")


def test_probes_table_recomputes_ratio_and_interval_from_raw_errors(tmp_path: Path) -> None:
    """``real_pendulum.probes``: a probe's error, ratio, interval and whole-segment ratio come
    from its raw errors against vanilla's, not from the stored figures."""
    path, _ = _report(tmp_path, "toy")
    report = json.loads(path.read_text())
    base = np.asarray(report["raw"]["vanilla"])
    report["raw_whole_errors"] = {"vanilla": [1.0, 3.0]}
    report["diagnostics"] = {
        "euler": {
            "ratio": 123.0,
            "ratio_ci": [0.0, 0.0],
            "whole_ratio": 123.0,
            "energy_change": 1.1148,
            "raw_errors": (base * 4.0).tolist(),
            "raw_whole_errors": [6.0, 10.0],
        }
    }
    lines = rederive.named_table("toy.probes", {"toy": report}).splitlines()
    assert lines[0] == "| probe (not a row) | error | ratio | 95% CI | whole | ΔE / window |"
    error = protocol.rmse(base * 4.0)
    assert lines[2] == f"| euler | {error:.4f} | 2.000 | [2.000, 2.000] | 2.000 | +1.115 |"
    with pytest.raises(ValueError, match="diagnostics"):
        rederive.probes_table({**report, "diagnostics": {}})


def test_newcomer_table_recomputes_ratios_from_per_seed_errors(tmp_path: Path) -> None:
    """``newcomer``: per range, the mean per-seed RMSE and the mean of the per-seed ratios to
    ``plain`` (recomputed from the per-seed RMSEs, not the stored ratios); the newcomer's JSON
    has no raw errors, so it is a table source, not a protocol report to check."""

    def cell(errors: list[float], improved: int) -> dict:  # type: ignore[type-arg]
        return {"error": 0.0, "ratio": 9.0, "improved": improved, "n": 6, "per_seed_error": errors}

    report = {
        "example": "newcomer",
        "rows": {
            "plain": {"in_range": cell([0.2, 0.4], 0), "out_of_range": cell([1.0, 1.0], 0)},
            "tuned": {"in_range": cell([0.1, 0.3], 4), "out_of_range": cell([2.0, 0.5], 3)},
        },
    }
    assert rederive.is_table_only(report) and not rederive.is_report(report)
    lines = rederive.named_table("newcomer", {"newcomer": report}).splitlines()
    assert lines[0].startswith("| row | in range: error | ratio (per seed) | improved |")
    assert lines[2] == (
        "| `plain` | 0.3000 | 1.000× (1.000, 1.000) | 0/6 | 1.0000 | 1.000× (1.000, 1.000) | 0/6 |"
    )
    assert lines[3] == (
        "| `tuned` | 0.2000 | 0.625× (0.500, 0.750) | 4/6 | 1.2500 | 1.250× (2.000, 0.500) | 3/6 |"
    )
    path = tmp_path / "newcomer.json"
    path.write_text(json.dumps(report))
    page = tmp_path / "page.md"
    page.write_text("<!-- table:newcomer -->\n<!-- /table -->\n")
    assert rederive.main([str(path), "--write-docs", str(page)]) == 0
    assert lines[3] in page.read_text()


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _committed_reports() -> dict[str, dict]:  # type: ignore[type-arg]
    reports = {}
    for path in sorted(RESULTS.glob("*.json")):
        report = json.loads(path.read_text())
        if (rederive.is_report(report) and "raw" in report) or rederive.is_table_only(report):
            reports[path.stem] = report
    return reports


def test_committed_results_rederive_from_their_raw_errors() -> None:
    """Every committed JSON that carries raw errors reproduces its own figures from them."""
    reports = _committed_reports()
    assert reports, "no committed results JSON carries raw errors"
    for name, report in reports.items():
        if rederive.is_report(report):
            assert rederive.mismatches(report) == [], name


def test_docs_tables_are_the_rederived_ones(tmp_path: Path) -> None:
    """Every ``<!-- table:NAME -->`` block in docs/ and README.md is what rederive writes from
    docs/results/NAME.json: prose and numbers cannot drift."""
    reports = _committed_reports()
    pages = [*sorted(DOCS.glob("*.md")), DOCS.parent / "README.md"]
    marked = [p for p in pages if "<!-- table:" in p.read_text()]
    copies = []
    for page in marked:
        copy = tmp_path / page.name
        copy.write_text(page.read_text())
        copies.append(copy)
    assert rederive.write_docs(copies, reports) == []
