"""Combinations of the wrapper's options x model kinds, with the cross-path agreements as
properties (float64). The ``ci`` hypothesis profile keeps this under a minute; run a larger fuzz
with ``HYPOTHESIS_PROFILE=fuzz pytest tests/test_combinations.py``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap.embeddings import MLPEmbedding

from conftest import tensor_state

DIM = 3
KINDS = ["mlp", "thin_mlp", "bias_free", "buffer", "dropout", "batchnorm_eval", "conv", "context"]


class _TimeLast(nn.Module):
    """Puts the rollout's time axis last: ``(batch, T, d) -> (batch, d, T)`` (``time_dim=2``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x).movedim(1, -1)
        return out


class _Scaled(nn.Module):
    """A step that reads a buffer (a fixed output scale)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("scale", torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.scale * self.inner(x)
        return out


class _ConvStep(nn.Module):
    """A Conv1d step on a state of ``DIM`` features seen as one channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, padding_mode="zeros")
        self.head = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.conv(x.unsqueeze(1)).squeeze(1)))
        return out


class _ContextStep(nn.Module):
    """Reads the last two states ``(batch, 2, d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * DIM, 8), nn.Tanh(), nn.Linear(8, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x[:, -1] + 0.3 * self.net(x.flatten(1))
        return out


def _mlp(hidden: int, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, DIM))


@dataclass
class Case:
    kind: str
    options: dict[str, Any]
    batch: int
    seed: int

    def build(self, **override: Any) -> NoetherWrapper:
        torch.manual_seed(self.seed)
        context = 1
        if self.kind == "mlp":
            step: nn.Module = _mlp(8)
        elif self.kind == "thin_mlp":
            step = _mlp(2)
        elif self.kind == "bias_free":
            step = _mlp(8, bias=False)
        elif self.kind == "buffer":
            step = _Scaled(_mlp(6))
        elif self.kind == "dropout":
            step = nn.Sequential(nn.Linear(DIM, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, DIM))
        elif self.kind == "batchnorm_eval":
            step = nn.Sequential(nn.Linear(DIM, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, DIM))
        elif self.kind == "conv":
            step = _ConvStep()
        else:
            step, context = _ContextStep(), 2
        model: nn.Module = Rollout(step.double(), horizon=4, context=context)
        options = {**self.options, **override}
        if options.get("time_dim", 1) == 2:
            model = _TimeLast(model)
        window = options.get("window", 1)
        if options.get("adapt") in ("first", "last"):  # the first or the last layer's params
            owners = [n.rsplit(".", 1)[0] for n, _ in model.named_parameters()]
            owner = owners[0] if options["adapt"] == "first" else owners[-1]
            options["adapt"] = owner + ".*"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # first_order's note that g will not learn
            net = NoetherWrapper(
                model,
                MLPEmbedding(window * DIM, out_features=2, hidden=6, depth=1).double(),
                **options,
            )
        net.eval()  # dropout off and BatchNorm on running statistics: paths must agree exactly
        return net

    def inputs(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        frames = 2 if self.kind == "context" or self.options.get("window", 1) > 1 else 0
        shape = (self.batch, frames, DIM) if frames else (self.batch, DIM)
        return torch.randn(shape, generator=g, dtype=torch.float64)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(KINDS))
    adapt = draw(st.sampled_from([None, "*bias", "*weight", "first", "last"]))
    if kind == "bias_free" and adapt == "*bias":
        adapt = None
    options: dict[str, Any] = {
        "inner_steps": draw(st.integers(0, 3)),
        "inner_lr": draw(st.sampled_from([1e-3, 0.03, 0.3])),
        "loss_form": draw(st.sampled_from(["anchor", "chain"])),
        "distance": draw(st.sampled_from(["mse", "cosine"])),
        "adapt": adapt,
        "first_order": draw(st.booleans()),
        "inner_horizon": draw(st.sampled_from([None, 1, 3])),
        "keep_if_better": draw(st.booleans()),
        "max_inner_grad_norm": draw(st.sampled_from([None, 1e-3, 1.0])),
        "time_dim": draw(st.sampled_from([1, 2])),
    }
    if kind == "context" or draw(st.booleans()):
        options["window"] = draw(st.sampled_from([1, 2])) if kind == "context" else 1
    if options.get("window", 1) == 2 and kind != "context":
        options["window"] = 1
    if kind == "context":
        options["time_dim"] = 1  # inputs with frames have time where the output has it
    return Case(kind, options, draw(st.integers(1, 4)), draw(st.integers(0, 2**16)))


def _quiet(net: NoetherWrapper, x: torch.Tensor, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return net(x, **kwargs)


def _grads(net: NoetherWrapper, x: torch.Tensor) -> list[torch.Tensor]:
    out = _quiet(net, x)
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.pow(2).mean(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@given(case=cases())
def test_paths_agree_on_option_combinations(case: Case) -> None:
    """Low-rank and vmap give the same outputs and outer gradients wherever low-rank applies."""
    x = case.inputs()
    fast = case.build(per_sample_path="lowrank")
    slow = case.build(per_sample_path="vmap")
    try:
        out_fast = _quiet(fast, x)
    except ValueError as error:  # an adapt set the low-rank path cannot follow: must say so
        assert "lowrank" in str(error)
        return
    out_slow = _quiet(slow, x)
    torch.testing.assert_close(out_fast, out_slow, rtol=1e-9, atol=1e-10)
    for a, b in zip(_grads(fast, x), _grads(slow, x)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@given(case=cases())
def test_invariants_on_option_combinations(case: Case) -> None:
    """For any combination: per sample at batch 1 equals the shared step; splitting the batch
    changes nothing per sample; ``net(x)`` equals ``return_info``'s prediction; k = 0 is the
    model; parameters and buffers never change; every finite input gives a finite output."""
    x = case.inputs()
    net = case.build()
    before = tensor_state(net)
    out = _quiet(net, x)
    info = _quiet(net, x, return_info=True)
    torch.testing.assert_close(out, info.prediction, rtol=0, atol=0)
    assert torch.isfinite(out).all()
    assert info.noether_losses.shape == (case.batch, case.options["inner_steps"] + 1)
    if case.options["inner_steps"] == 0:
        assert torch.equal(out, net.model(x))
    halves = [_quiet(net, part) for part in x.split(max(1, case.batch // 2))]
    torch.testing.assert_close(torch.cat(halves), out, rtol=1e-9, atol=1e-10)
    shared = case.build(per_sample=False)
    torch.testing.assert_close(_quiet(shared, x[:1]), out[:1], rtol=1e-9, atol=1e-10)
    for key, value in tensor_state(net).items():
        assert torch.equal(before[key], value), key
