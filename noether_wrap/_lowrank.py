"""Exact per-sample tailoring of ``nn.Linear`` layers without per-sample weight copies.

For a linear layer ``z = W a + b`` used ``n`` times by one sequence's inner loss, the per-sample
gradient is ``dW = sum_s delta_s a_s^T`` and ``db = sum_s delta_s`` (``a_s`` the layer's input
at use ``s``, ``delta_s = dL/dz_s``). Because sequences are independent, ONE ``autograd.grad`` of
the summed per-sequence losses with respect to the recorded outputs ``z_s`` gives every
sequence's ``delta_s``. The adapted layer applied to a new input ``a'`` is then

    W a' + b - lr * sum_s delta_s (a_s^T a' + 1),

which costs ``O(batch * n * d)`` memory instead of a ``(batch, d_out, d_in)`` weight copy, and
stays differentiable for the outer loop. Where a layer is thin (``k * n >= min(d_in, d_out)``)
the dense per-sample update ``(batch, d_out, d_in)`` is cheaper, and is used instead.

The adapted layers act through forward hooks on the model's own ``nn.Linear`` modules, so the
wrapped model runs unchanged; the hooks live only for the duration of one forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from noether_wrap._func import InnerProblem, InnerResult

_NORM_EPS = 1e-12


class Unsupported(Exception):
    """The model does something the low-rank path cannot follow exactly; use vmap instead."""


def supported_layers(model: nn.Module, names: list[str]) -> dict[str, tuple[bool, bool]] | None:
    """Map each adapted ``nn.Linear``'s module name to ``(adapt weight, adapt bias)``.

    Returns None when some adapted parameter is not the weight or bias of an ``nn.Linear``.
    """
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = (
                module_name,
                module,
                param_name,
            )
    layers: dict[str, tuple[bool, bool]] = {}
    for name in names:
        module_name, module, param_name = owners[name]
        if type(module) is not nn.Linear:
            return None
        weight, bias = layers.get(module_name, (False, False))
        layers[module_name] = (weight or param_name == "weight", bias or param_name == "bias")
    return layers


class _Layer:
    """One adapted ``nn.Linear``: its accumulated per-sample update and this step's records."""

    def __init__(self, module: nn.Linear, weight: bool, bias: bool, batch: int) -> None:
        self.module = module
        self.weight = weight
        self.bias = bias
        self.batch = batch
        self.dense: bool | None = None  # decided after the first recorded step
        self.delta_w: Tensor | None = None  # (batch, d_out, d_in), dense mode
        self.delta_b: Tensor | None = None  # (batch, d_out), dense mode or bias-only
        self.rec_d: Tensor | None = None  # (batch, n, d_out), already scaled by -lr * clip
        self.rec_a: Tensor | None = None  # (batch, n, d_in)
        self.outputs: list[Tensor] = []
        self.inputs: list[Tensor] = []
        self.recording = False
        self.detach_inputs = False

    def hook(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        a = args[0]
        if a.dim() < 2 or a.shape[0] != self.batch:
            raise Unsupported(
                f"a tailored nn.Linear saw input shape {tuple(a.shape)}, whose first dim is not "
                f"the batch ({self.batch})"
            )
        flat = a.reshape(self.batch, -1, a.shape[-1])
        correction = self.correction(flat)
        if correction is not None:
            out = out + correction.reshape(out.shape)
        if self.recording:
            if not out.requires_grad:
                out = out.detach().requires_grad_()
            self.outputs.append(out)
            self.inputs.append(flat.detach() if self.detach_inputs else flat)
        return out

    def correction(self, a: Tensor) -> Tensor | None:
        """``(batch, m, d_in) -> (batch, m, d_out)``: the per-sample change of the output."""
        result: Tensor | None = None
        if self.delta_w is not None:
            result = torch.einsum("boi,bmi->bmo", self.delta_w, a)
        if self.delta_b is not None:
            db = self.delta_b.unsqueeze(1)
            result = db if result is None else result + db
        if self.rec_d is not None:
            assert self.rec_a is not None
            coef = torch.einsum("bni,bmi->bmn", self.rec_a, a)
            low = torch.bmm(coef, self.rec_d)
            if self.bias:
                low = low + self.rec_d.sum(1, keepdim=True)
            result = low if result is None else result + low
        return result

    def take_records(self) -> tuple[list[Tensor], list[Tensor]]:
        outputs, inputs = self.outputs, self.inputs
        self.outputs, self.inputs = [], []
        return outputs, inputs


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
    layer_spec: dict[str, tuple[bool, bool]],
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> InnerResult:
    """Per-sample tailoring of ``nn.Linear`` layers by recorded low-rank terms.

    Gives the same result as :func:`noether_wrap._func.tailor_per_sample` (to float tolerance)
    for models that treat the sequences of a batch independently and feed every adapted layer
    inputs with the batch at dim 0; raises :class:`Unsupported` when a layer sees another
    layout.
    """
    batch = inputs.shape[0]
    modules = dict(problem.model.named_modules())
    layers = [_Layer(modules[n], w, b, batch) for n, (w, b) in layer_spec.items()]
    detach = not problem.create_graph
    for layer in layers:
        layer.detach_inputs = detach
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
                flat_outputs = [z for outs, _ in records for z in outs]
                deltas = torch.autograd.grad(
                    loss.sum(),
                    flat_outputs,
                    create_graph=problem.create_graph,
                    retain_graph=problem.differentiable,
                    allow_unused=True,
                )
            problem.started = True
            if i == 0:
                initial = output
            losses.append(loss)
            ok = ok & torch.isfinite(loss)
            per_layer = _split(deltas, records, batch)
            scale = -problem.lr * _clip_scale(per_layer, layers, problem.max_grad_norm, batch)
            for layer, (d, a) in zip(layers, per_layer):
                ok = ok & torch.isfinite(d).flatten(1).all(1) & torch.isfinite(a).flatten(1).all(1)
                _accumulate(layer, d * scale.view(-1, 1, 1), a, problem.steps)
        problem.step_index = problem.steps
        assert initial is not None
        final_output = None
        if problem.predict is None or problem.need_final_loss:
            final_output = problem.rollout(empty, inputs, args, kwargs)
        prediction = (
            final_output
            if problem.predict is None
            else problem.prediction(empty, inputs, args, kwargs)
        )
        assert prediction is not None
        if problem.need_final_loss:
            assert final_output is not None
            losses.append(problem.loss(inputs, final_output))
            ok = ok & torch.isfinite(losses[-1])
    if problem.predict is not None:
        initial = problem.prediction(empty, inputs, args, kwargs)
    ok = ok & torch.isfinite(prediction).flatten(1).all(1)
    result = InnerResult(prediction, initial, torch.stack(losses, dim=-1), ok)
    if not problem.differentiable:
        result = result.detached()
    return result


def _split(
    deltas: tuple[Tensor | None, ...],
    records: list[tuple[list[Tensor], list[Tensor]]],
    batch: int,
) -> list[tuple[Tensor, Tensor]]:
    """Per layer: this step's ``delta`` ``(batch, n, d_out)`` and inputs ``(batch, n, d_in)``."""
    per_layer = []
    position = 0
    for outputs, inputs in records:
        ds = []
        for z in outputs:
            d = deltas[position]
            position += 1
            ds.append(torch.zeros_like(z) if d is None else d)
        if not ds:
            raise Unsupported("a tailored nn.Linear was not used by the rollout")
        d_out = ds[0].shape[-1]
        per_layer.append(
            (
                torch.cat([d.reshape(batch, -1, d_out) for d in ds], dim=1),
                torch.cat(inputs, dim=1),
            )
        )
    return per_layer


def _clip_scale(
    per_layer: list[tuple[Tensor, Tensor]],
    layers: list[_Layer],
    max_norm: float | None,
    batch: int,
) -> Tensor:
    """``(batch,)``: ``min(1, max_norm / ||grad_b||)``, the per-sample clip factor (1 if off)."""
    d0 = per_layer[0][0]
    if max_norm is None:
        return torch.ones(batch, dtype=d0.dtype, device=d0.device)
    sq = torch.zeros(batch, dtype=d0.dtype, device=d0.device)
    for layer, (d, a) in zip(layers, per_layer):
        if layer.weight:
            gram_d = torch.bmm(d, d.transpose(1, 2))
            gram_a = torch.bmm(a, a.transpose(1, 2))
            sq = sq + (gram_d * gram_a).sum(dim=(1, 2))
        if layer.bias:
            sq = sq + d.sum(1).pow(2).sum(1)
    return (max_norm / (sq.sqrt() + _NORM_EPS)).clamp(max=1.0)


def _accumulate(layer: _Layer, d: Tensor, a: Tensor, steps: int) -> None:
    """Fold one step's scaled ``d`` ``(batch, n, d_out)`` and ``a`` into the layer's update."""
    if layer.dense is None:
        d_out, d_in = layer.module.out_features, layer.module.in_features
        layer.dense = steps * d.shape[1] >= min(d_in, d_out)
    if not layer.weight:
        db = d.sum(1)
        layer.delta_b = db if layer.delta_b is None else layer.delta_b + db
        return
    if layer.dense:
        dw = torch.einsum("bno,bni->boi", d, a)
        layer.delta_w = dw if layer.delta_w is None else layer.delta_w + dw
        if layer.bias:
            db = d.sum(1)
            layer.delta_b = db if layer.delta_b is None else layer.delta_b + db
        return
    layer.rec_d = d if layer.rec_d is None else torch.cat([layer.rec_d, d], dim=1)
    layer.rec_a = a if layer.rec_a is None else torch.cat([layer.rec_a, a], dim=1)
