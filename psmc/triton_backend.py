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
from .standalone import owner
from .codegen import scalarize as S
from .codegen import triton as triton_codegen


# (BLOCK_L, BLOCK_T, num_warps) for every scan launch instead of the launcher's heuristic; tests
# set it to make blocks short, benchmarks to sweep tiles.
FORCE_CONFIG: tuple[int, int, int] | None = None

# A strategy ("scan" or "recurrent") for every op instead of psmc's choice; tests set it to run
# both strategies on small dims.
FORCE_STRATEGY: str | None = None

# Tokens per chunk for every scan launch instead of the launcher's choice between one pass and two
# (`{op}_scan(chunk_t=...)`): 0 forces one pass, n > 0 two passes over chunks of n tokens (rounded
# up to a multiple of BLOCK_T); tests set it with a small FORCE_CONFIG to run two passes on CPU.
FORCE_CHUNK_T: int | None = None

_MODULES: dict[tuple[int, bool, str | None], tuple[ir.Op, ModuleType]] = {}


def module(op: ir.Op, interpret: bool) -> ModuleType:
    """The generated module of `op` (from the on-disk cache), compiled or interpreted."""
    force = FORCE_STRATEGY
    hit = _MODULES.get((id(op), interpret, force))
    if hit is not None and hit[0] is op:
        return hit[1]
    kind = "triton" + (f"-{force}" if force else "")
    path = cache.module_file(op, kind, lambda: triton_codegen.generate_module(op, __version__, force))
    mod = cache.load(path, interpret=interpret)
    _MODULES[(id(op), interpret, force)] = (op, mod)
    return mod


_PER_OP: dict[tuple, tuple[ir.Op, str | None]] = {}


def per_op(op: ir.Op, question, *args) -> str | None:
    """`question(op, *args)`, asked once per op: the answers depend on the op alone (and on the
    FORCE_STRATEGY that tests set), and every call asks them."""
    key = (question, id(op), FORCE_STRATEGY) + args
    hit = _PER_OP.get(key)
    if hit is None or hit[0] is not op:
        hit = _PER_OP[key] = (op, question(op, *args))
    return hit[1]


def why_not(psm, p) -> str | None:
    """Why the Triton path cannot take this call, or None."""
    if p.device.type not in ("cuda", "cpu"):
        return f"tensors on {p.device.type} (Triton runs CUDA tensors, or CPU ones interpreted)"
    return per_op(psm.ir, _why_not_op, psm.associative)


def _why_not_op(op: ir.Op, associative: bool) -> str | None:
    if not associative:
        return "it is not associative (the tree backend runs non-associative ops)"
    why = triton_codegen.unsupported(op)
    if why:
        return why
    if triton_codegen.strategy(op, force=FORCE_STRATEGY) == "recurrent" and S.scalarize(op).lane is None:
        return "its state is too large to scalarize and it has no lane dim to split it over"
    return None


def _needs_grad(p, initial) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [t for t in p.raw.values() if t.is_floating_point()]
    if initial is not None:
        tensors += [t for t in initial.prefix.values() if t.is_floating_point()]
    return any(t.requires_grad for t in tensors)


@contextlib.contextmanager
def _numpy_quiet():
    import numpy as np

    with np.errstate(all="ignore"):
        yield


def _quiet_if(interpret: bool):
    """The interpreter evaluates both sides of every `tl.where` in numpy; the untaken side's
    overflow or log(0) warnings say nothing about the result, so they are silenced there."""
    return _numpy_quiet() if interpret else contextlib.nullcontext()


class _Call:
    """What one forward call needs to know, handed to the autograd function."""

    def __init__(self, psm, p, mod, interpret: bool, want_final: bool, has_init: bool):
        self.name = psm.name
        self.spec = getattr(mod, f"{psm.name.upper()}_SPEC")
        self.mod = mod
        self.interpret = interpret
        self.names = [f["name"] for f in self.spec["inputs"]]
        self.state = [f["name"] for f in self.spec["state"]]
        self.outputs = self.spec["outputs"]
        self.want_final = want_final
        self.has_init = has_init
        self.acc = p.float_dtype
        self.out_dtype = p.out_dtype

    def forward(self, inputs, initial, want_ckpt):
        strategy = self.spec["strategy"]
        chunking = dict(chunk_t=FORCE_CHUNK_T) if strategy == "scan" else {}
        with _quiet_if(self.interpret):
            return getattr(self.mod, f"{self.name}_{strategy}")(
                inputs, initial=initial, want_final=self.want_final, acc_dtype=self.acc,
                out_dtype=self.out_dtype, config=FORCE_CONFIG, want_ckpt=want_ckpt, **chunking)


