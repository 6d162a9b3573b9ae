"""Video prediction from raw pixels: a ball on a spring, tailored with a conv embedding over frame
pairs — the paper's main setting, on rendered physics with an exactly known energy.

    python examples/video.py                     # 3 seeds, several minutes on 2 cores
    python examples/video.py --quick             # smoke run for tests
    python examples/video.py --json runs/video.json --plot runs/video.png

Clips: 32x32 grayscale frames of a soft Gaussian ball on a frictionless 2-D spring,
E = |v|^2 / 2 + k |x|^2 / 2, random initial conditions with a spread of energies. 2 observed
frames, T = 10 predicted frames. The predictor is a small conv encoder-decoder that reads the last
two frames and predicts the next one as a residual, clamped to [0, 1] in the forward pass with the
gradient passed straight through; it is rolled out autoregressively (time at dim 1).

Rows: vanilla (teacher forcing, then rollout training); control (the same extra rollout training as
the Noether rows, no tailoring); noether (a ConvEmbedding over window-2 frame pairs, meta-trained
end to end); noether_untailored (noether's weights run with inner_steps = 0: what the tailoring
step itself changes); oracle (g = the ball's energy from a differentiable intensity centroid).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from noether_wrap import NoetherWrapper, Rollout
from noether_wrap.embeddings import ConvEmbedding

SIZE, OBSERVED, HORIZON, DT, K_SPRING, SIGMA = 32, 2, 10, 0.15, 1.0, 3.0
ROWS = ["vanilla", "control", "noether", "noether_untailored", "oracle"]


# --- data --------------------------------------------------------------------------------------


def render(pos: Tensor) -> Tensor:
    """Positions ``(..., 2)`` in [-1, 1]^2 -> frames ``(..., 1, SIZE, SIZE)`` in [0, 1]."""
    grid = torch.linspace(-1, 1, SIZE)
    py = ((pos[..., 1, None] - grid) * (SIZE - 1) / 2).pow(2)  # (..., SIZE) rows
    px = ((pos[..., 0, None] - grid) * (SIZE - 1) / 2).pow(2)  # (..., SIZE) columns
    image = torch.exp(-(py[..., :, None] + px[..., None, :]) / (2 * SIGMA**2))
    return image.unsqueeze(-3)


def spring_energy(pos: Tensor, vel: Tensor) -> Tensor:
    return 0.5 * vel.pow(2).sum(-1) + 0.5 * K_SPRING * pos.pow(2).sum(-1)


@dataclass
class Clips:
    frames: Tensor  # (n, OBSERVED + HORIZON, 1, SIZE, SIZE)
    energy: Tensor  # (n,)


def make_clips(n: int, gen: torch.Generator) -> Clips:
    """Exact spring trajectories: x(t) = x0 cos(wt) + v0 / w sin(wt), amplitude at most 0.75."""
    omega = math.sqrt(K_SPRING)
    amp = 0.15 + 0.6 * torch.rand(n, generator=gen)  # a spread of energies
    phase = 2 * math.pi * torch.rand(n, 2, generator=gen)
    ratio = 0.3 + 0.7 * torch.rand(n, generator=gen)  # ellipse: second axis amplitude
    axes = torch.stack([amp, amp * ratio], -1)
    angle = 2 * math.pi * torch.rand(n, generator=gen)
    rot = torch.stack(
        [torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)],
        -2,
    )  # (n, 2, 2)
    t = DT * torch.arange(OBSERVED + HORIZON, dtype=torch.float32)
    local = axes[:, None, :] * torch.cos(omega * t[None, :, None] + phase[:, None, :])
    local_v = -omega * axes[:, None, :] * torch.sin(omega * t[None, :, None] + phase[:, None, :])
    pos = torch.einsum("nij,ntj->nti", rot, local)
    vel = torch.einsum("nij,ntj->nti", rot, local_v)
    return Clips(render(pos), spring_energy(pos[:, 0], vel[:, 0]))


# --- models ------------------------------------------------------------------------------------


class _ClampST(torch.autograd.Function):
    """Clamp to [0, 1] in the forward pass, identity gradient in the backward pass.

    Written in the torch.func-compatible style (``setup_context``, a generated vmap rule), so
    that per-sample tailoring can vmap over it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clamp(0.0, 1.0)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        return None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


