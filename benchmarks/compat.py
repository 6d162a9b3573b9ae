"""What a wrapped training step costs against the UNWRAPPED model, for the models of
docs/compatibility.md, and the affine path against the batch-shared step.

    python benchmarks/compat.py                  # prints ratios; --json PATH keeps them
    python benchmarks/compat.py --quick          # a smoke run

Every cell: median wall time of a training step (forward, MSE backward, SGD step) over
interleaved repetitions, at k = 1, as a ratio to the unwrapped model's step on the same batch;
beside it the floor, a hand-written batch-shared inner step over every weight (``hand``).
One thread unless --threads says otherwise. The JSON keeps every repetition's seconds and the
provenance (torch version, threads, commit, command line); docs/performance.md's wrapped/unwrapped
table is generated from it by experiments/rederive.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from noether_experiments import protocol
from noether_experiments.models import Seq2Seq, Transformer
from noether_wrap import Affine, NoetherWrapper, Rollout, noether_loss
from noether_wrap._inner.call import math_attention
from noether_wrap.embeddings import MLPEmbedding


class _GRUStack(nn.Module):
    """The issue's probe: GRU(2 -> 64), Linear(64 -> 64), head; predicts 5 frames."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(2, 64, batch_first=True)
        self.middle = nn.Linear(64, 64)
        self.head = nn.Linear(64, 2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(frames)
        out: torch.Tensor = self.head(torch.tanh(self.middle(h[:, -5:])))
        return out


class _ODE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.field = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 2))
        self.register_buffer("t", torch.linspace(0, 1, 6))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        from torchdiffeq import odeint

        out = odeint(
            lambda t, x: self.field(x), x0, self.t, method="rk4", options={"step_size": 0.1}
        )
        result: torch.Tensor = out[1:].transpose(0, 1)
        return result


def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def run() -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()

    return run


class _Hand(nn.Module):
    """The floor: a hand-written batch-shared inner step over every weight (``functional_call``
    and one ``autograd.grad(create_graph=True)``, nothing else; benchmarks/tailoring.py's
    ``hand_tailor``), then the prediction with the stepped weights."""

    def __init__(self, model: nn.Module, embedding: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        x0 = x if x.dim() == 2 else x[:, -1]  # the wrapper's default reference
        with torch.enable_grad(), math_attention():  # fused attention has no double backward
            loss = noether_loss(x0, functional_call(self.model, params, (x,)), self.embedding)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            stepped = {n: p - 1e-3 * g for (n, p), g in zip(params.items(), grads)}
            out: torch.Tensor = functional_call(self.model, stepped, (x,))
        return out


def _time(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
    """Every repetition's seconds per function, repetitions interleaved across functions."""
    for fn in fns.values():
        fn()  # warm up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _median(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    protocol.set_threads(args.threads)
    warnings.simplefilter("ignore")
    reps = 3 if args.quick else 15
    report: dict[str, dict[str, object]] = {}

    def frames(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(batch, 6, 2), torch.randn(batch, 5, 2)

    recipes: list[
        tuple[str, Callable[[], nn.Module], dict[str, object], Callable[[int], tuple]]
    ] = [
        ("GRU encoder-decoder", lambda: Seq2Seq(nn.GRU), {"adapt": Affine("decoder")}, frames),
        ("LSTM encoder-decoder", lambda: Seq2Seq(nn.LSTM), {"adapt": Affine("decoder")}, frames),
        (
            "Transformer, causal, `batch_first`",
            Transformer,
            {"adapt": Affine("encoder.layers.*.linear2")},
            frames,
        ),
        (
            "MLP step with Dropout, `Rollout`",
            lambda: Rollout(
                nn.Sequential(nn.Linear(2, 64), nn.Dropout(0.1), nn.Tanh(), nn.Linear(64, 2)), 5
            ),
            {},
            lambda b: (torch.randn(b, 2), torch.randn(b, 5, 2)),
        ),
    ]
    try:
        import torchdiffeq  # noqa: F401

        recipes.append(
            (
                "torchdiffeq `odeint` (rk4), MLP field",
                _ODE,
                {},
                lambda b: (torch.randn(b, 2), torch.randn(b, 5, 2)),
            )
        )
    except ImportError:
        pass
    batch = 16
    for name, make, kwargs, data in recipes:
        torch.manual_seed(0)
        model = make()
        x, y = data(batch)
        embedding = MLPEmbedding(2)
        net = NoetherWrapper(model, embedding, inner_lr=1e-3, **kwargs)  # type: ignore[arg-type]
        steps = {
            "plain": _step(model, x, y),
            "wrapped": _step(net, x, y),
            "hand": _step(_Hand(model, embedding), x, y),
        }
        raw = _time(steps, reps)
        times = _median(raw)
        net(x)
        ratio = times["wrapped"] / times["plain"]
        adapt = kwargs.get("adapt")
        report[name] = {
            "ratio": ratio,
            "path": net.last_path,
            "adapt": f'Affine("{adapt.pattern}")' if isinstance(adapt, Affine) else "all weights",
            "batch": batch,
            "inner_steps": net.inner_steps,
            "seconds": raw,
        }
        print(
            f"{name:<40} path {net.last_path:<8} wrapped/unwrapped {ratio:.2f}  "
            f"hand-written shared/unwrapped {times['hand'] / times['plain']:.2f}"
        )

    for batch in (16, 256):
        torch.manual_seed(0)
        model = _GRUStack()
        x, y = torch.randn(batch, 12, 2), torch.randn(batch, 5, 2)
        affine = NoetherWrapper(model, MLPEmbedding(2), inner_lr=1e-3, adapt=Affine("middle"))
        shared = NoetherWrapper(model, MLPEmbedding(2), inner_lr=1e-3, per_sample=False)
        raw = _time(
            {
                "plain": _step(model, x, y),
                "affine": _step(affine, x, y),
                "shared": _step(shared, x, y),
            },
            reps,
        )
        times = _median(raw)
        cell: dict[str, object] = {
            "affine_over_shared": times["affine"] / times["shared"],
            "affine_over_plain": times["affine"] / times["plain"],
            "shared_over_plain": times["shared"] / times["plain"],
            "seconds": raw,
        }
        report[f"GRU probe B={batch}"] = cell
        print(
            f"GRU probe B={batch:<4} affine/shared {times['affine'] / times['shared']:.2f}  "
            f"affine/unwrapped {times['affine'] / times['plain']:.2f}  "
            f"shared/unwrapped {times['shared'] / times['plain']:.2f}"
        )
    if args.json is not None:
        out = {
            "benchmark": "compat",
            "threads": args.threads,
            "reps": reps,
            "models": {k: v for k, v in report.items() if not k.startswith("GRU probe")},
            "gru_probe": {k: v for k, v in report.items() if k.startswith("GRU probe")},
            "provenance": protocol.provenance(time.perf_counter() - start),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(protocol.json_text(out))


if __name__ == "__main__":
    main()
