"""Rule 8: training under DistributedDataParallel (torchrun, gloo, 2 processes) gives the same
parameters as one process on the whole batch."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tensor_state

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp.py"


def _load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("ddp_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rule8_ddp_matches_one_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    steps, batch = 3, 8
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "0",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "localhost:0",
        str(EXAMPLE),
        "--steps",
        str(steps),
        "--batch",
        str(batch),
        "--save",
        str(out),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-6000:])
    ddp_state = {
        k: v for k, v in torch.load(out, weights_only=True).items() if isinstance(v, torch.Tensor)
    }

    example = _load_example()
    net = example.make_net()
    before = tensor_state(net)
    x0, target = example.make_data(batch)
    example.train(net, x0, target, steps)
    single = tensor_state(net)
    assert ddp_state.keys() == single.keys()
    for key in single:
        torch.testing.assert_close(ddp_state[key], single[key], rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(before[k], single[k]) for k in single)
