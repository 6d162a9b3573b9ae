"""The shared path: one step for the whole batch on the batch-mean Noether loss (the paper's code).

Its :class:`WeightStepper` also runs inside every ``vmap`` lane of the per-sample path, where the
"batch" is one sequence and the gradient comes from ``torch.func.grad``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from noether_wrap._inner.call import Call, InnerResult, Params, Progress, parameter_norm
from noether_wrap._inner.loop import Gradient, run, warn_if_graphless


def _squared_norm(grads: Params) -> Tensor:
    total = sum(g.pow(2).sum() for g in grads.values())
    return torch.as_tensor(total).reshape(1)


def _finite(grads: Params) -> Tensor:
    return torch.stack([torch.isfinite(g).all() for g in grads.values()]).all().reshape(1)


class WeightStepper:
    """Steps the adapted weights themselves, ``{name: tensor}``; one row.

    ``functional``: take the gradient with ``torch.func.grad`` (inside ``vmap``), else with one
    ``torch.autograd.grad`` of the batch-mean loss.
    """

    per_row = False

    def __init__(self, call: Call, params: Params, *, functional: bool) -> None:
        self.call = call
        self.initial = params
        self.functional = functional
        self._size: Tensor | None = None

    def start(self) -> Params:
        return self.initial

    def _leaves(self, state: Params) -> Params:
        """Tensors ``autograd.grad`` can differentiate: the state itself where it carries the
        outer graph, fresh leaves otherwise (so no graph of an earlier step is kept alive)."""
        keep = self.call.differentiable
        return {
            n: p if keep and p.requires_grad else p.detach().requires_grad_()
            for n, p in state.items()
        }

    def gradient(self, state: Params) -> Gradient[Params]:
        call = self.call
        if self.functional:

            def objective(current: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
                output = call.rollout(current)
                loss = call.noether_loss(output)
                return loss.sum(), (output, loss)

            grads, (output, loss) = grad(objective, has_aux=True)(state)
            if not call.create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
            point = state
        else:
            point = self._leaves(state)
            with torch.enable_grad():
                output = call.rollout(point)
                loss = call.noether_loss(output)
                found = torch.autograd.grad(
                    loss.mean(),
                    list(point.values()),
                    create_graph=call.create_graph,
                    retain_graph=call.keeps_graphs,
                )
            warn_if_graphless(call, found)
            grads = dict(zip(point, found))
        # the norm is always computed (one pass over the weights' gradients): a zero built from
        # the loss would be batched inside vmap where a zero gradient is not, and move a lane
        # onto another matmul kernel, so a no-op step would change the prediction by rounding
        return Gradient(point, output, loss, grads, _squared_norm(grads), _finite(grads))

    def step(self, state: Params, direction: Any, scale: Tensor) -> Params:
        factor = scale.reshape(())
        return {n: p - factor * direction[n] for n, p in state.items()}

    def rollout(self, state: Params, buffers: Params | None = None) -> Tensor:
        return self.call.rollout(state, buffers)

    def prediction(self, state: Params, buffers: Params | None = None) -> Tensor:
        return self.call.prediction(state, buffers)

    def params(self, state: Params) -> Params:
        return state

    def size(self, point: Params) -> Tensor:
        if self._size is None:
            self._size = parameter_norm(self.initial)
        return self._size


def tailor_shared(call: Call, params: Params, progress: Progress) -> InnerResult:
    """One step for the whole batch per inner step, on the batch mean of the Noether loss."""
    return run(call, WeightStepper(call, params, functional=False), progress)
