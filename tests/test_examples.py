"""Examples run end to end at their --quick size; numbers are for the notes, only structure and
finiteness are checked here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_loop_quick() -> None:
    out = _run("train_loop.py", "--quick")
    assert "tailored" in out and "untailored" in out


def test_pendulum_quick_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    plot = tmp_path / "p.png"
    out = _run("pendulum.py", "--quick", "--json", str(path), "--plot", str(plot))
    assert "g = " in out
    report = json.loads(path.read_text())
    rows = {"vanilla", "control", "noether_learned", "noether_formula", "noether_oracle"}
    assert set(report) == {
        "rmse",
        "rmse_per_seed",
        "rmse_in_range",
        "rmse_out_of_range",
        "n_test_out_of_range",
        "energy_drift",
        "formula",
        "inner_lr",
        "split",
        "seeds",
        "seconds",
    }
    for key in ("rmse", "rmse_in_range", "energy_drift", "inner_lr", "rmse_per_seed"):
        assert set(report[key]) == rows, key
    for row in rows:
        assert math.isfinite(report["rmse"][row]) and report["rmse"][row] > 0
        assert len(report["rmse_per_seed"][row]) == len(report["seeds"]) == 1
        assert math.isfinite(report["energy_drift"][row])
    assert isinstance(report["n_test_out_of_range"], int)
    coef = report["formula"]["coefficients"]
    assert set(coef) == {"q", "p", "q^2", "p^2", "cos(q)", "sin(q)", "q*p"}
    assert coef["p^2"] == 1.0 and all(math.isfinite(v) for v in coef.values())
    assert report["split"] == "paper"
    assert report["inner_lr"]["noether_oracle"] == pytest.approx(0.1, rel=1e-6)
    assert plot.stat().st_size > 10_000


def test_ising_quick_json(tmp_path: Path) -> None:
    path = tmp_path / "i.json"
    _run("ising.py", "--quick", "--json", str(path), "--plot", str(tmp_path / "i.png"))
    report = json.loads(path.read_text())
    rows = {"vanilla", "control", "projection", "noether_oracle", "noether_learned"}
    assert set(report) == {
        "dynamics",
        "seeds",
        "rmse_ensemble",
        "rmse_ensemble_per_seed",
        "m_drift",
        "m_drift_final",
        "energy_error",
        "g_within_var_frac",
        "g_within_var_frac_init",
        "g_abs_pearson_m",
        "g_abs_pearson_m_init",
        "g_abs_pearson_h",
        "seconds",
    }
    for key in ("rmse_ensemble", "m_drift", "m_drift_final", "energy_error"):
        assert set(report[key]) == rows, key
        assert all(math.isfinite(v) for v in report[key].values()), key
    assert report["m_drift"]["projection"] < 1e-6  # the projection conserves M by construction
    for key in ("g_within_var_frac", "g_abs_pearson_m", "g_abs_pearson_h"):
        assert math.isfinite(report[key]) and report[key] >= 0
    assert report["dynamics"] == "kawasaki"
    assert (tmp_path / "i.png").stat().st_size > 10_000


def test_ising_generators_conserve_their_quantities() -> None:
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("ising_example", EXAMPLES / "ising.py")
    assert spec is not None and spec.loader is not None
    ising = importlib.util.module_from_spec(spec)
    sys.modules["ising_example"] = ising  # dataclasses look their module up there
    spec.loader.exec_module(ising)
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
    rows = {"vanilla", "control", "noether", "noether_untailored", "oracle"}
    assert set(report) == {
        "mse",
        "mse_last",
        "mse_std",
        "ssim",
        "mse_per_step",
        "g_energy_abs_pearson",
        "g_within_var_frac",
        "seeds",
        "seconds",
    }
    for key in ("mse", "mse_last", "mse_std", "ssim", "mse_per_step"):
        assert set(report[key]) == rows, key
    for row in rows:
        assert math.isfinite(report["mse"][row]) and report["mse"][row] > 0
        assert len(report["mse_per_step"][row]) == 10
        assert -1.0 <= report["ssim"][row] <= 1.0
    assert 0.0 <= report["g_energy_abs_pearson"] <= 1.0
    assert (tmp_path / "v.png").stat().st_size > 10_000
