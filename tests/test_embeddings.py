from __future__ import annotations

import pytest
import torch

from noether_wrap.embeddings import ConvEmbedding, FeatureLibrary, MLPEmbedding

PENDULUM_TERMS = ["q", "p", "q^2", "p^2", "cos(q)", "sin(q)", "q*p"]


def pendulum_trajectories(
    n: int, steps: int = 45, noise: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """Ideal pendulum H = 3(1 - cos q) + p^2 by fine RK4, ``(n, steps, 2)``."""
    g = torch.Generator().manual_seed(seed)
    radius = 1.3 + torch.rand(n, generator=g, dtype=torch.float64)
    angle = 2 * torch.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], -1)

    def f(s: torch.Tensor) -> torch.Tensor:
        return torch.stack([2 * s[:, 1], -3 * torch.sin(s[:, 0])], -1)

    out, h, sub = [x], 3.0 / (steps - 1) / 20, 20
    for _ in range(steps - 1):
        for _ in range(sub):
            k1 = f(x)
            k2 = f(x + h / 2 * k1)
            k3 = f(x + h / 2 * k2)
            k4 = f(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(x)
    trajs = torch.stack(out, 1)
    return trajs + noise * torch.randn(trajs.shape, generator=g, dtype=torch.float64)


def test_mlp_and_conv_shapes_and_errors() -> None:
    assert MLPEmbedding(6, 3)(torch.randn(4, 2, 3)).shape == (4, 3)
    assert ConvEmbedding(1, window=2, out_features=5)(torch.rand(3, 2, 8, 8)).shape == (3, 5)
    with pytest.raises(ValueError, match="must have 6 features"):
        MLPEmbedding(6)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="ConvEmbedding: `frames`"):
        ConvEmbedding(1, window=2)(torch.rand(3, 1, 8, 8))
    with pytest.raises(ValueError, match="`hidden`"):
        MLPEmbedding(2, hidden=0)


def test_feature_library_finds_pendulum_energy_from_clean_data() -> None:
    lib = FeatureLibrary(PENDULUM_TERMS, variables=["q", "p"])
    lib.fit_conserved(pendulum_trajectories(25), lag=0)
    coef = lib.coefficients(scale_to="p^2")
    assert coef["cos(q)"] == pytest.approx(-3.0, rel=1e-3)
    assert lib.formula(scale_to="p^2") == "p^2 - 3 cos(q)"
    assert lib.conservation_ratio is not None and lib.conservation_ratio < 1e-6


def test_lag_one_scatter_resists_observation_noise() -> None:
    errors: dict[int, list[float]] = {0: [], 1: []}
    for seed in range(4):
        trajs = pendulum_trajectories(25, noise=0.1, seed=seed)
        for lag in (0, 1):
            lib = FeatureLibrary(PENDULUM_TERMS, variables=["q", "p"]).fit_conserved(trajs, lag=lag)
            errors[lag].append(abs(lib.coefficients(scale_to="p^2")["cos(q)"] + 3))
    assert sum(errors[1]) < 0.6 * sum(errors[0])
    assert max(errors[1]) < 0.4


def test_feature_library_as_embedding_trainable_or_fixed() -> None:
    fixed = FeatureLibrary(["q^2", "p^2"], variables=["q", "p"], weights=torch.tensor([1.0, 1.0]))
    x = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(fixed(x), torch.tensor([5.0]))
    assert list(fixed.parameters()) == []
    trainable = FeatureLibrary(["q^2"], variables=["q", "p"], trainable=True)
    assert len(list(trainable.parameters())) == 1
    assert "unfitted" in repr(trainable)


def test_feature_library_errors() -> None:
    with pytest.raises(ValueError, match="`terms`.*'r'"):
        FeatureLibrary(["r^2"], variables=["q", "p"])
    with pytest.raises(ValueError, match="`terms`: cannot read"):
        FeatureLibrary(["tan(q)"], variables=["q", "p"])
    with pytest.raises(ValueError, match="`weights`"):
        FeatureLibrary(["q"], variables=["q"], weights=torch.zeros(2))
    lib = FeatureLibrary(["q"], variables=["q", "p"])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        lib(torch.randn(3, 3))
    with pytest.raises(ValueError, match="`lag`"):
        lib.fit_conserved(torch.randn(2, 5, 2), lag=2)
    with pytest.raises(ValueError, match="`scale_to`"):
        lib.fit_conserved(torch.randn(2, 5, 2)).coefficients(scale_to="p")
