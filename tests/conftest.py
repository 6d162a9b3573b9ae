"""Shared factories: small float64 models so that gradient checks are exact and fast."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap.embeddings import MLPEmbedding

# "ci" keeps every property test under a minute in CI and derandomised, so every run draws the
# same examples (a failure reproduces; coverage does not drift from run to run); "fuzz" is the
# long, random run behind the closing notes (HYPOTHESIS_PROFILE=fuzz), for local runs. Tests
# with their own @settings keep their counts and inherit the profile's randomness.
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=3000,
    deadline=None,
    derandomize=False,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_threads() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


def make_step(dim: int = 2, hidden: int = 8, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A one-step MLP ``x_t -> x_{t+1}``."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(dtype)


def make_net(
    *,
    dim: int = 2,
    hidden: int = 8,
    horizon: int = 4,
    emb_hidden: int = 8,
    inner_lr: float = 0.1,
    dtype: torch.dtype = torch.float64,
    **kwargs: Any,
) -> NoetherWrapper:
    """A NoetherWrapper over a Rollout of :func:`make_step` with an MLP embedding."""
    model = Rollout(make_step(dim, hidden, dtype), horizon=horizon)
    emb = MLPEmbedding(dim, out_features=2, hidden=emb_hidden, depth=1).to(dtype)
    return NoetherWrapper(model, emb, inner_lr=inner_lr, **kwargs)


def gradcheck_weight_and_step(net: NoetherWrapper, x: torch.Tensor) -> bool:
    """``gradcheck`` of ``net(x)`` in the first step layer's weight and ``log_inner_lr``
    (float64), both swapped in with ``functional_call``."""
    weight = net.model.step[0].weight

    def fn(w: torch.Tensor, log_lr: torch.Tensor) -> torch.Tensor:
        params = {"model.step.0.weight": w, "log_inner_lr": log_lr}
        out: torch.Tensor = torch.func.functional_call(net, params, (x,))
        return out

    inputs = (
        weight.detach().clone().requires_grad_(),
        net.log_inner_lr.detach().clone().requires_grad_(),
    )
    return bool(torch.autograd.gradcheck(fn, inputs))


def copy_weights(target: nn.Module, source: nn.Module) -> None:
    """Load ``source``'s tensors into ``target``, keeping ``target``'s own settings (a wrapper's
    ``state_dict`` also carries its options, which a plain ``load_state_dict`` would apply)."""
    tensors = {k: v for k, v in source.state_dict().items() if isinstance(v, torch.Tensor)}
    target.load_state_dict(tensors)


def tensor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every tensor of ``module.state_dict()`` (settings left out)."""
    return {
        k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)
    }
