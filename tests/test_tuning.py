"""tune_inner_lr picks the step on held-out data; tailoring_parameters is what meta-trains g."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from noether_wrap import NoetherWrapper, Rollout, tune_inner_lr
from noether_wrap.embeddings import MLPEmbedding


class _Shift(nn.Module):
    """``x -> x + b`` with ``b = 1``: one step of size lr on ``L = b^2`` (g = x, horizon 1)
    moves ``b`` to ``b (1 - 2 lr)``, so the prediction ``x0 + b'`` hits ``x0`` at lr = 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b


def test_tune_inner_lr_picks_the_known_best_and_sets_it() -> None:
    net = NoetherWrapper(Rollout(_Shift(), 1), lambda s: s[:, 0], inner_lr=0.01)
    x = torch.randn(8, 1, dtype=torch.float64)
    target = x.unsqueeze(1)  # the conserved trajectory: x0 itself
    result = tune_inner_lr(net, x, target, candidates=[0.1, 0.25, 0.5, 1.0])
    assert result.best == 0.5
    assert math.isclose(net.inner_lr, 0.5)
    assert result.losses[0.5] < 1e-20
    for lr, value in result.losses.items():  # (1 - 2 lr)^2
        assert math.isclose(value, (1 - 2 * lr) ** 2, abs_tol=1e-12)
    assert math.isclose(result.untailored, 1.0)
    assert net.inner_steps == 1 and net.model.step.b.item() == 1.0  # nothing else changed


def test_tune_inner_lr_with_a_custom_forward_chunks_and_errors() -> None:
    net = NoetherWrapper(Rollout(_Shift(), 1), lambda s: s[:, 0], inner_lr=0.01)
    x = torch.randn(9, 1, dtype=torch.float64)
    whole = tune_inner_lr(net, x, x, candidates=[0.1, 0.4], forward=lambda n, v: n(v)[:, 0])
    pieces = tune_inner_lr(
        net, x, x, candidates=[0.1, 0.4], forward=lambda n, v: n(v)[:, 0], chunk=4
    )
    assert whole.best == pieces.best == 0.4
    for lr in (0.1, 0.4):
        assert math.isclose(whole.losses[lr], pieces.losses[lr], rel_tol=1e-9)
    with pytest.raises(ValueError, match="`candidates`"):
        tune_inner_lr(net, x, x, candidates=[0.1, -1.0])
    with pytest.raises(ValueError, match="`inputs` and `target`"):
        tune_inner_lr(net, x, x[:3])
    assert math.isclose(net.inner_lr, 0.4)  # a failed call leaves the last setting


def test_tailoring_parameters_are_the_embedding_and_the_step() -> None:
    g = MLPEmbedding(2)
    net = NoetherWrapper(Rollout(nn.Linear(2, 2), 3), g)
    mine = list(net.tailoring_parameters())
    assert len(mine) == len(list(g.parameters())) + 1
    assert any(p is net.log_inner_lr for p in mine)
    model_ids = {id(p) for p in net.model.parameters()}
    assert not any(id(p) in model_ids for p in mine)
    frozen = NoetherWrapper(Rollout(nn.Linear(2, 2), 3), lambda s: s.sum(-1), learn_inner_lr=False)
    assert list(frozen.tailoring_parameters()) == []


def test_meta_training_g_with_the_predictor_frozen_moves_only_g_and_the_step() -> None:
    torch.manual_seed(0)
    net = NoetherWrapper(Rollout(nn.Linear(2, 2), 3), MLPEmbedding(2), inner_lr=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.Adam(net.tailoring_parameters(), lr=1e-2)
    x, target = torch.randn(8, 2), torch.randn(8, 3, 2)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), target).backward()
        optimizer.step()
    for name, p in net.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (not name.startswith("model.")), name
