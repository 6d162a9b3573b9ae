"""Running one tailoring call: the path, its fallbacks, non-finite recovery, errors that say what
to do, and the warnings a user must see. :class:`~noether_wrap.NoetherWrapper` is a facade over
:func:`run_call`; the steps themselves are :mod:`noether_wrap._inner`'s one loop.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from noether_wrap import _inner
from noether_wrap._inner import Affine, Call, InnerResult, Params, Progress, hooked_copy
from noether_wrap._options import Options
from noether_wrap._warn import warn
from noether_wrap.loss import as_reference_frames, per_sequence_noether_loss

if TYPE_CHECKING:
    from noether_wrap.wrapper import NoetherWrapper, TailorOutput

Runner = Callable[[Call, Params, Progress], InnerResult]

#: A tailored Noether loss this many times the untailored one counts as a diverged step.
DIVERGED = 1e3


class PathUnsupported(ValueError):
    """The model runs, but the chosen per-sample path cannot tailor it (no vmap rule, ...)."""


def noether_loss_fn(options: Options, embedding: Callable[[Tensor], Tensor]) -> _inner.call.LossFn:
    """``(inputs, output) -> (batch,)``: each sequence's Noether loss of ``output = model(inputs)``
    under ``options`` (time axis, horizon, reference, window, form, distance)."""

    def loss(inputs: Tensor, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(f"`model` must return a Tensor, got {type(output).__name__}.")
        time_dim = options.time_dim
        if output.dim() < 3 or output.dim() <= time_dim:
            raise ValueError(
                f"`model` output must have a time axis: (batch, T, *state) with time at "
                f"`time_dim` (={time_dim}) and at least one state axis; got shape "
                f"{tuple(output.shape)}. Wrap a one-step model in Rollout, or use shape "
                "(batch, T, 1) for a scalar series."
            )
        predictions = output.movedim(time_dim, 1)
        if options.inner_horizon is not None:
            predictions = predictions[:, : options.inner_horizon]
        if options.reference is not None:
            x0 = options.reference(inputs)
        elif inputs.dim() == output.dim():
            x0 = inputs.movedim(time_dim, 1)
        else:
            x0 = inputs
        try:
            frames = as_reference_frames(x0, predictions, time_dim)
        except ValueError as error:
            raise ValueError(
                f"`model` output and its reference disagree: {error} Pass `reference` "
                "(inputs -> x0) when `inputs` is not the state itself."
            ) from None
        if frames.shape[1] < options.window:
            raise ValueError(
                f"the reference must provide at least `window` (={options.window}) frames, got "
                f"{frames.shape[1]}; pass inputs with a time axis or a `reference`."
            )
        return per_sequence_noether_loss(
            frames, predictions, embedding, options.loss_form, options.distance, options.window
        )

    return loss


@torch.compiler.disable  # type: ignore[untyped-decorator]
def run_call(
    net: NoetherWrapper,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    steps: int,
    need_final_loss: bool,
    materialise: bool = False,
    forward: bool = False,
) -> InnerResult:
    """Run ``steps`` inner steps for ``inputs`` on the path that applies, outside inference mode
    (inference tensors cannot enter autograd, and the inner steps need it).

    ``materialise`` asks for a path that returns the adapted weights; ``forward`` marks a
    prediction call, which updates the model's buffers as one unwrapped call would and warns
    about diverged steps. Records the path in ``net.last_path``.

    Runs eagerly under ``torch.compile`` (a graph break): compiling one wrapper and then another
    of different options returned the first one's tailoring (measured in torch 2.13: a second,
    per-sample wrapper came out 0.057 off its eager output), so tailoring stays out of compiled
    graphs; the model's own compiled calls elsewhere are unaffected.
    """
    inference = torch.is_inference_mode_enabled()
    with contextlib.ExitStack() as stack:
        if inference:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.no_grad())
            inputs = inputs.clone()
            args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
            kwargs = {k: v.clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        call = _make_call(net, inputs, args, kwargs, steps, need_final_loss)
        result = _run(net, call, materialise)
    if forward:
        _write_back_buffers(net.model, result.buffers)
        _warn_if_diverged(net.options, result.losses)
    return result


def _run(net: NoetherWrapper, call: Call, materialise: bool) -> InnerResult:
    """The path's run, its low-rank fallback, non-finite recovery and error translation."""
    options = net.options
    selected = set(net.adapted_names())
    params: Params = {n: p for n, p in net.model.named_parameters() if n in selected}
    progress = Progress()
    path, runner = choose_path(net, list(params), materialise)
    try:
        try:
            result = runner(call, params, progress)
        except _inner.Unsupported as why:
            if options.per_sample_path == "lowrank":
                raise ValueError(
                    f"`per_sample_path='lowrank'` cannot tailor this model: {why}. Use "
                    "per_sample_path='auto' or 'vmap'."
                ) from None
            path, runner = "vmap", _inner.tailor_vmap
            progress = Progress()
            result = runner(call, params, progress)
        if not bool(result.ok.all()):
            result = _recover(call, runner, params, result)
    except RuntimeError as error:
        if (progress.step == 0 and not progress.started) or path == "vmap":
            raise _path_error(call, path, error) from error
        where = (
            f"at inner step {progress.step} of inner_steps={call.steps} for inputs of shape "
            f"{tuple(call.inputs.shape)}"
        )
        raise RuntimeError(f"NoetherWrapper: tailoring failed {where}: {error}") from error
    finally:
        net.last_path = path
    _warn_if_no_op(net, result)
    return result


