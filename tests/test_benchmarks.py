"""The benchmarks run at their --quick size; the field benchmark's correctness check holds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_field_benchmark_quick(tmp_path: Path) -> None:
    path = tmp_path / "field.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "field.py"), "--quick", "--json", str(path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(path.read_text())
    # the per-sample wrapper and the hand-written per-sample step agree in float64
    assert report["check_max_abs_diff"] < 1e-10 and report["device"] == "cpu"
    (cell,) = report["cells"]
    assert set(cell["median"]) == {
        "plain",
        "hand_shared",
        "shared",
        "hand_dense",
        "hand_floor",
        "per_sample",
    }
    assert all(v > 0 for v in cell["median"].values())
    assert report["provenance"]["command"][1].endswith("field.py")
