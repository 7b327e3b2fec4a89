"""Triton dispatch for non-associative expression ops: strategy `tree` (DESIGN.md section 4).

`run(op, prepared, initial_state, return_state, strict)` is the entry `triton_backend.run` hands
non-associative ops to. It returns the outputs (and the stream state), or None when the op is not
one the tree kernels compile (externs, chunks: strategy `level`, i.e. the torch path, runs those).

A fresh call (no stream state in or out) runs on kernels only: the block totals of the inputs
(`up_x`), their canonical prefixes by the same tree, recursively (`up_s` / `down_s`), and the
outputs from each block's starting prefix (`down_x`). Without gradients this uses the `lanes`
family (each thread runs the subtree of its few elements in registers; only lane totals move
between threads). With gradients it uses the split/join family, each launch an autograd Function
whose backward is the matching reverse kernel, so gradients flow through the same tree.

A call that continues or returns a stream state needs the binary counter too. Its elements then
split at the block grid of the whole stream (blocks start at multiples of BS counted from the
stream's first element): the unaligned head and the unfinished tail (< BS elements each) run on
the torch path (`standalone.run`, which continues a counter in parallel), and the aligned middle
runs the kernels, with the block-level prefixes and counter from `standalone.tree_scan` over the
block totals (the counter's roots of level >= log2 BS are exactly block-level roots).

CPU tensors run the same kernels under Triton's interpreter (how CI runs them); CUDA tensors run
them compiled.
"""

from __future__ import annotations

import contextlib
import hashlib
import linecache
from dataclasses import replace
from typing import Iterator

import torch

from . import standalone
from .codegen import tree as tree_codegen
from .errors import PsmCallError
from .standalone import Counter, Prepared, StreamState, owner

_BLOCK = {"cuda": 64, "cpu": 64}  # split/join family (gradients, stream state)
_LANES = {"cuda": 128, "cpu": 16}  # lanes family (forward only): threads a block
_NUM_WARPS = {4: 1, 8: 1, 16: 1, 32: 1, 64: 2, 128: 4, 256: 4, 512: 8, 1024: 8}
_CACHE: dict = {}


@contextlib.contextmanager
def block_size(block: int, lanes: int | None = None) -> Iterator[None]:
    """Blocks of `block` elements (split/join family) and of `lanes` threads (lanes family)
    inside this context: tests use small ones to cross many blocks, benchmarks sweep them."""
    old, old_lanes = dict(_BLOCK), dict(_LANES)
    _BLOCK.update(cuda=block, cpu=block)
    if lanes:
        _LANES.update(cuda=lanes, cpu=lanes)
    try:
        yield
    finally:
        _BLOCK.update(old)
        _LANES.update(old_lanes)


def kernels(op_ir, block: int, interpret: bool, lanes: int = 0) -> tuple[tree_codegen.TreeKernels, dict]:
    """Generated tree kernels of an op, exec'd once per (op, blocks, interpreted or compiled)."""
    key = (op_ir.name, op_ir.dims, op_ir.source.text, block, lanes, interpret)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    import triton
    import triton.language as tl

    per_lane = tree_codegen.lane_config(op_ir, lanes)[1] if lanes else 0
    tk = tree_codegen.generate(op_ir, block, lanes, per_lane)
    ns = {"triton": triton, "tl": tl, "__name__": f"psmc_tree_{op_ir.name}"}
    # Triton reads a kernel's source through inspect, so the text goes into linecache first.
    digest = hashlib.sha1(tk.source.encode()).hexdigest()[:12]
    filename = f"<psmc-tree-{op_ir.name}-{block}-{lanes}-{digest}>"
    linecache.cache[filename] = (len(tk.source), None, tk.source.splitlines(True), filename)
    with _interpreter(interpret):  # @triton.jit reads the switch when it decorates
        exec(compile(tk.source, filename, "exec"), ns)
    fns = {kind: ns[tk.kernel(kind)] for kind in tk.kinds}
    _CACHE[key] = (tk, fns)
    return tk, fns


