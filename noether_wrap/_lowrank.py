"""Exact per-sample tailoring of ``nn.Linear`` and ``nn.Conv1d/2d`` layers without vmap.

For a linear layer ``z = W a + b`` used ``n`` times by one sequence's inner loss, the per-sample
gradient is ``dW = sum_s delta_s a_s^T`` and ``db = sum_s delta_s`` (``a_s`` the layer's input
at use ``s``, ``delta_s = dL/dz_s``). Because sequences are independent, ONE ``autograd.grad`` of
the summed per-sequence losses with respect to the recorded outputs ``z_s`` gives every
sequence's ``delta_s``. The adapted layer applied to a new input ``a'`` is then

    W a' + b - lr * sum_s delta_s (a_s^T a' + 1),

which costs ``O(batch * n * d)`` memory instead of a ``(batch, d_out, d_in)`` weight copy, and
stays differentiable for the outer loop. Where a layer is thin (``k * n >= min(d_in, d_out)``)
the dense per-sample update ``(batch, d_out, d_in)`` is cheaper, and is used instead.

A convolution is a linear layer applied at every position of its unfolded input, so the same
algebra gives its per-sample weight gradient ``sum_s delta_s unfold(a_s)^T``; conv weights are
small, so the update is kept dense and applied as one grouped convolution over the batch.

The adapted layers act through forward hooks on the model's own modules, so the wrapped model
runs unchanged; the hooks live only for the duration of one forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from noether_wrap._func import (
    InnerProblem,
    InnerResult,
    clip_scale,
    final_prediction,
    warn_if_graphless,
)

_CONVS = (nn.Conv1d, nn.Conv2d)


class Unsupported(Exception):
    """The model does something the low-rank path cannot follow exactly; use vmap instead."""


def supported_layers(model: nn.Module, names: list[str]) -> dict[str, tuple[bool, bool]] | None:
    """Map each adapted layer's module name to ``(adapt weight, adapt bias)``.

    Returns None when some adapted parameter is not the weight or bias of an ``nn.Linear`` or of
    an ungrouped ``nn.Conv1d``/``nn.Conv2d``.
    """
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owners[full] = (module_name, module, param_name)
    layers: dict[str, tuple[bool, bool]] = {}
    for name in names:
        module_name, module, param_name = owners[name]
        linear = type(module) is nn.Linear
        conv = type(module) in _CONVS and getattr(module, "groups", 0) == 1
        if not (linear or conv):
            return None
        weight, bias = layers.get(module_name, (False, False))
        layers[module_name] = (weight or param_name == "weight", bias or param_name == "bias")
    return layers


class _Layer:
    """One adapted layer: its accumulated per-sample update and this step's records."""

    def __init__(self, module: nn.Module, weight: bool, bias: bool, batch: int) -> None:
        self.module = module
        self.weight = weight
        self.bias = bias
        self.batch = batch
        self.delta_w: Tensor | None = None  # dense per-sample weight update, (batch, *W.shape)
        self.delta_b: Tensor | None = None  # (batch, d_out)
        self.outputs: list[Tensor] = []
        self.inputs: list[Tensor] = []
        self.recording = False
        self.detach_inputs = False

    def hook(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        a = args[0]
        if a.dim() < 2 or a.shape[0] != self.batch:
            raise Unsupported(
                f"a tailored {type(module).__name__} saw input shape {tuple(a.shape)}, whose first "
                f"dim is not the batch ({self.batch})"
            )
        a = self.prepare_input(a)
        correction = self.correction(a)
        if correction is not None:
            out = self.add_correction(out, correction)
        if self.recording:
            if not out.requires_grad:
                out = out.detach().requires_grad_()
            self.outputs.append(out)
            self.inputs.append(a.detach() if self.detach_inputs else a)
        return out

    def take_records(self) -> tuple[list[Tensor], list[Tensor]]:
        outputs, inputs = self.outputs, self.inputs
        self.outputs, self.inputs = [], []
        return outputs, inputs

    def prepare_input(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def correction(self, a: Tensor) -> Tensor | None:
        raise NotImplementedError

    def add_correction(self, out: Tensor, correction: Tensor) -> Tensor:
        """``out`` plus the adapted weights' correction (which may broadcast: a bias alone)."""
        raise NotImplementedError

    def step_gradient(self, deltas: list[Tensor], inputs: list[Tensor], steps: int) -> Tensor:
        """Take this step's per-sample gradient; return its squared norm ``(batch,)``."""
        raise NotImplementedError

    def apply_step(self, scale: Tensor) -> None:
        """Add ``scale`` ``(batch,)`` times this step's gradient to the layer's update."""
        raise NotImplementedError

    def step_finite(self) -> Tensor:
        """``(batch,)``: whether this step's gradient is finite."""
        raise NotImplementedError


def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term


class _Linear(_Layer):
    """``nn.Linear``: recorded low-rank terms, or a dense update where the layer is thin."""

    def __init__(self, module: nn.Module, weight: bool, bias: bool, batch: int) -> None:
        super().__init__(module, weight, bias, batch)
        self.dense: bool | None = None
        self.rec_d: Tensor | None = None  # (batch, n, d_out), scaled by -lr * clip
        self.rec_a: Tensor | None = None  # (batch, n, d_in)
        self.d: Tensor | None = None  # this step's deltas (batch, n, d_out)
        self.a: Tensor | None = None  # this step's inputs (batch, n, d_in)

    def prepare_input(self, a: Tensor) -> Tensor:
        return a.reshape(self.batch, -1, a.shape[-1])

    def add_correction(self, out: Tensor, correction: Tensor) -> Tensor:
        # correction: (batch, uses or 1, d_out); out: (batch, ..., d_out)
        return (out.reshape(self.batch, -1, out.shape[-1]) + correction).reshape(out.shape)

    def correction(self, a: Tensor) -> Tensor | None:
        result: Tensor | None = None
        if self.delta_w is not None:
            result = torch.einsum("boi,bmi->bmo", self.delta_w, a)
        if self.delta_b is not None:
            result = _add(result, self.delta_b.unsqueeze(1))
        if self.rec_d is not None:
            assert self.rec_a is not None
            low = torch.bmm(torch.einsum("bni,bmi->bmn", self.rec_a, a), self.rec_d)
            if self.bias:
                low = low + self.rec_d.sum(1, keepdim=True)
            result = _add(result, low)
        return result

    def step_gradient(self, deltas: list[Tensor], inputs: list[Tensor], steps: int) -> Tensor:
        d_out = deltas[0].shape[-1]
        self.d = torch.cat([d.reshape(self.batch, -1, d_out) for d in deltas], dim=1)
        self.a = torch.cat(inputs, dim=1)
        if self.dense is None:
            linear = self.module
            assert isinstance(linear, nn.Linear)
            self.dense = steps * self.d.shape[1] >= min(linear.in_features, linear.out_features)
        sq = torch.zeros(self.batch, dtype=self.d.dtype, device=self.d.device)
        if self.weight:
            gram_d = torch.bmm(self.d, self.d.transpose(1, 2))
            gram_a = torch.bmm(self.a, self.a.transpose(1, 2))
            sq = sq + (gram_d * gram_a).sum(dim=(1, 2))
        if self.bias:
            sq = sq + self.d.sum(1).pow(2).sum(1)
        return sq

    def step_finite(self) -> Tensor:
        assert self.d is not None and self.a is not None
        return torch.isfinite(self.d).flatten(1).all(1) & torch.isfinite(self.a).flatten(1).all(1)

    def apply_step(self, scale: Tensor) -> None:
        assert self.d is not None and self.a is not None
        d, a = self.d * scale.view(-1, 1, 1), self.a
        self.d = self.a = None
        if not self.weight:
            self.delta_b = _add(self.delta_b, d.sum(1))
        elif self.dense:
            self.delta_w = _add(self.delta_w, torch.einsum("bno,bni->boi", d, a))
            if self.bias:
                self.delta_b = _add(self.delta_b, d.sum(1))
        else:
            self.rec_d = d if self.rec_d is None else torch.cat([self.rec_d, d], dim=1)
            self.rec_a = a if self.rec_a is None else torch.cat([self.rec_a, a], dim=1)


class _Conv(_Layer):
    """``nn.Conv1d``/``nn.Conv2d`` (groups 1): a dense per-sample update from unfolded inputs,
    applied as one grouped convolution over the batch. Conv1d runs as a height-1 Conv2d."""

    def __init__(self, module: nn.Module, weight: bool, bias: bool, batch: int) -> None:
        super().__init__(module, weight, bias, batch)
        conv = module
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d))
        self.one_d = isinstance(conv, nn.Conv1d)
        one_d = self.one_d

        def pair(v: Any, height: int) -> tuple[int, ...]:
            """Conv2d's (height, width) for a Conv1d value, whose height-1 axis takes
            ``height`` (1 for kernel, stride and dilation; 0 for padding)."""
            return (height, int(v[0])) if one_d else tuple(int(x) for x in v)

        self.kernel = pair(conv.kernel_size, 1)
        self.stride = pair(conv.stride, 1)
        self.dilation = pair(conv.dilation, 1)
        if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            self.padding = pair(conv.padding, 0)
            self.pad: tuple[int, ...] | None = None
        else:
            if isinstance(conv.padding, str):
                raise Unsupported(f"string padding {conv.padding!r} of a tailored convolution")
            self.padding = (0, 0)
            self.pad = tuple(conv._reversed_padding_repeated_twice)
            if self.one_d:
                self.pad = (*self.pad, 0, 0)
        self.mode = conv.padding_mode
        self.dw: Tensor | None = None  # this step's (batch, out, in * kh * kw)
        self.db: Tensor | None = None  # this step's (batch, out)

    def add_correction(self, out: Tensor, correction: Tensor) -> Tensor:
        # correction: like out, or (batch, out, 1[, 1]) for a bias alone
        return out + correction

    def prepare_input(self, a: Tensor) -> Tensor:
        a = a.unsqueeze(-2) if self.one_d else a
        if self.pad is not None:
            a = F.pad(a, self.pad, mode=self.mode)
        return a

    def correction(self, a: Tensor) -> Tensor | None:
        result: Tensor | None = None
        if self.delta_w is not None:
            b, c = a.shape[:2]
            w = self.delta_w.reshape(-1, c, *self.kernel)
            out = F.conv2d(
                a.reshape(1, b * c, *a.shape[2:]),
                w,
                None,
                self.stride,
                self.padding,
                self.dilation,
                groups=b,
            )
            result = out.reshape(b, -1, *out.shape[2:])
        if self.delta_b is not None:
            db = self.delta_b.reshape(*self.delta_b.shape, 1, 1)
            result = db if result is None else result + db
        if result is not None and self.one_d:
            result = result.squeeze(-2)
        return result

    def step_gradient(self, deltas: list[Tensor], inputs: list[Tensor], steps: int) -> Tensor:
        dw: Tensor | None = None
        db: Tensor | None = None
        for d, a in zip(deltas, inputs):
            d = d.reshape(self.batch, d.shape[1], -1)  # (batch, out, positions)
            if self.weight:
                cols = F.unfold(a, self.kernel, self.dilation, self.padding, self.stride)
                dw = _add(dw, torch.bmm(d, cols.transpose(1, 2)))
            if self.bias:
                db = _add(db, d.sum(-1))
        self.dw, self.db = dw, db
        sq = torch.zeros(self.batch, dtype=deltas[0].dtype, device=deltas[0].device)
        if dw is not None:
            sq = sq + dw.pow(2).sum(dim=(1, 2))
        if db is not None:
            sq = sq + db.pow(2).sum(1)
        return sq

    def step_finite(self) -> Tensor:
        ok = torch.ones(self.batch, dtype=torch.bool)
        for t in (self.dw, self.db):
            if t is not None:
                ok = ok.to(t.device) & torch.isfinite(t).flatten(1).all(1)
        return ok

    def apply_step(self, scale: Tensor) -> None:
        if self.dw is not None:
            self.delta_w = _add(self.delta_w, self.dw * scale.view(-1, 1, 1))
        if self.db is not None:
            self.delta_b = _add(self.delta_b, self.db * scale.view(-1, 1))
        self.dw = self.db = None


