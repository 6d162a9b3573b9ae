"""The per-sample paths agree: low-rank recorded terms (``nn.Linear``) and ``vmap`` over ``grad``,
outputs and outer gradients, in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap._inner import lowrank
from noether_wrap.embeddings import MLPEmbedding

from conftest import copy_weights, make_net


def _pair(**kwargs: Any) -> tuple[NoetherWrapper, NoetherWrapper]:
    torch.manual_seed(7)
    fast = make_net(per_sample_path="lowrank", **kwargs)
    slow = make_net(per_sample_path="vmap", **kwargs)
    copy_weights(slow, fast)
    return fast, slow


def _assert_agree(fast: NoetherWrapper, slow: NoetherWrapper, x: torch.Tensor) -> None:
    target = torch.randn_like(fast(x))
    outs, grads = [], []
    for net in (fast, slow):
        out = net(x, return_info=True)
        loss = ((out.prediction - target) ** 2).mean() + out.noether_losses.mean()
        params = [p for p in net.parameters() if p.requires_grad]
        outs.append(out)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    assert fast.last_path == "lowrank" and slow.last_path == "vmap"
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads[0], grads[1]):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("form", ["anchor", "chain"])
@pytest.mark.parametrize("hidden", [3, 32])  # thin layers go dense, wide ones recorded
def test_paths_agree_on_mlps(steps: int, form: str, hidden: int) -> None:
    fast, slow = _pair(hidden=hidden, inner_steps=steps, loss_form=form, inner_lr=0.1)
    _assert_agree(fast, slow, torch.randn(5, 2, dtype=torch.float64))


@pytest.mark.parametrize("adapt", ["step.2.*", "*.bias", "*.weight", "step.0.weight"])
def test_paths_agree_with_adapt_subsets(adapt: str) -> None:
    fast, slow = _pair(hidden=16, inner_steps=2, adapt=adapt, inner_lr=0.2)
    _assert_agree(fast, slow, torch.randn(4, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    "extra",
    [
        {"max_inner_grad_norm": 0.05},
        {"keep_if_better": True, "inner_lr": 5.0},
        {"distance": "cosine"},
        {"inner_horizon": 2},
    ],
)
def test_paths_agree_with_options(extra: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {"hidden": 16, "inner_steps": 2, "inner_lr": 0.2, **extra}
    fast, slow = _pair(**kwargs)
    _assert_agree(fast, slow, torch.randn(6, 2, dtype=torch.float64))


def test_paths_agree_first_order() -> None:
    with pytest.warns(UserWarning):
        fast, slow = _pair(hidden=16, inner_steps=3, first_order=True)
    _assert_agree(fast, slow, torch.randn(4, 2, dtype=torch.float64))


class ConvStep(nn.Module):
    """A conv model whose head is ``nn.Linear`` applied position-wise (channels last)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, padding=1, padding_mode="circular")
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, L) -> (batch, L)
        h = torch.tanh(self.conv(x.unsqueeze(1))).transpose(1, 2)  # (batch, L, 4)
        return x + 0.1 * self.head(h).squeeze(-1)


def _conv_pair(adapt: str | None) -> tuple[NoetherWrapper, NoetherWrapper]:
    torch.manual_seed(3)
    model = Rollout(ConvStep().double(), horizon=3)
    emb = MLPEmbedding(6, hidden=8).double()
    fast = NoetherWrapper(
        model, emb, inner_steps=2, inner_lr=0.3, adapt=adapt, per_sample_path="lowrank"
    )
    slow = NoetherWrapper(
        model, emb, inner_steps=2, inner_lr=0.3, adapt=adapt, per_sample_path="vmap"
    )
    return fast, slow


def test_paths_agree_on_a_conv_model_with_linear_head_adapted() -> None:
    fast, slow = _conv_pair("step.head.*")
    _assert_agree(fast, slow, torch.randn(4, 6, dtype=torch.float64))


def test_paths_agree_on_a_conv1d_model_all_adapted() -> None:
    fast, slow = _conv_pair(None)  # circular padding, conv and linear layers adapted
    _assert_agree(fast, slow, torch.randn(4, 6, dtype=torch.float64))


