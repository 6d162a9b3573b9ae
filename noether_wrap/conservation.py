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
exploit, not conservation, and :func:`fit_conserved` refuses it (see there).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from noether_wrap._checks import check_choice, check_int, check_positive_float
from noether_wrap._scatter import scatter, whiten
from noether_wrap.diagnostics import Diagnosis, diagnose
from noether_wrap.embeddings import FeatureLibrary, Standardized
from noether_wrap.loss import embed, stack_windows

Trajectories = Tensor | Sequence[Tensor]

#: Ridge on the total covariance, relative to its mean variance, so that ``m`` outputs that
#: duplicate each other score badly instead of dividing by zero (float32 codes: it must sit well
#: above float32's 1.2e-7 resolution; the closed form in float64 uses 1e-9, see embeddings.py).
_RIDGE = 1e-6

#: How far below the white-noise floor ``-1 / L`` a fitted ratio may fall before it is taken for
#: an exploit (swapped axes, a lag too short) rather than a fit: see :func:`fit_conserved`.
_NEGATIVE_MARGIN = 0.05

#: Below this, the convergence rule of :func:`fit_conserved` counts improvements absolutely
#: (``tol * 1e-3``): a ratio of 1e-3 leaves 0.1 % of g's variance unconserved, and chasing
#: relative gains under it would run noise-free data to ``max_steps``.
_RATIO_FLOOR = 1e-3


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
    _check_dtype(embedding, trajs)
    if isinstance(trajectories, Tensor):
        codes = embed(embedding, stack_windows(trajectories, window))
        return list(codes.unbind(0))
    windows = [stack_windows(t.unsqueeze(0), window)[0] for t in trajs]
    lengths = [w.shape[0] for w in windows]
    flat = embed(embedding, torch.cat(windows).unsqueeze(0))[0]
    return list(torch.split(flat, lengths))


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


def drift_loss(
    embedding: nn.Module, trajectories: Trajectories, velocities: Trajectories
) -> Tensor:
    """How much ``g`` drifts along the data's derivative labels, relative to its spread.

    ``trace(S^-1 D) / m``: ``S`` the total covariance of ``g`` over the states, ``D = E[d dᵀ]``
    with ``d = (g(x + h v) − g(x − h v)) / 2 ≈ h ∇g(x) · v``, ``v`` the label at ``x`` and ``h``
    the data's own step (the RMS observed step over the RMS label), so ``d`` is ``g``'s change
    over one observed step along the label. It is what :func:`~noether_wrap.diagnostics.diagnose`
    calls ``g``'s drift along the data, and what tailoring would wrongly correct into a model;
    like :func:`conservation_loss` it is invariant to invertible linear maps of ``g``'s outputs.
    Labels from clean states (HNN's convention) keep their precision where the states are noisy.

    Args:
        embedding: ``g``, ``(N, *state) -> (N, m)`` or ``(N,)``, on single states.
        trajectories: ``(n, T, *state)`` or a sequence of ``(T_i, *state)``.
        velocities: the time derivative at every state, shaped like ``trajectories``.

    Returns:
        A scalar tensor, differentiable in the embedding's parameters.

    Example:
        >>> import torch
        >>> from noether_wrap import drift_loss
        >>> t = torch.linspace(0, 6, 50)
        >>> r = torch.rand(8, 1, 1) + 0.5
        >>> trajs = torch.stack([torch.cos(t), torch.sin(t)], -1) * r
        >>> labels = torch.stack([-trajs[..., 1], trajs[..., 0]], -1)   # the rotation's field
        >>> float(drift_loss(lambda s: s.pow(2).sum(-1), trajs, labels)) < 1e-8
        True
    """
    x, hv = _labelled_states(trajectories, velocities)
    sym = _whitened_drift(embedding, x, hv)[0]
    loss: Tensor = sym.diagonal().sum() / sym.shape[0]
    return loss


