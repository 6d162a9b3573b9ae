"""Validation that measures what a test measures, on noisy observations.

Tuning a wrapper (:func:`noether_wrap.tune`) compares configurations on held-out training data.
On observed trajectories that comparison is easily dominated by something no configuration can
change: **the observation noise in a rollout's start**. A rollout from a noisy start inherits the
noise's error at every step, and on chaotic or oscillating systems it grows. Measured on the
pendulum example (observation noise σ = 0.1): the vanilla model's validation error was 0.374 from
the noisy observed starts against 0.0058 from the clean ones, so the start's noise was ~98 % of
the score and ranked configurations at random. The helpers here remove that:

- :func:`estimate_starts` denoises each start by fitting it so the (frozen) model's rollout
  matches the first few observations;
- :func:`window_targets` cuts trajectories into many short windows, so there are many validation
  units (and a small standard error) and each rollout is short;
- :func:`kfold` splits trajectories (not windows: windows of one trajectory are correlated)
  into folds, and :func:`cross_validate` scores every configuration on every training
  trajectory with models refitted without it (pair it with :func:`noether_wrap.tuning.choose`);
- :func:`spearman` reports how well a validation ranking agrees with a test ranking.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from einops import rearrange
from torch import Tensor, nn

from noether_wrap._checks import check_int

__all__ = ["cross_validate", "estimate_starts", "kfold", "spearman", "window_targets"]

K = TypeVar("K", bound=Hashable)
F = TypeVar("F")


def kfold(n: int, folds: int = 5, *, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Split ``n`` items into ``folds`` disjoint validation folds, deterministically.

    The items are permuted by a generator seeded with ``seed`` (the global random state is not
    touched) and cut into ``folds`` parts whose sizes differ by at most one. Split whole
    trajectories, then cut windows (:func:`window_targets`) inside each split, so that no
    trajectory feeds both sides.

    Args:
        n: how many items (e.g. trajectories), ``n >= folds``.
        folds: how many folds, ``>= 2``.
        seed: the permutation's seed.

    Returns:
        ``folds`` pairs ``(train_idx, val_idx)`` of sorted int64 index tensors: the validation
        folds partition ``range(n)`` and each ``train_idx`` is the complement of its ``val_idx``.

    Example:
        >>> from noether_wrap.validation import kfold
        >>> splits = kfold(10, folds=3, seed=0)
        >>> [len(val) for _, val in splits]
        [4, 3, 3]
        >>> sorted(int(i) for _, val in splits for i in val) == list(range(10))
        True
    """
    check_int("folds", folds, minimum=2)
    check_int("n", n, minimum=folds)
    check_int("seed", seed, minimum=-(2**63))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    out = []
    for part in torch.tensor_split(order, folds):
        mask = torch.ones(n, dtype=torch.bool)
        mask[part] = False
        out.append((torch.arange(n)[mask], part.sort().values))
    return out


