"""tune_inner_lr and tune pick how to tailor on held-out data, with "off" always a candidate;
tailoring_parameters is what meta-trains g."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from noether_wrap import (
    NoetherWrapper,
    Rollout,
    TailoringDoesNotHelp,
    TuneConfig,
    TuningWarning,
    tune,
    tune_cv,
    tune_inner_lr,
)
from noether_wrap.embeddings import MLPEmbedding
from noether_wrap.tuning import choose


class _Shift(nn.Module):
    """``x -> x + b`` with ``b = 1``: one step of size lr on ``L = b^2`` (g = x, horizon 1)
    moves ``b`` to ``b (1 - 2 lr)``, so the prediction ``x0 + b'`` hits ``x0`` at lr = 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b


def test_tune_inner_lr_picks_the_known_best_and_sets_it() -> None:
    net = NoetherWrapper(Rollout(_Shift(), 1), lambda s: s[:, 0], inner_lr=0.01)
    x = torch.randn(8, 1, dtype=torch.float64)
    target = x.unsqueeze(1)  # the conserved trajectory: x0 itself
    result = tune_inner_lr(net, x, target, candidates=[0.1, 0.25, 0.5, 1.0])
    assert result.best == 0.5
    assert math.isclose(net.inner_lr, 0.5)
    assert result.losses[0.5] < 1e-20
    for lr, value in result.losses.items():  # (1 - 2 lr)^2
        assert math.isclose(value, (1 - 2 * lr) ** 2, abs_tol=1e-12)
    assert math.isclose(result.untailored, 1.0)
    assert net.inner_steps == 1 and net.model.step.b.item() == 1.0  # nothing else changed
    assert result.stderr[0.5] < 1e-12  # every sequence's error is (1 - 2 lr)^2: no spread
    assert (result.inner_steps, result.step_rule, result.sequences) == (1, "fixed", 8)
    assert net.step_horizon == 1  # the horizon the step was chosen at travels with it


def test_tune_inner_lr_with_a_custom_forward_chunks_and_errors() -> None:
    net = NoetherWrapper(Rollout(_Shift(), 1), lambda s: s[:, 0], inner_lr=0.01)
    x = torch.randn(9, 1, dtype=torch.float64)
    with pytest.warns(TuningWarning, match="largest"):  # 0.4 is the grid's edge
        whole = tune_inner_lr(net, x, x, candidates=[0.1, 0.4], forward=lambda n, v: n(v)[:, 0])
    with pytest.warns(TuningWarning, match="largest"):
        pieces = tune_inner_lr(
            net, x, x, candidates=[0.1, 0.4], forward=lambda n, v: n(v)[:, 0], chunk=4
        )
    assert whole.best == pieces.best == 0.4
    for lr in (0.1, 0.4):
        assert math.isclose(whole.losses[lr], pieces.losses[lr], rel_tol=1e-9)
    with pytest.raises(ValueError, match="`candidates`"):
        tune_inner_lr(net, x, x, candidates=[0.1, -1.0])
    with pytest.raises(ValueError, match="`inputs` and `target`"):
        tune_inner_lr(net, x, x[:3])
    assert math.isclose(net.inner_lr, 0.4)  # a failed call leaves the last setting


def test_tailoring_parameters_are_the_embedding_and_the_step() -> None:
    g = MLPEmbedding(2)
    net = NoetherWrapper(Rollout(nn.Linear(2, 2), 3), g)
    mine = list(net.tailoring_parameters())
    assert len(mine) == len(list(g.parameters())) + 1
    assert any(p is net.log_inner_lr for p in mine)
    model_ids = {id(p) for p in net.model.parameters()}
    assert not any(id(p) in model_ids for p in mine)
    frozen = NoetherWrapper(Rollout(nn.Linear(2, 2), 3), lambda s: s.sum(-1), learn_inner_lr=False)
    assert list(frozen.tailoring_parameters()) == []


def test_meta_training_g_with_the_predictor_frozen_moves_only_g_and_the_step() -> None:
    torch.manual_seed(0)
    net = NoetherWrapper(Rollout(nn.Linear(2, 2), 3), MLPEmbedding(2), inner_lr=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.Adam(net.tailoring_parameters(), lr=1e-2)
    x, target = torch.randn(8, 2), torch.randn(8, 3, 2)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), target).backward()
        optimizer.step()
    for name, p in net.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (not name.startswith("model.")), name


