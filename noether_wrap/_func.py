"""The torch.func plumbing: functional calls, the differentiable inner loop and its two paths.

Nothing here validates user input; :mod:`noether_wrap.wrapper` does that at the boundary.

Two paths run the same inner loop (:func:`inner_loop`):

* batch-shared: one ``torch.autograd.grad`` of the batch-mean Noether loss per inner step, so
  the whole batch takes one step (the paper's code);
* per-sample: ``torch.func.vmap`` over ``torch.func.grad``, so every sequence takes its own step
  and its prediction does not depend on the rest of the batch.

The third path, exact per-sample steps without weight copies for linear and conv layers, lives in
:mod:`noether_wrap._lowrank` and shares :class:`InnerProblem` and :func:`final_prediction`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = dict[str, Tensor]
#: ``(inputs, model_output) -> (batch,)`` per-sequence Noether loss.
LossFn = Callable[[Tensor, Tensor], Tensor]
#: ``(model, inputs, *args, **kwargs) -> prediction``.
PredictFn = Callable[..., Tensor]


def math_attention() -> contextlib.AbstractContextManager[None]:
    """``scaled_dot_product_attention`` on the math kernel, which is twice differentiable."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no kernel choice to make here
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class Bound(nn.Module):
    """Calls ``fn(model, ...)`` so that ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, fn: PredictFn) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.fn(self.model, *args, **kwargs)


@dataclass
class InnerProblem:
    """What one forward pass's inner loop needs; built fresh by the wrapper for every call."""

    model: nn.Module
    predict: Bound | None
    #: The model's own buffers; every rollout runs on fresh clones of them (see :meth:`rollout`).
    buffers: Params
    loss: LossFn
    steps: int
    lr: Tensor
    create_graph: bool
    differentiable: bool
    max_grad_norm: float | None
    need_final_loss: bool
    step_index: int = 0
    #: True once the first rollout and its inner gradient went through (for error messages).
    started: bool = False
    #: The buffer clones the last prediction pass ran on, as that pass left them (BatchNorm
    #: running statistics in training mode): what one unwrapped forward would have written.
    final_buffers: Params | None = None
    #: "backtrack": every inner step is shortened (halved, up to ``BACKTRACKS`` times, else
    #: not taken) until it does not raise the Noether loss; see :func:`backtrack`.
    step_control: str = "none"
    #: Whether each row of the loss owns its own parameters' rows (per-sample affines); else one
    #: decision for all parameters (shared step; one sequence inside vmap).
    per_row: bool = False
    #: Inside ``vmap``: no data-dependent early exit.
    in_vmap: bool = False

    @property
    def keeps_graphs(self) -> bool:
        """Whether the inner rollouts' graphs must outlive their inner gradient: for the second
        order, and for ``initial``/``losses`` that the caller may differentiate (info,
        keep_if_better). Otherwise each is freed at once, so first-order memory is flat in k."""
        return self.create_graph or (self.differentiable and self.need_final_loss)

    def fresh_buffers(self) -> Params:
        """Clones of the model's buffers: every pass starts from the model's state, and what a
        pass writes into them (running statistics, counters) never reaches the model."""
        return {n: b.clone() for n, b in self.buffers.items()}

    def rollout(
        self,
        params: Params,
        inputs: Tensor,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        buffers: Params | None = None,
    ) -> Tensor:
        """The wrapped model's output with ``params`` swapped in.

        When the inner gradient is differentiated again (second order), attention runs on
        PyTorch's math kernel: the fused kernels have no double backward.
        """
        own = self.fresh_buffers() if buffers is None else buffers
        with math_attention() if self.create_graph else contextlib.nullcontext():
            out: Tensor = functional_call(self.model, (params, own), (inputs, *args), dict(kwargs))
        return out

    def prediction(
        self,
        params: Params,
        inputs: Tensor,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        buffers: Params | None = None,
    ) -> Tensor:
        """What the wrapper returns for ``params``: ``predict(model, ...)``, else the rollout."""
        if self.predict is None:
            return self.rollout(params, inputs, args, kwargs, buffers)
        own = self.fresh_buffers() if buffers is None else buffers
        prefixed = {"model." + n: v for n, v in params.items()}
        prefixed.update({"model." + n: v for n, v in own.items()})
        out: Tensor = functional_call(self.predict, prefixed, (inputs, *args), dict(kwargs))
        return out


class InnerResult(NamedTuple):
    """``prediction`` and ``initial``: like the model's; ``losses``: ``(batch, k + 1)``;
    ``ok``: ``(batch,)`` bool, False where an inner step produced a non-finite value;
    ``params``: the adapted parameters where the path materialises them (leading batch dim when
    per sample), else None."""

    prediction: Tensor
    initial: Tensor
    losses: Tensor
    ok: Tensor
    params: Params | None = None

    def detached(self) -> InnerResult:
        """The same result with every tensor cut from the graph."""
        params = None if self.params is None else {n: p.detach() for n, p in self.params.items()}
        return InnerResult(
            self.prediction.detach(), self.initial.detach(), self.losses.detach(), self.ok, params
        )


