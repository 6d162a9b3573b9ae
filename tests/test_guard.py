"""The prediction guard and the Polyak cap: the step transforms that bound what tailoring does."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from noether_wrap import Affine, NoetherWrapper, Rollout, tune

from conftest import gradcheck_weight_and_step, make_net

# (per_sample, per_sample_path, adapt): every path
PATHS: list[tuple[bool, str, Any]] = [
    (True, "lowrank", None),
    (True, "vmap", None),
    (False, "auto", None),
    (True, "auto", Affine("step.0")),
    (False, "auto", Affine("step.0")),
]
COMBOS: list[dict[str, Any]] = [
    {},
    {"step_rule": "polyak", "inner_lr": 1.0},
    {"step_control": "backtrack", "inner_lr": 2.0},
    {"max_inner_grad_norm": 0.05, "inner_lr": 2.0},
    {"keep_if_better": True, "inner_lr": 2.0},
]


def _moves(x: torch.Tensor, plain: torch.Tensor, tailored: torch.Tensor) -> torch.Tensor:
    """The guard's measure, written plainly: ``‖tailored − plain‖ / ‖plain − x0‖`` per sequence."""
    moved = (tailored - plain).flatten(1).norm(dim=1)
    own = (plain - x.unsqueeze(1)).flatten(1).norm(dim=1)
    return moved / own


