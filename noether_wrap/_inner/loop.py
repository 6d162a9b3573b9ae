"""THE inner loop: k steps of one chain of step transforms over a path-specific stepper.

Every path (shared, vmap, low-rank, affine) runs :func:`run`. A path supplies a
:class:`Stepper`, which only knows how to take a gradient at a point and how to move along a
direction; everything that decides *where* to move is here, written once, and applied in this
order at every inner step (optax's ``chain`` of gradient transformations, stated per row):

1. the step rule (:data:`RULES`): ``"fixed"`` (``lr``) or ``"polyak"`` (``lr · L / ‖∇L‖²``);
2. the scale transforms (:data:`TRANSFORMS`): the Polyak cap, clipping (per row);
3. momentum (:func:`heavy_ball`): the step's moves, this gradient's and β times the last step's;
4. backtracking (:func:`backtrack`) of the whole step, whose decisions are constants in the
   backward;
5. the finite mask (a row whose loss or gradient is non-finite is flagged for recovery);

and on the result, the prediction guard (:func:`guard`), per sequence.

A *row* is what one decision is about: one sequence on the per-sequence paths (low-rank, per-sample
affines), the whole batch on a shared step (its mean loss), and the one sequence a ``vmap`` lane
holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
from torch import Tensor

from noether_wrap._inner.call import Call, InnerResult, Params, Progress
from noether_wrap._warn import warn

State = TypeVar("State")

#: Step fractions a backtracking step tries, in order; none accepted means no step.
BACKTRACKS: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)

GRAPHLESS_WARNING = (
    "NoetherWrapper: the inner gradient carries no graph although second-order training is on, "
    "so the embedding gets no outer gradient (the step size still does). Part of the model's "
    "backward is not differentiable: an adjoint ODE solver such as torchdiffeq.odeint_adjoint "
    "(use odeint), or a custom autograd.Function without double backward."
)


@dataclass(frozen=True)
class Gradient(Generic[State]):
    """One inner gradient: where it was taken (``point``, with any lazily created parameters),
    the rollout there (``output``) and its per-sequence ``loss`` ``(batch,)``, the path's own
    ``direction``, and per row its ``squared_norm`` (zeros where the step does not read it:
    ``call.needs_norm``) and whether it is ``finite``."""

    point: State
    output: Tensor
    loss: Tensor
    direction: Any
    squared_norm: Tensor
    finite: Tensor


class Stepper(Protocol[State]):
    """What a path supplies to :func:`run`."""

    #: One decision per sequence (True) or one for the whole batch (False).
    per_row: bool

    def start(self) -> State:
        """The untailored point."""

    def gradient(self, state: State) -> Gradient[State]:
        """Roll out at ``state`` and take the inner gradient there."""

    def step(self, state: State, direction: Any, scale: Tensor) -> State:
        """``state - scale * direction``, ``scale`` of shape ``(rows,)``."""

    def rollout(self, state: State, buffers: Params | None = None) -> Tensor:
        """The model's output at ``state``."""

    def prediction(self, state: State, buffers: Params | None = None) -> Tensor:
        """What the wrapper returns at ``state`` (``predict`` or the rollout)."""

    def params(self, state: State) -> Params | None:
        """The adapted parameters at ``state``, where the path materialises them."""

    def size(self, point: State) -> Tensor:
        """The norm of the untailored adapted parameters (affines: the identity's), a scalar
        (differentiable where the parameters are): what the Polyak cap measures a step
        against. Asked for only where the cap applies."""


def clip_scale(squared_norm: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / norm)`` from the squared gradient norm, with a finite derivative
    everywhere: below ``max_norm`` the scale is the constant 1, so the square root is never
    differentiated at 0 (an exactly zero inner gradient is common: a zero-initialised residual
    branch, an all-zero padded sequence, a saturated embedding)."""
    return max_norm * torch.rsqrt(squared_norm.clamp(min=max_norm**2))


def polyak_rule(call: Call, loss: Tensor, squared_norm: Tensor, size: Tensor | None) -> Tensor:
    """``lr · L / ‖∇L‖²`` per row: the step that removes a fraction ``lr`` of the row's loss
    ``L`` to first order (``lr = 2`` is the Gauss–Newton step of the squared residual): invariant
    to the scale of ``g`` and of the loss; zero where the gradient is zero. Under second order the
    outer gradient flows through ``L`` and ``‖∇L‖²``; under first order they are constants."""
    moving = squared_norm > 0
    safe = torch.where(moving, squared_norm, torch.ones_like(squared_norm))
    ratio = torch.where(moving, loss / safe, torch.zeros_like(squared_norm))
    if not call.create_graph:
        ratio = ratio.detach()
    return call.lr * ratio


def fixed_rule(call: Call, loss: Tensor, squared_norm: Tensor, size: Tensor | None) -> Tensor:
    """``lr`` for every row."""
    return call.lr * torch.ones_like(squared_norm)


def polyak_cap(call: Call, scale: Tensor, squared_norm: Tensor, size: Tensor | None) -> Tensor:
    """Bound the Polyak step's move, ``scale · ‖∇L‖ <= polyak_cap · size`` (``size``: the
    untailored adapted parameters' norm): where the gradient vanishes but the loss does not (a
    saturated ``g``, a cosine distance at ±1), ``L / ‖∇L‖²`` is unbounded; this is optax's
    ``scale_by_polyak(max_learning_rate=...)`` stated relative to the parameters, so it keeps
    the rule's scale-freedom in ``g`` and the loss. Where it binds, the step no longer depends
    on ``lr`` (its outer gradient is zero there), as for any active bound."""
    if not call.caps_polyak:
        return scale
    assert size is not None and call.polyak_cap is not None
    moving = squared_norm > 0
    safe = torch.where(moving, squared_norm, torch.ones_like(squared_norm))
    limit = call.polyak_cap * size * torch.rsqrt(safe)
    return torch.minimum(scale, limit)


def clip(call: Call, scale: Tensor, squared_norm: Tensor, size: Tensor | None) -> Tensor:
    """``max_inner_grad_norm``: scale each row's gradient to at most that norm."""
    if call.max_grad_norm is None:
        return scale
    return scale * clip_scale(squared_norm, call.max_grad_norm)


