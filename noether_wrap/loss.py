"""The Noether loss: how far a learned embedding drifts along a predicted trajectory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from noether_wrap._checks import check_choice, check_int

LossForm = Literal["anchor", "chain"]
Distance = Literal["mse", "cosine"]
Reduction = Literal["none", "mean", "sum"]

LOSS_FORMS: tuple[str, ...] = ("anchor", "chain")
DISTANCES: tuple[str, ...] = ("mse", "cosine")
REDUCTIONS: tuple[str, ...] = ("none", "mean", "sum")

_COSINE_EPS = 1e-8


def stack_windows(frames: Tensor, window: int) -> Tensor:
    """Stack every run of ``window`` consecutive frames on the first state axis.

    Args:
        frames: ``(batch, n, *state)`` with ``n >= window``.
        window: how many consecutive frames make one embedding input.

    Returns:
        ``(batch, n - window + 1, window * state[0], *state[1:])``; entry ``i`` stacks frames
        ``i .. i + window - 1`` in time order. For ``window == 1`` this is ``frames`` itself.
        A scalar state (``frames`` of shape ``(batch, n)``) is treated as ``state = (1,)``.
    """
    if window == 1:
        return frames
    if frames.dim() == 2:
        frames = frames.unsqueeze(-1)
    count = frames.shape[1] - window + 1
    parts = [frames[:, i : i + count] for i in range(window)]
    return torch.cat(parts, dim=2)


def embed(embedding: Callable[[Tensor], Tensor], states: Tensor) -> Tensor:
    """Apply ``embedding`` to every state of ``states`` in one call.

    Args:
        embedding: maps ``(N, *state)`` to ``(N, m)`` or ``(N,)``.
        states: ``(batch, n, *state)``.

    Returns:
        ``(batch, n, m)`` (``m = 1`` for a scalar embedding).

    Raises:
        ValueError: the embedding's output is not ``(N,)`` or ``(N, m)``.
    """
    batch, n = states.shape[:2]
    flat = states.reshape(batch * n, *states.shape[2:])
    out = embedding(flat)
    if not isinstance(out, Tensor):
        raise TypeError(f"`embedding` must return a Tensor, got {type(out).__name__}.")
    if out.dim() == 1:
        out = out.unsqueeze(-1)
    if out.dim() != 2 or out.shape[0] != batch * n:
        raise ValueError(
            f"`embedding` must map (N, *state) to (N, m) or (N,); for input shape "
            f"{tuple(flat.shape)} it returned shape {tuple(out.shape)}."
        )
    return out.reshape(batch, n, out.shape[-1])


def per_sequence_noether_loss(
    reference: Tensor,
    predictions: Tensor,
    embedding: Callable[[Tensor], Tensor],
    loss_form: str,
    distance: str,
    window: int,
) -> Tensor:
    """The pinned per-sequence Noether loss, with time at dim 1 and no argument checks.

    Args:
        reference: ``(batch, r, *state)`` observed frames, ``r >= window``; the last ``window``
            of them form the anchor.
        predictions: ``(batch, T, *state)``.

    Returns:
        ``(batch,)``: ``sum_t mean_j (g_j(a_t) - g_j(x_t))^2`` (``mse``) or
        ``sum_t (1 - cos(g(a_t), g(x_t)))`` (``cosine``).
    """
    frames = torch.cat([reference[:, reference.shape[1] - window :], predictions], dim=1)
    codes = embed(embedding, stack_windows(frames, window))  # (batch, T + 1, m)
    codes = codes.to(torch.promote_types(codes.dtype, torch.float32))  # bf16/fp16 under autocast
    later = codes[:, 1:]
    if loss_form == "anchor":
        earlier = codes[:, :1].expand_as(later)
    else:
        earlier = codes[:, :-1]
    if distance == "mse":
        per_step = (earlier - later).pow(2).mean(dim=-1)
    else:
        per_step = 1.0 - torch.nn.functional.cosine_similarity(
            earlier, later, dim=-1, eps=_COSINE_EPS
        )
    return per_step.sum(dim=1)


def as_reference_frames(x0: Tensor, predictions: Tensor, time_dim: int) -> Tensor:
    """Give ``x0`` a time axis at dim 1 if it has none, after checking it matches the state.

    Args:
        x0: ``(batch, *state)`` or ``(batch, r, *state)`` (time at dim 1).
        predictions: ``(batch, T, *state)`` with time already at dim 1.
        time_dim: where the caller's predictions had time, for the error message.

    Returns:
        ``(batch, r, *state)``.
    """
    state = tuple(predictions.shape[2:])
    if tuple(x0.shape[1:]) == state and x0.shape[0] == predictions.shape[0]:
        return x0.unsqueeze(1)
    same_batch = x0.shape[0] == predictions.shape[0]
    if same_batch and x0.dim() == predictions.dim() and tuple(x0.shape[2:]) == state:
        return x0
    raise ValueError(
        f"the reference frames must have shape (batch, *state) or (batch, r, *state) matching "
        f"the predictions' state; got reference shape {tuple(x0.shape)} for predictions whose "
        f"batch is {predictions.shape[0]} and state is {state} (time at dim {time_dim})."
    )


def noether_loss(
    x0: Tensor,
    predictions: Tensor,
    embedding: Callable[[Tensor], Tensor],
    *,
    loss_form: LossForm = "anchor",
    distance: Distance = "mse",
    window: int = 1,
    time_dim: int = 1,
    horizon: int | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """The Noether loss of predicted trajectories, as a plain function.

    For one sequence, ``L = sum_t mean_j (g_j(a_t) - g_j(x_t))^2`` over the ``T`` predicted steps
    ``x_t`` and the embedding's output dimensions ``j``, where the anchor ``a_t`` is the observed
    start (``loss_form="anchor"``) or the previous predicted step (``"chain"``, with
    ``x_0 = x0``). With ``window = w`` the embedding sees ``w`` consecutive frames stacked on the
    first state axis, and ``x0`` must provide at least ``w`` frames.

    Args:
        x0: observed start, ``(batch, *state)``, or ``(batch, r, *state)`` frames with ``r >=
            window`` (time at dim 1; the last ``window`` are used).
        predictions: ``(batch, T, *state)``, time at ``time_dim``.
        embedding: ``g``, maps ``(N, *window_state)`` to ``(N, m)`` or ``(N,)``.
        loss_form: ``"anchor"`` or ``"chain"``.
        distance: ``"mse"`` or ``"cosine"`` (``1 - cos`` per step, summed over steps).
        window: frames per embedding input.
        time_dim: the time axis of ``predictions``.
        horizon: use only the first ``horizon`` predicted steps (None: all).
        reduction: ``"none"`` gives ``(batch,)``; ``"mean"`` and ``"sum"`` reduce over the batch.

    Returns:
        ``(batch,)`` for ``reduction="none"``, else a scalar.

    Example:
        >>> import torch
        >>> from noether_wrap import noether_loss
        >>> x0 = torch.randn(4, 2)
        >>> preds = x0.unsqueeze(1).repeat(1, 5, 1)   # a trajectory that stands still
        >>> noether_loss(x0, preds, lambda s: s.pow(2).sum(-1), reduction="none")
        tensor([0., 0., 0., 0.])
    """
    check_choice("loss_form", loss_form, LOSS_FORMS)
    check_choice("distance", distance, DISTANCES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_int("window", window)
    if not isinstance(predictions, Tensor) or not isinstance(x0, Tensor):
        raise TypeError("`x0` and `predictions` must be Tensors.")
    if predictions.dim() < 2:
        raise ValueError(
            f"`predictions` must be (batch, T, *state) with time at `time_dim`; got shape "
            f"{tuple(predictions.shape)}."
        )
    predictions = predictions.movedim(time_dim, 1)
    if horizon is not None:
        if not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"`horizon` must be a positive int or None, got {horizon!r}.")
        predictions = predictions[:, :horizon]
    reference = as_reference_frames(x0, predictions, time_dim)
    if reference.shape[1] < window:
        raise ValueError(
            f"`x0` must provide at least `window` (={window}) frames; got {reference.shape[1]}."
        )
    losses = per_sequence_noether_loss(
        reference, predictions, embedding, loss_form, distance, window
    )
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses
