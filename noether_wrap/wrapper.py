"""NoetherWrapper: tailor a sequence predictor to a learned conservation law at prediction time."""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from noether_wrap import _affine, _func, _lowrank
from noether_wrap._affine import Affine
from noether_wrap.loss import (
    DISTANCES,
    LOSS_FORMS,
    Distance,
    LossForm,
    as_reference_frames,
    check_choice,
    per_sequence_noether_loss,
)

#: ``adapt``: None (all trainable parameters), a glob on parameter names, a predicate, or
#: :class:`Affine` (per-sequence affines on matching modules' outputs).
AdaptSpec = Union[str, Callable[[str, nn.Parameter], bool], Affine, None]  # noqa: UP007
PerSamplePath = Literal["auto", "lowrank", "vmap"]
PER_SAMPLE_PATHS: tuple[str, ...] = ("auto", "lowrank", "vmap")
StepControl = Literal["none", "backtrack"]
STEP_CONTROLS: tuple[str, ...] = ("none", "backtrack")

_NONFINITE_WARNING = (
    "NoetherWrapper: an inner step produced non-finite values for {count} of {batch} "
    "sequence(s); they keep their untailored prediction. Consider a smaller `inner_lr`, "
    "`max_inner_grad_norm`, or a shorter `inner_horizon`."
)
#: A tailored Noether loss this many times the untailored one counts as a diverged step.
_DIVERGED = 1e3
_DIVERGED_WARNING = (
    "NoetherWrapper: tailoring raised the Noether loss more than 1000-fold for {count} of "
    "{batch} sequence(s): the inner step diverged (inputs far from the data, or `inner_lr` too "
    "large). Consider `keep_if_better=True`, `max_inner_grad_norm`, or a smaller `inner_lr`."
)


class TailorOutput(NamedTuple):
    """What ``NoetherWrapper(..., return_info=True)`` returns.

    Attributes:
        prediction: the tailored prediction, shaped like the wrapped model's output.
        initial_prediction: the prediction before any inner step, same shape.
        noether_losses: ``(batch, inner_steps + 1)``, each sequence's Noether loss before every
            inner step and after the last one.
    """

    prediction: Tensor
    initial_prediction: Tensor
    noether_losses: Tensor