class _ScanFunction(torch.autograd.Function):
    """Forward: the scan or recurrent kernel (saving per-block checkpoints). Backward: the derived
    kernel of that strategy (`{op}_backward`: a reverse scan, or the recurrent adjoint)."""

    @staticmethod
    def forward(ctx, call: _Call, *tensors):
        n = len(call.names)
        inputs = dict(zip(call.names, tensors[:n]))
        initial = dict(zip(call.state, tensors[n:])) if call.has_init else None
        outs, final, saved = call.forward(inputs, initial, want_ckpt=True)
        ckpt, config = saved if saved is not None else ({}, None)
        ctx.call, ctx.config = call, config
        ctx.ckpt_names = list(ckpt)
        saved_outs = (call.spec["backward"] or {}).get("saved") or []
        ctx.out_names = saved_outs
        by_name = {f["name"]: o for f, o in zip(call.outputs, outs)}
        ctx.save_for_backward(*tensors[:n], *ckpt.values(), *(by_name[k] for k in saved_outs))
        finals = tuple(final[k] for k in call.state) if call.want_final else ()
        nondiff = [o for o, f in zip(outs, call.outputs) if f["dtype"] not in ("f16", "bf16", "f32", "f64")]
        if call.want_final:
            fields = call.spec["state"]
            final_ok = bool((call.spec["backward"] or {}).get("final"))  # else the final state is a constant
            nondiff += [t for t, f in zip(finals, fields)
                        if f["dtype"] not in ("f16", "bf16", "f32", "f64") or not final_ok]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)
        return (*outs, *finals)

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        n = len(call.names)
        saved = ctx.saved_tensors
        raw = dict(zip(call.names, saved[:n]))
        n_ck = len(ctx.ckpt_names)
        ckpt = dict(zip(ctx.ckpt_names, saved[n:n + n_ck]))
        outputs = dict(zip(ctx.out_names, saved[n + n_ck:])) if ctx.out_names else None
        n_out = len(call.outputs)
        gy = {f["name"]: g for f, g in zip(call.outputs, grads[:n_out])}
        gfinal = None
        if call.want_final and any(g is not None for g in grads[n_out:]):
            gfinal = dict(zip(call.state, grads[n_out:]))
        with _quiet_if(call.interpret):
            gx = getattr(call.mod, f"{call.name}_backward")(raw, gy, (ckpt, ctx.config), gfinal,
                                                             acc_dtype=call.acc, outputs=outputs)
        out = []
        for name, t in raw.items():
            g = gx.get(name)
            if g is None or not t.is_floating_point():
                out.append(None)
                continue
            if g.shape != t.shape:  # the input was broadcast over batch axes: sum them back
                g = g.sum_to_size(t.shape)
            out.append(g.to(t.dtype))
        return (None, *out, *([None] * (len(call.state) if call.has_init else 0)))


def run(psm, p, initial, return_state: bool, strict: bool):
    from .runtime import StreamState

    why = why_not(psm, p)
    grad = why is None and _needs_grad(p, initial)
    if grad:
        why = backward_why_not(psm, initial)
    if why is not None:
        if strict:
            raise PsmCallError(f"{psm.name}: backend='triton' cannot run this call: {why}")
        return None
    if initial is not None and (initial.prefix is None or initial.pending):
        raise PsmCallError(f"{psm.name}: initial_state does not belong to an associative op")
    interpret = p.device.type != "cuda"
    mod = module(psm.ir, interpret)
    call = _Call(psm, p, mod, interpret, return_state, initial is not None)
    init = dict(initial.prefix) if initial is not None else None
    if grad:
        tensors = [p.raw[k] for k in call.names] + ([init[k] for k in call.state] if init else [])
        res = _ScanFunction.apply(call, *tensors)
        outs, finals = res[:len(call.outputs)], res[len(call.outputs):]
        final = dict(zip(call.state, finals)) if return_state else None
    else:
        outs, final, _ = call.forward(p.raw, init, want_ckpt=False)
    out = outs[0] if len(outs) == 1 else tuple(outs)
    if not return_state:
        return out
    tokens = (initial.tokens if initial is not None else 0) + p.T
    return out, StreamState(p.batch_shape, owner(psm.spec), tokens=tokens, prefix=final)


def backward_why_not(psm, initial) -> str | None:
    """Why gradients cannot come from the derived backward kernels, or None."""
    why = per_op(psm.ir, _backward_why_not_op)
    if why is not None:
        return why
    if initial is not None and any(t.requires_grad for t in initial.prefix.values()):
        return "gradients with respect to the initial state are not generated"
    return None


def _backward_why_not_op(op: ir.Op) -> str | None:
    sop = S.scalarize(op)
    if triton_codegen.strategy(op, sop, FORCE_STRATEGY) == "recurrent":
        why = triton_codegen.recurrent_backward_why_not(op, sop)
    else:
        _, _, why = triton_codegen.backward_plan(sop)
    if why is not None:
        return f"gradients are needed and the derived backward does not cover this op: {why}"
    return None


def step(psm, state, p, strict: bool = True):
    """One token on the Triton path: `{op}_step`, the forward kernel at T = 1 (a small fused
    kernel on CUDA). `p` is the per-token `_Prepared` of PsmOp.step (no time axis). Returns
    (outputs, new StreamState), or None to let the caller take its own path (when not strict)."""
    from .runtime import StreamState

    why = why_not(psm, p)
    if why is None and _needs_grad(p, state):
        why = "gradients are needed; a step on the Triton path has no autograd"
    if why is None and (state.prefix is None or state.pending):
        why = "the state does not belong to an associative, unchunked op"
    if why is not None:
        if strict:
            raise PsmCallError(f"{psm.name}.step: the Triton path cannot run this call: {why}")
        return None
    interpret = p.device.type != "cuda"
    mod = module(psm.ir, interpret)
    with _quiet_if(interpret):
        outs, final = getattr(mod, f"{psm.name}_step")(p.raw, dict(state.prefix), acc_dtype=p.float_dtype,
                                                       out_dtype=p.out_dtype)
    out = outs[0] if len(outs) == 1 else tuple(outs)
    return out, StreamState(p.batch_shape, owner(psm.spec), tokens=state.tokens + 1, prefix=final)
