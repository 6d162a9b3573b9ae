"""Malformed inputs thrown at the public API: a named ValueError/TypeError or a correct result,
never a crash deep inside torch, never a changed parameter."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from noether_wrap import NoetherWrapper, Rollout, noether_loss
from noether_wrap.embeddings import MLPEmbedding

from conftest import tensor_state

DTYPES = [torch.float32, torch.float64, torch.int64, torch.bool, torch.float16]


def _net(per_sample: bool, path: str) -> NoetherWrapper:
    torch.manual_seed(0)
    step = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return NoetherWrapper(
        Rollout(step, 3),
        MLPEmbedding(3, hidden=4),
        inner_lr=0.1,
        per_sample=per_sample,
        per_sample_path=path,
    )


def _named_argument(x: torch.Tensor) -> str | None:
    """The argument a wrapper error on ``x`` must name, or None where ``x`` is well formed.

    ``inputs`` itself: no batch, an empty axis, not float32 on the CPU like the model; the
    ``model``: it cannot read a state whose last axis is not its 3 features, and on a 1-D
    input its output has no time axis; the embedding (MLPEmbedding over 3 features, whose
    argument is ``states``): a state of more than 3 values."""
    if x.dim() == 0 or x.numel() == 0:
        return "`inputs`"
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return "`inputs`"
    if x.dim() == 1 or x.shape[-1] != 3:
        return "`model`"
    if math.prod(x.shape[1:]) != 3:
        return "`states`"
    return None


@st.composite
def malformed(draw: st.DrawFn) -> torch.Tensor:
    rank = draw(st.integers(0, 4))
    shape = [draw(st.integers(0, 4)) for _ in range(rank)]
    if rank >= 2 and draw(st.booleans()):
        shape[-1] = 3  # often the right state size, so that other defects get exercised
    dtype = draw(st.sampled_from(DTYPES))
    device = draw(st.sampled_from(["cpu", "cpu", "cpu", "meta"]))
    x = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.ones(shape, dtype=dtype)
    if dtype.is_floating_point and x.numel() and draw(st.booleans()):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
    return x.to(device)


@settings(max_examples=80, deadline=None)
@example(x=torch.randn(4, 3), per_sample=True, path="auto", no_grad=False)
@example(
    x=torch.tensor([[0.1, 0.2, 0.3], [float("nan"), 0.0, 1.0]]),
    per_sample=True,
    path="vmap",
    no_grad=False,
)
@example(x=torch.ones(2, 3, dtype=torch.int64), per_sample=True, path="auto", no_grad=True)
@given(
    x=malformed(),
    per_sample=st.booleans(),
    path=st.sampled_from(["auto", "vmap"]),
    no_grad=st.booleans(),
)
def test_wrapper_on_malformed_inputs(
    x: torch.Tensor, per_sample: bool, path: str, no_grad: bool
) -> None:
    net = _net(per_sample, path)
    before = tensor_state(net)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if no_grad:
                with torch.no_grad():
                    out = net(x)
            else:
                out = net(x)
    except (ValueError, TypeError) as error:
        named = _named_argument(x)
        assert named is not None, f"well-formed {tuple(x.shape)} rejected: {error}"
        assert named in str(error), (named, str(error))  # names the argument at fault
        if named == "`states`":
            assert "MLPEmbedding" in str(error), str(error)
    else:
        assert _named_argument(x) is None, f"{tuple(x.shape)} {x.dtype} {x.device} accepted"
        # a state of any shape whose last axis has the 3 features the model reads: (batch, 3),
        # or e.g. (batch, 1, 3), which the rollout keeps as the state shape (1, 3)
        good = x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() >= 2
        assert good and x.shape[0] > 0 and x.shape[-1] == 3
        assert out.shape == (x.shape[0], 3, *x.shape[1:])
        finite_rows = torch.isfinite(x).flatten(1).all(dim=1)
        assert torch.isfinite(out[finite_rows]).all()
        if per_sample and not bool(finite_rows.all()):  # bad rows are returned untailored
            torch.testing.assert_close(
                out[~finite_rows], net.model(x[~finite_rows]), equal_nan=True
            )
    after = tensor_state(net)
    for key in before:
        assert torch.equal(before[key], after[key]), key


@settings(max_examples=30, deadline=None)
@given(x=malformed(), horizon=st.integers(-1, 3))
def test_rollout_and_loss_on_malformed_inputs(x: torch.Tensor, horizon: int) -> None:
    step = torch.nn.Linear(3, 3)
    stage = "horizon"
    try:
        model = Rollout(step, horizon)
        stage = "call"
        preds = model(x)
        stage = "loss"
        noether_loss(x, preds, lambda s: s.sum(-1))
    except (ValueError, TypeError) as error:
        # Rollout(step, horizon) rejects a horizon below 1; the loss's embedding ``s.sum(-1)``
        # maps (N, *state) to (N, m) or (N,) only for a state of one or two axes
        named = {"horizon": "`horizon`", "call": "`x0`", "loss": "`embedding`"}[stage]
        assert named in str(error), (stage, str(error))
        if stage == "loss":
            assert x.dim() == 1 or x.dim() >= 4, (tuple(x.shape), str(error))
    except RuntimeError:
        # a plain Rollout is the user's model: torch's own error for a wrong input size is
        # what they expect there; the wrapper is the one that must name the argument
        assert not (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.dim() == 2
            and x.shape[-1] == 3
            and horizon >= 1
        )
    else:
        assert horizon >= 1  # a horizon below 1 never gets as far as a prediction


@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_one_dimensional_inputs_name_the_model_output_on_the_per_sample_path(path: str) -> None:
    """(3,) inputs: the model maps the whole vector to one state, so its output (3, 3) has no
    time axis; the shared step says so, and the per-sample path must say the same."""
    x = torch.randn(3)
    with pytest.raises(ValueError, match="`model` output must have a time axis"):
        _net(False, path)(x)
    with pytest.raises(ValueError, match="`model` output must have a time axis"):
        _net(True, path)(x)
