"""Sequence models the tests and the benchmarks share: an RNN encoder-decoder and a causal
Transformer, each reading ``(batch, 6, 2)`` frames and rolling out ``(batch, 5, 2)``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Seq2Seq", "Transformer"]


class Seq2Seq(nn.Module):
    """An RNN encoder-decoder: reads (batch, 6, 2) frames, predicts (batch, 5, 2)."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.encoder = cell(2, 16, batch_first=True)
        self.decoder = cell(2, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        _, state = self.encoder(frames)
        x, outs = frames[:, -1:], []
        for _ in range(5):
            h, state = self.decoder(x, state)
            x = x + self.head(h)
            outs.append(x)
        return torch.cat(outs, dim=1)


class Transformer(nn.Module):
    """A causal, batch_first Transformer encoder that rolls out 5 frames."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        seq, outs = frames, []
        for _ in range(5):
            n = seq.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(n, dtype=seq.dtype)
            h = self.encoder(self.embed(seq), mask=mask, is_causal=True)
            nxt = seq[:, -1:] + self.head(h[:, -1:])
            outs.append(nxt)
            seq = torch.cat([seq, nxt], dim=1)
        return torch.cat(outs, dim=1)
