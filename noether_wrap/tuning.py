"""Choosing how to tailor on held-out data, by a rule, never by hand, with "off" always a choice.

Every search here scores *no tailoring* (``inner_steps = 0``, the wrapped model alone) beside the
candidates, per validation sequence, and keeps it unless a candidate beats it by more than the
paired standard error of their difference over the sequences (the one-standard-error rule):
wrapping a model must never make its predictions worse without saying so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from noether_wrap._checks import check_int
from noether_wrap._inner import STEP_RULES as _STEP_RULES
from noether_wrap._warn import warn

if TYPE_CHECKING:
    from noether_wrap.wrapper import NoetherWrapper

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_GUARDS",
    "DEFAULT_POLYAK_CANDIDATES",
    "STEP_RULES",
    "TailoringDoesNotHelp",
    "TuneConfig",
    "TuneGridResult",
    "TuneResult",
    "TuningWarning",
    "choose",
    "clearly_better",
    "per_sequence_mse",
    "tune",
    "tune_cv",
    "tune_inner_lr",
]

#: Half-decade steps from 1e-3 to 1: the fixed-step grid the examples search.
DEFAULT_CANDIDATES: tuple[float, ...] = (1e-3, 3.16e-3, 1e-2, 3.16e-2, 0.1, 0.316, 1.0)
#: Polyak fractions γ. The Noether loss is a squared residual, so γ = 1 removes half of the
#: residual to first order and γ = 2 is the full (Gauss–Newton) step.
DEFAULT_POLYAK_CANDIDATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
#: Prediction guards τ :func:`tune` scores beside every step (None: no guard). Scoring them costs
#: nothing extra with the default ``forward`` (see :func:`tune`).
DEFAULT_GUARDS: tuple[float | None, ...] = (None, 0.1, 0.3, 1.0)
#: A guard so wide it never binds: the wrapper then reports every sequence's move.
_PROBE_GUARD = 1e300
#: The step rules a search may try (the inner loop's).
STEP_RULES = _STEP_RULES
_DEFAULTS: dict[str, tuple[float, ...]] = {
    "fixed": DEFAULT_CANDIDATES,
    "polyak": DEFAULT_POLYAK_CANDIDATES,
}

# set through setattr: the options are validated properties of the wrapper, typed per version
_RULE, _LR = "step_rule", "inner_lr"
Loss = Callable[[Tensor, Tensor], Tensor]
Forward = Callable[["NoetherWrapper", Tensor], Tensor]


class TuningWarning(UserWarning):
    """A tuning result to read before trusting it: a winner at the edge of its grid, or
    candidates whose loss was not finite."""


class TailoringDoesNotHelp(TuningWarning):
    """No candidate beat "no tailoring" by more than its paired standard error, so the wrapper
    was set to ``inner_steps = 0`` (exactly the wrapped model)."""


class TuneConfig(NamedTuple):
    """One configuration :func:`tune` scores: ``inner_steps`` steps of ``step_rule`` with
    ``step`` (a step size for ``"fixed"``, a fraction γ for ``"polyak"``) and the prediction
    ``guard`` τ (None: no guard)."""

    inner_steps: int
    step_rule: str
    step: float
    guard: float | None = None

    def label(self) -> str:
        """A short readable name, e.g. ``k=1 fixed 0.1`` or ``k=1 polyak 1 guard 0.3``."""
        guard = "" if self.guard is None else f" guard {self.guard:g}"
        return f"k={self.inner_steps} {self.step_rule} {self.step:g}{guard}"


class TuneResult(NamedTuple):
    """What :func:`tune_inner_lr` returns.

    Attributes:
        best: the winning step size, now the wrapper's; ``None`` when no candidate beat
            "no tailoring" clearly, in which case the wrapper was set to ``inner_steps = 0``
            (its step size is left as it was).
        losses: ``{candidate: mean loss over the sequences}`` for every candidate, in the order
            given.
        untailored: the same mean loss with ``inner_steps = 0`` (the wrapped model alone).
        stderr: ``{candidate: paired standard error of (candidate − untailored)}`` over the
            sequences.
        inner_steps: the ``k`` the candidates were scored with (the wrapper's, or 1 if it was 0).
        step_rule: the rule the candidates were scored with (the wrapper's).
        sequences: how many sequences each mean is over.
        per_sequence: ``{candidate: (sequences,)}`` every sequence's loss, with the key
            ``None`` for "no tailoring": what a caller needs to compare configurations (or
            whole models) on the same sequences with a paired rule.
    """

    best: float | None
    losses: dict[float, float]
    untailored: float
    stderr: dict[float, float] = {}  # always passed by tune_inner_lr
    inner_steps: int = 1
    step_rule: str = "fixed"
    sequences: int = 0
    per_sequence: dict[float | None, Tensor] = {}

    def chosen_scores(self) -> Tensor:
        """``(sequences,)``: every sequence's loss under the outcome (the winner, or "off")."""
        return self.per_sequence[self.best]

    def table(self) -> str:
        """Every configuration with its mean loss and its difference to "off" ± paired SE."""
        rows = {
            TuneConfig(self.inner_steps, self.step_rule, c): (m, self.stderr.get(c, math.nan))
            for c, m in self.losses.items()
        }
        chosen = (
            None if self.best is None else TuneConfig(self.inner_steps, self.step_rule, self.best)
        )
        off = self.per_sequence.get(None)
        signs = None
        if off is not None and all(c.step in self.per_sequence for c in rows):
            signs = {c: _signs(self.per_sequence[c.step], off) for c in rows}
        return _table(self.untailored, rows, chosen, self.sequences, signs)


class TuneGridResult(NamedTuple):
    """What :func:`tune` returns.

    Attributes:
        best: the winning step (step size or Polyak γ), or ``None`` for "off".
        inner_steps: the winning ``k``; 0 when "off" won (the wrapper is then exactly the model).
        step_rule: the winning rule; when "off" won, the wrapper's rule, left as it was.
        losses: ``{TuneConfig: mean loss over the sequences}`` for every configuration scored.
        stderr: ``{TuneConfig: paired standard error of (configuration − untailored)}``.
        untailored: the mean loss with ``inner_steps = 0``.
        sequences: how many sequences each mean is over.
        guard: the winning prediction guard τ (None: no guard, or "off").
        signs: ``{TuneConfig: (better, worse)}``, how many sequences each configuration made
            better and worse than "off" (a configuration must help more than it hurts to win).
        per_sequence: ``{TuneConfig: (sequences,)}`` every sequence's loss, with the key
            ``None`` for "off": what a caller needs to compare the outcome with other models
            on the same sequences (:func:`choose`, :func:`clearly_better`).
    """

    best: float | None
    inner_steps: int
    step_rule: str
    losses: dict[TuneConfig, float]
    stderr: dict[TuneConfig, float]
    untailored: float
    sequences: int
    guard: float | None = None
    signs: dict[TuneConfig, tuple[int, int]] = {}
    per_sequence: dict[TuneConfig | None, Tensor] = {}

    @property
    def config(self) -> TuneConfig | None:
        """The winning configuration, or ``None`` for "off"."""
        if self.best is None:
            return None
        return TuneConfig(self.inner_steps, self.step_rule, self.best, self.guard)

    def table(self) -> str:
        """Every configuration with its mean loss and its difference to "off" ± paired SE."""
        rows = {c: (m, self.stderr[c]) for c, m in self.losses.items()}
        signs = self.signs if set(self.signs) >= set(rows) else None
        return _table(self.untailored, rows, self.config, self.sequences, signs)

    def chosen_scores(self) -> Tensor:
        """``(sequences,)``: every sequence's loss under the outcome (the winner, or "off")."""
        return self.per_sequence[self.config]


def per_sequence_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each sequence: ``(batch, ...) x2 -> (batch,)``, the default score.

    Example:
        >>> import torch
        >>> per_sequence_mse(torch.zeros(2, 3), torch.tensor([[1.0, 1, 1], [0, 0, 3]]))
        tensor([1., 3.])
    """
    return (prediction - target).pow(2).flatten(1).mean(1)


def tune_inner_lr(
    net: NoetherWrapper,
    inputs: Tensor,
    target: Tensor,
    *,
    candidates: Sequence[float] | None = None,
    loss: Loss | None = None,
    forward: Forward | None = None,
    chunk: int | None = None,
) -> TuneResult:
    """Choose ``net``'s inner step size on held-out data, or switch tailoring off.

    Scores "no tailoring" (``inner_steps = 0``) and every candidate step with the wrapper's
    ``inner_steps`` (1 if it is 0, e.g. after an earlier tuning switched it off) and its
    ``step_rule``, per sequence. The best candidate is set only if its mean loss beats the
    untailored one by more than the paired standard error of their difference over the
    sequences; otherwise the wrapper is set to ``inner_steps = 0`` (exactly the model),
    ``best`` is ``None`` and a :class:`TailoringDoesNotHelp` warning gives the numbers. A
    :class:`TuningWarning` says when the winner is the smallest or largest candidate (the grid
    may be too narrow) or when some candidate's loss was not finite (such a candidate is never
    chosen). :func:`tune` also searches ``k`` and the rule.

    Use training or validation data, never test data. Each configuration is evaluated without
    autograd (tailoring still runs); the model and the embedding are not changed.

    Args:
        net: the wrapper to tune.
        inputs: ``(batch, ...)``, what ``net`` (or ``forward``) reads; finite, ``batch >= 2``.
        target: ``(batch, ...)``, finite; with the default loss, shaped exactly like the
            prediction (checked: no silent broadcasting).
        candidates: positive steps to try; default :data:`DEFAULT_CANDIDATES` for the
            ``"fixed"`` rule, :data:`DEFAULT_POLYAK_CANDIDATES` for ``"polyak"``.
        loss: ``(prediction, target) -> (batch,)``, one score per sequence; default
            :func:`per_sequence_mse`. A loss that returns a scalar is called once per sequence
            (on slices of size 1), so the standard errors still exist; that costs a Python loop
            over the sequences (the predictions are still computed in batches).
        forward: ``(net, inputs) -> prediction`` when the prediction is not ``net(inputs)``
            (e.g. a rollout of a tailored vector field); default ``net(inputs)``.
        chunk: evaluate ``inputs`` in pieces of this many sequences (memory).

    Returns:
        A :class:`TuneResult` (``best``, ``losses``, ``untailored`` first, as before; then
        ``stderr``, ``inner_steps``, ``step_rule``, ``sequences``; ``.table()`` prints it).

    Raises:
        ValueError: non-finite ``inputs`` or ``target`` (with the count), a ``target`` shaped
            unlike the prediction, unequal batch sizes, fewer than 2 sequences, bad candidates,
            or an untailored loss that is not finite.

    Example:
        >>> import torch, warnings
        >>> from noether_wrap import NoetherWrapper, Rollout, tune_inner_lr
        >>> net = NoetherWrapper(Rollout(torch.nn.Linear(2, 2), 5), lambda s: s.pow(2).sum(-1))
        >>> x = torch.randn(16, 2)
        >>> with warnings.catch_warnings(record=True):
        ...     result = tune_inner_lr(net, x, torch.zeros(16, 5, 2), candidates=[0.01, 0.1])
        >>> result.best is None or round(net.inner_lr, 9) == result.best
        True
        >>> (net.inner_steps == 0) == (result.best is None)
        True
    """
    rule = _current_rule(net)
    values = _check_candidates(_DEFAULTS[rule] if candidates is None else candidates, "candidates")
    k = net.inner_steps if net.inner_steps > 0 else 1
    search = _Search(net, inputs, target, loss=loss, forward=forward, chunk=chunk)
    configs = [TuneConfig(k, rule, v, getattr(net, "guard", None)) for v in values]
    off, scored = search.run(configs)
    winner = _finish(net, search, off, scored, configs)
    means = {c.step: m for c, (m, _, _) in scored.items()}
    ses = {c.step: s for c, (_, s, _) in scored.items()}
    per_sequence: dict[float | None, Tensor] = {None: off}
    per_sequence.update({c.step: search.per_sequence[c] for c in configs})
    return TuneResult(
        None if winner is None else winner.step,
        means,
        float(off.mean()),
        ses,
        k,
        rule,
        off.shape[0],
        per_sequence,
    )


def tune(
    net: NoetherWrapper,
    inputs: Tensor,
    target: Tensor,
    *,
    inner_steps: Sequence[int] = (1,),
    step_rules: Sequence[str] = ("fixed",),
    candidates: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    guards: Sequence[float | None] = DEFAULT_GUARDS,
    loss: Loss | None = None,
    forward: Forward | None = None,
    chunk: int | None = None,
) -> TuneGridResult:
    """Choose ``k``, the step rule and the step on held-out data, with "off" always a candidate.

    Scores "no tailoring" (``inner_steps = 0``) and every configuration of the grid
    ``inner_steps × step_rules × candidates[rule] × guards``, per sequence, and sets the winner
    on ``net`` (``inner_steps``, ``step_rule``, ``inner_lr``, ``guard``, and ``step_horizon``,
    the rollout horizon the step was chosen at). The best configuration (lowest mean
    loss) wins only if it beats the untailored loss by more than the paired standard error of
    their difference over the sequences (the one-standard-error rule). Otherwise ``net`` is set
    to ``inner_steps = 0`` (exactly the model; its rule and step are left as they were), the
    result's ``best`` is ``None`` and a :class:`TailoringDoesNotHelp` warning gives the
    numbers. A :class:`TuningWarning` says when the winning step is the smallest or largest of
    its rule's candidates (the grid may be too narrow) and which configurations gave a
    non-finite loss (never chosen).

    Use training or validation data, never test data. Observation noise in the starts can
    dominate a rollout's error and rank configurations at random: see
    :func:`noether_wrap.validation.estimate_starts` and
    :func:`noether_wrap.validation.window_targets`.

    Args:
        net: the wrapper to tune.
        inputs: ``(batch, ...)``, what ``net`` (or ``forward``) reads; finite, ``batch >= 2``.
        target: ``(batch, ...)``, finite; with the default loss, shaped like the prediction.
        inner_steps: the ``k >= 1`` to try (0, "off", is always scored).
        step_rules: among ``"fixed"`` (``θ − η ∇L``) and ``"polyak"`` (``η = γ L / ‖∇L‖²``
            per sequence, the step then being the fraction ``γ``).
        candidates: the steps: one sequence for every rule, a mapping ``{rule: steps}``, or
            ``None`` for :data:`DEFAULT_CANDIDATES` (fixed) and
            :data:`DEFAULT_POLYAK_CANDIDATES` (polyak).
        guards: the prediction guards τ to score beside every step (``None``: no guard);
            default :data:`DEFAULT_GUARDS`. With the default ``forward`` one run per step
            scores them all (the guard only picks, per sequence, the tailored or the untailored
            prediction); a custom ``forward`` runs once per guard. Guards that bind on no
            validation sequence score exactly alike; the tightest of them is kept (free
            insurance: a later sequence that moves further than any validation sequence did
            keeps its plain prediction).
        loss: ``(prediction, target) -> (batch,)``; default :func:`per_sequence_mse`. A loss
            that returns a scalar is called once per sequence so standard errors still exist.
        forward: ``(net, inputs) -> prediction``; default ``net(inputs)``.
        chunk: evaluate ``inputs`` in pieces of this many sequences (memory).

    Returns:
        A :class:`TuneGridResult`; ``print(result.table())`` lists every configuration.

    Example:
        >>> import torch, warnings
        >>> from noether_wrap import NoetherWrapper, Rollout, tune
        >>> net = NoetherWrapper(Rollout(torch.nn.Linear(2, 2), 5), lambda s: s.pow(2).sum(-1))
        >>> x = torch.randn(16, 2)
        >>> with warnings.catch_warnings(record=True):
        ...     result = tune(net, x, torch.zeros(16, 5, 2), inner_steps=(1, 2),
        ...                   candidates=[0.01, 0.1])
        >>> len(result.losses), net.inner_steps == result.inner_steps
        (16, True)
    """
    ks = list(inner_steps)
    for k in ks:
        check_int("inner_steps", k, minimum=0)
    ks = sorted({k for k in ks if k > 0})
    rules = list(dict.fromkeys(step_rules))
    if not rules:
        raise ValueError("`step_rules` must name at least one rule.")
    for rule in rules:
        if not isinstance(rule, str) or rule not in STEP_RULES:
            raise ValueError(f"`step_rules` must be among {list(STEP_RULES)}, got {rule!r}.")
        if rule != "fixed" and not _has_rule(net):
            raise ValueError(
                f"`step_rules` asks for {rule!r}, but this wrapper has no `step_rule` option."
            )
    grid: dict[str, tuple[float, ...]] = {}
    for rule in rules:
        if candidates is None:
            grid[rule] = _DEFAULTS[rule]
        elif isinstance(candidates, Mapping):
            grid[rule] = _check_candidates(candidates.get(rule, _DEFAULTS[rule]), "candidates")
        else:
            grid[rule] = _check_candidates(candidates, "candidates")
    taus = _check_guards(guards)
    configs = [TuneConfig(k, r, v, t) for k in ks for r in rules for v in grid[r] for t in taus]
    search = _Search(net, inputs, target, loss=loss, forward=forward, chunk=chunk)
    off, scored = search.run(configs)
    winner = _finish(net, search, off, scored, configs)
    return TuneGridResult(
        None if winner is None else winner.step,
        0 if winner is None else winner.inner_steps,
        search.original_rule if winner is None else winner.step_rule,
        {c: m for c, (m, _, _) in scored.items()},
        {c: s for c, (_, s, _) in scored.items()},
        float(off.mean()),
        off.shape[0],
        None if winner is None else winner.guard,
        {c: _signs(search.per_sequence[c], off) for c in configs},
        {None: off, **{c: search.per_sequence[c] for c in configs}},
    )


def tune_cv(
    build: Callable[[Tensor], NoetherWrapper],
    inputs: Tensor,
    target: Tensor,
    *,
    folds: int | Sequence[tuple[Tensor, Tensor]] = 5,
    seed: int = 0,
    inner_steps: Sequence[int] = (1,),
    step_rules: Sequence[str] = ("fixed",),
    candidates: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    guards: Sequence[float | None] = DEFAULT_GUARDS,
    loss: Loss | None = None,
    forward: Forward | None = None,
    chunk: int | None = None,
    final: Tensor | None = None,
) -> tuple[NoetherWrapper, TuneGridResult]:
    """:func:`tune` by k-fold cross-validation over whole sequences, with refits per fold.

    A single validation split scores a handful of sequences, and holding them out of the fit
    makes them unlike the rest (the pendulum's five highest-energy trajectories lay above every
    trajectory the model was fitted on). Here every sequence is scored once, by a wrapper
    ``build`` fitted without it (the model, ``g``, any normalisation: whatever ``build`` fits);
    the scores of all folds are pooled per sequence and one configuration is chosen for all of
    them by :func:`tune`'s rule (:func:`choose`: help more sequences than it hurts, beat "off"
    by more than the paired standard error). Finally ``build`` is called on every sequence and
    the winner set on that wrapper, the one to use.

    Args:
        build: ``(train_indices,) -> NoetherWrapper`` fitted on ``inputs[train_indices]``
            (int64 indices into dim 0); called once per fold and once on all sequences.
        inputs, target: ``(n, ...)`` every training sequence, as for :func:`tune`; ``n >=
            folds``. Split whole sequences (trajectories), not windows of one.
        folds: how many folds (:func:`noether_wrap.validation.kfold` with ``seed``), or the
            splits themselves, ``[(train_indices, val_indices), ...]`` (e.g. one split in
            time for a recording); the validation parts must not overlap.
        seed: the folds' permutation seed.
        inner_steps, step_rules, candidates, guards, loss, forward, chunk: as for :func:`tune`.
        final: the sequences the returned wrapper is fitted on (default: all ``n``).

    Returns:
        ``(net, result)``: the wrapper fitted on ``final`` with the winner set (or
        ``inner_steps = 0``), and a :class:`TuneGridResult` over the validated sequences
        (``per_sequence`` in index order: all ``n`` with the default folds).

    Example:
        >>> import torch, warnings
        >>> from noether_wrap import NoetherWrapper, Rollout, tune_cv
        >>> x, y = torch.randn(10, 2), torch.zeros(10, 5, 2)
        >>> def build(train):
        ...     torch.manual_seed(0)  # a real build fits the model (and g) on x[train]
        ...     return NoetherWrapper(Rollout(torch.nn.Linear(2, 2), 5), lambda s: s.pow(2).sum(-1))
        >>> with warnings.catch_warnings(record=True):
        ...     net, result = tune_cv(build, x, y, folds=5, candidates=[0.01, 0.1])
        >>> result.sequences, net.inner_steps == result.inner_steps
        (10, True)
    """
    from noether_wrap.validation import kfold

    if not callable(build):
        raise TypeError(f"`build` must be callable, got {type(build).__name__}.")
    if not isinstance(inputs, Tensor) or not isinstance(target, Tensor):
        raise TypeError("`inputs` and `target` must be Tensors.")
    if inputs.dim() == 0 or target.dim() == 0 or inputs.shape[0] != target.shape[0]:
        raise ValueError(
            "`inputs` and `target` must have the same number of sequences (dim 0), got shapes "
            f"{tuple(inputs.shape)} and {tuple(target.shape)}."
        )
    n = inputs.shape[0]
    splits = kfold(n, folds, seed=seed) if isinstance(folds, int) else _check_splits(folds, n)
    pooled = _Pooled(n)
    for train, val in splits:
        net = _built(build, train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TuningWarning)
            fold = tune(
                net, inputs[val], target[val], inner_steps=inner_steps, step_rules=step_rules,
                candidates=candidates, guards=guards, loss=loss, forward=forward, chunk=chunk,
            )  # fmt: skip
        pooled.add(val, fold.per_sequence, getattr(net, "step_horizon", None))
    net = _built(build, torch.arange(n) if final is None else final)
    pooled.drop_unscored()
    configs = [c for c in pooled.per_sequence if c is not None]
    off = pooled.per_sequence[None]
    scored = {c: pooled.summary(c, off) for c in configs}
    original_rule = _current_rule(net)
    winner = _finish(net, pooled, off, scored, configs)
    return net, TuneGridResult(
        None if winner is None else winner.step,
        0 if winner is None else winner.inner_steps,
        original_rule if winner is None else winner.step_rule,
        {c: s[0] for c, s in scored.items()},
        {c: s[1] for c, s in scored.items()},
        float(off.mean()),
        off.shape[0],
        None if winner is None else winner.guard,
        {c: _signs(pooled.per_sequence[c], off) for c in configs},
        dict(pooled.per_sequence),
    )


class _Pooled:
    """Per-sequence losses of every configuration, pooled over cross-validation folds."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.per_sequence: dict[TuneConfig | None, Tensor] = {}
        self.horizon: int | None = None

    def add(self, val: Tensor, scores: Mapping[TuneConfig | None, Tensor], horizon: Any) -> None:
        if self.per_sequence and set(scores) != set(self.per_sequence):
            raise ValueError("every fold must score the same configurations.")
        for config, losses in scores.items():
            full = self.per_sequence.setdefault(
                config, torch.full((self.n,), math.nan, dtype=torch.float64)
            )
            full[val] = losses.double()
        self.horizon = horizon if isinstance(horizon, int) else self.horizon

    def drop_unscored(self) -> None:
        """Keep the sequences some fold validated (all of them for k-fold splits)."""
        scored = torch.isfinite(self.per_sequence[None])
        self.per_sequence = {c: v[scored] for c, v in self.per_sequence.items()}

    def summary(self, config: TuneConfig, off: Tensor) -> tuple[float, float, int]:
        losses = self.per_sequence[config]
        bad = int((~torch.isfinite(losses)).sum())
        if bad:
            return float(losses.mean()), math.nan, bad
        return float(losses.mean()), _paired_se(losses - off), 0


