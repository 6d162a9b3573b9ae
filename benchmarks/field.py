"""What a wrapped training step costs for a learned vector field in RK4, as ratios.

    python benchmarks/field.py --json docs/results/field.json         # the grid, ~4 min on CPU
    python benchmarks/field.py --device cuda --json runs/field_cuda.json
    python benchmarks/field.py --quick                                 # a smoke run

The setting of issue #30: an MLP vector field 4-64-64-4 (tanh) in ``Rollout(field, T,
method="rk4")``, ``MLPEmbedding(4, 2)``, one training step (forward, MSE, backward), float32.
Methods, timed interleaved, medians of the repetitions:

  plain         the unwrapped rollout
  hand_shared   hand-written batch-shared tailoring: functional_call + autograd.grad(create_graph)
  shared        NoetherWrapper(per_sample=False)
  hand_dense    hand-written exact per-sample tailoring: every sequence's weights as a batch of
                matrices (B, out, in), one autograd.grad of the summed loss for all the
                per-sequence gradients, the whole MLP run by batched matmuls
  hand_floor    the per-sample floor written by hand: the shared weights' rollout with every
                layer output kept, one autograd.grad for every sequence's per-use deltas, each
                layer's per-sequence update built by one batched matmul and applied by one
                batched matmul per use beside the shared layer (autograd does the rest)
  per_sample    NoetherWrapper(per_sample=True) (its default path)

Printed per cell: each method ×plain, ×hand_shared, and per_sample ×hand_floor. With
``--device cuda`` every timing synchronises the device. The JSON records the device.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from noether_experiments import protocol
from noether_wrap import NoetherWrapper, Rollout, noether_loss
from noether_wrap.embeddings import MLPEmbedding

STATE, HIDDEN, LR, DT = 4, 64, 0.01, 0.1


def build(batch: int, horizon: int, device: str) -> tuple[Rollout, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    field = nn.Sequential(
        nn.Linear(STATE, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
        nn.Linear(HIDDEN, STATE),
    ).to(device)  # fmt: skip
    emb = MLPEmbedding(STATE, 2).to(device)
    model = Rollout(field, horizon, dt=DT, method="rk4")
    x0 = torch.randn(batch, STATE, device=device)
    return model, emb, x0, torch.randn(batch, horizon, STATE, device=device)


def hand_shared(model: Rollout, emb: nn.Module, x0: Tensor, k: int) -> Tensor:
    """The shared limit: one autograd.grad per step over a params dict, nothing else."""
    params = dict(model.named_parameters())
    for _ in range(k):
        loss = noether_loss(x0, functional_call(model, params, (x0,)), emb)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        params = {n: p - LR * g for (n, p), g in zip(params.items(), grads)}
    out: Tensor = functional_call(model, params, (x0,))
    return out


def _batched_field(weights: list[tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    """The MLP with per-sequence weights ``(B, out, in)``, biases ``(B, out)``; ``x`` ``(B, d)``."""
    h = x.unsqueeze(-1)
    for i, (w, b) in enumerate(weights):
        h = torch.bmm(w, h) + b.unsqueeze(-1)
        if i < len(weights) - 1:
            h = torch.tanh(h)
    return h.squeeze(-1)


def _rk4_rollout(weights: list[tuple[Tensor, Tensor]], x: Tensor, horizon: int) -> Tensor:
    states = []
    for _ in range(horizon):
        k1 = _batched_field(weights, x)
        k2 = _batched_field(weights, x + DT / 2 * k1)
        k3 = _batched_field(weights, x + DT / 2 * k2)
        k4 = _batched_field(weights, x + DT * k3)
        x = x + DT / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        states.append(x)
    return torch.stack(states, dim=1)


def hand_dense(model: Rollout, emb: nn.Module, x0: Tensor, k: int) -> Tensor:
    """Exact per-sample tailoring by hand: each sequence's own weights as a batch of matrices;
    the summed loss's gradient is every sequence's own (its loss reads only its weights), in one
    autograd.grad."""
    b = x0.shape[0]
    layers = [m for m in model.step if isinstance(m, nn.Linear)]
    weights = [(m.weight.expand(b, -1, -1), m.bias.expand(b, -1)) for m in layers]
    for _ in range(k):
        flat = [t for pair in weights for t in pair]
        loss = noether_loss(x0, _rk4_rollout(weights, x0, model.horizon), emb, reduction="sum")
        grads = torch.autograd.grad(loss, flat, create_graph=True)
        stepped = [t - LR * g for t, g in zip(flat, grads)]
        weights = list(zip(stepped[0::2], stepped[1::2]))
    return _rk4_rollout(weights, x0, model.horizon)


def _floor_field(
    layers: list[nn.Linear], updates: list[tuple[Tensor, Tensor] | None], x: Tensor,
    record: list[tuple[Tensor, Tensor]] | None,
) -> Tensor:  # fmt: skip
    """The MLP with shared weights plus per-sequence updates ``(B, out, in)``, ``(B, out)``,
    applied by one batched matmul each; ``record`` collects every layer's (input, output)."""
    h = x
    for i, (layer, update) in enumerate(zip(layers, updates)):
        z = nn.functional.linear(h, layer.weight, layer.bias)
        if update is not None:
            z = z + torch.bmm(h.unsqueeze(1), update[0].transpose(1, 2)).squeeze(1) + update[1]
        if record is not None:
            record.append((h, z))
        h = torch.tanh(z) if i < len(layers) - 1 else z
    return h


