"""Choosing the inner step size on held-out data, by a rule, never by hand."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

if TYPE_CHECKING:
    from noether_wrap.wrapper import NoetherWrapper

#: Half-decade steps from 1e-3 to 1: the grid the examples search.
DEFAULT_CANDIDATES: tuple[float, ...] = (1e-3, 3.16e-3, 1e-2, 3.16e-2, 0.1, 0.316, 1.0)


class TuneResult(NamedTuple):
    """What :func:`tune_inner_lr` returns.

    Attributes:
        best: the candidate with the lowest loss; now the wrapper's step size.
        losses: ``{candidate: loss}`` for every candidate, in the order given.
        untailored: the same loss with ``inner_steps = 0`` (the wrapped model alone), so a
            caller can see whether tailoring helps at all.
    """

    best: float
    losses: dict[float, float]
    untailored: float


def tune_inner_lr(
    net: NoetherWrapper,
    inputs: Tensor,
    target: Tensor,
    *,
    candidates: Sequence[float] = DEFAULT_CANDIDATES,
    loss: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
    forward: Callable[[NoetherWrapper, Tensor], Tensor] | None = None,
    chunk: int | None = None,
) -> TuneResult:
    """Set ``net``'s inner step size to the candidate with the lowest loss on held-out data.

    Use training or validation data, never test data. Each candidate is evaluated without
    autograd (tailoring still runs, rule 6); the model and the embedding are not changed. A
    candidate that diverges is scored like any other, without the wrapper's warnings.

    Args:
        net: the wrapper to tune; its ``log_inner_lr`` is set to the best candidate.
        inputs: ``(batch, ...)``, what ``net`` (or ``forward``) reads.
        target: what the prediction is compared with, shaped like it.
        candidates: positive step sizes to try.
        loss: ``(prediction, target) -> scalar``; mean squared error by default.
        forward: ``(net, inputs) -> prediction`` when the prediction is not ``net(inputs)``
            (e.g. a rollout of a tailored vector field); default ``net(inputs)``.
        chunk: evaluate ``inputs`` in pieces of this many sequences (memory); the losses of the
            pieces are averaged by size.

    Returns:
        A :class:`TuneResult`.

    Example:
        >>> import torch
        >>> from noether_wrap import NoetherWrapper, Rollout, tune_inner_lr
        >>> net = NoetherWrapper(Rollout(torch.nn.Linear(2, 2), 5), lambda s: s.pow(2).sum(-1))
        >>> x = torch.randn(16, 2)
        >>> result = tune_inner_lr(net, x, torch.zeros(16, 5, 2), candidates=[0.01, 0.1])
        >>> round(net.inner_lr, 9) == result.best
        True
    """
    values = [float(c) for c in candidates]
    if not values or not all(math.isfinite(c) and c > 0 for c in values):
        raise ValueError(f"`candidates` must be positive finite floats, got {list(candidates)!r}.")
    if not isinstance(inputs, Tensor) or not isinstance(target, Tensor):
        raise TypeError("`inputs` and `target` must be Tensors.")
    if inputs.shape[0] != target.shape[0]:
        raise ValueError(
            f"`inputs` and `target` must have the same batch size, got {inputs.shape[0]} and "
            f"{target.shape[0]}."
        )
    run = forward if forward is not None else _call
    size = inputs.shape[0] if chunk is None else chunk

    def evaluate() -> float:
        total = 0.0
        # a candidate that diverges is scored like any other; its warnings would only be noise
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for start in range(0, inputs.shape[0], size):
                part = slice(start, start + size)
                piece = inputs[part]
                total += float(loss(run(net, piece), target[part])) * piece.shape[0]
        return total / inputs.shape[0]

    original_steps = net.inner_steps
    original_lr = net.log_inner_lr.detach().clone()
    try:
        net.inner_steps = 0
        untailored = evaluate()
        net.inner_steps = original_steps
        losses: dict[float, float] = {}
        for value in values:
            with torch.no_grad():
                net.log_inner_lr.fill_(math.log(value))
            losses[value] = evaluate()
    except BaseException:
        with torch.no_grad():
            net.log_inner_lr.copy_(original_lr)
        raise
    finally:
        net.inner_steps = original_steps
    best = min(losses, key=lambda c: (not math.isfinite(losses[c]), losses[c]))
    with torch.no_grad():
        net.log_inner_lr.fill_(math.log(best))
    return TuneResult(best, losses, untailored)


def _call(net: NoetherWrapper, inputs: Tensor) -> Tensor:
    out = net(inputs)
    assert isinstance(out, Tensor)
    return out
