"""The one inner loop: every path against the plain reference (both low-rank branches on purpose),
the Polyak step rule, options checked on assignment, and the defects found in review."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from noether_wrap import Affine, NoetherWrapper, Rollout
from noether_wrap._inner import lowrank
from noether_wrap.embeddings import MLPEmbedding

from conftest import copy_weights, gradcheck_weight_and_step, make_net
from reference import tailor_reference

PATHS = [(True, "lowrank"), (True, "vmap"), (False, "auto")]
# dim 2: every layer thin enough for the dense branch; dim 8 with 2 steps of horizon 2: k*T = 4
# uses < min(d_in, d_out) = 8, so both layers take the recorded low-rank branch.
BRANCHES = {"dense": {"dim": 2, "horizon": 4}, "recorded": {"dim": 8, "horizon": 2}}


def _branches_taken(net: NoetherWrapper, x: torch.Tensor) -> set[bool]:
    """Which low-rank branches (dense True / recorded False) a call of ``net`` takes."""
    seen: set[bool] = set()
    original = lowrank._Linear.stepped

    def spy(self: Any, update: Any, direction: Any, scale: torch.Tensor) -> Any:
        seen.add(bool(self.dense))
        return original(self, update, direction, scale)

    lowrank._Linear.stepped = spy  # type: ignore[method-assign]
    try:
        net(x)
    finally:
        lowrank._Linear.stepped = original  # type: ignore[method-assign]
    return seen


def _against_reference(
    per_sample: bool, path: str, branch: str, rule: str, lr: float, steps: int = 2,
    cap: float | None = None,
) -> tuple[NoetherWrapper, torch.Tensor, torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    shape = BRANCHES[branch]
    dim, horizon = shape["dim"], shape["horizon"]
    torch.manual_seed(3)
    net = make_net(
        dim=dim,
        hidden=16,
        horizon=horizon,
        inner_steps=steps,
        per_sample=per_sample,
        inner_lr=lr,
        per_sample_path=path,
        step_rule=rule,
        polyak_cap=cap,
    )
    x = torch.randn(4, dim, dtype=torch.float64)
    step, emb = net.model.step, net.embedding.net
    model_params = [step[0].weight, step[0].bias, step[2].weight, step[2].bias]
    emb_params = [emb[0].weight, emb[0].bias, emb[2].weight, emb[2].bias]
    ref = tailor_reference(
        model_params,
        emb_params,
        net.log_inner_lr,
        x,
        horizon=horizon,
        steps=steps,
        per_sample=per_sample,
        rule=rule,
        cap=cap,
    )
    return net, x, ref, [*model_params, *emb_params, net.log_inner_lr]


def _assert_matches(
    net: NoetherWrapper, x: torch.Tensor, ref: torch.Tensor, params: list[torch.Tensor]
) -> None:
    ours = net(x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    target = torch.randn_like(ref)
    g_ours = torch.autograd.grad(((ours - target) ** 2).mean(), params, allow_unused=True)
    g_ref = torch.autograd.grad(((ref - target) ** 2).mean(), params, allow_unused=True)
    for p, a, b in zip(params, g_ours, g_ref):  # unused: the step size, where a cap binds
        zero = torch.zeros_like(p)
        torch.testing.assert_close(
            zero if a is None else a, zero if b is None else b, rtol=1e-9, atol=1e-10
        )


@pytest.mark.parametrize(
    "rule,lr,cap", [("fixed", 0.2, None), ("polyak", 0.5, None), ("polyak", 0.5, 0.02)]
)
@pytest.mark.parametrize("branch", sorted(BRANCHES))
@pytest.mark.parametrize(("per_sample", "path"), PATHS)
def test_every_path_and_branch_matches_the_reference(
    per_sample: bool, path: str, branch: str, rule: str, lr: float, cap: float | None
) -> None:
    net, x, ref, params = _against_reference(per_sample, path, branch, rule, lr, cap=cap)
    _assert_matches(net, x, ref, params)
    if path == "lowrank":
        assert _branches_taken(net, x) == {branch == "dense"}


def test_a_wrong_recorded_correction_is_caught() -> None:
    """Mutation check: doubling the recorded low-rank correction must fail the comparison."""
    net, x, ref, params = _against_reference(True, "lowrank", "recorded", "fixed", 0.2)
    original = lowrank._Linear.corrected

    def doubled(self: Any, out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        fixed = original(self, out, a)
        return fixed if self.update.rec_d is None else 2 * fixed - out

    lowrank._Linear.corrected = doubled  # type: ignore[method-assign]
    try:
        with pytest.raises(AssertionError):
            _assert_matches(net, x, ref, params)
    finally:
        lowrank._Linear.corrected = original  # type: ignore[method-assign]


@pytest.mark.parametrize(("per_sample", "path"), PATHS)
def test_polyak_gradcheck(per_sample: bool, path: str) -> None:
    net = make_net(
        hidden=3, emb_hidden=3, horizon=3, inner_steps=2, per_sample=per_sample,
        per_sample_path=path, step_rule="polyak", inner_lr=0.5,
    )  # fmt: skip
    assert gradcheck_weight_and_step(net, torch.randn(3, 2, dtype=torch.float64))


class _Affine(nn.Module):
    """``g`` then an affine map of it: ``c * g + b``."""

    def __init__(self, g: nn.Module, scale: float, shift: float) -> None:
        super().__init__()
        self.g, self.scale, self.shift = g, scale, shift

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.scale * self.g(s) + self.shift
        return out


@pytest.mark.parametrize("adapt", [None, "affine"])
@pytest.mark.parametrize(("per_sample", "path"), PATHS)
def test_polyak_is_invariant_to_the_scale_and_offset_of_g(
    per_sample: bool, path: str, adapt: str | None
) -> None:
    from noether_wrap import Affine

    if adapt and path != "auto":
        pytest.skip("an Affine always runs the affine path: per_sample_path must stay 'auto'")
    torch.manual_seed(5)
    model = Rollout(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double(), 4)
    g = MLPEmbedding(2, 2, hidden=8, depth=1).double()
    kwargs: dict[str, Any] = {
        "inner_steps": 2, "step_rule": "polyak", "inner_lr": 0.7, "per_sample": per_sample,
        "per_sample_path": path, "adapt": Affine("step.0") if adapt else None,
    }  # fmt: skip
    x = torch.randn(5, 2, dtype=torch.float64)
    base = NoetherWrapper(model, g, **kwargs)(x)
    scaled = NoetherWrapper(model, _Affine(g, 37.0, -4.0), **kwargs)(x)
    torch.testing.assert_close(base, scaled, rtol=1e-9, atol=1e-11)
    fixed = NoetherWrapper(model, _Affine(g, 37.0, -4.0), **{**kwargs, "step_rule": "fixed"})
    assert not torch.allclose(
        fixed(x), NoetherWrapper(model, g, **{**kwargs, "step_rule": "fixed"})(x)
    )


def test_polyak_zero_loss_is_a_zero_step() -> None:
    model = Rollout(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double(), 4)
    flat = lambda s: 0 * s.sum(-1)  # noqa: E731 - conserved by everything: L = 0
    net = NoetherWrapper(model, flat, step_rule="polyak", inner_lr=1.0, inner_steps=3)
    x = torch.randn(3, 2, dtype=torch.float64)
    info = net(x, return_info=True)
    assert torch.equal(info.prediction, info.initial_prediction)
    assert bool((info.noether_losses == 0).all())


def test_polyak_default_fraction_and_fixed_default_step() -> None:
    assert make_net(step_rule="polyak", inner_lr=None).inner_lr == pytest.approx(1.0)
    assert make_net(inner_lr=None).inner_lr == pytest.approx(1e-3)


# Options are checked wherever they change (defects 2, 3, 15) ----------------------------------


@pytest.mark.parametrize(
    "name,value",
    [
        ("step_control", "bactrack"),
        ("loss_form", "sideways"),
        ("distance", "l1"),
        ("max_inner_grad_norm", -1),
        ("inner_steps", -1),
        ("inner_horizon", 0),
        ("per_sample_path", "fast"),
        ("step_rule", "adam"),
        ("window", 0),
        ("adapt", "nothing.*"),
        ("inner_lr", 0.0),
    ],
)
def test_options_are_checked_on_assignment_and_in_the_constructor(name: str, value: Any) -> None:
    net = make_net()
    before = net(torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"`{name}`"):
        setattr(net, name, value)
    torch.testing.assert_close(net(torch.ones(2, 2, dtype=torch.float64)), before)
    with pytest.raises(ValueError, match=f"`{name}`"):
        make_net(**{name: value})


def test_setting_backtrack_later_keeps_an_explicit_lowrank_path() -> None:
    net = make_net(per_sample_path="lowrank")
    net.step_control = "backtrack"
    net(torch.randn(3, 2, dtype=torch.float64))
    assert net.last_path == "lowrank" and net.per_sample_path == "lowrank"


class _MaybeFlat(nn.Module):
    """A step that, when ``flat`` is set, feeds its layer the batch folded with a second axis
    (which the low-rank path cannot follow)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2).double()

    def forward(self, x: torch.Tensor, flat: bool = False) -> torch.Tensor:
        if flat:
            twice = torch.stack([x, x], 1).reshape(-1, 2)
            out: torch.Tensor = self.layer(twice).reshape(x.shape[0], 2, 2).mean(1)
            return out
        return self.layer(x)


