"""What one forward pass's inner loop needs (:class:`Call`, immutable) and what it returns.

The wrapper builds one :class:`Call` per forward pass from its options; every path reads it and
none writes it. What changes during a run (which step is running, for error messages) lives in
a separate :class:`Progress` that the caller owns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

if TYPE_CHECKING:  # the options record imports this package (its choices live here)
    from noether_wrap._options import Options

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


@dataclass(frozen=True)
class Call:
    """One forward pass's inner problem: the model, the loss, k, the step rule and its options.

    ``inputs``, ``args`` and ``kwargs`` are the call's (one sequence's, inside ``vmap``).
    """

    model: nn.Module
    predict: Bound | None
    #: The model's own buffers; every rollout runs on fresh clones of them.
    buffers: Params
    loss: LossFn
    inputs: Tensor
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    steps: int
    #: ``exp(log_inner_lr)``: the step size (``"fixed"``) or the fraction γ (``"polyak"``).
    lr: Tensor
    #: The wrapper's checked options record (:class:`noether_wrap._options.Options`): the step
    #: transforms read their settings from it by name, so an option the loop reads needs no
    #: field here.
    options: Options
    #: ``(inputs, plain, tailored) -> (batch,)``: how far each tailored rollout moved from the
    #: plain one, relative to the plain one's displacement (the prediction guard's measure).
    move: Callable[[Tensor, Tensor, Tensor], Tensor]
    create_graph: bool
    differentiable: bool
    need_final_loss: bool
    #: Inside ``vmap``: no data-dependent Python control flow.
    in_vmap: bool = False

    @property
    def step_rule(self) -> str:
        return str(self.options.step_rule)

    @property
    def step_control(self) -> str:
        return str(self.options.step_control)

    @property
    def max_grad_norm(self) -> float | None:
        return self.options.max_inner_grad_norm

    @property
    def polyak_cap(self) -> float | None:
        """``‖Δθ‖ <= polyak_cap * stepper.size()`` per row and step (None: uncapped)."""
        return self.options.polyak_cap

    @property
    def momentum(self) -> float | None:
        """Heavy-ball momentum β on the inner steps (None: plain steps)."""
        return self.options.inner_momentum

    @property
    def guard(self) -> float | None:
        """The prediction guard τ (None: off)."""
        return self.options.guard

    @property
    def keeps_graphs(self) -> bool:
        """Whether the inner rollouts' graphs must outlive their inner gradient: for the second
        order, and for ``initial``/``losses`` that the caller may differentiate. Otherwise each
        is freed at once, so first-order memory is flat in k."""
        return self.create_graph or (self.differentiable and self.need_final_loss)

    @property
    def needs_norm(self) -> bool:
        """Whether the step reads the inner gradient's norm (the Polyak rule, clipping): where
        it does not, a path may skip computing it."""
        return self.step_rule == "polyak" or self.max_grad_norm is not None

    @property
    def caps_polyak(self) -> bool:
        """Whether the Polyak cap applies (the rule is Polyak and the cap is set)."""
        return self.step_rule == "polyak" and self.polyak_cap is not None

    @property
    def batch(self) -> int:
        return int(self.inputs.shape[0])

    def with_inputs(
        self, inputs: Tensor, args: tuple[Any, ...], kwargs: Mapping[str, Any], **changes: Any
    ) -> Call:
        """The same call on other inputs (a sub-batch, one sequence inside ``vmap``)."""
        return replace(self, inputs=inputs, args=args, kwargs=kwargs, **changes)

    def fresh_buffers(self) -> Params:
        """Clones of the model's buffers: every pass starts from the model's state, and what a
        pass writes into them (running statistics, counters) never reaches the model."""
        return {n: b.clone() for n, b in self.buffers.items()}

    def rollout(self, params: Params, buffers: Params | None = None) -> Tensor:
        """The wrapped model's output with ``params`` swapped in.

        When the inner gradient is differentiated again (second order), attention runs on
        PyTorch's math kernel: the fused kernels have no double backward.
        """
        own = self.fresh_buffers() if buffers is None else buffers
        with math_attention() if self.create_graph else contextlib.nullcontext():
            out: Tensor = functional_call(
                self.model, (params, own), (self.inputs, *self.args), dict(self.kwargs)
            )
        return out

    def prediction(self, params: Params, buffers: Params | None = None) -> Tensor:
        """What the wrapper returns for ``params``: ``predict(model, ...)``, else the rollout."""
        if self.predict is None:
            return self.rollout(params, buffers)
        own = self.fresh_buffers() if buffers is None else buffers
        prefixed = {"model." + n: v for n, v in params.items()}
        prefixed.update({"model." + n: v for n, v in own.items()})
        out: Tensor = functional_call(
            self.predict, prefixed, (self.inputs, *self.args), dict(self.kwargs)
        )
        return out

    def noether_loss(self, output: Tensor) -> Tensor:
        """``(batch,)``: each sequence's Noether loss of ``output``."""
        return self.loss(self.inputs, output)