def _make_call(
    net: NoetherWrapper, inputs: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
    steps: int, need_final_loss: bool,
) -> Call:  # fmt: skip
    options = net.options
    differentiable = torch.is_grad_enabled()
    lr = net.log_inner_lr.exp()
    predict = options.predict
    return Call(
        model=net.model,
        predict=None if predict is None else _inner.Bound(net.model, predict),
        buffers=dict(net.model.named_buffers()),
        loss=noether_loss_fn(options, net.embedding),
        inputs=inputs,
        args=args,
        kwargs=kwargs,
        steps=steps,
        lr=lr if differentiable else lr.detach(),
        step_rule=options.step_rule,
        step_control=options.step_control,
        max_grad_norm=options.max_inner_grad_norm,
        create_graph=differentiable and not options.first_order,
        differentiable=differentiable,
        need_final_loss=need_final_loss,
    )


def choose_path(net: NoetherWrapper, names: list[str], materialise: bool) -> tuple[str, Runner]:
    """The path for this call, by the registry's capabilities and the options."""
    options = net.options
    if isinstance(options.adapt, Affine):
        runner = functools.partial(
            _inner.tailor_affine, spec=options.adapt, per_sample=options.per_sample
        )
        return "affine", runner
    if not options.per_sample:
        return "shared", _inner.tailor_shared
    if torch.compiler.is_compiling():
        if options.per_sample_path == "lowrank":
            raise ValueError(
                "`per_sample_path='lowrank'` does not work inside torch.compile (its forward "
                "hooks are not traced); use per_sample_path='auto' or 'vmap' when compiling."
            )
        return "vmap", _inner.tailor_vmap
    if options.per_sample_path != "vmap" and not materialise:
        layers = _inner.supported_layers(net.model, names)
        auto_ok = layers is not None and (
            options.per_sample_path == "lowrank"
            or all(type(net.model.get_submodule(n)) is nn.Linear for n in layers)
        )
        if layers is not None and auto_ok:
            return "lowrank", functools.partial(_inner.tailor_lowrank, layer_spec=layers)
        if options.per_sample_path == "lowrank":
            raise ValueError(
                "`per_sample_path='lowrank'` needs every adapted parameter to belong to an "
                "nn.Linear or an ungrouped nn.Conv1d/Conv2d; use `adapt` to select only "
                "those, or per_sample_path='auto'."
            )
    return "vmap", _inner.tailor_vmap


def _split(values: tuple[Any, ...], keep: Tensor, batch: int) -> tuple[Any, ...]:
    dims = _inner.batched_dims(values, batch)
    return tuple(v[keep] if d == 0 else v for v, d in zip(values, dims))


