"""Running one tailoring call: the path, its fallbacks, non-finite recovery, errors that say what
to do, and the warnings a user must see. :class:`~noether_wrap.NoetherWrapper` is a facade over
:func:`run_call`: it hands the engine a :class:`Job` (what a call reads: the model, ``g``, the
options, the step) and records what the engine decided in it (the path taken, the horizon, the
once-only warnings raised); the engine never sees the wrapper. The steps themselves are
:mod:`noether_wrap._inner`'s one loop.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from noether_wrap import _inner
from noether_wrap._inner import Affine, Call, InnerResult, Params, Progress, hooked_copy
from noether_wrap._options import Options
from noether_wrap._warn import warn
from noether_wrap.loss import as_reference_frames, per_sequence_noether_loss

Runner = Callable[[Call, Params, Progress], InnerResult]

#: A tailored Noether loss this many times the untailored one counts as a diverged step.
DIVERGED = 1e3


@dataclass
class Job:
    """One call as the engine sees it: what it reads (set by the facade) and what it decided
    (set by the engine, recorded by the facade afterwards)."""

    model: nn.Module
    embedding: Callable[[Tensor], Tensor]
    options: Options
    #: The step's log (a Parameter when learned).
    log_inner_lr: Tensor
    #: The adapted parameters' names, in the model's order.
    adapted: tuple[str, ...]
    #: The wrapper is in training mode.
    training: bool
    #: Once-only warnings already raised by this wrapper (and, after the call, by it).
    warned: set[str]
    #: Decided: the path the call took (None: no inner steps ran).
    path: str | None = None
    #: Decided: the horizon the call's Noether loss read, and whether a prediction call saw it.
    horizon: int | None = None
    saw_horizon: bool = False
    #: Decided: the horizon a learned step trained at (to record as ``step_horizon``).
    learned_horizon: int | None = None

    @property
    def inner_lr(self) -> float:
        return float(self.log_inner_lr.detach().exp())


class PathUnsupported(ValueError):
    """The model runs, but the chosen per-sample path cannot tailor it (no vmap rule, ...)."""


def _layout_hint(x0: Tensor, output: Tensor, time_dim: int) -> str:
    """What to change when the model's output and its reference disagree: a ``time_dim`` that
    puts the state where the reference has it, else ``reference``."""
    state = tuple(x0.shape[1:])
    for dim in range(1, output.dim()):
        if dim != time_dim and tuple(output.movedim(dim, 1).shape[2:]) == state:
            return (
                f" The output's time axis looks like dim {dim}, not `time_dim` (={time_dim}): "
                f"pass time_dim={dim}."
            )
    return " Pass `reference` (inputs -> x0) when `inputs` is not the state itself."


def _frames(options: Options, inputs: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
    """``(frames, predictions)``: the reference frames ``(batch, r, *state)`` and the whole
    output with time at dim 1, ``(batch, T, *state)``, after checking the layout."""
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
            f"`model` output and its reference disagree: {error}"
            + _layout_hint(x0, output, time_dim)
        ) from None
    return frames, predictions


def noether_loss_fn(
    options: Options, embedding: Callable[[Tensor], Tensor], horizons: list[int] | None = None
) -> _inner.call.LossFn:
    """``(inputs, output) -> (batch,)``: each sequence's Noether loss of ``output = model(inputs)``
    under ``options`` (time axis, horizon, reference, window, form, distance). ``horizons``, when
    given, receives the number of predicted steps each evaluation read."""

    def loss(inputs: Tensor, output: Tensor) -> Tensor:
        frames, predictions = _frames(options, inputs, output)
        if options.inner_horizon is not None:
            predictions = predictions[:, : options.inner_horizon]
        if horizons is not None:
            horizons.append(int(predictions.shape[1]))
        if frames.shape[1] < options.window:
            raise ValueError(
                f"the reference must provide at least `window` (={options.window}) frames, got "
                f"{frames.shape[1]}; pass inputs with a time axis or a `reference`."
            )
        try:
            return per_sequence_noether_loss(
                frames, predictions, embedding, options.loss_form, options.distance, options.window
            )
        except ValueError as error:  # a shape check of the embedding's (RuntimeErrors pass)
            state = tuple(predictions.shape[2:])
            frames_hint = (
                f" If `inputs` holds {inputs.shape[1]} frames of a {state[-1]}-dim state rather "
                f"than one state, the model reads them as one state of shape {state}: give it "
                "the last frame, use Rollout(..., context=...) for a model that reads several, "
                "or pass `reference`."
                if inputs.dim() >= 3 and inputs.shape[1:] == predictions.shape[2:]
                else ""
            )
            raise type(error)(
                f"`embedding` failed on the predicted states, shape {state} each (the model's "
                f"output {tuple(output.shape)} with time at `time_dim` (={options.time_dim}), "
                f"from `inputs` of shape {tuple(inputs.shape)}): {error}{frames_hint}"
            ) from error

    return loss


def move_fn(options: Options) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``(inputs, plain, tailored) -> (batch,)``: how far each tailored rollout moved from the
    plain one, ``‖tailored − plain‖ / ‖plain − x0‖`` over all steps and state (``x0`` the last
    reference frame): scale-free, so one guard τ means the same for every system and horizon."""

    def move(inputs: Tensor, plain: Tensor, tailored: Tensor) -> Tensor:
        frames, predictions = _frames(options, inputs, plain)
        start = frames[:, -1:].to(predictions.dtype)
        own = (predictions - start).flatten(1).norm(dim=1)
        moved = (tailored - plain).flatten(1).norm(dim=1)
        tiny = torch.finfo(own.dtype).tiny
        return torch.where(moved > 0, moved / own.clamp(min=tiny), torch.zeros_like(moved))

    return move


@torch.compiler.disable  # type: ignore[untyped-decorator]
def run_call(
    job: Job,
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
    about diverged steps. Records the path in ``job.path``.

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
        horizons: list[int] = []
        call = _make_call(job, inputs, args, kwargs, steps, need_final_loss, horizons)
        result = _run(job, call, materialise)
    if forward:
        _write_back_buffers(job.model, result.buffers)
        if job.options.keep_if_better:
            better = result.losses[:, -1] < result.losses[:, 0]
            result = result._replace(prediction=select(better, result.prediction, result.initial))
        _warn_if_diverged(job.options, result)
        _warn_if_blown_up(result)
        _check_horizon(job, horizons[0] if horizons else None)
    return result


def _run(job: Job, call: Call, materialise: bool) -> InnerResult:
    """The path's run, its low-rank fallback, non-finite recovery and error translation."""
    options = job.options
    selected = set(job.adapted)
    params: Params = {n: p for n, p in job.model.named_parameters() if n in selected}
    progress = Progress()
    path, runner = choose_path(job, list(params), materialise)
    try:
        try:
            with _slow_vmap_watch(job, path):
                result = runner(call, params, progress)
        except _inner.Unsupported as why:
            if options.per_sample_path == "lowrank":
                raise ValueError(
                    f"`per_sample_path='lowrank'` cannot tailor this model: {why}. Use "
                    "per_sample_path='auto' or 'vmap'."
                ) from None
            path, runner = "vmap", _inner.tailor_vmap
            progress = Progress()
            with _slow_vmap_watch(job, path):
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
        job.path = path
    _warn_if_no_op(job, result)
    return result


def _make_call(
    job: Job, inputs: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any],
    steps: int, need_final_loss: bool, horizons: list[int] | None = None,
) -> Call:  # fmt: skip
    options = job.options
    differentiable = torch.is_grad_enabled()
    lr = job.log_inner_lr.exp()
    predict = options.predict
    return Call(
        model=job.model,
        predict=None if predict is None else _inner.Bound(job.model, predict),
        buffers=dict(job.model.named_buffers()),
        loss=noether_loss_fn(options, job.embedding, horizons),
        inputs=inputs,
        args=args,
        kwargs=kwargs,
        steps=steps,
        lr=lr if differentiable else lr.detach(),
        options=options,
        move=move_fn(options),
        create_graph=differentiable and not options.first_order,
        differentiable=differentiable,
        need_final_loss=need_final_loss,
    )