@contextlib.contextmanager
def _hooked(layers: list[_Layer]) -> Iterator[None]:
    handles = [layer.module.register_forward_hook(layer.hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _set_recording(layers: list[_Layer], on: bool) -> None:
    for layer in layers:
        layer.recording = on


def tailor_lowrank(
    problem: InnerProblem,
    params: dict[str, Tensor],
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    layer_spec: dict[str, tuple[bool, bool]],
) -> InnerResult:
    """Per-sample tailoring of linear and conv layers by recorded terms and dense updates
    (``params``, the adapted parameters, act through ``layer_spec``'s modules, unswapped).

    Gives the same result as :func:`noether_wrap._func.tailor_per_sample` (to float tolerance)
    for models that treat the sequences of a batch independently and feed every adapted layer
    inputs with the batch at dim 0; raises :class:`Unsupported` when a layer sees another
    layout.
    """
    batch = inputs.shape[0]
    modules = dict(problem.model.named_modules())
    layers: list[_Layer] = [
        (_Linear if type(modules[n]) is nn.Linear else _Conv)(modules[n], w, b, batch)
        for n, (w, b) in layer_spec.items()
    ]
    for layer in layers:
        layer.detach_inputs = not problem.create_graph
    empty: dict[str, Tensor] = {}
    losses: list[Tensor] = []
    ok = torch.ones(batch, dtype=torch.bool, device=inputs.device)
    initial: Tensor | None = None
    with _hooked(layers):
        for i in range(problem.steps):
            problem.step_index = i
            _set_recording(layers, True)
            with torch.enable_grad():
                output = problem.rollout(empty, inputs, args, kwargs)
                loss = problem.loss(inputs, output)
                _set_recording(layers, False)
                records = [layer.take_records() for layer in layers]
                if any(not outs for outs, _ in records):
                    raise Unsupported("a tailored layer was not used by the rollout")
                flat_outputs = [z for outs, _ in records for z in outs]
                grads = torch.autograd.grad(
                    loss.sum(),
                    flat_outputs,
                    create_graph=problem.create_graph,
                    retain_graph=problem.keeps_graphs,
                    allow_unused=True,
                )
                warn_if_graphless(problem, grads)
            problem.started = True
            if i == 0:
                initial = output
            losses.append(loss)
            ok = ok & torch.isfinite(loss)
            sq = torch.zeros(batch, dtype=loss.dtype, device=loss.device)
            position = 0
            for layer, (outs, ins) in zip(layers, records):
                mine = grads[position : position + len(outs)]
                position += len(outs)
                # uses that the loss does not reach (past `inner_horizon`) add nothing: skip them
                used = [(g, a) for g, a in zip(mine, ins) if g is not None]
                if not used:
                    used = [(torch.zeros_like(outs[0]), ins[0])]
                sq = sq + layer.step_gradient(
                    [g for g, _ in used], [a for _, a in used], problem.steps
                )
                ok = ok & layer.step_finite()
            scale = -problem.lr * torch.ones_like(sq)
            if problem.max_grad_norm is not None:
                scale = scale * clip_scale(sq, problem.max_grad_norm)
            for layer in layers:
                layer.apply_step(scale)
        problem.step_index = problem.steps
        assert initial is not None
        prediction, final_loss = final_prediction(problem, empty, inputs, args, kwargs)
        losses.append(final_loss)
        ok = ok & torch.isfinite(final_loss)
    if problem.predict is not None:  # outside the hooks: the untailored prediction
        initial = problem.prediction(empty, inputs, args, kwargs)
    ok = ok & torch.isfinite(prediction).flatten(1).all(1)
    result = InnerResult(prediction, initial, torch.stack(losses, dim=-1), ok)
    if not problem.differentiable:
        result = result.detached()
    return result