def _check_splits(splits: Sequence[tuple[Tensor, Tensor]], n: int) -> list[tuple[Tensor, Tensor]]:
    out, seen = [], torch.zeros(n, dtype=torch.bool)
    for i, split in enumerate(splits):
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise ValueError(f"`folds`[{i}] must be a pair (train_indices, val_indices).")
        train, val = (torch.as_tensor(part, dtype=torch.long).flatten() for part in split)
        if val.numel() < 2 or bool(((val < 0) | (val >= n)).any()) or bool(seen[val].any()):
            raise ValueError(
                f"`folds`[{i}]: the validation indices must be >= 2 distinct indices in [0, {n}) "
                "that no other fold validates."
            )
        if bool(torch.isin(val, train).any()):
            raise ValueError(f"`folds`[{i}]: a sequence is both fitted on and validated.")
        seen[val] = True
        out.append((train, val))
    if not out:
        raise ValueError("`folds` must hold at least one split.")
    return out


def _built(build: Callable[[Tensor], NoetherWrapper], train: Tensor) -> NoetherWrapper:
    from noether_wrap.wrapper import NoetherWrapper

    net = build(train)
    if not isinstance(net, NoetherWrapper):
        raise TypeError(f"`build` must return a NoetherWrapper, got {type(net).__name__}.")
    return net


