"""Strategy `scan`: an associative op with a few scalars of state per lane, as Triton kernels.

The kernel (templates/triton_scan.j2) gives each program a block of lanes (independent sequences)
and a chunk of T, and walks the chunk in blocks: loads the block's tokens (any strides, any float
dtype, upcast in registers), applies `lift` (fused into the load), scans the block with
`tl.associative_scan` over the tuple of state scalars, folds in the carry from earlier blocks,
applies `output` (fused into the store) and keeps the block's last prefix as the next carry.
Positions past T become the identity, so after the loop the carry is the state after the chunk's
last token: the final state for the last chunk.

One pass is one chunk: all of T per program. When lanes are too few to fill the GPU, the launcher
runs two passes: `{op}_chunk_totals_kernel` stores the total of every (lanes, chunk) with the same
block scan and no outputs, then `{op}_scan_kernel` with FROM_TOTALS starts each chunk's carry from
the ordered fold of the totals before it (see `_psmc_chunking` in templates/triton_prelude.j2).

The launcher (`{op}_scan`, in templates/triton_launch_scan.j2) reads every tensor's strides, folds the
batch into at most three lane axes (outer o0, o1 and the inner, per-program axis) without copying,
and picks block sizes and chunks.

A factored kernel (lane_free.py: softmax_attn, and mLSTM and GLA at small dims) scans its lane-free
state scalars once per token, as a [BLOCK_T] row, and its lanes as a linear recurrence with
coefficients from that row; its lane-free carries are one value per program. Fields of several
scalars per token are read and written as vectors where the launcher finds them dense (`{p}_VEC`,
vectors.py). FEATURES switches these off for benchmarks.
"""

from __future__ import annotations

import math

from .. import ir
from . import lane_free
from . import scalarize as S
from .templates import render
from .triton_expr import statements, texpr
from .vectors import groups, pack, unpack

# Above this many state scalars per lane the scan's register tuple gets too wide: use `recurrent`.
MAX_SCAN_SCALARS = 32

# The forward kernel's optimizations, all on: lane-free factoring (lane_free.py), f32 exp and log
# as one MUFU instruction each (triton_expr.py, `fast`), dense small fields moved as vectors
# (vectors.py), a one-lane one-warp block's carry gathered from its last token (_psmc_last).
# benchmarks/bench_examples.py generates modules without them to time against.
FEATURES = frozenset({"lane_free", "fast_math", "vectors", "gather_last"})


def _fast() -> bool:
    return "fast_math" in FEATURES


def _last(s: S.Slot) -> str:
    """The block's carry update of a [BLOCK_L, BLOCK_T] tile: its last token (_psmc_last)."""
    gather = "GATHER_LAST" if "gather_last" in FEATURES else "False"
    return f"c_{s.name} = _psmc_last(s_{s.name}, BLOCK_L, BLOCK_T, {gather})"

_TL_DTYPES = {"bool": "tl.int1", "i32": "tl.int32", "i64": "tl.int64", "f64": "tl.float64"}


def state_dtype(dtype: str) -> str:
    """The Triton dtype a state scalar is kept in: ACC (f32, or f64 for a float64 run) for floats."""
    return _TL_DTYPES.get(dtype, "ACC")


def _field_offset(prefix: str, f: S.FieldInfo, slot: S.Slot) -> str:
    terms = []
    for k, axis in enumerate(f.scalar_axes):
        i = slot.index[k]
        if i == 1:
            terms.append(f"{prefix}_sf{k}")
        elif i > 1:
            terms.append(f"{i} * {prefix}_sf{k}")
    return " + ".join(terms)


def _plus(ptr: str, off: str) -> str:
    return f"{ptr} + {off}" if off else ptr