def _floor_rollout(
    layers: list[nn.Linear], updates: list[tuple[Tensor, Tensor] | None], x: Tensor,
    horizon: int, record: list[tuple[Tensor, Tensor]] | None = None,
) -> Tensor:  # fmt: skip
    def f(state: Tensor) -> Tensor:
        return _floor_field(layers, updates, state, record)

    states = []
    for _ in range(horizon):
        k1 = f(x)
        k2 = f(x + DT / 2 * k1)
        k3 = f(x + DT / 2 * k2)
        k4 = f(x + DT * k3)
        x = x + DT / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        states.append(x)
    return torch.stack(states, dim=1)


def hand_floor(model: Rollout, emb: nn.Module, x0: Tensor, k: int) -> Tensor:
    """The per-sample floor written by hand: the shared weights' rollout, every layer output
    kept; one autograd.grad of the summed loss for every sequence's per-use deltas (its loss
    reads only its own outputs); each layer's per-sequence update ``sum_s delta_s a_s^T`` built
    by one batched matmul and applied by one batched matmul per use, autograd doing the rest."""
    layers = [m for m in model.step if isinstance(m, nn.Linear)]
    updates: list[tuple[Tensor, Tensor] | None] = [None] * len(layers)
    for _ in range(k):
        record: list[tuple[Tensor, Tensor]] = []
        out = _floor_rollout(layers, updates, x0, model.horizon, record)
        loss = noether_loss(x0, out, emb, reduction="sum")
        deltas = torch.autograd.grad(loss, [z for _, z in record], create_graph=True)
        stepped = []
        for i, update in enumerate(updates):
            a = torch.stack([h for h, _ in record[i :: len(layers)]], dim=1)  # (B, uses, in)
            d = -LR * torch.stack(deltas[i :: len(layers)], dim=1)  # (B, uses, out)
            dw, db = torch.bmm(d.transpose(1, 2), a), d.sum(1)
            stepped.append((dw, db) if update is None else (update[0] + dw, update[1] + db))
        updates = list(stepped)
    return _floor_rollout(layers, updates, x0, model.horizon)


def methods(model: Rollout, emb: nn.Module, k: int) -> dict[str, Callable[[Tensor], Tensor]]:
    shared = NoetherWrapper(model, emb, inner_steps=k, inner_lr=LR, per_sample=False)
    sample = NoetherWrapper(model, emb, inner_steps=k, inner_lr=LR)
    return {
        "plain": model,
        "hand_shared": lambda x: hand_shared(model, emb, x, k),
        "shared": shared,
        "hand_dense": lambda x: hand_dense(model, emb, x, k),
        "hand_floor": lambda x: hand_floor(model, emb, x, k),
        "per_sample": sample,
    }