def choose_path(job: Job, names: list[str], materialise: bool) -> tuple[str, Runner]:
    """The path for this call: the options' (affine, shared), else the first per-sample path of
    the capability table :data:`noether_wrap._inner.PATHS` that can serve it (compiles when
    compiling, materialises the weights when asked to, supports the adapted layers)."""
    options = job.options
    if isinstance(options.adapt, Affine):
        runner = functools.partial(
            _inner.tailor_affine, spec=options.adapt, per_sample=options.per_sample
        )
        return "affine", runner
    if not options.per_sample:
        return "shared", _inner.tailor_shared
    compiling = torch.compiler.is_compiling()
    lowrank = _inner.PATHS["lowrank"]
    if options.per_sample_path == "lowrank" and compiling and not lowrank.compiles:
        raise ValueError(
            "`per_sample_path='lowrank'` does not work inside torch.compile (its forward "
            "hooks are not traced); use per_sample_path='auto' or 'vmap' when compiling."
        )
    serves = (lowrank.compiles or not compiling) and (lowrank.materialises or not materialise)
    if options.per_sample_path != "vmap" and serves:
        layers = _inner.supported_layers(job.model, names)
        auto_ok = layers is not None and (
            options.per_sample_path == "lowrank"
            or all(type(job.model.get_submodule(n)) is nn.Linear for n in layers)
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
    unmoved = None if result.moves is None else torch.zeros_like(result.moves.detach())
    if not bool(ok.any()):  # a shared step's one flag, or every sequence failed
        return InnerResult(
            initial, initial, result.losses.detach(), ok, untailored, buffers, unmoved
        )
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
    moves = None
    if unmoved is not None and sub.moves is not None:
        moves = unmoved.index_copy(0, keep, sub.moves.detach())
    return InnerResult(prediction, initial, losses, ok, adapted, None, moves)


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


#: What torch's vmap says when it runs an operator one sequence at a time.
_SLOW_VMAP = "performance drop because we have not yet implemented the batching rule"


@contextlib.contextmanager
def _slow_vmap_watch(job: Job, path: str) -> Iterator[None]:
    """On the ``vmap`` path, turn torch's generic "performance drop" warnings (an operator
    without a batching rule runs one sequence at a time) into one warning per wrapper that names
    the fast ways; every other warning passes through unchanged."""
    if path != "vmap":
        yield
        return
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        _pass_on(job, caught)


def _pass_on(job: Job, caught: list[warnings.WarningMessage]) -> None:
    """Re-issue what :func:`_slow_vmap_watch` recorded, the slow-fallback ones as one."""
    slow = sorted({str(w.message).split("rule for ")[-1].split(".")[0] for w in caught
                   if _SLOW_VMAP in str(w.message)})  # fmt: skip
    for w in caught:
        if _SLOW_VMAP not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if slow and "slow_vmap" not in job.warned:
        job.warned.add("slow_vmap")
        warn(
            f"NoetherWrapper: per-sample tailoring runs through vmap, which has no batching rule "
            f"for {', '.join(slow)} and runs it one sequence at a time (slow: an RNN cell "
            "measured 17x an unwrapped step). Fast ways: adapt=noether_wrap.Affine('<module "
            "glob>') (per-sequence affines, any layer, about the cost of a shared step), an "
            "`adapt` that selects only nn.Linear/Conv layers (the low-rank path), or "
            "per_sample=False (one step shared by the batch).",
            RuntimeWarning,
        )


def _warn_if_no_op(job: Job, result: InnerResult) -> None:
    """Warn (once per wrapper) when the inner steps left the prediction exactly as it was
    although the Noether loss was not zero: the adapted parameters do not reach the loss."""
    # backtracking may reject every step, and the guard every prediction, by design
    held_back = job.options.step_control == "backtrack" or job.options.guard is not None
    if held_back or "no_op" in job.warned or result.prediction.shape != result.initial.shape:
        return
    moved = not torch.equal(result.prediction.detach(), result.initial.detach())
    if moved or not bool((result.losses[:, 0].detach() > 0).any()):
        return
    job.warned.add("no_op")
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


def _warn_if_diverged(options: Options, result: InnerResult) -> None:
    """Warn when tailoring raised some sequence's Noether loss by more than ``DIVERGED``-fold:
    a finite blow-up (e.g. inputs far outside the data) that no non-finite check sees. The count
    is over the sequences whose later losses were computed (a sample of a large batch); a
    sequence the guard gave its plain prediction does not count."""
    losses = result.losses
    first, later = losses[:, :1].detach(), losses[:, 1:].detach()
    grew = (later > DIVERGED * first).any(dim=1)  # NaN (a loss not computed) never counts
    if options.guard is not None and result.moves is not None:
        grew = grew & (result.moves <= options.guard)
    if not bool(grew.any()):
        return
    checked = int((~torch.isnan(later)).any(dim=1).sum())
    batch = losses.shape[0]
    among = (
        f"{int(grew.sum())} of the {checked} sequence(s) checked (a sample of the batch of "
        f"{batch}; return_info=True checks all)"
        if checked < batch
        else f"{int(grew.sum())} of {batch} sequence(s)"
    )
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
        f"{among}{kept}: the inner step diverged "
        "(inputs far from the data, or a step too large). Consider "
        f"{', '.join(r for r in remedies if r)}.",
        RuntimeWarning,
    )


