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
runs unchanged; the hooks live only for the duration of one forward pass. The loop's state is a
tuple of immutable per-layer :class:`Update` s, bound to the hooks before every rollout, so a
trial step (backtracking) is one more state, not a mutation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from noether_wrap._inner.call import (
    Call,
    HookedStepper,
    InnerResult,
    Params,
    Progress,
    forward_hooks,
    parameter_norm,
)
from noether_wrap._inner.loop import Gradient, run, warn_if_graphless

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


class Update(NamedTuple):
    """One layer's accumulated per-sample change: dense ``delta_w`` ``(batch, *W.shape)`` and
    ``delta_b`` ``(batch, d_out)``, and recorded low-rank terms ``rec_d`` ``(batch, n, d_out)``
    (already scaled by minus the step) with their inputs ``rec_a`` ``(batch, n, d_in)``."""

    delta_w: Tensor | None = None
    delta_b: Tensor | None = None
    rec_d: Tensor | None = None
    rec_a: Tensor | None = None


def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term


class _Layer:
    """One adapted layer: applies the bound :class:`Update` in its forward hook and records its
    uses while the stepper takes a gradient."""

    def __init__(self, module: nn.Module, weight: bool, bias: bool, batch: int) -> None:
        self.module = module
        self.weight = weight
        self.bias = bias
        self.batch = batch
        self.update = Update()
        self.outputs: list[Tensor | None] = []
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
            if out.requires_grad:
                self.outputs.append(out)
            elif torch.is_grad_enabled():  # a graph-free model: its loss cannot reach this use
                out = out.detach().requires_grad_()
                self.outputs.append(out)
            else:  # run under no_grad inside the model: no gradient reaches this layer here
                self.outputs.append(None)
            self.inputs.append(a.detach() if self.detach_inputs else a)
        return out

    def take_records(self) -> tuple[list[Tensor | None], list[Tensor]]:
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

    def gradient(
        self, deltas: list[Tensor], inputs: list[Tensor], steps: int, norm: bool
    ) -> tuple[Any, Tensor, Tensor]:
        """This step's per-sample gradient from the recorded uses: ``(direction, squared norm
        (batch,), finite (batch,))``; the norm is zeros unless ``norm`` asks for it."""
        raise NotImplementedError

    def stepped(self, update: Update, direction: Any, scale: Tensor) -> Update:
        """``update`` moved by ``-scale`` ``(batch,)`` times ``direction``."""
        raise NotImplementedError


