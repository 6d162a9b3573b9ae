"""diagnose: how much of g's Noether loss on a model's steps is the model's error."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from noether_wrap import diagnose, fit_conserved
from noether_wrap.diagnostics import SHARE_NO_HELP, SHARE_TO_HELP
from noether_wrap.embeddings import FeatureLibrary


def rotation(x: torch.Tensor) -> torch.Tensor:
    """``dq/dt = p, dp/dt = -q``: conserves ``q^2 + p^2``."""
    return torch.stack([x[:, 1], -x[:, 0]], -1)


def energy(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).sum(-1)


def _reference_share(g, model, states, velocities) -> float:  # type: ignore[no-untyped-def]
    """Plainly, with autograd: Δ = ∇g(x) · v for the model's and the data's velocities."""
    x = states.clone().requires_grad_()
    (grad,) = torch.autograd.grad(g(x).sum(), x)
    d_model = (grad * model(states)).sum(-1)
    d_data = (grad * velocities).sum(-1)
    error = (d_model - d_data).pow(2).mean()
    return float(error / (error + d_data.pow(2).mean()))


def test_an_exact_invariant_is_all_model_error() -> None:
    x = torch.randn(512, 2, dtype=torch.float64)
    spiral = lambda s: rotation(s) + 0.1 * s  # noqa: E731 - a model whose orbit grows
    d = diagnose(energy, spiral, x, rotation(x), dt=1e-3)
    assert d.verdict == "may help" and math.isclose(d.share, 1.0)
    assert d.drift_ratio < 1e-12 and d.states == 512


def test_a_perfect_model_leaves_nothing_to_correct_and_warns() -> None:
    x = torch.randn(256, 2, dtype=torch.float64)
    drifting = lambda s: s[:, 0]  # noqa: E731 - q is not conserved by a rotation
    with pytest.warns(UserWarning, match="cannot help"):
        d = diagnose(drifting, rotation, x, rotation(x), dt=1e-3)
    assert d.share == 0.0 and d.verdict == "cannot help"
    assert math.isclose(d.drift_ratio, 1.0)


@pytest.mark.parametrize("c", [0.05, 0.3, 1.0, 3.0])
def test_the_share_matches_a_plain_autograd_reference(c: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 2, dtype=torch.float64)
    g = lambda s: s.pow(2).sum(-1) + c * s[:, 0]  # noqa: E731 - drifts along the data by c·p
    model = lambda s: rotation(s) + 0.2 * s  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        d = diagnose(g, model, x, rotation(x), dt=1e-3)
    # central differences are exact for a quadratic g
    assert math.isclose(d.share, _reference_share(g, model, x, rotation(x)), rel_tol=1e-9)
    expected = "may help" if d.share >= SHARE_TO_HELP else "marginal"
    expected = "cannot help" if d.share < SHARE_NO_HELP else expected
    assert d.verdict == expected and str(d).startswith("g drifts along your data by")


def test_per_output_shares_tell_the_invariants_apart() -> None:
    x = torch.randn(300, 2, dtype=torch.float64)
    both = lambda s: torch.stack([energy(s), s[:, 0]], -1)  # noqa: E731 - one kept, one not
    model = lambda s: rotation(s) + 0.1 * s  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        d = diagnose(both, model, x, rotation(x), dt=1e-3)
    assert math.isclose(d.per_output[0], 1.0) and d.per_output[1] < 0.1


def test_a_step_model_and_a_fitted_g() -> None:
    gen = torch.Generator().manual_seed(0)
    angle = torch.rand(16, generator=gen) * 6.28
    t = 0.1 * torch.arange(30, dtype=torch.float64)
    radius = 0.5 + torch.rand(16, 1, generator=gen, dtype=torch.float64)
    paths = radius[..., None] * torch.stack(
        [(t + angle[:, None]).cos(), (t + angle[:, None]).sin()], -1
    )
    fit = fit_conserved(FeatureLibrary(["q^2", "p^2", "q*p"], ["q", "p"]), paths, progress=False)
    states, nxt = paths[:, :-1].reshape(-1, 2), paths[:, 1:].reshape(-1, 2)
    c, s = math.cos(0.1), math.sin(0.1)
    rotate = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)  # the exact step, transposed
    model = lambda x: 1.05 * x @ rotate  # noqa: E731 - a step that grows the orbit
    d = fit.diagnose(model, states, nxt, kind="step")
    assert d.verdict == "may help" and d.share > 0.99


def test_bad_inputs_name_the_argument() -> None:
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="`kind`"):
        diagnose(energy, rotation, x, x, kind="flow")
    with pytest.raises(ValueError, match="same shape"):
        diagnose(energy, rotation, x, x[:4])
    with pytest.raises(ValueError, match="`dt`"):
        diagnose(energy, rotation, x, x, dt=0.0)
    with pytest.raises(ValueError, match="`model` must map"):
        diagnose(energy, lambda s: s[:, :1], x, x)