def cross_validate(
    fit: Callable[[Tensor], F],
    score: Callable[[F, Tensor], Mapping[K, Tensor]],
    n: int,
    *,
    folds: int = 5,
    seed: int = 0,
) -> dict[K, Tensor]:
    """Whole-sequence k-fold cross-validation: every sequence scored once, by models fitted
    without it.

    For each fold of :func:`kfold`, ``fit(train_indices)`` fits whatever the scores need (the
    model, every ``g``, a normalisation: nothing that scores a sequence may be fitted on it),
    and ``score(fitted, val_indices)`` returns ``{configuration: (len(val_indices),) losses}``
    for the held-out sequences. The result pairs every configuration's losses over all ``n``
    sequences, in index order, ready for :func:`noether_wrap.tuning.choose` (with "off" as one
    of the configurations or as the baseline).

    Args:
        fit: ``(train_indices,) -> fitted``.
        score: ``(fitted, val_indices) -> {key: (len(val_indices),)}``, the same keys every fold.
        n: how many sequences (indices ``0 .. n - 1``).
        folds, seed: as for :func:`kfold`.

    Returns:
        ``{key: (n,)}`` per-sequence losses, float64.

    Example:
        >>> import torch
        >>> from noether_wrap.validation import cross_validate
        >>> data = torch.arange(10.0)
        >>> scores = cross_validate(lambda tr: data[tr].mean(),
        ...                         lambda mean, va: {"mean": (data[va] - mean) ** 2}, 10)
        >>> scores["mean"].shape
        torch.Size([10])
    """
    out: dict[K, Tensor] = {}
    keys: list[K] | None = None
    for train, val in kfold(n, folds, seed=seed):
        scored = score(fit(train), val)
        if keys is None:
            keys = list(scored)
        elif set(scored) != set(keys):
            raise ValueError(
                f"`score` must return the same keys for every fold; got {sorted(map(repr, scored))}"
                f" after {sorted(map(repr, keys))}."
            )
        for key, losses in scored.items():
            values = torch.as_tensor(losses).detach().double().cpu().flatten()
            if values.shape != val.shape:
                raise ValueError(
                    f"`score` must return one loss per held-out sequence for {key!r}: "
                    f"{val.numel()} expected, got shape {tuple(values.shape)}."
                )
            out.setdefault(key, torch.full((n,), math.nan, dtype=torch.float64))[val] = values
    return out


