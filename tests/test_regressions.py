"""Regression tests for the defects a combination fuzz found, each from its reproducer."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap.embeddings import MLPEmbedding

PATHS = [("lowrank", True), ("vmap", True), ("auto", False)]  # (per_sample_path, per_sample)


class _Residual(nn.Module):
    """``x + f(x)`` with ``f``'s last layer zero-initialised: the identity at init."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
        nn.init.zeros_(self.f[2].weight)
        nn.init.zeros_(self.f[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.f(x)
        return out


def _all_grads_finite(net: nn.Module) -> bool:
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    return bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)


# 1. clipping a zero inner gradient --------------------------------------------------------


@pytest.mark.parametrize("path,per_sample", PATHS)
def test_clipping_a_zero_inner_gradient_gives_finite_outer_gradients(
    path: str, per_sample: bool
) -> None:
    torch.manual_seed(0)
    net = NoetherWrapper(
        Rollout(_Residual().double(), 5),
        MLPEmbedding(2).double(),
        inner_lr=0.1,
        max_inner_grad_norm=1.0,
        per_sample=per_sample,
        per_sample_path=path,
    )
    (net(torch.randn(4, 2, dtype=torch.float64)) - 1).pow(2).mean().backward()
    assert _all_grads_finite(net)
    assert net.model.step.f[2].weight.grad.abs().sum() > 0  # the outer gradient still flows


@pytest.mark.parametrize("path,per_sample", PATHS)
def test_one_all_zero_sequence_does_not_poison_the_batch(path: str, per_sample: bool) -> None:
    torch.manual_seed(0)
    step = nn.Sequential(nn.Linear(2, 8, bias=False), nn.Tanh(), nn.Linear(8, 2, bias=False))
    net = NoetherWrapper(
        Rollout(step.double(), 4),
        MLPEmbedding(2).double(),
        inner_lr=0.1,
        max_inner_grad_norm=0.5,
        per_sample=per_sample,
        per_sample_path=path,
    )
    x = torch.randn(3, 2, dtype=torch.float64)
    x[1] = 0.0  # a padded sequence: a bias-free model keeps it at 0, so its gradient is 0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    (net(x) - 1).pow(2).mean().backward()
    assert _all_grads_finite(net)
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in net.parameters())


@pytest.mark.parametrize("path,per_sample", PATHS)
def test_cosine_distance_with_a_scalar_embedding_and_clipping(path: str, per_sample: bool) -> None:
    torch.manual_seed(0)
    net = NoetherWrapper(
        Rollout(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double(), 4),
        MLPEmbedding(2, out_features=1).double(),
        distance="cosine",
        max_inner_grad_norm=1.0,
        per_sample=per_sample,
        per_sample_path=path,
    )
    net(torch.randn(3, 2, dtype=torch.float64)).pow(2).mean().backward()
    assert _all_grads_finite(net)


def test_clipping_below_the_threshold_is_the_identity_and_above_scales_to_it() -> None:
    from noether_wrap._inner import clip_scale

    sq = torch.tensor([0.0, 0.25, 1.0, 4.0, 100.0], dtype=torch.float64, requires_grad=True)
    scale = clip_scale(sq, 1.0)
    torch.testing.assert_close(scale.detach(), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.1]).double())
    (grad,) = torch.autograd.grad(scale.sum(), sq)
    assert torch.isfinite(grad).all() and grad[0] == 0


# 2. net(x) and return_info agree when the final loss overflows ------------------------------


@pytest.mark.parametrize("path,per_sample", PATHS)
def test_plain_call_and_return_info_agree_when_the_final_loss_overflows(
    path: str, per_sample: bool
) -> None:
    torch.manual_seed(0)
    net = NoetherWrapper(
        Rollout(nn.Linear(2, 2), 5),
        lambda s: s.pow(2).sum(-1),
        inner_steps=3,
        inner_lr=0.3,
        per_sample=per_sample,
        per_sample_path=path,
    )
    x = torch.randn(4, 2)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        plain = net(x)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        info = net(x, return_info=True)
    torch.testing.assert_close(plain, info.prediction, rtol=0, atol=0)
    # the blown-up sequences got exactly their untailored values
    blown = ~torch.isfinite(info.noether_losses).all(dim=1)
    assert bool(blown.any()), info.noether_losses
    untailored = net(x, inner_steps=0)
    assert torch.equal(info.initial_prediction, untailored)
    assert torch.equal(plain[blown], untailored[blown])
    assert torch.equal(info.prediction[blown], untailored[blown])
    if per_sample and not bool(blown.all()):  # the rest kept their own tailored predictions
        assert not torch.equal(plain[~blown], untailored[~blown])


