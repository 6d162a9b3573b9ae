"""Every argument of NoetherWrapper beyond the rules: what it changes, checked against a
direct computation."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from noether_wrap import NoetherWrapper, Rollout, noether_loss
from noether_wrap.embeddings import MLPEmbedding

from conftest import copy_weights, make_net, make_step


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 2, dtype=torch.float64)


@pytest.mark.parametrize("per_sample", [True, False])
def test_return_info_losses_match_noether_loss(per_sample: bool) -> None:
    net = make_net(inner_steps=3, inner_lr=0.05, per_sample=per_sample)
    x = _x()
    info = net(x, return_info=True)
    assert info.noether_losses.shape == (4, 4)
    first = noether_loss(x, net.model(x), net.embedding, reduction="none")
    last = noether_loss(x, info.prediction, net.embedding, reduction="none")
    torch.testing.assert_close(info.noether_losses[:, 0], first)
    torch.testing.assert_close(info.noether_losses[:, -1], last)
    torch.testing.assert_close(info.initial_prediction, net.model(x))
    if per_sample:  # small steps lower every sequence's own loss
        assert bool((info.noether_losses[:, -1] < info.noether_losses[:, 0]).all())


def test_adapt_glob_and_predicate_equal_freezing_the_rest() -> None:
    x = _x()
    torch.manual_seed(3)
    glob = make_net(inner_steps=2, inner_lr=0.2, adapt="step.2.*")
    pred = make_net(inner_steps=2, inner_lr=0.2, adapt=lambda n, p: n.startswith("step.2"))
    copy_weights(pred, glob)
    frozen = make_net(inner_steps=2, inner_lr=0.2)
    copy_weights(frozen, glob)
    for p in frozen.model.step[0].parameters():
        p.requires_grad_(False)
    assert glob.adapted_names() == ["step.2.weight", "step.2.bias"]
    torch.testing.assert_close(glob(x), frozen(x))
    torch.testing.assert_close(pred(x), frozen(x))
    untailored = make_net(inner_steps=0)  # the same weights, no inner step
    copy_weights(untailored, glob)
    assert torch.equal(untailored(x), glob.model(x))
    assert not torch.allclose(glob(x), untailored(x))


def test_first_order_warns_and_embedding_gets_no_gradient() -> None:
    with pytest.warns(UserWarning, match="no outer gradient"):
        net = make_net(inner_steps=2, first_order=True)
    x = _x()
    net(x).pow(2).mean().backward()
    for p in net.embedding.parameters():
        assert p.grad is None or float(p.grad.abs().max()) == 0.0
    assert net.log_inner_lr.grad is not None and float(net.log_inner_lr.grad.abs()) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NoetherWrapper(Rollout(make_step(), 2), lambda s: s.sum(-1), first_order=True)


def test_first_order_equals_second_order_forward() -> None:
    torch.manual_seed(5)
    second = make_net(inner_steps=2)
    with pytest.warns(UserWarning):
        first = make_net(inner_steps=2, first_order=True)
    copy_weights(first, second)
    x = _x()
    torch.testing.assert_close(first(x), second(x))


def test_keep_if_better_returns_untailored_where_loss_rose() -> None:
    net = make_net(inner_steps=1, inner_lr=50.0, keep_if_better=True)
    x = _x(6)
    info = net(x, return_info=True)
    worse = info.noether_losses[:, -1] >= info.noether_losses[:, 0]
    assert bool(worse.any())
    torch.testing.assert_close(info.prediction[worse], net.model(x)[worse])
    plain = make_net(inner_steps=1, inner_lr=50.0)
    copy_weights(plain, net)
    better = ~worse
    torch.testing.assert_close(info.prediction[better], plain(x)[better])


def test_max_inner_grad_norm_bounds_the_step() -> None:
    x = _x()
    net = make_net(inner_steps=1, inner_lr=1.0, max_inner_grad_norm=1e-3)

    def moved(p: dict[str, torch.Tensor]) -> float:
        own = dict(net.model.named_parameters())
        return float(torch.sqrt(sum(((v - own[k]) ** 2).sum() for k, v in p.items())).detach())

    step_sizes = []
    for b in range(x.shape[0]):
        grads = torch.autograd.grad(
            noether_loss(x[b : b + 1], net.model(x[b : b + 1]), net.embedding, reduction="sum"),
            list(net.model.parameters()),
        )
        params = {
            n: p - 1.0 * g * min(1.0, 1e-3 / float(torch.sqrt(sum((h**2).sum() for h in grads))))
            for (n, p), g in zip(net.model.named_parameters(), grads)
        }
        step_sizes.append(moved(params))
        expected = torch.func.functional_call(net.model, params, (x[b : b + 1],))
        torch.testing.assert_close(net(x[b : b + 1]), expected)
    assert max(step_sizes) == pytest.approx(1e-3, rel=1e-6)


def test_inner_horizon_uses_first_steps_only() -> None:
    net = make_net(horizon=6, inner_steps=1, inner_horizon=2)
    x = _x()
    info = net(x, return_info=True)
    expected = noether_loss(x, net.model(x), net.embedding, horizon=2, reduction="none")
    torch.testing.assert_close(info.noether_losses[:, 0], expected)
    assert info.prediction.shape == (4, 6, 2)


def test_predict_tailors_on_rollout_but_returns_another_function() -> None:
    field = make_step()
    model = Rollout(field, horizon=1, dt=0.1, method="euler")
    emb = MLPEmbedding(2).double()
    net = NoetherWrapper(model, emb, inner_lr=0.3, predict=lambda m, x: m.step(x))
    full = NoetherWrapper(model, emb, inner_lr=0.3)
    x = _x()
    out = net(x)
    assert out.shape == (4, 2)
    assert not torch.allclose(out, field(x))
    # one Euler step of the adapted field is what the un-redirected wrapper predicts
    torch.testing.assert_close(x + 0.1 * out, full(x)[:, 0])
    info = net(x, return_info=True)
    torch.testing.assert_close(info.initial_prediction, field(x))
    torch.testing.assert_close(info.noether_losses, full(x, return_info=True).noether_losses)


class _Scaled(nn.Module):
    """A model with an extra tensor argument and a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.rollout = Rollout(make_step(), horizon=3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, *, shift: float = 0.0) -> torch.Tensor:
        return self.rollout(x) * scale.view(-1, 1, 1) + shift