@contextlib.contextmanager
def _interpreter(on: bool) -> Iterator[None]:
    """TRITON_INTERPRET set to `on` for the block, then everything as it was: the environment
    variable (which other kernel caches toggle the same way) and any value set on triton.knobs."""
    import os

    import triton

    rt = triton.knobs.runtime
    had, old = "interpret" in vars(rt), vars(rt).get("interpret")
    env = os.environ.get("TRITON_INTERPRET")
    rt.__dict__.pop("interpret", None)
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env
        if had:
            rt.__dict__["interpret"] = old


class _Tree:
    """One call's kernels, row count and accumulation dtype."""

    def __init__(self, op_ir, device: torch.device, rows: int, acc: torch.dtype):
        import triton.language as tl

        where = "cuda" if device.type == "cuda" else "cpu"
        self.block = _BLOCK[where]
        self.spec, self.fns = kernels(op_ir, self.block, device.type != "cuda", _LANES[where])
        self.lane_block = self.spec.lane_block
        self.rows = rows
        self.acc = acc
        self.tl_acc = {torch.float32: tl.float32, torch.float64: tl.float64}[acc]
        self.ns = len(self.spec.state_slots)
        self.device = device
        self.warps = _NUM_WARPS.get(self.block, 4)

    def nblk(self, n: int, block: int | None = None) -> int:
        return -(-n // (block or self.block))

    def launch(self, kind: str, n: int, *args, **constexprs) -> None:
        lanes = kind.startswith("lanes_")
        grid = (self.rows * self.nblk(n, self.lane_block if lanes else self.block),)
        warps = _NUM_WARPS.get(self.spec.lanes, 4) if lanes else self.warps
        if self.device.type == "cuda":
            self.fns[kind][grid](*args, n, ACC=self.tl_acc, num_warps=warps, **constexprs)
            return
        import numpy as np

        # The interpreter evaluates both sides of every tl.where in numpy; the identity's -inf
        # makes the untaken side warn (inf - inf) without touching the result.
        with np.errstate(all="ignore"):
            self.fns[kind][grid](*args, n, ACC=self.tl_acc, num_warps=warps, **constexprs)

    def empty(self, *shape) -> torch.Tensor:
        return torch.empty(shape, dtype=self.acc, device=self.device)

    def zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.acc, device=self.device)


def _c(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous()


class _UpX(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tree: _Tree, n: int, *xs):
        tot = tree.empty(tree.rows, tree.nblk(n), tree.ns)
        tree.launch("up_x", n, *xs, tot)
        ctx.tree, ctx.n = tree, n
        ctx.save_for_backward(*xs)
        return tot

    @staticmethod
    def backward(ctx, dtot):
        tree, n, xs = ctx.tree, ctx.n, ctx.saved_tensors
        dxs = [torch.empty_like(x) for x in xs]
        tree.launch("bwd_up_x", n, *xs, _c(dtot), *dxs)
        return (None, None, *dxs)


class _UpS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tree: _Tree, n: int, st):
        tot = tree.empty(tree.rows, tree.nblk(n), tree.ns)
        tree.launch("up_s", n, st, tot)
        ctx.tree, ctx.n = tree, n
        ctx.save_for_backward(st)
        return tot

    @staticmethod
    def backward(ctx, dtot):
        tree, n, (st,) = ctx.tree, ctx.n, ctx.saved_tensors
        dst = torch.empty_like(st)
        tree.launch("bwd_up_s", n, st, _c(dtot), dst)
        return None, None, dst


def _start_grads(tree: _Tree, n: int, dps, dpe):
    """Adjoint of the block prefixes P[0..nblk]: P[b] starts block b and ends block b - 1."""
    dpin = tree.zeros(tree.rows, tree.nblk(n) + 1, tree.ns)
    dpin[:, :-1] += dps
    dpin[:, 1:] += dpe
    return dpin