class Conv2dStep(nn.Module):
    """Zero padding, a strided conv and a plain conv: frames (batch, 1, 6, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.mix = nn.Conv2d(3, 1, (2, 3), padding=(0, 1), bias=False)
        self.up = nn.Upsample(size=(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.down(x))
        return x + 0.2 * self.up(self.mix(nn.functional.pad(h, (0, 0, 0, 1))))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_paths_agree_on_a_conv2d_model(steps: int, clip: float | None) -> None:
    torch.manual_seed(4)
    model = Rollout(Conv2dStep().double(), horizon=3)
    emb = MLPEmbedding(36, hidden=8).double()
    kwargs: dict[str, Any] = {"inner_steps": steps, "inner_lr": 0.3, "max_inner_grad_norm": clip}
    fast = NoetherWrapper(model, emb, per_sample_path="lowrank", **kwargs)
    slow = NoetherWrapper(model, emb, per_sample_path="vmap", **kwargs)
    _assert_agree(fast, slow, torch.randn(3, 1, 6, 6, dtype=torch.float64))
    auto = NoetherWrapper(model, emb, **kwargs)
    auto(torch.randn(2, 1, 6, 6, dtype=torch.float64))
    assert auto.last_path == "vmap"  # convolutions: vmap's grouped-conv batching rule is faster


def test_auto_uses_vmap_when_an_unsupported_layer_is_adapted() -> None:
    torch.manual_seed(3)
    step = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6)).double()
    model = Rollout(step, horizon=3)
    emb = MLPEmbedding(6, hidden=8).double()
    net = NoetherWrapper(model, emb, inner_lr=0.3)
    ref = NoetherWrapper(model, emb, inner_lr=0.3, per_sample_path="vmap")
    x = torch.randn(3, 6, dtype=torch.float64)
    out = net(x)
    assert net.last_path == "vmap"
    with pytest.raises(ValueError, match="`per_sample_path='lowrank'`"):
        NoetherWrapper(model, emb, per_sample_path="lowrank")(x)
    torch.testing.assert_close(out, ref(x))
    only_linear = NoetherWrapper(model, emb, inner_lr=0.3, adapt="step.0.*")
    only_linear(x)
    assert only_linear.last_path == "lowrank"


class FoldsTime(nn.Module):
    """Feeds its Linear a (batch * 2, d) tensor: the batch is not at dim 0 alone."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = torch.stack([x, -x], dim=1).reshape(-1, 2)
        return self.lin(pair).reshape(x.shape[0], 2, 2).sum(1)


def test_auto_falls_back_to_vmap_when_a_layer_sees_a_folded_batch() -> None:
    model = Rollout(FoldsTime().double(), horizon=2)
    emb = MLPEmbedding(2).double()
    auto = NoetherWrapper(model, emb, inner_lr=0.2)
    slow = NoetherWrapper(model, emb, inner_lr=0.2, per_sample_path="vmap")
    x = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(auto(x), slow(x))
    assert auto.last_path == "vmap"
    with pytest.raises(ValueError, match="first dim is not the batch"):
        NoetherWrapper(model, emb, per_sample_path="lowrank")(x)


def test_paths_agree_with_predict() -> None:
    torch.manual_seed(2)
    field = nn.Sequential(nn.Linear(2, 24), nn.Tanh(), nn.Linear(24, 2)).double()
    model = Rollout(field, horizon=1, dt=0.1, method="rk4")
    emb = MLPEmbedding(2).double()
    kwargs: dict[str, Any] = {"inner_lr": 0.3, "predict": lambda m, x: m.step(x)}
    fast = NoetherWrapper(model, emb, per_sample_path="lowrank", **kwargs)
    slow = NoetherWrapper(model, emb, per_sample_path="vmap", **kwargs)
    _assert_agree(fast, slow, torch.randn(7, 2, dtype=torch.float64))


def test_shared_first_order_info_is_differentiable() -> None:
    with pytest.warns(UserWarning):
        net = make_net(inner_steps=2, first_order=True, per_sample=False)
    info = net(torch.randn(3, 2, dtype=torch.float64), return_info=True)
    (info.prediction.sum() + info.noether_losses.sum() + info.initial_prediction.sum()).backward()
    assert net.log_inner_lr.grad is not None


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("adapt", [None, "*.weight", "step.0.*"])
def test_paths_agree_in_each_linear_form(
    monkeypatch: pytest.MonkeyPatch, steps: int, dense: bool, adapt: str | None
) -> None:
    """Both forms of an adapted linear layer, dense and recorded, forced on every layer, are
    exact against vmap (outputs, outer gradients through every inner step)."""
    monkeypatch.setattr(lowrank, "dense_is_cheaper", lambda *_: dense)
    extra = {} if adapt is None else {"adapt": adapt}
    fast, slow = _pair(hidden=16, inner_steps=steps, inner_lr=0.2, **extra)
    _assert_agree(fast, slow, torch.randn(5, 2, dtype=torch.float64))


@pytest.mark.parametrize("dense", [True, False])
def test_the_outer_gradient_can_itself_be_differentiated(
    monkeypatch: pytest.MonkeyPatch, dense: bool
) -> None:
    """A gradient of the outer gradient (a Hessian-vector product of the training loss, as a
    gradient penalty takes) agrees with vmap's: the update's gathered gradient is built from
    differentiable operations."""
    monkeypatch.setattr(lowrank, "dense_is_cheaper", lambda *_: dense)
    fast, slow = _pair(hidden=8, inner_steps=2, inner_lr=0.2)
    x = torch.randn(4, 2, dtype=torch.float64)
    target = torch.randn_like(fast(x))
    results = []
    for net in (fast, slow):
        params = [p for p in net.model.parameters()]
        loss = ((net(x) - target) ** 2).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        results.append(torch.autograd.grad(penalty, params))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_the_form_rule_picks_the_cheaper_application() -> None:
    """Dense where a use costs no more than the recorded terms: thin layers, and layers used
    many times; recorded terms for a wide layer used a few times."""
    assert lowrank.dense_is_cheaper(uses=40, d_in=4, d_out=64)
    assert lowrank.dense_is_cheaper(uses=40, d_in=64, d_out=64)
    assert not lowrank.dense_is_cheaper(uses=10, d_in=64, d_out=64)
    assert not lowrank.dense_is_cheaper(uses=4, d_in=512, d_out=512)
