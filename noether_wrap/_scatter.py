"""The scatter matrices of the conservation objective, shared by ``conservation`` and
``embeddings`` (a leaf module: it imports neither, so there is no import cycle).

For codes ``c_i`` (``(L_i, m)``, one per trajectory):

- the total covariance ``S``: every row of every trajectory pooled, centred on the pooled mean,
  divided by the pooled count;
- the within-trajectory covariance ``W`` at ``lag``: each trajectory centred on its own mean,
  ``sym(d[:-lag]^T d[lag:])`` summed over trajectories and divided by the number of pairs
  (``lag = 0``: the plain within scatter).

The conserved combination is the smallest generalised eigenvector of ``(W, S)``;
:func:`whiten` solves that with a Cholesky factor of ``S`` plus a ridge *relative* to
``trace(S) / m``, so that the ridge means the same thing whatever the units of the codes. Each
caller keeps its own ridge (see there): the gradient path in float32 needs a larger one than the
closed form in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def scatter(codes: Sequence[Tensor], lag: int) -> tuple[Tensor, Tensor]:
    """Total covariance ``S`` and within-trajectory covariance ``W`` at ``lag``.

    Args:
        codes: one ``(L_i, m)`` tensor per trajectory, ``L_i > lag``.
        lag: steps between the two rows of a within pair; 0 for the plain within scatter.

    Returns:
        ``(S, W)``, both ``(m, m)`` and symmetric; differentiable in ``codes``.

    Example:
        >>> import torch
        >>> codes = [torch.tensor([[1.0], [1.0]]), torch.tensor([[3.0], [3.0]])]
        >>> total, within = scatter(codes, lag=1)   # constant along each: W = 0, S = 1
        >>> float(total), float(within)
        (1.0, 0.0)
    """
    allc = torch.cat(list(codes))
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


def whiten(total: Tensor, within: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """``(L^-1 W L^-T, L)`` with ``L L^T = S + ridge * trace(S) / m * I``.

    The eigenvalues of the first are the conservation ratios of the whitened outputs; with
    ``(values, vectors) = eigh(sym)``, ``L^-T vectors`` are the generalised eigenvectors of
    ``(W, S)``. The caller checks that ``trace(S) > 0`` first (a constant ``g``).

    Args:
        total: ``S``, ``(m, m)``.
        within: ``W``, ``(m, m)``.
        ridge: relative to the mean variance ``trace(S) / m`` (taken without gradient).

    Returns:
        The symmetric ``(m, m)`` whitened within covariance and the ``(m, m)`` lower Cholesky
        factor ``L``.
    """
    m = total.shape[0]
    scale = torch.diagonal(total).sum().detach() / m
    eye = torch.eye(m, dtype=total.dtype, device=total.device)
    chol = torch.linalg.cholesky(total + ridge * scale * eye)
    inner = torch.linalg.solve_triangular(chol, within, upper=False)
    sym = torch.linalg.solve_triangular(chol, inner.T, upper=False)
    return 0.5 * (sym + sym.T), chol
