"""Video prediction from raw pixels: a ball on a spring, tailored with a conv embedding over frame
pairs (the paper's main setting), on rendered physics with an exactly known energy.

    python experiments/video.py                     # data seed 0, 2 model seeds
    python experiments/video.py --seeds 3 --json runs/video.json --plot runs/video.png
    python experiments/video.py --quick             # smoke run for tests

Clips: 32x32 grayscale frames of a soft Gaussian ball on a frictionless 2-D spring,
E = |v|^2 / 2 + k |x|^2 / 2, random initial conditions with a spread of energies. 2 observed
frames, T = 10 predicted frames. The predictor is a small conv encoder-decoder that reads the last
two frames and predicts the next one as a residual, clamped to [0, 1] in the forward pass with the
gradient passed straight through; it is rolled out autoregressively (time at dim 1).

Rows, on the protocol of experiments/protocol.py (docs/video.md): vanilla (teacher forcing, then
rollout training); control (vanilla trained further for as many steps, on the same batches, as
the meta rows); testtime_oracle (vanilla tailored at prediction time with g = the ball's energy
from a thresholded intensity centroid) and testtime_learned (g a ConvEmbedding over frame pairs,
pretrained with fit_conserved on the training clips); meta_learned_frozen (g and the step
meta-trained, the predictor frozen) and meta_learned (joint, as the paper), each also untailored;
expert_physics (what a physicist writes first: the ball's position read off the two observed
frames, the known spring law solved exactly, the ball rendered where it says: the ceiling, not a
competitor on equal terms).
Every step size is chosen by tune_inner_lr on validation clips carved from the training set (used
for nothing else); ``selected`` is the Noether row with the lowest validation error.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from noether_experiments import protocol
from noether_wrap import NoetherWrapper, Rollout, TuneResult, fit_conserved, tune_inner_lr
from noether_wrap.embeddings import ConvEmbedding, Standardized

SIZE, OBSERVED, HORIZON, DT, K_SPRING, SIGMA = 32, 2, 10, 0.15, 1.0, 3.0
CANDIDATES = (0.1, 0.316, 1.0, 3.16, 10.0)


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


class SpringExpert(nn.Module):
    """What a physicist writes first: read the ball's position off each observed frame (the
    intensity-weighted centroid, no threshold), solve the known spring law exactly from the two
    observed positions (x(t) = x0 cos(wt) + (v0 / w) sin(wt), so x(DT) fixes v0), and render the
    ball where the law puts it. It knows the law, k and the renderer, and learns nothing: the
    ceiling a learned predictor of this toy world is measured against, not a competitor on
    equal terms (a real video has no exact law or renderer to call)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("grid", torch.linspace(-1, 1, SIZE))

    def position(self, frame: Tensor) -> Tensor:  # (..., 1, H, W) -> (..., 2)
        w = frame[..., 0, :, :]
        mass = w.sum(dim=(-2, -1)).clamp_min(1e-6)
        x = (w.sum(-2) * self.grid).sum(-1) / mass
        y = (w.sum(-1) * self.grid).sum(-1) / mass
        return torch.stack([x, y], -1)

    def forward(self, frames: Tensor) -> Tensor:  # (B, 2, 1, H, W) -> (B, HORIZON, 1, H, W)
        omega = math.sqrt(K_SPRING)
        x0, x1 = self.position(frames[:, 0]), self.position(frames[:, 1])
        v0 = omega * (x1 - x0 * math.cos(omega * DT)) / math.sin(omega * DT)  # (v0 / w) * w
        t = DT * torch.arange(OBSERVED, OBSERVED + HORIZON, dtype=frames.dtype)[:, None]
        pos = x0[:, None] * torch.cos(omega * t) + (v0[:, None] / omega) * torch.sin(omega * t)
        return render(pos)


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