class _DownX(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tree: _Tree, n: int, pin, *xs):
        has_start = pin is not None
        pin_arg = pin if has_start else xs[0]
        ys = tuple(tree.empty(tree.rows, n, f.size) for f in tree.spec.outputs)
        tree.launch("down_x", n, *xs, pin_arg, *ys, HAS_START=has_start)
        ctx.tree, ctx.n, ctx.has_start = tree, n, has_start
        ctx.save_for_backward(pin_arg, *xs)
        return ys

    @staticmethod
    def backward(ctx, *dys):
        tree, n = ctx.tree, ctx.n
        pin, *xs = ctx.saved_tensors
        dys = [_c(d) if d is not None else tree.zeros(tree.rows, n, f.size)
               for d, f in zip(dys, tree.spec.outputs)]
        dxs = [torch.empty_like(x) for x in xs]
        nblk = tree.nblk(n)
        dps, dpe = tree.empty(tree.rows, nblk, tree.ns), tree.zeros(tree.rows, nblk, tree.ns)
        tree.launch("bwd_down_x", n, *xs, pin, *dys, *dxs, dps, dpe, HAS_START=ctx.has_start)
        dpin = _start_grads(tree, n, dps, dpe) if ctx.has_start else None
        return (None, None, dpin, *dxs)


class _DownS(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tree: _Tree, n: int, pin, st):
        has_start = pin is not None
        pin_arg = pin if has_start else st
        pout = tree.empty(tree.rows, n + 1, tree.ns)
        tree.launch("down_s", n, st, pin_arg, pout, HAS_START=has_start)
        ctx.tree, ctx.n, ctx.has_start = tree, n, has_start
        ctx.save_for_backward(pin_arg, st)
        return pout

    @staticmethod
    def backward(ctx, dp):
        tree, n = ctx.tree, ctx.n
        pin, st = ctx.saved_tensors
        dst = torch.empty_like(st)
        nblk = tree.nblk(n)
        dps, dpe = tree.empty(tree.rows, nblk, tree.ns), tree.zeros(tree.rows, nblk, tree.ns)
        tree.launch("bwd_down_s", n, st, pin, _c(dp), dst, dps, dpe, HAS_START=ctx.has_start)
        dpin = _start_grads(tree, n, dps, dpe) if ctx.has_start else None
        return None, None, dpin, dst


def fast_prefixes(tree: _Tree, st: torch.Tensor, n: int) -> torch.Tensor:
    """`prefixes` on the forward-only lanes kernels."""
    B = tree.lane_block
    pout = tree.empty(tree.rows, n + 1, tree.ns)
    if n <= B:
        tree.launch("lanes_down_s", n, st, st, pout, HAS_START=False)
        return pout
    tot = tree.empty(tree.rows, tree.nblk(n, B), tree.ns)
    tree.launch("lanes_up_s", n, st, tot)
    tree.launch("lanes_down_s", n, st, fast_prefixes(tree, tot, tree.nblk(n, B)), pout, HAS_START=True)
    return pout


def fast_outputs(tree: _Tree, xs: list[torch.Tensor], n: int) -> tuple[torch.Tensor, ...]:
    """`outputs` on the forward-only lanes kernels."""
    B = tree.lane_block
    ys = tuple(tree.empty(tree.rows, n, f.size) for f in tree.spec.outputs)
    if n <= B:
        tree.launch("lanes_down_x", n, *xs, xs[0], *ys, HAS_START=False)
        return ys
    tot = tree.empty(tree.rows, tree.nblk(n, B), tree.ns)
    tree.launch("lanes_up_x", n, *xs, tot)
    tree.launch("lanes_down_x", n, *xs, fast_prefixes(tree, tot, tree.nblk(n, B)), *ys, HAS_START=True)
    return ys


def prefixes(tree: _Tree, st: torch.Tensor, n: int) -> torch.Tensor:
    """The n + 1 canonical prefixes of n states [rows, n, slots], by the tree kernels."""
    if n <= tree.block:
        return _DownS.apply(tree, n, None, st)
    tot = _UpS.apply(tree, n, st)
    return _DownS.apply(tree, n, prefixes(tree, tot, tree.nblk(n)), st)


