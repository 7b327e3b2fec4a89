"""Each op as a torch custom op, so `torch.compile(fullgraph=True)` traces models that call it.

Dynamo cannot trace psmc's runtime (dataclass states, data-dependent Python), so while compiling,
a plain call `op(**inputs)` goes through `psmc::<op>_<hash>`: an opaque custom op with a fake
(shape-only) implementation for tracing and an autograd formula. The backward recomputes the
forward on the same eager path under autograd, so gradients equal eager autograd's (on CUDA that
includes the derived Triton backward).
Calls with `return_state` / `initial_state` carry Python state objects and stay eager.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch

from . import ir
from .standalone import compute_dtype

_REGISTERED: dict[str, Callable] = {}


def _out_dtype(f: ir.OutputField, inputs: list[torch.Tensor]) -> torch.dtype:
    floats = [t.dtype for t in inputs if t.is_floating_point()]
    if ir.is_float(f.type.dtype):
        if f.type.dtype == "f64" or torch.float64 in floats:
            return torch.float64 if f.type.dtype == "f64" else _promote(floats)
        return _promote(floats) if floats else torch.float32
    return compute_dtype(f.type.dtype, torch.float32)


def _promote(dtypes: list[torch.dtype]) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def custom_op_for(op) -> Callable:
    """The registered custom op of a PsmOp, registered once per distinct (source, op, dims).

    Called when the PsmOp is built, outside tracing: Dynamo only ever sees the finished op.
    """
    key = hashlib.sha256(repr((op.ir.source.text, op.ir.name, op.ir.dims)).encode()).hexdigest()[:12]
    if key in _REGISTERED:
        return _REGISTERED[key]
    names = [f.name for f in op.ir.inputs]
    spec_inputs = op.ir.inputs
    lib_name = f"psmc::{op.ir.name}_{key}"

    def eager(xs: list[torch.Tensor], backend: str) -> list[torch.Tensor]:
        y = op._call(backend, dict(zip(names, xs)))  # a repeated signature: the bound kernels
        return list(y) if isinstance(y, tuple) else [y]

    @torch.library.custom_op(lib_name, mutates_args=())
    def fn(xs: list[torch.Tensor], backend: str) -> list[torch.Tensor]:
        return [y.clone() for y in eager(xs, backend)]

    @fn.register_fake
    def _(xs: list[torch.Tensor], backend: str) -> list[torch.Tensor]:
        batches, T = [], xs[0].shape[xs[0].dim() - spec_inputs[0].type.rank - 1]
        for x, f in zip(xs, spec_inputs):
            batches.append(x.shape[: x.dim() - f.type.rank - 1])
        batch = torch.broadcast_shapes(*batches)
        outs = []
        for f in op.ir.outputs:
            shape = f.type.shape[1:] if op.ir.chunk is not None else f.type.shape
            outs.append(xs[0].new_empty(tuple(batch) + (T,) + tuple(shape), dtype=_out_dtype(f, xs)))
        return outs

    def setup_context(ctx, inputs, output):
        xs, backend = inputs
        ctx.save_for_backward(*xs)
        ctx.backend = backend

    def backward(ctx, grads):
        xs = list(ctx.saved_tensors)
        with torch.enable_grad():  # re-run the eager path (Triton autograd Functions included)
            leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in xs]
            ys = eager(leaves, ctx.backend)
            pairs = [(y, g) for y, g in zip(ys, grads)
                     if y.is_floating_point() and y.requires_grad and g is not None]
            wrt = [x for x in leaves if x.requires_grad]
            gs = torch.autograd.grad([y for y, _ in pairs], wrt, [g for _, g in pairs],
                                     allow_unused=True) if pairs and wrt else [None] * len(wrt)
        it = iter(gs)
        out = [next(it) if x.requires_grad else None for x in leaves]
        return out, None

    fn.register_autograd(backward, setup_context=setup_context)
    _REGISTERED[key] = fn
    return fn