def denoise_with_labels(trajectories: Trajectories, velocities: Trajectories) -> Trajectories:
    """The states the derivative labels imply: each trajectory's labels integrated over time and
    placed on its observations by least squares.

    Fitting ``g`` for precision (:func:`drift_loss`) asks ``∇g`` along each label to vanish at
    each state; where the states are noisy and the labels clean (HNN's convention: labels from
    the clean states), ``∇g`` is taken at the wrong state and the fit learns the mismatch too
    (errors in variables). Integrating the labels gives each trajectory's shape up to one
    constant; the constant is the mean of observations minus path, so independent observation
    noise of spread ``σ`` shrinks to about ``σ / sqrt(T)``, one offset per trajectory.

    The step between observations is estimated from the data (least squares of the observed
    steps on the mean label over each step), so labels in any time unit work; the states must
    be equally spaced in time. Each step integrates ``Δx = h (v_t + v_{t+1}) / 2 + h^2 (a_t -
    a_{t+1}) / 12`` (the trapezoid with its Hermite correction, ``a`` the labels' second-order
    differences): the error is fifth order in ``h`` per step, fourth order overall. Noisy
    labels random-walk: use it for precise labels (from a simulator, from clean states,
    measured velocities).

    Args:
        trajectories: ``(n, T, *state)`` or a sequence of ``(T_i, *state)``, ``T >= 2``.
        velocities: the time derivative at every state, shaped like ``trajectories``.

    Returns:
        The denoised trajectories, in ``trajectories``' form (a tensor or a list) and dtype.

    Example:
        >>> import torch
        >>> from noether_wrap import denoise_with_labels
        >>> _ = torch.manual_seed(0)
        >>> t = torch.linspace(0, 3, 45, dtype=torch.float64)
        >>> clean = torch.stack([torch.cos(t), -torch.sin(t)], -1)[None]     # (1, 45, 2)
        >>> labels = torch.stack([-torch.sin(t), -torch.cos(t)], -1)[None]
        >>> noisy = clean + 0.1 * torch.randn(clean.shape, dtype=torch.float64)
        >>> denoised = denoise_with_labels(noisy, labels)
        >>> bool((denoised - clean).pow(2).mean() < (noisy - clean).pow(2).mean() / 10)
        True
    """
    trajs, vels = _as_list(trajectories), _as_list(velocities, "velocities")
    _check_labels(trajs, vels)
    if any(t.shape[0] < 2 for t in trajs):
        raise ValueError(
            "`trajectories` must have at least 2 states each to integrate the labels, got "
            f"lengths {[t.shape[0] for t in trajs if t.shape[0] < 2][:3]}."
        )
    _check_finite(trajs)
    _check_finite(vels, "velocities")
    xs = [t.double().flatten(1) for t in trajs]
    vs = [v.double().flatten(1) for v in vels]
    # each step is h * u: the mean label plus the Hermite term in per-index differences
    units = [_hermite_units(v) for v in vs]
    num = sum(float(((x[1:] - x[:-1]) * u).sum()) for x, u in zip(xs, units))
    den = sum(float(u.pow(2).sum()) for u in units)
    if not (den > 0 and num > 0):
        raise ValueError(
            "`velocities` do not point along `trajectories`' observed steps (their least-squares "
            f"time step is {num / den if den > 0 else float('nan'):.3g}, not positive): check "
            "that they are the time derivatives of the same states, in the same order."
        )
    h = num / den
    out = []
    for x, u, t in zip(xs, units, trajs):
        path = torch.cat([torch.zeros_like(x[:1]), (h * u).cumsum(0)])
        out.append((path + (x - path).mean(0)).reshape(t.shape).to(t.dtype))
    return torch.stack(out) if isinstance(trajectories, Tensor) else out


def _hermite_units(v: Tensor) -> Tensor:
    """``(T, d) -> (T - 1, d)``: each step over the time step, ``(v_t + v_{t+1}) / 2 + (s_t -
    s_{t+1}) / 12`` with ``s`` the labels' per-index slope (second-order differences)."""
    slope = torch.gradient(v, dim=0, edge_order=2 if len(v) > 2 else 1)[0]
    return 0.5 * (v[1:] + v[:-1]) + (slope[:-1] - slope[1:]) / 12


def _check_labels(trajs: list[Tensor], vels: list[Tensor]) -> None:
    if len(vels) != len(trajs) or any(a.shape != b.shape for a, b in zip(trajs, vels)):
        raise ValueError(
            "`velocities` must have the shape of `trajectories` (one label per state), got "
            f"{[tuple(b.shape) for b in vels[:3]]} for {[tuple(a.shape) for a in trajs[:3]]}."
        )


