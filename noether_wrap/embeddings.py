"""Ready embeddings ``g``: an MLP for state vectors, a conv net for frames, and a feature library
whose conserved combination can be fitted in closed form."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from noether_wrap._checks import check_int
from noether_wrap._scatter import scatter, whiten
from noether_wrap.loss import stack_windows

__all__ = ["ConvEmbedding", "FeatureLibrary", "MLPEmbedding", "Standardized"]

#: Ridge of the closed form, relative to the mean variance of the standardised features (about
#: 1): in float64 it only has to keep nearly collinear features (``q``, ``sin(q)``) factorable,
#: and a larger one would bias the fitted coefficients (the pendulum's ``-3 cos(q)`` is pinned to
#: 1e-3). The gradient path (:mod:`noether_wrap.conservation`) keeps its own, larger one.
_LIBRARY_RIDGE = 1e-9


class MLPEmbedding(nn.Module):
    """An MLP ``g``: flattens each (window of) state(s) and maps it to ``out_features`` numbers.

    Args:
        in_features: the flattened size of one embedding input (``window * prod(state)``).
        out_features: ``m``, the embedding's output size.
        hidden: width of the hidden layers.
        depth: number of hidden layers (>= 1).
        activation: the nonlinearity class, instantiated once per hidden layer.

    Shapes:
        ``(N, *state)`` with ``prod(state) == in_features`` -> ``(N, out_features)``.

    Example:
        >>> import torch
        >>> from noether_wrap.embeddings import MLPEmbedding
        >>> MLPEmbedding(2, out_features=3)(torch.randn(5, 2)).shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        *,
        hidden: int = 64,
        depth: int = 2,
        activation: type[nn.Module] = nn.Tanh,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("hidden", hidden),
            ("depth", depth),
        ):
            check_int(name, value)
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        self.in_features = in_features
        self.net = nn.Sequential(*layers)

    def forward(self, states: Tensor) -> Tensor:
        """``(N, *state) -> (N, out_features)``."""
        flat = states.reshape(states.shape[0], -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"MLPEmbedding: `states` must have {self.in_features} features per input, got "
                f"shape {tuple(states.shape)} ({flat.shape[1]} features)."
            )
        out: Tensor = self.net(flat)
        return out


