"""An ordinary training loop with a one-line Noether wrap, on a frictionless harmonic oscillator.

    python examples/train_loop.py [--quick]

The model predicts 20 steps of (q, p) from a noisy start; the wrapper tailors it to a learned
conserved quantity before every prediction. Only the line marked ``<- the wrap`` is new.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from tqdm import trange

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap.embeddings import MLPEmbedding


def oscillator(
    batch: int, horizon: int, dt: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy starts ``(batch, 2)`` and exact futures ``(batch, horizon, 2)``; energy q^2 + p^2."""
    x0 = torch.randn(batch, 2, generator=gen)
    t = dt * torch.arange(1, horizon + 1)
    c, s = torch.cos(t), torch.sin(t)
    future = torch.stack([x0[:, :1] * c + x0[:, 1:] * s, -x0[:, :1] * s + x0[:, 1:] * c], -1)
    return x0 + 0.05 * torch.randn(x0.shape, generator=gen), future


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, for tests")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    steps = 20 if args.quick else args.steps
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    step = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))
    model = Rollout(step, horizon=20)
    net = NoetherWrapper(model, MLPEmbedding(2), inner_steps=1, inner_lr=1e-2)  # <- the wrap
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    for _ in trange(steps, desc="training"):
        x0, target = oscillator(64, 20, 0.1, gen)
        loss = nn.functional.mse_loss(net(x0), target)
        opt.zero_grad()
        loss.backward()
        opt.step()

    x0, target = oscillator(256, 20, 0.1, torch.Generator().manual_seed(1))
    with torch.no_grad():
        tailored = nn.functional.mse_loss(net(x0), target).item()
        plain = nn.functional.mse_loss(net.model(x0), target).item()
    print(
        f"test MSE  tailored {tailored:.5f}  untailored {plain:.5f}  step size {net.inner_lr:.4f}"
    )


if __name__ == "__main__":
    main()