def _recover(call: Call, runner: Runner, params: Params, result: InnerResult) -> InnerResult:
    """Give sequences whose inner steps went non-finite their untailored prediction.

    The tailored values of the other sequences are recomputed without the failed ones, so no
    non-finite value enters the graph that the outer gradient flows through.
    """
    ok, batch = result.ok, call.batch
    bad = int((~ok).sum())
    start_bad = ~torch.isfinite(result.losses[:, 0].detach())
    if bool(start_bad[~ok].all()):
        warn(
            f"NoetherWrapper: the untailored rollout's Noether loss is already non-finite for "
            f"{bad} of {batch} sequence(s) (NaN or inf in `inputs`, the model's output or the "
            "embedding): they are not tailored and keep the model's own prediction.",
            RuntimeWarning,
        )
    else:
        warn(
            f"NoetherWrapper: an inner step produced non-finite values for {bad} of {batch} "
            "sequence(s); they keep their untailored prediction. Consider "
            "step_control='backtrack', step_rule='polyak', `max_inner_grad_norm`, a smaller "
            "`inner_lr`, or a shorter `inner_horizon`.",
            RuntimeWarning,
        )
    buffers = call.fresh_buffers()
    initial = call.prediction(params, buffers)
    if not call.differentiable:
        initial = initial.detach()
    untailored = None if result.params is None else _untailored_like(params, result.params)
    if not bool(ok.any()):  # a shared step's one flag, or every sequence failed
        return InnerResult(initial, initial, result.losses.detach(), ok, untailored, buffers)
    keep = ok.nonzero().squeeze(1)
    names = tuple(call.kwargs)
    sub_kwargs = dict(zip(names, _split(tuple(call.kwargs.values()), keep, batch)))
    sub_call = call.with_inputs(call.inputs[keep], _split(call.args, keep, batch), sub_kwargs)
    sub = runner(sub_call, params, Progress())
    prediction = initial.index_copy(0, keep, sub.prediction)
    losses = result.losses.detach().index_copy(0, keep, sub.losses.detach())
    adapted = None
    if sub.params is not None and untailored is not None:
        adapted = {n: untailored[n].index_copy(0, keep, sub.params[n]) for n in sub.params}
    return InnerResult(prediction, initial, losses, ok, adapted, None)


def _untailored_like(params: Params, adapted: Params) -> Params:
    """The untailored value of every entry of ``adapted``, in its shape: the model's own
    parameter, or zero for an affine (identity)."""
    return {
        n: params[n].expand_as(p) if n in params else torch.zeros_like(p)
        for n, p in adapted.items()
    }


def _path_error(call: Call, path: str, error: RuntimeError) -> ValueError:
    """Say why tailoring failed: the inputs do not fit the model, the embedding ignores the
    states, the loss does not depend on the adapted parameters, or the model runs but this
    path cannot tailor it (and what will)."""
    try:
        with torch.no_grad():
            output = call.rollout({})
    except Exception:  # the plain model fails too: the inputs do not fit it
        return ValueError(
            f"`model` or `embedding` failed on `inputs` of shape {tuple(call.inputs.shape)} in "
            f"the first rollout (inner_steps={call.steps}): {error}. Check that the inputs fit "
            "the model."
        )
    try:  # the whole batch runs: is its output one the Noether loss can read?
        with torch.no_grad():
            call.noether_loss(output)
    except (ValueError, TypeError) as unreadable:
        return ValueError(str(unreadable))
    text = str(error)
    if "does not require grad" in text or "not have been used in the graph" in text:
        with torch.enable_grad():
            probe = output.detach().requires_grad_()
            depends = call.noether_loss(probe).requires_grad
        if not depends:
            return ValueError(
                "NoetherWrapper: the Noether loss does not depend on the predicted states: "
                "`embedding` returns the same value whatever its input (a constant g, or one "
                "that detaches its input), so there is nothing to tailor. Fit g first "
                "(noether_wrap.fit_conserved) or check its forward."
            )
        return ValueError(
            "NoetherWrapper: the Noether loss does not depend on the adapted parameters, so an "
            "inner step cannot change the prediction. The model runs (part of) its forward "
            "without autograd (torch.no_grad inside forward, .detach(), an adjoint ODE "
            "solver such as torchdiffeq.odeint_adjoint), or `adapt` selects parameters the "
            f"rollout does not use. ({text.splitlines()[0]})"
        )
    hint = (
        " For fused attention, run it under torch.nn.attention.sdpa_kernel(SDPBackend.MATH)."
        if "scaled_dot_product" in text or "attention" in text
        else ""
    )
    return PathUnsupported(
        f"NoetherWrapper: the model runs on these inputs, but the {path!r} path cannot tailor "
        f"it: {text.splitlines()[0]}. Ways through: adapt=noether_wrap.Affine('<module glob>') "
        "(per-sequence affines, any layer type); an `adapt` that selects only nn.Linear/Conv "
        f"layers (the low-rank path, no vmap); or per_sample=False (one step shared by the "
        f"batch).{hint}"
    )


