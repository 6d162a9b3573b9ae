"""Learning what is conserved: the conservation objective and ``fit_conserved`` for any ``g``.

Meta-learning alone gives an embedding almost no signal: a constant ``g`` is a stable fixed point
(its inner gradient vanishes) and the outer loss rewards ``g`` only where in-distribution
prediction errs. What does find the invariant is asking ``g`` directly to be conserved along the
observed training trajectories, relative to how much it varies overall:

    ratio = within-trajectory covariance at a lag / total variance

(per output; for ``m > 1`` outputs, after whitening them over the batch, i.e. ``trace(S^-1 W) /
m``). :class:`~noether_wrap.embeddings.FeatureLibrary` solves this in closed form; here it is
minimised by gradient descent for any ``nn.Module``.

The lag (default: the embedding's ``window``) makes observation noise drop out of the within
term: noise independent in time is uncorrelated between two embedding inputs that share no
frame. With a shorter lag, overlapping windows share frames, and a ``g`` that differences them
earns a negative within covariance from the noise alone; a clearly negative ratio is that
exploit, not conservation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from noether_wrap.embeddings import FeatureLibrary, Standardized
from noether_wrap.loss import embed, stack_windows

Trajectories = Tensor | Sequence[Tensor]

#: Relative ridge on the total covariance, so that ``m`` outputs that duplicate each other
#: score badly instead of dividing by zero.
_RIDGE = 1e-6


def _as_list(trajectories: Trajectories, name: str = "trajectories") -> list[Tensor]:
    if isinstance(trajectories, Tensor):
        if trajectories.dim() < 3:
            raise ValueError(
                f"`{name}` must be (n, T, *state) or a sequence of (T_i, *state); got shape "
                f"{tuple(trajectories.shape)}."
            )
        return list(trajectories.unbind(0))
    trajs = list(trajectories)
    if not trajs or not all(isinstance(t, Tensor) and t.dim() >= 2 for t in trajs):
        raise ValueError(f"`{name}` must be a non-empty sequence of (T_i, *state) tensors.")
    return trajs


def trajectory_codes(
    embedding: nn.Module, trajectories: Trajectories, *, window: int = 1
) -> list[Tensor]:
    """``g`` along every trajectory, in one call of the embedding.

    Args:
        embedding: maps ``(N, *state)`` (``window`` frames stacked on the first state axis) to
            ``(N, m)`` or ``(N,)``.
        trajectories: ``(n, T, *state)`` or a sequence of ``(T_i, *state)``.
        window: frames per embedding input, stacked as the wrapper stacks them.

    Returns:
        A list of ``(T_i - window + 1, m)`` tensors, one per trajectory.
    """
    trajs = _as_list(trajectories)
    if isinstance(trajectories, Tensor):
        codes = embed(embedding, stack_windows(trajectories, window))
        return list(codes.unbind(0))
    windows = [stack_windows(t.unsqueeze(0), window)[0] for t in trajs]
    lengths = [w.shape[0] for w in windows]
    flat = embed(embedding, torch.cat(windows).unsqueeze(0))[0]
    return list(torch.split(flat, lengths))


def _scatter(codes: list[Tensor], lag: int) -> tuple[Tensor, Tensor]:
    """Total covariance ``S`` and within-trajectory (lag) covariance ``W``, both ``(m, m)``."""
    allc = torch.cat(codes)
    centred = allc - allc.mean(0)
    total = centred.T @ centred / allc.shape[0]
    within = torch.zeros_like(total)
    count = 0
    for c in codes:
        d = c - c.mean(0)
        if lag == 0:
            within = within + d.T @ d
            count += d.shape[0]
        else:
            cross = d[:-lag].T @ d[lag:]
            within = within + 0.5 * (cross + cross.T)
            count += d.shape[0] - lag
    return total, within / count


def conservation_ratios(
    embedding: nn.Module,
    trajectories: Trajectories,
    *,
    lag: int | None = None,
    window: int = 1,
) -> Tensor:
    """The conservation objective per whitened output: ``(m,)``, 0 = exactly conserved.

    The eigenvalues of ``S^-1/2 W S^-1/2`` (``S`` the total covariance of ``g`` over all states,
    ``W`` the within-trajectory covariance at ``lag``), ascending: the first is the most nearly
    conserved combination of ``g``'s outputs. With ``lag >= window``, observation noise that is
    independent in time drops out of ``W`` (it can make a ratio slightly negative).

    Args and shapes: as :func:`conservation_loss`.
    """
    values: Tensor = torch.linalg.eigvalsh(
        _whitened_within(embedding, trajectories, lag, window)[0]
    )
    return values


def conservation_loss(
    embedding: nn.Module,
    trajectories: Trajectories,
    *,
    lag: int | None = None,
    window: int = 1,
) -> Tensor:
    """How far ``g`` is from being conserved along ``trajectories``: a differentiable scalar.

    ``trace(S^-1 W) / m``: the within-trajectory covariance of ``g`` at ``lag`` over its total
    covariance, averaged over the ``m`` whitened outputs (for ``m = 1``, the lag-``lag``
    within-trajectory variance over the total variance). It is invariant to any invertible
    linear map of ``g``'s outputs, so shrinking ``g`` towards a constant does not lower it: only
    varying little along each trajectory *relative to between them* does. Whitening makes
    ``m`` outputs find ``m`` different conserved quantities rather than one ``m`` times.

    Add it to an outer loss as a regulariser while meta-training, or minimise it alone with
    :func:`fit_conserved`.

    Args:
        embedding: ``g``, ``(N, *state) -> (N, m)`` or ``(N,)``.
        trajectories: ``(n, T, *state)`` or a sequence of ``(T_i, *state)``, at least two
            trajectories (a ratio needs variation between them).
        lag: steps between the two embedding inputs of the within covariance; default
            ``window`` (robust to observation noise that is independent in time); 0 gives the
            plain within variance.
        window: frames per embedding input.

    Returns:
        A scalar tensor, differentiable in the embedding's parameters.

    Example:
        >>> import torch
        >>> from noether_wrap import conservation_loss
        >>> t = torch.linspace(0, 6, 50)
        >>> r = torch.rand(8, 1, 1) + 0.5
        >>> trajs = torch.stack([torch.cos(t), torch.sin(t)], -1) * r   # circles: q^2 + p^2 kept
        >>> float(conservation_loss(lambda s: s.pow(2).sum(-1), trajs)) < 1e-6
        True
        >>> float(conservation_loss(lambda s: s[:, 0], trajs)) > 0.5
        True
    """
    sym = _whitened_within(embedding, trajectories, lag, window)[0]
    loss: Tensor = torch.diagonal(sym).sum() / sym.shape[0]
    return loss


def _whitened_within(
    embedding: nn.Module, trajectories: Trajectories, lag: int | None, window: int
) -> tuple[Tensor, Tensor]:
    """``L^-1 W L^-T`` with ``L L^T = S`` (ridged), the within covariance of whitened outputs,
    and ``L``."""
    codes = trajectory_codes(embedding, trajectories, window=window)
    total, within = _scatter(codes, _check_lag(lag, window))
    m = total.shape[0]
    scale = torch.diagonal(total).sum().detach() / m
    if not bool(scale > 0):
        raise ValueError(
            "`embedding` is constant on `trajectories` (zero variance): nothing to compare. "
            "Check that it depends on the state."
        )
    eye = torch.eye(m, dtype=total.dtype, device=total.device)
    chol = torch.linalg.cholesky(total + _RIDGE * scale * eye)
    inner = torch.linalg.solve_triangular(chol, within, upper=False)
    sym: Tensor = torch.linalg.solve_triangular(chol, inner.T, upper=False)
    return 0.5 * (sym + sym.T), chol


def conserved_basis(
    embedding: nn.Module,
    trajectories: Trajectories,
    *,
    lag: int | None = None,
    window: int = 1,
) -> tuple[Tensor, Tensor]:
    """The generalised eigenvectors of ``(W, S)`` for ``g``'s outputs: ``(ratios (m,), basis
    (m, m))``; ``(g - mean) @ basis`` has uncorrelated outputs of unit variance, the first the
    most nearly conserved."""
    with torch.no_grad():
        sym, chol = _whitened_within(embedding, trajectories, lag, window)
        values, vectors = torch.linalg.eigh(sym)
        basis = torch.linalg.solve_triangular(chol.T, vectors, upper=True)
    return values, basis


def _check_lag(lag: int | None, window: int) -> int:
    if lag is None:
        return window
    if not isinstance(lag, int) or isinstance(lag, bool) or lag < 0:
        raise ValueError(f"`lag` must be a non-negative int or None (= window), got {lag!r}.")
    return lag


class ConservedFit(NamedTuple):
    """What :func:`fit_conserved` returns.

    Attributes:
        embedding: the fitted ``g`` (a :class:`~noether_wrap.embeddings.Standardized` around it
            when ``standardize=True``).
        ratios: the final conservation ratio of each whitened output, ascending (0 = conserved).
        losses: the objective after every optimisation step (empty for the closed form).
        seconds: wall time of the fit.
    """

    embedding: nn.Module
    ratios: list[float]
    losses: list[float]
    seconds: float


def fit_conserved(
    embedding: nn.Module,
    trajectories: Trajectories,
    *,
    lag: int | None = None,
    window: int = 1,
    steps: int = 2000,
    lr: float = 1e-3,
    batch: int | None = None,
    standardize: bool = True,
    seed: int | None = 0,
    progress: bool = True,
) -> ConservedFit:
    """Train ``g`` to be conserved along observed trajectories (:func:`conservation_loss`).

    A :class:`~noether_wrap.embeddings.FeatureLibrary` is fitted in closed form (the smallest
    generalised eigenvector); any other module by Adam on the objective. The result is
    standardised on the same trajectories (zero mean, unit spread per output), so that an
    ``inner_lr`` means "a step per unit of g's spread" whatever ``g`` is; ``m > 1`` outputs are
    also rotated onto the generalised eigenvectors, so they come out uncorrelated on the fit data
    and sorted from the most nearly conserved.

    Args:
        embedding: ``g``, ``(N, *state) -> (N, m)`` or ``(N,)``; trained in place.
        trajectories: ``(n, T, *state)`` or a sequence of ``(T_i, *state)``: observed (noisy)
            training trajectories, at least two.
        lag: steps between the inputs of the within covariance (default ``window``: robust to
            observation noise); 0 or 1 for a ``FeatureLibrary``.
        window: frames per embedding input, stacked as ``NoetherWrapper(window=...)`` does.
        steps: Adam steps (ignored by the closed form).
        lr: Adam's learning rate.
        batch: trajectories per step (a random subset each step); None: all of them.
        standardize: wrap the result in :class:`~noether_wrap.embeddings.Standardized`.
        seed: seeds the batch sampling (None: torch's global generator).
        progress: a tqdm bar when tqdm is installed.

    Returns:
        A :class:`ConservedFit`.

    Example:
        >>> import torch
        >>> from noether_wrap import fit_conserved
        >>> from noether_wrap.embeddings import MLPEmbedding
        >>> t = torch.linspace(0, 6, 40)
        >>> trajs = torch.stack([torch.cos(t), torch.sin(t)], -1) * (torch.rand(16, 1, 1) + 0.5)
        >>> fit = fit_conserved(MLPEmbedding(2), trajs, steps=200, progress=False)
        >>> fit.ratios[0] < 0.05
        True
    """
    if not isinstance(embedding, nn.Module):
        raise TypeError(f"`embedding` (type: {type(embedding).__name__}) is not an nn.Module.")
    trajs = _as_list(trajectories)
    if len(trajs) < 2:
        raise ValueError(f"`trajectories` must hold at least 2 trajectories, got {len(trajs)}.")
    lag = _check_lag(lag, window)
    for name, value in (("steps", steps), ("window", window)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if batch is not None and (not isinstance(batch, int) or batch < 2):
        raise ValueError(f"`batch` must be None or an int >= 2, got {batch!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"`lr` must be a positive float, got {lr!r}.")
    short = min(t.shape[0] for t in trajs)
    if short < window + lag + 1:
        raise ValueError(
            f"`trajectories`: each needs at least window + lag + 1 = {window + lag + 1} states, "
            f"the shortest has {short}."
        )
    start = time.perf_counter()
    losses: list[float] = []
    if isinstance(embedding, FeatureLibrary):
        if window != 1:
            raise ValueError(
                f"a FeatureLibrary reads single states: `window` must be 1, got {window}."
            )
        embedding.fit_conserved(trajs, lag=lag)
    else:
        params = [p for p in embedding.parameters() if p.requires_grad]
        if not params:
            raise ValueError("`embedding` has no trainable parameter to fit.")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(params, lr=lr)
        ticks = _progress(range(steps), progress, "fit_conserved")
        same_length = isinstance(trajectories, Tensor)
        for _ in ticks:
            if batch is None or batch >= len(trajs):
                chosen: Trajectories = trajectories if same_length else trajs
            else:
                pick = torch.randperm(len(trajs), generator=gen)[:batch].tolist()
                chosen = [trajs[i] for i in pick]
                if same_length:
                    chosen = torch.stack(chosen)
            loss = conservation_loss(embedding, chosen, lag=lag, window=window)
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses.append(float(loss.detach()))
    ratios, basis = conserved_basis(embedding, trajs, lag=lag, window=window)
    fitted: nn.Module = embedding
    if standardize:
        mix = basis if basis.shape[0] > 1 else None
        fitted = Standardized.fit(embedding, trajs, window=window, basis=mix)
    seconds = time.perf_counter() - start
    return ConservedFit(fitted, [float(r) for r in ratios], losses, seconds)


def _progress(iterable: range, show: bool, desc: str):  # type: ignore[no-untyped-def]
    if not show:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return iterable
    return tqdm(iterable, desc=desc, leave=False)