#: The step rules: ``(call, loss, squared_norm, size) -> (rows,)`` step lengths (``size``: the
#: adapted parameters' norm, where the Polyak cap applies, else None).
RULES = {"fixed": fixed_rule, "polyak": polyak_rule}
STEP_RULES: tuple[str, ...] = tuple(RULES)
#: What the loop applies to a rule's step, in order: ``(call, scale, squared_norm, size) ->
#: scale``. A new transform is one function here (backtracking needs rollouts: see
#: :func:`backtrack`; the prediction guard acts on the result: see :func:`guard`).
TRANSFORMS = (polyak_cap, clip)


#: One move of a step: a path's direction and its per-row scale ``(rows,)``; the stepper moves by
#: ``-scale * direction``.
Move = tuple[Any, Tensor]


def heavy_ball(call: Call, direction: Any, scale: Tensor, previous: list[Move]) -> list[Move]:
    """This step's moves: ``scale`` along this gradient and, with ``call.momentum`` β, β times
    each move of the previous step, so ``θ_{t+1} = θ_t − s_t ∇L_t + β (θ_t − θ_{t−1})`` (the
    heavy ball; with a constant ``s`` it is torchopt's ``sgd(momentum=β)``). A path's
    directions are additive updates, so a past direction can be moved along again."""
    moves = [(direction, scale)]
    if call.momentum:
        moves += [(d, s * call.momentum) for d, s in previous]
    return moves


def apply_moves(stepper: Stepper[State], point: State, moves: list[Move]) -> State:
    """``point`` moved by every move of a step."""
    for direction, scale in moves:
        point = stepper.step(point, direction, scale)
    return point


def step_size(call: Call, loss: Tensor, squared_norm: Tensor, size: Tensor | None) -> Tensor:
    """Each row's step length along its gradient, ``(rows,)``: the rule, then each of
    :data:`TRANSFORMS` (the Polyak cap, clipping)."""
    scale = RULES[call.step_rule](call, loss, squared_norm, size)
    for transform in TRANSFORMS:
        scale = transform(call, scale, squared_norm, size)
    return scale


def _decided(loss: Tensor, per_row: bool) -> Tensor:
    """What a decision is about: each sequence's loss, or the batch mean ``(1,)``."""
    return loss if per_row else loss.mean().reshape(1)


def _rows_finite(values: Tensor, per_row: bool) -> Tensor:
    flags = torch.isfinite(values)
    return flags.reshape(values.shape[0], -1).all(1) if per_row else flags.all().reshape(1)


def backtrack(
    call: Call, stepper: Stepper[State], point: State, moves: list[Move], before: Tensor
) -> Tensor:
    """``(rows,)`` fractions of this step (all of its ``moves``) to take: per row the first of
    ``BACKTRACKS`` whose step keeps the row's loss at or below ``before``, else 0 (no step).

    Decided without autograd, so the fractions enter the step as constants, as a line search's
    decisions do; per row, so a sequence's decision never depends on the rest of its batch.
    """
    with torch.no_grad():
        before = before.detach()
        fixed = [(d, s.detach()) for d, s in moves]
        chosen = torch.zeros_like(before)
        accepted = torch.zeros_like(before, dtype=torch.bool)
        for fraction in BACKTRACKS:
            trial_fraction = torch.where(accepted, chosen, torch.full_like(chosen, fraction))
            trial = apply_moves(stepper, point, [(d, s * trial_fraction) for d, s in fixed])
            after = _decided(call.noether_loss(stepper.rollout(trial)), stepper.per_row)
            newly = ~accepted & (after <= before)  # a non-finite trial is never accepted
            chosen = torch.where(newly, torch.full_like(chosen, fraction), chosen)
            accepted = accepted | newly
            if not call.in_vmap and bool(accepted.all()):
                break
    return chosen


