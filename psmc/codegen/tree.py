"""Strategy `tree`: the canonical tree of a non-associative expression op, as Triton kernels.

DESIGN.md section 1 fixes the bracketing, so the kernels compute exactly that tree. A program owns
one block of `BS = 2^LOG` elements that starts at a multiple of BS:

- up-sweep, one straight-line step per level: `tl.reshape(t, [m, 2])` + `tl.split` pairs the
  siblings, `combine(left, right)` gives the parents (the totals of the aligned sub-blocks);
- down-sweep from the block's starting prefix P[b]: a left child inherits its parent's prefix, a
  right child gets `combine(parent prefix, left sibling total)`, and `tl.join` + `tl.reshape`
  interleave them (exclusive prefixes). Inclusive prefixes are the prefixes of the next position:
  a left child's is its right sibling's exclusive prefix, a right child's is its parent's
  inclusive prefix, so they cost no extra `combine`; the block's own inclusive prefix is P[b+1].

The block totals form a shorter sequence whose canonical prefixes are exactly the P[b] (the blocks
of size >= BS in a position's binary decomposition are the decomposition of its block index), so
the launcher scans them with the same kernels (`*_s`: states in, prefixes out) and feeds them back.

Forward without gradients runs the `lanes` family instead (`_Lanes`): a block is R threads of E
elements each (on the GPU one warp, 32 x 4 for nonassoc_mix: `lane_config`). A thread runs its E
elements' subtree as straight-line scalar code, and the R lane totals go through an in-place
up-sweep / down-sweep that keeps one value per thread, each level a `tl.gather` of the partner
lane's value (a warp shuffle) and one `combine`. The split/join levels above hold a level's values
as ever smaller tensors that Triton still spreads over every thread (redundant combines, and on
triton 3.6 255 registers with spills at 128 lanes x 8); the gather tree compiles to 40-63
registers at 32 x 4. `tl.gather` runs compiled (triton 3.6 and 3.9) and under the interpreter.

A fresh forward call of more than one block is two or three launches of the lanes kernels:
lanes_up_x writes each block's total and every lane's up-sweep total (what the up-sweep leaves in
a lane: the total of the largest aligned group of lanes it ends, all the cross-lane down-sweep
reads); the down kernel loads those instead of running the up-sweep again and computes only the
in-lane left children its own down-sweep reads (at 32 x 4, 9 of a lane's 16 combines are left).
Rows of at most R blocks go straight to lanes_down_t, whose programs each scan the row's block
totals by the same cross-lane tree (one total a lane) to get their P[b], P[b+1]; longer rows have
the totals' prefixes computed by lanes_up_s / lanes_down_s first, then lanes_down_x. The kernels
are issue-bound on the H200 (the cross-lane levels run `combine` in every lane; nonassoc_mix's
costs four tanh), so these savings of work are what brought the tree within 2x of a scan moving
the same bytes; a one-pass kernel (blocks chained through published totals), block-tile loads and
programmatic dependent launch were measured and dropped (BENCHMARKS.md).

Backward: the reverse pass over the same tree. `combine_vjp`, `lift_vjp` and `output_vjp` are
vector-Jacobian products of the scalarized functions, differentiated by sympy (`where` stays a
`Piecewise`, so an untaken branch contributes an exact 0, never NaN * 0); structurally zero
Jacobian entries are dropped. A backward kernel recomputes its block's forward in registers, runs
the down-sweep in reverse (adjoints of the starting prefixes come out per block), then the
up-sweep in reverse (the block total's adjoint comes in from the scan of the totals).

Host code: `generate_module_section` adds to the kernels the Python that launches them
(templates/tree_host.j2, one text for every op) and the op's entry `{op}_tree` with its table of
kernels and block sizes (templates/tree_launch.j2). `psmc compile` pastes that section into a
vendored module, and the package's tree backend imports the same text from the on-disk cache.
On CUDA it launches through the scan launchers' `_PsmcLaunch` (templates/triton_launcher.j2,
pasted into the section too): direct calls of the compiled kernel after the first launch.

Kernels (all take `ACC`, the accumulation dtype, and `HAS_START` where a block may have a start;
`lanes_*` are the forward-only twins of the first four, lanes_up_x also writing the lane totals
`lt` that lanes_down_x (HAS_START) and lanes_down_t read):
  {op}_tree_up_x / _up_s        inputs (lift fused) / states  -> block totals
  {op}_tree_down_x / _down_s    ... + block prefixes -> outputs (output fused) / all n+1 prefixes
  {op}_tree_lanes_down_t        inputs + a row's (at most R) block totals -> outputs
  {op}_tree_bwd_up_x / _up_s    adjoints of the block totals -> adjoints of inputs / states
  {op}_tree_bwd_down_x / _down_s  adjoints of outputs / prefixes -> of inputs / states and of the
                                block prefixes (`dps` for P[b], `dpe` for P[b+1])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import sympy as sp

from .. import ir
from . import scalarize as S
from .templates import render
from .triton import _join
from .triton_expr import TritonPrinter
from .vectors import groups, pack, unpack

# The blocks a vendored module is generated with (the GPU's; the package picks per device, see
# tree_backend.py): elements a program of the split/join kernels (gradients, stream state), and
# threads a program of the forward-only lanes kernels (see lane_config).
BLOCK = 64
LANES = 32
LANE_SCALARS = 24
# lanes_up_x hands its lane totals to the down kernel when they are at most this many state words
# an element (NS / E; H200: nonassoc_mix at 5 / 4 faster with them, softmax_agg at 10 / 2 slower)
LANE_TOTAL_WORDS = 2
LANE_TOTALS: bool | None = None  # force the hand-over on or off (benchmarks compare); None: the rule
_NUM_WARPS = {4: 1, 8: 1, 16: 1, 32: 1, 64: 2, 128: 4, 256: 4, 512: 8, 1024: 8}
KINDS = ("up_x", "up_s", "down_x", "down_s", "bwd_up_x", "bwd_up_s", "bwd_down_x", "bwd_down_s")
LANE_KINDS = ("lanes_up_x", "lanes_up_s", "lanes_down_x", "lanes_down_s", "lanes_down_t")


class Unsupported(Exception):
    """An op this strategy does not compile (the caller falls back to the torch level path)."""


@dataclass(frozen=True)
class FieldArgs:
    name: str
    size: int  # scalars per element (the field's flattened shape)
    dtype: str


@dataclass(frozen=True)
class TreeKernels:
    """Generated source and what a launcher needs to call it."""

    op_name: str
    block: int
    source: str
    state_slots: tuple[str, ...]
    state_fields: tuple[FieldArgs, ...]
    inputs: tuple[FieldArgs, ...]
    outputs: tuple[FieldArgs, ...]
    exclusive: bool
    lanes: int = 0  # the forward-only lanes family: `lanes` threads x `per_lane` elements a block
    per_lane: int = 0
    lane_totals: bool = False  # lanes_up_x hands its lane totals to the down kernels (`_Lanes.handoff`)

    @property
    def lane_block(self) -> int:
        return self.lanes * self.per_lane

    def kernel(self, kind: str) -> str:
        return f"{self.op_name}_tree_{kind}"

    @property
    def kinds(self) -> tuple[str, ...]:
        return KINDS + (LANE_KINDS if self.lanes else ())

    def signature(self, kind: str, ptr: str = "*fp32") -> dict[str, str]:
        """Argument types for ahead-of-time compilation (triton.compile with an ASTSource)."""
        xs = [f"x_{f.name}_ptr" for f in self.inputs]
        ys = [f"y_{f.name}_ptr" for f in self.outputs]
        lanes = kind.startswith("lanes_")
        kind = kind.removeprefix("lanes_")
        args = {
            "up_x": xs + ["tot_ptr"] + (["lt_ptr"] if lanes else []),
            "up_s": ["st_ptr", "tot_ptr"],
            "down_x": xs + ["pin_ptr"] + (["lt_ptr"] if lanes else []) + ys,
            "down_t": xs + ["pin_ptr", "lt_ptr"] + ys,
            "down_s": ["st_ptr", "pin_ptr", "pout_ptr"],
            "bwd_up_x": xs + ["dtot_ptr"] + [f"dx_{f.name}_ptr" for f in self.inputs],
            "bwd_up_s": ["st_ptr", "dtot_ptr", "dst_ptr"],
            "bwd_down_x": xs + ["pin_ptr"] + [f"dy_{f.name}_ptr" for f in self.outputs]
            + [f"dx_{f.name}_ptr" for f in self.inputs] + ["dps_ptr", "dpe_ptr"],
            "bwd_down_s": ["st_ptr", "pin_ptr", "dp_ptr", "dst_ptr", "dps_ptr", "dpe_ptr"],
        }[kind]
        sig = {a: ptr for a in args}
        sig["n"] = "i32"
        if kind.endswith(("down_x", "down_s")):
            sig["HAS_START"] = "constexpr"
        sig["ACC"] = "constexpr"
        return sig


def supported(op: ir.Op) -> str | None:
    """Why the tree kernels cannot run `op`, or None when they can."""
    if op.externs:
        return "it calls externs (strategy level runs those through torch)"
    if op.chunk is not None:
        return "it is chunked (strategy level runs chunked ops)"
    for kind, fields in (("input", op.inputs), ("state", op.state), ("output", op.outputs)):
        for f in fields:
            if not ir.is_float(f.type.dtype):
                return f"{kind} '{f.name}' is {f.type.dtype}; the tree kernels keep floats only"
    return None


# ---- the scalar functions and their vector-Jacobian products ---------------------------------

class _Printer(TritonPrinter):
    """Triton text that calls only builtins: the standard library's @jit helpers (tl.sigmoid,
    tl.zeros_like, tl.cdiv) cannot be called from a kernel built for the interpreter in a process
    that imported Triton without it, which is how CPU calls and ahead-of-time compiles coexist."""

    def _print_sigmoid(self, e):
        return f"(1.0 / (1.0 + tl.exp(-({self._print(e.args[0])}))))"

    def _print_tanh(self, e):
        return f"(2.0 / (1.0 + tl.exp(-2.0 * ({self._print(e.args[0])}))) - 1.0)"


_PRINTER = _Printer({"order": "none"})


def texpr(e: sp.Expr) -> str:
    return _PRINTER.doprint(e)


def statements(targets: list[tuple[str, sp.Expr]], tmp: str) -> list[str]:
    """`name = expr` lines, shared subexpressions first as `{tmp}0, {tmp}1, ...` (sympy's cse)."""
    exprs = [sp.sympify(e) for _, e in targets]
    reps, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(tmp), order="none")
    return [f"{s} = {texpr(v)}" for s, v in reps] + [f"{n} = {texpr(v)}" for (n, _), v in zip(targets, reduced)]


