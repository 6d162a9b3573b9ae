"""conservation_loss, fit_conserved and Standardized: the learned embedding finds the invariant."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from noether_wrap import conservation_loss, fit_conserved
from noether_wrap.conservation import conservation_ratios, trajectory_codes
from noether_wrap.embeddings import ConvEmbedding, FeatureLibrary, MLPEmbedding, Standardized


def _abs_r(a: Tensor, b: Tensor) -> float:
    stacked = torch.stack([a.flatten().double(), b.flatten().double()])
    return float(torch.corrcoef(stacked)[0, 1].abs())


def _oscillator(n: int, seed: int, noise: float = 0.05) -> tuple[Tensor, Tensor]:
    """Harmonic oscillator trajectories ``(n, 40, 2)`` (noisy) and their energies ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    radius = 0.3 + torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    t = torch.linspace(0, 4, 40)
    angle = phase[:, None] + t[None]
    clean = torch.stack([radius[:, None] * angle.cos(), radius[:, None] * angle.sin()], -1)
    return clean + noise * torch.randn(clean.shape, generator=g), radius**2


def _pendulum(n: int, seed: int, noise: float = 0.1) -> tuple[Tensor, Tensor]:
    """Ideal pendulum (H = 3(1 - cos q) + p^2) trajectories ``(n, 45, 2)``, noisy, by RK4."""
    from noether_wrap import Rollout

    class Field(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.stack([2 * x[:, 1], -3 * torch.sin(x[:, 0])], -1)

    g = torch.Generator().manual_seed(seed)
    radius = 1.3 + torch.rand(n, generator=g, dtype=torch.float64)
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x0 = torch.stack([radius * angle.cos(), radius * angle.sin()], -1)
    clean = torch.cat([x0[:, None], Rollout(Field(), 44, dt=3 / 44, method="rk4")(x0)], 1)
    noisy = clean + noise * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return noisy.float(), clean.float()


def test_fit_conserved_finds_the_oscillator_energy() -> None:
    torch.manual_seed(0)
    train, _ = _oscillator(32, seed=0)
    test, energy = _oscillator(32, seed=1, noise=0.0)
    fit = fit_conserved(MLPEmbedding(2, hidden=32), train, steps=400, lr=3e-3, progress=False)
    with torch.no_grad():
        codes = fit.embedding(test.reshape(-1, 2)).reshape(32, 40)
    assert _abs_r(codes, energy[:, None].expand(32, 40)) > 0.99
    assert fit.ratios[0] < 0.05 and len(fit.losses) == 400 and fit.seconds > 0


def test_fit_conserved_finds_the_pendulum_energy_on_held_out_states() -> None:
    torch.manual_seed(0)
    train, _ = _pendulum(25, seed=0)
    _, clean = _pendulum(25, seed=1)

    def energy(x: Tensor) -> Tensor:
        return 3 * (1 - torch.cos(x[..., 0])) + x[..., 1] ** 2

    fit = fit_conserved(MLPEmbedding(2), train, steps=600, lr=3e-3, progress=False)
    with torch.no_grad():
        codes = fit.embedding(clean.reshape(-1, 2))
    assert _abs_r(codes, energy(clean.reshape(-1, 2))) > 0.99


def _clips(n: int, seed: int, frames: int = 8, size: int = 12) -> tuple[Tensor, Tensor]:
    """A blob circling smoothly with a per-clip width: ``(n, frames, 1, size, size)``."""
    g = torch.Generator().manual_seed(seed)
    width = 0.8 + 1.5 * torch.rand(n, generator=g)
    radius = 1.0 + 2.5 * torch.rand(n, 1, generator=g)
    angle = 2 * math.pi * torch.rand(n, 1, generator=g) + 0.3 * torch.arange(frames)
    cx = size / 2 + radius * angle.cos()
    cy = size / 2 + radius * angle.sin()
    grid = torch.arange(size, dtype=torch.float32)
    dist2 = (grid[None, None, :, None] - cy[..., None, None]) ** 2 + (
        grid[None, None, None, :] - cx[..., None, None]
    ) ** 2
    img = torch.exp(-dist2 / (2 * width[:, None, None, None] ** 2))
    return img.unsqueeze(2), width


def test_fit_conserved_on_a_conv_embedding_finds_a_per_clip_invariant() -> None:
    torch.manual_seed(0)
    clips, _ = _clips(48, seed=0)
    g = ConvEmbedding(1, window=2, out_features=1, hidden=8)
    fit = fit_conserved(g, clips, window=2, steps=150, lr=3e-3, batch=16, progress=False)
    test, test_width = _clips(16, seed=1)
    with torch.no_grad():
        codes = torch.stack(trajectory_codes(fit.embedding, test, window=2))[..., 0]
    assert _abs_r(codes, test_width[:, None].expand_as(codes)) > 0.9
    assert fit.ratios[0] < 0.1


def test_a_constant_never_wins_the_objective_is_scale_free() -> None:
    train = _oscillator(8, seed=0)[0].double()
    torch.manual_seed(0)
    g = MLPEmbedding(2).double()
    base = conservation_loss(g, train)
    shrunk = conservation_loss(lambda s: 1e-4 * g(s) + 7.0, train)
    torch.testing.assert_close(base, shrunk, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="`embedding` is constant"):
        conservation_loss(lambda s: torch.ones(s.shape[0]), train)


def test_two_outputs_are_decorrelated_and_sorted() -> None:
    """Two uncoupled oscillators conserve E1 and E2: m = 2 outputs come back uncorrelated on the
    fit data, both conserved, the most conserved first (not one quantity twice)."""
    torch.manual_seed(0)
    a, _ = _oscillator(48, seed=0, noise=0.02)
    b, _ = _oscillator(48, seed=5, noise=0.02)
    trajs = torch.cat([a, b], dim=-1)  # (48, 40, 4)
    fit = fit_conserved(MLPEmbedding(4, 2, hidden=32), trajs, steps=600, lr=3e-3, progress=False)
    assert max(fit.ratios) < 0.1 and fit.ratios[0] <= fit.ratios[1]
    with torch.no_grad():
        codes = fit.embedding(trajs.reshape(-1, 4))  # (48 * 40, 2)
    corr = torch.corrcoef(codes.T.double())
    assert float(corr[0, 1].abs()) < 1e-3
    torch.testing.assert_close(codes.std(0), torch.ones(2), atol=1e-3, rtol=0)
    with torch.no_grad():
        per_output = [
            float(conservation_loss(lambda s, j=j: fit.embedding(s)[:, j], trajs)) for j in (0, 1)
        ]
    torch.testing.assert_close(
        torch.tensor(per_output), torch.tensor(fit.ratios), atol=2e-3, rtol=0
    )


def test_conservation_loss_gradcheck() -> None:
    torch.manual_seed(0)
    train, _ = _oscillator(5, seed=0)
    g = MLPEmbedding(2, 2, hidden=4, depth=1).double()
    params = tuple(g.parameters())
    trajs = train.double()[:, :10]

    names = [n for n, _ in g.named_parameters()]

    def objective(*values: Tensor) -> Tensor:
        def swapped(s: Tensor) -> Tensor:
            out: Tensor = torch.func.functional_call(g, dict(zip(names, values)), (s,))
            return out

        return conservation_loss(swapped, trajs)  # type: ignore[arg-type]

    assert torch.autograd.gradcheck(objective, params)


def test_feature_library_is_fitted_in_closed_form() -> None:
    train, _ = _oscillator(16, seed=0, noise=0.0)
    lib = FeatureLibrary(["q^2", "p^2", "q"], variables=["q", "p"])
    fit = fit_conserved(lib, train, progress=False)
    assert fit.losses == []
    assert lib.formula(scale_to="p^2") == "q^2 + p^2"
    assert isinstance(fit.embedding, Standardized) and fit.ratios[0] < 1e-6


def test_standardized_has_unit_spread_on_the_fit_data() -> None:
    train, _ = _oscillator(8, seed=0)
    for g in (lambda s: 50 * s.pow(2).sum(-1), MLPEmbedding(2, out_features=3)):
        std = Standardized.fit(g, train)
        with torch.no_grad():
            out = std(train.reshape(-1, 2))
        torch.testing.assert_close(out.mean(0), torch.zeros_like(out.mean(0)), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.std(0), torch.ones_like(out.std(0)), atol=1e-5, rtol=0)
    state = Standardized.fit(MLPEmbedding(2), train).state_dict()
    assert {"mean", "scale"} <= set(state)


def test_ratios_are_sorted_and_loss_is_their_mean() -> None:
    train, _ = _oscillator(8, seed=0)
    torch.manual_seed(0)
    g = MLPEmbedding(2, 3)
    with torch.no_grad():
        ratios = conservation_ratios(g, train)
        loss = conservation_loss(g, train)
    assert torch.all(ratios[1:] >= ratios[:-1])
    torch.testing.assert_close(ratios.mean(), loss, rtol=1e-4, atol=1e-6)


def test_variable_length_trajectories_and_argument_errors() -> None:
    train, _ = _oscillator(6, seed=0)
    ragged = [train[i, : 20 + i] for i in range(6)]
    fit = fit_conserved(MLPEmbedding(2), ragged, steps=5, progress=False)
    assert len(fit.ratios) == 1
    with pytest.raises(ValueError, match="`trajectories`"):
        fit_conserved(MLPEmbedding(2), train[:1], steps=5, progress=False)
    with pytest.raises(ValueError, match="`lag`"):
        fit_conserved(MLPEmbedding(2), train, lag=-1, progress=False)
    with pytest.raises(ValueError, match="`steps`"):
        fit_conserved(MLPEmbedding(2), train, steps=0, progress=False)
    with pytest.raises(TypeError, match="`embedding`"):
        fit_conserved(lambda s: s, train, progress=False)  # type: ignore[arg-type]


def test_the_default_lag_is_the_window_so_frame_noise_cannot_be_exploited() -> None:
    """With window 2 and lag 1, consecutive inputs share a frame, and ``g(a, b) = h(a) - h(b)``
    earns a negative within covariance from the noise alone; the default lag (= window) gives
    it none."""
    torch.manual_seed(0)
    noise = torch.randn(16, 30, 1)  # pure observation noise: nothing is conserved

    def difference(s: Tensor) -> Tensor:
        return s[:, 0] - s[:, 1]

    exploited = float(conservation_loss(difference, noise, window=2, lag=1))
    honest = float(conservation_loss(difference, noise, window=2))
    assert exploited < -0.4 and abs(honest) < 0.1
