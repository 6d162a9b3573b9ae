"""Per-sequence affines: per-sample tailoring for any architecture at the cost of a shared step.

The Tailoring paper's CNGrad (Alet et al., NeurIPS 2021) adapts only a per-example, per-channel
scale and shift placed after chosen layers, created at identity for every call. Each sequence's
affine touches only its own outputs, so ONE backward of the summed per-sequence Noether losses
is every sequence's exact gradient: no ``vmap``, no weight copies, and any layer in between (RNN
kernels, fused attention, ODE solvers, custom ops).

The affines act through forward hooks on the matching modules, installed for one call only.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from noether_wrap._inner.call import (
    Call,
    HookedStepper,
    InnerResult,
    Params,
    Progress,
    forward_hooks,
)
from noether_wrap._inner.loop import Gradient, run, warn_if_graphless

_CHANNELS_FIRST = (_ConvNd, _NormBase, nn.GroupNorm)


class Affine:
    """``adapt=Affine("decoder.*")``: tailor a per-sequence, per-channel scale and shift on the
    outputs of the modules whose names match, instead of the model's weights (CNGrad).

    The modules' outputs must have the batch first (an RNN needs ``batch_first=True``; for a
    tuple output, e.g. an RNN's ``(output, h)``, the first element is scaled). The channel axis
    is 1 for convolutions and normalisation layers and the last axis otherwise, unless
    ``channel_dim`` says. Each call starts the affines at identity (scale 1, shift 0) and takes
    the inner steps on them alone, per sequence; the model's weights are trained by the outer
    loop as usual. Works for models that ``vmap`` cannot batch, at about the cost of one shared
    step.

    Args:
        pattern: a glob on module names (``named_modules``), e.g. ``"decoder.*"`` or
            ``"encoder.layers.*.linear2"``.
        channel_dim: the output axis that holds channels; None picks as above.
        shift: tailor a shift as well as a scale.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from noether_wrap import Affine, NoetherWrapper, Rollout
        >>> step = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> g = lambda s: s.pow(2).sum(-1)
        >>> net = NoetherWrapper(Rollout(step, 5), g, adapt=Affine("step.0"))
        >>> net(torch.randn(3, 2)).shape, net.last_path
        (torch.Size([3, 5, 2]), 'affine')
    """

    def __init__(self, pattern: str, *, channel_dim: int | None = None, shift: bool = True) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"`pattern` must be a non-empty glob string, got {pattern!r}.")
        if channel_dim is not None and (not isinstance(channel_dim, int) or channel_dim == 0):
            raise ValueError(
                f"`channel_dim` must be None or a non-zero int (0 is the batch), got "
                f"{channel_dim!r}."
            )
        self.pattern = pattern
        self.channel_dim = channel_dim
        self.shift = bool(shift)

    def __repr__(self) -> str:
        extra = "" if self.channel_dim is None else f", channel_dim={self.channel_dim}"
        return f"Affine({self.pattern!r}{extra}{'' if self.shift else ', shift=False'})"

    def modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """The matching modules of ``model``, by name (the root, named ``""``, never matches)."""
        return {
            name: module
            for name, module in model.named_modules()
            if name and fnmatch.fnmatchcase(name, self.pattern)
        }

    def channel_axis(self, module: nn.Module) -> int:
        if self.channel_dim is not None:
            return self.channel_dim
        return 1 if isinstance(module, _CHANNELS_FIRST) else -1


class AffineLayoutError(ValueError):
    """A hooked module's output does not have the batch first."""


@dataclass
class _Hook:
    """Scales (and shifts) one module's output by ``current``'s affines for it."""

    name: str
    axis: int
    batch: int | None  # the call's batch, checked; None: any (a kept, tailored copy)
    rows: int  # batch (per sample) or 1 (shared, or a kept copy)
    shift: bool
    current: Params

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        first = out[0] if isinstance(out, tuple) else out
        bad_batch = (
            not isinstance(first, Tensor)
            or first.dim() < 2
            or (self.batch is not None and first.shape[0] != self.batch)
        )
        if bad_batch:
            shape = tuple(first.shape) if isinstance(first, Tensor) else type(first).__name__
            raise AffineLayoutError(
                f"`adapt`: Affine needs the output of {self.name!r} ({type(module).__name__}) "
                f"with the batch ({self.batch}) first, got {shape}. For an RNN pass "
                "batch_first=True; or choose other modules."
            )
        axis = self.axis % first.dim()
        key = f"{self.name}.scale"
        if key not in self.current:  # created at identity by the first rollout of the call
            zeros = first.new_zeros(self.rows, first.shape[axis]).requires_grad_()
            self.current[key] = zeros
            if self.shift:
                self.current[f"{self.name}.shift"] = first.new_zeros(
                    self.rows, first.shape[axis]
                ).requires_grad_()
        view = [first.shape[0] if self.rows > 1 else 1] + [1] * (first.dim() - 1)
        view[axis] = first.shape[axis]
        scaled = first * (1 + self.current[key].reshape(view))
        if self.shift:
            scaled = scaled + self.current[f"{self.name}.shift"].reshape(view)
        return (scaled, *out[1:]) if isinstance(out, tuple) else scaled