def estimate_starts(
    model: Callable[[Tensor], Tensor],
    observations: Tensor,
    *,
    frames: int = 3,
    steps: int = 50,
    lr: float | None = None,
    method: str = "lbfgs",
    forward: Callable[[Any, Tensor], Tensor] | None = None,
) -> Tensor:
    """Denoise the starts of observed trajectories by fitting them to the model's rollout.

    For each trajectory, finds the start ``x0`` whose rollout best matches the first ``frames``
    observations in least squares::

        ‖x0 − y_0‖² + Σ_{t=1}^{frames−1} ‖model(x0)[:, t−1] − y_t‖²

    starting from ``x0 = y_0``, with the model frozen. With independent Gaussian observation
    noise this is the maximum-likelihood start given those frames; it removes most of the
    start's noise, which otherwise dominates a rollout's validation error (0.374 from noisy
    starts vs 0.0058 from clean ones for the pendulum example's vanilla model) and makes a
    tuning rank configurations at random.

    The model is run in ``eval()`` mode (restored afterwards) under ``torch.enable_grad()``; its
    parameters and buffers are not changed and get no ``.grad`` (only ``x0`` is differentiated).
    Pass the plain predictor (e.g. ``net.model``), not a tailoring wrapper. Score a tuning on the
    frames after the fitted ones (``frames − 1`` onwards in the model's output), or accept
    that those first frames were seen by the fit.

    Args:
        model: ``model(x0) -> (n, T', *state)``, predictions at observation times ``1..T'``
            (the start itself not included), e.g. a :class:`noether_wrap.Rollout`;
            ``T' >= frames − 1``.
        observations: ``(n, T, *state)``, noisy observed trajectories, ``T >= frames``; row
            ``t`` is observation time ``t``.
        frames: how many observations to fit (``>= 1``; 1 returns ``observations[:, 0]``).
        steps: optimiser iterations (L-BFGS iterations, or Adam steps).
        lr: the step: default 1.0 for ``"lbfgs"`` (with a strong-Wolfe line search), 1e-2 for
            ``"adam"``.
        method: ``"lbfgs"`` (default: converges in a few iterations on smooth rollouts) or
            ``"adam"`` (elementwise, so each trajectory's fit is exactly independent of the
            batch; L-BFGS's line search is shared by the batch, which changes the path, not the
            minimum).
        forward: ``(model, x0) -> predictions`` when the rollout is not ``model(x0)``.

    Returns:
        ``(n, *state)``: the fitted starts, detached, in the observations' dtype.

    Example:
        >>> import torch
        >>> from noether_wrap import Rollout
        >>> from noether_wrap.validation import estimate_starts
        >>> step = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = step.weight.copy_(torch.tensor([[0.9, -0.4], [0.4, 0.9]]))
        >>> model = Rollout(step, horizon=4)
        >>> clean = torch.randn(64, 2)
        >>> with torch.no_grad():
        ...     path = torch.cat([clean[:, None], model(clean)], dim=1)
        >>> noisy = path + 0.1 * torch.randn(path.shape)
        >>> starts = estimate_starts(model, noisy, frames=5)
        >>> bool((starts - clean).pow(2).mean() < (noisy[:, 0] - clean).pow(2).mean())
        True
    """
    if not callable(model):
        raise TypeError(f"`model` must be callable, got {type(model).__name__}.")
    if not isinstance(observations, Tensor) or not observations.is_floating_point():
        raise TypeError("`observations` must be a floating-point Tensor (n, T, *state).")
    if observations.dim() < 3:
        raise ValueError(
            "`observations` must be (n, T, *state) with a state of at least one dim, got shape "
            f"{tuple(observations.shape)}."
        )
    check_int("frames", frames, minimum=1)
    check_int("steps", steps, minimum=1)
    if not isinstance(method, str) or method not in ("lbfgs", "adam"):
        raise ValueError(f"`method` must be 'lbfgs' or 'adam', got {method!r}.")
    if lr is None:
        lr = 1.0 if method == "lbfgs" else 1e-2
    if (
        not isinstance(lr, (int, float))
        or isinstance(lr, bool)
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ValueError(f"`lr` must be a positive finite float, got {lr!r}.")
    if forward is not None and not callable(forward):
        raise TypeError(f"`forward` must be callable or None, got {type(forward).__name__}.")
    n, length = observations.shape[:2]
    if length < frames:
        raise ValueError(
            f"`observations` has {length} time steps (dim 1) but `frames` = {frames} are fitted."
        )
    bad = int((~torch.isfinite(observations[:, :frames])).sum())
    if bad:
        raise ValueError(
            f"`observations` has {bad} non-finite value(s) in the first `frames` = {frames} steps."
        )
    if frames == 1:
        return observations[:, 0].detach().clone()

    run: Callable[[Tensor], Tensor] = model if forward is None else (lambda x: forward(model, x))
    modules = list(model.modules()) if isinstance(model, nn.Module) else []
    modes = [m.training for m in modules]
    with torch.inference_mode(False), torch.enable_grad():
        observed = observations[:, :frames].detach().clone()
        x0 = observed[:, 0].clone().requires_grad_(True)

        def objective() -> Tensor:
            prediction = run(x0)
            if not isinstance(prediction, Tensor) or prediction.dim() < 2:
                raise ValueError("the model's rollout must be a Tensor (n, T', *state).")
            want = (n, *observations.shape[2:])
            got = (prediction.shape[0], *prediction.shape[2:])
            if got != want or prediction.shape[1] < frames - 1:
                raise ValueError(
                    f"the model's rollout has shape {tuple(prediction.shape)}; expected "
                    f"({n}, >= {frames - 1}, {', '.join(map(str, want[1:]))}) for `observations` "
                    f"of shape {tuple(observations.shape)} and `frames` = {frames}."
                )
            fit = (prediction[:, : frames - 1] - observed[:, 1:]).pow(2).sum()
            return fit + (x0 - observed[:, 0]).pow(2).sum()

        def closure() -> Tensor:
            value = objective()
            (grad,) = torch.autograd.grad(value, x0)
            x0.grad = grad
            return value.detach()

        try:
            for m in modules:
                m.train(False)
            if method == "lbfgs":
                lbfgs = torch.optim.LBFGS(
                    [x0],
                    lr=float(lr),
                    max_iter=steps,
                    line_search_fn="strong_wolfe",
                    tolerance_grad=1e-12,
                    tolerance_change=1e-14,
                )
                lbfgs.step(closure)  # type: ignore[no-untyped-call]
            else:
                adam = torch.optim.Adam([x0], lr=float(lr))
                for _ in range(steps):
                    adam.step(closure)
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode
    return x0.detach()


def window_targets(
    trajectories: Tensor, length: int, stride: int | None = None
) -> tuple[Tensor, Tensor]:
    """Cut trajectories into short windows: a start and the ``length`` states after it.

    Windows begin at times ``0, stride, 2·stride, …`` while ``start + length <= T − 1``; with
    the default ``stride = length`` the targets of successive windows do not overlap. Scoring
    many short windows instead of a few long rollouts gives many validation units (a small
    standard error) and keeps each rollout short. Windows are ordered trajectory-major: window
    ``i`` comes from trajectory ``i // W`` at time ``stride · (i % W)``, ``W = N / n``.

    Args:
        trajectories: ``(n, T, *state)``.
        length: how many states after each start to predict, ``1 <= length <= T − 1``.
        stride: time between successive starts (default ``length``).

    Returns:
        ``(starts, targets)``: ``(N, *state)`` and ``(N, length, *state)``, ``N = n · W``,
        ``W = (T − 1 − length) // stride + 1``.

    Example:
        >>> import torch
        >>> from noether_wrap.validation import window_targets
        >>> paths = torch.arange(2 * 7 * 1.0).reshape(2, 7, 1)  # 2 trajectories, T = 7
        >>> starts, targets = window_targets(paths, length=2)
        >>> starts.shape, targets.shape
        (torch.Size([6, 1]), torch.Size([6, 2, 1]))
        >>> starts[:3, 0].tolist(), targets[1, :, 0].tolist()
        ([0.0, 2.0, 4.0], [3.0, 4.0])
    """
    if not isinstance(trajectories, Tensor) or trajectories.dim() < 3:
        raise ValueError(
            "`trajectories` must be a Tensor (n, T, *state) with a state of at least one dim."
        )
    steps_in = trajectories.shape[1]
    check_int("length", length, minimum=1)
    if length > steps_in - 1:
        raise ValueError(
            f"`length` must be at most T − 1 = {steps_in - 1} for trajectories of shape "
            f"{tuple(trajectories.shape)}, got {length}."
        )
    stride = length if stride is None else stride
    check_int("stride", stride, minimum=1)
    windows = trajectories.unfold(1, length + 1, stride)  # (n, W, *state, length + 1)
    windows = rearrange(windows, "n w ... l -> (n w) l ...")
    return windows[:, 0].contiguous(), windows[:, 1:].contiguous()


def spearman(a: Tensor | Sequence[float], b: Tensor | Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long 1-D samples, ties given their mean rank.

    The Pearson correlation of the ranks (as ``scipy.stats.spearmanr``); NaN when either sample
    is constant. Used to report how well validation errors rank configurations the way test
    errors do.

    Args:
        a: ``(m,)`` values (a Tensor, a list, a NumPy array), finite, ``m >= 2``.
        b: ``(m,)`` values.

    Returns:
        A float in ``[−1, 1]`` (or NaN).

    Example:
        >>> from noether_wrap.validation import spearman
        >>> round(spearman([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 20.0, 40.0]), 4)  # a tie
        0.9487
        >>> spearman([1, 2, 3], [3, 2, 1])
        -1.0
    """
    x = _as_sample("a", a)
    y = _as_sample("b", b)
    if x.shape != y.shape:
        raise ValueError(f"`a` and `b` must have the same length, got {x.numel()} and {y.numel()}.")
    if x.numel() < 2:
        raise ValueError(f"`a` and `b` need at least 2 values, got {x.numel()}.")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denominator == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(rx @ ry) / denominator))


def _ranks(x: Tensor) -> Tensor:
    """1-based ranks, ties averaged."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average: Tensor = ends - (counts.double() - 1) / 2  # mean of ranks end-count+1 .. end
    ranks: Tensor = average[inverse]
    return ranks


def _as_sample(name: str, value: Tensor | Sequence[float]) -> Tensor:
    try:
        out = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"`{name}` must be a 1-D sequence of numbers.") from None
    if out.dim() != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {tuple(out.shape)}.")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"`{name}` has non-finite values.")
    return out.detach().cpu()
