"""A plain, per-sequence Python-loop reference of Noether tailoring, written independently of the
library: explicit MLP algebra, explicit loss sums, one ``autograd.grad`` per sequence and step."""

from __future__ import annotations

import torch
from torch import Tensor


def mlp(params: list[Tensor], x: Tensor) -> Tensor:
    """``x -> W2 tanh(W1 x + b1) + b2`` for one state ``x`` of shape ``(d,)``."""
    w1, b1, w2, b2 = params
    return w2 @ torch.tanh(w1 @ x + b1) + b2


def rollout(params: list[Tensor], x0: Tensor, horizon: int) -> list[Tensor]:
    states, x = [], x0
    for _ in range(horizon):
        x = mlp(params, x)
        states.append(x)
    return states


def sequence_loss(emb: list[Tensor], x0: Tensor, states: list[Tensor], form: str) -> Tensor:
    """``sum_t mean_j (g_j(a_t) - g_j(x_t))^2`` for one sequence."""
    total = x0.new_zeros(())
    previous = x0
    for x in states:
        anchor = x0 if form == "anchor" else previous
        total = total + ((mlp(emb, anchor) - mlp(emb, x)) ** 2).mean()
        previous = x
    return total


def tailor_reference(
    model: list[Tensor],
    emb: list[Tensor],
    log_lr: Tensor,
    x0: Tensor,
    *,
    horizon: int,
    steps: int,
    form: str = "anchor",
    per_sample: bool = True,
    rule: str = "fixed",
) -> Tensor:
    """Tailored predictions ``(batch, horizon, d)``, differentiable in every argument.

    ``rule="polyak"``: each step is ``lr * L / |grad L|^2`` along the gradient (``L`` the
    sequence's loss, or the batch mean for a shared step)."""
    lr = log_lr.exp()

    def size(loss: Tensor, grads: list[Tensor]) -> Tensor:
        if rule == "fixed":
            return lr
        return lr * loss / sum((g * g).sum() for g in grads)

    if per_sample:
        outs = []
        for b in range(x0.shape[0]):
            params = list(model)
            for _ in range(steps):
                loss = sequence_loss(emb, x0[b], rollout(params, x0[b], horizon), form)
                grads = list(torch.autograd.grad(loss, params, create_graph=True))
                eta = size(loss, grads)
                params = [p - eta * g for p, g in zip(params, grads)]
            outs.append(torch.stack(rollout(params, x0[b], horizon)))
        return torch.stack(outs)
    params = list(model)
    for _ in range(steps):
        losses = [
            sequence_loss(emb, x0[b], rollout(params, x0[b], horizon), form)
            for b in range(x0.shape[0])
        ]
        mean = torch.stack(losses).mean()
        grads = list(torch.autograd.grad(mean, params, create_graph=True))
        eta = size(mean, grads)
        params = [p - eta * g for p, g in zip(params, grads)]
    return torch.stack([torch.stack(rollout(params, x0[b], horizon)) for b in range(x0.shape[0])])


def affine_mlp(params: list[Tensor], scale: Tensor, shift: Tensor, x: Tensor) -> Tensor:
    """``x -> W2 tanh((W1 x + b1) (1 + scale) + shift) + b2``: an affine after the first layer."""
    w1, b1, w2, b2 = params
    return w2 @ torch.tanh((w1 @ x + b1) * (1 + scale) + shift) + b2


def tailor_affine_reference(
    model: list[Tensor], emb: list[Tensor], log_lr: Tensor, x0: Tensor, *, horizon: int, steps: int
) -> Tensor:
    """Per-sequence tailoring of a scale and shift after the first layer, anchor loss, in a
    plain loop: ``(batch, horizon, d)``, differentiable in every argument."""
    lr = log_lr.exp()
    width = model[0].shape[0]
    outs = []
    for b in range(x0.shape[0]):
        scale = x0.new_zeros(width, requires_grad=True)
        shift = x0.new_zeros(width, requires_grad=True)

        def roll(s: Tensor, t: Tensor, b: int = b) -> list[Tensor]:
            states, x = [], x0[b]
            for _ in range(horizon):
                x = affine_mlp(model, s, t, x)
                states.append(x)
            return states

        for _ in range(steps):
            loss = sequence_loss(emb, x0[b], roll(scale, shift), "anchor")
            gs, gt = torch.autograd.grad(loss, (scale, shift), create_graph=True)
            scale, shift = scale - lr * gs, shift - lr * gt
        outs.append(torch.stack(roll(scale, shift)))
    return torch.stack(outs)
