"""Shared pieces of the Triton tests: the associative examples, input draws, comparisons."""

from __future__ import annotations

import dataclasses
from functools import lru_cache, partial
from pathlib import Path

import torch

import psmc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Every associative example whose state fits strategy scan.
SCAN_OPS = ["cumsum", "cummax", "logcumsumexp", "linrec", "rotation", "affine", "s5", "cumcount",
            "softmax_attn"]


@lru_cache(maxsize=None)
def load(name: str, **dims: int) -> psmc.PsmOp:
    return psmc.compile_file(EXAMPLES / f"{name}.psm", **dims)[name]


def draw(op: psmc.PsmOp, lead: tuple[int, ...], dtype=torch.float64, gen=None) -> dict[str, torch.Tensor]:
    """Inputs shaped (*lead, *field) in each input's declared range (default [-1, 1])."""
    out = {}
    for f in op.ir.inputs:
        shape = lead + f.type.shape
        if f.type.dtype in ("i32", "i64"):
            lo, hi = f.range or (-5, 5)
            out[f.name] = torch.randint(int(lo), int(hi) + 1, shape, generator=gen,
                                        dtype=torch.int32 if f.type.dtype == "i32" else torch.int64)
        else:
            lo, hi = f.range or (-1.0, 1.0)
            out[f.name] = (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(dtype)
    return out


def strided_linrec_inputs(gen: torch.Generator):
    """linrec inputs the kernels must read through their strides: `a` (3, 5, T) permuted, and two
    `b`s: batch (5,) broadcast to (3, 5), and a time stride of 2."""
    a = torch.rand(40, 3, 5, dtype=torch.float64, generator=gen).permute(1, 2, 0)
    b = torch.randn(5, 40, dtype=torch.float64, generator=gen)
    b_wide = torch.randn(3, 5, 80, dtype=torch.float64, generator=gen)[..., ::2]
    return a, (b, b_wide)


def as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def assert_close(got, want, rtol: float, atol: float, what: str = "") -> None:
    for g, w in zip(as_tuple(got), as_tuple(want)):
        assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{what}: dtype {g.dtype} != {w.dtype}"
        if g.dtype.is_floating_point:
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
        else:
            assert torch.equal(g, w), what


def grads_from_state(op, x, st, backend, final_weight=False):
    """Gradients of the inputs and of the initial state (keys `init.<field>`) of a call that
    continues from `st`, by backend; the loss weighs the outputs (and the final state)."""
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
    init = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in st.prefix.items()}
    start = dataclasses.replace(st, prefix=init)
    run = op.reference if backend == "reference" else partial(op, backend=backend)
    y, fin = run(**leaves, initial_state=start, return_state=True)
    gen = torch.Generator().manual_seed(21)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64)).sum()
               for o in as_tuple(y) if o.is_floating_point())
    if final_weight:
        loss = loss + sum((v * (i + 1.5)).sum() for i, v in enumerate(fin.prefix.values())
                          if v.is_floating_point())
    loss.backward()
    grad = {k: v for k, v in leaves.items()} | {f"init.{k}": v for k, v in init.items()}
    # a state field nothing reads (linrec's g without the final state) has no gradient: zero
    return {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in grad.items()
            if v.is_floating_point()}
