"""Rollout: turn a one-step model or a vector field into a sequence predictor."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from noether_wrap._checks import check_choice, check_int

Method = Literal["step", "euler", "rk4"]
METHODS: tuple[str, ...] = ("step", "euler", "rk4")


class Rollout(nn.Module):
    """Roll a step model or a vector field out for ``horizon`` steps.

    With ``method="step"`` (default), ``step`` maps the state ``x_t`` to ``x_{t+1}``. With
    ``method="euler"`` or ``"rk4"``, ``step`` is a vector field ``x -> dx/dt`` integrated with a
    fixed step ``dt``. With ``context = c > 1`` the step model sees the last ``c`` states,
    ``(batch, c, *state)``, and returns the next one (video predictors that read two frames).

    Args:
        step: the one-step model or the vector field, ``(batch, *state) -> (batch, *state)``
            (``(batch, c, *state) -> (batch, *state)`` when ``context = c > 1``).
        horizon: ``T``, how many steps to predict.
        dt: the integration step; required for ``"euler"`` and ``"rk4"``, not allowed for
            ``"step"``.
        method: ``"step"``, ``"euler"`` or ``"rk4"``.
        context: how many past states the step model reads (``"step"`` only).

    Shapes:
        ``forward(x0)``: ``x0`` is ``(batch, *state)`` (or ``(batch, r, *state)``, ``r >= c``,
        when ``context = c > 1``); returns ``(batch, T, *state)``, time at dim 1, not including
        ``x0``.

    Example:
        >>> import torch
        >>> from noether_wrap import Rollout
        >>> field = torch.nn.Linear(2, 2)
        >>> Rollout(field, horizon=5, dt=0.1, method="rk4")(torch.randn(3, 2)).shape
        torch.Size([3, 5, 2])
    """

    def __init__(
        self,
        step: nn.Module,
        horizon: int,
        *,
        dt: float | None = None,
        method: Method = "step",
        context: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(step, nn.Module):
            raise TypeError(f"`step` (type: {type(step).__name__}) is not an nn.Module.")
        _check_horizon(horizon)
        check_choice("method", method, METHODS)
        if method == "step" and dt is not None:
            raise ValueError(
                f"`dt` (={dt}) applies to vector fields only; pass method='euler' or 'rk4', "
                "or drop `dt` for a step model."
            )
        if method != "step" and (not isinstance(dt, (int, float)) or not dt > 0):
            raise ValueError(f"`dt` must be a positive float for method={method!r}, got {dt!r}.")
        check_int("context", context)
        if context > 1 and method != "step":
            raise ValueError(f"`context` > 1 needs method='step', got method={method!r}.")
        self.step = step
        self.horizon = horizon
        self.dt = None if dt is None else float(dt)
        self.method: str = method
        self.context = context

    def extra_repr(self) -> str:
        extra = f", dt={self.dt}" if self.dt is not None else ""
        ctx = f", context={self.context}" if self.context > 1 else ""
        return f"horizon={self.horizon}, method={self.method!r}{extra}{ctx}"

    def advance(self, x: Tensor) -> Tensor:
        """One step of the rollout: ``(batch, *state) -> (batch, *state)`` (context 1)."""
        if self.method == "step":
            out: Tensor = self.step(x)
            return out
        assert self.dt is not None
        f, h = self.step, self.dt
        if self.method == "euler":
            stepped: Tensor = x + h * f(x)
            return stepped
        k1 = f(x)
        k2 = f(x + 0.5 * h * k1)
        k3 = f(x + 0.5 * h * k2)
        k4 = f(x + h * k3)
        rk4: Tensor = x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return rk4

    def forward(self, x0: Tensor, horizon: int | None = None) -> Tensor:
        """Predict ``horizon`` (default ``self.horizon``) steps after ``x0``.

        Args:
            x0: ``(batch, *state)``, or ``(batch, r, *state)`` with ``r >= context`` when
                ``context > 1``.
            horizon: overrides ``self.horizon`` for this call.

        Returns:
            ``(batch, horizon, *state)``.
        """
        steps = self.horizon if horizon is None else _check_horizon(horizon)
        if self.context == 1:
            x, out = x0, []
            for _ in range(steps):
                x = self.advance(x)
                out.append(x)
            return torch.stack(out, dim=1)
        if x0.dim() < 2 or x0.shape[1] < self.context:
            raise ValueError(
                f"`x0` must be (batch, r, *state) with r >= `context` (={self.context}); "
                f"got shape {tuple(x0.shape)}."
            )
        frames = list(x0[:, x0.shape[1] - self.context :].unbind(1))
        for _ in range(steps):
            frames.append(self.step(torch.stack(frames[-self.context :], dim=1)))
        return torch.stack(frames[self.context :], dim=1)


def _check_horizon(horizon: object) -> int:
    return check_int("horizon", horizon)