# --- the engine ---------------------------------------------------------------------------------


class _Search:
    """Scores configurations on one data set and restores the wrapper's settings if anything
    fails."""

    def __init__(
        self,
        net: NoetherWrapper,
        inputs: Tensor,
        target: Tensor,
        *,
        loss: Loss | None,
        forward: Forward | None,
        chunk: int | None,
    ) -> None:
        if not isinstance(inputs, Tensor) or not isinstance(target, Tensor):
            raise TypeError("`inputs` and `target` must be Tensors.")
        if inputs.dim() == 0 or target.dim() == 0 or inputs.shape[0] != target.shape[0]:
            raise ValueError(
                "`inputs` and `target` must have the same batch size (dim 0), got shapes "
                f"{tuple(inputs.shape)} and {tuple(target.shape)}."
            )
        _check_finite("target", target)
        _check_finite("inputs", inputs)
        if inputs.shape[0] < 2:
            raise ValueError(
                f"`inputs` and `target` need at least 2 sequences for a standard error, got "
                f"{inputs.shape[0]}."
            )
        check_int("chunk", chunk, allow_none=True)
        if loss is not None and not callable(loss):
            raise TypeError(f"`loss` must be callable or None, got {type(loss).__name__}.")
        if forward is not None and not callable(forward):
            raise TypeError(f"`forward` must be callable or None, got {type(forward).__name__}.")
        self.net = net
        self.inputs = inputs
        self.target = target
        self.loss = loss
        self.run_net: Forward = forward if forward is not None else _call
        self.size = inputs.shape[0] if chunk is None else chunk
        self.original_steps = net.inner_steps
        self.original_rule = _current_rule(net)
        self.original_lr = net.log_inner_lr.detach().clone()
        self.original_guard = getattr(net, "guard", None)
        #: Every scored configuration's per-sequence losses.
        self.per_sequence: dict[TuneConfig, Tensor] = {}
        #: The rollout horizon the tailored calls' Noether loss read (None: not seen).
        self.horizon: int | None = None

    def run(
        self, configs: list[TuneConfig]
    ) -> tuple[Tensor, dict[TuneConfig, tuple[float, float, int]]]:
        """Per-sequence untailored losses and ``{config: (mean, paired SE, non-finite count)}``."""
        try:
            self.net.inner_steps = 0
            off = self.evaluate()
            bad = int((~torch.isfinite(off)).sum())
            if bad:
                raise ValueError(
                    f"the untailored model (inner_steps=0) gives a non-finite loss on {bad} of "
                    f"{off.shape[0]} sequences: no configuration can be compared with it. Check "
                    "the model and `inputs`."
                )
            scored: dict[TuneConfig, tuple[float, float, int]] = {}
            bases = dict.fromkeys(c._replace(guard=None) for c in configs)
            for base in bases:
                guards = [c.guard for c in configs if c._replace(guard=None) == base]
                for guard, losses in self.evaluate_guards(base, guards, off).items():
                    config = base._replace(guard=guard)
                    self.per_sequence[config] = losses
                    nonfinite = int((~torch.isfinite(losses)).sum())
                    if nonfinite:
                        scored[config] = (float(losses.mean()), math.nan, nonfinite)
                    else:
                        scored[config] = (float(losses.mean()), _paired_se(losses - off), 0)
            scored = {c: scored[c] for c in configs}
        except BaseException:
            self.restore()
            raise
        self.restore()
        return off, scored

    def restore(self) -> None:
        self.net.inner_steps = self.original_steps
        if _has_rule(self.net):
            setattr(self.net, _RULE, self.original_rule)
        if _has_guard(self.net):
            self.net.guard = self.original_guard
        with torch.no_grad():
            self.net.log_inner_lr.copy_(self.original_lr)

    def evaluate_guards(
        self, base: TuneConfig, guards: list[float | None], off: Tensor
    ) -> dict[float | None, Tensor]:
        """``{guard: (batch,) losses}`` for ``base`` under each guard.

        The guard only chooses, per sequence, between the tailored and the untailored
        prediction, so with the default forward one run reporting every sequence's move scores
        every τ exactly: a sequence's loss is the tailored one where it moved at most τ, else
        its untailored loss. A custom ``forward`` is run once per guard.
        """
        if guards == [None] or not _has_guard(self.net):
            _apply(self.net, base)
            return {None: self.evaluate()}
        if self.run_net is not _call:
            out = {}
            for guard in guards:
                _apply(self.net, base._replace(guard=guard))
                out[guard] = self.evaluate()
            return out
        _apply(self.net, base._replace(guard=_PROBE_GUARD))
        moves: list[Tensor] = []
        losses = self.evaluate(moves)
        moved = torch.cat(moves).double().cpu()
        return {
            guard: losses if guard is None else torch.where(moved <= guard, losses, off)
            for guard in guards
        }

    def evaluate(self, moves: list[Tensor] | None = None) -> Tensor:
        """Every sequence's loss under the wrapper's current settings, ``(batch,)`` float64;
        ``moves``, when given, receives each chunk's per-sequence moves (default forward)."""
        parts = []
        n = self.inputs.shape[0]
        # a candidate that diverges is scored like any other; its warnings would only be noise
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for start in range(0, n, self.size):
                part = slice(start, start + self.size)
                if moves is None:
                    prediction = self.run_net(self.net, self.inputs[part])
                else:
                    info = self.net(self.inputs[part], return_info=True)
                    prediction = info.prediction
                    moves.append(info.moves)
                parts.append(self.score(prediction, self.target[part]))
                if self.net.inner_steps > 0:
                    self.horizon = getattr(self.net, "last_horizon", None) or self.horizon
        return torch.cat(parts)

    def score(self, prediction: Tensor, target: Tensor) -> Tensor:
        if not isinstance(prediction, Tensor):
            raise TypeError(
                f"the prediction must be a Tensor, got {type(prediction).__name__} (from "
                f"{'`forward`' if self.run_net is not _call else '`net(inputs)`'})."
            )
        if self.loss is None:
            if prediction.shape != target.shape:
                raise ValueError(
                    f"`target` must be shaped like the prediction: got target "
                    f"{tuple(target.shape)} and prediction {tuple(prediction.shape)} (per chunk of "
                    "inputs). Pass the matching frames, or a `loss` that compares them."
                )
            return per_sequence_mse(prediction, target).detach().double().cpu()
        b = target.shape[0]
        value = self.loss(prediction, target)
        if not isinstance(value, Tensor):
            value = torch.as_tensor(value)
        if value.shape == (b,):
            return value.detach().double().cpu()
        if value.numel() != 1:
            raise ValueError(
                f"`loss` must return one value per sequence, shape ({b},), or a scalar; got "
                f"shape {tuple(value.shape)}."
            )
        if b == 1:
            return value.detach().double().cpu().reshape(1)
        # a scalar loss: score each sequence on its own so the paired standard error exists
        each = [self.loss(prediction[i : i + 1], target[i : i + 1]) for i in range(b)]
        return torch.stack([torch.as_tensor(v).detach().double().cpu().reshape(()) for v in each])


