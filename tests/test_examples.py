"""The experiments (experiments/) run end to end at their --quick size; numbers are for the
notes. Checked here: the JSON's shape, raw errors and provenance, that every figure re-derives
from the raw errors, that every row is finite, and that a tailored row's predictions differ from
the model it tailors wherever its step is non-zero."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from noether_experiments import rederive

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


PROTOCOL_ROW_KEYS = {
    "error",
    "ratio",
    "ratio_ci",
    "ratio_to_control",
    "median_ratio",
    "improved",
    "n_test",
    "worst_share",
    "per_seed",
    "per_sequence",
    "ratio_to_control_ci",
    "per_data_seed",
    "finite",
}


def check_protocol_report(report: dict, example: str) -> None:  # type: ignore[type-arg]
    """The JSON shape every example shares (EVALUATION.md)."""
    for key in ("example", "data_seeds", "seeds", "seconds", "metric", "inner_lr", "selected"):
        assert key in report, key
    assert report["example"] == example
    rows = report["rows"]
    selected = report["selected"]
    # the selected row is one that validation scored (vanilla, a tuned row, or a baseline the
    # example scores on validation, such as Ising's projection)
    assert selected in rows and rows[selected].get("validation_error") is not None
    assert rows["vanilla"]["ratio"] == 1.0
    for name, row in rows.items():
        assert set(row) >= PROTOCOL_ROW_KEYS, name
        assert math.isfinite(row["error"]) and row["error"] > 0, name
        lo, hi = row["ratio_ci"]
        assert lo <= hi, name
        assert 0 <= row["improved"] <= row["n_test"] and 0 < row["worst_share"] <= 1
        assert len(row["per_seed"]) == len(report["seeds"]) * len(report["data_seeds"])
    for name, metrics in report["embeddings"].items():
        assert 0 <= metrics["abs_r"] <= 1 and metrics["within_var_frac"] >= 0, name
    # raw errors: (data seeds, model seeds, sequences) per row, every figure re-derived from them
    raw = report["raw"]
    assert set(raw) == set(rows)
    shape = (len(report["data_seeds"]), len(report["seeds"]), -1)
    for name, values in raw.items():
        a = np.asarray(values)
        assert a.shape[:2] == shape[:2] and a.size == rows[name]["n_test"], name
        assert np.isfinite(a).all() and (a > 0).all(), name
        assert rows[name]["finite"] is True and len(rows[name]["per_data_seed"]) == shape[0]
        assert rows[name]["ratio_to_control_ci"] is not None, name
    assert report["protocol"]["raw_shape"][:2] == list(shape[:2])
    assert rederive.mismatches(report) == []
    prov = report["provenance"]
    assert prov["torch_threads"] == 1  # the examples' default --threads
    assert prov["package_version"] and prov["torch_version"] and prov["command"][1].endswith(".py")
    assert "git_commit" in prov and "git_dirty" in prov and prov["seconds"] > 0


def assert_tailoring_moves(report: dict, base: str) -> None:  # type: ignore[type-arg]
    """Every test-time row with a non-zero step predicts differently from ``base``, the model it
    tailors (one changed weight changes every sequence's error)."""
    raw = report["raw"]
    for name, step in report["inner_lr"].items():
        if name.startswith("testtime_") and step:
            moved = np.asarray(raw[name]) != np.asarray(raw[base])
            assert moved.any(), (name, step)


def test_pendulum_quick_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    plot = tmp_path / "p.png"
    out = _run(
        "pendulum.py", "--quick", "--meta", "--test-steps", "1,2", "--json", str(path),
        "--plot", str(plot),
    )  # fmt: skip
    assert "g = " in out and "selected by validation error" in out
    report = json.loads(path.read_text())
    check_protocol_report(report, "pendulum")
    rows = report["rows"]
    gs = ("oracle", "formula", "learned", "labelled")
    tailored = {f"{rule}_{g}" for rule in ("testtime", "polyak") for g in gs}
    expected = {"vanilla", "control", "projection_oracle", "projection_formula"} | tailored
    expected |= {"meta_oracle", "meta_learned", "meta_learned_frozen"}
    expected |= {"meta_oracle_untailored", "meta_learned_untailored"}
    assert set(rows) == expected
    assert report["selected"] in rows  # vanilla is a candidate too
    for name in expected:
        assert rows[name]["n_test"] == 25 and math.isfinite(rows[name]["energy_drift"])
        assert "ratio_in_range" in rows[name] and "ratio_out_of_range" in rows[name]
    for name in tailored:
        # the grid's best on the test set bounds what the rule chose from the same grid
        assert rows[name]["bound"] <= rows[name]["ratio"] + 1e-12, name
        assert len(rows[name]["bound_per_data_seed"]) == 1
        # cross-validated: every one of the 25 training trajectories scored once
        assert rows[name]["validation_error"] is not None
        # each g's diagnosis beside the decision, from the denoised training states
        (diagnosis,) = rows[name]["diagnosis_per_run"]
        assert 0 <= diagnosis["share"] <= 1
        assert diagnosis["verdict"] in ("may help", "marginal", "cannot help")
    assert rows["polyak_oracle"]["diagnosis_per_run"][0]["share"] > 0.95  # H barely drifts
    assert rows["polyak_oracle"]["diagnosis_per_run"][0]["verdict"] == "may help"
    assert rows["projection_oracle"]["energy_drift"] < 1e-3  # on the level set by construction
    fixed, polyak = (0.0, 0.1, 1.0), (0.0, 1.0, 2.0)  # --quick's grids; 0.0 where "off" won
    for g in gs:
        assert report["inner_lr"][f"testtime_{g}"] in fixed
        assert report["inner_lr"][f"polyak_{g}"] in polyak
    assert report["inner_lr"]["meta_oracle_untailored"] is None
    trial = report["meta_trial"]
    assert set(trial) == {"meta_oracle", "meta_learned", "meta_learned_frozen", "control"}
    for name, t in trial.items():
        assert t["ratio_to_control_ci"] is not None and t["steps"][0] >= 1
        assert 0 <= t["chosen_step"][0] <= t["steps"][0]
        assert (t["learned_step"][0] is None) == (name == "control")
    # the control gets the meta rows' seconds: its plain steps are far cheaper, so it runs more
    assert trial["control"]["steps"][0] > trial["meta_oracle"]["steps"][0]
    coef = report["formula"]["coefficients"]
    assert set(coef) == {"q", "p", "q^2", "p^2", "cos(q)", "sin(q)", "q*p"}
    assert coef["p^2"] == 1.0 and coef["cos(q)"] < -2.0  # the pendulum's energy, roughly
    assert report["embeddings"]["testtime_oracle"]["abs_r"] > 0.999
    assert set(report["test_steps"]["oracle_backtrack"]) == {"1", "2", "best_k"}
    assert report["sampler"] == "hnn" and report["paper"]["vanilla"] == 0.0563
    assert plot.stat().st_size > 10_000
    assert_tailoring_moves(report, "vanilla")
    assert report["split"].startswith("the paper's")
    for curve in ("oracle_none", "oracle_backtrack"):
        for k in ("1", "2"):
            assert np.asarray(report["raw_test_steps"][curve][k]).shape == (1, 1, 25)
            assert report["test_steps"][curve][k]["ratio_ci"] is not None


def test_spring_quick_json(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    _run("spring.py", "--quick", "--split", "extrapolation", "--json", str(path))
    report = json.loads(path.read_text())
    check_protocol_report(report, "spring")
    coef = report["formula"]["coefficients"]
    assert set(coef) == {"q", "p", "q^2", "p^2", "q*p"}
    assert abs(coef["q^2"] - 1.0) < 0.1  # q^2 + p^2, from the noisy training trajectories
    assert report["paper"]["vanilla"] == 0.0174
    assert report["rows"]["testtime_oracle"]["n_test"] == 25
    assert report["split"].startswith("extrapolation")
    assert "meta_trial" not in report and "control" in report["rows"]
    assert_tailoring_moves(report, "vanilla")


def test_protocol_ratios_and_intervals() -> None:
    import numpy as np

    from noether_experiments import protocol

    base = np.ones((2, 10))
    row = base * 0.25  # every sequence's MSE quartered: RMSE ratio 0.5
    row[0, 3] = 4.0  # one sequence worse
    metrics = protocol.row_metrics({"vanilla": base, "row": row}, control=None)["row"]
    expected = np.sqrt(row.mean())
    assert math.isclose(metrics["ratio"], expected)
    assert metrics["improved"] == 19 and metrics["n_test"] == 20
    assert math.isclose(metrics["median_ratio"], 0.5)
    lo, hi = metrics["ratio_ci"]
    assert lo < expected < hi
    assert math.isclose(metrics["worst_share"], (4.0 + 0.25) / 2 / row.mean(axis=0).sum())
    assert protocol.select_row({"a": 2.0, "b": 1.0}) == "b"


def test_ising_quick_json(tmp_path: Path) -> None:
    path = tmp_path / "i.json"
    _run("ising.py", "--quick", "--json", str(path), "--plot", str(tmp_path / "i.png"))
    report = json.loads(path.read_text())
    check_protocol_report(report, "ising")
    rows = report["rows"]
    expected = {"vanilla", "control", "projection", "testtime_oracle", "testtime_learned"}
    expected |= {"polyak_oracle", "polyak_learned"}
    expected |= {"testtime_oracle_bias", "meta_oracle", "meta_learned", "meta_learned_frozen"}
    expected |= {"meta_oracle_untailored", "meta_learned_untailored"}
    expected |= {"meta_learned_frozen_untailored"}
    assert set(rows) == expected
    for name in expected:
        for key in ("m_drift", "m_drift_final", "energy_error"):
            assert math.isfinite(rows[name][key]), (name, key)
    assert rows["projection"]["m_drift"] < 1e-6  # the projection conserves M by construction
    assert set(report["embeddings"]) == {"testtime_learned", "meta_learned", "meta_learned_frozen"}
    assert report["dynamics"] == "kawasaki"
    assert (tmp_path / "i.png").stat().st_size > 10_000
    assert_tailoring_moves(report, "control")  # the test-time rows tailor control


def test_ising_generators_conserve_their_quantities() -> None:
    import torch

    from noether_experiments import ising

    gen = torch.Generator().manual_seed(0)
    x0 = ising.initial_states(16, 8, 0.1, 0.9, gen)
    kawasaki = ising.simulate(x0, 6, "kawasaki", 2.0, gen)
    m = kawasaki.mean(dim=(-2, -1))
    assert torch.equal(m, m[:, :1].expand_as(m))  # magnetisation exactly conserved
    assert bool((kawasaki[:, 1:] != kawasaki[:, :-1]).any())  # and the lattice does move
    q2r = ising.simulate(x0, 6, "q2r", 2.0, gen)
    e = ising.energy_per_bond(q2r)
    assert torch.equal(e, e[:, :1].expand_as(e))  # Q2R conserves the Ising energy exactly
    assert bool((q2r[:, 1:] != q2r[:, :-1]).any())


def test_video_quick_json(tmp_path: Path) -> None:
    path = tmp_path / "v.json"
    out = _run("video.py", "--quick", "--json", str(path), "--plot", str(tmp_path / "v.png"))
    assert "NaN or blank-frame collapse:" in out  # undertrained at --quick size: only reported
    report = json.loads(path.read_text())
    check_protocol_report(report, "video")
    rows = report["rows"]
    expected = {"vanilla", "control", "testtime_oracle", "testtime_learned", "expert_physics"}
    expected |= {"polyak_oracle", "polyak_learned"}
    expected |= {"meta_learned", "meta_learned_untailored"}
    expected |= {"meta_learned_frozen", "meta_learned_frozen_untailored"}
    assert set(rows) == expected
    for name in expected:
        assert math.isfinite(rows[name]["mse_last"]) and -1.0 <= rows[name]["ssim"] <= 1.0
    assert set(report["embeddings"]) == {"testtime_learned", "meta_learned", "meta_learned_frozen"}
    assert (tmp_path / "v.png").stat().st_size > 10_000
    assert_tailoring_moves(report, "vanilla")
    # the expert knows the law and the renderer: far below an undertrained vanilla
    assert rows["expert_physics"]["ratio"] < 0.5 and rows["expert_physics"]["error"] < 0.02
    assert report["inner_lr"]["expert_physics"] is None


def test_precision_quick_json(tmp_path: Path) -> None:
    """The precision ladder runs and records, per rung, the diagnostic beside the test bound,
    including the g fitted with derivative labels."""
    path = tmp_path / "precision.json"
    _run("precision.py", "--quick", "--json", str(path))
    report = json.loads(path.read_text())
    rungs = report["systems"]["pendulum"]["0"]
    assert {"mix 0", "mix 1", "formula", "labelled"} <= set(rungs)
    for rung in rungs.values():
        assert 0 <= rung["share"] <= 1 and rung["bound"] > 0
        assert rung["verdict"] in ("may help", "marginal", "cannot help")
    assert rungs["mix 0"]["share"] > 0.99  # the true energy does not drift along the data


def test_invariants_quick_json(tmp_path: Path) -> None:
    path = tmp_path / "invariants.json"
    _run("invariants.py", "--quick", "--json", str(path))
    (seed,) = json.loads(path.read_text())["seeds"].values()
    assert len(seed["ratios"]) == 2 and len(seed["r2"]) == 2 and seed["steps"] == 200
    fit = seed["precision_fit"]  # which output tailoring relies on, and does the share say so
    assert len(fit["outputs"]) == 2 and isinstance(fit["ranks_agree"], bool)
    for output in fit["outputs"]:
        assert 0 <= output["share"] <= 1 and output["bound"] <= 1 + 1e-5  # "off" is in the grid
        assert len(output["r2"]) == 2
