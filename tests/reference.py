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
    cap: float | None = None,
    momentum: float | None = None,
) -> Tensor:
    """Tailored predictions ``(batch, horizon, d)``, differentiable in every argument.

    ``momentum`` β: the heavy ball, ``θ_{t+1} = θ_t − η_t ∇L_t + β (θ_t − θ_{t−1})``.

    ``rule="polyak"``: each step is ``lr * L / |grad L|^2`` along the gradient (``L`` the
    sequence's loss, or the batch mean for a shared step); with ``cap``, at most
    ``cap * |model| / |grad L|``, so the step moves the parameters by at most ``cap`` times
    their untailored norm."""
    lr = log_lr.exp()
    norm = torch.sqrt(sum((p**2).sum() for p in model))

    def size(loss: Tensor, grads: list[Tensor]) -> Tensor:
        if rule == "fixed":
            return lr
        squared = sum((g * g).sum() for g in grads)
        eta = lr * loss / squared
        if cap is not None and eta * squared.sqrt() > cap * norm:
            eta = cap * norm / squared.sqrt()
        return eta

    if per_sample:
        outs = []
        for b in range(x0.shape[0]):
            params, before = list(model), list(model)
            for _ in range(steps):
                loss = sequence_loss(emb, x0[b], rollout(params, x0[b], horizon), form)
                grads = list(torch.autograd.grad(loss, params, create_graph=True))
                eta = size(loss, grads)
                params, before = (
                    [
                        p - eta * g + (momentum or 0.0) * (p - q)
                        for p, g, q in zip(params, grads, before)
                    ],
                    params,
                )
            outs.append(torch.stack(rollout(params, x0[b], horizon)))
        return torch.stack(outs)
    params, before = list(model), list(model)
    for _ in range(steps):
        losses = [
            sequence_loss(emb, x0[b], rollout(params, x0[b], horizon), form)
            for b in range(x0.shape[0])
        ]
        mean = torch.stack(losses).mean()
        grads = list(torch.autograd.grad(mean, params, create_graph=True))
        eta = size(mean, grads)
        params, before = (
            [p - eta * g + (momentum or 0.0) * (p - q) for p, g, q in zip(params, grads, before)],
            params,
        )
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


def gru_cell(params: list[Tensor], x: Tensor, h: Tensor) -> Tensor:
    """One step of a one-layer GRU, written out (torch's gate order r, z, n):
    ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(…)``, ``n = tanh(W_in x + b_in + r (W_hn h
    + b_hn))``, ``h' = (1 - z) n + z h``; ``params = [w_ih, w_hh, b_ih, b_hh]``."""
    w_ih, w_hh, b_ih, b_hh = params
    xr, xz, xn = (w_ih @ x + b_ih).chunk(3)
    hr, hz, hn = (w_hh @ h + b_hh).chunk(3)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def lstm_cell(
    params: list[Tensor], x: Tensor, state: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """One step of a one-layer LSTM, written out (torch's gate order i, f, g, o):
    ``c' = f c + i g``, ``h' = o tanh(c')``; returns ``(h', c')``."""
    w_ih, w_hh, b_ih, b_hh = params
    h, c = state
    i, f, g, o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def seq2seq_affine_reference(
    cell: str,
    encoder: list[Tensor],
    decoder: list[Tensor],
    head: list[Tensor],
    emb: list[Tensor],
    log_lr: Tensor,
    frames: Tensor,
    *,
    horizon: int,
    steps: int,
) -> Tensor:
    """Per-sequence tailoring of a scale and shift on a recurrent decoder's output, anchor loss,
    in a plain loop: ``(batch, horizon, d)``, differentiable in every argument.

    The model: an encoder RNN (``cell`` ``"gru"`` or ``"lstm"``, zero initial state) reads the
    frames ``(batch, r, d)``; from the last frame ``x`` a decoder RNN of the same kind steps
    ``horizon`` times, ``o, state = decoder(x, state)``, ``x = x + W_head ((1 + scale) o +
    shift) + b_head``, each new ``x`` a prediction. The affine scales the decoder's output only,
    not the state it passes on. The anchor is the last frame; ``emb`` is :func:`mlp`'s."""
    lr = log_lr.exp()
    width = decoder[1].shape[1]  # w_hh: (gates * H, H)
    w_head, b_head = head

    def step(params: list[Tensor], x: Tensor, state: object) -> tuple[Tensor, object]:
        if cell == "gru":
            h = gru_cell(params, x, state)  # type: ignore[arg-type]
            return h, h
        h, c = lstm_cell(params, x, state)  # type: ignore[arg-type]
        return h, (h, c)

    outs = []
    for b in range(frames.shape[0]):
        zero = frames.new_zeros(width)
        state: object = zero if cell == "gru" else (zero, zero)
        for frame in frames[b]:
            _, state = step(encoder, frame, state)
        encoded = state

        def roll(s: Tensor, t: Tensor, b: int = b, encoded: object = encoded) -> list[Tensor]:
            states, x, memory = [], frames[b, -1], encoded
            for _ in range(horizon):
                out, memory = step(decoder, x, memory)
                x = x + w_head @ ((1 + s) * out + t) + b_head
                states.append(x)
            return states

        scale = frames.new_zeros(width, requires_grad=True)
        shift = frames.new_zeros(width, requires_grad=True)
        for _ in range(steps):
            loss = sequence_loss(emb, frames[b, -1], roll(scale, shift), "anchor")
            gs, gt = torch.autograd.grad(loss, (scale, shift), create_graph=True)
            scale, shift = scale - lr * gs, shift - lr * gt
        outs.append(torch.stack(roll(scale, shift)))
    return torch.stack(outs)