def _finish(
    net: NoetherWrapper,
    search: _Search | _Pooled,
    off: Tensor,
    scored: dict[TuneConfig, tuple[float, float, int]],
    configs: list[TuneConfig],
) -> TuneConfig | None:
    """Apply the one-standard-error rule, set the winner (or "off") on ``net`` and warn."""
    untailored = float(off.mean())
    n = off.shape[0]
    broken = [c for c in configs if scored[c][2]]
    if broken:
        names = ", ".join(f"{c.label()} ({scored[c][2]} of {n} sequences)" for c in broken)
        warn(
            f"tuning: non-finite loss for {names}; never chosen. A smaller step, "
            "`max_inner_grad_norm` or the 'polyak' rule may help.",
            TuningWarning,
        )
    signs = {c: _signs(search.per_sequence[c], off) for c in configs}
    candidates = {c: search.per_sequence[c] for c in configs}
    best = _best(candidates, off, lambda c: _guard_order(c.guard))
    rows = {c: scored[c][:2] for c in configs}
    if best is not None:
        mean, se, _ = scored[best]
        majority = signs[best][0] > signs[best][1]
        if clearly_better(search.per_sequence[best], off):
            _apply(net, best)
            if hasattr(net, "step_horizon"):
                net.step_horizon = search.horizon
            steps = sorted({c.step for c in configs if c.step_rule == best.step_rule})
            if len(steps) > 1 and best.step in (steps[0], steps[-1]):
                side = "smallest" if best.step == steps[0] else "largest"
                warn(
                    f"tuning: the chosen step {best.step:g} is the {side} {best.step_rule!r} "
                    f"candidate ({best.label()}): the grid may be too narrow; try steps "
                    f"{'below' if side == 'smallest' else 'above'} it.",
                    TuningWarning,
                )
            return best
    net.inner_steps = 0
    if best is None:
        why = "every configuration gave a non-finite loss"
    else:
        mean, se, _ = scored[best]
        verdict = "lost to" if mean >= untailored else "did not clearly beat"
        why = (
            f"the best configuration, {best.label()}, {verdict} no tailoring: mean loss "
            f"{mean:.4g} vs {untailored:.4g} untailored, difference {mean - untailored:+.3g} "
            f"± {se:.3g} (paired standard error over {n} sequences)"
        )
        if not majority and mean < untailored:
            better, worse = signs[best]
            why = (
                f"no configuration helps more sequences than it hurts; the best by mean, "
                f"{best.label()}, is better on {better} and worse on {worse} of {n} sequences "
                f"(mean loss {mean:.4g} vs {untailored:.4g} untailored): a few sequences carry "
                "its mean"
            )
    warn(
        f"tuning: {why}; the wrapper is set to inner_steps=0 and is now exactly the model. If "
        "g is learned, `noether_wrap.diagnose` says whether it is precise enough to help.\n"
        + _table(untailored, rows, None, n, signs),
        TailoringDoesNotHelp,
    )
    return None