def test_a_finite_blow_up_warns() -> None:
    torch.manual_seed(0)
    step = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    net = NoetherWrapper(Rollout(step, 5), lambda s: s.pow(2).sum(-1), inner_lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(torch.randn(4, 2, dtype=torch.float64))  # an ordinary call: no warning
    with pytest.warns(RuntimeWarning, match="diverged"):
        net(torch.full((2, 2), 1e30, dtype=torch.float64))


@pytest.mark.parametrize("per_sample", [True, False])
def test_a_finite_blow_up_warns_in_a_large_batch(per_sample: bool) -> None:
    """Plain calls compute the final loss on a sample of sequences only (nothing else reads
    it): a batch whose steps all blow up still warns, and return_info still gives every
    sequence's final loss."""
    torch.manual_seed(0)
    step = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    net = NoetherWrapper(
        Rollout(step, 5), lambda s: s.pow(2).sum(-1), inner_lr=1e-3, per_sample=per_sample
    )
    x = torch.full((32, 2), 1e30, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="diverged"):
        net(x)
    with pytest.warns(RuntimeWarning, match="diverged"):
        info = net(x, return_info=True)
    assert not bool(info.noether_losses.isnan().any())


# 3. and 4. the low-rank conv path: every padding, dilation and stride; bias alone ----------


def _conv_step(kind: type[nn.Module], mode: str, padding: int, dilation: int, stride: int):  # type: ignore[no-untyped-def]
    kernel = 1 if padding == 0 else 3
    conv = kind(2, 2, kernel, padding=padding, dilation=dilation, padding_mode=mode, stride=stride)
    with torch.no_grad():
        for p in conv.parameters():
            p.mul_(0.5)
    if stride == 1:
        return conv.double()
    return nn.Sequential(conv, nn.Upsample(scale_factor=stride)).double()


@pytest.mark.parametrize("kind,shape", [(nn.Conv1d, (3, 2, 6)), (nn.Conv2d, (3, 2, 6, 6))])
@pytest.mark.parametrize("mode", ["zeros", "circular", "reflect", "replicate"])
@pytest.mark.parametrize("padding,dilation,stride", [(0, 1, 1), (1, 1, 1), (2, 2, 1), (1, 1, 2)])
@pytest.mark.parametrize("adapt", [None, "*bias", "*weight"])
def test_lowrank_conv_matches_vmap(
    kind: type[nn.Module],
    shape: tuple[int, ...],
    mode: str,
    padding: int,
    dilation: int,
    stride: int,
    adapt: str | None,
) -> None:
    torch.manual_seed(0)
    step = _conv_step(kind, mode, padding, dilation, stride)
    x = torch.randn(*shape, dtype=torch.float64)
    outs = []
    warnings.simplefilter("error")  # a diverged step would hide a disagreement
    for path in ("lowrank", "vmap"):
        net = NoetherWrapper(
            Rollout(step, 3),
            lambda s: s.pow(2).flatten(1).mean(-1),
            inner_steps=2,
            inner_lr=1e-2,
            adapt=adapt,
            per_sample_path=path,
        )
        outs.append(net(x))
        assert net.last_path == path
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)


# 6. errors at inner_steps = 0 as at k >= 1 -------------------------------------------------