class _Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.step = _MaybeFlat()

    def forward(self, x: torch.Tensor, flat: bool = False) -> torch.Tensor:
        return torch.stack([self.step(x, flat), self.step(2 * x, flat)], 1)


def test_a_lowrank_fallback_is_per_call_not_forever() -> None:
    net = NoetherWrapper(_Seq(), lambda s: s.pow(2).sum(-1), inner_lr=0.1)
    x = torch.randn(3, 2, dtype=torch.float64)
    net(x, flat=True)
    assert net.last_path == "vmap"
    net(x)
    assert net.last_path == "lowrank"


# Paths agree on a model that runs partly without autograd (defect 1) ---------------------------


class _HalfNoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 8).double()
        self.b = nn.Linear(8, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = torch.tanh(self.a(x))
        out: torch.Tensor = x + self.b(h)
        return out


def test_paths_agree_on_a_model_that_runs_partly_under_no_grad() -> None:
    outs = {}
    for path in ("lowrank", "vmap"):
        torch.manual_seed(0)
        net = NoetherWrapper(
            Rollout(_HalfNoGrad(), 3),
            lambda s: s.pow(2).sum(-1),
            inner_lr=0.1,
            per_sample_path=path,
        )
        outs[path] = net(torch.ones(4, 2, dtype=torch.float64))
        assert net.last_path == path
    torch.testing.assert_close(outs["lowrank"], outs["vmap"], rtol=1e-10, atol=1e-12)


def test_a_model_entirely_under_no_grad_is_a_no_op_on_every_path() -> None:
    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.a(x)

    for path in ("lowrank", "vmap"):
        torch.manual_seed(0)
        net = NoetherWrapper(
            Rollout(Frozen(), 3), lambda s: s.pow(2).sum(-1), inner_lr=0.1, per_sample_path=path
        )
        x = torch.randn(4, 2, dtype=torch.float64)
        with pytest.warns(RuntimeWarning, match="did not change the prediction"):
            info = net(x, return_info=True)
        assert torch.equal(info.prediction, info.initial_prediction)


# Errors and warnings that say what is wrong, at the user's line (defects 5, 6, 11, 12) --------


def test_tailor_with_zero_steps_checks_inputs() -> None:
    net = make_net(inner_steps=0)
    with pytest.raises(TypeError, match="`inputs` must be a Tensor"):
        net.tailor([[0.0, 1.0]])  # type: ignore[arg-type]


@pytest.mark.parametrize("via", ["forward", "tailor"])
def test_warnings_point_at_the_callers_line(via: str) -> None:
    net = make_net(per_sample_path="vmap")
    x = torch.randn(4, 2, dtype=torch.float64)
    x[0, 0] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net(x) if via == "forward" else net.tailor(x)
    assert caught, "expected a non-finite warning"
    assert {w.filename for w in caught} == {__file__}


def test_a_nan_input_is_not_blamed_on_the_step_size() -> None:
    net = make_net()
    x = torch.randn(3, 2, dtype=torch.float64)
    x[1, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="already non-finite") as caught:
        out = net(x)
    assert not any("inner_lr" in str(w.message) for w in caught)
    assert bool(torch.isfinite(out[0]).all()) and bool(torch.isfinite(out[2]).all())


def test_a_constant_embedding_is_named_in_the_error() -> None:
    model = Rollout(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double(), 4)
    constant = lambda s: torch.ones(s.shape[0], dtype=s.dtype)  # noqa: E731
    net = NoetherWrapper(model, constant, per_sample=False)
    with pytest.raises(ValueError, match="`embedding`"):
        net(torch.randn(3, 2, dtype=torch.float64))


# Backtracking in float32 keeps its promise within rounding (defect 13) -------------------------


def test_backtracking_in_float32_never_raises_a_loss_beyond_rounding() -> None:
    torch.manual_seed(0)
    net = make_net(dtype=torch.float32, inner_lr=5.0, inner_steps=4, step_control="backtrack")
    info = net(3 * torch.randn(16, 2), return_info=True)
    losses = info.noether_losses.double()
    assert bool((losses[:, 1:] <= losses[:, :-1] * (1 + 1e-5) + 1e-12).all())


# tailored_model reproduces forward on a shared step with keep_if_better (defect 16) -----------


@pytest.mark.parametrize("per_sample", [False, True])
def test_tailored_model_reproduces_forward_with_keep_if_better(per_sample: bool) -> None:
    torch.manual_seed(2)
    net = make_net(per_sample=per_sample, keep_if_better=True, inner_lr=2.0, hidden=16)
    x = 2 * torch.randn(6, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        info = net(x, return_info=True)
        kept = info.noether_losses[:, -1] >= info.noether_losses[:, 0]
        for i in range(6):
            copy = net.tailored_model(x, index=i)
            torch.testing.assert_close(copy(x[i : i + 1]), info.prediction[i : i + 1])
    assert 0 < int(kept.sum()) < 6  # both kinds of sequence are in the batch


# --- inner momentum: one transform, every path ---------------------------------------------------


@pytest.mark.parametrize(
    ("per_sample", "path", "rule"),
    [(False, "auto", "fixed"), (True, "lowrank", "fixed"), (True, "vmap", "fixed"),
     (True, "lowrank", "polyak"), (False, "auto", "polyak")],
)  # fmt: skip
def test_inner_momentum_matches_a_heavy_ball_reference(
    per_sample: bool, path: str, rule: str
) -> None:
    horizon, steps, beta = 4, 3, 0.7
    net = make_net(
        horizon=horizon, inner_steps=steps, per_sample=per_sample, per_sample_path=path,
        inner_lr=0.2 if rule == "fixed" else 0.5, step_rule=rule, polyak_cap=None,
        inner_momentum=beta,
    )  # fmt: skip
    x = torch.randn(5, 2, dtype=torch.float64)
    step, emb = net.model.step, net.embedding.net
    model_params = [step[0].weight, step[0].bias, step[2].weight, step[2].bias]
    emb_params = [emb[0].weight, emb[0].bias, emb[2].weight, emb[2].bias]
    ours = net(x)
    ref = tailor_reference(
        model_params, emb_params, net.log_inner_lr, x, horizon=horizon, steps=steps,
        per_sample=per_sample, rule=rule, momentum=beta,
    )  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    plain = tailor_reference(
        model_params, emb_params, net.log_inner_lr, x, horizon=horizon, steps=steps,
        per_sample=per_sample, rule=rule,
    )  # fmt: skip
    assert (
        float((ref - plain).detach().abs().max()) > 1e-6
    )  # momentum changes the steps after the first
    target = torch.randn(5, horizon, 2, dtype=torch.float64)
    params = [*model_params, *emb_params, net.log_inner_lr]
    g_ours = torch.autograd.grad(((ours - target) ** 2).mean(), params)
    g_ref = torch.autograd.grad(((ref - target) ** 2).mean(), params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_inner_momentum_is_nothing_at_one_step_and_checked() -> None:
    x = torch.randn(4, 2, dtype=torch.float64)
    plain = make_net(inner_steps=1)
    heavy = make_net(inner_steps=1, inner_momentum=0.9)
    copy_weights(heavy, plain)
    torch.testing.assert_close(heavy(x), plain(x), rtol=0, atol=0)
    for bad in (1.0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="inner_momentum"):
            make_net(inner_momentum=bad)
    # the affine path composes with it too (its directions are additive like every path's)
    affine = make_net(inner_steps=3, adapt=Affine("step.0"), inner_momentum=0.9)
    still = make_net(inner_steps=3, adapt=Affine("step.0"))
    copy_weights(still, affine)
    assert affine.last_path is None and not torch.equal(affine(x), still(x))
    assert affine.last_path == "affine"
