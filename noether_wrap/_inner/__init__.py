"""The inner loop and its paths, behind one interface (the engine picks a path by :data:`PATHS`).

A forward pass builds one immutable :class:`~noether_wrap._inner.call.Call`; the wrapper picks a
path from :data:`PATHS`; every path runs :func:`~noether_wrap._inner.loop.run`, the one loop,
over its own small stepper (how to take a gradient and how to move along it):

=========  ==========================================  ==========  ======  =========  ========
path       stepper                                     per sample  params  backtrack  compiles
=========  ==========================================  ==========  ======  =========  ========
shared     :class:`~.shared.WeightStepper` (autograd)  no          yes     yes        yes
vmap       ``WeightStepper`` (``torch.func.grad``)     yes         yes     yes        yes
lowrank    :class:`~.lowrank.LowRankStepper`           yes         no      yes        no
affine     :class:`~.affine.AffineStepper`             either      yes     yes        yes
=========  ==========================================  ==========  ======  =========  ========

"params": whether the path materialises the adapted weights (``tailor()`` needs them).
"""

from __future__ import annotations

from dataclasses import dataclass

from noether_wrap._inner.affine import Affine, AffineLayoutError, hooked_copy, tailor_affine
from noether_wrap._inner.call import Bound, Call, InnerResult, Params, Progress
from noether_wrap._inner.loop import BACKTRACKS, STEP_RULES, TRANSFORMS, clip_scale, run
from noether_wrap._inner.lowrank import Unsupported, supported_layers, tailor_lowrank
from noether_wrap._inner.shared import tailor_shared
from noether_wrap._inner.vmap import batched_dims, tailor_vmap


@dataclass(frozen=True)
class PathInfo:
    """What a path can do."""

    per_sample: bool
    materialises: bool
    compiles: bool


PATHS: dict[str, PathInfo] = {
    "shared": PathInfo(per_sample=False, materialises=True, compiles=True),
    "vmap": PathInfo(per_sample=True, materialises=True, compiles=True),
    "lowrank": PathInfo(per_sample=True, materialises=False, compiles=False),
    "affine": PathInfo(per_sample=True, materialises=True, compiles=True),
}

__all__ = [
    "BACKTRACKS",
    "PATHS",
    "STEP_RULES",
    "TRANSFORMS",
    "Affine",
    "AffineLayoutError",
    "Bound",
    "Call",
    "InnerResult",
    "Params",
    "PathInfo",
    "Progress",
    "Unsupported",
    "batched_dims",
    "clip_scale",
    "hooked_copy",
    "run",
    "supported_layers",
    "tailor_affine",
    "tailor_lowrank",
    "tailor_shared",
    "tailor_vmap",
]
