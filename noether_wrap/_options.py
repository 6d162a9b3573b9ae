"""The wrapper's options: one immutable record, checked whenever it is built or changed.

:class:`NoetherWrapper` exposes every field as a property whose setter builds a new, checked
record (:meth:`Options.replace`), so ``net.step_control = "bactrack"`` fails at once, the same
way the constructor does, instead of running as something else.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

from torch import Tensor, nn

from noether_wrap._checks import check_choice, check_int, check_positive_float
from noether_wrap._inner import STEP_RULES, Affine
from noether_wrap.loss import DISTANCES, LOSS_FORMS, Distance, LossForm

#: ``adapt``: None (all trainable parameters), a glob on parameter names, a predicate, or
#: :class:`~noether_wrap.Affine` (per-sequence affines on matching modules' outputs).
AdaptSpec = Union[str, Callable[[str, nn.Parameter], bool], Affine, None]  # noqa: UP007
PerSamplePath = Literal["auto", "lowrank", "vmap"]
PER_SAMPLE_PATHS: tuple[str, ...] = ("auto", "lowrank", "vmap")
StepControl = Literal["none", "backtrack"]
STEP_CONTROLS: tuple[str, ...] = ("none", "backtrack")
StepRule = Literal["fixed", "polyak"]


def _callable_or_none(name: str, value: object) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"`{name}` must be callable or None, got {type(value).__name__}.")
    return value


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, int)) or isinstance(value, float):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")
    return bool(value)


def _adapt(_: str, value: object) -> Any:
    if not (value is None or isinstance(value, (str, Affine)) or callable(value)):
        raise TypeError(
            "`adapt` must be None, a glob string, a predicate (name, param) -> bool or an "
            f"Affine; got {type(value).__name__}."
        )
    return value


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "inner_steps": lambda n, v: check_int(n, v, minimum=0),
    "loss_form": lambda n, v: check_choice(n, v, LOSS_FORMS),
    "distance": lambda n, v: check_choice(n, v, DISTANCES),
    "window": lambda n, v: check_int(n, v),
    "per_sample": _bool,
    "adapt": _adapt,
    "first_order": _bool,
    "reference": _callable_or_none,
    "time_dim": lambda n, v: check_int(n, v),
    "inner_horizon": lambda n, v: check_int(n, v, allow_none=True),
    "keep_if_better": _bool,
    "max_inner_grad_norm": lambda n, v: check_positive_float(n, v, allow_none=True),
    "predict": _callable_or_none,
    "per_sample_path": lambda n, v: check_choice(n, v, PER_SAMPLE_PATHS),
    "step_control": lambda n, v: check_choice(n, v, STEP_CONTROLS),
    "step_rule": lambda n, v: check_choice(n, v, STEP_RULES),
}


@dataclass(frozen=True)
class Options:
    """Every option of :class:`~noether_wrap.NoetherWrapper` but the step size (a parameter)."""

    inner_steps: int = 1
    loss_form: LossForm = "anchor"
    distance: Distance = "mse"
    window: int = 1
    per_sample: bool = True
    adapt: AdaptSpec = None
    first_order: bool = False
    reference: Callable[[Tensor], Tensor] | None = None
    time_dim: int = 1
    inner_horizon: int | None = None
    keep_if_better: bool = False
    max_inner_grad_norm: float | None = None
    predict: Callable[..., Tensor] | None = None
    per_sample_path: PerSamplePath = "auto"
    step_control: StepControl = "none"
    step_rule: StepRule = "fixed"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            checked = _CHECKS[field.name](field.name, getattr(self, field.name))
            object.__setattr__(self, field.name, checked)

    def replace(self, **changes: Any) -> Options:
        """A checked copy with ``changes``; an unknown name is a TypeError naming it."""
        unknown = set(changes) - set(_CHECKS)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; options are {sorted(_CHECKS)}.")
        return dataclasses.replace(self, **changes)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Options))


def select_adapted(adapt: AdaptSpec, model: nn.Module) -> list[str]:
    """Names of the parameters of ``model`` that ``adapt`` selects, in ``named_parameters``
    order (empty for an :class:`~noether_wrap.Affine`, once it is checked to match a module).

    Raises:
        ValueError: ``adapt`` selects no parameter (or an Affine matches no module).
    """
    named = list(model.named_parameters())
    if isinstance(adapt, Affine):
        if not adapt.modules(model):
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(
                f"`adapt` (={adapt!r}) matches no module of `model`; its modules are: "
                f"{', '.join(names[:8]) or 'none'}{', ...' if len(names) > 8 else ''}."
            )
        return []
    if adapt is None:
        names = [n for n, p in named if p.requires_grad]
    elif isinstance(adapt, str):
        names = [n for n, _ in named if fnmatch.fnmatchcase(n, adapt)]
    else:
        names = [n for n, p in named if adapt(n, p)]
    if not names:
        available = ", ".join(n for n, _ in named[:8]) or "none"
        raise ValueError(
            f"`adapt` (={adapt!r}) selects no parameter of `model`; its parameters are: "
            f"{available}{', ...' if len(named) > 8 else ''}."
        )
    return names
