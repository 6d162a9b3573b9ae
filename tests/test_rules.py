"""The rules the wrapper keeps (docs/index.md), one test (or a small group) each."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap.embeddings import MLPEmbedding

from conftest import make_net, make_step, tensor_state
from reference import tailor_reference


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return tensor_state(module)


# Rule 1 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_sample", [True, False])
def test_rule1_zero_steps_is_exactly_the_model(per_sample: bool) -> None:
    net = make_net(inner_steps=0, per_sample=per_sample)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(net(x), net.model(x))
    info = net(x, return_info=True)
    assert torch.equal(info.prediction, net.model(x))
    assert info.noether_losses.shape == (5, 1)


# Rule 2 ---------------------------------------------------------------------------------------


class _BNStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.bn(self.lin(x))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("per_sample", [True, False])
def test_rule2_forward_never_changes_model_state(train: bool, per_sample: bool) -> None:
    """Parameters never change; buffers only as one unwrapped call in the same mode would change
    them (below), so in eval mode, and with BatchNorm in eval mode, nothing changes at all."""
    model = Rollout(_BNStep(), horizon=3)
    net = NoetherWrapper(model, MLPEmbedding(3), inner_steps=2, inner_lr=0.5, per_sample=per_sample)
    net.train(train)
    model.step.bn.eval()  # running statistics: see the next test
    x = torch.randn(6, 3)
    before = _snapshot(net)
    out = net(x)
    out.pow(2).sum().backward()  # backward must not write state either
    after = _snapshot(net)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    with torch.no_grad():
        untailored = model(x)  # the same input: tailoring did change the prediction
    assert not torch.allclose(out.detach(), untailored)


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_rule2_batch_norm_statistics_update_as_one_unwrapped_call(steps: int) -> None:
    """BatchNorm in training mode (shared step): the running statistics move exactly as one call
    of the model with the tailored weights would move them, for every k (k = 0 included)."""
    torch.manual_seed(0)
    model = Rollout(_BNStep(), horizon=3)
    net = NoetherWrapper(model, MLPEmbedding(3), inner_steps=steps, inner_lr=0.5, per_sample=False)
    x = torch.randn(6, 3)
    twin = net.tailored_model(x)  # a copy with the tailored weights and the buffers as they are
    params_before = {n: p.detach().clone() for n, p in net.named_parameters()}
    out = net(x)
    torch.testing.assert_close(out, twin(x))  # the twin's call updates its own statistics once
    for name, value in twin.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), value, rtol=0, atol=0)
    assert int(model.step.bn.num_batches_tracked) == 3  # once per rollout step, as unwrapped
    for name, p in net.named_parameters():
        assert torch.equal(p, params_before[name]), name
    info = net(x, return_info=True)  # return_info adds no second update
    assert int(model.step.bn.num_batches_tracked) == 6
    assert info.noether_losses.shape == (6, steps + 1)


# Rule 3 ---------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    batch=st.integers(min_value=1, max_value=7),
    seed=st.integers(min_value=0, max_value=2**16),
    path=st.sampled_from(["lowrank", "vmap"]),
    data=st.data(),
)
def test_rule3_per_sample_is_batch_invariant(
    batch: int, seed: int, path: str, data: st.DataObject
) -> None:
    torch.manual_seed(seed)
    net = make_net(inner_steps=2, per_sample=True, loss_form="chain", per_sample_path=path)
    x = torch.randn(batch, 2, dtype=torch.float64)
    full = net(x)
    perm = torch.tensor(data.draw(st.permutations(list(range(batch)))))
    torch.testing.assert_close(net(x[perm]), full[perm], rtol=1e-10, atol=1e-12)
    split = data.draw(st.integers(min_value=0, max_value=batch))
    parts = [net(part) for part in (x[:split], x[split:]) if part.shape[0] > 0]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-10, atol=1e-12)


def test_rule3_shared_step_does_depend_on_the_batch() -> None:
    net = make_net(inner_steps=1, per_sample=False, inner_lr=0.5)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert not torch.allclose(net(x)[:2], net(x[:2]))


# Rule 4 ---------------------------------------------------------------------------------------


def _functional(net: NoetherWrapper, names: list[str]):  # type: ignore[no-untyped-def]
    def f(x: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(net, dict(zip(names, values)), (x,))
        return out

    return f


PATHS = [(True, "lowrank"), (True, "vmap"), (False, "auto")]


@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize(("per_sample", "path"), PATHS)
def test_rule4_gradcheck(steps: int, per_sample: bool, path: str) -> None:
    net = make_net(
        hidden=3,
        emb_hidden=3,
        horizon=3,
        inner_steps=steps,
        per_sample=per_sample,
        inner_lr=0.3,
        per_sample_path=path,
    )
    names = [n for n, _ in net.named_parameters()]
    values = [p.detach().clone().requires_grad_() for _, p in net.named_parameters()]
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_functional(net, names), (x, *values))


@pytest.mark.parametrize("form", ["anchor", "chain"])
@pytest.mark.parametrize(("per_sample", "path"), PATHS)
def test_rule4_matches_plain_loop_reference(form: str, per_sample: bool, path: str) -> None:
    horizon, steps = 4, 3
    net = make_net(
        horizon=horizon,
        inner_steps=steps,
        per_sample=per_sample,
        loss_form=form,
        inner_lr=0.2,
        per_sample_path=path,
    )
    x = torch.randn(5, 2, dtype=torch.float64)
    step, emb = net.model.step, net.embedding.net
    model_params = [step[0].weight, step[0].bias, step[2].weight, step[2].bias]
    emb_params = [emb[0].weight, emb[0].bias, emb[2].weight, emb[2].bias]
    target = torch.randn(5, horizon, 2, dtype=torch.float64)

    ours = net(x)
    assert net.last_path == (path if per_sample else "shared")
    ref = tailor_reference(
        model_params,
        emb_params,
        net.log_inner_lr,
        x,
        horizon=horizon,
        steps=steps,
        form=form,
        per_sample=per_sample,
    )
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)

    params = [*model_params, *emb_params, net.log_inner_lr]
    g_ours = torch.autograd.grad(((ours - target) ** 2).mean(), params)
    g_ref = torch.autograd.grad(((ref - target) ** 2).mean(), params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert max(float((a - b).abs().max()) for a, b in zip(g_ours, g_ref)) < 1e-12


# Rule 5 ---------------------------------------------------------------------------------------


def test_rule5_parameters_hold_model_embedding_and_step_size() -> None:
    net = make_net()
    ids = {id(p) for p in net.parameters()}
    assert {id(p) for p in net.model.parameters()} <= ids
    assert {id(p) for p in net.embedding.parameters()} <= ids
    assert id(net.log_inner_lr) in ids
    assert len(ids) == len(list(net.model.parameters())) + len(list(net.embedding.parameters())) + 1
    frozen = make_net(learn_inner_lr=False)
    assert "log_inner_lr" in dict(frozen.named_buffers())
    assert "log_inner_lr" not in dict(frozen.named_parameters())


def test_rule5_an_optimizer_trains_all_three() -> None:
    net = make_net(inner_steps=1)
    before = _snapshot(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 2, dtype=torch.float64)
    ((net(x) - 1.0) ** 2).mean().backward()
    opt.step()
    after = _snapshot(net)
    for key in ("model.step.0.weight", "embedding.net.0.weight", "log_inner_lr"):
        assert not torch.equal(before[key], after[key]), key


# Rule 6 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("per_sample", "path"), PATHS)
@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode"])
def test_rule6_tailoring_in_eval_no_grad_inference(per_sample: bool, path: str, mode: str) -> None:
    net = make_net(inner_steps=2, per_sample=per_sample, inner_lr=0.3, per_sample_path=path)
    x = torch.randn(3, 2, dtype=torch.float64)
    expected = net(x).detach()
    untailored = net.model(x).detach()
    assert not torch.allclose(expected, untailored)
    if mode == "eval":
        net.eval()
        out = net(x)
        assert out.requires_grad  # eval() alone keeps autograd, as everywhere in PyTorch
    else:
        context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with context:
            out = net(x)
        assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out.detach(), expected)


def test_rule6_no_grad_builds_no_second_order_graph() -> None:
    net = make_net(inner_steps=2)
    x = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        info = net(x, return_info=True)
    for t in info:
        assert t is None or t.grad_fn is None


# Rule 7 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn", [True, False])
def test_rule7_state_dict_round_trips(learn: bool) -> None:
    net = make_net(inner_steps=2, learn_inner_lr=learn, inner_lr=0.05)
    with torch.no_grad():
        net.log_inner_lr.add_(0.3)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)
    fresh = make_net(inner_steps=2, learn_inner_lr=learn, inner_lr=0.9)
    x = torch.randn(4, 2, dtype=torch.float64)
    assert not torch.allclose(fresh(x), net(x))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


# Rule 9 ---------------------------------------------------------------------------------------


def _model() -> Rollout:
    return Rollout(make_step(), horizon=3)


def test_rule9_constructor_errors_name_the_argument() -> None:
    emb = MLPEmbedding(2).double()
    NoetherWrapper(_model(), emb, inner_steps=0, inner_lr=1e-3)  # valid edge values
    cases = [
        ({"inner_steps": -1}, ValueError, "inner_steps"),
        ({"inner_steps": 1.5}, ValueError, "inner_steps"),
        ({"inner_lr": 0.0}, ValueError, "inner_lr"),
        ({"inner_lr": -1e-3}, ValueError, "inner_lr"),
        ({"inner_lr": float("nan")}, ValueError, "inner_lr"),
        ({"loss_form": "sideways"}, ValueError, "loss_form"),
        ({"distance": "l1"}, ValueError, "distance"),
        ({"window": 0}, ValueError, "window"),
        ({"adapt": "nothing.*"}, ValueError, "adapt"),
        ({"adapt": lambda n, p: False}, ValueError, "adapt"),
        ({"adapt": 3}, TypeError, "adapt"),
        ({"max_inner_grad_norm": 0.0}, ValueError, "max_inner_grad_norm"),
        ({"inner_horizon": 0}, ValueError, "inner_horizon"),
        ({"reference": "x"}, TypeError, "reference"),
    ]
    for kwargs, error, name in cases:
        with pytest.raises(error, match=f"`{name}`"):
            NoetherWrapper(_model(), emb, **kwargs)
    with pytest.raises(TypeError, match="`model`"):
        NoetherWrapper(lambda x: x, emb)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`embedding`"):
        NoetherWrapper(_model(), 3)  # type: ignore[arg-type]


def test_rule9_model_output_without_time_axis() -> None:
    x = torch.randn(4, 2, dtype=torch.float64)
    NoetherWrapper(_model(), MLPEmbedding(2).double())(x)
    net = NoetherWrapper(make_step(), MLPEmbedding(2).double())
    with pytest.raises(ValueError, match="`model` output must have a time axis"):
        net(x)


def test_rule9_embedding_output_of_the_wrong_shape() -> None:
    x = torch.randn(4, 2, dtype=torch.float64)
    NoetherWrapper(_model(), lambda s: s.sum(-1))(x)
    net = NoetherWrapper(_model(), lambda s: s.unsqueeze(-1).repeat(1, 1, 2))
    with pytest.raises(ValueError, match="`embedding` must map"):
        net(x)


@pytest.mark.parametrize("per_sample", [True, False])
def test_rule9_batch_norm_in_training_mode(per_sample: bool) -> None:
    net = NoetherWrapper(Rollout(_BNStep(), horizon=2), MLPEmbedding(3), per_sample=per_sample)
    x = torch.randn(4, 3)
    if not per_sample:
        net(x)  # the shared step is fine with batch statistics
        return
    with pytest.raises(ValueError, match="`per_sample=True`.*BatchNorm.*eval"):
        net(x)
    net.model.step.bn.eval()
    net(x)


@pytest.mark.parametrize("path", ["lowrank", "vmap"])
def test_rule9_non_finite_inner_step_keeps_untailored_prediction(path: str) -> None:
    torch.manual_seed(1)
    model = Rollout(nn.Linear(2, 2), horizon=3)
    with torch.no_grad():
        model.step.weight.copy_(torch.eye(2) * 0.9)

    def explosive(s: torch.Tensor) -> torch.Tensor:
        return torch.exp(s.sum(-1))  # overflows float32 for large states only

    net = NoetherWrapper(model, explosive, inner_steps=2, inner_lr=1e-3, per_sample_path=path)
    x = torch.tensor([[0.1, 0.2], [60.0, 60.0], [-0.3, 0.1]])
    before = _snapshot(net)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out = net(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], model(x[1:2])[0])
    good = torch.tensor([0, 2])
    torch.testing.assert_close(out[good], net(x[good]))
    assert not torch.allclose(out[good], model(x[good]))
    out.pow(2).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    opt.step()
    for key, value in _snapshot(net).items():
        assert torch.isfinite(value).all(), key
    assert not torch.equal(before["model.step.weight"], net.model.step.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x[good])  # no warning when nothing goes wrong


def test_rule9_non_finite_shared_step_keeps_whole_batch_untailored() -> None:
    model = Rollout(nn.Linear(2, 2), horizon=3)
    net = NoetherWrapper(model, lambda s: torch.exp(s.sum(-1)), per_sample=False, inner_lr=1e-3)
    x = torch.tensor([[0.1, 0.2], [60.0, 60.0]])
    with pytest.warns(RuntimeWarning, match="2 of 2"):
        out = net(x)
    torch.testing.assert_close(out, model(x))