#: A tailored prediction reaching this many times the untailored one's half-range from its
#: centre counts as blown up.
BLOWN_UP = 10.0


def _warn_if_blown_up(result: InnerResult) -> None:
    """Warn when a returned prediction lies more than ``BLOWN_UP`` times outside the untailored
    prediction's range (per sequence, over the whole batch): a finite blow-up on any path,
    whatever the Noether loss says. A sequence's range is floored at the batch's mean range, so
    a sequence whose plain prediction is nearly constant (one state of a vector field) is not
    flagged for an ordinary move."""
    prediction, initial = result.prediction.detach(), result.initial.detach()
    if prediction.shape != initial.shape or not prediction.is_floating_point():
        return
    flat, base = prediction.flatten(1), initial.flatten(1)
    high, low = base.amax(1, keepdim=True), base.amin(1, keepdim=True)
    half = (high - low) / 2
    centre, half = (
        (high + low) / 2,
        half.clamp(min=max(float(half.mean()), torch.finfo(base.dtype).tiny)),
    )
    reach = ((flat - centre).abs().amax(1, keepdim=True) / half).squeeze(1)
    blown = reach > BLOWN_UP
    if not bool(blown.any()):
        return
    warn(
        f"NoetherWrapper: the tailored prediction of {int(blown.sum())} of {prediction.shape[0]} "
        f"sequence(s) lies more than {BLOWN_UP:g}x outside the untailored prediction's range "
        f"(up to {float(reach[blown].max()):.3g}x): the inner step went far. Consider `guard` "
        "(keeps the plain prediction where tailoring moved it too far), step_rule='polyak', "
        "step_control='backtrack' or a smaller `inner_lr`.",
        RuntimeWarning,
    )


def _check_horizon(job: Job, horizon: int | None) -> None:
    """A step is specific to the rollout horizon it was chosen at: record the horizon a learned
    step trains at, and warn once when a call's horizon differs from the recorded one.

    For a fixed step the loss and its gradient grow with the horizon (a step learned at 10 and
    used at 30 made a prediction 4.5x worse). The Polyak fraction is scale-free, but which
    fraction helps still changes with the horizon: tuned at 10 on the ideal pendulum and used at
    30 it gave 1.20x vanilla on one data seed (0.70x with ``inner_horizon=10``) and 0.62x on
    another, so both rules warn."""
    options = job.options
    job.horizon, job.saw_horizon = horizon, True
    if horizon is None:
        return
    learning = job.training and torch.is_grad_enabled() and job.log_inner_lr.requires_grad
    if options.step_horizon is None:
        if learning:
            job.learned_horizon = horizon
        return
    if horizon == options.step_horizon or "horizon" in job.warned:
        return
    job.warned.add("horizon")
    what = (
        f"fixed step (inner_lr={job.inner_lr:.3g})"
        if options.step_rule == "fixed"
        else f"Polyak fraction (gamma={job.inner_lr:.3g})"
    )
    why = (
        "the loss and its gradient grow with the horizon, so the step may be too large"
        if options.step_rule == "fixed"
        else "the fraction is scale-free, but the one that helps changes with the horizon"
    )
    warn(
        f"NoetherWrapper: this {what} was chosen at a rollout horizon of {options.step_horizon} "
        f"steps (`step_horizon`), but this call's Noether loss reads {horizon}: {why}. Tune it "
        f"again at this horizon, or pass inner_horizon={options.step_horizon} to tailor on the "
        "steps it was chosen for.",
        RuntimeWarning,
    )


def select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where ``mask`` (``(batch,)``) is True, else ``b``."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def untailored(
    job: Job,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    return_info: bool,
) -> tuple[Tensor, Tensor | None]:
    """``inner_steps == 0``: exactly the model (or ``predict``), called directly; with
    ``return_info``, also the Noether loss ``(batch, 1)`` of its rollout (else None)."""
    predict = job.options.predict
    try:
        out = (
            job.model(inputs, *args, **kwargs)
            if predict is None
            else predict(job.model, inputs, *args, **kwargs)
        )
    except RuntimeError as error:
        raise ValueError(
            f"`model` failed on `inputs` of shape {tuple(inputs.shape)} (inner_steps=0): "
            f"{error}. Check that the inputs fit the model."
        ) from error
    if not return_info:
        return out, None
    rollout = out
    if predict is not None:  # on clones of the buffers: one call updates statistics once
        buffers = {n: b.clone() for n, b in job.model.named_buffers()}
        rollout = torch.func.functional_call(job.model, buffers, (inputs, *args), kwargs)
    loss = noether_loss_fn(job.options, job.embedding)(inputs, rollout)
    return out, loss.unsqueeze(1)