#: ``params -> (inner gradients, model output, per-sequence losses)``.
GradientFn = Callable[[Params], tuple[Params, Tensor, Tensor]]


def _all_finite(tensors: Any) -> Tensor:
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all()


def _clip(grads: Params, max_norm: float) -> Params:
    squared = sum((g * g).sum() for g in grads.values())
    scale = clip_scale(squared, max_norm)  # type: ignore[arg-type]
    return {n: g * scale for n, g in grads.items()}


GRAPHLESS_WARNING = (
    "NoetherWrapper: the inner gradient carries no graph although second-order training is on, "
    "so the embedding gets no outer gradient (the step size still does). Part of the model's "
    "backward is not differentiable: an adjoint ODE solver such as torchdiffeq.odeint_adjoint "
    "(use odeint), or a custom autograd.Function without double backward."
)


def warn_if_graphless(problem: InnerProblem, grads: Sequence[Tensor | None]) -> None:
    """Warn when ``create_graph`` was asked for but no inner gradient is differentiable."""
    if problem.create_graph and not any(g is not None and g.requires_grad for g in grads):
        warnings.warn(GRAPHLESS_WARNING, RuntimeWarning, stacklevel=2)


def clip_scale(squared_norm: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / norm)`` from the squared gradient norm, with a finite derivative
    everywhere: below ``max_norm`` the scale is the constant 1, so the square root is never
    differentiated at 0 (an exactly zero inner gradient is common: a zero-initialised residual
    branch, an all-zero padded sequence, a saturated embedding)."""
    return max_norm * torch.rsqrt(squared_norm.clamp(min=max_norm**2))


def final_prediction(
    problem: InnerProblem,
    params: Params,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> tuple[Tensor, Tensor]:
    """The prediction with ``params`` and the Noether loss after the last step.

    The final loss is always computed, so that every call notices a step that blew up (and
    ``net(x)`` agrees with ``net(x, return_info=True).prediction``); it carries a graph only
    where the caller needs it. One rollout serves both when there is no ``predict``.
    """
    buffers = problem.fresh_buffers()
    problem.final_buffers = buffers
    prediction = problem.prediction(params, inputs, args, kwargs, buffers)
    with contextlib.nullcontext() if problem.need_final_loss else torch.no_grad():
        rollout = prediction if problem.predict is None else None
        if rollout is None:
            rollout = problem.rollout(params, inputs, args, kwargs)
        final_loss = problem.loss(inputs, rollout)
    return prediction, final_loss


def inner_loop(
    problem: InnerProblem,
    params: Params,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    gradient: GradientFn,
    fresh: Callable[[Params], Params],
) -> InnerResult:
    """Run ``problem.steps`` plain SGD steps on the Noether loss, starting from ``params``.

    ``gradient`` decides whether the step is shared by the batch or taken per sample; ``fresh``
    turns stepped parameters into the next step's starting point (identity when the outer graph
    is kept, ``detach().requires_grad_()`` otherwise).
    """
    start = params
    losses: list[Tensor] = []
    ok = torch.ones((), dtype=torch.bool, device=inputs.device)
    initial: Tensor | None = None
    for i in range(problem.steps):
        problem.step_index = i
        grads, output, loss = gradient(params)
        problem.started = True
        if i == 0:
            initial = output
        losses.append(loss)
        if problem.max_grad_norm is not None:
            grads = _clip(grads, problem.max_grad_norm)
        ok = ok & torch.isfinite(loss).all() & _all_finite(grads.values())
        if problem.step_control == "backtrack":
            grads = backtrack(problem, params, grads, loss, inputs, args, kwargs)
        params = fresh({n: p - problem.lr * grads[n] for n, p in params.items()})
    problem.step_index = problem.steps
    assert initial is not None
    if problem.predict is not None:
        initial = problem.prediction(start, inputs, args, kwargs)
    prediction, final_loss = final_prediction(problem, params, inputs, args, kwargs)
    losses.append(final_loss)
    ok = ok & torch.isfinite(final_loss).all() & torch.isfinite(prediction).all()
    return InnerResult(prediction, initial, torch.stack(losses, dim=-1), ok, params)


#: Step fractions a backtracking step tries, in order; none accepted means no step.
BACKTRACKS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)


def _scaled(grads: Params, scale: Tensor, per_row: bool) -> Params:
    if not per_row:
        return {n: g * scale.reshape(()) for n, g in grads.items()}
    return {n: g * scale.reshape(-1, *([1] * (g.dim() - 1))) for n, g in grads.items()}


def backtrack(
    problem: InnerProblem,
    params: Params,
    grads: Params,
    loss: Tensor,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Params:
    """Shorten this inner step until it does not raise the Noether loss: the gradient times the
    first fraction in ``BACKTRACKS`` whose step keeps each sequence's loss (the batch mean for a
    shared step) at or below its value before the step, or times 0 when none does.

    The fractions are chosen without autograd and enter the step as constants, as a line
    search's decisions do; per sequence, so batch invariance holds.
    """

    def decide(values: Tensor) -> Tensor:
        """What one decision is about: each row's loss, or the batch mean."""
        return values if problem.per_row else values.mean().reshape(1)

    with torch.no_grad():
        before = decide(loss.detach())
        chosen = torch.zeros_like(before)
        accepted = torch.zeros_like(before, dtype=torch.bool)
        for fraction in BACKTRACKS:
            trial_scale = torch.where(accepted, chosen, torch.full_like(chosen, fraction))
            step = _scaled(grads, trial_scale, problem.per_row)
            trial = {
                n: p.detach() - problem.lr.detach() * step[n].detach() for n, p in params.items()
            }
            after = decide(problem.loss(inputs, problem.rollout(trial, inputs, args, kwargs)))
            newly = ~accepted & (after <= before)  # a non-finite trial is never accepted
            chosen = torch.where(newly, torch.full_like(chosen, fraction), chosen)
            accepted = accepted | newly
            if not problem.in_vmap and bool(accepted.all()):
                break
    return _scaled(grads, chosen, problem.per_row)