def _literal(v) -> str:
    if isinstance(v, bool):
        return "1.0" if v else "0.0"
    v = float(v)
    if math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(v)


def _tuple(names: list[str]) -> str:
    return ", ".join(names) + ("," if len(names) == 1 else "")


def _function(name: str, params: list[str], assigns: list[tuple[str, sp.Expr]], ref: str,
              tmp: str, where: str) -> dict:
    """A @triton.jit helper: `name(params) -> assigned values` (constants broadcast like `ref`)."""
    live = [(n, e) for n, e in assigns if e.free_symbols]
    body = statements(live, tmp) if live else []
    rets = []
    for n, e in assigns:
        if e.free_symbols:
            rets.append(f"{n}.to({ref}.dtype)")
        elif e == 0:
            rets.append(f"tl.full({ref}.shape, 0.0, {ref}.dtype)")
        else:
            rets.append(f"tl.full({ref}.shape, {texpr(e)}, {ref}.dtype)")
    return {"name": name, "params": ", ".join(params), "where": where, "body": body,
            "returns": _tuple(rets)}


def _vjp(name: str, params: list[str], assigns: list[tuple[str, sp.Expr]], wrt: list[str],
         tmp: str, where: str) -> dict:
    """`name(params, g_outs) -> d/d(wrt) of sum_i g_i * out_i`, zero entries dropped."""
    gs = [f"g_{n}" for n, _ in assigns]
    # the scalarizer's own symbols (they may carry assumptions, e.g. extended real): match by name
    by_name = {x.name: x for _, e in assigns for x in e.free_symbols}
    grads = []
    for w in wrt:
        sym = by_name.get(w, sp.Symbol(w))
        total = sp.Integer(0)
        for g, (_, e) in zip(gs, assigns):
            if sym in e.free_symbols:
                d = sp.diff(e, sym)
                if d != 0:
                    total = total + sp.Symbol(g) * d
        grads.append((f"d_{w}", total))
    ref = params[0]
    return _function(name, params + gs, grads, ref, tmp, where)


