"""conservation_loss, fit_conserved and Standardized: the learned embedding finds the invariant."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from noether_wrap import conservation_loss, drift_loss, fit_conserved
from noether_wrap.conservation import (
    conservation_ratios,
    denoise_with_labels,
    trajectory_codes,
)
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


def test_swapped_axes_give_a_clearly_negative_ratio_which_is_refused() -> None:
    """``(T, n, state)`` instead of ``(n, T, state)`` fits a g that anti-correlates at the lag;
    a clearly negative ratio is no fit, and the error says what shape was expected."""
    train, _ = _oscillator(32, seed=0)
    swapped = train.transpose(0, 1)  # (40, 32, 2): read as 40 trajectories of 32 states
    lib = FeatureLibrary(["q", "p", "q^2", "p^2", "q*p"], variables=["q", "p"])
    with pytest.raises(ValueError, match=r"negative.*\(n, T, \*state\).*\(40, 32, 2\)"):
        fit_conserved(lib, swapped, progress=False)
    assert fit_conserved(lib, train, progress=False).ratios[0] > -0.05  # the right axes fit


def test_a_lag_shorter_than_the_window_only_warns() -> None:
    """With lag < window the frame-sharing exploit is expected (and asked for): a warning."""

    class Difference(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, s: Tensor) -> Tensor:
            return self.w * (s[:, 0] - s[:, 1])

    torch.manual_seed(0)
    noise = torch.randn(16, 30, 1)
    with pytest.warns(UserWarning, match=r"negative.*lag=1 < window=2"):
        fit = fit_conserved(Difference(), noise, window=2, lag=1, steps=2, progress=False)
    assert fit.ratios[0] < -0.4
    honest = fit_conserved(Difference(), noise, window=2, steps=2, progress=False)
    assert abs(honest.ratios[0]) < 0.1


def test_non_finite_states_are_named_not_called_constant() -> None:
    train, _ = _oscillator(8, seed=0)
    train[3, 7, 0] = float("nan")
    train[3, 9, 1] = float("inf")
    train[5, 2, 0] = float("nan")
    pattern = r"`trajectories` holds 3 non-finite.*2 in trajectory 3 \(first at time step 7\)"
    with pytest.raises(ValueError, match=pattern + r".*1 in trajectory 5"):
        fit_conserved(MLPEmbedding(2), train, steps=5, progress=False)
    with pytest.raises(ValueError, match=pattern):
        fit_conserved(MLPEmbedding(2), list(train.unbind(0)), steps=5, progress=False)
    with pytest.raises(ValueError, match=pattern):
        conservation_loss(MLPEmbedding(2), train)  # the regulariser says so too


def test_a_dtype_mismatch_says_both_dtypes_and_the_fix() -> None:
    train = _oscillator(8, seed=0)[0].double()
    fix = r"torch\.float64.*torch\.float32.*trajectories\.float\(\).*embedding\.double\(\)"
    with pytest.raises(ValueError, match=fix):
        fit_conserved(MLPEmbedding(2), train, steps=5, progress=False)
    with pytest.raises(ValueError, match=fix):
        conservation_loss(MLPEmbedding(2), train)
    fit = fit_conserved(MLPEmbedding(2).double(), train, steps=5, progress=False)
    assert len(fit.ratios) == 1
    lib = FeatureLibrary(["q^2", "p^2"], variables=["q", "p"], trainable=True)
    assert fit_conserved(lib, train, progress=False).ratios[0] < 0.05  # casts by design


def test_default_steps_stop_on_convergence_and_keep_the_best_held_out_state() -> None:
    torch.manual_seed(0)
    train, _ = _oscillator(16, seed=0)
    g = MLPEmbedding(2, hidden=16)
    fit = fit_conserved(
        g, train, lr=3e-3, eval_every=25, patience=3, standardize=False, progress=False
    )
    assert fit.held_out is not None and 0 < fit.steps < 20_000
    assert fit.steps == len(fit.losses) == 25 * len(fit.held_out)
    best = min(range(len(fit.held_out)), key=fit.held_out.__getitem__)
    assert fit.best_step == 25 * (best + 1) and fit.ratios[0] < 0.05
    # the held-out share: the first max(2, round(0.2 n)) of randperm(n) under `seed`
    held = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:3].sort().values
    with torch.no_grad():
        restored = float(conservation_loss(fit.embedding, train[held]))
    assert restored == pytest.approx(fit.held_out[best], rel=1e-5, abs=1e-7)
    g2 = MLPEmbedding(2, hidden=16)
    capped = fit_conserved(g2, train, lr=3e-3, eval_every=25, max_steps=60, progress=False)
    assert capped.steps == 60 and capped.held_out is not None and len(capped.held_out) == 3
    embedding, ratios, losses, seconds, *_ = capped  # the first four fields keep their order
    assert losses == capped.losses and seconds > 0
    fixed = fit_conserved(MLPEmbedding(2), train, steps=7, progress=False)
    assert (fixed.steps, fixed.best_step, fixed.held_out) == (7, 7, None)
    for name, value in (("eval_every", 0), ("patience", -1), ("max_steps", 0), ("tol", 0.0)):
        with pytest.raises(ValueError, match=f"`{name}`"):
            fit_conserved(MLPEmbedding(2), train, progress=False, **{name: value})
    with pytest.raises(ValueError, match="`holdout`"):
        fit_conserved(MLPEmbedding(2), train, holdout=1.0, progress=False)


def test_the_closed_form_and_the_objective_share_one_scatter() -> None:
    """FeatureLibrary.fit_conserved and conservation_ratios build S and W the same way: the
    library's ratio is the objective of the fitted library."""
    train, _ = _pendulum(12, seed=0)
    trajs = train.double()
    lib = FeatureLibrary(["q", "p", "q^2", "p^2", "cos(q)"], variables=["q", "p"])
    lib.fit_conserved(trajs, lag=1)
    objective = float(conservation_ratios(lib, trajs, lag=1)[0])
    assert lib.conservation_ratio == pytest.approx(objective, rel=1e-4, abs=1e-6)


