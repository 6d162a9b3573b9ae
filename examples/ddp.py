"""Train a NoetherWrapper under DistributedDataParallel (gloo on CPU).

    torchrun --nproc_per_node 2 examples/ddp.py --steps 20

Every rank takes its slice of each batch. With ``per_sample=True`` every sequence is tailored on
its own, so the averaged gradient of the two slices equals the gradient of the whole batch in one
process (rule 8 in docs/index.md): ``--save PATH`` writes rank 0's final parameters for a check.

Nothing special is needed for the second-order inner steps: they use ``torch.autograd.grad`` /
``torch.func.grad`` inside ``forward``, which never fire DDP's gradient hooks; every parameter
(model, embedding, step size) gets its gradient in the ordinary ``backward``, so neither
``find_unused_parameters`` nor ``static_graph`` is needed.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap.embeddings import MLPEmbedding


def make_net(seed: int = 0) -> NoetherWrapper:
    """A small oscillator predictor, identical on every rank for a given seed."""
    torch.manual_seed(seed)
    step = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2)).double()
    return NoetherWrapper(
        Rollout(step, horizon=8), MLPEmbedding(2, hidden=16).double(), inner_steps=1, inner_lr=0.05
    )


def make_data(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmonic-oscillator starts ``(batch, 2)`` and their exact futures ``(batch, 8, 2)``."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 2, generator=g, dtype=torch.float64)
    t = 0.1 * torch.arange(1, 9, dtype=torch.float64)
    c, s = torch.cos(t)[None, :], torch.sin(t)[None, :]
    q = x0[:, :1] * c + x0[:, 1:] * s
    p = -x0[:, :1] * s + x0[:, 1:] * c
    return x0, torch.stack([q, p], dim=-1)


def train(net: nn.Module, x0: torch.Tensor, target: torch.Tensor, steps: int) -> None:
    """Plain SGD on the tailored prediction's MSE."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(x0) - target) ** 2).mean()
        loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="global batch, split over ranks")
    parser.add_argument("--save", default=None, help="write rank 0's final state_dict here")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch ({args.batch}) must be divisible by the world size ({world}).")
    torch.set_num_threads(1)
    net = make_net()
    ddp = nn.parallel.DistributedDataParallel(net)
    x0, target = make_data(args.batch)
    share = args.batch // world
    mine = slice(rank * share, (rank + 1) * share)
    train(ddp, x0[mine], target[mine], args.steps)
    if rank == 0:
        with torch.no_grad():
            loss = float(((net(x0) - target) ** 2).mean())
        print(f"world {world}: trained {args.steps} steps, loss on the whole batch {loss:.5f}")
        if args.save:
            torch.save(net.state_dict(), args.save)
    # every rank waits for rank 0's report: a rank that tears gloo down while its peer still
    # holds the connection aborts ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__" and "LOCAL_RANK" in os.environ:
    main()
elif __name__ == "__main__":
    raise SystemExit("run me with torchrun, e.g.: torchrun --nproc_per_node 2 examples/ddp.py")
