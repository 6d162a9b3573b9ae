"""The short scripts in examples/ run at their --quick size and print what their docstrings say."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_every_example_is_short_and_standalone() -> None:
    for script in EXAMPLES.glob("*.py"):
        text = script.read_text()
        assert len(text.splitlines()) < 150, script.name
        assert "sys.path" not in text and "noether_experiments" not in text, script.name
    readme = (EXAMPLES / "README.md").read_text()
    for script in EXAMPLES.glob("*.py"):
        assert script.name in readme, script.name  # the reading order names every script


def test_train_loop_quick() -> None:
    out = _run("train_loop.py", "--quick")
    match = re.search(r"tailored (\S+)\s+untailored (\S+)\s+step size (\S+)", out)
    assert match, out
    tailored, plain, step = (float(v) for v in match.groups())
    assert all(math.isfinite(v) for v in (tailored, plain, step))
    assert 0 < tailored < 10 and 0 < plain < 10 and step > 0
    assert tailored != plain  # the wrap changes the prediction


def test_pendulum_quick_start() -> None:
    out = _run("pendulum.py", "--quick")
    assert "(over 25 sequences)" in out  # cross-validated: every training trajectory scored once
    plain = float(re.search(r"plain field\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    tailored = float(re.search(r"tailored\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    chosen = re.search(r"^(.*)<- chosen$", out, re.M)
    assert chosen and 0 < plain < 1 and 0 < tailored < 1
    # "off" chosen means the wrapper is exactly the field; otherwise tailoring moves the rollout
    assert (tailored == plain) == chosen.group(1).startswith("off")


def test_rnn_affine_quick() -> None:
    out = _run("rnn_affine.py", "--quick")
    match = re.search(r"plain (\S+), tailored (\S+) \((\S+)x\)", out)
    assert match, out
    plain, tailored, ratio = (float(v) for v in match.groups())
    assert (
        0 < plain < 2 and 0 < tailored < 2 and math.isclose(ratio, tailored / plain, abs_tol=2e-3)
    )
    assert "guard 0.3" in out  # the guard is scored beside every step
