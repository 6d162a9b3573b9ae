"""Mixed precision and torch.compile."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap.embeddings import MLPEmbedding


def _net(path: str, per_sample: bool = True) -> NoetherWrapper:
    torch.manual_seed(0)
    step = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 4))
    return NoetherWrapper(
        Rollout(step, 10),
        MLPEmbedding(4),
        inner_lr=0.05,
        inner_steps=2,
        per_sample=per_sample,
        per_sample_path=path,
    )


# bf16 keeps 8 mantissa bits: outputs agree with float32 to about 1 % of their scale, and the
# change that tailoring makes agrees to about 5 % of its own size (measured: 1-2 %).
AMP_OUTPUT_TOL = 0.02
AMP_TAILORING_TOL = 0.05


@pytest.mark.parametrize(
    ("path", "per_sample"), [("lowrank", True), ("vmap", True), ("auto", False)]
)
def test_autocast_bfloat16_matches_float32(path: str, per_sample: bool) -> None:
    net = _net(path, per_sample)
    x = torch.randn(8, 4)
    ref = net(x, return_info=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, return_info=True)
    assert out.noether_losses.dtype == torch.float32  # the inner loss is computed in float32
    scale = float(ref.prediction.abs().max())
    assert float((out.prediction.float() - ref.prediction).abs().max()) < AMP_OUTPUT_TOL * scale
    change = ref.prediction - ref.initial_prediction
    amp_change = out.prediction.float() - out.initial_prediction.float()
    assert float((amp_change - change).abs().max()) < AMP_TAILORING_TOL * float(change.abs().max())
    out.prediction.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_wrapping_a_compiled_model_tailors_the_original_module() -> None:
    step = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    model = Rollout(step, 3)
    compiled = torch.compile(model)
    with pytest.warns(UserWarning, match="torch.compile"):
        net = NoetherWrapper(compiled, MLPEmbedding(4, hidden=8), inner_lr=0.1)
    assert net.model is model
    prefixes = ("model.step", "embedding", "log_inner_lr", "_extra_state")
    assert all(k.startswith(prefixes) for k in net.state_dict())


@pytest.mark.parametrize("per_sample", [False, True])
def test_compiled_wrapper_in_eval_matches_eager(per_sample: bool) -> None:
    torch.manual_seed(0)
    step = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    net = NoetherWrapper(
        Rollout(step, 2), MLPEmbedding(4, hidden=8), inner_lr=0.1, per_sample=per_sample
    ).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        eager = net(x)
        untailored = net.model(x)
    compiled = torch.compile(net)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = compiled(x)
    torch.testing.assert_close(out, eager)
    assert not torch.allclose(out, untailored)
    if per_sample:  # the inner loop runs eagerly inside a compiled wrapper (a graph break)
        assert net.last_path == "lowrank"
