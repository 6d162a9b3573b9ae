from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from noether_wrap import noether_loss
from noether_wrap.loss import stack_windows


def _square(s: torch.Tensor) -> torch.Tensor:
    return s.reshape(s.shape[0], -1) ** 2


def test_anchor_normalisation_by_hand() -> None:
    x0 = torch.tensor([[1.0, 2.0]])
    preds = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    # g = (x1^2, x2^2): step 1 -> mean((0, 5)^2) = 12.5, step 2 -> mean((3, 0)^2) = 4.5
    loss = noether_loss(x0, preds, _square, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([17.0]))


def test_chain_normalisation_by_hand() -> None:
    x0 = torch.tensor([[1.0, 2.0]])
    preds = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])
    # step 1 vs x0: 12.5; step 2 vs step 1: g = (1, 9) vs (4, 4): mean(9, 25) = 17
    loss = noether_loss(x0, preds, _square, loss_form="chain", reduction="none")
    torch.testing.assert_close(loss, torch.tensor([29.5]))


def test_cosine_distance() -> None:
    x0 = torch.tensor([[1.0, 0.0]])
    preds = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])
    loss = noether_loss(x0, preds, lambda s: s, distance="cosine", reduction="none")
    torch.testing.assert_close(loss, torch.tensor([1.0]))


def test_reductions_and_horizon_and_time_dim() -> None:
    x0 = torch.randn(3, 2)
    preds = torch.randn(3, 5, 2)
    per = noether_loss(x0, preds, _square, reduction="none")
    assert per.shape == (3,)
    torch.testing.assert_close(noether_loss(x0, preds, _square), per.mean())
    torch.testing.assert_close(noether_loss(x0, preds, _square, reduction="sum"), per.sum())
    short = noether_loss(x0, preds, _square, horizon=2, reduction="none")
    torch.testing.assert_close(short, noether_loss(x0, preds[:, :2], _square, reduction="none"))
    swapped = noether_loss(x0, preds.transpose(1, 2), _square, time_dim=2, reduction="none")
    torch.testing.assert_close(swapped, per)


def test_window_stacks_frames_in_time_order() -> None:
    frames = torch.arange(2 * 4 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 4, 1, 2, 2)
    stacked = stack_windows(frames, 2)
    assert stacked.shape == (2, 3, 2, 2, 2)
    torch.testing.assert_close(stacked[:, 1, 0], frames[:, 1, 0])
    torch.testing.assert_close(stacked[:, 1, 1], frames[:, 2, 0])


def test_window_two_uses_last_reference_frames() -> None:
    ref = torch.randn(2, 3, 1, 4, 4)
    preds = torch.randn(2, 5, 1, 4, 4)

    def g(s: torch.Tensor) -> torch.Tensor:
        assert s.shape[1:] == (2, 4, 4)
        return s.mean(dim=(2, 3))

    loss = noether_loss(ref, preds, g, window=2, reduction="none")
    frames = torch.cat([ref[:, 1:], preds], dim=1)
    codes = torch.stack([g(torch.cat([frames[:, i], frames[:, i + 1]], 1)) for i in range(6)], 1)
    expected = ((codes[:, :1] - codes[:, 1:]) ** 2).mean(-1).sum(-1)
    torch.testing.assert_close(loss, expected)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 5), horizon=st.integers(1, 6), dim=st.integers(1, 4))
def test_shapes_and_conserved_quantity_gives_zero(batch: int, horizon: int, dim: int) -> None:
    x0 = torch.randn(batch, dim)
    angles = torch.rand(batch, horizon, dim) * 6.0
    norm = x0.norm(dim=-1, keepdim=True).unsqueeze(1)
    direction = torch.nn.functional.normalize(torch.randn(batch, horizon, dim) + angles, dim=-1)
    preds = direction * norm  # same norm as x0 at every step
    loss = noether_loss(x0, preds, lambda s: s.norm(dim=-1), reduction="none")
    assert loss.shape == (batch,)
    assert float(loss.abs().max()) < 1e-8


def test_errors_name_the_argument() -> None:
    x0, preds = torch.randn(2, 3), torch.randn(2, 4, 3)
    noether_loss(x0, preds, _square)
    with pytest.raises(ValueError, match="`loss_form`"):
        noether_loss(x0, preds, _square, loss_form="ring")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`distance`"):
        noether_loss(x0, preds, _square, distance="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`reduction`"):
        noether_loss(x0, preds, _square, reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`window`"):
        noether_loss(x0, preds, _square, window=0)
    with pytest.raises(ValueError, match="at least `window`"):
        noether_loss(x0, preds, _square, window=2)
    with pytest.raises(ValueError, match="reference frames"):
        noether_loss(torch.randn(2, 5), preds, _square)
    with pytest.raises(ValueError, match="`embedding` must map"):
        noether_loss(x0, preds, lambda s: s[None])
    with pytest.raises(ValueError, match="`horizon`"):
        noether_loss(x0, preds, _square, horizon=0)