class NoetherWrapper(nn.Module):
    """Tailor every prediction of a sequence predictor to a learned conserved quantity.

    On each call the wrapper rolls ``model`` out, takes ``inner_steps`` plain gradient steps on
    the Noether loss of the rollout (see :func:`noether_wrap.noether_loss`) with respect to the
    adapted parameters of ``model``, and predicts again with the adapted parameters. The steps
    are differentiable (second order, as in MAML), so an ordinary training loop on the returned
    prediction trains the model, the embedding and the step size together. The wrapped model's
    own parameters and buffers are never written.

    Args:
        model: a sequence predictor, ``model(inputs, *args, **kwargs)`` -> ``(batch, T, *state)``
            with time at ``time_dim`` (``*state`` has at least one axis).
        embedding: ``g``, maps ``(N, *state)`` (``(N, window * state[0], *state[1:])`` when
            ``window > 1``) to ``(N, m)`` or ``(N,)``.
        inner_steps: ``k >= 0``; 0 makes the wrapper exactly ``model``.
        inner_lr: the initial inner step size (> 0), stored as ``log_inner_lr``.
        learn_inner_lr: whether ``log_inner_lr`` is a Parameter (else a buffer).
        loss_form: ``"anchor"`` (compare to the start) or ``"chain"`` (to the previous step).
        distance: ``"mse"`` or ``"cosine"``.
        window: frames the embedding sees at once.
        per_sample: True: every sequence is tailored on its own (``torch.func.vmap``); False:
            one step shared by the batch on the batch-mean loss.
        adapt: which parameters of ``model`` are tailored: None (all trainable), a glob on
            parameter names (``"decoder.*"``) or a predicate ``(name, param) -> bool``.
        first_order: drop second-order terms; the embedding then gets no outer gradient.
        reference: ``inputs -> x0``, the observed frames the loss anchors on, ``(batch, *state)``
            or ``(batch, r, *state)``; default: ``inputs`` when it has no time axis, else its
            last ``window`` frames along ``time_dim``.
        time_dim: the time axis of the model's output (and of ``inputs`` if it has one).
        inner_horizon: the Noether loss uses only the first ``inner_horizon`` predicted steps.
        keep_if_better: per sequence, keep the untailored prediction where tailoring did not
            lower the Noether loss.
        max_inner_grad_norm: clip each inner gradient (per sequence when ``per_sample``) to this
            global norm.
        predict: ``(model, inputs, *args, **kwargs) -> Tensor``; what the adapted model
            returns, when that is not the rollout the loss is computed on. Example: tailor a
            vector field on its one-step RK4 rollout but return the field itself,
            ``predict=lambda m, x: m.step(x)``.
        per_sample_path: how ``per_sample`` tailoring is computed. ``"lowrank"``: the exact
            recorded-terms path for ``nn.Linear`` layers (no per-sample weight copies), with dense
            per-sample updates for ungrouped ``nn.Conv1d``/``nn.Conv2d``; it needs every adapted
            layer to see the batch at dim 0, and a model that treats sequences independently.
            ``"vmap"``: ``vmap`` over ``grad``, for any model. ``"auto"`` (default): ``"lowrank"``
            when every adapted parameter belongs to an ``nn.Linear`` (where it is measured
            faster), else ``"vmap"`` (whose batching rule already turns per-sample convolutions
            into one grouped convolution). ``last_path`` tells which one ran.
        step_control: ``"none"`` (plain SGD steps) or ``"backtrack"``: every inner step is
            halved, up to four times, for each sequence whose Noether loss it would raise (the
            batch mean for a shared step), and not taken if none of those helps; so the Noether
            loss never increases, whatever ``k`` or the step size. The decisions are constants
            in the backward, as a line search's. Costs one extra rollout without autograd per
            inner step (more where a step is shortened); runs on the shared, ``vmap`` and
            affine paths (``"auto"`` takes ``vmap`` instead of the low-rank path).

    Shapes:
        ``forward(inputs, *args, return_info=False, **kwargs)``: the prediction has the shape of
        ``model(inputs, *args, **kwargs)`` (or of ``predict``'s output).

    Example:
        >>> import torch
        >>> from noether_wrap import NoetherWrapper, Rollout
        >>> from noether_wrap.embeddings import MLPEmbedding
        >>> model = Rollout(torch.nn.Linear(2, 2), horizon=10)
        >>> net = NoetherWrapper(model, MLPEmbedding(2), inner_steps=1, inner_lr=1e-2)
        >>> net(torch.randn(8, 2)).shape
        torch.Size([8, 10, 2])
    """

    log_inner_lr: Tensor

    def __init__(
        self,
        model: nn.Module,
        embedding: nn.Module | Callable[[Tensor], Tensor],
        *,
        inner_steps: int = 1,
        inner_lr: float = 1e-3,
        learn_inner_lr: bool = True,
        loss_form: LossForm = "anchor",
        distance: Distance = "mse",
        window: int = 1,
        per_sample: bool = True,
        adapt: AdaptSpec = None,
        first_order: bool = False,
        reference: Callable[[Tensor], Tensor] | None = None,
        time_dim: int = 1,
        inner_horizon: int | None = None,
        keep_if_better: bool = False,
        max_inner_grad_norm: float | None = None,
        predict: Callable[..., Tensor] | None = None,
        per_sample_path: PerSamplePath = "auto",
        step_control: StepControl = "none",
    ) -> None:
        super().__init__()
        _check_module("model", model)
        if not callable(embedding):
            raise TypeError(f"`embedding` (type: {type(embedding).__name__}) is not callable.")
        _check_int("inner_steps", inner_steps, minimum=0)
        if (
            not isinstance(inner_lr, (int, float))
            or isinstance(inner_lr, bool)
            or not math.isfinite(inner_lr)
            or inner_lr <= 0
        ):
            raise ValueError(f"`inner_lr` must be a positive finite float, got {inner_lr!r}.")
        check_choice("loss_form", loss_form, LOSS_FORMS)
        check_choice("distance", distance, DISTANCES)
        check_choice("per_sample_path", per_sample_path, PER_SAMPLE_PATHS)
        check_choice("step_control", step_control, STEP_CONTROLS)
        if step_control == "backtrack" and per_sample_path == "lowrank":
            raise ValueError(
                "`step_control='backtrack'` needs trial steps the low-rank path does not keep; "
                "use per_sample_path='auto' (it then takes vmap) or 'vmap', or adapt=Affine(...)."
            )
        _check_int("window", window, minimum=1)
        _check_int("time_dim", time_dim, minimum=1)
        if inner_horizon is not None:
            _check_int("inner_horizon", inner_horizon, minimum=1)
        if max_inner_grad_norm is not None and not (
            isinstance(max_inner_grad_norm, (int, float)) and max_inner_grad_norm > 0
        ):
            raise ValueError(
                "`max_inner_grad_norm` must be a positive float or None, got "
                f"{max_inner_grad_norm!r}."
            )
        for name, fn in (("reference", reference), ("predict", predict)):
            if fn is not None and not callable(fn):
                raise TypeError(f"`{name}` must be callable or None, got {type(fn).__name__}.")
        if not (adapt is None or isinstance(adapt, (str, Affine)) or callable(adapt)):
            raise TypeError(
                f"`adapt` must be None, a glob string, a predicate (name, param) -> bool or an "
                f"Affine; got {type(adapt).__name__}."
            )

        if type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            warnings.warn(
                "NoetherWrapper: `model` is a torch.compile'd module, whose compiled code does not "
                "see the swapped-in adapted weights; the wrapper tailors the original module "
                "(`model._orig_mod`) instead. To compile, compile the wrapper: "
                "torch.compile(NoetherWrapper(model, ...)).",
                stacklevel=2,
            )
            model = model._orig_mod  # type: ignore[assignment]
        self.model = model
        self.embedding = embedding
        self.inner_steps = inner_steps
        self.loss_form = loss_form
        self.distance = distance
        self.window = window
        self.per_sample = bool(per_sample)
        self.adapt = adapt
        self.first_order = bool(first_order)
        self.reference = reference
        self.time_dim = time_dim
        self.inner_horizon = inner_horizon
        self.keep_if_better = bool(keep_if_better)
        self.max_inner_grad_norm = (
            None if max_inner_grad_norm is None else float(max_inner_grad_norm)
        )
        self.predict = predict
        self.per_sample_path = per_sample_path
        self.step_control = step_control
        #: Which path the last tailoring call took: "shared", "lowrank", "vmap" or None.
        self.last_path: str | None = None
        self._lowrank_unsupported = False
        self._warned_no_op = False
        first = next((p for p in model.parameters() if p.is_floating_point()), None)
        log_lr = torch.tensor(
            math.log(inner_lr),
            dtype=torch.get_default_dtype() if first is None else first.dtype,
            device=None if first is None else first.device,
        )
        if learn_inner_lr:
            self.log_inner_lr = nn.Parameter(log_lr)
        else:
            self.register_buffer("log_inner_lr", log_lr)
        self.adapted_names()  # fail now, not at the first call, if `adapt` selects nothing
        trainable_g = isinstance(embedding, nn.Module) and any(
            p.requires_grad for p in embedding.parameters()
        )
        if self.first_order and trainable_g:
            warnings.warn(
                "NoetherWrapper(first_order=True): the inner gradient is detached, so the "
                "embedding's trainable parameters get no outer gradient and will not learn. "
                "Use first_order=False to learn the embedding.",
                stacklevel=2,
            )

    @property
    def inner_lr(self) -> float:
        """The current inner step size, ``exp(log_inner_lr)``."""
        return float(self.log_inner_lr.detach().exp())

    def tailoring_parameters(self) -> Iterator[nn.Parameter]:
        """The embedding's trainable parameters and the step size (when learned): what
        meta-training ``g`` with the predictor frozen trains.

        Example:
            >>> import torch
            >>> from noether_wrap import NoetherWrapper, Rollout
            >>> from noether_wrap.embeddings import MLPEmbedding
            >>> net = NoetherWrapper(Rollout(torch.nn.Linear(2, 2), 3), MLPEmbedding(2))
            >>> optimizer = torch.optim.Adam(net.tailoring_parameters(), lr=1e-3)
            >>> len(list(net.tailoring_parameters()))  # g's 6 tensors and log_inner_lr
            7
        """
        if isinstance(self.embedding, nn.Module):
            yield from (p for p in self.embedding.parameters() if p.requires_grad)
        if isinstance(self.log_inner_lr, nn.Parameter):
            yield self.log_inner_lr

    def extra_repr(self) -> str:
        return (
            f"inner_steps={self.inner_steps}, inner_lr={self.inner_lr:.3g}, "
            f"loss_form={self.loss_form!r}, distance={self.distance!r}, window={self.window}, "
            f"per_sample={self.per_sample}, first_order={self.first_order}"
        )

    def adapted_names(self) -> list[str]:
        """Names of the model parameters that ``adapt`` selects, in ``named_parameters`` order.

        With ``adapt=Affine(...)`` no parameter of the model is tailored (the affines are): the
        list is empty, once the pattern is checked to match a module.

        Raises:
            ValueError: ``adapt`` selects no parameter (or an Affine matches no module).
        """
        named = list(self.model.named_parameters())
        adapt = self.adapt
        if isinstance(adapt, Affine):
            if not adapt.modules(self.model):
                names = [n for n, _ in self.model.named_modules() if n]
                raise ValueError(
                    f"`adapt` (={adapt!r}) matches no module of `model`; its modules are: "
                    f"{', '.join(names[:8]) or 'none'}{', ...' if len(names) > 8 else ''}."
                )
            return []
        if adapt is None:
            names = [n for n, p in named if p.requires_grad]
        elif isinstance(adapt, str):
            names = [n for n, _ in named if fnmatch.fnmatchcase(n, adapt)]
        else:
            names = [n for n, p in named if adapt(n, p)]
        if not names:
            available = ", ".join(n for n, _ in named[:8]) or "none"
            raise ValueError(
                f"`adapt` (={adapt!r}) selects no parameter of `model`; its parameters are: "
                f"{available}{', ...' if len(named) > 8 else ''}."
            )
        return names

    def forward(
        self,
        inputs: Tensor,
        *args: Any,
        return_info: bool = False,
        inner_steps: int | None = None,
        **kwargs: Any,
    ) -> Tensor | TailorOutput:
        """Predict with the model tailored to the Noether loss of its own rollout.

        Args:
            inputs: the model's first argument, ``(batch, ...)``.
            *args, **kwargs: passed to the model (and to ``predict``). With ``per_sample``,
                tensors whose first dim is the batch size are split per sequence.
            return_info: return a :class:`TailorOutput` instead of the prediction.
            inner_steps: ``k`` for this call only (inference-time compute: a model trained with
                k = 1 may predict with k = 8); default ``self.inner_steps``.

        Returns:
            The tailored prediction, shaped like ``model(inputs, *args, **kwargs)``; or a
            :class:`TailorOutput` (``noether_losses`` with ``k + 1`` columns) when
            ``return_info`` is True.
        """
        steps = self.inner_steps if inner_steps is None else inner_steps
        _check_int("inner_steps", steps, minimum=0)
        self._check_inputs(inputs)
        if steps == 0:
            return self._untailored(inputs, args, kwargs, return_info)
        result = self._run(
            inputs,
            args,
            kwargs,
            need_final_loss=return_info or self.keep_if_better,
            forward=True,
            steps=steps,
        )
        prediction = result.prediction
        if self.keep_if_better:
            better = result.losses[:, -1] < result.losses[:, 0]
            prediction = _select(better, prediction, result.initial)
        if return_info:
            return TailorOutput(prediction, result.initial, result.losses)
        return prediction

    def _untailored(
        self, inputs: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], return_info: bool
    ) -> Tensor | TailorOutput:
        """``inner_steps == 0``: exactly the model (or ``predict``), called directly."""
        try:
            if self.predict is not None:
                out = self.predict(self.model, inputs, *args, **kwargs)
            else:
                out = self.model(inputs, *args, **kwargs)
        except RuntimeError as error:
            raise ValueError(
                f"`model` failed on `inputs` of shape {tuple(inputs.shape)} (inner_steps=0): "
                f"{error}. Check that the inputs fit the model."
            ) from error
        if not return_info:
            return out
        if self.predict is None:
            rollout = out
        else:  # on clones of the buffers: one call updates running statistics once
            buffers = {n: b.clone() for n, b in self.model.named_buffers()}
            rollout = functional_call(self.model, buffers, (inputs, *args), kwargs)
        return TailorOutput(out, out, self._loss(inputs, rollout).unsqueeze(1))

    def _write_back_buffers(self, final: dict[str, Tensor] | None) -> None:
        """Give the model the buffers its tailored prediction pass left, as one unwrapped call
        would have: BatchNorm running statistics in training mode (every other pass of the call
        ran on clones). Buffers the pass did not change are left alone."""
        if not final:
            return
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                value = final.get(name)
                if value is not None and not torch.equal(value, buffer):
                    buffer.copy_(value)

    def _warn_if_diverged(self, losses: Tensor) -> None:
        """Warn when tailoring raised some sequence's Noether loss by more than a factor
        ``_DIVERGED``: a finite blow-up (e.g. inputs far outside the data) that no
        non-finite check sees."""
        first, last = losses[:, 0].detach(), losses[:, -1].detach()
        grew = last > _DIVERGED * first
        if bool(grew.any()):
            warnings.warn(
                _DIVERGED_WARNING.format(count=int(grew.sum()), batch=losses.shape[0]),
                RuntimeWarning,
                stacklevel=7,
            )

    def _check_inputs(self, inputs: object) -> None:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"`inputs` must be a Tensor, got {type(inputs).__name__}.")
        if inputs.dim() < 1 or inputs.shape[0] == 0:
            raise ValueError(
                f"`inputs` must have a non-empty batch axis first; got shape {tuple(inputs.shape)}."
            )
        if self.reference is None and not inputs.is_floating_point():
            raise TypeError(
                "`inputs` is the state the Noether loss anchors on, so it must be a floating-point "
                f"tensor; got dtype {inputs.dtype}. Pass `reference` if the model reads other "
                "inputs."
            )
        if any(size == 0 for size in inputs.shape):
            raise ValueError(f"`inputs` has an empty axis: shape {tuple(inputs.shape)}.")
        devices = {p.device for p in self.model.parameters()}
        if len(devices) == 1 and inputs.device not in devices:
            raise ValueError(
                f"`inputs` is on {inputs.device} but the model's parameters are on "
                f"{devices.pop()}; move one of them."
            )
        dtypes = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        if inputs.is_floating_point() and len(dtypes) == 1 and inputs.dtype not in dtypes:
            raise ValueError(
                f"`inputs` has dtype {inputs.dtype} but the model's parameters are "
                f"{dtypes.pop()}; convert one of them (e.g. `inputs.to(...)` or `model.to(...)`)."
            )

    def _run(
        self,
        inputs: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        need_final_loss: bool,
        materialise: bool = False,
        forward: bool = False,
        steps: int | None = None,
    ) -> _func.InnerResult:
        """Run the inner loop on the path that applies, outside inference mode.

        ``materialise`` asks for a path that returns the adapted weights (not the low-rank one);
        ``forward`` marks a prediction call, which updates the model's buffers as one unwrapped
        call would (:meth:`_write_back_buffers`) and warns about diverged steps; ``steps``
        overrides ``inner_steps``.
        """
        steps = self.inner_steps if steps is None else steps
        if self.per_sample:
            self._check_no_batch_norm_training()
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                args = tuple(a.clone() if isinstance(a, Tensor) else a for a in args)
                kwargs = {k: v.clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()}
                return self._run_paths(
                    inputs.clone(), args, kwargs, need_final_loss, materialise, forward, steps
                )
        return self._run_paths(inputs, args, kwargs, need_final_loss, materialise, forward, steps)

    def _run_paths(
        self,
        inputs: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        need_final_loss: bool,
        materialise: bool,
        forward: bool,
        steps: int,
    ) -> _func.InnerResult:
        problem = self._problem(need_final_loss, steps)
        selected = set(self.adapted_names())
        params: dict[str, Tensor] = {
            n: p for n, p in self.model.named_parameters() if n in selected
        }
        run = self._choose_path(list(params), materialise)
        try:
            try:
                result = run(problem, params, inputs, args, kwargs)
            except _lowrank.Unsupported as why:
                if self.per_sample_path == "lowrank":
                    raise ValueError(
                        f"`per_sample_path='lowrank'` cannot tailor this model: {why}. Use "
                        "per_sample_path='auto' or 'vmap'."
                    ) from None
                self._lowrank_unsupported = True
                run = self._choose_path(list(params), materialise)
                result = run(problem, params, inputs, args, kwargs)
            if not bool(result.ok.all()):
                result = self._recover(problem, run, params, inputs, args, kwargs, result)
        except RuntimeError as error:
            first = problem.step_index == 0 and not problem.started
            if first or self.last_path == "vmap":
                raise self._path_error(problem, inputs, args, kwargs, error) from error
            where = (
                f"at inner step {problem.step_index} of inner_steps={problem.steps} for inputs "
                f"of shape {tuple(inputs.shape)}"
            )
            raise RuntimeError(f"NoetherWrapper: tailoring failed {where}: {error}") from error
        self._warn_if_no_op(result)
        if forward:
            self._write_back_buffers(problem.final_buffers)
            self._warn_if_diverged(result.losses)
        return result

    def _path_error(
        self,
        problem: _func.InnerProblem,
        inputs: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        error: RuntimeError,
    ) -> ValueError:
        """Say why tailoring failed: the inputs do not fit the model, the loss does not depend on
        the adapted parameters, or the model runs but this path cannot tailor it (and what
        will)."""
        try:
            with torch.no_grad():
                problem.rollout({}, inputs, args, kwargs)
        except Exception:  # the plain model fails too: the inputs do not fit it
            return ValueError(
                f"`model` or `embedding` failed on `inputs` of shape {tuple(inputs.shape)} in "
                f"the first rollout (inner_steps={problem.steps}): {error}. Check that the "
                "inputs fit the model."
            )
        text = str(error)
        if "does not require grad" in text or "not have been used in the graph" in text:
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
        return _PathUnsupported(
            f"NoetherWrapper: the model runs on these inputs, but the {self.last_path!r} path "
            f"cannot tailor it: {text.splitlines()[0]}. Ways through: "
            "adapt=noether_wrap.Affine('<module glob>') (per-sequence affines, any layer type); "
            "an `adapt` that selects only nn.Linear/Conv layers (the low-rank path, no vmap); "
            f"or per_sample=False (one step shared by the batch).{hint}"
        )

    def _warn_if_no_op(self, result: _func.InnerResult) -> None:
        """Warn (once) when the inner steps left the prediction exactly as it was although the
        Noether loss was not zero: the adapted parameters do not reach the loss."""
        held_back = self.step_control == "backtrack"  # may reject every step, by design
        if held_back or self._warned_no_op or result.prediction.shape != result.initial.shape:
            return
        moved = not torch.equal(result.prediction.detach(), result.initial.detach())
        if moved or not bool((result.losses[:, 0].detach() > 0).any()):
            return
        self._warned_no_op = True
        warnings.warn(
            "NoetherWrapper: the inner steps did not change the prediction although the Noether "
            "loss is not zero: its gradient with respect to the adapted parameters is zero. The "
            "model may run without autograd inside (torch.no_grad, .detach(), an adjoint ODE "
            "solver such as torchdiffeq.odeint_adjoint), `adapt` may select parameters the "
            "rollout does not use, or the embedding is saturated.",
            RuntimeWarning,
            stacklevel=6,
        )

    def tailor(self, inputs: Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The adapted parameters for ``inputs``, to inspect or to keep.

        Runs the same inner steps as ``forward`` on a path that materialises the weights: ``vmap``
        (per sample; where ``vmap`` cannot batch the model, the shared path one sequence at a
        time, which is the same computation), the shared path, or the affine path (whose
        "parameters" are the tailored affines). With ``keep_if_better``, a sequence whose step did
        not lower its Noether loss gets the untailored weights, as ``forward`` gives it the
        untailored prediction.

        Args:
            inputs, *args, **kwargs: as for ``forward``.

        Returns:
            ``{name: tensor}`` for every adapted parameter of ``model``: shaped ``(batch,
            *param.shape)`` with ``per_sample=True``, else ``param.shape``. Differentiable when
            autograd is on.

        Example:
            >>> import torch
            >>> from noether_wrap import NoetherWrapper, Rollout
            >>> net = NoetherWrapper(Rollout(torch.nn.Linear(2, 2), 5), lambda s: s.pow(2).sum(-1))
            >>> {k: tuple(v.shape) for k, v in net.tailor(torch.randn(3, 2)).items()}
            {'step.weight': (3, 2, 2), 'step.bias': (3, 2)}
        """
        if self.inner_steps == 0:
            own: dict[str, Tensor] = dict(self.model.named_parameters())
            base = {n: own[n] for n in self.adapted_names()}
            if not self.per_sample:
                return base
            return {n: p.expand(inputs.shape[0], *p.shape) for n, p in base.items()}
        self._check_inputs(inputs)
        try:
            result = self._run(
                inputs, args, kwargs, need_final_loss=self.keep_if_better, materialise=True
            )
        except _PathUnsupported:
            result = self._tailor_one_by_one(inputs, args, kwargs)
        assert result.params is not None
        params = result.params
        if self.keep_if_better and self.per_sample:
            worse = result.losses[:, -1] >= result.losses[:, 0]
            own = dict(self.model.named_parameters())
            params = {
                n: _select(~worse, p, own[n].expand_as(p))
                if n in own
                else _select(~worse, p, 0 * p)
                for n, p in params.items()
            }
        return params

    def _tailor_one_by_one(
        self, inputs: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _func.InnerResult:
        """Per-sample tailoring as a loop of one-sequence shared steps (exactly the same steps)."""
        batch = inputs.shape[0]
        dims_a = _func.batched_dims(args, batch)
        dims_k = _func.batched_dims(tuple(kwargs.values()), batch)
        per_sample, self.per_sample = self.per_sample, False
        try:
            parts = []
            for i in range(batch):
                a = tuple(v[i : i + 1] if d == 0 else v for v, d in zip(args, dims_a))
                kw = {
                    n: (v[i : i + 1] if d == 0 else v) for (n, v), d in zip(kwargs.items(), dims_k)
                }
                parts.append(
                    self._run(inputs[i : i + 1], a, kw, self.keep_if_better, materialise=True)
                )
        finally:
            self.per_sample = per_sample
        found = [p.params for p in parts if p.params is not None]
        assert len(found) == batch
        params = {n: torch.stack([f[n] for f in found]) for n in found[0]}
        return _func.InnerResult(
            torch.cat([p.prediction for p in parts]),
            torch.cat([p.initial for p in parts]),
            torch.cat([p.losses for p in parts]),
            torch.cat([p.ok for p in parts]),
            params,
        )

    def tailored_model(
        self, inputs: Tensor, *args: Any, index: int | None = None, **kwargs: Any
    ) -> nn.Module:
        """A plain copy of ``model`` carrying the adapted weights, e.g. for deployment.

        Args:
            inputs, *args, **kwargs: as for ``forward``.
            index: with ``per_sample=True``, which sequence's weights to take (required unless
                the batch has one sequence).

        Returns:
            A deep copy of ``model`` (detached from the graph) whose adapted parameters are the
            tailored ones; ``tailored_model(x[i:i+1])(x[i:i+1])`` equals ``net(x[i:i+1])``.
        """
        params = self.tailor(inputs, *args, **kwargs)
        if self.per_sample:
            batch = inputs.shape[0]
            if index is None and batch != 1:
                raise ValueError(
                    f"`index` is required with per_sample=True and a batch of {batch}: every "
                    "sequence has its own weights."
                )
            i = 0 if index is None else index
            if not -batch <= i < batch:
                raise ValueError(f"`index` must be in [{-batch}, {batch}), got {index}.")
            params = {n: p[i] for n, p in params.items()}
        if isinstance(self.adapt, Affine):
            return _affine.hooked_copy(
                self.model, self.adapt, {n: p.reshape(-1) for n, p in params.items()}
            )
        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, value in params.items():
                model.get_parameter(name).copy_(value)
        return model

    def _choose_path(self, names: list[str], materialise: bool) -> Callable[..., _func.InnerResult]:
        """The inner-loop runner for this call; records its name in ``last_path``."""
        if isinstance(self.adapt, Affine):
            self.last_path = "affine"
            return functools.partial(
                _affine.tailor_affine, spec=self.adapt, per_sample=self.per_sample
            )
        if not self.per_sample:
            self.last_path = "shared"
            return _func.tailor_shared
        if torch.compiler.is_compiling():
            if self.per_sample_path == "lowrank":
                raise ValueError(
                    "`per_sample_path='lowrank'` does not work inside torch.compile (its forward "
                    "hooks are not traced); use per_sample_path='auto' or 'vmap' when compiling."
                )
            self.last_path = "vmap"
            return _func.tailor_per_sample
        lowrank_ok = not (self._lowrank_unsupported or materialise or self.step_control != "none")
        if self.per_sample_path != "vmap" and lowrank_ok:
            layers = _lowrank.supported_layers(self.model, names)
            auto_ok = layers is not None and (
                self.per_sample_path == "lowrank"
                or all(type(self.model.get_submodule(n)) is nn.Linear for n in layers)
            )
            if layers is not None and auto_ok:
                self.last_path = "lowrank"
                return functools.partial(_lowrank.tailor_lowrank, layer_spec=layers)
            if self.per_sample_path == "lowrank":
                raise ValueError(
                    "`per_sample_path='lowrank'` needs every adapted parameter to belong to an "
                    "nn.Linear or an ungrouped nn.Conv1d/Conv2d; use `adapt` to select only "
                    "those, or per_sample_path='auto'."
                )
        self.last_path = "vmap"
        return _func.tailor_per_sample

    def _recover(
        self,
        problem: _func.InnerProblem,
        run: Callable[..., _func.InnerResult],
        params: dict[str, Tensor],
        inputs: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: _func.InnerResult,
    ) -> _func.InnerResult:
        """Give sequences whose inner steps went non-finite their untailored prediction.

        The tailored values of the other sequences are recomputed without the failed ones, so
        no non-finite value enters the graph that the outer gradient flows through.
        """
        ok = result.ok
        batch = inputs.shape[0]
        warnings.warn(
            _NONFINITE_WARNING.format(count=int((~ok).sum()), batch=batch),
            RuntimeWarning,
            stacklevel=7,
        )
        buffers = problem.fresh_buffers()
        initial = problem.prediction(params, inputs, args, kwargs, buffers)
        if not problem.differentiable:
            initial = initial.detach()
        if not self.per_sample or not bool(ok.any()):
            problem.final_buffers = buffers  # the pass whose prediction is returned
            untouched = None if result.params is None else params
            return _func.InnerResult(initial, initial, result.losses.detach(), ok, untouched)
        keep = ok.nonzero().squeeze(1)
        dims_a = _func.batched_dims(args, batch)
        sub_args = tuple(a[keep] if d == 0 else a for a, d in zip(args, dims_a))
        kw_names = tuple(kwargs)
        dims_k = _func.batched_dims(tuple(kwargs.values()), batch)
        sub_kwargs = {
            n: (v[keep] if d == 0 else v) for n, v, d in zip(kw_names, kwargs.values(), dims_k)
        }
        sub = run(problem, params, inputs[keep], sub_args, sub_kwargs)
        prediction = initial.index_copy(0, keep, sub.prediction)
        losses = result.losses.detach().index_copy(0, keep, sub.losses.detach())
        adapted = None
        if sub.params is not None:
            adapted = {
                n: p.expand(batch, *p.shape).index_copy(0, keep, sub.params[n])
                for n, p in params.items()
            }
        return _func.InnerResult(prediction, initial, losses, ok, adapted)

    def _problem(self, need_final_loss: bool, steps: int) -> _func.InnerProblem:
        differentiable = torch.is_grad_enabled()
        buffers = dict(self.model.named_buffers())
        lr = self.log_inner_lr.exp()
        if not differentiable:
            lr = lr.detach()
        return _func.InnerProblem(
            model=self.model,
            predict=None if self.predict is None else _func.Bound(self.model, self.predict),
            buffers=buffers,
            loss=self._loss,
            steps=steps,
            step_control=self.step_control,
            lr=lr,
            create_graph=differentiable and not self.first_order,
            differentiable=differentiable,
            max_grad_norm=self.max_inner_grad_norm,
            need_final_loss=need_final_loss,
        )

    def _loss(self, inputs: Tensor, output: Tensor) -> Tensor:
        """Per-sequence Noether loss ``(batch,)`` of ``output = model(inputs)``."""
        if not isinstance(output, Tensor):
            raise TypeError(f"`model` must return a Tensor, got {type(output).__name__}.")
        if output.dim() < 3 or output.dim() <= self.time_dim:
            raise ValueError(
                f"`model` output must have a time axis: (batch, T, *state) with time at "
                f"`time_dim` (={self.time_dim}) and at least one state axis; got shape "
                f"{tuple(output.shape)}. Wrap a one-step model in Rollout, or use shape "
                "(batch, T, 1) for a scalar series."
            )
        predictions = output.movedim(self.time_dim, 1)
        if self.inner_horizon is not None:
            predictions = predictions[:, : self.inner_horizon]
        if self.reference is not None:
            x0 = self.reference(inputs)
        elif inputs.dim() == output.dim():
            x0 = inputs.movedim(self.time_dim, 1)
        else:
            x0 = inputs
        try:
            frames = as_reference_frames(x0, predictions, self.time_dim)
        except ValueError as error:
            raise ValueError(
                f"`model` output and its reference disagree: {error} Pass `reference` "
                "(inputs -> x0) when `inputs` is not the state itself."
            ) from None
        if frames.shape[1] < self.window:
            raise ValueError(
                f"the reference must provide at least `window` (={self.window}) frames, got "
                f"{frames.shape[1]}; pass inputs with a time axis or a `reference`."
            )
        return per_sequence_noether_loss(
            frames, predictions, self.embedding, self.loss_form, self.distance, self.window
        )

    def _check_no_batch_norm_training(self) -> None:
        for owner, module in (("model", self.model), ("embedding", self.embedding)):
            if not isinstance(module, nn.Module):
                continue
            for name, sub in module.named_modules():
                if isinstance(sub, _BatchNorm) and sub.training:
                    raise ValueError(
                        f"`per_sample=True` cannot tailor `{owner}` with BatchNorm in training "
                        f"mode ({name or owner}: {type(sub).__name__}): batch statistics couple "
                        "the sequences of a batch, so no sequence can be tailored on its own. "
                        "Call .eval() on that module to use running statistics, replace it with "
                        "GroupNorm or LayerNorm, or pass per_sample=False."
                    )


class _PathUnsupported(ValueError):
    """The model runs, but the chosen per-sample path cannot tailor it (no vmap rule, ...)."""


def _select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where ``mask`` (``(batch,)``) is True, else ``b``."""
    return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)


def _check_module(name: str, value: object) -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"`{name}` (type: {type(value).__name__}) is not an nn.Module.")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "non-negative" if minimum == 0 else f">= {minimum}"
        raise ValueError(f"`{name}` must be a {kind} int, got {value!r}.")
