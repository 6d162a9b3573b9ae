"""Validation helpers for noisy observations: folds, denoised starts, windows, rank agreement."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from noether_wrap import Rollout
from noether_wrap.validation import estimate_starts, kfold, spearman, window_targets


@pytest.mark.parametrize("n", [7, 10, 11])
def test_kfold_partitions_deterministically(n: int) -> None:
    splits = kfold(n, folds=3, seed=4)
    vals = [set(val.tolist()) for _, val in splits]
    assert set().union(*vals) == set(range(n)) and sum(map(len, vals)) == n
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    for train, val in splits:
        assert set(train.tolist()) == set(range(n)) - set(val.tolist())
        assert train.dtype == val.dtype == torch.int64
        assert torch.equal(val, val.sort().values) and torch.equal(train, train.sort().values)
    again = kfold(n, folds=3, seed=4)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(splits, again))
    other = kfold(n, folds=3, seed=5)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(splits, other))
    state = torch.get_rng_state()
    kfold(n, folds=2)
    assert torch.equal(state, torch.get_rng_state())  # the global generator is not touched
    with pytest.raises(ValueError, match="`folds`"):
        kfold(n, folds=1)
    with pytest.raises(ValueError, match="`n`"):
        kfold(2, folds=3)


def _linear_rollout(horizon: int = 9) -> Rollout:
    """A damped rotation, ``x -> 0.97 R(0.3) x``, in float64."""
    step = nn.Linear(2, 2, bias=False).double()
    c, s = 0.97 * math.cos(0.3), 0.97 * math.sin(0.3)
    with torch.no_grad():
        step.weight.copy_(torch.tensor([[c, -s], [s, c]], dtype=torch.float64))
    return Rollout(step, horizon)


def _observe(model: Rollout, n: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randn(n, 2, dtype=torch.float64)
    with torch.no_grad():
        path = torch.cat([clean.unsqueeze(1), model(clean)], dim=1)  # (n, 10, 2)
    return clean, path + sigma * torch.randn(path.shape, dtype=torch.float64)


@pytest.mark.parametrize("method", ["lbfgs", "adam"])
def test_estimate_starts_removes_most_of_the_start_noise(method: str) -> None:
    model = _linear_rollout()
    model.train()
    clean, noisy = _observe(model, 512, sigma=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # the fit runs under enable_grad whatever the caller does
        starts = estimate_starts(
            model, noisy, frames=5, steps=200 if method == "adam" else 50, method=method
        )
    raw = float((noisy[:, 0] - clean).pow(2).mean())
    fitted = float((starts - clean).pow(2).mean())
    # least squares on 5 frames of an (almost) orthogonal map: the start's noise variance
    # shrinks to 1 / sum_t 0.97^(2t) ~ 0.22 of the raw one
    assert fitted < 0.35 * raw, (raw, fitted)
    assert starts.shape == (512, 2) and starts.dtype == torch.float64 and not starts.requires_grad
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name
    assert model.training and model.step.training  # the mode is restored


def test_estimate_starts_is_exact_on_clean_observations_and_checks_its_inputs() -> None:
    model = _linear_rollout()
    clean, observed = _observe(model, 16, sigma=0.0)
    noisy_start = observed.clone()
    noisy_start[:, 0] += 0.3  # only the start is off: the later frames pull it back
    with torch.inference_mode():
        starts = estimate_starts(model, noisy_start, frames=4)
    direct = estimate_starts(model, observed, frames=4)
    assert torch.allclose(direct, clean, atol=1e-10)
    assert float((starts - clean).norm(dim=-1).max()) < 0.3  # pulled towards the truth
    assert torch.equal(estimate_starts(model, noisy_start, frames=1), noisy_start[:, 0])
    custom = estimate_starts(model, observed, frames=3, forward=lambda m, x: m(x)[:, :2])
    assert torch.allclose(custom, clean, atol=1e-10)
    with pytest.raises(ValueError, match="`frames`"):
        estimate_starts(model, observed[:, :2], frames=3)
    with pytest.raises(ValueError, match="rollout has shape"):
        estimate_starts(model, observed, frames=3, forward=lambda m, x: m(x)[:, :1])
    bad = observed.clone()
    bad[0, 1, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        estimate_starts(model, bad)


def test_window_targets_shapes_and_contents() -> None:
    paths = torch.randn(3, 11, 2, 2)
    starts, targets = window_targets(paths, 3, 2)
    windows = (10 - 3) // 2 + 1
    assert starts.shape == (3 * windows, 2, 2) and targets.shape == (3 * windows, 3, 2, 2)
    for i in range(3 * windows):
        traj, s = divmod(i, windows)
        s *= 2
        assert torch.equal(starts[i], paths[traj, s])
        assert torch.equal(targets[i], paths[traj, s + 1 : s + 4])
    starts, targets = window_targets(paths, 5)  # stride = length: targets do not overlap
    assert starts.shape == (6, 2, 2) and torch.equal(starts[1], paths[0, 5])
    assert window_targets(paths, 10)[1].shape == (3, 10, 2, 2)
    with pytest.raises(ValueError, match="`length`"):
        window_targets(paths, 11)
    with pytest.raises(ValueError, match="`stride`"):
        window_targets(paths, 2, 0)


def test_spearman_matches_scipy_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    for m in (2, 5, 17, 200):
        a = torch.randint(0, 6, (m,), generator=generator).double()  # many ties
        b = a + torch.randint(-3, 4, (m,), generator=generator).double()
        expected = stats.spearmanr(a.numpy(), b.numpy()).statistic
        if math.isnan(expected):
            assert math.isnan(spearman(a, b))
        else:
            assert math.isclose(spearman(a, b), float(expected), abs_tol=1e-12)
    x = torch.randn(50, generator=generator)
    assert math.isclose(spearman(x, x.exp()), 1.0) and math.isclose(spearman(x, -x), -1.0)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-finite"):
        spearman([1.0, math.nan], [1.0, 2.0])


def test_cross_validate_scores_every_sequence_with_models_fitted_without_it() -> None:
    from noether_wrap.validation import cross_validate

    data = torch.randn(12, dtype=torch.float64)
    seen: list[set[int]] = []

    def fit(train: torch.Tensor) -> torch.Tensor:
        seen.append({int(i) for i in train})
        return data[train].mean()

    def score(mean: torch.Tensor, val: torch.Tensor) -> dict[str, torch.Tensor]:
        assert not {int(i) for i in val} & seen[-1]  # nothing held out was fitted on
        return {"mean": (data[val] - mean) ** 2, "zero": data[val] ** 2}

    scores = cross_validate(fit, score, 12, folds=4)
    assert len(seen) == 4 and set(scores) == {"mean", "zero"}
    for i in range(12):  # the leave-fold-out mean, written plainly
        fold = next(s for s in seen if i not in s)
        expected = (data[i] - data[sorted(fold)].mean()) ** 2
        assert float(scores["mean"][i]) == pytest.approx(float(expected))
    torch.testing.assert_close(scores["zero"], data**2)
    with pytest.raises(ValueError, match="one loss per held-out sequence"):
        cross_validate(fit, lambda m, v: {"bad": torch.zeros(1)}, 12, folds=4)


def test_choose_applies_tunes_rule_to_any_scores() -> None:
    from noether_wrap.tuning import choose

    off = torch.full((8,), 2.0)
    broad = off - 0.5 + 0.01 * torch.randn(8)  # helps every sequence
    carried = torch.cat([torch.zeros(1), torch.full((7,), 2.1)])  # one sequence carries the mean
    assert choose({"broad": broad, "carried": carried}, off) == "broad"
    assert choose({"carried": carried}, off) is None
    assert choose({"worse": off + 1}, off) is None
    tied = {("s", None): broad, ("s", 0.1): broad.clone(), ("s", 0.3): broad.clone()}
    assert choose(tied, off, tiebreak=lambda k: 9.0 if k[1] is None else k[1]) == ("s", 0.1)
    with pytest.raises(ValueError, match="paired"):
        choose({"short": off[:3]}, off)