def _warn_if_no_op(net: NoetherWrapper, result: InnerResult) -> None:
    """Warn (once per wrapper) when the inner steps left the prediction exactly as it was
    although the Noether loss was not zero: the adapted parameters do not reach the loss."""
    held_back = net.options.step_control == "backtrack"  # may reject every step, by design
    if held_back or net._warned_no_op or result.prediction.shape != result.initial.shape:
        return
    moved = not torch.equal(result.prediction.detach(), result.initial.detach())
    if moved or not bool((result.losses[:, 0].detach() > 0).any()):
        return
    net._warned_no_op = True
    warn(
        "NoetherWrapper: the inner steps did not change the prediction although the Noether "
        "loss is not zero: its gradient with respect to the adapted parameters is zero. The "
        "model may run without autograd inside (torch.no_grad, .detach(), an adjoint ODE "
        "solver such as torchdiffeq.odeint_adjoint), `adapt` may select parameters the "
        "rollout does not use, or the embedding is saturated.",
        RuntimeWarning,
    )


def _write_back_buffers(model: nn.Module, final: Params | None) -> None:
    """Give the model the buffers its tailored prediction pass left, as one unwrapped call
    would have: BatchNorm running statistics in training mode (every other pass of the call
    ran on clones). Buffers the pass did not change are left alone."""
    if not final:
        return
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            value = final.get(name)
            if value is not None and not torch.equal(value, buffer):
                buffer.copy_(value)


def _warn_if_diverged(options: Options, losses: Tensor) -> None:
    """Warn when tailoring raised some sequence's Noether loss by more than ``DIVERGED``-fold:
    a finite blow-up (e.g. inputs far outside the data) that no non-finite check sees."""
    first, later = losses[:, :1].detach(), losses[:, 1:].detach()
    grew = (later > DIVERGED * first).any(dim=1)  # NaN (a loss not computed) never counts
    if not bool(grew.any()):
        return
    remedies = [
        "step_control='backtrack'" if options.step_control != "backtrack" else None,
        "keep_if_better=True" if not options.keep_if_better else None,
        "step_rule='polyak'" if options.step_rule != "polyak" else None,
        "`max_inner_grad_norm`" if options.max_inner_grad_norm is None else None,
        "a smaller `inner_lr`",
    ]
    kept = " (keep_if_better keeps their untailored prediction)" if options.keep_if_better else ""
    warn(
        f"NoetherWrapper: tailoring raised the Noether loss more than 1000-fold for "
        f"{int(grew.sum())} of {losses.shape[0]} sequence(s){kept}: the inner step diverged "
        "(inputs far from the data, or a step too large). Consider "
        f"{', '.join(r for r in remedies if r)}.",
        RuntimeWarning,
    )


def select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where ``mask`` (``(batch,)``) is True, else ``b``."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def untailored(
    net: NoetherWrapper,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    return_info: bool,
) -> Tensor | TailorOutput:
    """``inner_steps == 0``: exactly the model (or ``predict``), called directly."""
    from noether_wrap.wrapper import TailorOutput

    predict = net.options.predict
    try:
        out = (
            net.model(inputs, *args, **kwargs)
            if predict is None
            else predict(net.model, inputs, *args, **kwargs)
        )
    except RuntimeError as error:
        raise ValueError(
            f"`model` failed on `inputs` of shape {tuple(inputs.shape)} (inner_steps=0): "
            f"{error}. Check that the inputs fit the model."
        ) from error
    if not return_info:
        return out
    rollout = out
    if predict is not None:  # on clones of the buffers: one call updates statistics once
        buffers = {n: b.clone() for n, b in net.model.named_buffers()}
        rollout = torch.func.functional_call(net.model, buffers, (inputs, *args), kwargs)
    loss = noether_loss_fn(net.options, net.embedding)(inputs, rollout)
    return TailorOutput(out, out, loss.unsqueeze(1))