def _labelled_states(trajectories: Trajectories, velocities: Trajectories) -> tuple[Tensor, Tensor]:
    """Every state ``(N, *state)`` with its label, and the data's step ``h`` applied: returns
    ``(x, h * v)``."""
    trajs, vels = _as_list(trajectories), _as_list(velocities, "velocities")
    _check_labels(trajs, vels)
    steps = torch.cat([(t[1:] - t[:-1]).flatten(1) for t in trajs])
    x, v = torch.cat(trajs), torch.cat(vels)
    h = steps.pow(2).sum(1).mean().sqrt() / v.flatten(1).pow(2).sum(1).mean().sqrt().clamp_min(
        torch.finfo(v.dtype).tiny
    )
    return x, h.detach() * v


def _whitened_drift(embedding: nn.Module, x: Tensor, hv: Tensor) -> tuple[Tensor, Tensor]:
    """``(L^-1 D L^-T, L)``: the drift second moment of whitened outputs and ``S``'s factor."""
    codes = embed(embedding, torch.stack([x, x + hv, x - hv], 1))  # (N, 3, m)
    centred = codes[:, 0] - codes[:, 0].mean(0)
    total = centred.T @ centred / codes.shape[0]
    d = 0.5 * (codes[:, 1] - codes[:, 2])
    return whiten(total, d.T @ d / codes.shape[0], _RIDGE)


def _whitened_within(
    embedding: nn.Module, trajectories: Trajectories, lag: int | None, window: int
) -> tuple[Tensor, Tensor]:
    """``L^-1 W L^-T`` with ``L L^T = S`` (ridged), the within covariance of whitened outputs,
    and ``L``."""
    codes = trajectory_codes(embedding, trajectories, window=window)
    total, within = scatter(codes, _check_lag(lag, window))
    scale = torch.diagonal(total).sum().detach()
    if not bool(torch.isfinite(scale)):
        _check_finite(_as_list(trajectories))  # names the trajectory, if that is where it is
        raise ValueError(
            "`embedding`'s outputs on `trajectories` are not finite (NaN or inf) although the "
            "states are: check `embedding` for NaN parameters or an overflow."
        )
    if not bool(scale > 0):
        raise ValueError(
            "`embedding` is constant on `trajectories` (zero variance): nothing to compare. "
            "Check that it depends on the state."
        )
    return whiten(total, within, _RIDGE)


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
    return check_int("lag", lag, minimum=0)


def _check_finite(trajs: list[Tensor], name: str = "trajectories") -> None:
    """Raise a ValueError naming how many non-finite values (NaN, inf) ``trajs`` hold, and where.

    One device sync for all trajectories; integer states pass.
    """
    device = trajs[0].device
    counts = torch.stack([(~torch.isfinite(t)).sum().to(device) for t in trajs]).tolist()
    total = sum(counts)
    if total == 0:
        return
    where: list[str] = []
    for i, count in enumerate(counts):
        if count and len(where) < 5:
            steps = (~torch.isfinite(trajs[i])).flatten(1).any(1).nonzero().flatten()
            where.append(f"{count} in trajectory {i} (first at time step {int(steps[0])})")
    shown = sum(1 for c in counts if c)
    more = f", and {shown - len(where)} more trajectories" if shown > len(where) else ""
    raise ValueError(
        f"`{name}` holds {total} non-finite value(s) (NaN or inf): {'; '.join(where)}{more}. "
        "The conservation ratio needs finite states: drop or repair those trajectories."
    )


def _check_dtype(embedding: object, trajs: list[Tensor]) -> None:
    """Raise a ValueError when floating ``trajs`` and the embedding's floating parameters differ
    in dtype (torch would say only ``mat1 and mat2 must have the same dtype``).

    A :class:`~noether_wrap.embeddings.FeatureLibrary` casts its weights to the states' dtype,
    so its parameters are not compared; modules with parameters of several dtypes are left to
    themselves.
    """
    dtypes = {t.dtype for t in trajs}
    if len(dtypes) > 1:
        raise ValueError(
            f"`trajectories` mix dtypes {sorted(str(d) for d in dtypes)}: convert them to one."
        )
    data = trajs[0].dtype
    if not isinstance(embedding, nn.Module) or not data.is_floating_point:
        return
    params = {
        p.dtype
        for module in embedding.modules()
        if not isinstance(module, FeatureLibrary)
        for p in module.parameters(recurse=False)
        if p.is_floating_point()
    }
    if len(params) != 1 or data in params:
        return
    (param,) = params
    short = {torch.float32: "float", torch.float64: "double", torch.float16: "half"}
    fix_data = f"`trajectories.{short[param]}()`" if param in short else f"`.to({param})`"
    fix_g = f"`embedding.{short[data]}()`" if data in short else f"`embedding.to({data})`"
    raise ValueError(
        f"`trajectories` are {data} but `embedding`'s parameters are {param}: convert one to "
        f"the other, e.g. {fix_data} or {fix_g}."
    )