def _literal(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(v)


def tensor_args(prefix: str, f: S.FieldInfo, timed: bool) -> str:
    """`in_a_ptr, in_a_so0, in_a_so1, in_a_sl, in_a_st` + one stride per scalarized field axis."""
    names = [f"{prefix}_ptr", f"{prefix}_so0", f"{prefix}_so1", f"{prefix}_sl"]
    if timed:
        names.append(f"{prefix}_st")
    names += [f"{prefix}_sf{k}" for k in range(len(f.scalar_axes))]
    return ", ".join(names)


def spec(sop: S.ScalarOp) -> dict:
    """What the launcher needs to know about the op: field ranks, lane axes, dtypes."""
    def fields(fs):
        return [{"name": f.name, "shape": list(f.shape), "dtype": f.dtype, "lane_axis": f.lane_axis}
                for f in fs]
    return {
        "name": sop.op.name,
        "lane": sop.lane.size if sop.lane else None,
        "inputs": fields(sop.inputs),
        "outputs": fields(sop.outputs),
        "state": fields(sop.state),
        "identity": {s.name: sop.identity_value(s) for s in sop.state_slots},
        "scalars": len(sop.state_slots) + len(sop.input_slots),
        # state scalars per lane, with and without the lane axis (a recurrent program holds
        # BLOCK_L copies of the first kind and one of the second)
        "state_scalars": [sum(len(sop.slots(f)) for f in sop.state if f.lane_axis is not None),
                          sum(len(sop.slots(f)) for f in sop.state if f.lane_axis is None)],
    }


def vector_fields(sop: S.ScalarOp) -> list[str]:
    """The tensors (`in_A`, `out_y`) whose kernel argument `{p}_VEC` the launcher sets: fields of
    several scalars per token, moved as vectors when dense (the launcher checks the strides)."""
    return _Kernel(sop).vectors


def _tuple(names: list[str]) -> str:
    return ", ".join(names) + ("," if len(names) == 1 else "")


def combine_function(sop: S.ScalarOp, slots: list[S.Slot] | None = None) -> tuple[str, list[str], str]:
    """Parameters, body and return tuple of `{op}_combine(l..., r...)` (over `slots`: all by default;
    the lane-free factoring also needs the combine of its lane-free scalars alone)."""
    slots = sop.state_slots if slots is None else slots
    names = {s.name for s in slots}
    assigns = [a for a in sop.combine.assigns if a.name in names]
    params = ", ".join([f"l_{s.name}" for s in slots] + [f"r_{s.name}" for s in slots])
    body = statements([(f"{a.name}", a.expr) for a in assigns], "c", fast=_fast())
    rets = []
    for a, s in zip(assigns, slots):
        if a.expr.free_symbols:
            rets.append(f"{a.name}.to(l_{s.name}.dtype)")
        else:
            rets.append(f"tl.full(l_{s.name}.shape, {texpr(a.expr)}, l_{s.name}.dtype)")
    return params, body, _tuple(rets)


def _assign_lines(assigns, slots, prefix: str, tmp: str, masked, float_names: set[str],
                  shape: str = "[BLOCK_L, BLOCK_T]", subs: dict | None = None) -> list[str]:
    """`{prefix}_{slot} = …` for each scalar (shared subexpressions first), as `shape` tiles.

    `masked(slot)` gives (dtype, identity, condition) to put the identity where the condition
    fails (lift; condition None: no mask, only the dtype); None leaves the values as computed
    (output). float_names: the symbols known to be ACC floats (no cast needed); subs: symbols to
    rename first (the lane-free factoring reads some values as rows, `s_m[None, :]`)."""
    exprs = [a.expr.xreplace(subs) if subs else a.expr for a in assigns]
    reps, reduced = _cse(exprs, tmp)
    lines = [f"{n} = {texpr(v, fast=_fast())}" for n, v in reps]
    for s, v in zip(slots, reduced):
        value = texpr(v, fast=_fast())
        names = {x.name for x in v.free_symbols}
        if masked is None:
            if not names:
                value = f"tl.full({shape}, {value}, ACC)"
            lines.append(f"{prefix}_{s.name} = {value}")
            continue
        dt, ident, cond = masked(s)
        if not names:
            value = f"tl.full({shape}, {value}, {dt})"
        elif dt != "ACC" or not names <= float_names | {str(n) for n, _ in reps}:
            value = f"({value}).to({dt})"
        lines.append(f"{prefix}_{s.name} = tl.where({cond}, {value}, {ident})" if cond else
                     f"{prefix}_{s.name} = {value}")
    return lines


def _cse(exprs, tmp: str):
    import sympy as sp

    return sp.cse(exprs, symbols=sp.numbered_symbols(tmp), order="none")


def _renamed(sop: S.ScalarOp, prefix: str, slots) -> dict:
    """x_{slot} → {prefix}_{slot} for the given input slots."""
    return {s.symbol("x"): S.sym(f"{prefix}_{s.name}") for s in slots}


class _Kernel:
    """The text of one op's scan kernels, piece by piece (see templates/triton_scan.j2)."""

    def __init__(self, sop: S.ScalarOp):
        self.sop = sop
        self.fac = lane_free.factor(sop) if "lane_free" in FEATURES else None
        # the lane-free state and input scalars a factored kernel keeps as rows ([BLOCK_T])
        self.free_slots = {s.name for s in self.fac.free} if self.fac else set()
        self.free_inputs = {s.name for s in self.fac.free_inputs(sop)} if self.fac else set()
        self.float_inputs = {f"x_{s.name}" for f in sop.inputs if ir.is_float(f.dtype)
                             for s in sop.slots(f)}
        # tiles of several scalars per token move as vectors when the launcher finds them dense
        # ({p}_VEC > 1; vectors.py); lane-free rows of a factored kernel stay scalar loads
        self.vectors = [f"in_{f.name}" for f in sop.inputs if len(sop.slots(f)) > 1
                        and not (self.fac and f.lane_axis is None)]
        self.vectors += [f"out_{f.name}" for f in sop.outputs if len(sop.slots(f)) > 1]
        if "vectors" not in FEATURES:
            self.vectors = []

    def aligned(self, fields: list[str]) -> list[str]:
        """Strides of these vector fields as the multiples of VEC they are (see _psmc_aligned)."""
        lines = [f"{p}_{s} = _psmc_aligned({p}_{s}, {p}_VEC)" for p in self.vectors if p in fields
                 for s in ("so0", "so1", "sl", "st")]
        head = "# vector fields: their strides are multiples of their VEC (the launcher checked)"
        return [head] + lines if lines else []

    # -- addresses ---------------------------------------------------------------------------

    def base(self, prefix: str, f: S.FieldInfo) -> str:
        """The tensor's (o0, o1, lanes) base: [BLOCK_L, 1] pointers, or one pointer for a lane-free
        input of a factored kernel (its stride along the folded lanes is 0: see _psmc_fold_lanes)."""
        if prefix == "in" and self.fac and f.lane_axis is None:
            return f"in_{f.name}_base = in_{f.name}_ptr + o0 * in_{f.name}_so0 + o1 * in_{f.name}_so1"
        p = f"{prefix}_{f.name}"
        return f"{p}_base = {p}_ptr + o0 * {p}_so0 + o1 * {p}_so1 + lanes64[:, None] * {p}_sl"

    def _state_ptr(self, role: str, f: S.FieldInfo, s: S.Slot, extra: str = "") -> tuple[str, bool]:
        """Pointer to one state scalar of a per-lane-row tensor (init, final, ckpt, tot) and
        whether it is one pointer (a lane-free scalar of a factored kernel) or [BLOCK_L]."""
        p = f"{role}_{f.name}"
        row = s.name in self.free_slots
        ptr = f"{p}_ptr + o0 * {p}_so0 + o1 * {p}_so1" + ("" if row else f" + lanes64 * {p}_sl") + extra
        return _plus(ptr, _field_offset(p, f, s)), row

    def carry_store(self, role: str, f: S.FieldInfo, s: S.Slot, extra: str = "") -> str:
        ptr, row = self._state_ptr(role, f, s, extra)
        if row:  # the same value in every lane: one store per program
            return f"tl.store({ptr}, c_{s.name})"
        return f"tl.store({ptr}, tl.reshape(c_{s.name}, [BLOCK_L]), mask=lane_ok)"

    # -- inputs ------------------------------------------------------------------------------

    def loads(self, used: set[str], first: bool = False) -> list[str]:
        """`x_{slot} = tl.load(...)` for the used input scalars, upcast in registers; a vector
        field's scalars from one load per group when it is dense. In a factored kernel lane-free
        inputs are rows ([BLOCK_T]), left to `row_loads`. first: the block's first token only,
        as `xf_{slot}` ([BLOCK_L, 1])."""
        pre, lead, mask, mask3 = (("xf", "BLOCK_L, 1", "lane_ok[:, None]", "lane_ok[:, None, None]") if first
                                  else ("x", "BLOCK_L, BLOCK_T", "mask", "mask[:, :, None]"))
        out = []
        for f in self.sop.inputs:
            p = f"in_{f.name}"
            at = f"{p}_base + start * {p}_st" if first else f"{p}_t"
            slots = [s for s in self.sop.slots(f) if s.name in used and s.name not in self.free_inputs]
            scalar = [f"{pre}_{s.name} = tl.load({_plus(at, _field_offset(p, f, s))}, mask={mask}, "
                      f"other=0){_cast(f)}" for s in slots]
            if p not in self.vectors or not slots:
                out += scalar
                continue
            vec = []
            names = [s.name for s in self.sop.slots(f)]
            for k0, g in groups(len(names)):
                if used.isdisjoint(names[k0:k0 + g]):
                    continue
                v = f"{pre}v_{f.name}_{k0}"
                vec.append(f"{v} = tl.load({at if not first else f'({at})'}[:, :, None] + {_lanes(k0, g)}, "
                           f"mask={mask3}, other=0){_cast(f)}")
                vec += unpack(v, [f"{pre}_{n}" for n in names[k0:k0 + g]], lead)
            out += _branch(f"{p}_VEC > 1", f"dense {f.name}: a token's scalars in vectors", vec, scalar)
        return out

    def stores(self) -> list[str]:
        """The outputs' stores (a vector field: one store per group when it is dense)."""
        out = []
        for f in self.sop.outputs:
            p = f"out_{f.name}"
            dt = f"{p}_ptr.dtype.element_ty"
            slots = self.sop.slots(f)
            scalar = [f"tl.store({_plus(f'{p}_t', _field_offset(p, f, s))}, y_{s.name}.to({dt}), mask=mask)"
                      for s in slots]
            if p not in self.vectors:
                out += scalar
                continue
            names = [f"y_{s.name}" for s in slots]
            vec = [f"tl.store({p}_t[:, :, None] + {_lanes(k0, g)}, "
                   f"{pack(names[k0:k0 + g], 'BLOCK_L, BLOCK_T')}.to({dt}), mask=mask[:, :, None])"
                   for k0, g in groups(len(names))]
            out += _branch(f"{p}_VEC > 1", f"dense {f.name}: a token's scalars in vectors", vec, scalar)
        return out

    def row_loads(self, names: set[str], prefix: str, t: str, ok: str) -> list[str]:
        """Lane-free input scalars of token `t` as rows, `{prefix}_{slot}` (factored kernels)."""
        out = []
        for f in self.sop.inputs:
            for s in self.sop.slots(f):
                if s.name not in names:
                    continue
                ptr = _plus(f"in_{f.name}_base + {t} * in_{f.name}_st", _field_offset(f"in_{f.name}", f, s))
                out.append(f"{prefix}_{s.name} = tl.load({ptr}, mask={ok}, other=0){_cast(f)}")
        return out


def _lanes(k0: int, g: int) -> str:
    """The offsets of scalars k0 … k0 + g - 1 of a dense field, along a new last axis."""
    return f"({k0} + tl.arange(0, {g}))[None, None, :]" if k0 else f"tl.arange(0, {g})[None, None, :]"


def _branch(cond: str, why: str, then: list[str], other: list[str]) -> list[str]:
    """`if cond: then else: other` as lines (cond is a constexpr: one branch is compiled)."""
    return ([f"if {cond}:  # {why}"] + [f"    {x}" for x in then] + ["else:"]
            + [f"    {x}" for x in other])


def _cast(f: S.FieldInfo) -> str:
    return ".to(ACC)" if ir.is_float(f.dtype) and f.dtype != "f64" else ""


def _inputs_of(assigns) -> set[str]:
    """The input scalars (slot names) these assignments read."""
    return {sym.name[2:] for a in assigns for sym in a.expr.free_symbols if sym.name.startswith("x_")}


def generate(op: ir.Op, sop: S.ScalarOp | None = None) -> str:
    """The scan kernel and its combine function, as Triton source text."""
    sop = sop or S.scalarize(op)
    if len(sop.state_slots) > MAX_SCAN_SCALARS:
        raise ValueError(f"{op.name}: {len(sop.state_slots)} state scalars per lane; strategy "
                         f"scan takes at most {MAX_SCAN_SCALARS}")
    k = _Kernel(sop)
    fac = k.fac
    name = op.name
    slots = sop.state_slots
    params, cbody, crets = combine_function(sop)

    arg_groups = [tensor_args(f"in_{f.name}", f, True) for f in sop.inputs]
    arg_groups += [tensor_args(f"out_{f.name}", f, True) for f in sop.outputs]
    arg_groups += [tensor_args(f"init_{f.name}", f, False) for f in sop.state]
    arg_groups += [tensor_args(f"final_{f.name}", f, False) for f in sop.state]
    arg_groups += [tensor_args(f"ckpt_{f.name}", f, True) for f in sop.state]
    tot_groups = [tensor_args(f"tot_{f.name}", f, True) for f in sop.state]
    totals_arg_groups = arg_groups[:len(sop.inputs)] + tot_groups
    arg_groups += tot_groups

    lift_used = _inputs_of(sop.lift.assigns)
    used = lift_used | _inputs_of(sop.output.assigns)
    # pass 1 of two reads only what `lift` reads
    lift_fields = [f for f in sop.inputs if any(s.name in lift_used for s in sop.slots(f))]
    tile_inputs = [f for f in sop.inputs if not (fac and f.lane_axis is None)]

    def offsets(fields, outputs) -> list[str]:
        out = [f"in_{f.name}_t = in_{f.name}_base + t[None, :] * in_{f.name}_st" for f in fields
               if f in tile_inputs]
        return out + [f"out_{f.name}_t = out_{f.name}_base + t[None, :] * out_{f.name}_st" for f in outputs]

    init_loads, fills, finals, ckpts, narrow = [], [], [], [], []
    totals_bases, totals_loads, totals_stores = [], [], []
    for f in sop.state:
        for s in sop.slots(f):
            dt = state_dtype(s.dtype)
            ident = _literal(sop.identity_value(s))
            p = f"init_{f.name}"
            ptr = _plus(f"{p}_ptr + o0 * {p}_so0 + o1 * {p}_so1 + lanes64 * {p}_sl", _field_offset(p, f, s))
            init_loads.append(f"c_{s.name} = tl.load({ptr}, mask=lane_ok, other={ident}).to({dt})[:, None]")
            fills.append(f"c_{s.name} = tl.full([BLOCK_L, 1], {ident}, {dt})")
            finals.append(k.carry_store("final", f, s))
            ckpts.append(k.carry_store("ckpt", f, s, f" + (start // BLOCK_T) * ckpt_{f.name}_st"))
            tptr = _plus(f"tot_{f.name}_base + k[None, :] * tot_{f.name}_st", _field_offset(f"tot_{f.name}", f, s))
            totals_loads.append(f"p_{s.name} = tl.load({tptr}, mask=before, other={ident}).to({dt})")
            totals_stores.append(k.carry_store("tot", f, s, f" + chunk * tot_{f.name}_st"))
            if s.name in k.free_slots:
                narrow.append(f"c_{s.name} = tl.reduce(tl.reshape(tl.where(lane0, c_{s.name}, 0), "
                              f"[BLOCK_L]), 0, _psmc_add)")
        totals_bases.append(f"tot_{f.name}_base = tot_{f.name}_ptr + o0 * tot_{f.name}_so0 + "
                            f"o1 * tot_{f.name}_so1 + lanes64[:, None] * tot_{f.name}_sl")

    float_names = k.float_inputs
    if fac:
        out_subs = {s.symbol("s"): S.sym(f"s_{s.name}[None, :]") for s in fac.free}
        out_subs.update({S.sym(f"x_{n}"): S.sym(f"x_{n}[None, :]") for n in k.free_inputs})
    else:
        out_subs = None
    out = _assign_lines(sop.output.assigns, sop.output_slots, "y", "v", None, float_names, subs=out_subs)
    stores = k.stores()

    def last(dst: str, where: str) -> list[str]:  # the tile's last prefix, as [BLOCK_L, 1]
        return [f"{dst}_{s.name} = tl.reduce(tl.where({where}, s_{s.name}, 0), 1, _psmc_add, keep_dims=True)"
                for s in slots]

    common = dict(
        name=name,
        combine_params=params,
        combine_where=sop.where("combine"),
        combine_body=cbody,
        combine_returns=crets,
        ckpt_block=["if STORE_CKPT:  # the state before this block, for the backward's recomputation"]
        + [f"    {line}" for line in ckpts],
        arg_groups=arg_groups,
        totals_arg_groups=totals_arg_groups,
        bases=k.aligned(k.vectors) + [k.base("in", f) for f in sop.inputs]
        + [k.base("out", f) for f in sop.outputs],
        lift_bases=k.aligned([f"in_{f.name}" for f in lift_fields]) + [k.base("in", f) for f in lift_fields],
        vec_params=[f"{p}_VEC" for p in k.vectors],
        totals_vec_params=[f"{p}_VEC" for p in k.vectors if p.startswith("in_")],
        time_offsets=offsets(sop.inputs, sop.outputs),
        lift_offsets=offsets(lift_fields, []),
        loads=k.loads(used),
        lift_loads=k.loads(lift_used),
        totals_bases=totals_bases,
        totals_loads=totals_loads,
        totals_last=last("p", "k_last"),
        totals_tuple=_tuple([f"p_{s.name}" for s in slots]),
        totals_list=", ".join(f"p_{s.name}" for s in slots),
        totals_stores=totals_stores,
        identity_where=f"{sop.path}:{sop.op.state[0].loc.line} state",
        init_loads=init_loads,
        identity_fills=fills,
        narrow=narrow,
        lift_where=sop.where("lift"),
        output_where=sop.where("output"),
        output_body=out,
        stores=stores,
        final_stores=finals,
        scan_tuple=_tuple([f"s_{s.name}" for s in slots]),
        carry_tuple=_tuple([f"c_{s.name}" for s in slots]),
        carry_list=", ".join(f"c_{s.name}" for s in slots),
        factored=fac is not None,
    )
    if fac:
        return render("triton_scan.j2", **common, **_factored(k, fac))
    return render("triton_scan.j2", **common, **_plain(k))


def _plain(k: _Kernel) -> dict:
    """The block of a plain kernel: lift, the carry through the first element, one tuple scan."""
    sop = k.sop
    slots = sop.state_slots
    name = sop.op.name
    lift = _assign_lines(sop.lift.assigns, slots, "e", "u", lambda s: (
        state_dtype(s.dtype), _literal(sop.identity_value(s)), "mask"), k.float_inputs)
    # the block's first token, lifted and combined with the carry at [BLOCK_L, 1]: the scan then
    # yields prefixes that include the carry, with no combine over the whole block
    first = k.loads(_inputs_of(sop.lift.assigns), first=True)
    first += _assign_lines(sop.lift.assigns, slots, "f", "z", lambda s: (state_dtype(s.dtype), None, None),
                           {"xf" + n[1:] for n in k.float_inputs}, shape="[BLOCK_L, 1]",
                           subs=_renamed(sop, "xf", sop.input_slots))
    first.append(f"{_tuple([f'f_{s.name}' for s in slots])} = {name}_combine("
                 f"{', '.join(f'c_{s.name}' for s in slots)}, {', '.join(f'f_{s.name}' for s in slots)})")
    first += [f"e_{s.name} = tl.where(is_first, f_{s.name}, e_{s.name})" for s in slots]
    return dict(
        row_loads=[],
        lift_row_loads=[],
        first_lines=first,
        lift_body=lift,
        element_tuple=_tuple([f"e_{s.name}" for s in slots]),
        carry_updates=[_last(s) for s in slots],
    )


def _factored(k: _Kernel, fac: lane_free.Factoring) -> dict:
    """The block of a factored kernel (lane_free.py): a row scan of the lane-free state, its
    coefficients per token, and the lanes' linear recurrence."""
    sop = k.sop
    free, lanes = list(fac.free), list(fac.lanes)
    fparams, fbody, frets = combine_function(sop, free)
    free_lift = [a for a in sop.lift.assigns if a.name in {s.name for s in free}]
    lane_lift = [a for a in sop.lift.assigns if a.name in {s.name for s in lanes}]
    free_x = _inputs_of(free_lift)  # the lane-free inputs: as rows, of tokens t - 1 and t
    lane_x = k.free_inputs & _inputs_of(lane_lift)
    out_x = k.free_inputs & _inputs_of(sop.output.assigns)

    def free_lift_lines(prefix: str, x_prefix: str, cond: str) -> list[str]:
        return _assign_lines(free_lift, free, prefix, "u", lambda s: (
            state_dtype(s.dtype), _literal(sop.identity_value(s)), cond),
            {f"{x_prefix}_{n}" for n in k.free_inputs if f"x_{n}" in k.float_inputs},
            shape="[BLOCK_T]", subs=_renamed(sop, x_prefix, sop.input_slots))

    # combine's lane-free part and the lanes' coefficients at (prefix before t, element t), with
    # the subexpressions they share (softmax_attn: the exp) computed once
    at = {s.symbol("l"): S.sym(f"p_{s.name}") for s in free}
    at.update({s.symbol("r"): S.sym(f"e_{s.name}") for s in free})
    exprs = {(a.field, a.index): a.expr for a in sop.combine.assigns}
    targets = [(f"s_{s.name}", exprs[(s.field, s.index)].xreplace(at)) for s in free]
    gate = []  # per gate: its row name, or the constant
    for i, g in enumerate(fac.gates):
        if g.free_symbols:
            targets.append((f"a{i}", g.xreplace(at)))
            gate.append(S.sym(f"a{i}[None, :]"))
        else:
            gate.append(g)
    coef = []  # per lane scalar: h = b * w + c, in row names or constants
    for s, b, c in zip(lanes, fac.inputs, fac.biases):
        terms = []
        for tag, e in (("b", b), ("bias", c)):
            if e.free_symbols:
                targets.append((f"{tag}_{s.name}", e.xreplace(at)))
                terms.append(S.sym(f"{tag}_{s.name}[None, :]"))
            else:
                terms.append(e)
        coef.append(terms)
    reps, reduced = _cse([e for _, e in targets], "q")
    coefficients = [f"{n} = {texpr(v, fast=_fast())}" for n, v in reps]
    for (n, _), v in zip(targets, reduced):
        slot = next((s for s in free if f"s_{s.name}" == n), None)
        value = texpr(v, fast=_fast())
        if slot is not None and not v.free_symbols:
            value = f"tl.full([BLOCK_T], {value}, {state_dtype(slot.dtype)})"
        elif slot is not None and state_dtype(slot.dtype) != "ACC":
            value = f"({value}).to({state_dtype(slot.dtype)})"
        coefficients.append(f"{n} = {value}")

    # lanes: lift (lane-free inputs read as rows), then h = b * w + c, the carry in at the first token
    lane_subs = {S.sym(f"x_{n}"): S.sym(f"x_{n}[None, :]") for n in k.free_inputs}
    lane_lines = _assign_lines(lane_lift, lanes, "w", "u", lambda s: ("ACC", None, None),
                               k.float_inputs, subs=lane_subs)
    g_names = [f"g{i}" for i in range(len(fac.gates))]
    for s, (b, c), gi in zip(lanes, coef, fac.gate_of):
        h = b * S.sym(f"w_{s.name}") + c
        lane_lines.append(f"h_{s.name} = {texpr(h, fast=_fast())}")
        lane_lines.append(f"h_{s.name} = tl.where(is_first, h_{s.name} + {texpr(gate[gi] * S.sym(f'c_{s.name}'))}, "
                          f"h_{s.name})")
    for s in lanes:  # past the end: the identity (1, 0)
        lane_lines.append(f"h_{s.name} = tl.where(mask, h_{s.name}, 0)")
    for i, g in enumerate(gate):
        if g == 1:
            lane_lines.append(f"g{i} = tl.full([BLOCK_L, BLOCK_T], 1, ACC)")
            continue
        value = texpr(g) if g.free_symbols else f"tl.full([BLOCK_L, BLOCK_T], {texpr(g)}, ACC)"
        lane_lines.append(f"g{i} = tl.where(mask, {value}, 1).to(ACC)")

    lparams = ", ".join([f"l_{g}" for g in g_names] + [f"l_{s.name}" for s in lanes]
                        + [f"r_{g}" for g in g_names] + [f"r_{s.name}" for s in lanes])
    lrets = [f"l_{g} * r_{g}" for g in g_names]
    lrets += [f"r_g{gi} * l_{s.name} + r_{s.name}" for s, gi in zip(lanes, fac.gate_of)]
    lane_law = "; ".join(f"{s.name} = g{gi} * {s.name} + h" for s, gi in zip(lanes, fac.gate_of))

    return dict(
        free_params=fparams,
        free_body=fbody,
        free_returns=frets,
        lanes_params=lparams,
        lanes_returns=_tuple(lrets),
        lane_law=lane_law,
        prev_loads=k.row_loads(free_x, "xu", "u", "u_ok"),
        prev_lift=free_lift_lines("p", "xu", "u_ok"),
        free_carry_in=[f"p_{s.name} = tl.where(at_first, c_{s.name}, p_{s.name})" for s in free],
        free_tuple=_tuple([f"p_{s.name}" for s in free]),
        row_loads=k.row_loads(free_x | lane_x | out_x, "x", "t", "t_ok"),
        row_lift=free_lift_lines("e", "x", "t_ok"),
        coefficients=coefficients,
        lane_lines=lane_lines,
        lane_tuple=_tuple(g_names + [f"h_{s.name}" for s in lanes]),
        lane_scanned=_tuple(g_names + [f"s_{s.name}" for s in lanes]),
        carry_updates=[f"c_{s.name} = tl.reduce(tl.where(at_last, s_{s.name}, 0), 0, _psmc_add)" for s in free]
        + [_last(s) for s in lanes],
        lift_row_loads=k.row_loads(free_x | lane_x, "x", "t", "t_ok"),
    )