K = TypeVar("K", bound=Hashable)


def _best(
    candidates: Mapping[K, Tensor], off: Tensor, tiebreak: Callable[[K], Any] | None = None
) -> K | None:
    """The candidate :func:`choose` compares with ``off``: the lowest mean among those with
    finite losses that help more sequences than they hurt (all finite ones if none does), exact
    ties broken by ``tiebreak`` (lower first); None if no candidate is finite."""
    finite = [k for k, v in candidates.items() if bool(torch.isfinite(v).all())]
    # a majority first: a candidate that helps fewer sequences than it hurts is carried by a
    # few, and a few sequences do not decide (they are where heavy tails live)
    majority = [k for k in finite if _signs(candidates[k], off)[0] > _signs(candidates[k], off)[1]]
    pool = majority or finite
    if not pool:
        return None
    order = (lambda k: 0) if tiebreak is None else tiebreak
    return min(pool, key=lambda k: (float(candidates[k].mean()), order(k)))


def choose(
    candidates: Mapping[K, Tensor | Sequence[float]],
    off: Tensor | Sequence[float],
    *,
    tiebreak: Callable[[K], Any] | None = None,
) -> K | None:
    """The selection rule of :func:`tune`, for scores computed any way (e.g. by
    :func:`noether_wrap.validation.cross_validate`): among the candidates whose per-sequence
    losses are finite and help more sequences than they hurt, the lowest mean (exact ties by
    ``tiebreak``, lower first), kept only if it is :func:`clearly_better` than ``off``.

    Args:
        candidates: ``{key: (n,) per-sequence losses}``, paired with ``off`` (the same
            sequences in the same order).
        off: ``(n,)``, the losses without tailoring (or of the baseline).
        tiebreak: ``key -> sortable``; :func:`tune` passes the guard, tightest first.

    Returns:
        The winning key, or None for "off".

    Example:
        >>> choose({"a": [1.0, 1.1, 0.9, 1.0], "b": [0.0, 3.0, 3.0, 3.0]}, [2.0, 2.0, 2.0, 2.0])
        'a'
        >>> choose({"b": [0.0, 3.0, 3.0, 3.0]}, [2.0, 2.0, 2.0, 2.0]) is None
        True
    """
    base = torch.as_tensor(off, dtype=torch.float64).flatten()
    scores = {k: torch.as_tensor(v, dtype=torch.float64).flatten() for k, v in candidates.items()}
    for k, v in scores.items():
        if v.shape != base.shape:
            raise ValueError(
                f"`candidates`[{k!r}] has {v.numel()} losses, `off` {base.numel()}: they must "
                "be paired per sequence."
            )
    best = _best(scores, base, tiebreak)
    return best if best is not None and clearly_better(scores[best], base) else None