class ConservedFit(NamedTuple):
    """What :func:`fit_conserved` returns.

    Attributes:
        embedding: the fitted ``g`` (a :class:`~noether_wrap.embeddings.Standardized` around it
            when ``standardize=True``).
        ratios: the final conservation ratio of each whitened output on all trajectories,
            ascending (0 = conserved).
        losses: the training objective after every optimisation step (empty for the closed
            form).
        seconds: wall time of the fit.
        steps: optimisation steps taken (``len(losses)``; 0 for the closed form).
        best_step: the step whose parameters were kept: ``steps`` for a fixed count, the best
            held-out evaluation under the convergence rule (``steps=None``).
        held_out: the held-out objective at every evaluation (one per ``eval_every`` steps)
            under the convergence rule; None for a fixed count or the closed form.
        drifts: with ``velocities``, each returned output's drift along the labels over one
            observed step, relative to its spread (the diagonal of :func:`drift_loss`'s
            matrix; 0 = exact), at the observed states: where they are noisy and the labels
            clean, this includes the mismatch (fit on :func:`denoise_with_labels`' states to
            remove most of it); None without labels.

    The first four fields keep their order, so ``g, ratios, losses, seconds, *_ = fit`` unpacks.
    """

    embedding: nn.Module
    ratios: list[float]
    losses: list[float]
    seconds: float
    steps: int = 0
    best_step: int = 0
    held_out: list[float] | None = None
    drifts: list[float] | None = None

    def diagnose(
        self, model: Callable[[Tensor], Tensor], states: Tensor, targets: Tensor, **kwargs: Any
    ) -> Diagnosis:
        """Whether this ``g`` is precise enough to help ``model``: see
        :func:`noether_wrap.diagnostics.diagnose` (``kind``, ``dt``, ``warn_if_not``)."""
        return diagnose(self.embedding, model, states, targets, **kwargs)