# --- "off" is always a candidate: the one-standard-error rule ----------------------------------


def _shift_net(inner_lr: float = 0.01) -> NoetherWrapper:
    """One parameter, the prediction's offset: the rules' exact algebra, so no Polyak cap."""
    return NoetherWrapper(
        Rollout(_Shift(), 1), lambda s: s[:, 0], inner_lr=inner_lr, polyak_cap=None
    )


def _noisy_target(x: torch.Tensor, mean_in_se: float) -> torch.Tensor:
    """``x0 + 1 + e``: the untailored prediction ``x0 + 1`` misses by ``e``, whose mean is
    ``mean_in_se`` standard errors. A tiny step moves the prediction by ``-δ``, so the paired
    difference is ``2 δ e + δ²``: below zero on average when ``mean_in_se < 0``, but a clear win
    only beyond one standard error."""
    z = torch.randn(x.shape[0], 1, 1, dtype=x.dtype)
    e = z - z.mean()
    e = e + mean_in_se * e.std() / math.sqrt(x.shape[0])
    return x.unsqueeze(1) + 1 + e


def test_tuning_keeps_off_when_the_gain_is_within_noise() -> None:
    net = _shift_net()
    x = torch.randn(32, 1, dtype=torch.float64)
    target = _noisy_target(x, mean_in_se=-0.5)
    with pytest.warns(TailoringDoesNotHelp, match="did not clearly beat"):
        result = tune_inner_lr(net, x, target, candidates=[1e-3])
    assert result.losses[1e-3] < result.untailored  # lower on average, but within one SE
    assert result.untailored - result.losses[1e-3] < result.stderr[1e-3]
    assert result.best is None and net.inner_steps == 0
    assert math.isclose(net.inner_lr, 0.01)  # the step is left as it was


def test_tuning_picks_a_candidate_that_clearly_wins() -> None:
    net = _shift_net()
    x = torch.randn(32, 1, dtype=torch.float64)
    target = _noisy_target(x, mean_in_se=-4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningWarning)  # no edge, no "off" warning
        result = tune_inner_lr(net, x, target, candidates=[0.03, 0.25, 1.0])
    assert result.best == 0.25
    assert result.untailored - result.losses[result.best] > result.stderr[result.best]
    assert net.inner_steps == 1 and math.isclose(net.inner_lr, result.best)


def test_tuning_warns_when_the_winner_is_at_the_edge_of_the_grid() -> None:
    x = torch.randn(8, 1, dtype=torch.float64)
    target = x.unsqueeze(1)
    net = _shift_net()
    with pytest.warns(TuningWarning, match="largest 'fixed' candidate") as caught:
        result = tune_inner_lr(net, x, target, candidates=[0.1, 0.25])
    assert result.best == 0.25 and math.isclose(net.inner_lr, 0.25)
    assert not any(isinstance(w.message, TailoringDoesNotHelp) for w in caught)
    with pytest.warns(TuningWarning, match="smallest"):
        assert tune_inner_lr(net, x, target, candidates=[0.5, 0.9]).best == 0.5


def test_when_every_candidate_loses_the_wrapper_becomes_exactly_the_model() -> None:
    net = _shift_net()
    x = torch.randn(8, 1, dtype=torch.float64)
    target = x.unsqueeze(1) + 1  # the untailored prediction is already perfect
    with pytest.warns(TailoringDoesNotHelp, match="lost to no tailoring") as caught:
        result = tune_inner_lr(net, x, target, candidates=[0.1, 0.25])
    message = str(caught[0].message)
    assert "inner_steps=0" in message and "k=1 fixed 0.25" in message  # the numbers, as a table
    assert result.best is None and result.untailored == 0.0
    assert net.inner_steps == 0 and math.isclose(net.inner_lr, 0.01)
    assert torch.equal(net(x), net.model(x))
    assert "<- chosen" in result.table().splitlines()[1]  # "off" is the chosen row