def tailor(
    net: NoetherWrapper,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    per_sequence: bool = False,
) -> Params:
    """The adapted parameters for ``inputs`` (see :meth:`NoetherWrapper.tailor`).

    ``per_sequence``: every entry gets a leading batch dim, and ``keep_if_better`` is applied
    per sequence on a shared step too (what ``tailored_model`` needs to reproduce ``forward``).
    """
    options = net.options
    batch = inputs.shape[0]
    own: Params = dict(net.model.named_parameters())
    batched = options.per_sample or per_sequence
    if options.inner_steps == 0:
        base = {n: own[n] for n in net.adapted_names()}
        return {n: p.expand(batch, *p.shape) for n, p in base.items()} if batched else base
    try:
        result: InnerResult = run_call(
            net,
            inputs,
            args,
            kwargs,
            steps=options.inner_steps,
            need_final_loss=options.keep_if_better,
            materialise=True,
        )
    except PathUnsupported:
        result = _one_by_one(net, inputs, args, kwargs)
    assert result.params is not None
    params = result.params
    if not batched:
        return params
    if not options.per_sample:  # one shared set (affines: one row) for every sequence
        params = {
            n: (p.expand(batch, *p.shape[1:]) if n not in own else p.expand(batch, *p.shape))
            for n, p in params.items()
        }
    if options.keep_if_better:
        worse = result.losses[:, -1] >= result.losses[:, 0]
        params = {
            n: select(~worse, p, u)
            for (n, p), u in zip(params.items(), _untailored_like(own, params).values())
        }
    return params


def _one_by_one(
    net: NoetherWrapper, inputs: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> InnerResult:
    """Per-sample tailoring as a loop of one-sequence shared steps (exactly the same steps),
    for models ``vmap`` cannot batch."""
    batch = inputs.shape[0]
    options = net.options
    names = tuple(kwargs)
    parts = []
    object.__setattr__(net, "options", options.replace(per_sample=False))
    try:
        for i in range(batch):
            one = torch.tensor([i], device=inputs.device)
            kw = dict(zip(names, _split(tuple(kwargs.values()), one, batch)))
            part: InnerResult = run_call(
                net,
                inputs[i : i + 1],
                _split(args, one, batch),
                kw,
                steps=options.inner_steps,
                need_final_loss=options.keep_if_better,
                materialise=True,
            )
            parts.append(part)
    finally:
        object.__setattr__(net, "options", options)
    found = [p.params for p in parts if p.params is not None]
    assert len(found) == batch
    return InnerResult(
        torch.cat([p.prediction for p in parts]),
        torch.cat([p.initial for p in parts]),
        torch.cat([p.losses for p in parts]),
        torch.cat([p.ok for p in parts]),
        {n: torch.stack([f[n] for f in found]) for n in found[0]},
    )


def tailored_model(
    net: NoetherWrapper,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    index: int | None,
) -> nn.Module:
    """A plain copy of the model with sequence ``index``'s tailored weights (see
    :meth:`NoetherWrapper.tailored_model`)."""
    params = tailor(net, inputs, args, kwargs, per_sequence=True)
    batch = inputs.shape[0]
    differ = net.options.per_sample or net.options.keep_if_better
    if index is None and batch != 1 and differ:
        raise ValueError(
            f"`index` is required for a batch of {batch}: each sequence's tailored weights "
            "can differ (per_sample, or keep_if_better)."
        )
    i = 0 if index is None else index
    if not -batch <= i < batch:
        raise ValueError(f"`index` must be in [{-batch}, {batch}), got {index}.")
    one = {n: p[i].detach() for n, p in params.items()}
    adapt = net.options.adapt
    if isinstance(adapt, Affine):
        return hooked_copy(net.model, adapt, {n: p.reshape(-1) for n, p in one.items()})
    model = copy.deepcopy(net.model)
    with torch.no_grad():
        for name, value in one.items():
            model.get_parameter(name).copy_(value)
    return model