def outputs(tree: _Tree, xs: list[torch.Tensor], n: int) -> tuple[torch.Tensor, ...]:
    """Outputs of a fresh sequence of n elements; xs: one [rows, n, field size] per input."""
    if n <= tree.block:
        return _DownX.apply(tree, n, None, *xs)
    tot = _UpX.apply(tree, n, *xs)
    return _DownX.apply(tree, n, prefixes(tree, tot, tree.nblk(n)), *xs)


# ---- the entry point ---------------------------------------------------------------------------

def unsupported(op, p: Prepared) -> str | None:
    """Why this call cannot run on the tree kernels, or None."""
    why = tree_codegen.supported(op.ir)
    if why:
        return why
    if op.associative:
        return "it is associative (the scan kernels run it)"
    if p.device.type not in ("cuda", "cpu"):
        return f"tensors on {p.device.type}"
    return None


def run(op, p: Prepared, initial: StreamState | None, return_state: bool, strict: bool):
    """Outputs (and the stream state) of a non-associative op on the tree kernels, or None."""
    why = unsupported(op, p)
    if why:
        if strict and not (op.ir.externs or op.ir.chunk is not None):  # level ops: the torch path
            raise PsmCallError(f"{op.name}: backend='triton' cannot run this op: {why}")
        return None
    rows = 1
    for s in p.batch_shape:
        rows *= s
    tree = _Tree(op.ir, p.device, rows, p.float_dtype)
    if initial is None and not return_state:
        return _finish(op, p, _kernel_outputs(tree, p), None, False)
    return _run_stateful(op, tree, p, initial, return_state)


def _flat_inputs(tree: _Tree, p: Prepared) -> list[torch.Tensor]:
    return [_c(p.inputs[f.name].reshape(tree.rows, p.T, f.size)) for f in tree.spec.inputs]


def _kernel_outputs(tree: _Tree, p: Prepared) -> tuple[torch.Tensor, ...]:
    if p.T == 0:
        return tuple(tree.empty(tree.rows, 0, f.size) for f in tree.spec.outputs)
    xs = _flat_inputs(tree, p)
    if torch.is_grad_enabled() and any(x.requires_grad for x in xs):
        return outputs(tree, xs, p.T)
    return fast_outputs(tree, xs, p.T)


def _finish(op, p: Prepared, ys, final: StreamState | None, return_state: bool):
    """[rows, T, size] kernel outputs -> (*batch, T, *shape) in the inputs' float dtype."""
    results = []
    for y, f in zip(ys, op.ir.outputs):
        y = y.reshape(p.batch_shape + (p.T,) + f.type.shape)
        if f.type.dtype in ("f16", "bf16", "f32") and p.out_dtype is not None:
            y = y.to(p.out_dtype)
        results.append(y)
    out = results[0] if len(results) == 1 else tuple(results)
    return (out, final) if return_state else out


def _slice(p: Prepared, start: int, stop: int) -> Prepared:
    nb = len(p.batch_shape)
    return replace(p, cast={k: v.narrow(nb, start, stop - start) for k, v in p.inputs.items()},
                   T=stop - start)


