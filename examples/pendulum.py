"""Quick start: wrap a learned pendulum vector field, fit g, tune by cross-validation, predict.

    python examples/pendulum.py           # about a minute on one core
    python examples/pendulum.py --quick   # a smoke run

1. Data: 50 noisy trajectories of the ideal pendulum, H = 3 (1 - cos q) + p^2 (HNN's task),
   25 to train and 25 to test; the field is fitted on noisy states and their derivatives.
2. g: ``fit_conserved`` finds a formula the training trajectories conserve.
3. The wrap: ``NoetherWrapper`` tailors the field per state to conserve g over one RK4 step.
4. ``tune_cv`` chooses the Polyak fraction, or "off", by 5-fold cross-validation over the
   training trajectories, refitting the field and g per fold, scoring whole rollouts.
5. Predict the test trajectories; compare with the plain field.

The full experiment, with every baseline and the protocol's intervals: experiments/pendulum.py.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from noether_wrap import NoetherWrapper, Rollout, fit_conserved, tune_cv
from noether_wrap.embeddings import FeatureLibrary

DT, POINTS, NOISE = 3.0 / 44, 45, 0.1


def true_field(x: Tensor) -> Tensor:
    """``dq/dt = 2p, dp/dt = -3 sin q`` for states ``(..., 2)``."""
    return torch.stack([2.0 * x[..., 1], -3.0 * torch.sin(x[..., 0])], dim=-1)


def trajectories(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(clean, noisy)``, each ``(n, POINTS, 2)``: starts at radius 1.3-2.3, exact RK4 (20
    substeps per observation), Gaussian noise on the observations."""
    angle = torch.rand(n, generator=gen) * 2 * torch.pi
    radius = torch.rand(n, generator=gen) + 1.3
    x0 = torch.stack([angle.cos(), angle.sin()], -1) * radius[:, None]
    states, x, h = [x0], x0, DT / 20
    for _ in range(POINTS - 1):
        for _ in range(20):
            k1 = true_field(x)
            k2 = true_field(x + h / 2 * k1)
            k3 = true_field(x + h / 2 * k2)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + true_field(x + h * k3))
        states.append(x)
    clean = torch.stack(states, dim=1)
    return clean, clean + NOISE * torch.randn(clean.shape, generator=gen)


def fit_field(states: Tensor, derivatives: Tensor, steps: int) -> nn.Module:
    """An MLP vector field fitted by full-batch Adam on ``(m, 2)`` states and derivatives."""
    torch.manual_seed(0)
    field = nn.Sequential(
        nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    )
    opt = torch.optim.Adam(field.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = nn.functional.mse_loss(field(states), derivatives)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return field


def one_step_field(rollout: Rollout, x: Tensor) -> Tensor:
    """What the tailored wrapper predicts: the field itself, adapted on its one-step rollout."""
    return rollout.step(x)


def rollout(field: nn.Module, starts: Tensor) -> Tensor:
    """``(n, 2) -> (n, POINTS - 1, 2)`` RK4 rollouts over the observed times."""
    with torch.no_grad():
        return Rollout(field, POINTS - 1, dt=DT, method="rk4")(starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, for tests")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    clean, noisy = trajectories(50, gen)
    train, test = slice(0, 25), slice(25, 50)
    steps = 200 if args.quick else 3000

    def build(idx: Tensor) -> NoetherWrapper:
        """Everything fitted on the training trajectories ``idx`` only: the field and g."""
        states = noisy[train][idx].reshape(-1, 2)
        field = fit_field(states, true_field(clean[train][idx].reshape(-1, 2)), steps)
        library = FeatureLibrary(["q", "p", "q^2", "p^2", "cos(q)", "sin(q)", "q*p"], ["q", "p"])
        g = fit_conserved(library, noisy[train][idx], progress=False).embedding
        return NoetherWrapper(
            Rollout(field, 1, dt=DT, method="rk4"), g, step_rule="polyak", predict=one_step_field
        )

    # validation mirrors the test: whole rollouts from each training trajectory's start
    starts, targets = clean[train, 0], noisy[train, 1:]
    net, result = tune_cv(
        build,
        starts,
        targets,
        folds=2 if args.quick else 5,
        step_rules=("polyak",),
        candidates=(1.0, 2.0) if args.quick else (0.25, 0.5, 1.0, 2.0),
        guards=(None,),
        forward=lambda n, x: rollout(n, x),
    )
    print(result.table())
    plain = net.model.step  # the field fitted on all 25 training trajectories
    truth = clean[test, 1:]
    rmse = {
        "plain field": (rollout(plain, clean[test, 0]) - truth).pow(2).mean().sqrt().item(),
        "tailored": (rollout(net, clean[test, 0]) - truth).pow(2).mean().sqrt().item(),
    }
    for name, value in rmse.items():
        print(f"test rollout RMSE, {name:<12} {value:.4f}")
    print(f"tailored / plain: {rmse['tailored'] / rmse['plain field']:.3f}")


if __name__ == "__main__":
    main()
