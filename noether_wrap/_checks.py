"""Argument checks at the library's boundary: one message shape for every public function.

Each check names the argument, what was expected and what was given, and returns the value so a
caller can check and assign in one line.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "check_batch_norm_eval",
    "check_choice",
    "check_inputs",
    "check_int",
    "check_positive_float",
]


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ValueError naming ``name``.

    Example:
        >>> check_choice("loss_form", "chain", ("anchor", "chain"))
        'chain'
    """
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {sorted(allowed)}, got {value!r}.")
    return value


def check_int(name: str, value: object, *, minimum: int = 1, allow_none: bool = False) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= minimum``, else raise a ValueError.

    Example:
        >>> check_int("window", 2)
        2
    """
    if allow_none and value is None:
        return value  # type: ignore[return-value]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")
        none = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be {kind}{none}, got {value!r}.")
    return value


def check_positive_float(name: str, value: object, *, allow_none: bool = False) -> float:
    """Return ``float(value)`` if it is a finite number > 0, else raise a ValueError.

    Example:
        >>> check_positive_float("inner_lr", 1e-2)
        0.01
    """
    if allow_none and value is None:
        return value  # type: ignore[return-value]
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
    if not ok:
        none = " or None" if allow_none else ""
        raise ValueError(f"`{name}` must be a positive finite float{none}, got {value!r}.")
    return float(value)  # type: ignore[arg-type]


def check_inputs(model: nn.Module, inputs: object, *, has_reference: bool) -> None:
    """The wrapper's ``inputs``: a tensor with a non-empty batch first, on the model's device,
    floating point in the model's dtype when the Noether loss anchors on it."""
    if not isinstance(inputs, Tensor):
        raise TypeError(f"`inputs` must be a Tensor, got {type(inputs).__name__}.")
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(
            f"`inputs` must have a non-empty batch axis first; got shape {tuple(inputs.shape)}."
        )
    if not has_reference and not inputs.is_floating_point():
        raise TypeError(
            "`inputs` is the state the Noether loss anchors on, so it must be a floating-point "
            f"tensor; got dtype {inputs.dtype}. Pass `reference` if the model reads other inputs."
        )
    if any(size == 0 for size in inputs.shape):
        raise ValueError(f"`inputs` has an empty axis: shape {tuple(inputs.shape)}.")
    devices = {p.device for p in model.parameters()}
    if len(devices) == 1 and inputs.device not in devices:
        raise ValueError(
            f"`inputs` is on {inputs.device} but the model's parameters are on "
            f"{devices.pop()}; move one of them."
        )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if inputs.is_floating_point() and len(dtypes) == 1 and inputs.dtype not in dtypes:
        raise ValueError(
            f"`inputs` has dtype {inputs.dtype} but the model's parameters are "
            f"{dtypes.pop()}; convert one of them (e.g. `inputs.to(...)` or `model.to(...)`)."
        )


def check_batch_norm_eval(model: nn.Module, embedding: object) -> None:
    """Per-sample tailoring needs running statistics: no BatchNorm in training mode."""
    for owner, module in (("model", model), ("embedding", embedding)):
        if not isinstance(module, nn.Module):
            continue
        for name, sub in module.named_modules():
            if isinstance(sub, _BatchNorm) and sub.training:
                raise ValueError(
                    f"`per_sample=True` cannot tailor `{owner}` with BatchNorm in training "
                    f"mode ({name or owner}: {type(sub).__name__}): batch statistics couple "
                    "the sequences of a batch, so no sequence can be tailored on its own. "
                    "Call .eval() on that module to use running statistics, replace it with "
                    "GroupNorm or LayerNorm, or pass per_sample=False."
                )