def _run_stateful(op, tree: _Tree, p: Prepared, initial: StreamState | None, return_state: bool):
    spec, fns = op.spec, op.functions(p.float_dtype, p.device)
    batch, nb = p.batch_shape, len(p.batch_shape)
    if initial is None:
        initial = standalone.init_state(spec, fns, batch, p.device, p.float_dtype)
    standalone.check_state(spec, initial, batch)
    BS = tree.block
    head = min(p.T, (-initial.counter.count) % BS)
    mid = (p.T - head) // BS * BS
    pieces, state = [], initial
    for start, stop, on_kernels in ((0, head, False), (head, head + mid, True), (head + mid, p.T, False)):
        if stop == start:
            continue
        part = _slice(p, start, stop)
        if on_kernels:
            ys, state = _aligned(op, tree, fns, part, state)
        else:
            ys, state = standalone.run(spec, fns, part, state, True, "torch")
            ys = ys if isinstance(ys, tuple) else (ys,)
        pieces.append(ys)
    if not pieces:
        state = StreamState(batch, owner(op.spec), tokens=initial.tokens, counter=_fit(initial.counter, batch, initial.batch_shape))
        ys = tuple(torch.empty(batch + (0,) + f.type.shape, dtype=p.out_dtype or p.float_dtype,
                               device=p.device) for f in op.ir.outputs)
    else:
        ys = tuple(torch.cat([y[i].to(pieces[-1][i].dtype) for y in pieces], dim=nb)
                   for i in range(len(op.ir.outputs)))
    out = ys[0] if len(ys) == 1 else ys
    return (out, state) if return_state else out


def _fit(counter: Counter, batch, old_batch) -> Counter:
    """A copy of the counter with every state broadcast to the call's batch shape."""
    nb_old = len(old_batch)
    fit = lambda st: {k: torch.broadcast_to(v, batch + v.shape[nb_old:]) for k, v in st.items()}
    return Counter(fit(counter.identity), [(lv, fit(r)) for lv, r in counter.roots],
                   [None if f is None else fit(f) for f in counter.folds], counter.count, counter.calls)


def _shift(counter: Counter, by: int) -> Counter:
    """The same counter with block levels shifted (elements <-> blocks of 2^by elements)."""
    count = counter.count >> by if by > 0 else counter.count << -by
    return Counter(counter.identity, [(lv - by, r) for lv, r in counter.roots], list(counter.folds),
                   count, counter.calls)


def _to_slots(tree: _Tree, op, st: dict, n: int) -> torch.Tensor:
    """A State dict with a time axis of n -> [rows, n, slots] in slot order."""
    parts = [st[f.name].reshape(tree.rows, n, -1).to(tree.acc) for f in op.ir.state]
    return torch.cat(parts, dim=2)


def _from_slots(tree: _Tree, op, t: torch.Tensor, batch) -> dict:
    """[rows, n, slots] -> a State dict with fields shaped (*batch, n, *shape)."""
    out, j = {}, 0
    n = t.shape[1]
    for f in op.ir.state:
        size = 1
        for s in f.type.shape:
            size *= s
        out[f.name] = t[:, :, j:j + size].reshape(tuple(batch) + (n,) + f.type.shape)
        j += size
    return out


def _aligned(op, tree: _Tree, fns, p: Prepared, state: StreamState):
    """Whole blocks at a block boundary of the stream: kernels inside blocks, torch across them."""
    batch, nb = p.batch_shape, len(p.batch_shape)
    LOG = tree.block.bit_length() - 1
    n, nblk = p.T, p.T // tree.block
    xs = _flat_inputs(tree, p)
    tot = _from_slots(tree, op, _UpX.apply(tree, n, *xs), batch)
    counter = _shift(_fit(state.counter, batch, state.batch_shape), LOG)

    def combine(a, b):
        return fns.combine(a, b, batch + (next(iter(a.values())).shape[nb],))

    excl, incl, after = standalone.tree_scan(tot, nblk, nb, combine, counter.identity, counter)
    pin = torch.cat([_to_slots(tree, op, excl, nblk), _to_slots(tree, op, incl, nblk)[:, -1:]], dim=1)
    ys = _DownX.apply(tree, n, _c(pin), *xs)
    ys = tuple(y.reshape(batch + (n,) + f.type.shape) for y, f in zip(ys, op.ir.outputs))
    ys = tuple(y.to(p.out_dtype) if f.type.dtype in ("f16", "bf16", "f32") and p.out_dtype is not None
               else y for y, f in zip(ys, op.ir.outputs))
    return ys, StreamState(batch, owner(op.spec), tokens=state.tokens + n, counter=_shift(after, -LOG))