def test_a_non_finite_target_or_input_is_refused_before_anything_changes() -> None:
    net = _shift_net()
    x = torch.randn(8, 1, dtype=torch.float64)
    target = x.unsqueeze(1).clone()
    target[2, 0, 0] = math.nan
    target[5, 0, 0] = math.inf
    with pytest.raises(ValueError, match="`target` has 2 non-finite"):
        tune_inner_lr(net, x, target)
    bad = x.clone()
    bad[0] = math.nan
    with pytest.raises(ValueError, match="`inputs` has 1 non-finite"):
        tune(net, bad, x.unsqueeze(1))
    assert net.inner_steps == 1 and math.isclose(net.inner_lr, 0.01)


def test_a_target_shaped_unlike_the_prediction_is_refused() -> None:
    net = _shift_net()
    x = torch.randn(8, 1, dtype=torch.float64)
    for wrong in (
        torch.zeros(8, 2, 1, dtype=torch.float64),
        torch.zeros(8, 1, dtype=torch.float64),
    ):
        # (8, 1) would broadcast against (8, 1, 1) to (8, 8, 1) without complaint
        with pytest.raises(ValueError, match=r"shaped like the prediction.*\(8, 1, 1\)"):
            tune_inner_lr(net, x, wrong, candidates=[0.1])
    assert net.inner_steps == 1 and math.isclose(net.inner_lr, 0.01)
    with pytest.raises(ValueError, match="at least 2 sequences"):
        tune_inner_lr(net, x[:1], x[:1].unsqueeze(1))


def test_a_scalar_loss_is_scored_per_sequence_with_the_same_means() -> None:
    x = torch.randn(12, 1, dtype=torch.float64)
    target = _noisy_target(x, mean_in_se=-3.0)
    candidates = [1e-3, 1e-2, 0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TuningWarning)
        per_sequence = tune_inner_lr(_shift_net(), x, target, candidates=candidates)
        scalar = tune_inner_lr(_shift_net(), x, target, candidates=candidates, loss=F.mse_loss)
        chunked = tune_inner_lr(
            _shift_net(), x, target, candidates=candidates, loss=F.mse_loss, chunk=5
        )
    for other in (scalar, chunked):
        assert other.best == per_sequence.best
        assert math.isclose(other.untailored, per_sequence.untailored, rel_tol=1e-12)
        for c in candidates:
            assert math.isclose(other.losses[c], per_sequence.losses[c], rel_tol=1e-12)
            assert math.isclose(other.stderr[c], per_sequence.stderr[c], rel_tol=1e-9)
    with pytest.raises(ValueError, match="one value per sequence"):
        tune_inner_lr(_shift_net(), x, target, loss=lambda p, t: (p - t).pow(2))


def test_a_candidate_with_a_non_finite_loss_is_never_chosen() -> None:
    net = _shift_net()
    x = torch.randn(8, 1, dtype=torch.float64)

    def forward(n: NoetherWrapper, v: torch.Tensor) -> torch.Tensor:
        out = n(v)
        return out * math.nan if n.inner_lr > 0.9 else out

    with pytest.warns(TuningWarning, match=r"non-finite loss for k=1 fixed 1 \(8 of 8"):
        result = tune_inner_lr(net, x, x.unsqueeze(1), candidates=[0.25, 0.5, 1.0], forward=forward)
    assert math.isnan(result.losses[1.0]) and result.best == 0.5
    # the untailored model itself non-finite: nothing can be compared with it
    with pytest.raises(ValueError, match="untailored model"):
        tune_inner_lr(net, x, x.unsqueeze(1), forward=lambda n, v: n(v) * math.nan)
    assert net.inner_steps == 1 and math.isclose(net.inner_lr, 0.5)


def test_a_failure_mid_search_restores_the_settings() -> None:
    net = _shift_net()
    x = torch.randn(8, 1, dtype=torch.float64)

    def forward(n: NoetherWrapper, v: torch.Tensor) -> torch.Tensor:
        if n.inner_lr > 0.3:
            raise RuntimeError("boom")
        return n(v)

    with pytest.raises(RuntimeError, match="boom"):
        tune(net, x, x.unsqueeze(1), inner_steps=(1, 3), candidates=[0.1, 0.5], forward=forward)
    assert net.inner_steps == 1 and math.isclose(net.inner_lr, 0.01)