def warn_if_graphless(call: Call, grads: Any) -> None:
    """Warn when ``create_graph`` was asked for but no inner gradient is differentiable."""
    if call.create_graph and not any(g is not None and g.requires_grad for g in grads):
        warn(GRAPHLESS_WARNING, RuntimeWarning)


#: Sequences whose final Noether loss a call computes when nothing else reads it: enough for the
#: divergence warning to see a blown-up step, at a small share of a large batch's cost.
CHECKED = 8


def final_loss(
    call: Call, stepper: Stepper[State], state: State, prediction: Tensor, rollout: Tensor | None
) -> Tensor:
    """``(batch,)``: each sequence's Noether loss after the last step, computed where something
    reads it (``return_info``, ``keep_if_better``: ``call.need_final_loss``), with a graph only
    where the caller needs one. Otherwise it is only a check for the divergence warning: a
    strided sample of at most :data:`CHECKED` sequences, without a graph, NaN elsewhere; and
    with ``predict`` (whose rollout would be one more pass) not computed at all (NaN)."""
    if call.need_final_loss:
        return call.noether_loss(stepper.rollout(state) if rollout is None else rollout)
    unread = torch.full((call.batch,), math.nan, dtype=prediction.dtype, device=prediction.device)
    if call.predict is not None or not prediction.is_floating_point():
        return unread
    with torch.no_grad():
        if call.in_vmap or call.batch <= CHECKED:
            return call.noether_loss(prediction)
        rows = torch.arange(0, call.batch, -(-call.batch // CHECKED), device=prediction.device)
        checked = call.loss(call.inputs[rows], prediction[rows])
        return unread.index_copy(0, rows, checked.to(unread.dtype))


def run(call: Call, stepper: Stepper[State], progress: Progress) -> InnerResult:
    """Run ``call.steps`` inner steps over ``stepper``, then predict with the adapted state.

    Returns an :class:`InnerResult`; ``ok`` is ``(batch,)`` (a shared step's one flag is
    broadcast), False where an inner loss or gradient, or the prediction, is not finite;
    ``losses`` holds each sequence's Noether loss before every step and after the last (see
    :func:`final_loss` for where the last is computed).
    """
    per_row = stepper.per_row
    state = stepper.start()
    start = state
    losses: list[Tensor] = []
    ok: Tensor | None = None
    initial: Tensor | None = None
    plain: Tensor | None = None  # the untailored rollout
    moves: list[Move] = []  # the last step's, for momentum
    for i in range(call.steps):
        progress.step = i
        gradient = stepper.gradient(state)
        progress.started = True
        if i == 0:
            initial, start, plain = gradient.output, gradient.point, gradient.output
        losses.append(gradient.loss)
        decided = _decided(gradient.loss, per_row)
        flags = torch.isfinite(decided) & gradient.finite
        ok = flags if ok is None else ok & flags
        size = stepper.size(gradient.point) if call.caps_polyak else None
        scale = step_size(call, decided, gradient.squared_norm, size)
        moves = heavy_ball(call, gradient.direction, scale, moves)
        if call.step_control == "backtrack":
            fraction = backtrack(call, stepper, gradient.point, moves, decided)
            moves = [(d, s * fraction) for d, s in moves]
        state = apply_moves(stepper, gradient.point, moves)
    progress.step = call.steps
    assert initial is not None and ok is not None
    if call.predict is not None:
        initial = stepper.prediction(start)
    buffers = call.fresh_buffers()
    prediction = stepper.prediction(state, buffers)
    final = prediction if call.predict is None else None  # the tailored rollout, where it exists
    if call.guard is not None and final is None:
        final = stepper.rollout(state)
    losses.append(final_loss(call, stepper, state, prediction, final))
    ok = ok & _rows_finite(prediction, per_row)
    result = InnerResult(
        prediction,
        initial,
        torch.stack(losses, dim=-1),
        ok.expand(call.batch),
        stepper.params(state),
        buffers,
    )
    if call.guard is not None:
        assert final is not None and plain is not None
        result = guard(call, result, plain, final)
    return result if call.differentiable else result.detached()


def guard(call: Call, result: InnerResult, plain: Tensor, tailored: Tensor) -> InnerResult:
    """The prediction guard: per sequence, keep the untailored prediction where the tailored
    rollout moved from the plain one by more than ``call.guard`` times the plain rollout's own
    displacement from its start (a non-finite move counts as too far).

    Decided without autograd, like backtracking: the choice is a constant in the backward.
    """
    tau = call.guard
    assert tau is not None
    with torch.no_grad():
        moves = call.move(call.inputs, plain.detach(), tailored.detach())
        far = ~(moves <= tau)
    view = (-1,) + (1,) * (result.prediction.dim() - 1)
    prediction = torch.where(far.view(view), result.initial, result.prediction)
    last = torch.where(far, result.losses[:, 0], result.losses[:, -1])
    losses = torch.cat([result.losses[:, :-1], last.unsqueeze(1)], dim=1)
    return result._replace(prediction=prediction, losses=losses, moves=moves)