@dataclass
class Progress:
    """Where a run is, for error messages: the step running, and whether a first inner
    gradient went through (a failure before it is about the inputs or the model)."""

    step: int = 0
    started: bool = False


class InnerResult(NamedTuple):
    """``prediction`` and ``initial``: like the model's output; ``losses``: ``(batch, k + 1)``;
    ``ok``: ``(batch,)`` bool, False where an inner step produced a non-finite value; the last
    column of ``losses`` is NaN where no one reads it (see ``loop.final_loss``);
    ``params``: the adapted parameters where the path materialises them (leading batch dim when
    per sample), else None; ``buffers``: the buffer clones the returned prediction's pass left
    (what one unwrapped call writes), or None where the path does not run the whole batch;
    ``moves``: see the field. Where the guard kept the plain prediction, ``prediction`` is
    ``initial`` and the last column of ``losses`` is the first."""

    prediction: Tensor
    initial: Tensor
    losses: Tensor
    ok: Tensor
    params: Params | None = None
    buffers: Params | None = None
    #: ``(batch,)``: how far each tailored rollout moved from the plain one, relative to the plain
    #: rollout's own displacement (NaN where not computed: no guard).
    moves: Tensor | None = None

    def detached(self) -> InnerResult:
        """The same result with every tensor cut from the graph."""
        params = None if self.params is None else {n: p.detach() for n, p in self.params.items()}
        return self._replace(
            prediction=self.prediction.detach(),
            initial=self.initial.detach(),
            losses=self.losses.detach(),
            params=params,
            moves=None if self.moves is None else self.moves.detach(),
        )


def parameter_norm(params: Params) -> Tensor:
    """The norm of all of ``params`` together, a scalar (differentiable: the outer gradient
    sees it); where they are all zero (a zero-initialised branch), ``sqrt(numel)``: one unit
    per parameter."""
    squared = torch.stack([p.pow(2).sum() for p in params.values()]).sum()
    count = float(sum(p.numel() for p in params.values()))
    return torch.where(squared > 0, squared, torch.full_like(squared, count)).sqrt()


@contextlib.contextmanager
def forward_hooks(pairs: Iterable[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Forward hooks installed for the duration of one call, removed whatever happens."""
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class HookedStepper:
    """Base of the paths whose state acts through forward hooks on the model's own modules
    (low-rank updates, affines): bind a state to the hooks, then run the model as it is."""

    call: Call

    def bind(self, state: Any) -> None:
        raise NotImplementedError

    def rollout(self, state: Any, buffers: Params | None = None) -> Tensor:
        self.bind(state)
        return self.call.rollout({}, buffers)

    def prediction(self, state: Any, buffers: Params | None = None) -> Tensor:
        self.bind(state)
        return self.call.prediction({}, buffers)