# ---- the kernel bodies, line by line ----------------------------------------------------------

class _Body:
    """Builds the straight-line pieces of the kernels for one op and one block size."""

    def __init__(self, sop: S.ScalarOp, block: int):
        self.sop = sop
        self.name = sop.op.name
        self.BS = block
        self.LOG = block.bit_length() - 1
        self.slots = [s.name for s in sop.state_slots]
        self.ident = {s.name: _literal(sop.identity_value(s)) for s in sop.state_slots}
        self.NS = len(self.slots)
        self.exclusive = sop.op.exclusive

    def fn(self, kind: str) -> str:
        return f"{self.name}_tree_{kind}"

    def vars(self, prefix: str) -> list[str]:
        return [f"{prefix}_{s}" for s in self.slots]

    def call(self, outs: list[str], fn: str, *groups: list[str]) -> str:
        args = ", ".join(a for g in groups for a in g)
        return f"{_tuple(outs)} = {self.fn(fn)}({args})"

    # -- loads and stores --
    def load_x(self) -> list[str]:
        out = []
        for f in self.sop.inputs:
            size = math.prod(f.shape)
            for k, s in enumerate(self.sop.slots(f)):
                out.append(f"x_{s.name} = tl.load(x_{f.name}_ptr + pos * {size} + {k}, mask=mask, "
                           f"other=0).to(ACC)")
        return out

    def x_vars(self) -> list[str]:
        return [f"x_{s.name}" for s in self.sop.input_slots]

    def lift(self) -> list[str]:
        out = [f"# {self.sop.where('lift')}; past the end: the identity",
               self.call(self.vars("t0"), "lift", self.x_vars())]
        out += [f"t0_{s} = tl.where(mask, t0_{s}, {self.ident[s]})" for s in self.slots]
        return out

    def load_s(self, ptr: str = "st_ptr") -> list[str]:
        return [f"t0_{s} = tl.load({ptr} + pos * {self.NS} + {j}, mask=mask, "
                f"other={self.ident[s]}).to(ACC)" for j, s in enumerate(self.slots)]

    def up(self) -> list[str]:
        """Up-sweep: t{k+1} = combine(tl{k}, tr{k}); the halves are kept for the down-sweep."""
        out = []
        for k in range(self.LOG):
            m = self.BS >> (k + 1)
            out.append(f"# level {k} -> {k + 1}: {m} parent{'s' if m > 1 else ''}")
            for s in self.slots:
                out.append(f"tl{k}_{s}, tr{k}_{s} = tl.split(tl.reshape(t{k}_{s}, [{m}, 2]))")
            out.append(self.call(self.vars(f"t{k + 1}"), "combine", self.vars(f"tl{k}"), self.vars(f"tr{k}")))
        return out

    def start(self, need_q: bool) -> tuple[list[str], list[str]]:
        """(with a start prefix, without): p{LOG} = P[b] and q{LOG} = P[b+1] as 1-element tensors."""
        L, NS = self.LOG, self.NS
        one = "tl.arange(0, 1)"
        given = [f"p{L}_{s} = tl.load(pin_ptr + (prow + blk) * {NS} + {j} + {one}).to(ACC)"
                 for j, s in enumerate(self.slots)]
        if need_q:
            given += [f"q{L}_{s} = tl.load(pin_ptr + (prow + blk + 1) * {NS} + {j} + {one}).to(ACC)"
                      for j, s in enumerate(self.slots)]
        none = [f"p{L}_{s} = tl.full([1], {self.ident[s]}, ACC)" for s in self.slots]
        if need_q:  # the whole sequence is this block: its end prefix is combine(e, total)
            none.append(self.call(self.vars(f"q{L}"), "combine", self.vars(f"p{L}"), self.vars(f"t{L}")))
        return given, none

    def down(self, need_p0: bool, need_q: bool) -> list[str]:
        out = []
        for k in range(self.LOG - 1, -1, -1):
            m = self.BS >> k
            out.append(f"# level {k + 1} -> {k}: right children get combine(parent prefix, left sibling)")
            out.append(self.call(self.vars(f"rp{k}"), "combine", self.vars(f"p{k + 1}"), self.vars(f"tl{k}")))
            for s in self.slots:
                if k > 0 or need_p0:
                    out.append(f"p{k}_{s} = tl.reshape(tl.join(p{k + 1}_{s}, rp{k}_{s}), [{m}])")
                if need_q:
                    out.append(f"q{k}_{s} = tl.reshape(tl.join(rp{k}_{s}, q{k + 1}_{s}), [{m}])")
        return out

    def output(self) -> list[str]:
        pre = "p0" if self.exclusive else "q0"
        outs = [f"y_{s.name}" for s in self.sop.output_slots]
        lines = [f"# {self.sop.where('output')} ({'exclusive' if self.exclusive else 'inclusive'} prefix)",
                 self.call(outs, "output", self.vars(pre), self.x_vars())]
        for f in self.sop.outputs:
            size = math.prod(f.shape)
            for k, s in enumerate(self.sop.slots(f)):
                lines.append(f"tl.store(y_{f.name}_ptr + pos * {size} + {k}, "
                             f"y_{s.name}.to(y_{f.name}_ptr.dtype.element_ty), mask=mask)")
        return lines

    def store_prefixes(self) -> list[str]:
        NS = self.NS
        out = [f"tl.store(pout_ptr + ppos * {NS} + {j}, p0_{s}, mask=mask)" for j, s in enumerate(self.slots)]
        out += [f"tl.store(pout_ptr + (ppos + 1) * {NS} + {j}, q0_{s}, mask=last)"
                for j, s in enumerate(self.slots)]
        return out

    def store_total(self) -> list[str]:
        L, NS = self.LOG, self.NS
        return [f"tl.store(tot_ptr + (trow + blk) * {NS} + {j} + tl.arange(0, 1), t{L}_{s})"
                for j, s in enumerate(self.slots)]

    # -- backward --
    def load_gy(self) -> list[str]:
        out = []
        for f in self.sop.outputs:
            size = math.prod(f.shape)
            for k, s in enumerate(self.sop.slots(f)):
                out.append(f"gy_{s.name} = tl.load(dy_{f.name}_ptr + pos * {size} + {k}, mask=mask, "
                           f"other=0).to(ACC)")
        return out

    def output_vjp(self) -> list[str]:
        pre = "p0" if self.exclusive else "q0"
        g = "gp0" if self.exclusive else "gq0"
        gy = [f"gy_{s.name}" for s in self.sop.output_slots]
        gx = [f"gxo_{s.name}" for s in self.sop.input_slots]
        out = [f"# {self.sop.where('output')}, reversed",
               self.call(self.vars(g) + gx, "output_vjp", self.vars(pre), self.x_vars(), gy)]
        out += [f"{g}_{s} = tl.where(mask, {g}_{s}, 0.0)" for s in self.slots]
        return out

    def load_gp(self) -> list[str]:
        NS = self.NS
        out = [f"gp0_{s} = tl.load(dp_ptr + ppos * {NS} + {j}, mask=mask, other=0).to(ACC)"
               for j, s in enumerate(self.slots)]
        out += [f"gq0_{s} = tl.load(dp_ptr + (ppos + 1) * {NS} + {j}, mask=last, other=0).to(ACC)"
                for j, s in enumerate(self.slots)]
        return out

    def down_reversed(self, have_p0: bool, have_q: bool) -> list[str]:
        out = []
        for k in range(self.LOG):
            m = self.BS >> (k + 1)
            out.append(f"# level {k} -> {k + 1}, reversed")
            have_p = k > 0 or have_p0
            for s in self.slots:
                if have_p:
                    out.append(f"gpa{k}_{s}, grpa{k}_{s} = tl.split(tl.reshape(gp{k}_{s}, [{m}, 2]))")
                if have_q:
                    out.append(f"grpb{k}_{s}, gq{k + 1}_{s} = tl.split(tl.reshape(gq{k}_{s}, [{m}, 2]))")
                parts = ([f"grpa{k}_{s}"] if have_p else []) + ([f"grpb{k}_{s}"] if have_q else [])
                out.append(f"grp{k}_{s} = {' + '.join(parts)}")
            out.append(self.call(self.vars(f"gpl{k}") + self.vars(f"gtl{k}"), "combine_vjp",
                                 self.vars(f"p{k + 1}"), self.vars(f"tl{k}"), self.vars(f"grp{k}")))
            for s in self.slots:
                out.append(f"gp{k + 1}_{s} = gpa{k}_{s} + gpl{k}_{s}" if have_p else f"gp{k + 1}_{s} = gpl{k}_{s}")
        return out

    def start_reversed(self, have_q: bool) -> tuple[list[str], list[str]]:
        """(with a start: store the prefixes' adjoints, total gets none; without: q{LOG}'s share)."""
        L, NS = self.LOG, self.NS
        one = "tl.arange(0, 1)"
        given = [f"tl.store(dps_ptr + (trow + blk) * {NS} + {j} + {one}, gp{L}_{s})"
                 for j, s in enumerate(self.slots)]
        if have_q:
            given += [f"tl.store(dpe_ptr + (trow + blk) * {NS} + {j} + {one}, gq{L}_{s})"
                      for j, s in enumerate(self.slots)]
        given += [f"gt{L}_{s} = tl.full([1], 0.0, ACC)" for s in self.slots]
        if have_q:
            none = [self.call(self.vars("gee") + self.vars(f"gt{L}"), "combine_vjp",
                              self.vars(f"p{L}"), self.vars(f"t{L}"), self.vars(f"gq{L}"))]
        else:
            none = [f"gt{L}_{s} = tl.full([1], 0.0, ACC)" for s in self.slots]
        return given, none

    def load_gtot(self) -> list[str]:
        L, NS = self.LOG, self.NS
        return [f"gt{L}_{s} = tl.load(dtot_ptr + (trow + blk) * {NS} + {j} + tl.arange(0, 1)).to(ACC)"
                for j, s in enumerate(self.slots)]

    def up_reversed(self, with_down: bool) -> list[str]:
        out = []
        for k in range(self.LOG - 1, -1, -1):
            m = self.BS >> k
            out.append(f"# level {k} -> {k + 1}, reversed")
            out.append(self.call(self.vars(f"gul{k}") + self.vars(f"gur{k}"), "combine_vjp",
                                 self.vars(f"tl{k}"), self.vars(f"tr{k}"), self.vars(f"gt{k + 1}")))
            for s in self.slots:
                left = f"gul{k}_{s} + gtl{k}_{s}" if with_down else f"gul{k}_{s}"
                out.append(f"gt{k}_{s} = tl.reshape(tl.join({left}, gur{k}_{s}), [{m}])")
        return out

    def lift_vjp_store(self, with_output: bool) -> list[str]:
        gx = [f"gx_{s.name}" for s in self.sop.input_slots]
        out = [f"# {self.sop.where('lift')}, reversed",
               self.call(gx, "lift_vjp", self.x_vars(), self.vars("gt0"))]
        for f in self.sop.inputs:
            size = math.prod(f.shape)
            for k, s in enumerate(self.sop.slots(f)):
                v = f"gx_{s.name} + gxo_{s.name}" if with_output else f"gx_{s.name}"
                out.append(f"tl.store(dx_{f.name}_ptr + pos * {size} + {k}, {v}, mask=mask)")
        return out

    def store_gs(self) -> list[str]:
        return [f"tl.store(dst_ptr + pos * {self.NS} + {j}, gt0_{s}, mask=mask)"
                for j, s in enumerate(self.slots)]


