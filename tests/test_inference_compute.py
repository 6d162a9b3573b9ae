"""Inference-time compute: k per call, and backtracking steps that never raise the Noether loss."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from noether_wrap import Affine

from conftest import copy_weights, gradcheck_weight_and_step, make_net

PATHS = [
    {"per_sample_path": "lowrank"},
    {"per_sample_path": "vmap"},
    {"per_sample": False},
    {"adapt": Affine("step.0")},
]


@pytest.mark.parametrize("kwargs", PATHS, ids=["lowrank", "vmap", "shared", "affine"])
@pytest.mark.parametrize("k", [0, 1, 4])
def test_overriding_k_equals_a_wrapper_built_with_that_k(kwargs: dict, k: int) -> None:  # type: ignore[type-arg]
    torch.manual_seed(0)
    trained_with_one = make_net(inner_steps=1, inner_lr=0.05, **kwargs)
    torch.manual_seed(0)
    built_with_k = make_net(inner_steps=k, inner_lr=0.05, **kwargs)
    x = torch.randn(5, 2, dtype=torch.float64)
    info = trained_with_one(x, inner_steps=k, return_info=True)
    expected = built_with_k(x, return_info=True)
    torch.testing.assert_close(info.prediction, expected.prediction, rtol=1e-12, atol=1e-12)
    assert info.noether_losses.shape == (5, k + 1)
    assert trained_with_one.inner_steps == 1  # only for that call
    with pytest.raises(ValueError, match="`inner_steps`"):
        trained_with_one(x, inner_steps=-1)


@given(
    lr=st.sampled_from([0.01, 0.3, 3.0, 30.0, 300.0]),
    k=st.integers(1, 6),
    path=st.sampled_from(["vmap", "shared", "affine"]),
    seed=st.integers(0, 1000),
)
def test_backtracking_never_raises_any_sequences_noether_loss(
    lr: float, k: int, path: str, seed: int
) -> None:
    kwargs = {"vmap": {}, "shared": {"per_sample": False}, "affine": {"adapt": Affine("step.0")}}
    torch.manual_seed(seed)
    net = make_net(inner_steps=k, inner_lr=lr, step_control="backtrack", **kwargs[path])
    x = 2 * torch.randn(4, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        losses = net(x, return_info=True).noether_losses.detach()
    steps = losses[:, 1:] - losses[:, :-1]
    if path == "shared":  # one decision for the batch: its mean never rises
        assert bool((losses.mean(0)[1:] <= losses.mean(0)[:-1] + 1e-12).all())
    else:
        assert bool((steps <= 1e-12).all()), losses


def test_backtracking_at_a_sensible_step_changes_nothing() -> None:
    """Where every full step already lowers the loss, backtracking is the plain step."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, dtype=torch.float64)
    plain = make_net(inner_steps=2, inner_lr=1e-3, per_sample_path="vmap")
    safe = make_net(inner_steps=2, inner_lr=1e-3, step_control="backtrack")
    copy_weights(safe, plain)
    info = plain(x, return_info=True)
    assert bool((info.noether_losses[:, 1:] < info.noether_losses[:, :-1]).all())
    torch.testing.assert_close(safe(x), info.prediction, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("per_sample", [True, False])
def test_gradcheck_through_a_safeguarded_step(per_sample: bool, k: int) -> None:
    net = make_net(
        horizon=3, inner_steps=k, inner_lr=5.0, step_control="backtrack", per_sample=per_sample
    )
    x = torch.randn(3, 2, dtype=torch.float64)
    plain = make_net(horizon=3, inner_steps=k, inner_lr=5.0, per_sample=per_sample)
    copy_weights(plain, net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not torch.allclose(net(x), plain(x))  # some step was shortened
    assert gradcheck_weight_and_step(net, x)


def test_backtracking_keeps_batch_invariance() -> None:
    torch.manual_seed(0)
    net = make_net(inner_steps=3, inner_lr=20.0, step_control="backtrack")
    x = 2 * torch.randn(6, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        whole = net(x)
        parts = torch.cat([net(x[:1]), net(x[1:4]), net(x[4:])])
    torch.testing.assert_close(whole, parts, rtol=1e-10, atol=1e-12)
    assert net.last_path == "lowrank"  # backtracking runs on every path now


def test_backtracking_argument_errors() -> None:
    with pytest.raises(ValueError, match="`step_control`"):
        make_net(step_control="armijo")
    net = make_net(step_control="none")
    with pytest.raises(ValueError, match="`step_control`.*'bactrack'"):
        net.step_control = "bactrack"  # checked on assignment too
    assert net.step_control == "none"


@pytest.mark.parametrize("hidden", [3, 32])  # dense and recorded low-rank branches
def test_backtracking_on_the_lowrank_path_equals_vmap(hidden: int) -> None:
    torch.manual_seed(1)
    kwargs = {"hidden": hidden, "inner_steps": 3, "inner_lr": 20.0, "step_control": "backtrack"}
    fast = make_net(per_sample_path="lowrank", **kwargs)
    slow = make_net(per_sample_path="vmap", **kwargs)
    copy_weights(slow, fast)
    x = 2 * torch.randn(5, 2, dtype=torch.float64)
    a, b = fast(x, return_info=True), slow(x, return_info=True)
    assert fast.last_path == "lowrank" and slow.last_path == "vmap"
    torch.testing.assert_close(a.prediction, b.prediction, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.noether_losses, b.noether_losses, rtol=1e-10, atol=1e-12)
    assert bool((a.noether_losses.diff(dim=1) <= 1e-12).all())  # no step raised a loss