def _keep_graph(params: Params) -> Params:
    return params


def _cut_graph(params: Params) -> Params:
    return {n: p.detach().requires_grad_() for n, p in params.items()}


def tailor_shared(
    problem: InnerProblem,
    params: Params,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> InnerResult:
    """One step for the whole batch per inner step, on the batch mean of the Noether loss.

    Returns an :class:`InnerResult` with ``ok`` broadcast to ``(batch,)``.
    """

    def gradient(current: Params) -> tuple[Params, Tensor, Tensor]:
        with torch.enable_grad():
            output = problem.rollout(current, inputs, args, kwargs)
            loss = problem.loss(inputs, output)
            grads = torch.autograd.grad(
                loss.mean(),
                list(current.values()),
                create_graph=problem.create_graph,
                retain_graph=problem.keeps_graphs,
            )
        warn_if_graphless(problem, grads)
        return dict(zip(current, grads)), output, loss

    if problem.differentiable:
        fresh = _keep_graph
        params = {
            n: p if p.requires_grad else p.detach().requires_grad_() for n, p in params.items()
        }
    else:
        fresh = _cut_graph
        params = _cut_graph(params)
    result = inner_loop(problem, params, inputs, args, kwargs, gradient, fresh)
    if not problem.differentiable:
        result = result.detached()
    return result._replace(ok=result.ok.expand(inputs.shape[0]))


def batched_dims(values: tuple[Any, ...], batch: int) -> tuple[int | None, ...]:
    """``0`` for each tensor whose first dim is ``batch`` (split per sample), else ``None``."""
    return tuple(
        0 if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else None for v in values
    )


def _unsqueeze(values: tuple[Any, ...], dims: tuple[int | None, ...]) -> tuple[Any, ...]:
    return tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(values, dims))


def tailor_per_sample(
    problem: InnerProblem,
    params: Params,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> InnerResult:
    """Every sequence takes its own inner steps: ``vmap`` over ``grad``.

    Inside the map each sequence is seen as a batch of one, so the model and the embedding run
    unchanged. Extra arguments whose first dim is the batch size are split per sample; the rest
    are passed whole to every sample.
    """
    batch = inputs.shape[0]
    arg_dims = batched_dims(args, batch)
    names = tuple(kwargs)
    kw_values = tuple(kwargs[n] for n in names)
    kw_dims = batched_dims(kw_values, batch)
    start = params if problem.differentiable else {n: p.detach() for n, p in params.items()}

    problem.in_vmap = True

    def one(x: Tensor, a: tuple[Any, ...], kv: tuple[Any, ...]) -> InnerResult:
        x = x.unsqueeze(0)
        a = _unsqueeze(a, arg_dims)
        kw = dict(zip(names, _unsqueeze(kv, kw_dims)))

        def objective(current: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            output = problem.rollout(current, x, a, kw)
            loss = problem.loss(x, output)
            return loss.sum(), (output, loss)

        def gradient(current: Params) -> tuple[Params, Tensor, Tensor]:
            grads, (output, loss) = grad(objective, has_aux=True)(current)
            if not problem.create_graph:
                grads = {n: g.detach() for n, g in grads.items()}
            return grads, output, loss

        result = inner_loop(problem, start, x, a, kw, gradient, _keep_graph)
        assert result.params is not None
        return InnerResult(
            result.prediction.squeeze(0),
            result.initial.squeeze(0),
            result.losses.squeeze(0),
            result.ok,
            result.params,
        )

    mapped = vmap(one, in_dims=(0, arg_dims, kw_dims), randomness="different")
    result: InnerResult = mapped(inputs, args, kw_values)
    return result
