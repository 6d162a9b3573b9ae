"""NoetherWrapper: tailor a sequence predictor to a learned conservation law at prediction time.

The class is a facade: it holds the model, the embedding, the step size and the checked
:class:`~noether_wrap._options.Options`; :func:`noether_wrap._engine.run_call` runs a call and
:mod:`noether_wrap._inner` takes the steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from noether_wrap import _engine
from noether_wrap._checks import (
    check_batch_norm_eval,
    check_inputs,
    check_int,
    check_positive_float,
)
from noether_wrap._inner import InnerResult
from noether_wrap._options import (
    OPTION_NAMES,
    AdaptSpec,
    Options,
    PerSamplePath,
    StepControl,
    StepRule,
    load_settings,
    near_option,
    saved_settings,
    select_adapted,
)
from noether_wrap._warn import warn
from noether_wrap.loss import Distance, LossForm

#: The Polyak rule's default fraction γ: remove the Noether loss to first order in the loss
#: (for its squared residual: halve the residual; γ = 2 is the Gauss–Newton step).
DEFAULT_POLYAK_FRACTION = 1.0
DEFAULT_FIXED_STEP = 1e-3


class TailorOutput(NamedTuple):
    """What ``NoetherWrapper(..., return_info=True)`` returns.

    Attributes:
        prediction: the tailored prediction, shaped like the wrapped model's output.
        initial_prediction: the prediction before any inner step, same shape.
        noether_losses: ``(batch, inner_steps + 1)``, each sequence's Noether loss before every
            inner step and after the last one (of the returned prediction: where the guard kept
            the plain prediction, the last equals the first).
        moves: ``(batch,)``, with a ``guard``: how far each tailored rollout moved from the
            plain one, relative to the plain rollout's displacement from its start; else None.
        guarded: ``(batch,)`` bool, with a ``guard``: True where it kept the plain prediction.
    """

    prediction: Tensor
    initial_prediction: Tensor
    noether_losses: Tensor
    moves: Tensor | None = None
    guarded: Tensor | None = None


class NoetherWrapper(nn.Module):
    """Tailor every prediction of a sequence predictor to a learned conserved quantity.

    On each call the wrapper rolls ``model`` out, takes ``inner_steps`` gradient steps on the
    Noether loss of the rollout (see :func:`noether_wrap.noether_loss`) with respect to the
    adapted parameters of ``model``, and predicts again with the adapted parameters. The steps
    are differentiable (second order, as in MAML), so an ordinary training loop on the returned
    prediction trains the model, the embedding and the step size together. The wrapped model's
    own parameters and buffers are never written. Every option below is also an attribute,
    checked again whenever it is assigned.

    Args:
        model: a sequence predictor, ``model(inputs, *args, **kwargs)`` -> ``(batch, T, *state)``
            with time at ``time_dim`` (``*state`` has at least one axis).
        embedding: ``g``, maps ``(N, *state)`` (``(N, window * state[0], *state[1:])`` when
            ``window > 1``) to ``(N, m)`` or ``(N,)``.
        inner_steps: ``k >= 0``; 0 makes the wrapper exactly ``model``.
        inner_lr: ``> 0``, stored as ``log_inner_lr``: the step size (``step_rule="fixed"``,
            default 1e-3) or the fraction γ of the Noether loss each step removes to first
            order (``"polyak"``, default 1.0).
        learn_inner_lr: whether ``log_inner_lr`` is a Parameter (else a buffer).
        step_rule: ``"fixed"``: ``θ ← θ − lr ∇L``. ``"polyak"``: per sequence (the batch mean
            when shared) ``θ ← θ − γ L / ‖∇L‖² ∇L``: scale-free, the same γ means the same for
            every ``g``, model, horizon and data scale; zero loss gives a zero step. The loss is
            a squared residual, so γ = 1 removes half of it to first order and γ = 2 is the
            Gauss–Newton step.
        polyak_cap: a Polyak step moves the adapted parameters by at most this fraction of their
            norm (the affines' identity's norm on the affine path), so a vanishing gradient with
            a non-zero loss (a saturated ``g``) never gives an unbounded step; None: uncapped.
        inner_momentum: β in [0, 1), or None: heavy-ball momentum on the inner steps, each
            step adding β times the previous step (as higher's and torchopt's
            ``sgd(momentum=β)``; with the Polyak rule each step's own length is the rule's).
            Changes nothing at ``inner_steps = 1``.
        guard: τ > 0, or None (off). Per sequence, the tailored prediction is replaced by the
            untailored one where the tailored rollout moved from the plain rollout by more than
            τ times the plain rollout's own displacement from its start
            (``‖ŷ − ŷ₀‖ / ‖ŷ₀ − x₀‖ > τ``): tailoring may correct a prediction, not send it
            elsewhere. Decided without autograd (a constant in the backward), on every path;
            ``return_info`` reports each sequence's move and decision.
        loss_form: ``"anchor"`` (compare to the start) or ``"chain"`` (to the previous step).
        distance: ``"mse"`` or ``"cosine"``.
        window: frames the embedding sees at once.
        per_sample: True: every sequence is tailored on its own (low-rank, ``vmap`` or affine
            path, see ``per_sample_path``); False: one step shared by the batch.
        adapt: what is tailored: None (all trainable parameters), a glob on parameter names
            (``"decoder.*"``), a predicate ``(name, param) -> bool``, or
            :class:`~noether_wrap.Affine` (per-sequence scale and shift on matching modules'
            outputs, for any architecture).
        first_order: drop second-order terms; the embedding then gets no outer gradient.
        reference: ``inputs -> x0``, the observed frames the loss anchors on, ``(batch, *state)``
            or ``(batch, r, *state)``; default: ``inputs`` when it has no time axis, else its
            last ``window`` frames along ``time_dim``.
        time_dim: the time axis of the model's output (and of ``inputs`` if it has one).
        inner_horizon: the Noether loss uses only the first ``inner_horizon`` predicted steps.
        step_horizon: the rollout horizon the step was chosen at; :func:`~noether_wrap.tune`
            sets it, and a training call records it when the step is learned. A call whose
            Noether loss reads another horizon warns once (for a fixed step the gradient grows
            with the horizon; for Polyak the fraction that helps changes with it).
        keep_if_better: per sequence, keep the untailored prediction where tailoring did not
            lower the Noether loss.
        max_inner_grad_norm: clip each inner gradient (per sequence when ``per_sample``).
        predict: ``(model, inputs, *args, **kwargs) -> Tensor``, what the adapted model returns
            when that is not the rollout the loss is computed on (e.g. a vector field).
        per_sample_path: ``"lowrank"`` (exact per-sample updates of ``nn.Linear`` layers, dense
            or recorded terms, whichever costs less, and dense updates for
            ungrouped convolutions; no weight copies), ``"vmap"`` (any model ``vmap`` can
            batch) or ``"auto"`` (low-rank where every adapted parameter is an ``nn.Linear``'s).
        step_control: ``"none"`` or ``"backtrack"``: each step is halved, up to four times, for
            each sequence (the batch mean when shared) whose Noether loss it would raise, and
            dropped if none helps; decisions are constants in the backward. On every path.

    Attributes:
        last_path: the path the last call took: ``"shared"``, ``"lowrank"``, ``"vmap"`` or
            ``"affine"``.
        last_horizon: how many predicted steps the last call's Noether loss read.

    Settings are state: ``state_dict()`` carries every option with a plain value (everything
    :func:`~noether_wrap.tune` or an assignment sets: ``inner_steps``, ``step_rule``, ``guard``,
    ``step_horizon``, ...) beside ``log_inner_lr``, so a wrapper built with defaults and loaded
    from it predicts the same. A load that overrides an option set away from its default warns.

    Shapes:
        ``forward(inputs, *args, return_info=False, inner_steps=None, **kwargs)``: the
        prediction has the shape of ``model(inputs, *args, **kwargs)`` (or of ``predict``'s).

    Example:
        >>> import torch
        >>> from noether_wrap import NoetherWrapper, Rollout
        >>> from noether_wrap.embeddings import MLPEmbedding
        >>> model = Rollout(torch.nn.Linear(2, 2), horizon=10)
        >>> net = NoetherWrapper(model, MLPEmbedding(2), step_rule="polyak", inner_lr=0.5)
        >>> net(torch.randn(8, 2)).shape
        torch.Size([8, 10, 2])
    """

    log_inner_lr: Tensor
    options: Options
    # The options, read and written as attributes (checked on assignment, see __setattr__).
    inner_steps: int
    polyak_cap: float | None
    inner_momentum: float | None
    guard: float | None
    step_horizon: int | None
    loss_form: LossForm
    distance: Distance
    window: int
    per_sample: bool
    adapt: AdaptSpec
    first_order: bool
    reference: Callable[[Tensor], Tensor] | None
    time_dim: int
    inner_horizon: int | None
    keep_if_better: bool
    max_inner_grad_norm: float | None
    predict: Callable[..., Tensor] | None
    per_sample_path: PerSamplePath
    step_control: StepControl
    step_rule: StepRule

    def __init__(
        self,
        model: nn.Module,
        embedding: nn.Module | Callable[[Tensor], Tensor],
        *,
        inner_steps: int = 1,
        inner_lr: float | None = None,
        learn_inner_lr: bool = True,
        step_rule: StepRule = "fixed",
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
        polyak_cap: float | None = Options.polyak_cap,
        inner_momentum: float | None = None,
        guard: float | None = None,
        step_horizon: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` (type: {type(model).__name__}) is not an nn.Module.")
        if not callable(embedding):
            raise TypeError(f"`embedding` (type: {type(embedding).__name__}) is not callable.")
        given = locals()
        options = Options(**{name: given[name] for name in OPTION_NAMES})
        if inner_lr is None:
            inner_lr = DEFAULT_POLYAK_FRACTION if step_rule == "polyak" else DEFAULT_FIXED_STEP
        check_positive_float("inner_lr", inner_lr)
        compiled = getattr(model, "_orig_mod", None)
        if type(model).__name__ == "OptimizedModule" and isinstance(compiled, nn.Module):
            warn(
                "NoetherWrapper: `model` is a torch.compile'd module, whose compiled code does not "
                "see the swapped-in adapted weights; the wrapper tailors the original module "
                "(`model._orig_mod`) instead (tailoring runs eagerly inside torch.compile; see "
                "docs/performance.md)."
            )
            model = compiled
        self.model = model
        self.embedding = embedding
        object.__setattr__(self, "options", options)
        self.last_path: str | None = None
        self.last_horizon: int | None = None
        #: The once-only warnings this wrapper has raised (the engine adds to it).
        self._warned: set[str] = set()
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
        self.register_load_state_dict_pre_hook(self._settings_missing)  # type: ignore[no-untyped-call]
        trainable_g = isinstance(embedding, nn.Module) and any(
            p.requires_grad for p in embedding.parameters()
        )
        if options.first_order and trainable_g:
            warn(
                "NoetherWrapper(first_order=True): the inner gradient is detached, so the "
                "embedding's trainable parameters get no outer gradient and will not learn. "
                "Use first_order=False to learn the embedding."
            )
        self._built = True  # from here on, a near miss of an option name is an error

    def __setattr__(self, name: str, value: Any) -> None:
        if name in OPTION_NAMES:
            before, options = self.options, self.options.replace(**{name: value})
            object.__setattr__(self, "options", options)
            if name == "adapt":
                try:
                    self.adapted_names()
                except ValueError:
                    object.__setattr__(self, "options", before)
                    raise
            if name in ("inner_horizon", "step_rule"):
                self._warned.discard("horizon")
            return
        fresh = "_built" in self.__dict__ and name not in self.__dict__  # checked first: cheap
        near = near_option(name) if fresh else None
        if near is not None:
            raise AttributeError(
                f"`{name}` is not an option of NoetherWrapper; did you mean `{near}`? (An "
                "assignment to a new attribute would be ignored by the wrapper.)"
            )
        super().__setattr__(name, value)

    def get_extra_state(self) -> dict[str, Any]:
        """The settings ``state_dict()`` carries: every option with a plain value."""
        return {"version": 1, "options": saved_settings(self.options)}

    def set_extra_state(self, state: Any) -> None:
        """Apply saved settings (see :meth:`get_extra_state`); warn where they override an
        option this wrapper had set away from its default."""
        if not isinstance(state, dict) or not isinstance(state.get("options"), dict):
            raise ValueError(
                "the NoetherWrapper settings in this state_dict (`_extra_state`) are not a dict "
                f"with an 'options' entry; got {type(state).__name__}."
            )
        options, overridden = load_settings(self.options, state["options"])
        if overridden:
            changes = ", ".join(
                f"{n}={getattr(self.options, n)!r} -> {getattr(options, n)!r}" for n in overridden
            )
            warn(
                f"NoetherWrapper.load_state_dict: the saved settings override options this "
                f"wrapper was built or set with: {changes}. Settings are state (what `tune` or "
                "an assignment set travels with the weights); assign them again after loading "
                "to keep your own."
            )
        object.__setattr__(self, "options", options)
        self._warned.discard("horizon")

    @staticmethod
    def _settings_missing(
        module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """A state_dict saved before settings were state has no ``_extra_state``: keep the
        wrapper's own settings instead of failing a strict load."""
        state_dict.setdefault(prefix + "_extra_state", module.get_extra_state())

    def __getattr__(self, name: str) -> Any:
        if name in OPTION_NAMES:
            return getattr(self.__dict__["options"], name)
        return super().__getattr__(name)

    @property
    def inner_lr(self) -> float:
        """The current step size (or Polyak fraction), ``exp(log_inner_lr)``; assignable."""
        return float(self.log_inner_lr.detach().exp())

    @inner_lr.setter
    def inner_lr(self, value: float) -> None:
        value = check_positive_float("inner_lr", value)
        with torch.no_grad():
            self.log_inner_lr.fill_(math.log(value))

    def tailoring_parameters(self) -> Iterator[nn.Parameter]:
        """The embedding's trainable parameters and the step size (when learned): what
        meta-training ``g`` with the predictor frozen trains.

        Example:
            >>> import torch
            >>> from noether_wrap import NoetherWrapper, Rollout
            >>> from noether_wrap.embeddings import MLPEmbedding
            >>> net = NoetherWrapper(Rollout(torch.nn.Linear(2, 2), 3), MLPEmbedding(2))
            >>> len(list(net.tailoring_parameters()))  # g's 6 tensors and log_inner_lr
            7
        """
        if isinstance(self.embedding, nn.Module):
            yield from (p for p in self.embedding.parameters() if p.requires_grad)
        if isinstance(self.log_inner_lr, nn.Parameter):
            yield self.log_inner_lr

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"inner_steps={o.inner_steps}, inner_lr={self.inner_lr:.3g}, step_rule={o.step_rule!r}"
            f", loss_form={o.loss_form!r}, distance={o.distance!r}, window={o.window}, "
            f"per_sample={o.per_sample}, first_order={o.first_order}"
        )

    def adapted_names(self) -> list[str]:
        """Names of the model parameters that ``adapt`` selects, in ``named_parameters`` order
        (empty for an :class:`~noether_wrap.Affine`, once it is checked to match a module).

        Raises:
            ValueError: ``adapt`` selects no parameter (or an Affine matches no module).
        """
        return select_adapted(self.options.adapt, self.model)

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
            inner_steps: ``k`` for this call only (inference-time compute); default
                ``self.inner_steps``.

        Returns:
            The tailored prediction, shaped like ``model(inputs, *args, **kwargs)``; or a
            :class:`TailorOutput` (``noether_losses`` with ``k + 1`` columns).
        """
        steps = self.options.inner_steps if inner_steps is None else inner_steps
        check_int("inner_steps", steps, minimum=0)
        self._check(inputs)
        job = self._job()
        if steps == 0:
            out, losses = _engine.untailored(job, inputs, args, kwargs, return_info)
            return out if losses is None else TailorOutput(out, out, losses)
        try:
            result: InnerResult = _engine.run_call(
                job,
                inputs,
                args,
                kwargs,
                steps=steps,
                need_final_loss=return_info or self.options.keep_if_better,
                forward=True,
            )
        finally:
            self._record(job)
        if not return_info:
            return result.prediction
        guarded = None
        if result.moves is not None and self.options.guard is not None:
            guarded = ~(result.moves <= self.options.guard)
        return TailorOutput(result.prediction, result.initial, result.losses, result.moves, guarded)

    def _check(self, inputs: object) -> None:
        check_inputs(self.model, inputs, has_reference=self.options.reference is not None)
        if self.options.per_sample:
            check_batch_norm_eval(self.model, self.embedding)

    def tailor(self, inputs: Tensor, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The adapted parameters for ``inputs``, to inspect or to keep.

        Runs the same inner steps as ``forward`` on a path that materialises the weights
        (``vmap``, or one sequence at a time where ``vmap`` cannot batch the model; shared;
        affine, whose "parameters" are the tailored affines). With ``keep_if_better`` a sequence
        whose step did not lower its Noether loss gets the untailored weights.

        Returns:
            ``{name: tensor}`` for every adapted parameter: ``(batch, *param.shape)`` with
            ``per_sample=True``, else ``param.shape``. Differentiable when autograd is on.

        Example:
            >>> import torch
            >>> from noether_wrap import NoetherWrapper, Rollout
            >>> net = NoetherWrapper(Rollout(torch.nn.Linear(2, 2), 5), lambda s: s.pow(2).sum(-1))
            >>> {k: tuple(v.shape) for k, v in net.tailor(torch.randn(3, 2)).items()}
            {'step.weight': (3, 2, 2), 'step.bias': (3, 2)}
        """
        self._check(inputs)
        job = self._job()
        try:
            return _engine.tailor(job, inputs, args, kwargs)
        finally:
            self._record(job)

    def tailored_model(
        self, inputs: Tensor, *args: Any, index: int | None = None, **kwargs: Any
    ) -> nn.Module:
        """A plain copy of ``model`` carrying the adapted weights of sequence ``index``.

        Args:
            inputs, *args, **kwargs: as for ``forward``.
            index: which sequence's weights; required for a batch of several sequences when
                they differ (``per_sample=True``, or ``keep_if_better`` on a shared step, which
                keeps the untailored weights for the sequences the step did not help).

        Returns:
            A deep copy of ``model`` (detached from the graph);
            ``tailored_model(x, index=i)(x[i:i+1])`` equals ``net(x)[i:i+1]``.
        """
        self._check(inputs)
        job = self._job()
        try:
            return _engine.tailored_model(job, inputs, args, kwargs, index)
        finally:
            self._record(job)

    def _job(self) -> _engine.Job:
        """What the engine reads for one call (it never sees the wrapper)."""
        return _engine.Job(
            model=self.model,
            embedding=self.embedding,
            options=self.options,
            log_inner_lr=self.log_inner_lr,
            adapted=tuple(self.adapted_names()),
            training=self.training,
            warned=self._warned,
        )

    def _record(self, job: _engine.Job) -> None:
        """What the engine decided: the path, the horizon read, a learned step's horizon."""
        if job.path is not None:
            self.last_path = job.path
        if job.saw_horizon:
            self.last_horizon = job.horizon
        if job.learned_horizon is not None:
            self.step_horizon = job.learned_horizon