def _pendulum_field(x: Tensor) -> Tensor:
    return torch.stack([2 * x[..., 1], -3 * torch.sin(x[..., 0])], -1)


def test_drift_loss_is_zero_for_an_invariant_and_scale_free() -> None:
    noisy, clean = _pendulum(6, seed=0, noise=0.0)
    labels = _pendulum_field(clean)
    energy = lambda s: 3 * (1 - torch.cos(s[:, 0])) + s[:, 1] ** 2  # noqa: E731
    assert float(drift_loss(energy, clean, labels)) < 1e-4  # a central difference over a step
    q = lambda s: s[:, :1]  # noqa: E731
    both = lambda s: torch.stack([s[:, 0], energy(s)], -1)  # noqa: E731
    mixed = lambda s: both(s) @ torch.tensor([[2.0, 1.0], [0.5, -3.0]])  # noqa: E731
    assert float(drift_loss(q, clean, labels)) > 0.01  # q is not conserved
    # invariant to an invertible linear map of g's outputs
    torch.testing.assert_close(drift_loss(mixed, clean, labels), drift_loss(both, clean, labels))


def test_derivative_labels_make_the_fitted_g_drift_less() -> None:
    """On noisy pendulum trajectories, labels (the field at the clean states) lower the fitted
    g's drift along held-out labelled states, and the fit reports each output's drift."""
    noisy, clean = _pendulum(24, seed=0, noise=0.2)
    labels = _pendulum_field(clean)
    _, test = _pendulum(12, seed=1, noise=0.0)
    drifts = []
    for velocities in (None, labels):
        torch.manual_seed(0)
        fit = fit_conserved(MLPEmbedding(2, hidden=32), noisy, steps=300, lr=3e-3,
                            progress=False, velocities=velocities)  # fmt: skip
        drifts.append(float(drift_loss(fit.embedding, test, _pendulum_field(test))))
        assert (fit.drifts is None) == (velocities is None)
    assert drifts[1] < 0.5 * drifts[0]
    # reported at the noisy training states, where the labels (from clean states) disagree more
    assert fit.drifts is not None and len(fit.drifts) == 1 and 0 <= fit.drifts[0] < 0.1


def test_velocities_are_checked_at_the_boundary() -> None:
    noisy, clean = _pendulum(4, seed=0)
    labels = _pendulum_field(clean)
    with pytest.raises(ValueError, match="`velocities` must have the shape"):
        fit_conserved(MLPEmbedding(2), noisy, steps=1, progress=False, velocities=labels[:, 1:])
    with pytest.raises(ValueError, match="window=1"):
        fit_conserved(MLPEmbedding(4), noisy, window=2, steps=1, progress=False,
                      velocities=labels)  # fmt: skip
    bad = labels.clone()
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="`velocities` holds 1 non-finite"):
        fit_conserved(MLPEmbedding(2), noisy, steps=1, progress=False, velocities=bad)
    with pytest.raises(ValueError, match="drift_weight"):
        fit_conserved(MLPEmbedding(2), noisy, steps=1, progress=False, velocities=labels,
                      drift_weight=-1.0)  # fmt: skip