class ConvEmbedding(nn.Module):
    """The paper's conv embedding for video: two 3x3 conv layers over ``window`` stacked frames,
    a global average pool and a linear head.

    Args:
        in_channels: channels of ONE frame (1 for grayscale).
        window: frames stacked on the channel axis per input (the paper used 2).
        out_features: ``m``.
        hidden: channels of the conv layers.
        activation: the nonlinearity class.

    Shapes:
        ``(N, window * in_channels, H, W) -> (N, out_features)``.

    Example:
        >>> import torch
        >>> from noether_wrap.embeddings import ConvEmbedding
        >>> ConvEmbedding(1, window=2, out_features=4)(torch.rand(3, 2, 32, 32)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_channels: int,
        *,
        window: int = 2,
        out_features: int = 8,
        hidden: int = 32,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("window", window),
            ("out_features", out_features),
            ("hidden", hidden),
        ):
            check_int(name, value)
        self.in_channels = window * in_channels
        self.net = nn.Sequential(
            nn.Conv2d(self.in_channels, hidden, 3, padding=1),
            activation(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            activation(),
        )
        self.head = nn.Linear(hidden, out_features)

    def forward(self, frames: Tensor) -> Tensor:
        """``(N, window * in_channels, H, W) -> (N, out_features)``."""
        if frames.dim() != 4 or frames.shape[1] != self.in_channels:
            raise ValueError(
                f"ConvEmbedding: `frames` must be (N, {self.in_channels}, H, W) (window * "
                f"in_channels channels), got shape {tuple(frames.shape)}."
            )
        pooled = self.net(frames).mean(dim=(2, 3))
        out: Tensor = self.head(pooled)
        return out


_VAR = r"([A-Za-z_]\w*)"
_TERM_PATTERNS: tuple[tuple[re.Pattern[str], Callable[..., Callable[[Tensor], Tensor]]], ...] = (
    (re.compile(rf"^{_VAR}$"), lambda i: lambda x: x[:, i]),
    (re.compile(rf"^{_VAR}\^(\d+)$"), lambda i, n: lambda x: x[:, i] ** n),
    (re.compile(rf"^cos\({_VAR}\)$"), lambda i: lambda x: torch.cos(x[:, i])),
    (re.compile(rf"^sin\({_VAR}\)$"), lambda i: lambda x: torch.sin(x[:, i])),
    (re.compile(rf"^{_VAR}\*{_VAR}$"), lambda i, j: lambda x: x[:, i] * x[:, j]),
)


def _compile_term(term: str, variables: Sequence[str]) -> Callable[[Tensor], Tensor]:
    spec = term.replace(" ", "")
    for pattern, make in _TERM_PATTERNS:
        match = pattern.match(spec)
        if match is None:
            continue
        parts = match.groups()
        indices: list[int] = []
        for part in parts:
            if part.isdigit():
                indices.append(int(part))
            elif part in variables:
                indices.append(list(variables).index(part))
            else:
                raise ValueError(
                    f"`terms`: {term!r} uses {part!r}, which is not one of `variables` "
                    f"{list(variables)}."
                )
        return make(*indices)
    raise ValueError(
        f"`terms`: cannot read {term!r}; use 'x', 'x^2', 'cos(x)', 'sin(x)' or 'x*y' with x, y "
        f"in `variables` {list(variables)}."
    )


class FeatureLibrary(nn.Module):
    """``g(x) = sum_f w_f phi_f(x)``: a linear combination of named features of a state vector.

    The weights can be fitted in closed form by :meth:`fit_conserved` (the combination that
    varies least along trajectories relative to its total variance), printed as a formula, and
    used as a fixed (default) or trainable embedding.

    Args:
        terms: feature names over ``variables``: ``"q"``, ``"q^2"``, ``"cos(q)"``,
            ``"sin(q)"``, ``"q*p"``.
        variables: names of the state's coordinates, in order.
        weights: initial ``(F,)`` weights (default: zeros until fitted).
        trainable: make the weights a Parameter.

    Shapes:
        ``(N, len(variables)) -> (N,)``.

    Example:
        >>> import torch
        >>> from noether_wrap.embeddings import FeatureLibrary
        >>> lib = FeatureLibrary(["q", "p^2", "cos(q)"], variables=["q", "p"])
        >>> t = torch.linspace(0, 6, 200)
        >>> traj = torch.stack([torch.cos(t), torch.sin(t)], -1)   # conserves q^2 + p^2
        >>> lib2 = FeatureLibrary(["q^2", "p^2", "q"], variables=["q", "p"])
        >>> lib2.fit_conserved(traj[None]).formula(scale_to="p^2")
        'q^2 + p^2'
    """

    weights: Tensor

    def __init__(
        self,
        terms: Sequence[str],
        variables: Sequence[str],
        *,
        weights: Tensor | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(terms, str) or not terms:
            raise ValueError(f"`terms` must be a non-empty sequence of strings, got {terms!r}.")
        if isinstance(variables, str) or not variables:
            raise ValueError(
                f"`variables` must be a non-empty sequence of names, got {variables!r}."
            )
        self.terms = [str(t) for t in terms]
        self.variables = [str(v) for v in variables]
        self._features = [_compile_term(t, self.variables) for t in self.terms]
        w = torch.zeros(len(self.terms)) if weights is None else torch.as_tensor(weights).float()
        if w.shape != (len(self.terms),):
            raise ValueError(
                f"`weights` must have shape ({len(self.terms)},), got {tuple(w.shape)}."
            )
        if trainable:
            self.weights = nn.Parameter(w.clone())
        else:
            self.register_buffer("weights", w.clone())
        #: Within-trajectory variance over total variance of the fitted ``g`` (0 = conserved).
        self.conservation_ratio: float | None = None

    def features(self, states: Tensor) -> Tensor:
        """``(N, len(variables)) -> (N, F)``: every feature of every state."""
        if states.dim() != 2 or states.shape[1] != len(self.variables):
            raise ValueError(
                f"FeatureLibrary: `states` must have shape (N, {len(self.variables)}) "
                f"(variables {self.variables}), got {tuple(states.shape)}."
            )
        return torch.stack([f(states) for f in self._features], dim=-1)

    def forward(self, states: Tensor) -> Tensor:
        """``(N, len(variables)) -> (N,)``."""
        return self.features(states) @ self.weights.to(states.dtype)

    def fit_conserved(
        self, trajectories: Tensor | Sequence[Tensor], *, lag: int = 1
    ) -> FeatureLibrary:
        """Set the weights to the feature combination that is most nearly conserved.

        Minimises ``w' S_w w / w' S_t w`` (within-trajectory over total scatter of the features):
        the smallest generalised eigenvector. With ``lag = 1`` the within-trajectory scatter is
        built from products of centred features one step apart, so observation noise that is
        independent in time drops out; ``lag = 0`` uses the plain scatter.

        Args:
            trajectories: ``(n_traj, T, len(variables))``, or a sequence of ``(T_i, d)``.
            lag: 0 or 1.

        Returns:
            ``self``, with ``weights`` and ``conservation_ratio`` set.
        """
        if isinstance(lag, bool) or lag not in (0, 1):
            raise ValueError(f"`lag` must be 0 or 1, got {lag!r}.")
        trajs = (
            list(trajectories.unbind(0)) if isinstance(trajectories, Tensor) else list(trajectories)
        )
        if not trajs:
            raise ValueError("`trajectories` is empty.")
        with torch.no_grad():
            phis = [self.features(t.detach().double()) for t in trajs]
            for t, phi in zip(trajs, phis):
                if phi.shape[0] < 2 + lag:
                    raise ValueError(
                        f"`trajectories`: each needs at least {2 + lag} states, got shape "
                        f"{tuple(t.shape)}."
                    )
            allphi = torch.cat(phis)
            mean, std = allphi.mean(0), allphi.std(0).clamp_min(1e-12)
            total, within = scatter([(phi - mean) / std for phi in phis], lag)
            if not bool(torch.diagonal(total).sum() > 0):
                raise ValueError(
                    f"every feature of {self.terms} is constant on `trajectories`: nothing to fit."
                )
            sym, chol = whiten(total, within, _LIBRARY_RIDGE)
            values, vectors = torch.linalg.eigh(sym)
            wz = torch.linalg.solve_triangular(chol.T, vectors[:, :1], upper=True).squeeze(1)
            w = wz / std
            w = w / w.abs().max()
            self.weights.copy_(w.to(self.weights.dtype))
            self.conservation_ratio = float(values[0])
        return self

    def coefficients(self, *, scale_to: str | None = None) -> dict[str, float]:
        """The weights by term; scaled so that ``scale_to``'s weight is 1 (default: the
        largest weight in magnitude is +1)."""
        w = self.weights.detach().double()
        if scale_to is not None:
            if scale_to not in self.terms:
                raise ValueError(f"`scale_to` must be one of {self.terms}, got {scale_to!r}.")
            ref = float(w[self.terms.index(scale_to)])
        else:
            ref = float(w[w.abs().argmax()])
        if ref == 0.0:
            raise ValueError("cannot scale: the reference weight is 0 (fit the library first).")
        return {t: float(v) / ref for t, v in zip(self.terms, w)}

    def formula(self, *, scale_to: str | None = None, digits: int = 3, tol: float = 1e-2) -> str:
        """A readable formula, e.g. ``'p^2 - 2.93 cos(q)'``.

        Terms whose weight is below ``tol`` times the largest are left out.
        """
        coef = self.coefficients(scale_to=scale_to)
        biggest = max(abs(c) for c in coef.values())
        parts: list[str] = []
        for term, c in coef.items():
            if abs(c) < tol * biggest:
                continue
            sign = "-" if c < 0 else "+"
            mag = abs(c)
            text = (
                term if math.isclose(mag, 1.0, rel_tol=10**-digits) else f"{mag:.{digits}g} {term}"
            )
            parts.append(f"{sign} {text}")
        if not parts:
            return "0"
        head = parts[0][2:] if parts[0].startswith("+") else "-" + parts[0][2:]
        return " ".join([head, *parts[1:]])

    def extra_repr(self) -> str:
        if not bool(self.weights.detach().abs().sum() > 0):
            return f"terms={self.terms}, unfitted"
        return f"g = {self.formula()}"


class Standardized(nn.Module):
    """``((g(x) - mean) @ basis) / scale``: an embedding put on a unit scale.

    The Noether loss is quadratic in ``g``, so its gradient, and the step an ``inner_lr`` buys,
    scale with ``g``'s units. Standardised on the training trajectories, ``g`` has unit spread
    there whatever it is (a true energy, a fitted formula, a network), and an ``inner_lr`` means
    "a step per unit of g's spread" for every embedding. :func:`noether_wrap.fit_conserved`
    returns its result wrapped in this, with a ``basis`` that makes ``m > 1`` outputs
    uncorrelated on the fit data and sorts them from the most nearly conserved.

    Args:
        embedding: ``g``, ``(N, *state) -> (N, m)`` or ``(N,)``.
        mean, scale: shaped like one output of ``g`` (``(m,)``, or ``()`` for a scalar ``g``);
            kept as buffers, so they travel with ``state_dict``.
        basis: optional ``(m, m)`` mixing of the centred outputs (applied before ``scale``).

    Shapes:
        as ``embedding``.

    Example:
        >>> import torch
        >>> from noether_wrap.embeddings import Standardized
        >>> states = torch.randn(4, 10, 2)
        >>> g = Standardized.fit(lambda s: 100 * s.pow(2).sum(-1), states)
        >>> round(float(g(states.flatten(0, 1)).std()), 4)
        1.0
    """

    mean: Tensor
    scale: Tensor
    basis: Tensor | None

    def __init__(
        self,
        embedding: nn.Module | Callable[[Tensor], Tensor],
        mean: Tensor,
        scale: Tensor,
        *,
        basis: Tensor | None = None,
    ) -> None:
        super().__init__()
        if not callable(embedding):
            raise TypeError(f"`embedding` (type: {type(embedding).__name__}) is not callable.")
        if not bool((torch.as_tensor(scale) > 0).all()):
            raise ValueError(f"`scale` must be positive, got {scale!r}.")
        m = torch.as_tensor(mean).numel()
        if basis is not None and tuple(basis.shape) != (m, m):
            raise ValueError(f"`basis` must have shape ({m}, {m}), got {tuple(basis.shape)}.")
        self.embedding = embedding
        self.register_buffer("mean", torch.as_tensor(mean).detach().clone())
        self.register_buffer("scale", torch.as_tensor(scale).detach().clone())
        self.register_buffer("basis", None if basis is None else basis.detach().clone())

    @classmethod
    def fit(
        cls,
        embedding: nn.Module | Callable[[Tensor], Tensor],
        trajectories: Tensor | Sequence[Tensor],
        *,
        window: int = 1,
        basis: Tensor | None = None,
    ) -> Standardized:
        """Standardise ``embedding`` on every state (window) of ``trajectories``.

        Args:
            trajectories: ``(n, T, *state)`` or a sequence of ``(T_i, *state)``.
            window: frames per embedding input.
            basis: optional ``(m, m)`` mixing of the centred outputs; the scale is measured
                after it.
        """
        trajs = (
            [trajectories]
            if isinstance(trajectories, Tensor)
            else [t.unsqueeze(0) for t in trajectories]
        )
        with torch.no_grad():
            codes = torch.cat(
                [embedding(stack_windows(t, window).flatten(0, 1)) for t in trajs]
            )  # (N,) or (N, m)
        mean = codes.mean(0)
        centred = codes - mean
        if basis is not None:
            centred = centred @ basis.to(centred.dtype)
        scale = centred.std(0)
        if not bool((scale > 0).all()):
            raise ValueError("`embedding` is constant on `trajectories`: it has no spread.")
        return cls(embedding, mean, scale, basis=basis)

    def forward(self, states: Tensor) -> Tensor:
        """``(N, *state) -> (N, m)`` or ``(N,)``, as the wrapped embedding."""
        out: Tensor = self.embedding(states)
        out = out - self.mean.to(out.dtype)
        if self.basis is not None:
            out = out @ self.basis.to(out.dtype)
        return out / self.scale.to(out.dtype)
