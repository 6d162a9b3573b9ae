"""adapt=Affine(...): per-sequence scale-and-shift tailoring for any architecture (CNGrad)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from noether_experiments.models import Seq2Seq, Transformer
from noether_wrap import Affine, NoetherWrapper
from noether_wrap.embeddings import MLPEmbedding

from conftest import copy_weights, gradcheck_weight_and_step, make_net, tensor_state
from reference import seq2seq_affine_reference, tailor_affine_reference


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


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("per_sample", [True, False])
def test_affine_gradcheck(per_sample: bool, k: int) -> None:
    net = make_net(
        horizon=3, inner_steps=k, inner_lr=0.3, adapt=Affine("step.0"), per_sample=per_sample
    )
    assert gradcheck_weight_and_step(net, torch.randn(3, 2, dtype=torch.float64))


def test_affine_is_batch_invariant_and_leaves_the_model_alone() -> None:
    net = _net()
    x = torch.randn(6, 2, dtype=torch.float64)
    before = tensor_state(net)
    whole = net(x)
    parts = torch.cat([net(x[:2]), net(x[2:5]), net(x[5:])])
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=1e-12)
    perm = torch.randperm(6)
    torch.testing.assert_close(net(x[perm]), whole[perm], rtol=1e-12, atol=1e-12)
    for key, value in tensor_state(net).items():
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
    # keep_if_better: a step large enough that it raises some sequences' Noether losses
    torch.manual_seed(0)
    wide = 2 * torch.randn(8, 2, dtype=torch.float64)
    keep = make_net(
        horizon=4, inner_steps=1, inner_lr=50.0, adapt=Affine("step.0"), keep_if_better=True
    )
    info = keep(wide, return_info=True)
    worse = info.noether_losses[:, -1] >= info.noether_losses[:, 0]
    assert bool(worse.any()) and bool((~worse).any()), info.noether_losses
    assert torch.equal(info.prediction[worse], info.initial_prediction[worse])
    assert torch.equal(info.prediction[worse], keep.model(wide)[worse])
    tailored = info.prediction[~worse] != info.initial_prediction[~worse]
    assert bool(tailored.flatten(1).any(1).all())  # the better ones keep their tailoring
    # clipping: every inner step on a sequence's affines has norm exactly lr * max_norm
    for steps in (1, 3):
        clipped = make_net(
            horizon=4,
            inner_steps=steps,
            inner_lr=0.2,
            adapt=Affine("step.0"),
            max_inner_grad_norm=1e-6,
        )
        affines = clipped.tailor(x)
        norms = torch.cat([v.detach().flatten(1) for v in affines.values()], 1).norm(dim=1)
        one_step = float(clipped.log_inner_lr.detach().exp()) * 1e-6
        if steps == 1:  # from identity (zeros): the affines are the one clipped step
            torch.testing.assert_close(norms, torch.full_like(norms, one_step), rtol=1e-12, atol=0)
        else:  # three clipped steps add up to at most three times one
            assert bool((norms <= steps * one_step * (1 + 1e-12)).all()), norms
            assert bool((norms > one_step).all()), norms
        free = make_net(horizon=4, inner_steps=steps, inner_lr=0.2, adapt=Affine("step.0"))
        copy_weights(free, clipped)
        free_norms = torch.cat([v.detach().flatten(1) for v in free.tailor(x).values()], 1)
        assert bool((free_norms.norm(dim=1) > 1e3 * steps * one_step).all())  # clip was active


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


@pytest.mark.parametrize(
    "make,pattern",
    [
        (lambda: Seq2Seq(nn.GRU), "decoder"),
        (lambda: Seq2Seq(nn.LSTM), "decoder"),
        (Transformer, "encoder.layers.*.linear2"),
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


def _rnn_params(rnn: nn.Module) -> list[torch.Tensor]:
    return [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_recurrent_affine_matches_an_independent_hand_written_loop(cell: str, steps: int) -> None:
    """The library on an RNN encoder-decoder against :func:`seq2seq_affine_reference`: the
    recurrences written out by hand, one sequence at a time, explicit autograd steps on the
    decoder output's scale and shift (not the library run one sequence at a time)."""
    torch.manual_seed(0)
    model = Seq2Seq(nn.GRU if cell == "gru" else nn.LSTM).double()
    emb = MLPEmbedding(2, out_features=2, hidden=8, depth=1).double()
    net = NoetherWrapper(
        model, emb, inner_steps=steps, inner_lr=0.3, adapt=Affine("decoder"), per_sample=True
    )
    frames = torch.randn(4, 6, 2, dtype=torch.float64)
    ours = net(frames)
    assert net.last_path == "affine"
    model_params = [
        *_rnn_params(model.encoder),
        *_rnn_params(model.decoder),
        model.head.weight,
        model.head.bias,
    ]
    emb_params = [emb.net[0].weight, emb.net[0].bias, emb.net[2].weight, emb.net[2].bias]
    assert len(model_params) + len(emb_params) + 1 == len(list(net.parameters()))
    ref = seq2seq_affine_reference(
        cell,
        model_params[:4],
        model_params[4:8],
        model_params[8:],
        emb_params,
        net.log_inner_lr,
        frames,
        horizon=5,
        steps=steps,
    )
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)
    untailored = model(frames)
    assert float((ours - untailored).detach().abs().max()) > 1e-3  # the steps changed it
    target = torch.randn_like(ours)
    params = [*model_params, *emb_params, net.log_inner_lr]
    g_ours = torch.autograd.grad(((ours - target) ** 2).mean(), params)
    g_ref = torch.autograd.grad(((ref - target) ** 2).mean(), params)
    for p, a, b in zip(params, g_ours, g_ref):
        if p is not emb_params[-1]:  # g's output bias cancels in g(x0) - g(x_t)
            assert float(b.abs().max()) > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
