"""Ready torch modules for the Transformer-PSM (`examples/tpsm.psm`): its `enc`, `agg` and `inf`.

Yau et al. (2025) build a prefix-scannable Transformer from three small transformers over chunks
of C tokens, each state being C vectors of width D:

- `ChunkEncoder` (Enc): a chunk's tokens -> its state, full attention inside the chunk;
- `ChunkAggregator` (Agg): two states -> one, attending over the 2C vectors of both and keeping
  the right half (so, with the residual stream, "the newer state, updated by the older one");
- `ChunkReadout` (Inf): the prefix state and the chunk's tokens -> one output per token; a token
  attends to every state vector and, causally, to the tokens of its chunk up to itself. State
  vectors attend only to state vectors, so nothing flows from a later token to an earlier one:
  streaming can emit a token's output before its chunk is complete.

`tpsm_modules(C, D)` gives the three, ready for `op.bind(**tpsm_modules(C, D))`. Every module
takes and returns tensors of shape (N, C, D), N being the flattened batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm x), then x + MLP(norm x)."""

    def __init__(self, d: int, heads: int, mlp: int = 2):
        super().__init__()
        if d % heads:
            raise ValueError(f"width {d} is not a multiple of {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp * d), nn.GELU(), nn.Linear(mlp * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, L, D); mask: (L, L) bool, True where a query may attend to a key."""
        N, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(N, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(N, L, D))
        return x + self.mlp(self.norm2(x))


class _Stack(nn.Module):
    def __init__(self, d: int, heads: int, layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x, mask=None):
        for b in self.blocks:
            x = b(x, mask)
        return self.norm(x)


def _embedding(n: int, d: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, d) / math.sqrt(d))


class ChunkEncoder(nn.Module):
    """Enc: (N, C, D) tokens of a chunk -> (N, C, D) state; full attention within the chunk."""

    def __init__(self, C: int, D: int, heads: int = 4, layers: int = 1):
        super().__init__()
        self.pos = _embedding(C, D)
        self.stack = _Stack(D, heads, layers)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.stack(u + self.pos)


class ChunkAggregator(nn.Module):
    """Agg: states l, r (N, C, D) -> (N, C, D): attention over [l; r], the right half kept."""

    def __init__(self, C: int, D: int, heads: int = 4, layers: int = 1):
        super().__init__()
        self.C = C
        self.side = _embedding(2, D)  # which operand a vector comes from: the order matters
        self.stack = _Stack(D, heads, layers)

    def forward(self, l: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        x = torch.cat([l + self.side[0], r + self.side[1]], dim=1)
        return self.stack(x)[:, self.C:]


class ChunkReadout(nn.Module):
    """Inf: prefix state s and chunk tokens u (N, C, D) -> (N, C, D) outputs, causal in u."""

    def __init__(self, C: int, D: int, heads: int = 4, layers: int = 1):
        super().__init__()
        self.C = C
        self.pos = _embedding(C, D)
        self.side = _embedding(2, D)
        self.stack = _Stack(D, heads, layers)
        allowed = torch.zeros(2 * C, 2 * C, dtype=torch.bool)
        allowed[:C, :C] = True  # state vectors see the state only
        allowed[C:, :C] = True  # tokens see the whole state ...
        allowed[C:, C:] = torch.ones(C, C, dtype=torch.bool).tril()  # ... and earlier tokens
        self.register_buffer("mask", allowed, persistent=False)

    def forward(self, s: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        x = torch.cat([s + self.side[0], u + self.pos + self.side[1]], dim=1)
        return self.stack(x, self.mask)[:, self.C:]


def tpsm_modules(C: int, D: int, heads: int = 4, layers: int = 1) -> dict[str, nn.Module]:
    """`enc`, `agg` and `inf` for `op tpsm[C, D]`: `op.bind(**tpsm_modules(C, D))`."""
    return {"enc": ChunkEncoder(C, D, heads, layers), "agg": ChunkAggregator(C, D, heads, layers),
            "inf": ChunkReadout(C, D, heads, layers)}


__all__ = ["Block", "ChunkEncoder", "ChunkAggregator", "ChunkReadout", "tpsm_modules"]