@pytest.mark.parametrize("steps", [0, 1])
@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.randn(3, 2, dtype=torch.float32), "`inputs` has dtype torch.float32"),
        (torch.randn(3, 5, dtype=torch.float64), "`inputs`"),
        (torch.randn(3, 0, dtype=torch.float64), "`inputs` has an empty axis"),
    ],
)
def test_bad_inputs_raise_the_same_named_error_for_every_k(
    steps: int, bad: torch.Tensor, match: str
) -> None:
    net = NoetherWrapper(
        Rollout(nn.Linear(2, 2).double(), 3), MLPEmbedding(2).double(), inner_steps=steps
    )
    net(torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        net(bad)


# 5. what a new user met: honest counts, layouts named, conflicts named, blow-ups warned ------


def test_the_divergence_warning_counts_only_the_sequences_it_checked() -> None:
    """A plain call checks a sample of 8 sequences; the warning says so instead of reading as
    a count over the batch, and return_info counts them all."""
    torch.manual_seed(0)
    step = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    net = NoetherWrapper(Rollout(step, 5), lambda s: s.pow(2).sum(-1), inner_lr=1e-3)
    x = torch.full((64, 2), 1e30, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"8 of the 8 sequence\(s\) checked \(a sample of the "
                      r"batch of 64"):  # fmt: skip
        net(x)
    with pytest.warns(RuntimeWarning, match=r"for 64 of 64 sequence\(s\)"):
        net(x, return_info=True)


class _TimeLast(nn.Module):
    """A model whose output has time last: ``(batch, state, T)``."""

    def __init__(self) -> None:
        super().__init__()
        self.step = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.step(x)] * 6, dim=2)


def test_an_output_with_time_elsewhere_names_time_dim() -> None:
    x = torch.randn(2, 3)
    NoetherWrapper(_TimeLast(), MLPEmbedding(3), time_dim=2)(x)  # the fix works
    with pytest.raises(ValueError, match="pass time_dim=2"):
        NoetherWrapper(_TimeLast(), MLPEmbedding(3))(x)


def test_frames_read_as_one_state_name_the_models_input() -> None:
    net = NoetherWrapper(Rollout(nn.Linear(4, 4), 5), MLPEmbedding(4))
    net(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"`inputs` holds 3 frames of a 4-dim state"):
        net(torch.randn(2, 3, 4))


def test_affine_and_a_weight_path_conflict_is_named() -> None:
    from noether_wrap import Affine

    step = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    NoetherWrapper(Rollout(step, 3), MLPEmbedding(2), adapt=Affine("step.0"))
    with pytest.raises(ValueError, match="`per_sample_path`.*Affine"):
        NoetherWrapper(Rollout(step, 3), MLPEmbedding(2), adapt=Affine("step.0"),
                       per_sample_path="lowrank")  # fmt: skip
    net = NoetherWrapper(Rollout(step, 3), MLPEmbedding(2), adapt=Affine("step.0"))
    with pytest.raises(ValueError, match="`per_sample_path`"):
        net.per_sample_path = "vmap"
    assert net.per_sample_path == "auto"


@pytest.mark.parametrize("per_sample", [True, False])
def test_a_finite_blow_up_on_the_affine_path_warns(per_sample: bool) -> None:
    """Fixed steps on affines returned finite predictions near 1e33 without a word."""
    from noether_wrap import Affine

    torch.manual_seed(0)
    step = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    net = NoetherWrapper(Rollout(step, 8), lambda s: s.pow(2).sum(-1), adapt=Affine("step.2"),
                         inner_lr=1e3, inner_steps=3, per_sample=per_sample)  # fmt: skip
    x = torch.randn(6, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="outside the untailored prediction's range"):
        out = net(x)
    assert float(out.abs().max()) > 10 * float(net.model(x).abs().max())
    net.guard = 1.0  # the guard's answer: the plain prediction where tailoring went far
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(net(x), net.model(x))


class _GRUDecoder(nn.Module):
    """A GRUCell decoder: vmap has no batching rule for ``gru_cell``."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.out = nn.GRUCell(2, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, outs = x.new_zeros(x.shape[0], 8), []
        for _ in range(4):
            h = self.cell(x, h)
            x = self.out(h)
            outs.append(x)
        return torch.stack(outs, 1)


def test_vmaps_slow_fallback_is_named_once_with_the_fast_ways() -> None:
    net = NoetherWrapper(_GRUDecoder(), lambda s: s.pow(2).sum(-1), inner_lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(torch.randn(3, 2))
        net(torch.randn(3, 2))
    messages = [str(w.message) for w in caught]
    assert net.last_path == "vmap"
    ours = [m for m in messages if "one sequence at a time" in m]
    assert len(ours) == 1 and "gru_cell" in ours[0] and "Affine" in ours[0]
    assert "per_sample=False" in ours[0]
    assert not any("performance drop" in m for m in messages)