def _rows(x: Tensor) -> Tensor:
    """``(batch, ..., d) -> (batch, rows, d)``: a linear layer's input or output as rows (a plain
    reshape: this runs at every use of every adapted layer, where einops' parsing shows)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _rows_finite(*tensors: Tensor | None) -> Tensor:
    flags = [torch.isfinite(t).flatten(1).all(1) for t in tensors if t is not None]
    return torch.stack(flags).all(0)


class _Linear(_Layer):
    """``nn.Linear``: recorded low-rank terms, or a dense update where the layer is thin."""

    def __init__(self, module: nn.Module, weight: bool, bias: bool, batch: int) -> None:
        super().__init__(module, weight, bias, batch)
        self.dense: bool | None = None

    def prepare_input(self, a: Tensor) -> Tensor:
        return _rows(a)  # (batch, uses, d_in)

    def add_correction(self, out: Tensor, correction: Tensor) -> Tensor:
        # correction: (batch, uses or 1, d_out); out: (batch, ..., d_out)
        flat = _rows(out)
        return (flat + correction).reshape(out.shape)

    def correction(self, a: Tensor) -> Tensor | None:
        u = self.update
        result: Tensor | None = None
        # One input row per sequence (a step model's state): broadcast products, one kernel each,
        # where a batched matmul would run one tiny product per sequence (CPU bmm loops over the
        # batch); several rows (a sequence model, conv positions) amortise bmm's loop.
        single = a.shape[1] == 1
        if u.delta_w is not None:
            if single:
                result = (u.delta_w * a).sum(-1).unsqueeze(1)
            else:
                result = torch.einsum("boi,bmi->bmo", u.delta_w, a)
        if u.delta_b is not None:
            result = _add(result, u.delta_b.unsqueeze(1))
        if u.rec_d is not None:
            assert u.rec_a is not None
            if single:
                coef = (u.rec_a * a).sum(-1, keepdim=True)  # (batch, n, 1)
                if self.bias:
                    coef = coef + 1
                low = (coef * u.rec_d).sum(1, keepdim=True)
            else:
                low = torch.bmm(torch.einsum("bni,bmi->bmn", u.rec_a, a), u.rec_d)
                if self.bias:
                    low = low + u.rec_d.sum(1, keepdim=True)
            result = _add(result, low)
        return result

    def gradient(
        self, deltas: list[Tensor], inputs: list[Tensor], steps: int, norm: bool
    ) -> tuple[Any, Tensor, Tensor]:
        d = torch.cat([_rows(x) for x in deltas], dim=1)
        a = torch.cat(inputs, dim=1)
        if self.dense is None:
            linear = self.module
            assert isinstance(linear, nn.Linear)
            self.dense = steps * d.shape[1] >= min(linear.in_features, linear.out_features)
        sq = torch.zeros(self.batch, dtype=d.dtype, device=d.device)
        if self.weight and norm:
            gram_d = torch.bmm(d, d.transpose(1, 2))
            gram_a = torch.bmm(a, a.transpose(1, 2))
            sq = sq + (gram_d * gram_a).sum(dim=(1, 2))
        if self.bias and norm:
            sq = sq + d.sum(1).pow(2).sum(1)
        return (d, a), sq, _rows_finite(d, a)

    def stepped(self, update: Update, direction: Any, scale: Tensor) -> Update:
        d, a = direction
        d = d * -scale.view(-1, 1, 1)
        if not self.weight:
            return update._replace(delta_b=_add(update.delta_b, d.sum(1)))
        if self.dense:
            delta_w = _add(update.delta_w, torch.einsum("bno,bni->boi", d, a))
            delta_b = _add(update.delta_b, d.sum(1)) if self.bias else update.delta_b
            return update._replace(delta_w=delta_w, delta_b=delta_b)
        rec_d = d if update.rec_d is None else torch.cat([update.rec_d, d], dim=1)
        rec_a = a if update.rec_a is None else torch.cat([update.rec_a, a], dim=1)
        return update._replace(rec_d=rec_d, rec_a=rec_a)


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

    def add_correction(self, out: Tensor, correction: Tensor) -> Tensor:
        # correction: like out, or (batch, out, 1[, 1]) for a bias alone
        return out + correction

    def prepare_input(self, a: Tensor) -> Tensor:
        a = a.unsqueeze(-2) if self.one_d else a
        if self.pad is not None:
            a = F.pad(a, self.pad, mode=self.mode)
        return a

    def correction(self, a: Tensor) -> Tensor | None:
        u = self.update
        result: Tensor | None = None
        if u.delta_w is not None:
            b, c = a.shape[:2]
            w = u.delta_w.reshape(-1, c, *self.kernel)
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
        if u.delta_b is not None:
            db = u.delta_b.reshape(*u.delta_b.shape, 1, 1)
            result = db if result is None else result + db
        if result is not None and self.one_d:
            result = result.squeeze(-2)
        return result

    def gradient(
        self, deltas: list[Tensor], inputs: list[Tensor], steps: int, norm: bool
    ) -> tuple[Any, Tensor, Tensor]:
        dw: Tensor | None = None  # (batch, out, in * kh * kw)
        db: Tensor | None = None  # (batch, out)
        for d, a in zip(deltas, inputs):
            d = rearrange(d, "batch out ... -> batch out (...)")  # (batch, out, positions)
            if self.weight:
                cols = F.unfold(a, self.kernel, self.dilation, self.padding, self.stride)
                dw = _add(dw, torch.bmm(d, cols.transpose(1, 2)))
            if self.bias:
                db = _add(db, d.sum(-1))
        sq = torch.zeros(self.batch, dtype=deltas[0].dtype, device=deltas[0].device)
        if dw is not None and norm:
            sq = sq + dw.pow(2).sum(dim=(1, 2))
        if db is not None and norm:
            sq = sq + db.pow(2).sum(1)
        return (dw, db), sq, _rows_finite(dw, db)

    def stepped(self, update: Update, direction: Any, scale: Tensor) -> Update:
        dw, db = direction
        if dw is not None:
            update = update._replace(delta_w=_add(update.delta_w, dw * -scale.view(-1, 1, 1)))
        if db is not None:
            update = update._replace(delta_b=_add(update.delta_b, db * -scale.view(-1, 1)))
        return update


LowRankState = tuple[Update, ...]


class LowRankStepper(HookedStepper):
    """Steps per-sample layer updates (:class:`Update`, one per adapted layer); one row per
    sequence. The model's parameters are not swapped: the hooks add each update's correction."""

    per_row = True

    def __init__(self, call: Call, layers: list[_Layer], params: Params) -> None:
        self.call = call
        self.layers = layers
        self.initial = params
        self._size: Tensor | None = None

    def start(self) -> LowRankState:
        return tuple(Update() for _ in self.layers)

    def bind(self, state: LowRankState) -> None:
        for layer, update in zip(self.layers, state):
            layer.update = update

    def _recording(self, on: bool) -> None:
        for layer in self.layers:
            layer.recording = on

    def gradient(self, state: LowRankState) -> Gradient[LowRankState]:
        call = self.call
        self._recording(True)
        try:
            with torch.enable_grad():
                output = self.rollout(state)
                loss = call.noether_loss(output)
        finally:
            self._recording(False)
        records = [layer.take_records() for layer in self.layers]
        if any(not ins for _, ins in records):
            raise Unsupported("a tailored layer was not used by the rollout")
        flat = [z for outs, _ in records for z in outs if z is not None]
        found: tuple[Tensor | None, ...] = ()
        if flat and loss.requires_grad:
            with torch.enable_grad():
                found = torch.autograd.grad(
                    loss.sum(),
                    flat,
                    create_graph=call.create_graph,
                    retain_graph=call.keeps_graphs,
                    allow_unused=True,
                )
            warn_if_graphless(call, found)
        grads = iter(found)
        directions: list[Any] = []
        squared, finite = torch.zeros_like(loss), torch.isfinite(loss)
        for layer, (outs, ins) in zip(self.layers, records):
            # uses that the loss does not reach (past `inner_horizon`, under no_grad) add nothing
            pairs = [(None if z is None else next(grads, None), a) for z, a in zip(outs, ins)]
            used = [(g, a) for g, a in pairs if g is not None]
            if not used:  # no gradient reaches this layer: it does not move
                directions.append(None)
                continue
            direction, sq, ok = layer.gradient(
                [g for g, _ in used], [a for _, a in used], call.steps, call.needs_norm
            )
            directions.append(direction)
            squared = squared + sq
            finite = finite & ok
        return Gradient(state, output, loss, tuple(directions), squared, finite)

    def step(self, state: LowRankState, direction: Any, scale: Tensor) -> LowRankState:
        return tuple(
            update if d is None else layer.stepped(update, d, scale)
            for layer, update, d in zip(self.layers, state, direction)
        )

    def params(self, state: LowRankState) -> None:
        return None

    def size(self, point: LowRankState) -> Tensor:
        if self._size is None:
            self._size = parameter_norm(self.initial)
        return self._size


def tailor_lowrank(
    call: Call,
    params: Params,
    progress: Progress,
    *,
    layer_spec: dict[str, tuple[bool, bool]],
) -> InnerResult:
    """Per-sample tailoring of linear and conv layers by recorded terms and dense updates
    (``params``, the adapted parameters, act through ``layer_spec``'s modules, unswapped).

    Gives the same result as the ``vmap`` path (to float tolerance) for models that treat the
    sequences of a batch independently and feed every adapted layer inputs with the batch at
    dim 0; raises :class:`Unsupported` when a layer sees another layout.
    """
    batch = call.batch
    modules = dict(call.model.named_modules())
    layers: list[_Layer] = [
        (_Linear if type(modules[n]) is nn.Linear else _Conv)(modules[n], w, b, batch)
        for n, (w, b) in layer_spec.items()
    ]
    for layer in layers:
        layer.detach_inputs = not call.create_graph
    with forward_hooks((layer.module, layer.hook) for layer in layers):
        return run(call, LowRankStepper(call, layers, params), progress)
