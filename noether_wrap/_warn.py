"""Warnings that point at the user's line, wherever in the library (or torch) they are raised."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

_PACKAGE = str(Path(__file__).resolve().parent)
_TORCH = str(Path(torch.__file__).resolve().parent)
_SKIPPED = (_PACKAGE, _TORCH, "<frozen ")


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that points
    at the first frame outside noether_wrap and torch: the user's own line."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_SKIPPED):
            return level
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return 2


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with a ``stacklevel`` pointing at the user's code."""
    warnings.warn(message, category, stacklevel=user_stacklevel())
