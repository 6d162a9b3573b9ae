"""experiments/newcomer.py at its --quick size: the JSON's shape, finite values, and what the
library promises by construction: every tuned row's validation choice is recorded, and where the
tuning chose "off" (it then warns) the tuned predictions are exactly the plain model's. The
issue's 1 % target is a measured result (docs/newcomer.md), not asserted here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "newcomer.py"
ROWS = ("plain", "energy_polyak_default", "energy_tuned", "fitted_polyak_default", "fitted_tuned")
RANGES = ("in_range", "out_of_range")
TUNED = ("energy_tuned", "fitted_tuned")


def test_newcomer_quick(tmp_path: Path) -> None:
    path = tmp_path / "newcomer.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "energy_tuned" in done.stdout  # the table
    report = json.loads(path.read_text())

    seeds = report["seeds"]
    assert report["quick"] is True and len(seeds) >= 1
    assert report["threads"] == 1 and "--quick" in report["command"]
    assert math.isfinite(report["seconds"]) and report["seconds"] > 0

    assert set(report["rows"]) == set(ROWS)
    for row in ROWS:
        assert set(report["rows"][row]) == set(RANGES)
        for rng in RANGES:
            cell = report["rows"][row][rng]
            for key in ("error", "ratio"):
                assert isinstance(cell[key], float) and math.isfinite(cell[key]), (row, rng, key)
                assert cell[key] > 0
            assert isinstance(cell["n"], int) and cell["n"] > 0
            assert isinstance(cell["improved"], int) and 0 <= cell["improved"] <= cell["n"]
            assert len(cell["per_seed_ratio"]) == len(seeds)
            assert all(math.isfinite(r) for r in cell["per_seed_ratio"])
            assert len(cell["equal_to_plain"]) == len(seeds)
    for rng in RANGES:
        plain = report["rows"]["plain"][rng]
        assert plain["ratio"] == 1.0 and plain["improved"] == 0

    # every tuned row's validation choice, per seed
    assert set(report["chosen"]) == set(TUNED)
    off_count = 0
    for row in TUNED:
        picks = report["chosen"][row]
        assert len(picks) == len(seeds)
        for i, pick in enumerate(picks):
            assert isinstance(pick["chosen"], str) and pick["chosen"]
            assert isinstance(pick["off"], bool)
            assert math.isfinite(pick["val_untailored"]) and pick["val_sequences"] >= 2
            if pick["off"]:
                off_count += 1
                assert pick["chosen"] == "off" and pick["inner_steps"] == 0
                assert pick["warned_does_not_help"]  # tune says so when it switches off
                for rng in RANGES:
                    cell = report["rows"][row][rng]
                    # exactly the plain model: same predictions, ratio exactly 1
                    assert cell["equal_to_plain"][i] is True
                    assert cell["per_seed_ratio"][i] == 1.0
            else:
                assert pick["inner_steps"] in (1, 2)
                assert pick["step_rule"] in ("fixed", "polyak") and pick["step"] > 0
        if all(p["off"] for p in picks):
            for rng in RANGES:
                assert report["rows"][row][rng]["ratio"] == 1.0
                assert report["rows"][row][rng]["improved"] == 0
    assert report["tuned_off"] == {"off": off_count, "of": 2 * len(seeds)}

    fitted = report["fitted_g"]
    assert 0.0 <= fitted["abs_r_in_range"] <= 1.0
    assert len(fitted["per_seed"]) == len(seeds)
