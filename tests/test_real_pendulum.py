"""The real-pendulum example at its --quick size: the protocol's JSON shape, every row finite,
the selected row a real row, and the recording's checksum check."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_examples import PROTOCOL_ROW_KEYS

from noether_experiments import real_pendulum

ROW_KEYS = PROTOCOL_ROW_KEYS | {"whole_error", "whole_ratio", "validation_error"}


def test_quick_report(tmp_path: Path) -> None:
    out = tmp_path / "real_pendulum.json"
    real_pendulum.main(["--quick", "--seeds", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    for key in ("example", "data_seeds", "seeds", "seconds", "metric", "inner_lr", "selected"):
        assert key in report, key
    assert report["example"] == "real_pendulum"
    rows = report["rows"]
    assert {"vanilla", "control", "hnn", "projection_energy", "testtime_energy"} <= set(rows)
    assert report["selected"] in rows
    assert set(report["inner_lr"]) == set(rows)
    assert rows["vanilla"]["ratio"] == 1.0
    n_windows = len(report["windows"]["test_starts"])
    for name, row in rows.items():
        assert set(row) >= ROW_KEYS, name
        for key in ("error", "ratio", "whole_error", "whole_ratio", "validation_error"):
            assert math.isfinite(row[key]), (name, key)
        lo, hi = row["ratio_ci"]
        assert lo <= hi, name
        assert row["n_test"] == n_windows * len(report["seeds"])
        assert len(report["raw"][name][0]) == len(report["seeds"])  # (data, model seeds, windows)
        assert len(report["raw"][name][0][0]) == n_windows
        assert all(math.isfinite(e) for e in report["raw_whole_errors"][name])
    for name, metrics in report["embeddings"].items():
        assert 0 <= metrics["abs_r"] <= 1 and metrics["within_var_frac"] >= 0, name
    assert report["provenance"]["torch_threads"] == 1
    assert report["run"]["data_sha256"] == real_pendulum.SHA256
    assert set(report["diagnostics"]) == {
        "vanilla_euler",
        "projection_energy_euler",
        "vanilla_first_row_states",
    }


def test_checksum_fires_on_a_corrupted_copy(tmp_path: Path) -> None:
    good = real_pendulum.DATA.read_bytes()
    copy = tmp_path / "real_pend_h_1.txt"
    copy.write_bytes(good)
    assert real_pendulum.load(copy).shape == (556, 4)
    copy.write_bytes(good.replace(b"5.0000000000000000e+000", b"5.0000000000000001e+000", 1))
    with pytest.raises(real_pendulum.ChecksumError, match="sha256"):
        real_pendulum.load(copy)
    with pytest.raises(real_pendulum.ChecksumError):
        real_pendulum.main(["--quick", "--data", str(copy)])


def test_quick_time_split(tmp_path: Path) -> None:
    """experiments/real_blocks.py: every block and row finite, the tuned rows' choices recorded,
    and a guard that binds never returns anything but the plain or the tailored prediction."""
    from noether_experiments import real_blocks

    out = tmp_path / "real_blocks.json"
    report = real_blocks.main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text())["example"] == "real_blocks"
    blocks = report["blocks"]
    assert list(blocks) == ["60-70%", "70-80%"]
    for name, rows in blocks.items():
        assert {"tuned", "tuned_unguarded", "polyak_0.5_guard_0.2"} <= set(rows), name
        for row, m in rows.items():
            assert math.isfinite(m["ratio"]) and 0 <= m["improved"] <= m["n"], (name, row)
    for run in report["runs"]:
        chosen = run["chosen"]["tuned"]
        assert chosen["guard"] is None or chosen["guard"] > 0
        assert run["chosen"]["tuned_unguarded"]["guard"] is None
