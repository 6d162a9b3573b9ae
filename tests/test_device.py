"""On an accelerator (skipped without one): every path gives the CPU's outputs and gradients.

``bash benchmarks/device_check.sh`` runs this file first, then the timing grid on the device."""

from __future__ import annotations

import pytest
import torch

from noether_wrap import Affine

from conftest import make_net

CUDA = torch.cuda.is_available()
CONFIGS = [
    {"per_sample": False},
    {"per_sample_path": "lowrank"},
    {"per_sample_path": "vmap"},
    {"adapt": Affine("step.0")},
    {"step_rule": "polyak", "inner_lr": 1.0},
]


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize(
    "options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_every_path_matches_the_cpu_on_the_device(options: dict) -> None:  # type: ignore[type-arg]
    torch.manual_seed(0)
    options = {"inner_steps": 2, **options}
    cpu = make_net(**options)
    x = torch.randn(6, 2, dtype=torch.float64)
    target = torch.randn(6, 4, 2, dtype=torch.float64)
    gpu = make_net(**options).cuda()
    gpu.load_state_dict(cpu.state_dict())
    out_cpu, out_gpu = cpu(x), gpu(x.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-9, atol=1e-10)
    g_cpu = torch.autograd.grad(((out_cpu - target) ** 2).mean(), list(cpu.parameters()))
    loss_gpu = ((out_gpu - target.cuda()) ** 2).mean()
    g_gpu = torch.autograd.grad(loss_gpu, list(gpu.parameters()))
    for a, b in zip(g_gpu, g_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-10)
    assert gpu.last_path == cpu.last_path
