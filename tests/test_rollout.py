from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from noether_wrap import Rollout


class Rotation(nn.Module):
    """dx/dt = (p, -q): exact solution is a rotation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 1], -x[:, 0]], dim=-1)


def _exact(x0: torch.Tensor, dt: float, steps: int) -> torch.Tensor:
    t = dt * torch.arange(1, steps + 1, dtype=x0.dtype)
    c, s = torch.cos(t)[None], torch.sin(t)[None]
    return torch.stack([x0[:, :1] * c + x0[:, 1:] * s, -x0[:, :1] * s + x0[:, 1:] * c], -1)


def test_step_model_rollout_is_iterated_step() -> None:
    step = nn.Linear(3, 3)
    x0 = torch.randn(4, 3)
    out = Rollout(step, horizon=3)(x0)
    assert out.shape == (4, 3, 3)
    torch.testing.assert_close(out[:, 2], step(step(step(x0))))
    assert Rollout(step, horizon=3)(x0, horizon=5).shape == (4, 5, 3)


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("rk4", 4)])
def test_integrators_converge_at_their_order(method: str, order: int) -> None:
    x0 = torch.randn(2, 2, dtype=torch.float64)
    errors = []
    for n in (20, 40):
        dt = 1.0 / n
        out = Rollout(Rotation(), horizon=n, dt=dt, method=method)(x0)  # type: ignore[arg-type]
        errors.append(float((out[:, -1] - _exact(x0, dt, n)[:, -1]).abs().max()))
    assert math.log2(errors[0] / errors[1]) == pytest.approx(order, abs=0.3)


def test_context_model_reads_last_frames() -> None:
    class Sum(nn.Module):
        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            return frames.sum(1)

    x0 = torch.tensor([[[0.0], [1.0], [1.0]]])  # (batch, r=3, state=1)
    out = Rollout(Sum(), horizon=4, context=2)(x0)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([2.0, 3.0, 5.0, 8.0]))


def test_errors_name_the_argument() -> None:
    Rollout(nn.Linear(2, 2), horizon=1)
    with pytest.raises(ValueError, match="`horizon`"):
        Rollout(nn.Linear(2, 2), horizon=0)
    with pytest.raises(ValueError, match="`method`"):
        Rollout(nn.Linear(2, 2), horizon=2, method="leapfrog")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`dt`"):
        Rollout(nn.Linear(2, 2), horizon=2, method="rk4")
    with pytest.raises(ValueError, match="`dt`"):
        Rollout(nn.Linear(2, 2), horizon=2, dt=0.1)
    with pytest.raises(ValueError, match="`context`"):
        Rollout(nn.Linear(2, 2), horizon=2, context=0)
    with pytest.raises(TypeError, match="`step`"):
        Rollout(lambda x: x, horizon=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`x0`"):
        Rollout(nn.Linear(2, 2), horizon=2, context=3)(torch.randn(4, 2, 2))
