"""The wrapper's options: one record, the single home of each option's name, default, check and
one-line doc.

Everything else derives from :data:`OPTIONS`: the :class:`Options` value the engine reads, the
attributes of :class:`~noether_wrap.NoetherWrapper` (checked on assignment, so
``net.step_control = "bactrack"`` fails at once), the settings ``state_dict()`` carries
(:func:`saved_settings`), and README's option table (:func:`options_table`). Adding an option is
one :class:`Option` line here plus its use.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable, Mapping
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


def _choice(allowed: tuple[str, ...]) -> Callable[[str, Any], Any]:
    return lambda n, v: check_choice(n, v, allowed)


def _int(minimum: int = 1, allow_none: bool = False) -> Callable[[str, Any], Any]:
    return lambda n, v: check_int(n, v, minimum=minimum, allow_none=allow_none)


def _positive_or_none(name: str, value: object) -> Any:
    return check_positive_float(name, value, allow_none=True)


def _momentum(name: str, value: object) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be None or a float in [0, 1), got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class Option:
    """One option: its name, default, check (``(name, value) -> normalised value``, raising a
    ValueError/TypeError that names it), one-line doc, and whether ``state_dict()`` saves it
    (plain values; callables and module specs belong to the code that builds the wrapper)."""

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    saved: bool = True


#: Every option of :class:`~noether_wrap.NoetherWrapper` but the step size (a parameter), in the
#: order the docs list them.
OPTIONS: tuple[Option, ...] = (
    Option("inner_steps", 1, _int(0), "k ≥ 0 inner steps; 0 makes the wrapper exactly `model`"),
    Option(
        "step_rule",
        "fixed",
        _choice(STEP_RULES),
        '`"fixed"`: `θ ← θ − lr ∇L`; `"polyak"`: `θ ← θ − γ L/‖∇L‖² ∇L` per sequence, '
        "scale-free (γ = 2 is the Gauss–Newton step of the squared residual)",
    ),
    Option(
        "polyak_cap",
        0.1,
        _positive_or_none,
        "a Polyak step moves the adapted parameters by at most this fraction of their norm "
        "(affines: of the identity's), so a vanishing gradient never gives an unbounded step; "
        "None: uncapped",
    ),
    Option(
        "inner_momentum",
        None,
        _momentum,
        "heavy-ball momentum β ∈ [0, 1) on the inner steps: each step adds β times the "
        "previous one (k ≥ 2; higher's and torchopt's `sgd(momentum=β)`); None: plain steps",
    ),
    Option(
        "guard",
        None,
        _positive_or_none,
        "per sequence, keep the untailored prediction where the tailored rollout moved from the "
        "plain one by more than τ × the plain rollout's own displacement from its start; None: "
        "no guard",
    ),
    Option(
        "loss_form",
        "anchor",
        _choice(LOSS_FORMS),
        '`"anchor"`: ‖g(x0) − g(x̃_t)‖²; `"chain"`: ‖g(x̃_{t−1}) − g(x̃_t)‖²',
    ),
    Option("distance", "mse", _choice(DISTANCES), '`"mse"` or `"cosine"`'),
    Option(
        "window", 1, _int(), "frames the embedding sees at once, stacked on the first state axis"
    ),
    Option(
        "per_sample",
        True,
        _bool,
        "every sequence gets its own adapted weights; False: one step shared by the batch",
    ),
    Option(
        "adapt",
        None,
        _adapt,
        'which model parameters are tailored: all trainable, a glob (`"decoder.*"`), '
        '`(name, p) -> bool`, or `Affine("decoder")`: per-sequence scale and shift on those '
        "modules' outputs, for any architecture (RNNs, attention, ODE solvers)",
        saved=False,
    ),
    Option(
        "first_order",
        False,
        _bool,
        "drop second-order terms (the embedding then gets no outer gradient; a warning says so)",
    ),
    Option(
        "reference",
        None,
        _callable_or_none,
        "`inputs -> x0`; default: `inputs` without a time axis, else its last `window` frames",
        saved=False,
    ),
    Option("time_dim", 1, _int(), "time axis of the model's output"),
    Option(
        "inner_horizon",
        None,
        _int(allow_none=True),
        "the Noether loss uses only the first n predicted steps",
    ),
    Option(
        "step_horizon",
        None,
        _int(allow_none=True),
        "the rollout horizon the step was tuned or learned at (set by `tune` and by "
        "training); a call at another horizon warns once",
    ),
    Option(
        "keep_if_better",
        False,
        _bool,
        "per sequence, keep the untailored prediction where tailoring did not lower the loss",
    ),
    Option(
        "max_inner_grad_norm",
        None,
        _positive_or_none,
        "clip each inner gradient (per sequence) to this norm",
    ),
    Option(
        "predict",
        None,
        _callable_or_none,
        "`(model, inputs, ...) -> prediction` when the prediction is not the rollout the loss "
        "reads (e.g. a vector field)",
        saved=False,
    ),
    Option(
        "per_sample_path",
        "auto",
        _choice(PER_SAMPLE_PATHS),
        '`"lowrank"` (exact recorded terms for Linear/Conv, no weight copies), `"vmap"` or '
        '`"auto"`',
    ),
    Option(
        "step_control",
        "none",
        _choice(STEP_CONTROLS),
        '`"backtrack"`: halve a step (up to four times) per sequence whose Noether loss it '
        "would raise",
    ),
)

_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
OPTION_NAMES: tuple[str, ...] = tuple(_BY_NAME)


@dataclass(frozen=True)
class Options:
    """The checked values of :data:`OPTIONS` (field defaults come from the record)."""

    inner_steps: int = _BY_NAME["inner_steps"].default
    step_rule: StepRule = _BY_NAME["step_rule"].default
    polyak_cap: float | None = _BY_NAME["polyak_cap"].default
    inner_momentum: float | None = _BY_NAME["inner_momentum"].default
    guard: float | None = _BY_NAME["guard"].default
    loss_form: LossForm = _BY_NAME["loss_form"].default
    distance: Distance = _BY_NAME["distance"].default
    window: int = _BY_NAME["window"].default
    per_sample: bool = _BY_NAME["per_sample"].default
    adapt: AdaptSpec = _BY_NAME["adapt"].default
    first_order: bool = _BY_NAME["first_order"].default
    reference: Callable[[Tensor], Tensor] | None = _BY_NAME["reference"].default
    time_dim: int = _BY_NAME["time_dim"].default
    inner_horizon: int | None = _BY_NAME["inner_horizon"].default
    step_horizon: int | None = _BY_NAME["step_horizon"].default
    keep_if_better: bool = _BY_NAME["keep_if_better"].default
    max_inner_grad_norm: float | None = _BY_NAME["max_inner_grad_norm"].default
    predict: Callable[..., Tensor] | None = _BY_NAME["predict"].default
    per_sample_path: PerSamplePath = _BY_NAME["per_sample_path"].default
    step_control: StepControl = _BY_NAME["step_control"].default

    def __post_init__(self) -> None:
        for option in OPTIONS:
            checked = option.check(option.name, getattr(self, option.name))
            object.__setattr__(self, option.name, checked)
        if isinstance(self.adapt, Affine) and self.per_sample_path != "auto":
            raise ValueError(
                f"`per_sample_path` (={self.per_sample_path!r}) chooses between the weight paths, "
                "but `adapt` is an Affine, which always runs the affine path; leave "
                "per_sample_path='auto', or adapt weights (a glob or a predicate) instead."
            )

    def replace(self, **changes: Any) -> Options:
        """A checked copy with ``changes``; an unknown name is a TypeError naming it."""
        unknown = set(changes) - set(_BY_NAME)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; options are {sorted(_BY_NAME)}.")
        return dataclasses.replace(self, **changes)


assert tuple(f.name for f in dataclasses.fields(Options)) == OPTION_NAMES  # one order, one record


def saved_settings(options: Options) -> dict[str, Any]:
    """``{name: value}`` of every option ``state_dict()`` carries (plain values only)."""
    return {o.name: getattr(options, o.name) for o in OPTIONS if o.saved}


def load_settings(options: Options, saved: Mapping[str, Any]) -> tuple[Options, list[str]]:
    """``options`` with the saved settings applied (checked) and the names of the options whose
    value the load changed although the wrapper had them away from the default (what its
    constructor or an assignment set)."""
    known = {n: v for n, v in saved.items() if n in _BY_NAME and _BY_NAME[n].saved}
    overridden = [  # step_horizon is a record (training writes it), not a choice
        n for n, v in known.items()
        if getattr(options, n) != v and getattr(options, n) != _BY_NAME[n].default
        and n != "step_horizon"
    ]  # fmt: skip
    return options.replace(**known), overridden


def near_option(name: str) -> str | None:
    """The option ``name`` is a near miss of (a typo such as ``inner_step``), if any."""
    if name.startswith("_") or name in _BY_NAME:
        return None
    close = difflib.get_close_matches(name, OPTION_NAMES, n=1, cutoff=0.8)
    return close[0] if close else None


def options_table() -> str:
    """README's option table (Markdown), generated from :data:`OPTIONS`."""
    lines = ["| argument | default | meaning |", "| --- | --- | --- |"]
    for o in OPTIONS:
        lines.append(f"| `{o.name}` | `{o.default!r}` | {o.doc} |")
    return "\n".join(lines)


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
