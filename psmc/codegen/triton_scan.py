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
"""

from __future__ import annotations

import math

from .. import ir
from . import scalarize as S
from .templates import render
from .triton_expr import statements, texpr

# Above this many state scalars per lane the scan's register tuple gets too wide: use `recurrent`.
MAX_SCAN_SCALARS = 32

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


def _tuple(names: list[str]) -> str:
    return ", ".join(names) + ("," if len(names) == 1 else "")


def combine_function(sop: S.ScalarOp) -> tuple[str, list[str], str]:
    """Parameters, body and return tuple of `{op}_combine(l..., r...)`."""
    slots = sop.state_slots
    params = ", ".join([f"l_{s.name}" for s in slots] + [f"r_{s.name}" for s in slots])
    body = statements([(f"{a.name}", a.expr) for a in sop.combine.assigns], "c")
    rets = []
    for a, s in zip(sop.combine.assigns, slots):
        if a.expr.free_symbols:
            rets.append(f"{a.name}.to(l_{s.name}.dtype)")
        else:
            rets.append(f"tl.full(l_{s.name}.shape, {texpr(a.expr)}, l_{s.name}.dtype)")
    return params, body, _tuple(rets)


def _assign_lines(sop: S.ScalarOp, assigns, slots, prefix: str, tmp: str, masked) -> list[str]:
    """`{prefix}_{slot} = …` for each scalar (shared subexpressions first), as [BLOCK_L, BLOCK_T] tiles.

    `masked(slot)` gives (dtype, identity) to put the identity past the end of the sequence (lift);
    None leaves the values as computed (output).
    """
    reps, reduced = _cse([a.expr for a in assigns], tmp)
    lines = [f"{n} = {texpr(v)}" for n, v in reps]
    float_inputs = {f"x_{s.name}" for f in sop.inputs if ir.is_float(f.dtype) for s in sop.slots(f)}
    for a, s, v in zip(assigns, slots, reduced):
        value = texpr(v)
        names = {x.name for x in v.free_symbols}
        if masked is None:
            if not names:
                value = f"tl.full([BLOCK_L, BLOCK_T], {value}, ACC)"
            lines.append(f"{prefix}_{s.name} = {value}")
            continue
        dt, ident = masked(s)
        if not names:
            value = f"tl.full([BLOCK_L, BLOCK_T], {value}, {dt})"
        elif dt != "ACC" or not names <= float_inputs | {str(n) for n, _ in reps}:
            value = f"({value}).to({dt})"
        lines.append(f"{prefix}_{s.name} = tl.where(mask, {value}, {ident})")
    return lines


def _cse(exprs, tmp: str):
    import sympy as sp

    return sp.cse(exprs, symbols=sp.numbered_symbols(tmp), order="none")


def generate(op: ir.Op, sop: S.ScalarOp | None = None) -> str:
    """The scan kernel and its combine function, as Triton source text."""
    sop = sop or S.scalarize(op)
    if len(sop.state_slots) > MAX_SCAN_SCALARS:
        raise ValueError(f"{op.name}: {len(sop.state_slots)} state scalars per lane; strategy "
                         f"scan takes at most {MAX_SCAN_SCALARS}")
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

    def base(prefix: str) -> str:
        return (f"{prefix}_base = {prefix}_ptr + o0 * {prefix}_so0 + o1 * {prefix}_so1 "
                f"+ lanes64[:, None] * {prefix}_sl")

    used_inputs = {sym.name for fn in (sop.lift, sop.output) for a in fn.assigns
                   for sym in a.expr.free_symbols if sym.name.startswith("x_")}
    bases = [base(f"in_{f.name}") for f in sop.inputs]
    bases += [base(f"out_{f.name}") for f in sop.outputs]
    time_offsets = [f"in_{f.name}_t = in_{f.name}_base + t[None, :] * in_{f.name}_st" for f in sop.inputs]
    time_offsets += [f"out_{f.name}_t = out_{f.name}_base + t[None, :] * out_{f.name}_st"
                     for f in sop.outputs]

    def input_loads(used: set[str]) -> list[str]:
        out = []
        for f in sop.inputs:
            for s in sop.slots(f):
                if f"x_{s.name}" not in used:
                    continue
                ptr = _plus(f"in_{f.name}_t", _field_offset(f"in_{f.name}", f, s))
                cast = ".to(ACC)" if ir.is_float(f.dtype) and f.dtype != "f64" else ""
                out.append(f"x_{s.name} = tl.load({ptr}, mask=mask, other=0){cast}")
        return out

    loads = input_loads(used_inputs)
    # pass 1 of two reads only what `lift` reads
    lift_used = {sym.name for a in sop.lift.assigns for sym in a.expr.free_symbols}
    lift_fields = [f for f in sop.inputs if any(f"x_{s.name}" in lift_used for s in sop.slots(f))]
    lift_loads = input_loads(lift_used)

    lift = _assign_lines(sop, sop.lift.assigns, slots, "e", "u", lambda s: (
        state_dtype(s.dtype), _literal(sop.identity_value(s))))
    init_loads, fills, finals, ckpts = [], [], [], []
    totals_bases, totals_loads, totals_stores = [], [], []
    for f in sop.state:
        for s in sop.slots(f):
            dt = state_dtype(s.dtype)
            ident = _literal(sop.identity_value(s))
            ptr = _plus(f"init_{f.name}_ptr + o0 * init_{f.name}_so0 + o1 * init_{f.name}_so1 "
                        f"+ lanes64 * init_{f.name}_sl", _field_offset(f"init_{f.name}", f, s))
            init_loads.append(f"c_{s.name} = tl.load({ptr}, mask=lane_ok, other={ident}).to({dt})[:, None]")
            fills.append(f"c_{s.name} = tl.full([BLOCK_L, 1], {ident}, {dt})")
            fptr = _plus(f"final_{f.name}_ptr + o0 * final_{f.name}_so0 + o1 * final_{f.name}_so1 "
                         f"+ lanes64 * final_{f.name}_sl", _field_offset(f"final_{f.name}", f, s))
            finals.append(f"tl.store({fptr}, tl.reshape(c_{s.name}, [BLOCK_L]), mask=lane_ok)")
            cptr = _plus(f"ckpt_{f.name}_ptr + o0 * ckpt_{f.name}_so0 + o1 * ckpt_{f.name}_so1 "
                         f"+ lanes64 * ckpt_{f.name}_sl + (start // BLOCK_T) * ckpt_{f.name}_st",
                         _field_offset(f"ckpt_{f.name}", f, s))
            ckpts.append(f"tl.store({cptr}, tl.reshape(c_{s.name}, [BLOCK_L]), mask=lane_ok)")
            tptr = _plus(f"tot_{f.name}_base + k[None, :] * tot_{f.name}_st", _field_offset(f"tot_{f.name}", f, s))
            totals_loads.append(f"p_{s.name} = tl.load({tptr}, mask=before, other={ident}).to({dt})")
            tptr = _plus(f"tot_{f.name}_ptr + o0 * tot_{f.name}_so0 + o1 * tot_{f.name}_so1 "
                         f"+ lanes64 * tot_{f.name}_sl + chunk * tot_{f.name}_st",
                         _field_offset(f"tot_{f.name}", f, s))
            totals_stores.append(f"tl.store({tptr}, tl.reshape(c_{s.name}, [BLOCK_L]), mask=lane_ok)")
        totals_bases.append(base(f"tot_{f.name}"))

    out = _assign_lines(sop, sop.output.assigns, sop.output_slots, "y", "v", None)
    stores = []
    for s in sop.output_slots:
        f = next(f for f in sop.outputs if f.name == s.field)
        ptr = _plus(f"out_{f.name}_t", _field_offset(f"out_{f.name}", f, s))
        stores.append(f"tl.store({ptr}, y_{s.name}.to(out_{f.name}_ptr.dtype.element_ty), mask=mask)")

    # the block's first token, lifted and combined with the carry at [BLOCK_L, 1]: the scan then
    # yields prefixes that include the carry, with no combine over the whole block
    from .triton_adjoint import _lift_lines

    first = []
    lift_inputs = {sym.name[2:] for a in sop.lift.assigns for sym in a.expr.free_symbols}
    for f in sop.inputs:
        for s in sop.slots(f):
            if s.name not in lift_inputs:
                continue
            ptr = _plus(f"in_{f.name}_base + start * in_{f.name}_st", _field_offset(f"in_{f.name}", f, s))
            cast = ".to(ACC)" if ir.is_float(f.dtype) and f.dtype != "f64" else ""
            first.append(f"xf_{s.name} = tl.load({ptr}, mask=lane_ok[:, None], other=0){cast}")
    first += _lift_lines(sop, "xf", "f", "z", None, shape="[BLOCK_L, 1]")
    first.append(f"{_tuple([f'f_{s.name}' for s in slots])} = {name}_combine("
                 f"{', '.join(f'c_{s.name}' for s in slots)}, {', '.join(f'f_{s.name}' for s in slots)})")
    first += [f"e_{s.name} = tl.where(is_first, f_{s.name}, e_{s.name})" for s in slots]

    def last(dst: str, where: str) -> list[str]:  # the tile's last prefix, as [BLOCK_L, 1]
        return [f"{dst}_{s.name} = tl.reduce(tl.where({where}, s_{s.name}, 0), 1, _psmc_add, keep_dims=True)"
                for s in slots]

    return render(
        "triton_scan.j2",
        first_lines=first,
        name=name,
        combine_params=params,
        combine_where=sop.where("combine"),
        combine_body=cbody,
        combine_returns=crets,
        ckpt_block=["if STORE_CKPT:  # the state before this block, for the backward's recomputation"]
        + [f"    {line}" for line in ckpts],
        carry_updates=last("c", "is_last"),
        arg_groups=arg_groups,
        totals_arg_groups=totals_arg_groups,
        bases=bases,
        lift_bases=[base(f"in_{f.name}") for f in lift_fields],
        lift_offsets=[f"in_{f.name}_t = in_{f.name}_base + t[None, :] * in_{f.name}_st" for f in lift_fields],
        lift_loads=lift_loads,
        totals_bases=totals_bases,
        totals_loads=totals_loads,
        totals_last=last("p", "k_last"),
        totals_tuple=_tuple([f"p_{s.name}" for s in slots]),
        totals_list=", ".join(f"p_{s.name}" for s in slots),
        totals_stores=totals_stores,
        identity_where=f"{sop.path}:{sop.op.state[0].loc.line} state",
        init_loads=init_loads,
        identity_fills=fills,
        time_offsets=time_offsets,
        loads=loads,
        lift_where=sop.where("lift"),
        lift_body=lift,
        scan_tuple=_tuple([f"s_{s.name}" for s in slots]),
        scan_list=", ".join(f"s_{s.name}" for s in slots),
        element_tuple=_tuple([f"e_{s.name}" for s in slots]),
        carry_tuple=_tuple([f"c_{s.name}" for s in slots]),
        carry_list=", ".join(f"c_{s.name}" for s in slots),
        output_where=sop.where("output"),
        output_body=out,
        stores=stores,
        final_stores=finals,
    )