@pytest.mark.parametrize(("per_sample", "path", "adapt"), PATHS)
@pytest.mark.parametrize("extra", COMBOS)
def test_guard_keeps_the_plain_prediction_where_tailoring_moved_it_too_far(
    per_sample: bool, path: str, adapt: Any, extra: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    kwargs = {"inner_lr": 0.5, **extra}
    free = make_net(per_sample=per_sample, per_sample_path=path, adapt=adapt, **kwargs)
    x = torch.randn(8, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        unguarded = free(x).detach()
        plain = free.model(x).detach()
        moves = _moves(x, plain, unguarded)  # 0 where keep_if_better kept the plain prediction
        ordered = moves[moves > 0].sort().values  # tailored sequences on each side
        tau = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
        guarded = make_net(per_sample=per_sample, per_sample_path=path, adapt=adapt, **kwargs)
        guarded.load_state_dict(free.state_dict())
        guarded.guard = tau
        info = guarded(x, return_info=True)
    far = moves > tau
    assert 0 < int(far.sum()) < x.shape[0]
    expected = torch.where(far.view(-1, 1, 1), plain, unguarded)
    torch.testing.assert_close(info.prediction, expected, rtol=1e-9, atol=1e-11)
    assert info.moves is not None and info.guarded is not None
    moved = moves > 0  # where keep_if_better kept nothing back, the move is the wrapper's
    torch.testing.assert_close(info.moves[moved], moves[moved], rtol=1e-8, atol=1e-12)
    assert torch.equal(info.guarded[moved], far[moved])
    losses = info.noether_losses  # of what is returned: a guarded sequence's last equals its first
    assert torch.equal(losses[far, -1], losses[far, 0])


def test_guard_is_a_constant_in_the_backward() -> None:
    net = make_net(inner_steps=2, inner_lr=0.5, guard=1e9)
    x = torch.randn(6, 2, dtype=torch.float64)
    moves = net(x, return_info=True).moves
    assert moves is not None
    ordered = moves.sort().values  # halfway between two moves: no decision at its threshold
    net.guard = float(ordered[2] + ordered[3]) / 2
    info = net(x, return_info=True)
    assert info.guarded is not None and 0 < int(info.guarded.sum()) < 6  # both kinds in the batch
    assert gradcheck_weight_and_step(net, x)


@pytest.mark.parametrize(("per_sample", "path", "adapt"), PATHS[:3])
def test_guard_reaches_tailored_model(per_sample: bool, path: str, adapt: Any) -> None:
    net = make_net(per_sample=per_sample, per_sample_path=path, adapt=adapt, inner_lr=0.5)
    x = torch.randn(6, 2, dtype=torch.float64)
    net.guard = 0.05
    out = net(x, return_info=True)
    assert out.guarded is not None and bool(out.guarded.any())
    for i in range(x.shape[0]):
        copy = net.tailored_model(x, index=i)
        torch.testing.assert_close(copy(x[i : i + 1]), out.prediction[i : i + 1].detach())


def test_guard_keeps_a_sequence_independent_of_its_batch() -> None:
    net = make_net(inner_lr=0.5, guard=0.05)
    x = torch.randn(8, 2, dtype=torch.float64)
    whole = net(x)
    parts = torch.cat([net(x[:3]), net(x[3:])])
    torch.testing.assert_close(whole, parts, rtol=1e-10, atol=1e-12)


def test_guard_rejects_bad_values() -> None:
    make_net(guard=0.3)
    for bad in (0.0, -1.0, float("inf"), "0.3"):
        with pytest.raises(ValueError, match="`guard`"):
            make_net(guard=bad)


def test_tune_scores_every_guard_exactly_with_one_run() -> None:
    """The default forward scores all guards from one run; a custom forward runs each guard:
    both must give the same per-configuration losses."""
    torch.manual_seed(1)
    x = torch.randn(12, 2, dtype=torch.float64)
    target = make_net().model(x).detach() + 0.05 * torch.randn(12, 4, 2, dtype=torch.float64)
    nets = [make_net(inner_lr=0.3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    grids = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for net, forward in zip(nets, (None, lambda n, v: n(v))):
            grids[forward is None] = tune(
                net, x, target, candidates=[0.1, 1.0], guards=(None, 0.05, 0.3), forward=forward
            ).losses
    assert len(grids[True]) == 6 and grids[True].keys() == grids[False].keys()
    for config, value in grids[True].items():
        assert value == pytest.approx(grids[False][config], rel=1e-10), config


# --- the Polyak cap ----------------------------------------------------------------------------


def _probe_model() -> Rollout:
    torch.manual_seed(1)
    return Rollout(nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double(), 10)


def _scalar_g(s: torch.Tensor) -> torch.Tensor:
    return s[..., 0] + 0.5 * s[..., 1]


@pytest.mark.parametrize("per_sample", [False, True])
def test_polyak_with_cosine_distance_and_a_scalar_g_stays_near_the_plain_prediction(
    per_sample: bool,
) -> None:
    """A scalar g's cosine is ±1: the loss is flat but not zero, its gradient only rounding.
    Uncapped, the shared step sent the output to ~1e15 (the issue's case)."""
    x = torch.randn(6, 2, dtype=torch.float64).requires_grad_()
    kwargs: dict[str, Any] = {"step_rule": "polyak", "inner_lr": 0.3, "distance": "cosine"}
    net = NoetherWrapper(_probe_model(), _scalar_g, per_sample=per_sample, **kwargs)
    out = net(x)
    plain = net.model(x).detach()
    assert torch.isfinite(out).all()
    assert float((out - plain).abs().max()) <= 3 * float(plain.abs().max())
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) < 1e3
    if not per_sample:  # the uncapped step is what the cap bounds
        uncapped = NoetherWrapper(_probe_model(), _scalar_g, per_sample=False, polyak_cap=None,
                                  **kwargs)  # fmt: skip
        assert float(uncapped(x).abs().max()) > 1e6


@pytest.mark.parametrize(("per_sample", "path", "adapt"), PATHS)
def test_polyak_step_moves_the_parameters_by_at_most_the_cap(
    per_sample: bool, path: str, adapt: Any
) -> None:
    """A saturated g (tanh(50 x)) has a vanishing gradient where the loss is not zero: the step
    is bounded by the cap, and the prediction stays within the plain one's scale."""
    torch.manual_seed(2)
    model = _probe_model()

    def saturated(s: torch.Tensor) -> torch.Tensor:
        return torch.tanh(50 * s).sum(-1, keepdim=True)

    x = 2 * torch.randn(8, 2, dtype=torch.float64)
    net = NoetherWrapper(model, saturated, step_rule="polyak", inner_lr=1.0, per_sample=per_sample,
                         per_sample_path=path, adapt=adapt, polyak_cap=0.1)  # fmt: skip
    out = net(x)
    plain = model(x).detach()
    assert torch.isfinite(out).all()
    assert float(out.abs().max()) < 10 * float(plain.abs().max())
    if adapt is None:
        params = net.tailor(x)
        own = dict(model.named_parameters())
        norm = torch.sqrt(sum(own[n].detach().pow(2).sum() for n in params))
        for i in range(x.shape[0] if per_sample else 1):
            move = torch.sqrt(
                sum(
                    (p[i] - own[n]).pow(2).sum() if per_sample else (p - own[n]).pow(2).sum()
                    for n, p in params.items()
                )
            )
            assert float(move) <= 0.1 * float(norm) * (1 + 1e-9)


def test_polyak_zero_gradient_with_a_positive_loss_takes_no_step() -> None:
    """A piecewise-constant g: the loss is positive, its gradient exactly zero."""
    model = _probe_model()

    def steps(s: torch.Tensor) -> torch.Tensor:
        return torch.floor(4 * s).sum(-1, keepdim=True) + 0 * s.sum(-1, keepdim=True)

    x = torch.randn(6, 2, dtype=torch.float64)
    for per_sample in (False, True):
        net = NoetherWrapper(model, steps, step_rule="polyak", per_sample=per_sample)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "the steps did not change it"
            info = net(x, return_info=True)
        assert bool((info.noether_losses[:, 0] > 0).any())
        torch.testing.assert_close(info.prediction, model(x), rtol=0, atol=0)


def test_polyak_cap_rejects_bad_values() -> None:
    make_net(polyak_cap=None)
    with pytest.raises(ValueError, match="`polyak_cap`"):
        make_net(polyak_cap=0)
