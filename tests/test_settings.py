"""Settings are state: the options record, what ``state_dict`` carries, typos, and the horizon
a fixed step was chosen at."""

from __future__ import annotations

import inspect
import io
import re
import warnings
from pathlib import Path

import pytest
import torch

from noether_wrap import NoetherWrapper, TuneConfig, tune
from noether_wrap._options import OPTIONS, options_table

from conftest import make_net

README = Path(__file__).resolve().parents[1] / "README.md"


def _round_trip(net: NoetherWrapper) -> NoetherWrapper:
    """Save ``net``'s state as a file would hold it, load it into a default-built wrapper."""
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_net()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


@pytest.mark.parametrize(
    "config",
    [
        None,  # "off"
        TuneConfig(1, "fixed", 0.3),
        TuneConfig(2, "fixed", 0.1, 0.3),
        TuneConfig(1, "polyak", 1.0),
        TuneConfig(2, "polyak", 2.0, 0.1),
    ],
)
def test_every_setting_tune_can_choose_survives_save_and_load(config: TuneConfig | None) -> None:
    torch.manual_seed(0)
    net = make_net(inner_lr=0.01)
    x = torch.randn(10, 2, dtype=torch.float64)
    target = net.model(x).detach() + 0.1 * torch.randn(10, 4, 2, dtype=torch.float64)
    candidates = [0.01] if config is None else [config.step]
    steps = (1,) if config is None else (config.inner_steps,)
    rules = ("fixed",) if config is None else (config.step_rule,)
    guards = (None,) if config is None else (config.guard,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if config is None:  # a target the model already hits: nothing can beat "off"
            tune(net, x, net.model(x).detach(), candidates=candidates, guards=guards)
        else:  # the configuration is set as a tuning would set it
            tune(net, x, target, inner_steps=steps, step_rules=rules, candidates=candidates,
                 guards=guards)  # fmt: skip
            net.inner_steps, net.step_rule, net.inner_lr = config[:3]
            net.guard = config.guard
    fresh = _round_trip(net)
    assert fresh.options == net.options and fresh.inner_lr == net.inner_lr
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_a_load_that_overrides_what_the_constructor_set_says_so() -> None:
    source = make_net(step_rule="polyak", inner_lr=1.0)
    target = make_net(step_control="backtrack", keep_if_better=True)
    with pytest.warns(UserWarning, match=r"step_control='backtrack' -> 'none'") as caught:
        target.load_state_dict(source.state_dict())
    assert "keep_if_better=True -> False" in str(caught[0].message)
    assert target.step_rule == "polyak" and target.step_control == "none"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_net().load_state_dict(source.state_dict())  # defaults: nothing to say


def test_a_state_dict_without_settings_still_loads_and_keeps_the_wrappers_own() -> None:
    old = {k: v for k, v in make_net(inner_lr=0.5).state_dict().items() if k != "_extra_state"}
    net = make_net(step_rule="polyak", inner_steps=2)
    net.load_state_dict(old)  # strict: the missing settings are the wrapper's own
    assert net.step_rule == "polyak" and net.inner_steps == 2
    assert net.inner_lr == pytest.approx(0.5)
    with pytest.raises(ValueError, match="_extra_state"):
        net.load_state_dict({**old, "_extra_state": "junk"})


def test_a_near_miss_of_an_option_name_is_an_error() -> None:
    net = make_net()
    with pytest.raises(AttributeError, match="did you mean `inner_steps`"):
        net.inner_step = 3
    with pytest.raises(AttributeError, match="did you mean `guard`"):
        net.gaurd = 0.3
    net.note = "an unrelated attribute is fine"
    assert net.note == "an unrelated attribute is fine" and net.inner_steps == 1


def test_the_constructor_and_the_readme_table_derive_from_the_record() -> None:
    signature = inspect.signature(NoetherWrapper)
    for option in OPTIONS:
        assert signature.parameters[option.name].default == option.default, option.name
    assert options_table() in README.read_text(), "README's option table: regenerate it"


# --- the horizon a fixed step was chosen at ------------------------------------------------------


def test_a_fixed_step_tuned_at_one_horizon_warns_once_at_another() -> None:
    net = make_net(horizon=4, inner_lr=0.01, step_horizon=4)  # as `tune` records it
    x = torch.randn(10, 2, dtype=torch.float64)
    net.model.horizon = 8
    with pytest.warns(RuntimeWarning, match=r"horizon of 4 steps .* reads 8"):
        net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x)  # once
        net.inner_horizon = 4  # the step's horizon: nothing to say
        net(x)
    net.inner_horizon, net.step_rule = None, "polyak"  # the helpful fraction changes too
    with pytest.warns(RuntimeWarning, match=r"Polyak fraction .* horizon of 4 steps"):
        net(x)


def test_training_records_the_horizon_of_a_learned_step() -> None:
    net = make_net(horizon=4)
    x = torch.randn(6, 2, dtype=torch.float64)
    net(x).sum().backward()
    assert net.step_horizon == 4
    with torch.no_grad():
        net.model.horizon = 6
        with pytest.warns(RuntimeWarning, match="inner_horizon=4"):
            net(x)
    fixed = make_net(horizon=4, learn_inner_lr=False)
    fixed(x).sum().backward()
    assert fixed.step_horizon is None  # a step nobody learned or tuned has no horizon


def test_readme_documents_every_option() -> None:
    text = README.read_text()
    for option in OPTIONS:
        assert re.search(rf"\| `{option.name}` \|", text), option.name


def test_inner_momentum_travels_with_the_weights() -> None:
    net = make_net(inner_steps=3, inner_momentum=0.7)
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_net()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 2, dtype=torch.float64)
    assert fresh.inner_momentum == 0.7 and fresh.inner_steps == 3
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)
