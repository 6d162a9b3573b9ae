"""Exact per-sample tailoring of ``nn.Linear`` and ``nn.Conv1d/2d`` layers without vmap.

For a linear layer ``z = W a + b`` used ``n`` times by one sequence's inner loss, the per-sample
gradient is ``dW = sum_s delta_s a_s^T`` and ``db = sum_s delta_s`` (``a_s`` the layer's input
at use ``s``, ``delta_s = dL/dz_s``). Because sequences are independent, ONE ``autograd.grad`` of
the summed per-sequence losses with respect to the recorded outputs ``z_s`` gives every
sequence's ``delta_s``. The adapted layer applied to a new input ``a'`` is then

    W a' + b - lr * sum_s delta_s (a_s^T a' + 1),

which costs ``O(batch * n * d)`` memory instead of a ``(batch, d_out, d_in)`` weight copy, and
stays differentiable for the outer loop. Where applying the dense per-sample update
``(batch, d_out, d_in)`` costs no more per row (:func:`dense_is_cheaper`), it is used instead.

Either form is applied by batched matmuls in one :class:`_Correct` per use. Its backward gives
the use's input gradient and leaves the rest on a :class:`_Tape`; :class:`_Hub`, a token that
every use of one update reads, runs after all of them and gathers the update's outer gradient by
one batched matmul over all uses (instead of one outer product plus one accumulation per use).

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
        out = self.corrected(out, a)
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

    def bind(self, update: Update) -> None:
        self.update = update

    def forget_uses(self) -> None:
        """Nothing to forget: only :class:`_Linear` keeps a tape."""

    def take_records(self) -> tuple[list[Tensor | None], list[Tensor]]:
        outputs, inputs = self.outputs, self.inputs
        self.outputs, self.inputs = [], []
        return outputs, inputs

    def prepare_input(self, a: Tensor) -> Tensor:
        raise NotImplementedError

    def corrected(self, out: Tensor, a: Tensor) -> Tensor:
        """The layer's plain output ``out`` with the bound update's correction for the
        prepared input ``a`` added."""
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
    """``(batch, ..., d) -> (batch, rows, d)``: a linear layer's input or output as rows (no
    einops: this runs at every use of every adapted layer, where its parsing shows)."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])


def _rows_finite(*tensors: Tensor | None) -> Tensor:
    """``(batch,)``: True where every value of the sequence's rows is finite. Read from one sum
    per sequence (a NaN or infinity anywhere makes it non-finite; so would a sum that overflows,
    a conservative false alarm), one pass where ``isfinite`` takes three."""
    total: Tensor | None = None
    for t in tensors:
        if t is not None:
            total = _add(total, t.flatten(1).sum(1))
    assert total is not None
    return torch.isfinite(total)


def dense_is_cheaper(uses: int, d_in: int, d_out: int) -> bool:
    """The rule that picks a linear layer's form: dense where applying it costs no more.

    Applied to one input row, a dense update ``(d_out, d_in)`` costs ``d_in * d_out``
    multiply-adds; ``uses`` recorded terms (every use of every inner step so far) cost
    ``uses * (d_in + d_out)``, and their outer gradient as much again. So thin layers, and layers
    used many times (an MLP vector field inside RK4: four uses per time step), go dense.
    """
    return uses * (d_in + d_out) >= d_in * d_out


class _Tape:
    """One adapted layer's uses in the rollouts that read one :class:`Update`, for the outer
    gradient of that update: each use's backward leaves ``(grad of its output, its input, grad
    of its recorded coefficients)`` here, and :class:`_Hub`'s backward, which autograd runs after
    all of them, turns them into the update's gradient by one batched matmul per tensor,
    instead of one outer product plus one accumulation per use."""

    __slots__ = ("uses",)

    def __init__(self) -> None:
        self.uses: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def take(self) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        uses, self.uses = self.uses, []
        return uses


class _Hub(torch.autograd.Function):
    """A scalar token that every use of an :class:`Update` reads; its backward gathers the
    update's gradient from the :class:`_Tape` once all uses have left theirs (inputs: the tape,
    ``bias``, then the update's ``delta_w`` ``(batch, out, in)``, ``delta_b`` ``(batch, out)``,
    ``rec_a`` ``(batch, n, in)`` and ``rec_d`` ``(batch, n, out)``, each possibly None)."""

    @staticmethod
    def forward(
        ctx: Any,
        tape: _Tape,
        bias: bool,
        delta_w: Tensor | None,
        delta_b: Tensor | None,
        rec_a: Tensor | None,
        rec_d: Tensor | None,
    ) -> Tensor:
        ctx.tape, ctx.bias, ctx.has_b = tape, bias, delta_b is not None
        ctx.dtype = next(t for t in (delta_w, delta_b, rec_a) if t is not None).dtype
        ctx.save_for_backward(delta_w, rec_a)
        like = next(t for t in (delta_w, delta_b, rec_a) if t is not None)
        return like.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _: Tensor) -> tuple[Tensor | None, ...]:
        delta_w, rec_a = ctx.saved_tensors
        uses = ctx.tape.take()
        if not uses:
            return None, None, None, None, None, None
        dtype = ctx.dtype  # the update's (under autocast the uses ran in a lower precision)
        g = torch.cat([u[0].to(dtype) for u in uses], dim=1)  # (batch, rows, out)
        a = torch.cat([u[1].to(dtype) for u in uses], dim=1)  # (batch, rows, in)
        grad_w = grad_b = grad_ra = grad_rd = None
        if delta_w is not None:
            grad_w = torch.bmm(g.transpose(1, 2), a)
        if ctx.has_b:
            grad_b = g.sum(1)
        if rec_a is not None:
            coef = torch.bmm(a, rec_a.transpose(1, 2))  # (batch, rows, n), recomputed: cheap,
            if ctx.bias:  # and differentiable where this backward is itself differentiated
                coef = coef + 1
            grad_c = torch.cat([u[2].to(dtype) for u in uses], dim=1)  # (batch, rows, n)
            grad_rd = torch.bmm(coef.transpose(1, 2), g)
            grad_ra = torch.bmm(grad_c.transpose(1, 2), a)
        return None, None, grad_w, grad_b, grad_ra, grad_rd