def wrap(step: nn.Module, g: nn.Module, inner_lr: float, learn: bool = False) -> NoetherWrapper:
    """One step on a 3-step inner horizon; the inner gradient clipped to 1e-3 per clip, so every
    step moves the weights by ``inner_lr * 1e-3`` (a normalised step)."""
    return NoetherWrapper(
        Rollout(step, HORIZON, context=2),
        g,
        inner_steps=1,
        inner_lr=inner_lr,
        learn_inner_lr=learn,
        window=2,
        inner_horizon=3,
        max_inner_grad_norm=1e-3,
    )


# --- training and metrics ----------------------------------------------------------------------


@dataclass
class Settings:
    teacher: int
    rollout: int
    meta: int
    batch: int
    lr: float
    g_steps: int


#: Training steps skipped for a non-finite outer gradient, by run.
skipped: dict[str, int] = {}


def train(
    net: nn.Module,
    groups: list[list[nn.Parameter]],
    clips: Clips,
    steps: int,
    cfg: Settings,
    seed: int,
    desc: str,
    teacher: bool = False,
) -> float:
    """Adam on the frame MSE (teacher forcing or full rollouts) over ``groups`` (lists of
    ``net``'s parameters, :func:`clip_groups`); s per step. Batches come from a generator seeded
    with ``seed``: rows given the same seed see the same batches.

    Only the parameters being optimised are clipped (each group to norm 1) and checked for a
    non-finite gradient: a frozen predictor's gradient, which backward still fills, is cleared
    every step and enters neither the norm nor the skip."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for group in groups for p in group], lr=cfg.lr)
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
        net.zero_grad(set_to_none=True)  # every parameter, optimised or not
        loss.backward()
        norms = [nn.utils.clip_grad_norm_(group, 1.0) for group in groups]
        if not all(torch.isfinite(n) for n in norms):  # an exploding gradient: skip, say so
            skipped[desc] = skipped.get(desc, 0) + 1
            continue
        opt.step()
    return (time.perf_counter() - start) / max(steps, 1)


def predict(net: nn.Module, clips: Clips, chunk: int = 32) -> Tensor:
    outs = []
    with torch.no_grad():
        for i in range(0, clips.frames.shape[0], chunk):
            outs.append(net(clips.frames[i : i + chunk, :OBSERVED]))
    return torch.cat(outs)


def tune(net: NoetherWrapper, valid: Clips) -> TuneResult:
    """``tune_inner_lr`` on the validation clips, "off" always a candidate; the grid is the
    wrapper's rule's."""
    frames = valid.frames
    candidates = CANDIDATES if net.step_rule == "fixed" else None
    result = tune_inner_lr(
        net, frames[:, :OBSERVED], frames[:, OBSERVED:], candidates=candidates, chunk=32
    )
    return result


def per_clip(pred: Tensor, clips: Clips) -> tuple[np.ndarray, dict[str, Any]]:
    truth = clips.frames[:, OBSERVED:]
    err = (pred - truth).pow(2)
    return err.mean(dim=(1, 2, 3, 4)).double().numpy(), {
        "mse_last": float(err[:, -1].mean()),
        "mse_per_step": err.mean(dim=(0, 2, 3, 4)).tolist(),
        "ssim": float(ssim(pred, truth).mean()),
        "blank": bool(pred[:, -1].amax(dim=(-3, -2, -1)).min() < 0.2),
        "finite": bool(torch.isfinite(pred).all()),
    }


def embedding_metrics(g: nn.Module, clips: Clips, r_init: float | None) -> dict[str, Any]:
    """|r| between g (averaged over a clip's windows) and the clip's energy, and g's within-clip
    variance fraction, on the true test clips (scalar g)."""
    frames = clips.frames
    pairs = torch.cat([frames[:, :-1], frames[:, 1:]], dim=2)  # (n, T - 1, 2, H, W)
    with torch.no_grad():
        codes = g(pairs.flatten(0, 1)).reshape(frames.shape[0], -1)
    return {
        "abs_r": protocol.pearson(codes.mean(1), clips.energy),
        "abs_r_init": r_init,
        "within_var_frac": protocol.within_var_frac(codes),
        "grad_cos": None,
    }


def run_seed(seed: int, train_clips: Clips, valid: Clips, test: Clips, cfg: Settings) -> dict:  # type: ignore[type-arg]
    torch.manual_seed(seed)
    out = protocol.new_run()

    def score(row: str, net: nn.Module) -> None:
        pred = predict(net, test)
        out["pred"][row] = pred
        out["err"][row], out["extra"][row] = per_clip(pred, test)

    step = FramePredictor()
    train(
        step,
        protocol.clip_groups(step),
        train_clips,
        cfg.teacher,
        cfg,
        seed,
        f"seed {seed} teacher",
        True,
    )
    vanilla = Rollout(step, HORIZON, context=2)
    train(
        vanilla,
        protocol.clip_groups(vanilla),
        train_clips,
        cfg.rollout,
        cfg,
        seed + 1,
        f"seed {seed} vanilla",
    )
    score("vanilla", vanilla)
    control = copy.deepcopy(vanilla)
    train(
        control,
        protocol.clip_groups(control),
        train_clips,
        cfg.meta,
        cfg,
        seed + 2,
        f"seed {seed} control",
    )
    score("control", control)
    score("expert_physics", SpringExpert())

    oracle = Standardized.fit(CentroidEnergy(), train_clips.frames, window=2)
    torch.manual_seed(seed)
    raw = ConvEmbedding(1, window=2, out_features=1, hidden=16)
    r_init = embedding_metrics(raw, test, None)["abs_r"]
    learned = fit_conserved(
        raw, train_clips.frames, window=2, steps=cfg.g_steps, batch=32, progress=False
    ).embedding
    out["g"]["testtime_learned"] = (learned, r_init)
    for name, g in (("oracle", oracle), ("learned", learned)):
        protocol.tailoring_rows(
            out, name, lambda lr, g=g: wrap(copy.deepcopy(step), g, lr),
            lambda net: tune(net, valid), score, fixed_step=1.0, untailored="vanilla",
        )  # fmt: skip

    row = "meta_learned_frozen"
    net = wrap(copy.deepcopy(step), copy.deepcopy(learned), out["start"]["testtime_learned"], True)
    # only g and the step optimised, clipped and checked; the predictor frozen
    train(net, [list(net.tailoring_parameters())], train_clips, cfg.meta, cfg, seed + 2, row)
    protocol.record_tuning(out, row, tune(net, valid))
    score(row, net)
    score(f"{row}_untailored", net.model)
    out["g"][row] = (net.embedding, r_init)
    row = "meta_learned"
    net = wrap(copy.deepcopy(step), copy.deepcopy(learned), out["start"]["testtime_learned"], True)
    # the predictor clipped on its own as control's is, g on its own: comparable predictor steps
    out["seconds"] = train(
        net, protocol.clip_groups(net), train_clips, cfg.meta, cfg, seed + 2, row
    )
    protocol.record_tuning(out, row, tune(net, valid))
    score(row, net)
    score(f"{row}_untailored", net.model)
    out["g"][row] = (net.embedding, r_init)
    return out


def plot(run: dict[str, Any], clips: Clips, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds = run["pred"]
    rows = [
        r for r in ("vanilla", "control", "testtime_oracle", "testtime_learned", "meta_learned")
    ]
    k = int(torch.argmax(clips.energy))  # the most energetic test clip: the hardest
    steps = [0, 2, 4, 6, 9]
    names = ["truth", *rows]
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
    for name in rows:
        ax.plot(range(1, HORIZON + 1), run["extra"][name]["mse_per_step"], label=name)
    ax.set_xlabel("predicted frame")
    ax.set_ylabel("frame MSE")
    ax.legend(fontsize=7)
    protocol.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    protocol.add_run_arguments(parser)
    args = parser.parse_args()
    seeds, data_seeds = protocol.run_seeds(args)
    start = time.perf_counter()
    quick = args.quick
    cfg = Settings(
        teacher=20 if quick else 1500,
        rollout=5 if quick else 300,
        meta=3 if quick else 300,
        batch=16,
        lr=1e-3,
        g_steps=10 if quick else 300,
    )
    runs = []
    for data_seed in data_seeds:
        gen = torch.Generator().manual_seed(data_seed)
        train_clips = make_clips(64 if quick else 1024, gen)
        test_clips = make_clips(16 if quick else 256, gen)
        n_valid = 16 if quick else 128
        valid = Clips(train_clips.frames[-n_valid:], train_clips.energy[-n_valid:])
        fit_clips = Clips(train_clips.frames[:-n_valid], train_clips.energy[:-n_valid])
        for s in seeds:
            run = run_seed(s, fit_clips, valid, test_clips, cfg)
            run["test"] = test_clips
            run["data_seed"] = data_seed
            runs.append(run)
    names = list(runs[0]["err"])
    extras: dict[str, dict[str, Any]] = {}
    for row in names:
        per_seed = [r["extra"][row] for r in runs]
        extras[row] = {
            "mse_last": statistics.fmean(e["mse_last"] for e in per_seed),
            "mse_last_per_seed": [e["mse_last"] for e in per_seed],
            "mse_last_to_control_per_seed": [
                e["mse_last"] / r["extra"]["control"]["mse_last"] for e, r in zip(per_seed, runs)
            ],
            "ssim": statistics.fmean(e["ssim"] for e in per_seed),
            "ssim_per_seed": [e["ssim"] for e in per_seed],
            "blank_or_nan": any(e["blank"] or not e["finite"] for e in per_seed),
        }
    rows, inner_lr, selected = protocol.summarise_runs(runs, extras)
    embeddings: dict[str, dict[str, Any]] = {}
    for row in runs[0]["g"]:
        metrics = [embedding_metrics(r["g"][row][0], r["test"], r["g"][row][1]) for r in runs]
        embeddings[row] = {
            k: None if metrics[0][k] is None else statistics.fmean(m[k] for m in metrics)
            for k in metrics[0]
        }
    report = protocol.base_report(
        "video", runs, rows, inner_lr, selected, seeds=seeds, data_seeds=data_seeds, start=start,
        metric="RMSE over the 10 predicted frames of the test clips", embeddings=embeddings,
        threads=args.threads,
    )  # fmt: skip
    report["seconds_per_meta_step"] = statistics.fmean(r["seconds"] for r in runs)
    report["skipped_steps"] = dict(skipped)
    protocol.print_table(
        f"ball on a spring, {runs[0]['test'].frames.shape[0]} test clips, data seeds "
        f"{data_seeds}, model seeds {seeds}; ratios to vanilla, 95% nested bootstrap",
        rows,
        inner_lr=inner_lr,
        selected=selected,
        extra_columns=[("mse_last", "last MSE", ".5f"), ("ssim", "SSIM", ".3f")],
    )
    for row, m in embeddings.items():
        print(
            f"g {row:<22} |r(g,E)| {m['abs_r']:.3f} (init {m['abs_r_init']:.3f})  within-clip "
            f"var {m['within_var_frac']:.4f}"
        )
    bad = [row for row in names if rows[row]["blank_or_nan"]]
    print("NaN or blank-frame collapse: " + (", ".join(bad) or "none"))
    print(
        "training steps skipped for a non-finite gradient: "
        + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none")
    )
    print(f"seconds per meta-training step (meta_learned): {report['seconds_per_meta_step']:.3f}")
    if args.plot is not None:
        plot(runs[0], runs[0]["test"], args.plot)
    protocol.write_json(args.json, report)
    print(f"done in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