class AffineStepper(HookedStepper):
    """Steps per-sequence (or batch-shared) affines ``{"<module>.scale" | ".shift": (rows, C)}``,
    created at identity by the first rollout's hooks; the model's own weights stay as they are.

    Each sequence's affines touch only its own outputs, so one backward of the summed losses is
    every sequence's exact gradient.
    """

    def __init__(self, call: Call, hooks: list[_Hook], spec: Affine, per_sample: bool) -> None:
        self.call = call
        self.hooks = hooks
        self.spec = spec
        self.per_row = per_sample

    def start(self) -> Params:
        return {}

    def bind(self, state: Params) -> None:
        for hook in self.hooks:
            hook.current = state

    def gradient(self, state: Params) -> Gradient[Params]:
        call = self.call
        keep = call.differentiable
        point = {
            n: p if keep and p.requires_grad else p.detach().requires_grad_()
            for n, p in state.items()
        }
        with torch.enable_grad():
            output = self.rollout(point)  # fills `point` with identity affines at step 0
            loss = call.noether_loss(output)
            names = list(point)
            if not names:
                raise AffineLayoutError(
                    f"`adapt`: no module matching {self.spec.pattern!r} ran in the rollout."
                )
            total = loss.sum() if self.per_row else loss.mean()
            found = torch.autograd.grad(
                total,
                [point[n] for n in names],
                create_graph=call.create_graph,
                retain_graph=call.keeps_graphs,
                allow_unused=True,
            )
        warn_if_graphless(call, found)
        grads = {n: torch.zeros_like(point[n]) if g is None else g for n, g in zip(names, found)}
        if not call.create_graph:
            grads = {n: g.detach() for n, g in grads.items()}
        squared = (
            torch.stack([g.pow(2).sum(1) for g in grads.values()]).sum(0)
            if call.needs_norm
            else loss.new_zeros(call.batch if self.per_row else 1)
        )
        finite = torch.stack([torch.isfinite(g).all(1) for g in grads.values()]).all(0)
        return Gradient(point, output, loss, grads, squared, finite)

    def step(self, state: Params, direction: Params, scale: Tensor) -> Params:
        column = scale.reshape(-1, 1)
        return {n: p - column * direction[n] for n, p in state.items()}

    def params(self, state: Params) -> Params:
        return state

    def size(self, point: Params) -> Tensor:
        """The identity's norm: one per scale channel (a shift's identity is zero)."""
        channels = sum(p.shape[1] for n, p in point.items() if n.endswith(".scale"))
        first = next(iter(point.values()))
        return torch.tensor(float(channels), dtype=first.dtype, device=first.device).sqrt()


def tailor_affine(
    call: Call, params: Params, progress: Progress, *, spec: Affine, per_sample: bool
) -> InnerResult:
    """Inner steps on per-sequence (``per_sample``) or batch-shared affines; the model's own
    ``params`` are not adapted (the affines are).

    Returns an :class:`InnerResult` whose ``params`` are the tailored affines, ``(batch, C)``
    (``(1, C)`` when shared) per ``"<module>.scale"`` / ``"<module>.shift"``, at zero meaning
    identity.
    """
    batch = call.batch
    rows = batch if per_sample else 1
    modules = spec.modules(call.model)
    hooks = [
        _Hook(name, spec.channel_axis(m), batch, rows, spec.shift, {})
        for name, m in modules.items()
    ]
    with forward_hooks((modules[h.name], h) for h in hooks):
        return run(call, AffineStepper(call, hooks, spec, per_sample), progress)


def hooked_copy(model: nn.Module, spec: Affine, affines: Params) -> nn.Module:
    """A copy of ``model`` that applies one sequence's affines ``{name: (C,)}`` for good."""
    clone = copy.deepcopy(model)
    modules = spec.modules(clone)
    fixed = {n: v.detach().unsqueeze(0) for n, v in affines.items()}
    for name, module in modules.items():
        if f"{name}.scale" in fixed:
            hook = _Hook(name, spec.channel_axis(module), None, 1, spec.shift, fixed)
            module.register_forward_hook(hook)
    return clone
