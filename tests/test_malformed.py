"""Malformed inputs thrown at the public API: a named ValueError/TypeError or a correct result,
never a crash deep inside torch, never a changed parameter."""

from __future__ import annotations

import warnings

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from noether_wrap import NoetherWrapper, Rollout, noether_loss
from noether_wrap.embeddings import MLPEmbedding

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
    before = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if no_grad:
                with torch.no_grad():
                    out = net(x)
            else:
                out = net(x)
    except (ValueError, TypeError) as error:
        assert "`" in str(error), str(error)  # names the argument
    else:
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
    after = net.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@settings(max_examples=30, deadline=None)
@given(x=malformed(), horizon=st.integers(-1, 3))
def test_rollout_and_loss_on_malformed_inputs(x: torch.Tensor, horizon: int) -> None:
    step = torch.nn.Linear(3, 3)
    try:
        model = Rollout(step, horizon)
        preds = model(x)
        noether_loss(x, preds, lambda s: s.sum(-1))
    except (ValueError, TypeError) as error:
        assert "`" in str(error), str(error)
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
