"""adapt=Affine(...): per-sequence scale-and-shift tailoring for any architecture (CNGrad)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from noether_wrap import Affine, NoetherWrapper
from noether_wrap.embeddings import MLPEmbedding

from conftest import gradcheck_weight_and_step, make_net
from reference import tailor_affine_reference


def _net(**kwargs: object) -> NoetherWrapper:
    return make_net(horizon=4, inner_steps=3, inner_lr=0.2, adapt=Affine("step.0"), **kwargs)


def test_affine_matches_a_per_sequence_loop_reference_in_value_and_gradient() -> None:
    net = _net()
    x = torch.randn(5, 2, dtype=torch.float64)
    step, emb = net.model.step, net.embedding.net
    model_params = [step[0].weight, step[0].bias, step[2].weight, step[2].bias]
    emb_params = [emb[0].weight, emb[0].bias, emb[2].weight, emb[2].bias]
    ours = net(x)
    assert net.last_path == "affine"
    ref = tailor_affine_reference(model_params, emb_params, net.log_inner_lr, x, horizon=4, steps=3)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    target = torch.randn_like(ours)
    params = [*model_params, *emb_params, net.log_inner_lr]
    g_ours = torch.autograd.grad(((ours - target) ** 2).mean(), params)
    g_ref = torch.autograd.grad(((ref - target) ** 2).mean(), params)
    assert max(float((a - b).abs().max()) for a, b in zip(g_ours, g_ref)) < 1e-10


@pytest.mark.parametrize("per_sample", [True, False])
def test_affine_gradcheck(per_sample: bool) -> None:
    net = make_net(
        horizon=3, inner_steps=2, inner_lr=0.3, adapt=Affine("step.0"), per_sample=per_sample
    )
    assert gradcheck_weight_and_step(net, torch.randn(3, 2, dtype=torch.float64))


def test_affine_is_batch_invariant_and_leaves_the_model_alone() -> None:
    net = _net()
    x = torch.randn(6, 2, dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    whole = net(x)
    parts = torch.cat([net(x[:2]), net(x[2:5]), net(x[5:])])
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-12)
    perm = torch.randperm(6)
    torch.testing.assert_close(net(x[perm]), whole[perm], rtol=1e-12, atol=1e-12)
    for key, value in net.state_dict().items():
        assert torch.equal(before[key], value), key
    assert not torch.allclose(whole, net.model(x))


@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode"])
def test_affine_in_eval_no_grad_and_inference_mode(mode: str) -> None:
    net = _net()
    x = torch.randn(4, 2, dtype=torch.float64)
    expected = net(x).detach()
    if mode == "eval":
        net.eval()
        out = net(x)
    else:
        ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with ctx:
            out = net(x)
        assert not out.requires_grad
    torch.testing.assert_close(out.detach(), expected, rtol=1e-12, atol=1e-12)


def test_affine_first_order_keep_if_better_and_clipping() -> None:
    x = torch.randn(4, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _net(first_order=True)
    first(x).sum().backward()
    assert first.log_inner_lr.grad is not None
    assert all(p.grad is None for p in first.embedding.parameters())
    keep = _net(keep_if_better=True)
    info = keep(x, return_info=True)
    worse = info.noether_losses[:, -1] >= info.noether_losses[:, 0]
    torch.testing.assert_close(info.prediction[worse], info.initial_prediction[worse])
    clipped = _net(max_inner_grad_norm=1e-6)
    torch.testing.assert_close(clipped(x), clipped.model(x), rtol=0, atol=1e-5)


def test_tailor_and_tailored_model_give_the_affines_and_a_model_that_reproduces_them() -> None:
    net = _net(keep_if_better=True)
    x = torch.randn(3, 2, dtype=torch.float64)
    affines = net.tailor(x)
    assert set(affines) == {"step.0.scale", "step.0.shift"}
    assert affines["step.0.scale"].shape == (3, 8)
    out = net(x)
    for i in range(3):
        copy = net.tailored_model(x, index=i)
        torch.testing.assert_close(copy(x[i : i + 1])[0], out[i], rtol=1e-10, atol=1e-12)


def test_affine_errors_name_adapt() -> None:
    with pytest.raises(ValueError, match="`adapt`.*matches no module"):
        make_net(adapt=Affine("decoder.*"))
    with pytest.raises(ValueError, match="`pattern`"):
        Affine("")

    class TimeFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(2, 4)  # batch_first=False: (T, B, H)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x.unsqueeze(0).expand(3, -1, -1))
            return self.head(out).transpose(0, 1)

    net = NoetherWrapper(TimeFirst(), MLPEmbedding(2), adapt=Affine("rnn"))
    with pytest.raises(ValueError, match="batch_first=True"):
        net(torch.randn(5, 2))


class _Seq2Seq(nn.Module):
    """An RNN encoder-decoder: reads (batch, 6, 2) frames, predicts (batch, 5, 2)."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.encoder = cell(2, 16, batch_first=True)
        self.decoder = cell(2, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        _, state = self.encoder(frames)
        x, outs = frames[:, -1:], []
        for _ in range(5):
            h, state = self.decoder(x, state)
            x = x + self.head(h)
            outs.append(x)
        return torch.cat(outs, dim=1)


class _Transformer(nn.Module):
    """A causal, batch_first Transformer encoder that rolls out 5 frames."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        seq, outs = frames, []
        for _ in range(5):
            n = seq.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(n, dtype=seq.dtype)
            h = self.encoder(self.embed(seq), mask=mask, is_causal=True)
            nxt = seq[:, -1:] + self.head(h[:, -1:])
            outs.append(nxt)
            seq = torch.cat([seq, nxt], dim=1)
        return torch.cat(outs, dim=1)


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: _Seq2Seq(nn.GRU), "decoder"),
        (lambda: _Seq2Seq(nn.LSTM), "decoder"),
        (_Transformer, "encoder.layers.*.linear2"),
    ],
    ids=["gru", "lstm", "transformer"],
)
def test_sequence_models_tailor_per_sample_with_affine_exactly(make, pattern: str) -> None:  # type: ignore[no-untyped-def]
    """One line: adapt=Affine(...); exact against a per-sequence loop (float64, 1e-10)."""
    torch.manual_seed(0)
    model = make().double()
    net = NoetherWrapper(model, MLPEmbedding(2).double(), inner_lr=0.1, adapt=Affine(pattern))
    frames = torch.randn(4, 6, 2, dtype=torch.float64)
    target = torch.randn(4, 5, 2, dtype=torch.float64)
    out = net(frames)
    loss = ((out - target) ** 2).mean()
    grads = torch.autograd.grad(loss, list(net.parameters()), allow_unused=True)
    one_by_one = torch.cat([net(frames[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(out, one_by_one, rtol=1e-10, atol=1e-10)
    loop_loss = (
        sum(((net(frames[i : i + 1]) - target[i : i + 1]) ** 2).mean() for i in range(4)) / 4
    )
    loop_grads = torch.autograd.grad(loop_loss, list(net.parameters()), allow_unused=True)
    for a, b in zip(grads, loop_grads):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(out, model(frames))