def _guard_order(guard: float | None) -> float:
    """Tighter guards first among configurations that score the same; no guard last."""
    return math.inf if guard is None else guard


def _signs(losses: Tensor, off: Tensor) -> tuple[int, int]:
    """How many sequences a configuration made better and how many worse than "off"."""
    diff = losses - off
    return int((diff < 0).sum()), int((diff > 0).sum())


def clearly_better(candidate: Tensor | Sequence[float], base: Tensor | Sequence[float]) -> bool:
    """The rule every choice here applies: ``candidate`` beats ``base`` on the same sequences
    (paired, ``(n,)`` per-sequence losses each) only if it is better on more sequences than it
    is worse on (a few sequences cannot carry it) and its mean is lower by more than the
    paired standard error of the difference. Non-finite losses never win.

    Example:
        >>> clearly_better([1.0, 1.0, 1.1, 0.9], [2.0, 2.0, 2.0, 2.0])
        True
        >>> clearly_better([0.0, 2.1, 2.1, 2.1], [2.0, 2.0, 2.0, 2.0])  # one sequence carries it
        False
    """
    cand = torch.as_tensor(candidate, dtype=torch.float64).flatten()
    ref = torch.as_tensor(base, dtype=torch.float64).flatten()
    if cand.shape != ref.shape or cand.numel() < 2:
        raise ValueError(
            f"`candidate` and `base` must be paired per-sequence losses of the same length >= 2, "
            f"got {tuple(cand.shape)} and {tuple(ref.shape)}."
        )
    if not bool(torch.isfinite(cand).all() and torch.isfinite(ref).all()):
        return False
    better, worse = _signs(cand, ref)
    diff = cand - ref
    return better > worse and -float(diff.mean()) > _paired_se(diff)