def test_extra_args_and_kwargs_pass_through_per_sample() -> None:
    net = NoetherWrapper(
        _Scaled(), MLPEmbedding(2).double(), inner_lr=0.2, reference=lambda inputs: inputs
    )
    x = _x(3)
    scale = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    full = net(x, scale, shift=0.1)
    for b in range(3):
        one = net(x[b : b + 1], scale[b : b + 1], shift=0.1)
        torch.testing.assert_close(full[b : b + 1], one)
    assert not torch.allclose(full, net(x, scale, shift=0.0))


def test_time_dim_other_than_one() -> None:
    class TimeLast(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).transpose(1, 2)  # (batch, state, T)

    base = make_net(inner_steps=2)
    net = NoetherWrapper(
        TimeLast(base.model), base.embedding, inner_steps=2, inner_lr=0.1, time_dim=2
    )
    x = _x()
    torch.testing.assert_close(net(x), base(x).transpose(1, 2))


def test_window_two_with_time_axis_inputs() -> None:
    class TwoFrame(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 2).double()

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            return self.lin(frames.flatten(1))

    model = Rollout(TwoFrame(), horizon=4, context=2)
    net = NoetherWrapper(model, MLPEmbedding(4).double(), window=2, inner_lr=0.1)
    frames = torch.randn(3, 5, 2, dtype=torch.float64)
    info = net(frames, return_info=True)
    assert info.prediction.shape == (3, 4, 2)
    expected = noether_loss(frames, model(frames), net.embedding, window=2, reduction="none")
    torch.testing.assert_close(info.noether_losses[:, 0], expected)
    with pytest.raises(ValueError, match="`window`"):
        NoetherWrapper(Rollout(make_step(), 2), MLPEmbedding(4).double(), window=2)(_x())