def test_tune_inner_lr_on_a_switched_off_wrapper_scores_one_step() -> None:
    net = _shift_net()
    net.inner_steps = 0
    x = torch.randn(8, 1, dtype=torch.float64)
    result = tune_inner_lr(net, x, x.unsqueeze(1), candidates=[0.25, 0.5, 0.75])
    assert result.best == 0.5 and result.inner_steps == 1 and net.inner_steps == 1


def test_tune_searches_k_and_the_step_and_prints_a_table() -> None:
    net = _shift_net()
    x = torch.randn(8, 1, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningWarning)
        result = tune(
            net, x, x.unsqueeze(1), inner_steps=(1, 2), candidates=[0.1, 0.25, 0.4, 1.0],
            guards=(None,),
        )  # fmt: skip
    assert len(result.losses) == 8
    for config, value in result.losses.items():  # b after k steps: (1 - 2 lr)^k
        assert math.isclose(value, (1 - 2 * config.step) ** (2 * config.inner_steps), abs_tol=1e-12)
    assert (result.best, result.inner_steps, result.step_rule) == (0.4, 2, "fixed")
    assert result.config == TuneConfig(2, "fixed", 0.4)  # b = 0.2^2 after two steps beats 0.2
    assert net.inner_steps == 2 and math.isclose(net.inner_lr, 0.4)
    table = result.table()
    assert len(table.splitlines()) == 2 + 8
    chosen = [line for line in table.splitlines() if "<- chosen" in line]
    assert len(chosen) == 1 and chosen[0].startswith("k=2 fixed 0.4 ")
    with pytest.raises(ValueError, match="`step_rules`"):
        tune(net, x, x.unsqueeze(1), step_rules=("adam",))
    with pytest.raises(ValueError, match="`inner_steps`"):
        tune(net, x, x.unsqueeze(1), inner_steps=(-1,))


# --- these need the wrapper's `step_rule` option ---------------------------------------------


def test_tune_compares_the_fixed_and_polyak_rules() -> None:
    """Polyak on ``L = b^2``: ``η = γ L / |∇L|^2 = γ / 4``, so ``b' = b (1 - γ / 2)``."""
    net = _shift_net()
    x = torch.randn(8, 1, dtype=torch.float64)
    result = tune(
        net,
        x,
        x.unsqueeze(1),
        step_rules=("fixed", "polyak"),
        candidates={"fixed": [0.1, 0.5, 1.0], "polyak": [0.25, 0.5, 1.0]},
    )
    for gamma in (0.25, 0.5, 1.0):
        value = result.losses[TuneConfig(1, "polyak", gamma)]
        assert math.isclose(value, (1 - gamma / 2) ** 2, rel_tol=1e-6)
    # every sequence moves by exactly its plain displacement (b: 1 -> 0): the guards 1.0 and
    # None tie, and the tightest guard that costs nothing is kept
    assert result.config == TuneConfig(1, "fixed", 0.5, 1.0)
    assert net.step_rule == "fixed" and math.isclose(net.inner_lr, 0.5) and net.guard == 1.0
    with pytest.warns(TuningWarning, match="largest 'polyak'"):
        polyak = tune(net, x, x.unsqueeze(1), step_rules=("polyak",))  # default γ grid
    # γ = 2 is the Gauss–Newton step: exact on this quadratic (b' = 0), whatever the guard
    assert polyak.config is not None and polyak.config[:3] == (1, "polyak", 2.0)
    assert net.step_rule == "polyak" and math.isclose(net.inner_lr, 2.0)


def test_tune_inner_lr_uses_the_wrappers_rule_and_its_default_grid() -> None:
    net = _shift_net()
    net.step_rule = "polyak"
    x = torch.randn(8, 1, dtype=torch.float64)
    with pytest.warns(TuningWarning, match="largest"):
        result = tune_inner_lr(net, x, x.unsqueeze(1))
    assert list(result.losses) == [0.125, 0.25, 0.5, 1.0, 2.0]
    assert result.step_rule == "polyak" and result.best == 2.0  # Gauss–Newton: exact here


# --- tune_cv: cross-validation over whole sequences, refits per fold ------------------------------