def _table(
    untailored: float,
    rows: Mapping[TuneConfig, tuple[float, float]],
    chosen: TuneConfig | None,
    sequences: int,
    signs: Mapping[TuneConfig, tuple[int, int]] | None = None,
) -> str:
    lines = [
        f"{'configuration':<30} {'mean loss':>12} {'vs off ± SE':>24} {'better/worse':>13}"
        f"   (over {sequences} sequences)",
        f"{'off (inner_steps=0)':<30} {untailored:>12.5g} {'':>24} {'':>13}"
        + ("   <- chosen" if chosen is None else ""),
    ]
    for config, (mean, se) in rows.items():
        diff = f"{mean - untailored:+.4g} ± {se:.3g}"
        counts = "" if signs is None else "{}/{}".format(*signs[config])
        mark = "   <- chosen" if config == chosen else ""
        lines.append(f"{config.label():<30} {mean:>12.5g} {diff:>24} {counts:>13}{mark}")
    return "\n".join(lines)


def _paired_se(diff: Tensor) -> float:
    return float(diff.std(correction=1) / math.sqrt(diff.shape[0]))


def _check_finite(name: str, value: Tensor) -> None:
    if value.is_floating_point() or value.is_complex():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(
                f"`{name}` has {bad} non-finite value(s) (of {value.numel()}): every score that "
                f"reads them would be NaN. Drop or impute those sequences."
            )