def tailor(
    job: Job,
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
    options = job.options
    batch = inputs.shape[0]
    own: Params = dict(job.model.named_parameters())
    batched = options.per_sample or per_sequence
    if options.inner_steps == 0:
        base = {n: own[n] for n in job.adapted}
        return {n: p.expand(batch, *p.shape) for n, p in base.items()} if batched else base
    try:
        result: InnerResult = run_call(
            job,
            inputs,
            args,
            kwargs,
            steps=options.inner_steps,
            need_final_loss=options.keep_if_better,
            materialise=True,
        )
    except PathUnsupported:
        result = _one_by_one(job, inputs, args, kwargs)
    assert result.params is not None
    params = result.params
    if not batched:
        return params
    if not options.per_sample:  # one shared set (affines: one row) for every sequence
        params = {
            n: (p.expand(batch, *p.shape[1:]) if n not in own else p.expand(batch, *p.shape))
            for n, p in params.items()
        }
    revert = torch.zeros(batch, dtype=torch.bool, device=inputs.device)
    if options.keep_if_better:
        revert = revert | (result.losses[:, -1] >= result.losses[:, 0])
    if options.guard is not None and result.moves is not None:
        revert = revert | ~(result.moves <= options.guard)
    if bool(revert.any()):
        params = {
            n: select(~revert, p, u)
            for (n, p), u in zip(params.items(), _untailored_like(own, params).values())
        }
    return params


def _one_by_one(
    job: Job, inputs: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> InnerResult:
    """Per-sample tailoring as a loop of one-sequence shared steps (exactly the same steps),
    for models ``vmap`` cannot batch."""
    batch = inputs.shape[0]
    options = job.options
    names = tuple(kwargs)
    parts = []
    one_job = dataclasses.replace(job, options=options.replace(per_sample=False))
    try:
        for i in range(batch):
            one = torch.tensor([i], device=inputs.device)
            kw = dict(zip(names, _split(tuple(kwargs.values()), one, batch)))
            part: InnerResult = run_call(
                one_job,
                inputs[i : i + 1],
                _split(args, one, batch),
                kw,
                steps=options.inner_steps,
                need_final_loss=options.keep_if_better,
                materialise=True,
            )
            parts.append(part)
    finally:
        job.path = one_job.path
    found = [p.params for p in parts if p.params is not None]
    assert len(found) == batch
    return InnerResult(
        torch.cat([p.prediction for p in parts]),
        torch.cat([p.initial for p in parts]),
        torch.cat([p.losses for p in parts]),
        torch.cat([p.ok for p in parts]),
        {n: torch.stack([f[n] for f in found]) for n in found[0]},
        moves=_cat_moves([p.moves for p in parts], batch),
    )


def _cat_moves(moves: list[Tensor | None], batch: int) -> Tensor | None:
    found = [m for m in moves if m is not None]
    return torch.cat(found) if len(found) == batch else None


def tailored_model(
    job: Job,
    inputs: Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    index: int | None,
) -> nn.Module:
    """A plain copy of the model with sequence ``index``'s tailored weights (see
    :meth:`NoetherWrapper.tailored_model`)."""
    params = tailor(job, inputs, args, kwargs, per_sequence=True)
    batch = inputs.shape[0]
    differ = job.options.per_sample or job.options.keep_if_better or job.options.guard is not None
    if index is None and batch != 1 and differ:
        raise ValueError(
            f"`index` is required for a batch of {batch}: each sequence's tailored weights "
            "can differ (per_sample, keep_if_better or guard)."
        )
    i = 0 if index is None else index
    if not -batch <= i < batch:
        raise ValueError(f"`index` must be in [{-batch}, {batch}), got {index}.")
    one = {n: p[i].detach() for n, p in params.items()}
    adapt = job.options.adapt
    if isinstance(adapt, Affine):
        return hooked_copy(job.model, adapt, {n: p.reshape(-1) for n, p in one.items()})
    model = copy.deepcopy(job.model)
    with torch.no_grad():
        for name, value in one.items():
            model.get_parameter(name).copy_(value)
    return model
