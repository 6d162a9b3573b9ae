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