def fit_conserved(
    embedding: nn.Module,
    trajectories: Trajectories,
    *,
    lag: int | None = None,
    window: int = 1,
    steps: int | None = None,
    lr: float = 1e-3,
    batch: int | None = None,
    standardize: bool = True,
    seed: int | None = 0,
    progress: bool = True,
    max_steps: int = 20_000,
    eval_every: int = 100,
    patience: int = 5,
    tol: float = 1e-2,
    holdout: float = 0.2,
    velocities: Trajectories | None = None,
    drift_weight: float = 10.0,
    schedule: str = "constant",
) -> ConservedFit:
    """Train ``g`` to be conserved along observed trajectories (:func:`conservation_loss`).

    A :class:`~noether_wrap.embeddings.FeatureLibrary` is fitted in closed form (the smallest
    generalised eigenvector); any other module by Adam on the objective. The result is
    standardised on the same trajectories (zero mean, unit spread per output), so that an
    ``inner_lr`` means "a step per unit of g's spread" whatever ``g`` is; ``m > 1`` outputs are
    also rotated onto the generalised eigenvectors, so they come out uncorrelated on the fit data
    and sorted from the most nearly conserved.

    **How long.** With ``steps=None`` (default) Adam runs until the objective converges: a
    share ``holdout`` of the trajectories (at least 2, picked by ``seed``) is held out, their
    objective is evaluated every ``eval_every`` steps, and training stops once it has not
    improved by ``tol`` (relative) for ``patience`` evaluations in a row, or after ``max_steps``.
    The parameters of the best held-out evaluation are restored; they are *not* refitted on all
    trajectories (the held-out share only picks when to stop), but the reported ``ratios`` and
    the standardisation use all of them. With fewer than 4 trajectories nothing can be held out
    (a ratio needs two trajectories on each side) and the rule watches the objective on all of
    them. An int ``steps`` runs exactly that many steps on all trajectories (the behaviour
    before the rule).

    **A clearly negative ratio is refused.** A conserved ``g`` has ratio about 0; an unconserved
    one a positive ratio, or down to about ``-1 / L`` (``L`` embedding inputs per trajectory)
    when it is white noise, from centring each trajectory on its own mean. A fitted ratio below
    ``-(0.05 + 1 / L)`` means ``g`` learned to *anti*-correlate at ``lag``: usually
    ``trajectories`` given as ``(T, n, *state)`` instead of ``(n, T, *state)``, or a ``lag``
    too short (inputs sharing frames when ``lag < window``; motion that reverses within ``lag``
    steps). That raises a ValueError when ``lag >= window``; with an explicit ``lag < window``
    it only warns (the frame-sharing exploit is then expected, and the caller asked for it).

    Args:
        embedding: ``g``, ``(N, *state) -> (N, m)`` or ``(N,)``; trained in place. Its
            floating parameters must have the trajectories' dtype.
        trajectories: ``(n, T, *state)`` or a sequence of ``(T_i, *state)``: observed (noisy)
            training trajectories, at least two, finite.
        lag: steps between the inputs of the within covariance (default ``window``: robust to
            observation noise); 0 or 1 for a ``FeatureLibrary``.
        window: frames per embedding input, stacked as ``NoetherWrapper(window=...)`` does.
        steps: Adam steps; None: until converged (above). Ignored by the closed form.
        lr: Adam's learning rate.
        batch: trajectories per step (a random subset of the training share each step); None:
            all of them.
        standardize: wrap the result in :class:`~noether_wrap.embeddings.Standardized`.
        seed: seeds the hold-out split and the batch sampling (None: torch's global generator).
        progress: a tqdm bar when tqdm is installed.
        max_steps: the cap of the convergence rule (``steps=None`` only).
        eval_every: steps between held-out evaluations (``steps=None`` only).
        patience: evaluations without improvement before stopping (``steps=None`` only).
        tol: the relative improvement that counts (``steps=None`` only): an evaluation improves
            on the best ``b`` when it is below ``b - tol * max(|b|, 1e-3)``.
        holdout: the share of trajectories held out (``steps=None`` only), in (0, 1).
        velocities: derivative labels, the time derivative at every state, shaped like
            ``trajectories`` (``window=1``, a trained ``g``). The objective then adds
            :func:`drift_loss`, ``g``'s drift along the labels: the precision tailoring needs
            (docs/learning-g.md), and ``fit.drifts`` reports it per output.
        drift_weight: the weight of :func:`drift_loss` in the objective (``velocities`` only).
            The drift is per observed step, the conservation ratio per trajectory, so the
            drift needs weight to count. Measured (experiments/precision.py, data seed 0): on
            the pendulum a weight of 10 gave the diagnostic a share of 0.35, 1 gave 0.09 and 100
            gave 0.28; on the spring 10 gave 0.73 and 1 gave 0.60.
        schedule: Adam's learning rate over the steps: ``"constant"``, or ``"cosine"`` (from
            ``lr`` down to 0 over an int ``steps``). A precise ``g`` needs the decay: at a
            constant rate Adam's last steps jitter ``g``'s level sets, and on the pendulum the
            diagnostic's share of a labelled fit swung between 0.37 and 0.66 with the data's
            last digits (docs/learning-g.md).

    Returns:
        A :class:`ConservedFit`; ``fit.steps`` says how many steps the rule took.

    Raises:
        ValueError: for a non-finite state, a dtype mismatch between ``trajectories`` and
            ``embedding``, or a clearly negative fitted ratio (above).

    Example:
        >>> import torch
        >>> from noether_wrap import fit_conserved
        >>> from noether_wrap.embeddings import MLPEmbedding
        >>> t = torch.linspace(0, 6, 40)
        >>> trajs = torch.stack([torch.cos(t), torch.sin(t)], -1) * (torch.rand(16, 1, 1) + 0.5)
        >>> fit = fit_conserved(MLPEmbedding(2), trajs, steps=200, progress=False)
        >>> fit.ratios[0] < 0.05, fit.steps
        (True, 200)
        >>> fit = fit_conserved(MLPEmbedding(2), trajs, lr=1e-2, eval_every=10, patience=2,
        ...                    progress=False)
        >>> fit.ratios[0] < 0.05, fit.steps < 20_000, len(fit.held_out) == fit.steps // 10
        (True, True, True)
    """
    if not isinstance(embedding, nn.Module):
        raise TypeError(f"`embedding` (type: {type(embedding).__name__}) is not an nn.Module.")
    trajs = _as_list(trajectories)
    if len(trajs) < 2:
        raise ValueError(f"`trajectories` must hold at least 2 trajectories, got {len(trajs)}.")
    check_int("window", window)
    lag = _check_lag(lag, window)
    check_int("steps", steps, allow_none=True)
    check_int("batch", batch, minimum=2, allow_none=True)
    lr = check_positive_float("lr", lr)
    check_int("max_steps", max_steps)
    check_int("eval_every", eval_every)
    check_int("patience", patience)
    tol = check_positive_float("tol", tol)
    schedule = check_choice("schedule", schedule, ("constant", "cosine"))
    if schedule == "cosine" and steps is None:
        raise ValueError(
            '`schedule="cosine"` decays the learning rate over a fixed count: pass an int '
            "`steps` (the convergence rule, `steps=None`, keeps it constant)."
        )
    if not (isinstance(holdout, (int, float)) and 0 < holdout < 1):
        raise ValueError(f"`holdout` must be a share in (0, 1), got {holdout!r}.")
    short = min(t.shape[0] for t in trajs)
    if short < window + lag + 1:
        raise ValueError(
            f"`trajectories`: each needs at least window + lag + 1 = {window + lag + 1} states, "
            f"the shortest has {short}."
        )
    _check_finite(trajs)
    _check_dtype(embedding, trajs)
    vels: list[Tensor] | None = None
    if velocities is not None:
        if window != 1 or isinstance(embedding, FeatureLibrary):
            raise ValueError(
                "`velocities` need single-state inputs (window=1) and a trained g, got "
                f"window={window} and a {type(embedding).__name__}."
            )
        drift_weight = check_positive_float("drift_weight", drift_weight)
        vels = _as_list(velocities, "velocities")
        _labelled_states(trajs, vels)  # shape check, now
        _check_finite(vels, "velocities")
    start = time.perf_counter()
    losses: list[float] = []
    held_out: list[float] | None = None
    best_step = 0
    if isinstance(embedding, FeatureLibrary):
        if window != 1:
            raise ValueError(
                f"a FeatureLibrary reads single states: `window` must be 1, got {window}."
            )
        embedding.fit_conserved(trajs, lag=lag)
    else:
        if not any(p.requires_grad for p in embedding.parameters()):
            raise ValueError("`embedding` has no trainable parameter to fit.")
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        run = _Run(embedding, trajectories, trajs, lag, window, lr, batch, gen, vels, drift_weight)
        if steps is not None:
            if schedule == "cosine":
                run.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(run.optimizer, steps)
            run.train(_progress(range(steps), progress, "fit_conserved"))
            best_step = steps
        else:
            held_out, best_step = run.until_converged(
                max_steps, eval_every, patience, tol, holdout, progress
            )
        losses = run.losses
    ratios, basis = conserved_basis(embedding, trajs, lag=lag, window=window)
    _check_negative(float(ratios[0]), trajectories, trajs, lag, window)
    fitted: nn.Module = embedding
    if standardize:
        mix = basis if basis.shape[0] > 1 else None
        fitted = Standardized.fit(embedding, trajs, window=window, basis=mix)
    drifts = None
    if vels is not None:
        with torch.no_grad():
            sym = _whitened_drift(fitted, *_labelled_states(trajs, vels))[0]
        drifts = [float(d) for d in sym.diagonal()]
    seconds = time.perf_counter() - start
    return ConservedFit(
        fitted, [float(r) for r in ratios], losses, seconds, len(losses), best_step, held_out,
        drifts,
    )  # fmt: skip