class _Lanes:
    """The forward-only `lanes` family: a block is `R` lanes (threads) of `E` elements each.

    Inside a lane the canonical subtree of its E elements is straight-line scalar code on named
    registers (no data movement at all). Across lanes each thread keeps ONE value per state scalar
    and the R lane totals go through Blelloch's in-place up-sweep and down-sweep, with `tl.gather`
    bringing a partner lane's value (a warp shuffle when R = 32 and one warp). The partner at level
    k is `lane ^ 2^k`: `lane - 2^k` for the lanes that end a group, `lane + 2^k` for those that end
    its left half, and for every other lane some lane whose value it drops.

    - up, level k -> k + 1: the last lane of each aligned group of 2^(k+1) lanes combines the
      total of the group's left half (held by the last lane of that half, `lane - 2^k`) with its
      own (the right half's), so afterwards lane R - 1 holds the block's total and every lane the
      total of the largest aligned group it ends;
    - down, from the block's prefix P[b] put into lane R - 1: at level k + 1 -> k a left child
      (the last lane of a left half) takes its parent's prefix from `lane + 2^k`, and a right child
      (the group's last lane, holding the parent's prefix) becomes `combine(parent prefix, left
      sibling total)` with the total from `lane - 2^k`, which the up-sweep left untouched there.
      Each lane ends with its exclusive prefix; its inclusive end is the next lane's, P[b+1] for
      the last lane.

    That is DESIGN.md section 1's bracketing exactly (the lanes are aligned blocks of E elements,
    the groups aligned blocks of lanes), and the lane's own down-sweep finishes it. Lanes that
    take no part in a level compute a `combine` too and drop it (`tl.where`): SIMT makes that
    free, and it keeps every level one gather per state scalar and one `combine`.
    """

    def __init__(self, sop: S.ScalarOp, lanes: int, per_lane: int):
        self.sop, self.R, self.E = sop, lanes, per_lane
        self.LR = lanes.bit_length() - 1
        self.LE = per_lane.bit_length() - 1
        self.BS = lanes * per_lane
        self.fns = _Body(sop, lanes)  # the helpers' calls, identities and slot names
        self.slots = self.fns.slots

    def vars(self, prefix: str) -> list[str]:
        return [f"{prefix}_{s}" for s in self.slots]

    def head(self, prefix_rows: bool) -> list[str]:
        out = [f"# one program per block of {self.R} lanes x {self.E} elements of one sequence (row)",
               f"nblk = (n + {self.BS - 1}) // {self.BS}",
               "pid = tl.program_id(0)", "blk = pid % nblk", "row = (pid // nblk).to(tl.int64)",
               "trow = row * nblk", "prow = row * (nblk + 1)",
               f"lane = tl.arange(0, {self.R})", f"base = blk * {self.BS} + lane * {self.E}"]
        for j in range(self.E):
            out += [f"i{j} = base + {j}", f"m{j} = i{j} < n", f"pos{j} = row * n + i{j}"]
            if prefix_rows:
                out.append(f"ppos{j} = row * (n + 1) + i{j}")
        out.append("# lanes that end an aligned group of 2^(k+1) lanes, and the left half of one")
        for k in range(self.LR):
            g = 2 << k
            out.append(f"end{k} = lane % {g} == {g - 1}")
            out.append(f"mid{k} = lane % {g} == {g // 2 - 1}")
        return out

    def start_helper(self) -> dict:
        """`{op}_tree_lanes_start(tot_ptr, trow, nblk, blk, lane)`: P[b] and P[b+1] of block b
        (in every lane) from the row's nblk <= R block totals, by the cross-lane tree over them
        (the same pieces as a block's, one total a lane): lanes_down_t's start, which saves the
        launch that scans the totals when a row has at most R blocks."""
        NS, L, ident = self.fns.NS, self.LR, self.fns.ident
        head = self.head(False)
        body = head[head.index("# lanes that end an aligned group of 2^(k+1) lanes, and the left half of one"):]
        body.append("# the row's block totals, one a lane; the identity past the row's end")
        body += [f"t0_{s} = tl.load(tot_ptr + (trow + lane) * {NS} + {j}, mask=lane < nblk, "
                 f"other={ident[s]}).to(ACC)" for j, s in enumerate(self.slots)]
        body += self.up_across()
        body += self.start()[1]  # the row starts at the identity
        body += self.cross_down()
        body.append("# block b's prefix is total b's, its end total b's inclusive end")
        rets = [f"tl.gather(p0_{s}, blk + 0 * lane, 0)" for s in self.slots]
        rets += [f"tl.gather(q0_{s}, blk + 0 * lane, 0)" for s in self.slots]
        return {"name": self.fns.fn("lanes_start"), "params": "tot_ptr, trow, nblk, blk, lane, ACC: tl.constexpr",
                "where": f"P[b], P[b+1] from a row's (at most {self.R}) block totals", "body": body,
                "returns": _tuple(rets)}

    def start_from_totals(self) -> list[str]:
        return [f"# P[b] and P[b+1] from the row's block totals (at most {self.R}), by their tree, here",
                f"{_tuple(self.vars('ps') + self.vars('pe'))} = {self.fns.fn('lanes_start')}"
                f"(pin_ptr, trow, nblk, blk, lane, ACC)"]

    def x_vars(self, j: int) -> list[str]:
        return [f"x{j}_{s.name}" for s in self.sop.input_slots]

    def load_x(self) -> list[str]:
        """Each element's fields in vectors of up to 4 scalars (one 16-byte load per lane), split
        into scalars inside the thread: far fewer memory transactions than a load per scalar."""
        out = []
        for j in range(self.E):
            for f in self.sop.inputs:
                size = math.prod(f.shape)
                names = [f"x{j}_{sl.name}" for sl in self.sop.slots(f)]
                for k0, g in groups(size):
                    if g == 1:
                        out.append(f"{names[k0]} = tl.load(x_{f.name}_ptr + pos{j} * {size} + {k0}, "
                                   f"mask=m{j}, other=0).to(ACC)")
                        continue
                    v = f"xv{j}_{f.name}_{k0}"
                    out.append(f"{v} = tl.load(x_{f.name}_ptr + pos{j}[:, None] * {size} + "
                               f"({k0} + tl.arange(0, {g}))[None, :], mask=m{j}[:, None], other=0).to(ACC)")
                    out += unpack(v, names[k0:k0 + g], str(self.R))
        return out

    def lift(self) -> list[str]:
        out = [f"# {self.sop.where('lift')}; past the end: the identity"]
        ident = self.fns.ident
        for j in range(self.E):
            out.append(self.fns.call(self.vars(f"u0_{j}"), "lift", self.x_vars(j)))
            out += [f"u0_{j}_{s} = tl.where(m{j}, u0_{j}_{s}, {ident[s]})" for s in self.slots]
        return out

    def load_s(self) -> list[str]:
        ident, NS = self.fns.ident, self.fns.NS
        return [f"u0_{j}_{s} = tl.load(st_ptr + pos{j} * {NS} + {q}, mask=m{j}, other={ident[s]}).to(ACC)"
                for j in range(self.E) for q, s in enumerate(self.slots)]

    def up(self) -> list[str]:
        out = [f"# inside each lane: the subtree of its {self.E} elements"]
        for k in range(self.LE):
            for i in range(self.E >> (k + 1)):
                out.append(self.fns.call(self.vars(f"u{k + 1}_{i}"), "combine",
                                         self.vars(f"u{k}_{2 * i}"), self.vars(f"u{k}_{2 * i + 1}")))
        out.append(f"# across lanes: the {self.R} lane totals, one per thread")
        out += [f"t0_{s} = u{self.LE}_0_{s}" for s in self.slots]
        return out + self.up_across()

    def up_in_lane_for_down(self) -> list[str]:
        """The in-lane up-sweep's combines that the in-lane down-sweep reads (left children, and
        what they are made of), for a kernel that loads the lane totals rather than computing them:
        at 4 elements a lane 1 combine of 3."""
        need = set()

        def want(k: int, i: int) -> None:
            if k > 0 and (k, i) not in need:
                need.add((k, i))
                want(k - 1, 2 * i)
                want(k - 1, 2 * i + 1)

        for k in range(self.LE):
            for i in range(self.E >> (k + 1)):
                want(k, 2 * i)
        out = [f"# inside each lane: the left children its down-sweep reads"]
        for k in range(1, self.LE + 1):
            for i in range(self.E >> k):
                if (k, i) in need:
                    out.append(self.fns.call(self.vars(f"u{k}_{i}"), "combine",
                                             self.vars(f"u{k - 1}_{2 * i}"), self.vars(f"u{k - 1}_{2 * i + 1}")))
        return out

    def handoff(self) -> bool:
        """Whether lanes_up_x hands its lane totals to the down kernels: when they are at most
        LANE_TOTAL_WORDS state words an element (the words cost bandwidth; the combines they save,
        issue slots). On the H200 at 256 x 16384 nonassoc_mix (1.25 words an element) takes 80.8 us
        with them against 85.5 recomputing, softmax_agg (5 words) 168.2 against 154.6
        (benchmarks/results/run9/handoff_rule.txt); above the bound the down kernels recompute."""
        if LANE_TOTALS is not None:
            return LANE_TOTALS
        return self.fns.NS <= LANE_TOTAL_WORDS * self.E

    def lane_totals(self, store: bool) -> list[str]:
        """Store (up_x) or load (the down kernels after it) t{LR}: what the up-sweep leaves in each
        lane, the total of the largest aligned group of lanes it ends, all the cross-lane
        down-sweep reads of it. Handing it over saves the down kernels the in-lane and cross-lane
        up-sweep (at 32 x 4, 8 of a lane's 16 combines) for 1.25 state words an element."""
        NS, L, R = self.fns.NS, self.LR, self.R
        at = lambda j: f"lt_ptr + ((trow + blk) * {NS} + {j}) * {R} + lane"
        if store:
            return ["# every lane's up-sweep total, for the down kernel"] + [
                f"tl.store({at(j)}, t{L}_{s})" for j, s in enumerate(self.slots)]
        return [f"# every lane's up-sweep total, from the up kernel"] + [
            f"t{L}_{s} = tl.load({at(j)})" for j, s in enumerate(self.slots)]

    def up_across(self) -> list[str]:
        """The up-sweep over t0 (one value a lane) to the block's total in lane R - 1."""
        out = []
        for k in range(self.LR):
            g = 2 << k
            m = self.R >> (k + 1)
            out.append(f"# level {k} -> {k + 1}: the last lane of {'each of the ' if m > 1 else ''}{m} group"
                       f"{'s' if m > 1 else ''} of {g} lanes (end{k}) combines its left half's total "
                       f"(lane - {g // 2}) with its own")
            out += [f"w{k}_{s} = tl.gather(t{k}_{s}, lane ^ {g // 2}, 0)" for s in self.slots]
            out.append(self.fns.call(self.vars(f"c{k}"), "combine", self.vars(f"w{k}"), self.vars(f"t{k}")))
            out += [f"t{k + 1}_{s} = tl.where(end{k}, c{k}_{s}, t{k}_{s})" for s in self.slots]
        return out

    def start(self) -> tuple[list[str], list[str]]:
        """(with a start prefix, without): ps = P[b] and pe = P[b+1]; with one they are scalars
        loaded from the scan of the block totals, without it P[b] = e and P[b+1] = combine(e,
        block total), the latter meaningful in lane R - 1 only (where the total is)."""
        NS, L = self.fns.NS, self.LR
        given = [f"ps_{s} = tl.load(pin_ptr + (prow + blk) * {NS} + {j}).to(ACC)"
                 for j, s in enumerate(self.slots)]
        given += [f"pe_{s} = tl.load(pin_ptr + (prow + blk + 1) * {NS} + {j}).to(ACC)"
                  for j, s in enumerate(self.slots)]
        none = [f"ps_{s} = tl.full([{self.R}], {self.fns.ident[s]}, ACC)" for s in self.slots]
        none.append(self.fns.call(self.vars("pe"), "combine", self.vars("ps"), self.vars(f"t{L}")))
        return given, none

    def cross_down(self) -> list[str]:
        """Each lane's exclusive prefix p0 and inclusive end q0, from P[b] in lane R - 1."""
        L = self.LR
        out = [f"# across lanes, from the block's prefix in lane {self.R - 1}"]
        out += [f"p{L}_{s} = tl.where(lane == {self.R - 1}, ps_{s}, t{L}_{s})" for s in self.slots]
        for k in range(L - 1, -1, -1):
            h = 1 << k
            out.append(f"# level {k + 1} -> {k}: left children (mid{k}) take their parent's prefix (lane + {h}), "
                       f"right children (end{k}) combine(parent prefix, left sibling total) (lane - {h})")
            out += [f"o{k}_{s} = tl.gather(p{k + 1}_{s}, lane ^ {h}, 0)" for s in self.slots]
            out.append(self.fns.call(self.vars(f"rp{k}"), "combine", self.vars(f"p{k + 1}"), self.vars(f"o{k}")))
            out += [f"p{k}_{s} = tl.where(end{k}, rp{k}_{s}, tl.where(mid{k}, o{k}_{s}, p{k + 1}_{s}))"
                    for s in self.slots]
        out.append(f"# a lane's inclusive end is the next lane's prefix; lane {self.R - 1}'s is P[b+1]")
        out += [f"q0_{s} = tl.where(lane == {self.R - 1}, pe_{s}, tl.gather(p0_{s}, (lane + 1) % {self.R}, 0))"
                for s in self.slots]
        return out

    def store_total(self) -> list[str]:
        NS, L = self.fns.NS, self.LR
        out = [f"# lane {self.R - 1} holds the block's total"]
        return out + [f"tl.store(tot_ptr + (trow + blk) * {NS} + {j} + 0 * lane, t{L}_{s}, mask=lane == {self.R - 1})"
                      for j, s in enumerate(self.slots)]

    def down(self) -> tuple[list[str], list[str], list[str]]:
        """Lines of the in-lane down-sweep, and per element its exclusive / inclusive prefix."""
        name = {(self.LE, 0): "p0"}  # the lane's exclusive prefix, from the cross-lane tree
        out = [f"# inside each lane, from the lane's prefix"]
        for k in range(self.LE - 1, -1, -1):
            for i in range(self.E >> (k + 1)):
                parent = name[(k + 1, i)]
                name[(k, 2 * i)] = parent
                name[(k, 2 * i + 1)] = f"d{k}_{2 * i + 1}"
                out.append(self.fns.call(self.vars(f"d{k}_{2 * i + 1}"), "combine",
                                         self.vars(parent), self.vars(f"u{k}_{2 * i}")))
        excl = [name[(0, j)] for j in range(self.E)]
        incl = excl[1:] + ["q0"]
        return out, excl, incl

    def output(self, pre: list[str]) -> list[str]:
        out = [f"# {self.sop.where('output')} "
               f"({'exclusive' if self.sop.op.exclusive else 'inclusive'} prefix)"]
        for j in range(self.E):
            ys = [f"y{j}_{s.name}" for s in self.sop.output_slots]
            out.append(self.fns.call(ys, "output", self.vars(pre[j]), self.x_vars(j)))
            for f in self.sop.outputs:
                size = math.prod(f.shape)
                names = [f"y{j}_{sl.name}" for sl in self.sop.slots(f)]
                dt = f"y_{f.name}_ptr.dtype.element_ty"
                for k0, g in groups(size):
                    if g == 1:
                        out.append(f"tl.store(y_{f.name}_ptr + pos{j} * {size} + {k0}, "
                                   f"{names[k0]}.to({dt}), mask=m{j})")
                        continue
                    out.append(f"tl.store(y_{f.name}_ptr + pos{j}[:, None] * {size} + ({k0} + "
                               f"tl.arange(0, {g}))[None, :], {pack(names[k0:k0 + g], str(self.R))}.to({dt}), "
                               f"mask=m{j}[:, None])")
        return out

    def store_prefixes(self, excl: list[str], incl: list[str]) -> list[str]:
        NS = self.fns.NS
        out = []
        for j in range(self.E):
            out += [f"tl.store(pout_ptr + ppos{j} * {NS} + {q}, {excl[j]}_{s}, mask=m{j})"
                    for q, s in enumerate(self.slots)]
            out += [f"tl.store(pout_ptr + (ppos{j} + 1) * {NS} + {q}, {incl[j]}_{s}, mask=i{j} == n - 1)"
                    for q, s in enumerate(self.slots)]
        return out


