"""Ideal spring: the paper's other Table 1 system, on the pendulum's protocol.

    python experiments/spring.py                         # data seed 0, 2 model seeds
    python experiments/spring.py --data-seeds 3 --seeds 3 --json runs/spring.json
    python experiments/spring.py --quick                 # a smoke run for the tests

HNN's ideal spring (Greydanus et al. 2019), reproduced exactly: H = q^2 + p^2, so dq/dt = 2p and
dp/dt = -2q; for each of 50 trajectories a start ``y0 = rand(2) * 2 - 1`` scaled to radius
``rand() * 0.9 + 0.1``, 30 points on t in [0, 3], noise 0.1 on q then p; trajectories 0-24
train, 25-49 test; HNN's MLP for the field. Its invariant is a quadratic form, so the feature
library (q, p, q^2, p^2, q*p) can hold it exactly. Everything but the physics is shared with the
pendulum: experiments/hamiltonian.py, docs/spring.md.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from noether_experiments import hamiltonian


def field(x: Tensor) -> Tensor:
    """``dq/dt = 2p``, ``dp/dt = -2q`` for states ``(..., 2)``."""
    return torch.stack([2.0 * x[..., 1], -2.0 * x[..., 0]], dim=-1)


def energy(x: Tensor) -> Tensor:
    """``H = q^2 + p^2`` for states ``(..., 2)``."""
    return x[..., 0] ** 2 + x[..., 1] ** 2


SPRING = hamiltonian.System(
    name="spring",
    field=field,
    energy=energy,
    radius=lambda: float(np.random.rand()) * 0.9 + 0.1,
    points=30,
    terms=("q", "p", "q^2", "p^2", "q*p"),
    paper={"vanilla": 0.0174, "noether_formula": 0.0165, "oracle": 0.0166},
)

if __name__ == "__main__":
    hamiltonian.main(SPRING, __doc__ or "")
