"""Triton dispatch for non-associative expression ops: strategy `tree` (DESIGN.md section 4).

`run(op, prepared, initial_state, return_state, strict)` is the entry runtime.PsmOp.forward hands
non-associative ops to. It returns the outputs (and the stream state), or None when the op is not
one the tree kernels compile (externs, chunks: strategy `level`, i.e. the torch path, runs those).

The kernels and the host code that launches them (a fresh call on kernels only; a stream's head
and tail on the torch path, its aligned blocks on the kernels: templates/tree_host.j2) are one
generated section, psmc/codegen/tree.py `generate_module_section`. `psmc compile` pastes it into
the vendored module; here the same text is imported from the on-disk cache (psmc/cache.py) as a
module of its own, once per block configuration, compiled for CUDA tensors or interpreted for CPU
ones (how CI runs them).
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Iterator

from . import __version__, cache, triton_backend
from .codegen import tree as tree_codegen
from .errors import PsmCallError
from .standalone import Prepared

# split/join family (gradients, stream state): elements a program
_BLOCK = {"cuda": tree_codegen.BLOCK, "cpu": tree_codegen.BLOCK}
# lanes family (forward only): threads a program, and elements a thread (0: lane_config's choice).
# On the GPU one warp of 32 lanes (the gathers between lanes are warp shuffles); on the CPU (the
# interpreter) 16.
_LANES = {"cuda": tree_codegen.LANES, "cpu": 16}
_PER_LANE = {"cuda": 0, "cpu": 0}
_MODULES: dict = {}


@contextlib.contextmanager
def block_size(block: int, lanes: int | None = None, per_lane: int | None = None) -> Iterator[None]:
    """Blocks of `block` elements (split/join family), of `lanes` threads and `per_lane` elements
    a thread (lanes family) inside this context: tests use small ones to cross many blocks,
    benchmarks sweep them."""
    old = dict(_BLOCK), dict(_LANES), dict(_PER_LANE)
    _BLOCK.update(cuda=block, cpu=block)
    if lanes:
        _LANES.update(cuda=lanes, cpu=lanes)
    if per_lane:
        _PER_LANE.update(cuda=per_lane, cpu=per_lane)
    try:
        yield
    finally:
        for now, was in zip((_BLOCK, _LANES, _PER_LANE), old):
            now.update(was)


def module(op_ir, block: int, lanes: int, interpret: bool, per_lane: int = 0) -> ModuleType:
    """The generated tree module of an op for these blocks (from the on-disk cache), imported
    compiled or interpreted."""
    key = (op_ir.name, op_ir.dims, op_ir.source.text, block, lanes, per_lane, interpret)
    mod = _MODULES.get(key)
    if mod is None:  # lane_config scalarizes the op: once per key, not per call
        lanes, per_lane = tree_codegen.lane_config(op_ir, lanes, per_lane)
        path = cache.module_file(op_ir, f"tree-{block}-{lanes}x{per_lane}", lambda: tree_codegen.generate_module(
            op_ir, __version__, block, lanes, per_lane))
        mod = _MODULES[key] = cache.load(path, interpret=interpret)
    return mod


def kernels(op_ir, block: int, interpret: bool, lanes: int = 0,
            per_lane: int = 0) -> tuple[tree_codegen.TreeKernels, dict]:
    """What the module's kernels are (names, signatures) and the kernels themselves by kind: for
    ahead-of-time compiles and register reports."""
    lanes, per_lane = tree_codegen.lane_config(op_ir, lanes, per_lane)
    tk = tree_codegen.generate(op_ir, block, lanes, per_lane)
    mod = module(op_ir, block, lanes, interpret, per_lane)
    return tk, {kind: getattr(mod, tk.kernel(kind)) for kind in tk.kinds}


# ---- the entry point ---------------------------------------------------------------------------

def unsupported(op, p: Prepared) -> str | None:
    """Why this call cannot run on the tree kernels, or None."""
    why = triton_backend.per_op(op.ir, tree_codegen.supported)  # every call asks: once per op
    if why:
        return why
    if op.associative:
        return "it is associative (the scan kernels run it)"
    if p.device.type not in ("cuda", "cpu"):
        return f"tensors on {p.device.type}"
    return None


def run(op, p: Prepared, initial, return_state: bool, strict: bool):
    """Outputs (and the stream state) of a non-associative op on the tree kernels, or None."""
    why = unsupported(op, p)
    if why:
        if strict and not (op.ir.externs or op.ir.chunk is not None):  # level ops: the torch path
            raise PsmCallError(f"{op.name}: backend='triton' cannot run this op: {why}")
        return None
    where = "cuda" if p.device.type == "cuda" else "cpu"
    mod = module(op.ir, _BLOCK[where], _LANES[where], interpret=where != "cuda", per_lane=_PER_LANE[where])
    entry = getattr(mod, f"{op.name}_tree")
    return entry(op.spec, op.functions(p.float_dtype, p.device), p, initial, return_state)