def _fitted_shift_builder(
    x: torch.Tensor, target: torch.Tensor, calls: list[torch.Tensor], bias: float = 0.0
):
    """A build that "fits" the shift on the training sequences (``b`` = their mean offset) and
    records which sequences it saw."""

    def build(train: torch.Tensor) -> NoetherWrapper:
        calls.append(train.clone())
        net = _shift_net(0.1)
        with torch.no_grad():
            net.model.step.b.fill_(float((target[train, 0] - x[train]).mean()) + bias)
        return net

    return build


def test_tune_cv_scores_every_sequence_by_a_wrapper_fitted_without_it() -> None:
    torch.manual_seed(0)
    x = torch.randn(12, 1, dtype=torch.float64)
    # the fit is biased (b near 1 where the truth has none), so conserving x pays on every fold
    target = x.unsqueeze(1) + 0.5 + 0.05 * torch.randn(12, 1, 1, dtype=torch.float64)
    calls: list[torch.Tensor] = []
    build = _fitted_shift_builder(x, target, calls, bias=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TuningWarning)
        net, result = tune_cv(build, x, target, folds=4, candidates=[0.03, 0.25], guards=[None])
    assert len(calls) == 5 and calls[-1].tolist() == list(range(12))  # 4 folds, then all
    held_out = []
    for train in calls[:-1]:
        val = sorted(set(range(12)) - set(train.tolist()))
        held_out += val
        # the pooled scores of these sequences are those of the wrapper fitted on `train`
        fold_net = build(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TuningWarning)
            fold = tune(fold_net, x[val], target[val], candidates=[0.03, 0.25], guards=[None])
        for config, losses in fold.per_sequence.items():
            torch.testing.assert_close(result.per_sequence[config][val], losses)
    assert sorted(held_out) == list(range(12))  # every sequence scored exactly once
    off = result.per_sequence[None]
    expected = choose({c: v for c, v in result.per_sequence.items() if c is not None}, off)
    assert result.config == expected
    assert expected is not None  # the clear win of this data
    assert net.inner_steps == expected.inner_steps and math.isclose(net.inner_lr, expected.step)
    torch.testing.assert_close(result.chosen_scores(), result.per_sequence[expected])


def test_tune_cv_says_off_and_refuses_bad_builds() -> None:
    torch.manual_seed(1)
    x = torch.randn(10, 1, dtype=torch.float64)
    target = _noisy_target(x, mean_in_se=0.0) * 0 + x.unsqueeze(1) + 1  # the model is exact
    calls: list[torch.Tensor] = []
    with pytest.warns(TailoringDoesNotHelp, match="noether_wrap.diagnose"):  # what to check next
        net, result = tune_cv(_fitted_shift_builder(x, target, calls), x, target, folds=2,
                              candidates=[0.1], guards=[None])  # fmt: skip
    assert result.best is None and net.inner_steps == 0
    with pytest.raises(TypeError, match="`build` must return a NoetherWrapper"):
        tune_cv(lambda train: nn.Linear(1, 1), x, target, folds=2)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="same number of sequences"):
        tune_cv(_fitted_shift_builder(x, target, calls), x, target[:5], folds=2)


def test_tune_cv_takes_explicit_splits_and_a_final_fit() -> None:
    torch.manual_seed(2)
    x = torch.randn(10, 1, dtype=torch.float64)
    target = x.unsqueeze(1) + 0.5 + 0.05 * torch.randn(10, 1, 1, dtype=torch.float64)
    calls: list[torch.Tensor] = []
    split = (torch.arange(6), torch.arange(6, 10))  # one split "in time": fit early, score late
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TuningWarning)
        net, result = tune_cv(
            _fitted_shift_builder(x, target, calls, bias=0.5), x, target, folds=[split],
            candidates=[0.25], guards=[None], final=torch.arange(6),
        )  # fmt: skip
    assert result.sequences == 4 and result.per_sequence[None].shape == (4,)
    assert [c.tolist() for c in calls] == [list(range(6)), list(range(6))]
    with pytest.raises(ValueError, match="both fitted on and validated"):
        tune_cv(_fitted_shift_builder(x, target, calls), x, target,
                folds=[(torch.arange(6), torch.arange(4, 10))])  # fmt: skip