class FramePredictor(nn.Module):
    """Last two frames ``(B, 2, 1, H, W)`` -> next frame ``(B, 1, H, W)``: a conv encoder-decoder
    predicting a residual on the last frame, clamped to [0, 1] with a straight-through gradient."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 1, 3, padding=1),
        )

    def forward(self, frames: Tensor) -> Tensor:
        x = frames.flatten(1, 2)  # (B, 2, H, W)
        out: Tensor = _ClampST.apply(frames[:, -1] + self.net(x))
        return out


class CentroidEnergy(nn.Module):
    """The oracle g: the spring energy from intensity-weighted centroids of two stacked frames.

    Conditioned against degraded frames: intensities below ``threshold`` are ignored and the mass
    has a floor, so a blank or smeared frame gives a bounded centroid and bounded gradients.
    """

    def __init__(self, threshold: float = 0.1, mass_floor: float = 1.0) -> None:
        super().__init__()
        self.threshold = threshold
        self.mass_floor = mass_floor
        self.register_buffer("grid", torch.linspace(-1, 1, SIZE))

    def centroid(self, frame: Tensor) -> Tensor:
        w = torch.relu(frame - self.threshold)
        mass = w.sum(dim=(-2, -1)).clamp_min(self.mass_floor)
        x = (w.sum(-2) * self.grid).sum(-1) / mass
        y = (w.sum(-1) * self.grid).sum(-1) / mass
        return torch.stack([x, y], -1)

    def forward(self, pair: Tensor) -> Tensor:  # (N, 2, H, W) -> (N,)
        first, second = self.centroid(pair[:, 0]), self.centroid(pair[:, 1])
        return spring_energy(second, (second - first) / DT)


def wrap(step: nn.Module, g: nn.Module, cfg: Settings) -> NoetherWrapper:
    return NoetherWrapper(
        Rollout(step, HORIZON, context=2),
        g,
        inner_steps=1,
        inner_lr=cfg.inner_lr,
        window=2,
        inner_horizon=3,
        max_inner_grad_norm=cfg.inner_clip,
    )


# --- training and metrics ----------------------------------------------------------------------


@dataclass
class Settings:
    teacher: int
    rollout: int
    meta: int
    batch: int
    lr: float
    g_lr: float
    inner_lr: float
    inner_clip: float


def train(
    net: nn.Module,
    clips: Clips,
    steps: int,
    cfg: Settings,
    gen: torch.Generator,
    desc: str,
    teacher: bool = False,
    g: nn.Module | None = None,
) -> float:
    """Adam on the frame MSE (teacher forcing or full rollouts); ``g`` gets its own lr."""
    g_params = {id(p) for p in g.parameters()} if g is not None else set()
    groups = [{"params": [p for p in net.parameters() if id(p) not in g_params], "lr": cfg.lr}]
    if g is not None:
        groups.append({"params": list(g.parameters()), "lr": cfg.g_lr})
    opt = torch.optim.Adam(groups)
    frames = clips.frames
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(frames.shape[0], (cfg.batch,), generator=gen)
        clip = frames[idx]
        if teacher:
            t = int(torch.randint(OBSERVED, OBSERVED + HORIZON, (1,), generator=gen))
            loss = nn.functional.mse_loss(net(clip[:, t - 2 : t]), clip[:, t])
        else:
            loss = nn.functional.mse_loss(net(clip[:, :OBSERVED]), clip[:, OBSERVED:])
        opt.zero_grad()
        loss.backward()
        norm = nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        if not torch.isfinite(norm):  # an exploding outer gradient: skip the step, say so
            skipped[desc] = skipped.get(desc, 0) + 1
            continue
        opt.step()
    return (time.perf_counter() - start) / max(steps, 1)


#: Training steps skipped for a non-finite outer gradient, by run.
skipped: dict[str, int] = {}


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """SSIM, 11x11 Gaussian window (sigma 1.5), per image: ``(..., 1, H, W)`` -> ``(...)``."""
    coords = torch.arange(11, dtype=a.dtype) - 5
    g1 = torch.exp(-coords.pow(2) / (2 * 1.5**2))
    kernel = (g1[:, None] * g1[None, :] / g1.sum() ** 2)[None, None]
    shape = a.shape[:-3]
    a, b = a.reshape(-1, 1, *a.shape[-2:]), b.reshape(-1, 1, *b.shape[-2:])

    def blur(x: Tensor) -> Tensor:
        return nn.functional.conv2d(x, kernel, padding=5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.mean(dim=(-3, -2, -1)).reshape(shape)


def predict(net: nn.Module, clips: Clips, chunk: int = 32) -> Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, clips.frames.shape[0], chunk):
            outs.append(net(clips.frames[i : i + chunk, :OBSERVED]))
    return torch.cat(outs)


def frame_metrics(pred: Tensor, clips: Clips) -> dict[str, Any]:
    truth = clips.frames[:, OBSERVED:]
    per_step = (pred - truth).pow(2).mean(dim=(0, 2, 3, 4))
    return {
        "mse": float(per_step.mean()),
        "mse_last": float(per_step[-1]),
        "mse_per_step": per_step.tolist(),
        "ssim": float(ssim(pred, truth).mean()),
        "blank": bool(pred[:, -1].amax(dim=(-3, -2, -1)).min() < 0.2),
        "finite": bool(torch.isfinite(pred).all()),
    }


def embedding_stats(g: nn.Module, clips: Clips) -> dict[str, float]:
    """|Pearson r| between g (averaged over a clip's windows) and the clip's energy, and g's
    within-clip variance fraction, on the true test clips."""
    frames = clips.frames
    pairs = torch.cat([frames[:, :-1], frames[:, 1:]], dim=2)  # (n, T - 1, 2, H, W)
    with torch.no_grad():
        values = g(pairs.flatten(0, 1))
    values = values.reshape(frames.shape[0], -1, values.shape[-1] if values.dim() > 1 else 1)
    # a vector embedding: use its first principal direction over all windows
    flat = values.reshape(-1, values.shape[-1]).double()
    centred = flat - flat.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    scalar = values.double() @ direction  # (n, windows)
    within = (scalar - scalar.mean(1, keepdim=True)).pow(2).mean()
    total = (scalar - scalar.mean()).pow(2).mean()
    per_clip = scalar.mean(1)
    e = clips.energy.double()
    a, b = per_clip - per_clip.mean(), e - e.mean()
    r = (a * b).sum() / (a.norm() * b.norm() + 1e-12)
    return {"r": abs(float(r)), "within": float(within / (total + 1e-30))}


def run_seed(seed: int, train_clips: Clips, test_clips: Clips, cfg: Settings) -> dict[str, Any]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    step = FramePredictor()
    train(step, train_clips, cfg.teacher, cfg, gen, f"seed {seed} teacher forcing", teacher=True)
    vanilla = Rollout(step, HORIZON, context=2)
    train(vanilla, train_clips, cfg.rollout, cfg, gen, f"seed {seed} vanilla rollouts")
    preds = {"vanilla": predict(vanilla, test_clips)}

    control = Rollout(copy.deepcopy(step), HORIZON, context=2)
    train(control, train_clips, cfg.meta, cfg, gen, f"seed {seed} control")
    preds["control"] = predict(control, test_clips)

    torch.manual_seed(seed)
    g = ConvEmbedding(1, window=2, out_features=8, hidden=16)
    net = wrap(copy.deepcopy(step), g, cfg)
    seconds = train(net, train_clips, cfg.meta, cfg, gen, f"seed {seed} noether", g=g)
    preds["noether"] = predict(net, test_clips)
    net.inner_steps = 0
    preds["noether_untailored"] = predict(net, test_clips)
    stats = embedding_stats(g, test_clips)

    oracle = wrap(copy.deepcopy(step), CentroidEnergy(), cfg)
    train(oracle, train_clips, cfg.meta, cfg, gen, f"seed {seed} oracle")
    preds["oracle"] = predict(oracle, test_clips)
    return {
        "metrics": {row: frame_metrics(p, test_clips) for row, p in preds.items()},
        "g": stats,
        "seconds": seconds,
        "preds": preds,
        "inner_lr": net.inner_lr,
    }


def plot(result: dict[str, Any], clips: Clips, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds = result["preds"]
    k = int(torch.argmax(clips.energy))  # the most energetic test clip: the hardest
    steps = [0, 2, 4, 6, 9]
    names = ["truth", *ROWS]
    fig = plt.figure(figsize=(1.6 * len(steps) + 4.5, 1.6 * len(names)))
    grid = fig.add_gridspec(len(names), len(steps) + 3)
    for i, name in enumerate(names):
        for j, t in enumerate(steps):
            ax = fig.add_subplot(grid[i, j])
            img = clips.frames[k, OBSERVED + t, 0] if name == "truth" else preds[name][k, t, 0]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t+{t + 1}", fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    ax = fig.add_subplot(grid[:, len(steps) :])
    for name in ROWS:
        ax.plot(range(1, HORIZON + 1), result["metrics"][name]["mse_per_step"], label=name)
    ax.set_xlabel("predicted frame")
    ax.set_ylabel("frame MSE")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None, help="number of model seeds (3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--meta-steps", type=int, default=None, help="meta-training steps (300)")
    parser.add_argument(
        "--inner-lr",
        type=float,
        default=1.0,
        help="initial inner step size; with the 1e-3 gradient clip, every inner "
        "step moves the weights by inner_lr * 1e-3",
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    quick = args.quick
    gen = torch.Generator().manual_seed(1234)
    train_clips = make_clips(64 if quick else 1024, gen)
    test_clips = make_clips(16 if quick else 256, gen)
    meta = args.meta_steps if args.meta_steps is not None else (3 if quick else 300)
    cfg = Settings(
        teacher=20 if quick else 1500,
        rollout=5 if quick else 300,
        meta=meta,
        batch=16,
        lr=1e-3,
        g_lr=1e-4,
        inner_lr=args.inner_lr,
        inner_clip=1e-3,
    )
    n_seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    seeds = list(range(args.seed, args.seed + n_seeds))
    results = []
    for s in seeds:
        results.append(run_seed(s, train_clips, test_clips, cfg))
        m = results[-1]["metrics"]
        print(
            f"seed {s}: last-step MSE " + ", ".join(f"{r} {m[r]['mse_last']:.5f}" for r in ROWS),
            flush=True,
        )

    def per(row: str, key: str) -> list[float]:
        return [r["metrics"][row][key] for r in results]

    report = {
        "mse": {row: statistics.fmean(per(row, "mse")) for row in ROWS},
        "mse_last": {row: statistics.fmean(per(row, "mse_last")) for row in ROWS},
        "mse_std": {row: float(torch.tensor(per(row, "mse")).std(unbiased=False)) for row in ROWS},
        "ssim": {row: statistics.fmean(per(row, "ssim")) for row in ROWS},
        "mse_per_step": {
            row: torch.tensor([r["metrics"][row]["mse_per_step"] for r in results]).mean(0).tolist()
            for row in ROWS
        },
        "g_energy_abs_pearson": statistics.fmean(r["g"]["r"] for r in results),
        "g_within_var_frac": statistics.fmean(r["g"]["within"] for r in results),
        "seeds": seeds,
        "seconds": 0.0,
    }
    print(
        f"\nball on a spring, {test_clips.frames.shape[0]} test clips, {len(seeds)} seed(s); "
        "ratios to vanilla"
    )
    print(f"{'row':<20}{'MSE mean ± std':>22}{'ratio':>8}{'last-step MSE':>15}{'SSIM':>8}")
    for row in ROWS:
        print(
            f"{row:<20}{report['mse'][row]:>12.5f} ± {report['mse_std'][row]:<7.5f}"
            f"{report['mse'][row] / report['mse']['vanilla']:>7.3f}×"
            f"{report['mse_last'][row]:>15.5f}{report['ssim'][row]:>8.3f}"
        )
    gains = [
        1 - a / b for a, b in zip(per("noether", "mse_last"), per("noether_untailored", "mse_last"))
    ]
    print(
        "tailoring step itself (noether vs noether_untailored), last-step MSE change per seed: "
        + ", ".join(f"{-100 * x:+.1f} %" for x in gains)
    )
    bad = [
        row
        for row in ROWS
        for r in results
        if not r["metrics"][row]["finite"] or r["metrics"][row]["blank"]
    ]
    print("NaN or blank-frame collapse: " + (", ".join(sorted(set(bad))) or "none"))
    print(
        "training steps skipped for a non-finite gradient: "
        + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none")
    )
    print(
        f"learned g: |r(g, E)| {report['g_energy_abs_pearson']:.3f}, within-clip variance "
        f"fraction {report['g_within_var_frac']:.3f}; learned step size "
        f"{statistics.fmean(r['inner_lr'] for r in results):.3g}"
    )
    print(
        f"seconds per meta-training step (noether): "
        f"{statistics.fmean(r['seconds'] for r in results):.3f}"
    )
    report["seconds"] = time.perf_counter() - start
    if args.plot is not None:
        plot(results[0], test_clips, args.plot)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    print(f"done in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
