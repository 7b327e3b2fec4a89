"""The Triton path of `PsmOp.forward`: generated kernels, cached on disk, called on prepared inputs.

`run` is called by runtime.PsmOp.forward with validated inputs. It returns None to let the torch
path run instead (only when not strict: `backend="auto"` on CUDA tensors), or what forward returns.
CUDA tensors run compiled kernels; CPU tensors run the same kernels under Triton's interpreter
(`backend="triton"` on CPU, which is how CI runs them).
"""

from __future__ import annotations

import contextlib
from types import ModuleType

import torch

from . import __version__, cache, ir
from .errors import PsmCallError
from .codegen import triton as triton_codegen


_MODULES: dict[tuple[int, bool], tuple[ir.Op, ModuleType]] = {}


def module(op: ir.Op, interpret: bool) -> ModuleType:
    """The generated module of `op` (from the on-disk cache), compiled or interpreted."""
    hit = _MODULES.get((id(op), interpret))
    if hit is not None and hit[0] is op:
        return hit[1]
    path = cache.module_file(op, "triton", lambda: triton_codegen.generate_module(op, __version__))
    mod = cache.load(path, interpret=interpret)
    _MODULES[(id(op), interpret)] = (op, mod)
    return mod


def why_not(psm, p) -> str | None:
    """Why the Triton path cannot take this call, or None."""
    op = psm.ir
    if not psm.associative:
        return "it is not associative (the tree backend runs non-associative ops)"
    why = triton_codegen.unsupported(op)
    if why:
        return why
    if p.device.type not in ("cuda", "cpu"):
        return f"tensors on {p.device.type} (Triton runs CUDA tensors, or CPU ones interpreted)"
    if triton_codegen.strategy(op) != "scan":
        return "its state is too large for strategy scan and recurrent is not generated yet"
    return None


def _needs_grad(p) -> bool:
    return torch.is_grad_enabled() and any(
        t.requires_grad for t in p.raw.values() if t.is_floating_point())


@contextlib.contextmanager
def _quiet(interpret: bool):
    """The interpreter evaluates both sides of every `tl.where` in numpy; the untaken side's
    overflow or log(0) warnings say nothing about the result, so they are silenced there."""
    if not interpret:
        yield
        return
    import numpy as np

    with np.errstate(all="ignore"):
        yield


def run(psm, p, initial, return_state: bool, strict: bool):
    from .runtime import StreamState

    why = why_not(psm, p)
    if why is None and _needs_grad(p):
        why = "gradients are needed and the derived backward is not generated for this op yet"
    if why is not None:
        if strict:
            raise PsmCallError(f"{psm.name}: backend='triton' cannot run this op: {why}")
        return None
    if initial is not None and (initial.prefix is None or initial.pending):
        raise PsmCallError(f"{psm.name}: initial_state does not belong to an associative op")
    interpret = p.device.type != "cuda"
    launcher = getattr(module(psm.ir, interpret), f"{psm.name}_scan")
    with _quiet(interpret):
        outs, final, _ = launcher(p.raw, initial=initial.prefix if initial is not None else None,
                               want_final=return_state, acc_dtype=p.float_dtype,
                               out_dtype=p.out_dtype)
    out = outs[0] if len(outs) == 1 else tuple(outs)
    if not return_state:
        return out
    tokens = (initial.tokens if initial is not None else 0) + p.T
    return out, StreamState(p.batch_shape, tokens=tokens, prefix=final)
