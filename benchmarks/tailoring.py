"""Time Noether tailoring against the hand-written limit and peer libraries; print ratios.

    python benchmarks/tailoring.py --json docs/results/tailoring.json --plot docs/img/bench.png
    python benchmarks/tailoring.py --hidden 128 --no-memory   # the issue's cells only
    python benchmarks/tailoring.py --quick         # smoke run

Methods (all on the same MLP step model rolled out T = 20 steps, float32):
  plain           the rollout alone, no tailoring
  hand            hand-written batch-shared step: functional_call + autograd.grad(create_graph=True)
  shared          NoetherWrapper(per_sample=False)
  shared_polyak   the same with step_rule="polyak"
  lowrank         NoetherWrapper(per_sample=True), exact low-rank path
  lowrank_polyak  the same with step_rule="polyak"
  affine          NoetherWrapper(adapt=Affine("step.[024]")): per-sequence scale and shift on the
                  three linear layers' outputs (CNGrad), not their weights
  vmap            NoetherWrapper(per_sample=True, per_sample_path="vmap")
  higher          higher.innerloop_ctx (batch-shared; if installed: pip install -e ".[bench]")
  torchopt        torchopt's functional sgd (batch-shared; if installed)

"train" is forward + backward of an MSE task loss; "eval" is a forward under torch.no_grad().
Repetitions are interleaved across methods; the table gives medians (and quartiles) as ratios to
``hand`` in the same configuration. Peak memory is measured in a fresh process per cell (the
increase of the resident-set high-water mark over one train step).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from noether_experiments import protocol  # provenance and the JSON writer, as every result uses
from noether_wrap import Affine, NoetherWrapper, Rollout, noether_loss
from noether_wrap.embeddings import MLPEmbedding

STATE, HORIZON, LR, GAMMA = 16, 20, 1e-2, 0.5
HAS = {name: importlib.util.find_spec(name) is not None for name in ("higher", "torchopt")}


#: Where the timing cells run (``--device``); memory is measured on the CPU only.
DEVICE = "cpu"


def build(hidden: int, batch: int, seed: int = 0) -> tuple[Rollout, nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    step = nn.Sequential(
        nn.Linear(STATE, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, STATE),
    )
    return (
        Rollout(step.to(DEVICE), HORIZON),
        MLPEmbedding(STATE, 4, hidden=32).to(DEVICE),
        torch.randn(batch, STATE, device=DEVICE),
        torch.randn(batch, HORIZON, STATE, device=DEVICE),
    )


def hand_tailor(model: nn.Module, emb: nn.Module, x0: Tensor, k: int, train: bool) -> Tensor:
    """The limit: one autograd.grad per step over a params dict, nothing else."""
    params = {n: p if train else p.detach().requires_grad_() for n, p in model.named_parameters()}
    for _ in range(k):
        with torch.enable_grad():
            loss = noether_loss(x0, functional_call(model, params, (x0,)), emb)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=train)
        params = {n: p - LR * g for (n, p), g in zip(params.items(), grads)}
        if not train:
            params = {n: p.detach().requires_grad_() for n, p in params.items()}
    out: Tensor = functional_call(model, params, (x0,))
    return out


def higher_tailor(model: nn.Module, emb: nn.Module, x0: Tensor, k: int, train: bool) -> Tensor:
    import higher

    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with (
        torch.enable_grad(),
        higher.innerloop_ctx(model, opt, copy_initial_weights=False, track_higher_grads=train) as (
            fmodel,
            diffopt,
        ),
    ):
        for _ in range(k):
            diffopt.step(noether_loss(x0, fmodel(x0), emb))
        if train:
            return fmodel(x0)  # type: ignore[no-any-return]
        with torch.no_grad():
            return fmodel(x0)  # type: ignore[no-any-return]


def torchopt_tailor(model: nn.Module, emb: nn.Module, x0: Tensor, k: int, train: bool) -> Tensor:
    import torchopt

    optimizer = torchopt.sgd(lr=LR)
    params = {n: p if train else p.detach().requires_grad_() for n, p in model.named_parameters()}
    state = optimizer.init(params)
    for _ in range(k):
        with torch.enable_grad():
            loss = noether_loss(x0, functional_call(model, params, (x0,)), emb)
            grads = dict(
                zip(params, torch.autograd.grad(loss, list(params.values()), create_graph=train))
            )
        updates, state = optimizer.update(grads, state, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
        if not train:
            params = {n: p.detach().requires_grad_() for n, p in params.items()}
    out: Tensor = functional_call(model, params, (x0,))
    return out


def methods(model: Rollout, emb: nn.Module, k: int) -> dict[str, Callable[[Tensor, bool], Tensor]]:
    nets = {
        "shared": NoetherWrapper(model, emb, inner_steps=k, inner_lr=LR, per_sample=False),
        "shared_polyak": NoetherWrapper(
            model, emb, inner_steps=k, inner_lr=GAMMA, per_sample=False, step_rule="polyak"
        ),
        "lowrank": NoetherWrapper(
            model, emb, inner_steps=k, inner_lr=LR, per_sample_path="lowrank"
        ),
        "lowrank_polyak": NoetherWrapper(
            model, emb, inner_steps=k, inner_lr=GAMMA, per_sample_path="lowrank", step_rule="polyak"
        ),
        "affine": NoetherWrapper(
            model, emb, inner_steps=k, inner_lr=LR, adapt=Affine("step.[024]")
        ),
        "vmap": NoetherWrapper(model, emb, inner_steps=k, inner_lr=LR, per_sample_path="vmap"),
    }
    table: dict[str, Callable[[Tensor, bool], Tensor]] = {
        "plain": lambda x, train: model(x),
        "hand": lambda x, train: hand_tailor(model, emb, x, k, train),
    }
    for name, net in nets.items():
        table[name] = lambda x, train, net=net: net(x)  # type: ignore[misc]
    if HAS["higher"]:
        table["higher"] = lambda x, train: higher_tailor(model, emb, x, k, train)
    if HAS["torchopt"]:
        table["torchopt"] = lambda x, train: torchopt_tailor(model, emb, x, k, train)
    return table


def run_once(
    fn: Callable[[Tensor, bool], Tensor],
    x: Tensor,
    target: Tensor,
    train: bool,
    params: list[nn.Parameter],
) -> float:
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if train:
        loss = ((fn(x, True) - target) ** 2).mean()
        loss.backward()
    else:
        with torch.no_grad():
            fn(x, False)
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for p in params:
        p.grad = None
    return seconds


def time_cell(
    hidden: int, batch: int, k: int, train: bool, reps: int, skip: set[str]
) -> dict[str, list[float]]:
    model, emb, x, target = build(hidden, batch)
    table = {n: f for n, f in methods(model, emb, k).items() if n not in skip}
    params = [*model.parameters(), *emb.parameters()]
    times: dict[str, list[float]] = {n: [] for n in table}
    warm = {name: run_once(fn, x, target, train, params) for name, fn in table.items()}
    budget = 20.0  # seconds per cell, at least 3 repetitions
    reps = max(3, min(reps, int(budget / max(sum(warm.values()), 1e-9))))
    for _ in range(reps):
        for name, fn in table.items():
            times[name].append(run_once(fn, x, target, train, params))
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def peak_memory_mb(
    method: str, hidden: int, batch: int, k: int, first_order: bool = False
) -> float:
    """Peak resident-set increase over one train step (after a warm-up), in a fresh process."""
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        method,
        str(hidden),
        str(batch),
        str(k),
        str(int(first_order)),
    ]
    # large blocks mmapped and returned on free, so the resident set follows live memory
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def memory_child(method: str, hidden: int, batch: int, k: int, first_order: bool) -> None:
    torch.set_num_threads(1)
    model, emb, x, target = build(hidden, batch)
    if first_order:
        fn = NoetherWrapper(
            model, emb, inner_steps=k, inner_lr=LR, per_sample=False, first_order=True
        )
        call: Callable[[Tensor, bool], Tensor] = lambda x, train: fn(x)  # noqa: E731
    else:
        call = methods(model, emb, k)[method]
    loss = ((call(x, True) - target) ** 2).mean()  # warm-up: allocator pools, lazy inits
    loss.backward()
    del loss
    gc.collect()
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before = resident()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    loss = ((call(x, True) - target) ** 2).mean()
    loss.backward()
    peak[0] = max(peak[0], resident())
    done.set()
    sampler.join()
    print((peak[0] - before) / 2**20)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: the timing cells")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--hidden", type=_ints, default=[128, 512], help="e.g. 128,512")
    parser.add_argument("--batch", type=_ints, default=[16, 256], help="e.g. 16,256")
    parser.add_argument("--k", type=_ints, default=[1, 3], help="inner steps, e.g. 1,3")
    parser.add_argument("--methods", default=None, help="comma-separated subset (hand always)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--memory-child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        m, h, b, k, fo = args.memory_child
        memory_child(m, int(h), int(b), int(k), bool(int(fo)))
        return
    start = time.perf_counter()
    warnings_off()
    protocol.set_threads(args.threads)
    global DEVICE
    DEVICE = args.device
    grid = list(itertools.product(args.hidden, args.batch, args.k))
    grid = [(32, 8, 1)] if args.quick else grid
    grid = [] if args.no_timing else grid
    reps = args.reps or (2 if args.quick else 7)
    wanted = None if args.methods is None else {"hand", *args.methods.split(",")}
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), {reps} interleaved repetitions; ratios = median / hand"
    )
    results: list[dict[str, object]] = []
    for hidden, batch, k in grid:
        for train in (True, False):
            skip = {"vmap"} if (batch == 256 and hidden == 512 and train and k == 3) else set()
            if wanted is not None:
                skip |= set(methods(*build(hidden, batch)[:2], k)) - wanted
            times = time_cell(hidden, batch, k, train, reps, skip)
            hand = statistics.median(times["hand"])
            row: dict[str, object] = {
                "hidden": hidden,
                "batch": batch,
                "k": k,
                "mode": "train" if train else "eval",
                "hand_ms": 1e3 * hand,
            }
            cells = []
            for name, ts in times.items():
                lo, med, hi = quartiles(ts)
                row[name] = {
                    "ratio": med / hand,
                    "q1": lo / hand,
                    "q3": hi / hand,
                    "seconds": ts,
                }
                cells.append(f"{name} {med / hand:5.2f}")
            results.append(row)
            print(
                f"h={hidden:<4} B={batch:<4} k={k} {row['mode']:<5} hand {1e3 * hand:7.1f} ms | "
                + "  ".join(cells),
                flush=True,
            )
    memory: dict[str, object] = {}
    if not args.no_memory and args.device == "cpu":
        h, b = (32, 8) if args.quick else (512, 256)
        ks = (1, 2) if args.quick else (1, 2, 4, 8)
        names = ["hand", "shared", "lowrank"] + ([] if args.quick else ["vmap"])
        memory["per_method_mb"] = {n: peak_memory_mb(n, h, b, 1) for n in names}
        memory["second_order_vs_k_mb"] = {k: peak_memory_mb("shared", h, b, k) for k in ks}
        memory["first_order_vs_k_mb"] = {k: peak_memory_mb("shared", h, b, k, True) for k in ks}
        memory["config"] = {"hidden": h, "batch": b}
        weight_copy = sum(p.numel() for p in build(h, b)[0].parameters()) * 4 * b / 2**20
        memory["one_weight_copy_per_sequence_mb"] = weight_copy
        per_method: dict[str, float] = memory["per_method_mb"]  # type: ignore[assignment]
        print(
            f"\npeak memory of one train step, MB (hidden {h}, batch {b}, k = 1): "
            + ", ".join(f"{n} {v:.0f}" for n, v in per_method.items())
            + f"; one weight copy per sequence would be {weight_copy:.0f}"
        )
        for key, label in (("second_order_vs_k_mb", "second"), ("first_order_vs_k_mb", "first")):
            curve: dict[int, float] = memory[key]  # type: ignore[assignment]
            print(f"{label} order vs k: " + ", ".join(f"k={k} {v:.0f}" for k, v in curve.items()))
    report = {
        "benchmark": "tailoring",
        "setup": {
            "state": STATE,
            "horizon": HORIZON,
            "lr": LR,
            "gamma": GAMMA,
            "reps": reps,
            "clock": "time.perf_counter (wall), repetitions interleaved across methods",
            "device": DEVICE,
            "processor": platform.processor() or platform.machine(),
        },
        "timings": results,
        "memory": memory,
        "provenance": protocol.provenance(time.perf_counter() - start),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(protocol.json_text(report))
    if args.plot and results:
        plot(results, args.plot)


def warnings_off() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, mode in zip(axes, ("train", "eval")):
        rows = [r for r in results if r["mode"] == mode]
        labels = [f"h{r['hidden']}\nB{r['batch']}\nk{r['k']}" for r in rows]
        names = [
            n for n in ("shared", "lowrank", "affine", "vmap", "higher", "torchopt") if n in rows[0]
        ]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ys = [r[name]["ratio"] if name in r else float("nan") for r in rows]  # type: ignore[index]
            ax.bar([j + i * width for j in range(len(rows))], ys, width, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], labels, fontsize=7)
        ax.set_title(f"{mode}: time / hand-written batch-shared step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