def test_denoising_with_labels_recovers_the_clean_states() -> None:
    """Integrated clean labels place each noisy trajectory back on its clean one, up to one
    offset of about noise / sqrt(T); the time unit of the labels does not matter; a list comes
    back as a list; on noise-free data the integration error is fourth order in the step."""
    noisy, clean = _pendulum(8, seed=0, noise=0.1)
    labels = _pendulum_field(clean)
    denoised = denoise_with_labels(noisy, labels)
    assert isinstance(denoised, Tensor) and denoised.shape == noisy.shape
    rms = lambda a: float((a - clean).pow(2).mean().sqrt())  # noqa: E731
    assert rms(denoised) < 0.3 * rms(noisy)
    torch.testing.assert_close(denoise_with_labels(noisy, 7.0 * labels), denoised)
    as_list = denoise_with_labels(list(noisy), list(labels))
    assert isinstance(as_list, list)
    torch.testing.assert_close(torch.stack(as_list), denoised)
    for n, tol in ((45, 1e-4), (89, 1e-5)):  # fourth order overall: an exact circle, in float64
        t = torch.linspace(0, 3, n, dtype=torch.float64)[:, None]
        circle = torch.cat([torch.cos(2.5 * t), -2.5 * torch.sin(2.5 * t)], -1)[None]
        rates = torch.cat([-2.5 * torch.sin(2.5 * t), -6.25 * torch.cos(2.5 * t)], -1)[None]
        assert float((denoise_with_labels(circle, rates) - circle).abs().max()) < tol
    offsets = (denoised - clean).std(dim=1)  # one constant per trajectory: no spread in time
    assert float(offsets.max()) < 0.02


def test_denoising_with_labels_checks_its_inputs() -> None:
    noisy, clean = _pendulum(3, seed=0)
    labels = _pendulum_field(clean)
    with pytest.raises(ValueError, match="`velocities` must have the shape"):
        denoise_with_labels(noisy, labels[:, 1:])
    with pytest.raises(ValueError, match="at least 2 states"):
        denoise_with_labels(noisy[:, :1], labels[:, :1])
    with pytest.raises(ValueError, match="do not point along"):
        denoise_with_labels(noisy, -labels)
    bad = labels.clone()
    bad[0, 2, 1] = float("inf")
    with pytest.raises(ValueError, match="`velocities` holds 1 non-finite"):
        denoise_with_labels(noisy, bad)


def test_cosine_schedule_is_adam_with_cosine_annealing() -> None:
    """``schedule="cosine"``: the fit is Adam under ``CosineAnnealingLR`` over the steps on the
    objective (conservation plus weighted drift), written here plainly; a fixed count only."""
    noisy, clean = _pendulum(6, seed=0)
    labels = _pendulum_field(clean)
    torch.manual_seed(0)
    fitted = MLPEmbedding(2, hidden=16)
    torch.manual_seed(0)
    plain = MLPEmbedding(2, hidden=16)
    fit_conserved(fitted, noisy, steps=5, lr=1e-2, schedule="cosine", velocities=labels,
                  drift_weight=3.0, standardize=False, progress=False)  # fmt: skip
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5)
    for _ in range(5):
        loss = conservation_loss(plain, noisy) + 3.0 * drift_loss(plain, noisy, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    for a, b in zip(fitted.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="int `steps`"):
        fit_conserved(MLPEmbedding(2), noisy, schedule="cosine", progress=False)
    with pytest.raises(ValueError, match="`schedule` must be one of"):
        fit_conserved(MLPEmbedding(2), noisy, steps=1, schedule="linear", progress=False)


def test_two_outputs_recover_two_independent_invariants() -> None:
    """``out_features=2`` on a system with two invariants: each energy is recovered (linear
    R² ≥ 0.9 from the two outputs on held-out states), and both outputs are nearly conserved."""
    from noether_experiments.invariants import oscillators, r_squared

    train, _ = oscillators(25, seed=0, noise=0.05)
    test, energies = oscillators(20, seed=1, noise=0.0)
    torch.manual_seed(0)
    fit = fit_conserved(MLPEmbedding(4, out_features=2, hidden=64), train, steps=1500, lr=3e-3,
                        progress=False)  # fmt: skip
    with torch.no_grad():
        codes = fit.embedding(test.reshape(-1, 4)).double()
    for e in energies.reshape(-1, 2).double().T:
        assert r_squared(codes, e) >= 0.9
    assert len(fit.ratios) == 2 and max(fit.ratios) < 0.02