def _check_guards(guards: Sequence[float | None]) -> tuple[float | None, ...]:
    values = tuple(guards)
    ok = bool(values) and all(
        g is None
        or (isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g) and g > 0)
        for g in values
    )
    if not ok:
        raise ValueError(f"`guards` must be None or positive finite floats, got {list(guards)!r}.")
    return tuple(dict.fromkeys(None if g is None else float(g) for g in values))


def _check_candidates(candidates: Sequence[float], name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(c) for c in candidates)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be positive finite floats, got {candidates!r}.") from None
    if not values or not all(math.isfinite(c) and c > 0 for c in values):
        raise ValueError(f"`{name}` must be positive finite floats, got {list(candidates)!r}.")
    return tuple(dict.fromkeys(values))


def _has_rule(net: NoetherWrapper) -> bool:
    return hasattr(net, "step_rule")


def _has_guard(net: NoetherWrapper) -> bool:
    return hasattr(net, "guard")


def _current_rule(net: NoetherWrapper) -> str:
    rule = getattr(net, "step_rule", "fixed") if _has_rule(net) else "fixed"
    if rule not in _DEFAULTS:
        raise ValueError(f"the wrapper's `step_rule` {rule!r} is not one of {list(STEP_RULES)}.")
    return str(rule)


def _apply(net: NoetherWrapper, config: TuneConfig) -> None:
    net.inner_steps = config.inner_steps
    if _has_rule(net):
        setattr(net, _RULE, config.step_rule)
    elif config.step_rule != "fixed":
        raise ValueError(f"this wrapper has no `step_rule` option for {config.step_rule!r}.")
    if _has_guard(net):
        net.guard = config.guard
    elif config.guard is not None:
        raise ValueError("this wrapper has no `guard` option.")
    setter = getattr(type(net), "inner_lr", None)
    if isinstance(setter, property) and setter.fset is not None:
        setattr(net, _LR, config.step)
    else:
        with torch.no_grad():
            net.log_inner_lr.fill_(math.log(config.step))


def _call(net: NoetherWrapper, inputs: Tensor) -> Tensor:
    out = net(inputs)
    assert isinstance(out, Tensor)
    return out
