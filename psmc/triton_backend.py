"""The Triton path of `PsmOp.forward`: generated kernels, cached on disk, called on prepared inputs.

`run` is called by runtime.PsmOp.forward with validated inputs. It returns None to let the torch
path run instead (only when not strict: `backend="auto"` on CUDA tensors), or what forward returns.
CUDA tensors run compiled kernels; CPU tensors run the same kernels under Triton's interpreter
(`backend="triton"` on CPU, which is how CI runs them). Everything per call (plans, the autograd
Function, the derived backward) is the generated module's own host code, the code a vendored
module runs: `run` decides whether the kernels may take the call and binds it (`{op}_bind`); a
plain call's bound call is kept for the fast path of later calls with its signature.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import __version__, cache, ir
from .errors import PsmCallError
from .standalone import owner, remember
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


def _knobs() -> tuple:
    return FORCE_CONFIG, FORCE_STRATEGY, FORCE_CHUNK_T


class _Fast:
    """A bound call kept for the fast path of `PsmOp.forward`: valid while the knobs above (which
    tests and benchmarks set) are what they were when it was bound; the full path otherwise."""

    __slots__ = ("call", "psm", "backend", "knobs")

    def __init__(self, call, psm, backend: str):
        self.call, self.psm, self.backend, self.knobs = call, psm, backend, _knobs()

    def __call__(self, inputs):
        if (FORCE_CONFIG, FORCE_STRATEGY, FORCE_CHUNK_T) == self.knobs:
            return self.call(inputs)
        return self.psm._forward(False, None, self.backend, inputs)


def run(psm, p, initial, return_state: bool, strict: bool, key=None):
    """The call on the generated kernels: the module's bound call for its signature (`{op}_bind`,
    whose autograd Function runs the derived backward). A plain call's bound call is kept under
    `key` (standalone.call_key) in psm's fast-path table, so its next call goes straight to it."""
    from .runtime import StreamState

    why = why_not(psm, p)
    grad = why is None and _needs_grad(p, initial)
    if grad:
        why = backward_why_not(psm)
    if why is not None:
        if strict:
            raise PsmCallError(f"{psm.name}: backend='triton' cannot run this call: {why}")
        return None
    if initial is not None and (initial.prefix is None or initial.pending):
        raise PsmCallError(f"{psm.name}: initial_state does not belong to an associative op")
    mod = module(psm.ir, p.device.type != "cuda")
    spec = getattr(mod, f"{psm.name.upper()}_SPEC")
    xs = [p.raw[f["name"]] for f in spec["inputs"]]
    inits = None if initial is None else [initial.prefix[f["name"]] for f in spec["state"]]
    chunking = dict(chunk_t=FORCE_CHUNK_T) if spec["strategy"] == "scan" else {}
    call = getattr(mod, f"{psm.name}_bind")(xs, inits, want_final=return_state, grad=grad,
                                             acc_dtype=p.float_dtype, out_dtype=p.out_dtype,
                                             config=FORCE_CONFIG, **chunking)
    out, final = call.run(xs)
    if not return_state:
        if call.cacheable:
            remember(psm._fast, key, _Fast(call, psm, "triton" if strict else "auto"))
        return out
    tokens = (initial.tokens if initial is not None else 0) + p.T
    return out, StreamState(p.batch_shape, owner(psm.spec), tokens=tokens,
                            prefix=dict(zip(call.state, final)))


def backward_why_not(psm) -> str | None:
    """Why gradients cannot come from the derived backward kernels, or None (the initial state's
    gradients come from them as well)."""
    return per_op(psm.ir, _backward_why_not_op)


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
    mod = module(psm.ir, p.device.type != "cuda")
    outs, final = getattr(mod, f"{psm.name}_step")(p.raw, dict(state.prefix), acc_dtype=p.float_dtype,
                                                   out_dtype=p.out_dtype)
    out = outs[0] if len(outs) == 1 else tuple(outs)
    return out, StreamState(p.batch_shape, owner(psm.spec), tokens=state.tokens + 1, prefix=final)