def check(device: str) -> float:
    """The largest difference between the wrapper's per-sample training step and the two
    hand-written ones (outputs and outer gradients, float64, on ``device``)."""
    model, emb, x0, target = build(8, 5, device)
    model.double()
    emb.double()
    x0, target = x0.double(), target.double()
    params = [*model.parameters(), *emb.parameters()]
    worst = 0.0
    for k, hand in itertools.product((1, 2), (hand_dense, hand_floor)):
        ours = NoetherWrapper(model, emb, inner_steps=k, inner_lr=LR)(x0)
        ref = hand(model, emb, x0, k)
        g_ours = torch.autograd.grad(((ours - target) ** 2).mean(), params)
        g_ref = torch.autograd.grad(((ref - target) ** 2).mean(), params)
        worst = max(worst, float((ours - ref).abs().max()))
        worst = max(worst, *(float((a - b).abs().max()) for a, b in zip(g_ours, g_ref)))
    return worst


def time_step(fn: Callable[[Tensor], Tensor], x: Tensor, target: Tensor, params: list[Tensor],
              device: str) -> float:  # fmt: skip
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = ((fn(x) - target) ** 2).mean()
    loss.backward()
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for p in params:
        p.grad = None
    return seconds


def time_cell(horizon: int, batch: int, k: int, reps: int, device: str) -> dict[str, list[float]]:
    model, emb, x, target = build(batch, horizon, device)
    table = methods(model, emb, k)
    params = [*model.parameters(), *emb.parameters()]
    times: dict[str, list[float]] = {n: [] for n in table}
    for fn in table.values():  # warm-up
        time_step(fn, x, target, params, device)
    for _ in range(reps):
        for name, fn in table.items():
            times[name].append(time_step(fn, x, target, params, device))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one small cell, for the tests")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--reps", type=int, default=7)
    protocol.add_threads_argument(parser)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    protocol.set_threads(args.threads)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    error = check(args.device)
    print(
        f"per-sample wrapper vs the hand-written per-sample step on {args.device}, float64: "
        f"max |difference| {error:.2e} (outputs and gradients)"
    )
    grid = [(10, 16, 1)] if args.quick else list(itertools.product((10, 30), (16, 64, 256), (1, 2)))
    reps = 2 if args.quick else args.reps
    cells: list[dict[str, Any]] = []
    print(f"{'T':>3} {'B':>4} {'k':>2}  " + "  ".join(f"{m:>17}" for m in
          ("shared", "hand_floor", "per_sample")) + "  per_sample/hand_floor")  # fmt: skip
    for horizon, batch, k in grid:
        times = time_cell(horizon, batch, k, reps, args.device)
        med = {n: statistics.median(v) for n, v in times.items()}
        cell = {"T": horizon, "B": batch, "k": k, "seconds": times, "median": med}
        cells.append(cell)
        shown = "  ".join(
            f"{med[m] / med['plain']:6.1f} / {med[m] / med['hand_shared']:5.2f}"
            for m in ("shared", "hand_floor", "per_sample")
        )
        print(f"{horizon:>3} {batch:>4} {k:>2}  {shown}   "
              f"{med['per_sample'] / med['hand_floor']:.2f}", flush=True)  # fmt: skip
    print("(each method: ×plain / ×hand_shared, medians)")
    seconds = time.perf_counter() - start
    report = {"benchmark": "field", "device": args.device, "check_max_abs_diff": error,
              "threads": args.threads, "cells": cells, "seconds": seconds,
              "provenance": protocol.provenance(seconds)}  # fmt: skip
    if args.device != "cpu":
        report["device_name"] = torch.cuda.get_device_name()
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(protocol.json_text(report))


if __name__ == "__main__":
    main()