class _Correct(torch.autograd.Function):
    """One use of an adapted linear layer: its plain output ``out`` plus the update's
    correction ``a dW^T + db + (a A^T [+ 1]) D`` ``(batch, rows, out)``, for input rows ``a``
    ``(batch, rows, in)``. Its backward passes ``out``'s gradient through, gives ``a``'s, and
    leaves the update's to the :class:`_Tape` (the update's tensors get theirs through the
    ``token`` of :class:`_Hub`). Written with differentiable operations only, so an inner step's
    gradient through it can itself be differentiated (``inner_steps >= 2``)."""

    @staticmethod
    def forward(
        ctx: Any,
        token: Tensor,
        out: Tensor,
        a: Tensor,
        tape: _Tape,
        bias: bool,
        delta_w: Tensor | None,
        delta_b: Tensor | None,
        rec_a: Tensor | None,
        rec_d: Tensor | None,
    ) -> Tensor:
        dtype = out.dtype  # under autocast, the layer's lower precision: the correction's too
        x = a.to(dtype)
        if delta_w is not None:
            out = torch.baddbmm(out, x, delta_w.to(dtype).transpose(1, 2))
        if delta_b is not None:
            out = out + delta_b.to(dtype).unsqueeze(1)
        if rec_a is not None:
            assert rec_d is not None
            coef = torch.bmm(x, rec_a.to(dtype).transpose(1, 2))
            if bias:
                coef = coef + 1
            out = torch.baddbmm(out, coef, rec_d.to(dtype))
        ctx.tape = tape
        ctx.save_for_backward(a, delta_w, rec_a, rec_d)
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        a, delta_w, rec_a, rec_d = ctx.saved_tensors
        dtype = g.dtype
        grad_a: Tensor | None = None
        grad_c: Tensor | None = None
        if delta_w is not None:
            grad_a = torch.bmm(g, delta_w.to(dtype))
        if rec_a is not None:
            grad_c = torch.bmm(g, rec_d.to(dtype).transpose(1, 2))  # (batch, rows, n)
            term = torch.bmm(grad_c, rec_a.to(dtype))
            grad_a = term if grad_a is None else grad_a + term
        ctx.tape.uses.append((g, a, grad_c))
        return None, g, None if grad_a is None else grad_a.to(a.dtype), *(None,) * 6


class _Linear(_Layer):
    """``nn.Linear``: a dense update or recorded low-rank terms, whichever
    :func:`dense_is_cheaper` picks, applied by batched matmuls in one :class:`_Correct` per use,
    its outer gradient gathered once per update by :class:`_Hub`."""

    def __init__(self, module: nn.Module, weight: bool, bias: bool, batch: int) -> None:
        super().__init__(module, weight, bias, batch)
        self.dense: bool | None = None
        self.token: Tensor | None = None
        self.tape = _Tape()

    def bind(self, update: Update) -> None:
        self.update = update
        self.token = None
        self.tape = _Tape()

    def forget_uses(self) -> None:
        """Drop what the uses' backwards left on the tape when autograd was asked for the
        recorded outputs' gradients only (the inner step), so the hub never ran."""
        self.tape.uses.clear()

    def prepare_input(self, a: Tensor) -> Tensor:
        return _rows(a)  # (batch, uses, d_in)

    def corrected(self, out: Tensor, a: Tensor) -> Tensor:
        u = self.update
        if u.delta_w is None and u.delta_b is None and u.rec_d is None:
            return out
        if self.token is None:
            self.token = _Hub.apply(  # type: ignore[no-untyped-call]
                self.tape, self.bias, u.delta_w, u.delta_b, u.rec_a, u.rec_d
            )
        flat: Tensor = _Correct.apply(  # type: ignore[no-untyped-call]
            self.token, _rows(out), a, self.tape, self.bias, u.delta_w, u.delta_b, u.rec_a,
            u.rec_d,
        )  # fmt: skip
        return flat if flat.dim() == out.dim() else flat.view(out.shape)

    def gradient(
        self, deltas: list[Tensor], inputs: list[Tensor], steps: int, norm: bool
    ) -> tuple[Any, Tensor, Tensor]:
        d = torch.cat([_rows(x) for x in deltas], dim=1)
        a = torch.cat(inputs, dim=1)
        if self.dense is None:
            linear = self.module
            assert isinstance(linear, nn.Linear)
            self.dense = dense_is_cheaper(
                steps * d.shape[1], linear.in_features, linear.out_features
            )
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
            delta_w = _add(update.delta_w, torch.bmm(d.transpose(1, 2), a))
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

    def corrected(self, out: Tensor, a: Tensor) -> Tensor:
        correction = self.correction(a)  # like out, or (batch, out, 1[, 1]) for a bias alone
        return out if correction is None else out + correction

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
            layer.bind(update)

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
            for layer in self.layers:
                layer.forget_uses()
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
