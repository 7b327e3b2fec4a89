"""Shared test utilities: random inputs drawn in an op's declared ranges, small example dims."""

from __future__ import annotations

import math
from pathlib import Path

import torch

import psmc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Small static dims so the loop oracles stay fast; every example keeps its structure.
SMALL_DIMS = {
    "gla": {"K": 4, "V": 3}, "mlstm": {"K": 4, "V": 3}, "softmax_attn": {"D": 5},
    "affine": {"N": 3}, "nonassoc_mix": {"D": 3}, "softmax_agg": {"D": 4}, "tpsm": {"C": 4, "D": 3},
}


def example_op(name: str, **dims) -> psmc.PsmOp:
    """The op of examples/<name>.psm at small dims (or the given ones)."""
    dims = dims or SMALL_DIMS.get(name, {})
    return psmc.compile_file(EXAMPLES / f"{name}.psm", **dims)[name]


def random_inputs(op: psmc.PsmOp, batch: tuple[int, ...], T: int, dtype=torch.float64,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs (*batch, T, *shape) drawn uniformly in each declared range ([-1, 1] by default)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for f in op.ir.inputs:
        shape = tuple(batch) + (T,) + f.type.shape
        if f.type.dtype in ("i32", "i64"):
            lo, hi = f.range or (-5, 5)
            out[f.name] = torch.randint(int(lo), int(hi) + 1, shape, generator=g,
                                        dtype=torch.int32 if f.type.dtype == "i32" else torch.int64)
        elif f.type.dtype == "bool":
            out[f.name] = torch.rand(shape, generator=g) > 0.5
        else:
            lo, hi = f.range or (-1.0, 1.0)
            lo, hi = max(lo, -10.0) if math.isinf(lo) else lo, min(hi, 10.0) if math.isinf(hi) else hi
            out[f.name] = (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    return out


def as_tuple(y) -> tuple:
    return y if isinstance(y, tuple) else (y,)


def max_rel_error(got, want) -> float:
    """max |got - want| / (1 + |want|), NaNs counted as infinitely wrong."""
    got, want = got.double(), want.double()
    if torch.isnan(got).any() or torch.isnan(want).any():
        return math.inf
    return ((got - want).abs() / (1 + want.abs())).max().item() if got.numel() else 0.0
