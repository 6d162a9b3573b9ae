"""The general per-sample path: ``vmap`` over the inner loop, every sequence a batch of one.

Inside each lane the model and the embedding run unchanged on a batch of one, and the loop is
the shared path's (:class:`~noether_wrap._inner.shared.WeightStepper` with ``torch.func.grad``).
Extra arguments whose first dim is the batch size are split per sample; the rest are passed
whole to every lane.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor
from torch.func import vmap

from noether_wrap._inner.call import Call, InnerResult, Params, Progress
from noether_wrap._inner.loop import run
from noether_wrap._inner.shared import WeightStepper


def batched_dims(values: tuple[Any, ...], batch: int) -> tuple[int | None, ...]:
    """``0`` for each tensor whose first dim is ``batch`` (split per sample), else ``None``."""
    return tuple(
        0 if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else None for v in values
    )


def _unsqueeze(values: tuple[Any, ...], dims: tuple[int | None, ...]) -> tuple[Any, ...]:
    return tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(values, dims))


def tailor_vmap(call: Call, params: Params, progress: Progress) -> InnerResult:
    """Every sequence takes its own inner steps; ``params`` come back with a batch dim.

    The returned result has no ``buffers``: per-sample tailoring runs with running statistics
    (BatchNorm in eval mode), so no pass has buffers to write back.
    """
    batch = call.batch
    arg_dims = batched_dims(call.args, batch)
    names = tuple(call.kwargs)
    kw_values = tuple(call.kwargs[n] for n in names)
    kw_dims = batched_dims(kw_values, batch)
    start = params if call.differentiable else {n: p.detach() for n, p in params.items()}

    def one(x: Tensor, a: tuple[Any, ...], kv: tuple[Any, ...]) -> tuple[Any, ...]:
        kw = dict(zip(names, _unsqueeze(kv, kw_dims)))
        lane = call.with_inputs(x.unsqueeze(0), _unsqueeze(a, arg_dims), kw, in_vmap=True)
        result = run(lane, WeightStepper(lane, start, functional=True), progress)
        assert result.params is not None
        moves = result.losses.new_full((1,), math.nan) if result.moves is None else result.moves
        return (
            result.prediction.squeeze(0),
            result.initial.squeeze(0),
            result.losses.squeeze(0),
            result.ok.reshape(()),
            result.params,
            moves.reshape(()),
        )

    mapped = vmap(one, in_dims=(0, arg_dims, kw_dims), randomness="different")
    prediction, initial, losses, ok, adapted, moves = mapped(call.inputs, call.args, kw_values)
    guarded = None if call.guard is None else moves
    return InnerResult(prediction, initial, losses, ok, adapted, None, guarded)
