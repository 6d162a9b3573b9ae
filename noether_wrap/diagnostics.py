"""Before tailoring: can this ``g`` help this model? A precision diagnostic.

Tailoring does not read how well ``g`` correlates with a true invariant; it reads how much ``g``
changes over one predicted step, and moves the model until that change shrinks. That change has
two parts: the model's error (what tailoring should correct) and ``g``'s own drift along the true
dynamics (what it will wrongly "correct" into the model). To first order in a step, for a state
``x`` with the data's velocity ``v`` (a derivative label, or the observed next state minus ``x``)
and the model's ``f(x)``::

    Δ_model = ∇g(x) · f(x)   (what the Noether loss sees; for a step model g(f(x)) − g(x))
    Δ_data  = ∇g(x) · v      (g's own drift along the data; g(x') − g(x))

so ``Δ_model = (Δ_model − Δ_data) + Δ_data``: the model's error plus ``g``'s drift. The
**share** of the model's error is ``E[(Δ_model − Δ_data)²] / (E[(Δ_model − Δ_data)²] +
E[Δ_data²])``: 1 for an exact invariant (``Δ_data = 0``), 0.5 for a ``g`` that drifts along the
data as much as the model errs along it. On the ideal pendulum and the ideal spring
(experiments/precision.py, docs/learning-g.md), on a ladder of ``g``'s between the true energy
and a learned one, measured on the clean training states, every ``g`` with a share of at least
:data:`SHARE_TO_HELP` left a gain of at least 40 % of the true energy's on the test set (at the
test set's best step: a bound), and none below :data:`SHARE_NO_HELP` left more than 0.5 %; in
between it depended on how much of the model's error was energy error. Precision is necessary,
not sufficient: the network fitted for precision (clean shares 0.50-0.94) kept 77-99 % of the
true energy's gain on three of six (system, data seed) pairs, but under 30 % on the other three
(none on two pendulum data seeds, at shares 0.73 and 0.79).

The states must be where the labels are. From observations denoised with their labels
(:func:`~noether_wrap.conservation.denoise_with_labels`) each trajectory keeps an offset of about
``σ / sqrt(T)``, which counts as drift: there the true energy read 0.47-0.82 instead of 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from noether_wrap._checks import check_choice
from noether_wrap._warn import warn
from noether_wrap.loss import embed

__all__ = ["SHARE_NO_HELP", "SHARE_TO_HELP", "Diagnosis", "diagnose"]

#: The share of the Noether loss from the model's error at and above which tailoring with ``g``
#: may help, and below which it cannot (calibrated on the pendulum's and the spring's ladders
#: of true-energy/learned-``g`` mixtures: docs/learning-g.md).
SHARE_TO_HELP = 0.5
SHARE_NO_HELP = 0.1


class Diagnosis(NamedTuple):
    """What :func:`diagnose` finds.

    Attributes:
        share: of the two parts of ``g``'s change along the model's steps, the model's error's
            (``E[(Δ_model − Δ_data)²] / (E[(Δ_model − Δ_data)²] + E[Δ_data²])``, in ``[0, 1]``;
            1 for an exact invariant).
        drift_ratio: ``RMS(Δ_data) / RMS(Δ_model)``: how much ``g`` drifts along the data,
            relative to what tailoring would correct (0 for an exact invariant).
        verdict: ``"may help"`` (``share >= SHARE_TO_HELP``), ``"marginal"`` or ``"cannot
            help"`` (``share < SHARE_NO_HELP``).
        per_output: ``share`` of each output of ``g`` (its invariants), ``(m,)``.
        states: how many states were measured.
    """

    share: float
    drift_ratio: float
    verdict: str
    per_output: list[float]
    states: int

    def __str__(self) -> str:
        head = (
            f"g drifts along your data by {100 * self.drift_ratio:.0f} % of its change along the "
            f"model's steps; {100 * self.share:.0f} % of the Noether loss is the model's error"
        )
        if self.verdict == "may help":
            return f"{head}: tailoring with this g may help (tune it to find out)."
        advice = (
            "Fit g more precisely (derivative labels, more or cleaner trajectories, a formula "
            "library) or use a known invariant."
        )
        if self.verdict == "marginal":
            return (
                f"{head}: g's own drift outweighs the model's error (below "
                f"{100 * SHARE_TO_HELP:.0f} %); tailoring helps only where the model's error is "
                f"large, and tuning will likely switch it off. {advice}"
            )
        return (
            f"{head} (below {100 * SHARE_NO_HELP:.0f} %): tailoring with this g cannot help; "
            f"it would correct g's own drift into the model. {advice}"
        )


def diagnose(
    embedding: nn.Module | Callable[[Tensor], Tensor],
    model: nn.Module | Callable[[Tensor], Tensor],
    states: Tensor,
    targets: Tensor,
    *,
    kind: str = "field",
    dt: float = 1.0,
    warn_if_not: bool = True,
) -> Diagnosis:
    """How much of ``g``'s Noether loss on ``model``'s steps is the model's error, from data.

    Args:
        embedding: ``g``, ``(N, *state) -> (N, m)`` or ``(N,)``.
        model: one step of the predictor: ``kind="field"``, a vector field ``(N, *state) ->
            (N, *state)`` (the derivative); ``kind="step"``, the next state.
        states: ``(N, *state)`` training states. With derivative labels from clean states and
            noisy observations, pass the states the labels imply
            (:func:`~noether_wrap.conservation.denoise_with_labels`): ``g``'s gradient at a
            noisy state along the clean state's label counts the noise as drift.
        targets: ``(N, *state)`` what the data says at each state: derivative labels
            (``"field"``) or the observed next states (``"step"``; their noise counts as
            drift, so pass denoised or clean next states where you have them).
        kind: ``"field"`` or ``"step"``.
        dt: for ``"field"``, the half-width of the central difference ``g(x + dt v) −
            g(x − dt v)`` that measures ``g``'s derivative along each velocity ``v`` (exact for
            quadratic ``g``; the share does not depend on it for small ``dt``).
        warn_if_not: warn (:class:`UserWarning`) when the verdict is "cannot help".

    Returns:
        A :class:`Diagnosis`; ``print(diagnosis)`` states the verdict with its numbers.

    Example:
        >>> import torch
        >>> from noether_wrap.diagnostics import diagnose
        >>> field = lambda x: torch.stack([x[:, 1], -x[:, 0]], -1)  # a rotation: q^2 + p^2 kept
        >>> x = torch.randn(256, 2)
        >>> model = lambda x: 1.1 * field(x) + 0.05 * x  # a model that spirals out
        >>> d = diagnose(lambda s: s.pow(2).sum(-1), model, x, field(x), dt=0.01)
        >>> d.verdict, round(d.drift_ratio, 3)
        ('may help', 0.0)
    """
    kind = check_choice("kind", kind, ("field", "step"))
    if not isinstance(states, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("`states` and `targets` must be Tensors (N, *state).")
    if states.shape != targets.shape or states.dim() < 2 or states.shape[0] < 2:
        raise ValueError(
            "`states` and `targets` must have the same shape (N, *state) with N >= 2, got "
            f"{tuple(states.shape)} and {tuple(targets.shape)}."
        )
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"`dt` must be a positive finite float, got {dt!r}.")
    with torch.no_grad():
        predicted = model(states)
        if not isinstance(predicted, Tensor) or predicted.shape != states.shape:
            raise ValueError(
                f"`model` must map states {tuple(states.shape)} to the same shape, got "
                f"{getattr(predicted, 'shape', type(predicted).__name__)}."
            )
        if kind == "field":  # central differences: g's derivative along each velocity
            d_model = _codes(embedding, states + dt * predicted)
            d_model = d_model - _codes(embedding, states - dt * predicted)
            d_data = _codes(embedding, states + dt * targets)
            d_data = d_data - _codes(embedding, states - dt * targets)
        else:
            here = _codes(embedding, states)
            d_model = _codes(embedding, predicted) - here
            d_data = _codes(embedding, targets) - here
    d_model, d_data = d_model.double(), d_data.double()
    error = (d_model - d_data).pow(2).mean(0)
    drift = d_data.pow(2).mean(0)
    tiny = torch.finfo(torch.float64).tiny
    per_output = (error / (error + drift).clamp_min(tiny)).tolist()
    share = float(error.sum() / (error + drift).sum().clamp_min(tiny))
    ratio = float(d_data.pow(2).sum(-1).mean().sqrt() / d_model.pow(2).sum(-1).mean().sqrt())
    verdict = (
        "may help"
        if share >= SHARE_TO_HELP
        else ("cannot help" if share < SHARE_NO_HELP else "marginal")
    )
    result = Diagnosis(share, ratio, verdict, per_output, int(states.shape[0]))
    if verdict == "cannot help" and warn_if_not:
        warn(f"diagnose: {result}", UserWarning)
    return result


def _codes(embedding: Callable[[Tensor], Tensor], states: Tensor) -> Tensor:
    """``(N, *state) -> (N, m)``."""
    return embed(embedding, states.unsqueeze(1))[:, 0]