@pytest.mark.parametrize("form", ["anchor", "chain"])
@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_forms_and_distances_lower_the_loss(form: str, distance: str) -> None:
    net = make_net(inner_steps=2, inner_lr=0.02, loss_form=form, distance=distance)
    info = net(_x(), return_info=True)
    losses = info.noether_losses.detach()
    assert float(losses[:, -1].sum()) < float(losses[:, 0].sum())


def test_float32_models_work() -> None:
    net = make_net(inner_steps=1, dtype=torch.float32)
    assert net.log_inner_lr.dtype == torch.float32
    assert net(torch.randn(4, 2)).dtype == torch.float32


def test_forward_input_errors() -> None:
    net = make_net()
    net(_x(1))
    with pytest.raises(TypeError, match="`inputs`"):
        net([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`inputs`"):
        net(torch.zeros(0, 2, dtype=torch.float64))
    from_params = nn.Sequential(nn.Linear(3, 2), nn.Unflatten(1, (1, 2))).double()
    lifted = NoetherWrapper(from_params, MLPEmbedding(2).double())
    with pytest.raises(ValueError, match="`reference`"):
        lifted(torch.randn(4, 3, dtype=torch.float64))
    lifted.reference = lambda inputs: inputs[:, :2]
    lifted(torch.randn(4, 3, dtype=torch.float64))


def test_failures_deep_in_torch_get_context() -> None:
    calls = []

    def flaky(states: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return states.sum(-1)

    net = NoetherWrapper(Rollout(nn.Linear(2, 2), 3), flaky, inner_steps=3, per_sample=False)
    with pytest.raises(RuntimeError, match=r"inner step 1 of inner_steps=3.*\(4, 2\): boom"):
        net(torch.randn(4, 2))


def test_inner_lr_property_and_repr() -> None:
    net = make_net(inner_lr=0.25)
    assert net.inner_lr == pytest.approx(0.25)
    assert "inner_steps=1" in repr(net)


@pytest.mark.parametrize("per_sample", [True, False])
def test_tailor_returns_the_adapted_weights(per_sample: bool) -> None:
    net = make_net(inner_steps=2, inner_lr=0.2, per_sample=per_sample)
    x = _x(3)
    params = net.tailor(x)
    assert set(params) == set(net.adapted_names())
    for name, p in net.model.named_parameters():
        expected = (3, *p.shape) if per_sample else tuple(p.shape)
        assert params[name].shape == expected
    if per_sample:
        for b in range(3):
            own = {n: v[b] for n, v in params.items()}
            out = torch.func.functional_call(net.model, own, (x[b : b + 1],))
            torch.testing.assert_close(out, net(x)[b : b + 1])
    else:
        torch.testing.assert_close(torch.func.functional_call(net.model, params, (x,)), net(x))


def test_tailored_model_is_a_plain_copy_with_adapted_weights() -> None:
    net = make_net(inner_steps=2, inner_lr=0.2)
    x = _x(3)
    plain = net.tailored_model(x, index=1)
    torch.testing.assert_close(plain(x[1:2]), net(x[1:2]))
    assert plain is not net.model and not torch.equal(
        plain.step[0].weight, net.model.step[0].weight
    )
    one = net.tailored_model(x[:1])
    torch.testing.assert_close(one(x[:1]), net(x[:1]))
    with pytest.raises(ValueError, match="`index`"):
        net.tailored_model(x)
    with pytest.raises(ValueError, match="`index`"):
        net.tailored_model(x, index=3)
    zero = make_net(inner_steps=0)
    assert zero.tailor(x)["step.0.weight"].shape == (3, 8, 2)


def test_inputs_of_the_wrong_dtype_device_or_shape() -> None:
    net = make_net()
    net(_x(2))
    with pytest.raises(TypeError, match="`inputs`.*floating-point"):
        net(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="`inputs` is on meta"):
        net(torch.empty(2, 2, device="meta", dtype=torch.float64))
    with pytest.raises(ValueError, match="`model` or `embedding` failed on `inputs`"):
        net(torch.randn(2, 3, dtype=torch.float64))