def lane_config(op: ir.Op, lanes: int = 0, per_lane: int = 0) -> tuple[int, int]:
    """(lanes, elements per lane), each 0 for the default: LANES lanes (one warp, so the
    cross-lane gathers are warp shuffles), and about LANE_SCALARS state scalars of in-lane leaves
    per lane, 2 to 4 elements. Measured only for nonassoc_mix[D=4] (5 state scalars: 4 elements,
    best at long T on an H100; 8 or 16 need more registers and ran slower); larger states get 2
    so that a lane's registers stay about the same (softmax_agg[D=8], 10 scalars: 63 at 32 x 2,
    77 at 32 x 4 on triton 3.6)."""
    if not per_lane:
        ns = len(S.ScalarOp(op).state_slots)
        per_lane = 1 << max(1, min(2, (LANE_SCALARS // max(1, ns)).bit_length() - 1))
    return lanes or LANES, per_lane


def generate(op: ir.Op, block: int = BLOCK, lanes: int = 0, per_lane: int = 0) -> TreeKernels:
    """The tree kernels of `op` for blocks of `block` (a power of two >= 2) elements, and with
    `lanes` > 0 the forward-only lanes family for blocks of `lanes` x `per_lane` elements."""
    why = supported(op)
    if why:
        raise Unsupported(f"{op.name}: strategy tree cannot compile this op: {why}")
    if block < 2 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 2, got {block}")
    for what, v in (("lanes", lanes), ("per_lane", per_lane)):
        if lanes and (v < 2 or v & (v - 1)):
            raise ValueError(f"{what} must be a power of two >= 2, got {v}")
    sop = S.ScalarOp(op)
    b = _Body(sop, block)
    name = op.name
    st = [s.name for s in sop.state_slots]
    xs = [f"x_{s.name}" for s in sop.input_slots]
    ls, rs, ss = [f"l_{s}" for s in st], [f"r_{s}" for s in st], [f"s_{s}" for s in st]
    lift_a = [(a.name, a.expr) for a in sop.lift.assigns]
    comb_a = [(a.name, a.expr) for a in sop.combine.assigns]
    out_a = [(a.name, a.expr) for a in sop.output.assigns]
    helpers = [
        _function(b.fn("lift"), xs, lift_a, xs[0], "u", sop.where("lift")),
        _function(b.fn("combine"), ls + rs, comb_a, ls[0], "c", sop.where("combine")),
        _function(b.fn("output"), ss + xs, out_a, ss[0], "v", sop.where("output")),
        _vjp(b.fn("combine_vjp"), ls + rs, comb_a, ls + rs, "j", sop.where("combine") + ", differentiated"),
        _vjp(b.fn("lift_vjp"), xs, lift_a, xs, "j", sop.where("lift") + ", differentiated"),
        _vjp(b.fn("output_vjp"), ss + xs, out_a, ss + xs, "j", sop.where("output") + ", differentiated"),
    ]
    excl = op.exclusive
    out_start_given, out_start_none = b.start(need_q=not excl)
    pre_start_given, pre_start_none = b.start(need_q=True)
    bo_given, bo_none = b.start_reversed(have_q=not excl)
    bp_given, bp_none = b.start_reversed(have_q=True)
    fields = lambda fs: tuple(FieldArgs(f.name, math.prod(f.shape), f.dtype) for f in fs)
    kernels = TreeKernels(
        op_name=name, block=block, source="", state_slots=tuple(st), state_fields=fields(sop.state),
        inputs=fields(sop.inputs), outputs=fields(sop.outputs), exclusive=excl, lanes=lanes,
        per_lane=per_lane, lane_totals=bool(lanes) and _Lanes(sop, lanes, per_lane).handoff())
    sig = {k: ", ".join(a for a in kernels.signature(k) if a not in ("n", "HAS_START", "ACC"))
           for k in kernels.kinds}
    source = render(
        "tree.j2", name=name, path=sop.path, block=block, log=b.LOG, ns=b.NS, helpers=helpers, sig=sig,
        load_x=b.load_x(), lift=b.lift(), load_s=b.load_s(), up=b.up(),
        out_start_given=out_start_given, out_start_none=out_start_none,
        pre_start_given=pre_start_given, pre_start_none=pre_start_none,
        out_down=b.down(need_p0=excl, need_q=not excl), pre_down=b.down(need_p0=True, need_q=True),
        output=b.output(), store_prefixes=b.store_prefixes(), store_total=b.store_total(),
        load_gy=b.load_gy(), output_vjp=b.output_vjp(), load_gp=b.load_gp(),
        out_down_rev=b.down_reversed(have_p0=excl, have_q=not excl),
        pre_down_rev=b.down_reversed(have_p0=True, have_q=True),
        bo_given=bo_given, bo_none=bo_none, bp_given=bp_given, bp_none=bp_none,
        load_gtot=b.load_gtot(), up_rev_down=b.up_reversed(with_down=True),
        up_rev_only=b.up_reversed(with_down=False),
        lift_vjp_down=b.lift_vjp_store(with_output=True), lift_vjp_up=b.lift_vjp_store(with_output=False),
        store_gs=b.store_gs(), lanes=_lane_pieces(sop, lanes, per_lane) if lanes else None,
    )
    return replace(kernels, source=source)


def _lane_pieces(sop: S.ScalarOp, lanes: int, per_lane: int) -> dict:
    L = _Lanes(sop, lanes, per_lane)
    handoff = L.handoff()
    down, excl, incl = L.down()
    given, none = L.start()
    pre = excl if sop.op.exclusive else incl
    return {"R": L.R, "E": L.E, "head": L.head(False), "head_p": L.head(True), "load_x": L.load_x(),
            "lift": L.lift(), "load_s": L.load_s(), "up": L.up(), "start_given": given,
            "start_none": none, "cross_down": L.cross_down(), "down": down,
            "output": L.output(pre), "store_prefixes": L.store_prefixes(excl, incl),
            "store_total": L.store_total(), "start_helper": L.start_helper(),
            # without the hand-over the down kernels run the whole up-sweep again
            "up_for_down": L.up_in_lane_for_down() if handoff else L.up(),
            "store_lane_totals": L.lane_totals(True) if handoff else [],
            "load_lane_totals": L.lane_totals(False) if handoff else [],
            "start_totals": L.start_from_totals()}


def num_warps(threads: int) -> int:
    """Warps a program: one per 32 threads of a block (lanes, or elements of a split/join block)."""
    return _NUM_WARPS.get(threads, 4)


def generate_module_section(op: ir.Op, block: int = BLOCK, lanes: int = 0, per_lane: int = 0) -> str:
    """The tree kernels of `op` (forward and reverse), the host code that launches them and the
    op's entry `{op}_tree(spec, fns, p, initial, return_state)`, as Python source text; `lanes`
    and `per_lane` (0: lane_config's default) shape the forward-only lanes kernels.

    This is what `psmc compile` pastes into DIR/<op>.py after the torch-only runtime and
    `import triton`, `import triton.language as tl`; `generate_module` wraps it for the cache."""
    lanes, per_lane = lane_config(op, lanes, per_lane)
    tk = generate(op, block, lanes, per_lane)
    launch = render("tree_launch.j2", name=op.name, path=S.ScalarOp(op).path,
                    table=f"{op.name.upper()}_TREE", block=block, warps=num_warps(block),
                    lanes=lanes, per_lane=per_lane, lane_block=tk.lane_block,
                    lane_warps=num_warps(lanes), slots=tk.state_slots, lane_totals=tk.lane_totals,
                    kernels={kind: tk.kernel(kind) for kind in tk.kinds})
    return _join(tk.source, render("tree_host.j2"), launch)


def generate_module(op: ir.Op, version: str, block: int = BLOCK, lanes: int = 0, per_lane: int = 0) -> str:
    """The section as a module of its own, taking the runtime from psmc.standalone (the cache's)."""
    return render("tree_module.j2", name=op.name, version=version, path=S.ScalarOp(op).path,
                  section=generate_module_section(op, block, lanes, per_lane))