class _Run:
    """Adam on the objective over a subset of the trajectories (all of them by default)."""

    def __init__(
        self,
        embedding: nn.Module,
        trajectories: Trajectories,
        trajs: list[Tensor],
        lag: int,
        window: int,
        lr: float,
        batch: int | None,
        gen: torch.Generator | None,
        velocities: list[Tensor] | None = None,
        drift_weight: float = 0.0,
    ) -> None:
        self.embedding, self.trajectories, self.trajs = embedding, trajectories, trajs
        self.lag, self.window, self.batch, self.gen = lag, window, batch, gen
        self.velocities, self.drift_weight = velocities, drift_weight
        params = [p for p in embedding.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.train_idx = list(range(len(trajs)))
        self.losses: list[float] = []
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def subset(self, idx: list[int]) -> Trajectories:
        """The trajectories at ``idx``; stacked when they came as one tensor."""
        if len(idx) == len(self.trajs) and isinstance(self.trajectories, Tensor):
            return self.trajectories
        chosen = [self.trajs[i] for i in idx]
        return torch.stack(chosen) if isinstance(self.trajectories, Tensor) else chosen

    def objective(self, idx: list[int]) -> Tensor:
        """The fit's objective on the trajectories at ``idx``: the conservation ratio, plus the
        drift along the derivative labels where they were given."""
        loss = conservation_loss(self.embedding, self.subset(idx), lag=self.lag, window=self.window)
        if self.velocities is not None:
            chosen = [self.trajs[i] for i in idx]
            drift = drift_loss(self.embedding, chosen, [self.velocities[i] for i in idx])
            loss = loss + self.drift_weight * drift
        return loss

    def train(self, ticks) -> None:  # type: ignore[no-untyped-def]
        """One Adam step per tick, on a batch of the training share."""
        idx = self.train_idx
        for _ in ticks:
            chosen = idx
            if self.batch is not None and self.batch < len(idx):
                pick = torch.randperm(len(idx), generator=self.gen)[: self.batch].tolist()
                chosen = [idx[i] for i in pick]
            loss = self.objective(chosen)
            self.optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.losses.append(float(loss.detach()))

    def until_converged(
        self,
        max_steps: int,
        eval_every: int,
        patience: int,
        tol: float,
        holdout: float,
        progress: bool,
    ) -> tuple[list[float], int]:
        """Train until the held-out objective stalls; restore the best. Returns the held-out
        objective at every evaluation and the step that was kept."""
        n = len(self.trajs)
        held_idx = self.train_idx
        if n >= 4:
            n_held = min(max(2, round(holdout * n)), n - 2)
            order = torch.randperm(n, generator=self.gen).tolist()
            held_idx, self.train_idx = sorted(order[:n_held]), sorted(order[n_held:])
        bar = _progress(range(max_steps), progress, "fit_conserved")
        ticks = iter(bar)
        history: list[float] = []
        best, best_step, since = float("inf"), 0, 0
        best_state: dict[str, Tensor] | None = None
        done = 0
        while done < max_steps and since < patience:
            block = min(eval_every, max_steps - done)
            self.train(next(ticks) for _ in range(block))
            done += block
            with torch.no_grad():
                value = float(self.objective(held_idx))
            history.append(value)
            if best_state is None or value < best:
                margin = tol * max(abs(best), _RATIO_FLOOR)
                significant = best_state is None or value < best - margin
                since = 0 if significant else since + 1
                best, best_step = value, done
                best_state = {k: v.detach().clone() for k, v in self.embedding.state_dict().items()}
            else:
                since += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(held_out=f"{value:.4g}")
        if hasattr(bar, "close"):
            bar.close()
        if best_state is not None:
            self.embedding.load_state_dict(best_state)
        return history, best_step


def _check_negative(
    ratio: float, trajectories: Trajectories, trajs: list[Tensor], lag: int, window: int
) -> None:
    """Refuse (lag >= window) or warn about (lag < window) a clearly negative fitted ratio."""
    inputs = min(t.shape[0] for t in trajs) - window + 1
    threshold = -(_NEGATIVE_MARGIN + 1.0 / inputs)
    if ratio >= threshold:
        return
    if isinstance(trajectories, Tensor):
        n, length = trajectories.shape[:2]
        given = (
            f"got shape {tuple(trajectories.shape)}, read as n={n} trajectories of T={length} "
            "states"
        )
    else:
        given = f"got {len(trajs)} trajectories of {inputs + window - 1} to "
        given += f"{max(t.shape[0] for t in trajs)} states"
    if lag < window:
        short = f"lag={lag} < window={window} lets neighbouring inputs share frames"
    else:
        short = f"motion that reverses within lag={lag} steps anti-correlates"
    message = (
        f"the fitted conservation ratio is {ratio:.3g}, clearly negative (below {threshold:.3g} "
        f"= -({_NEGATIVE_MARGIN} + 1/{inputs}), the floor for white noise): `embedding` learned "
        f"to anti-correlate at lag {lag}, which is no conserved quantity. Are the axes of "
        f"`trajectories` swapped? It must be (n, T, *state); {given}. Or is `lag` too short? "
        f"{short}: try a longer `lag`."
    )
    if lag < window:
        warnings.warn(message, stacklevel=3)
        return
    raise ValueError(message)


def _progress(iterable: range, show: bool, desc: str):  # type: ignore[no-untyped-def]
    if not show:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return iterable
    return tqdm(iterable, desc=desc, leave=False)
