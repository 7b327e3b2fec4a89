"""Strategy `recurrent`: an associative op whose state is too large to scalarize (gla's S: [K, V]).

The kernel (templates/triton_recurrent.j2) keeps every state field on chip as a whole tile and
walks T one token at a time: `S ← combine(S, lift(x_t))`, then `y_t = output(S, x_t)`, exactly
the streaming definition, with lift and output fused into the loop and only the outputs (and
optionally the final state) written. The state is split across programs along the op's lane dim
(gla's V): each program owns BLOCK_L lanes of one batch element, and fields without the lane axis
(gla's d[K]) are kept whole in every program. Loads of later tokens do not depend on the state,
so `tl.range(num_stages=STAGES)` lets Triton prefetch them.
"""

from __future__ import annotations

from .. import ir
from ..errors import PsmError
from . import scalarize as S
from .templates import render
from .triton_scan import tensor_args
from .triton_tile import TilePrinter, axis_mask, literal, pad

_DT = {"bool": "tl.int1", "i32": "tl.int32", "i64": "tl.int64", "f64": "tl.float64"}


def _key(axis: int, rank: int) -> str:
    if rank <= 1:
        return ""
    return "[" + ", ".join(":" if a == axis else "None" for a in range(rank)) + "]"


class _Fields:
    """Tile shapes, offsets and masks of the fields of one op."""

    def __init__(self, sop: S.ScalarOp):
        self.sop = sop
        self.sizes: set[int] = set()

    def shape(self, f: S.FieldInfo) -> str:
        dims = ["BLOCK_L" if a == f.lane_axis else str(pad(n)) for a, n in enumerate(f.shape)]
        return "[" + ", ".join(dims) + "]"

    def offsets(self, prefix: str, f: S.FieldInfo) -> str:
        rank = len(f.shape)
        terms = [f"o0 * {prefix}_so0", f"o1 * {prefix}_so1"]
        k = 0
        for a, n in enumerate(f.shape):
            if a == f.lane_axis:
                terms.append(f"lanes64{_key(a, rank)} * {prefix}_sl")
            else:
                self.sizes.add(n)
                terms.append(f"ar_{n}{_key(a, rank)} * {prefix}_sf{k}")
                k += 1
        return " + ".join(terms)

    def mask(self, f: S.FieldInfo) -> str | None:
        rank = len(f.shape)
        parts = []
        for a, n in enumerate(f.shape):
            if a == f.lane_axis:
                parts.append(f"lane_ok{_key(a, rank)}")
            else:
                m = axis_mask(n, a, rank)
                if m:
                    self.sizes.add(n)
                    parts.append(m)
        return " & ".join(parts) if parts else None


def _dtype(dtype: str) -> str:
    return _DT.get(dtype, "ACC")


def _body(fn: ir.Function, env: dict, local: str, out_prefix: str, targets: dict[str, S.FieldInfo],
          fields: _Fields, printer_sizes: set[int]) -> list[str]:
    pr = TilePrinter(env, local)
    lines = []
    for st in fn.body:
        value = pr(st.value)
        if isinstance(st, ir.Let):
            lines.append(f"{local}{st.name} = {value}")
            continue
        f = targets[st.name]
        if st.value.type.shape != f.shape:  # a constant or a broadcast value fills the field
            if not st.value.type.shape and isinstance(st.value, ir.Const):
                value = f"tl.full({fields.shape(f)}, {value}, {_dtype(f.dtype)})"
            else:
                value = f"tl.broadcast_to({value}, {fields.shape(f)})"
        elif f.dtype in _DT:
            value = f"({value}).to({_DT[f.dtype]})"
        lines.append(f"{out_prefix}_{st.name} = {value}")
    printer_sizes |= pr.sizes
    return lines


def _identity(sop: S.ScalarOp, f: S.FieldInfo, fields: _Fields) -> str:
    init = sop.identity[f.name]
    dt = _dtype(f.dtype)
    if init == "eye":
        n = f.shape[0]
        fields.sizes.add(n)
        return f"tl.where(ar_{n}[:, None] == ar_{n}[None, :], 1, 0).to({dt})"
    if isinstance(init, (tuple, list)):
        raise PsmError(f"strategy recurrent needs a number or eye as the identity of '{f.name}'",
                       None)
    if not f.shape:
        return f"tl.full([], {literal(init)}, {dt})"
    return f"tl.full({fields.shape(f)}, {literal(init)}, {dt})"


def spec(sop: S.ScalarOp) -> dict:
    from .triton_scan import spec as scan_spec

    out = scan_spec(sop)
    out["backward"] = None
    return out


def generate(op: ir.Op, sop: S.ScalarOp) -> str:
    if sop.lane is None:
        raise PsmError(f"{op.name}: strategy recurrent needs a lane dim to split the state over",
                       op.loc)
    fields = _Fields(sop)
    sizes: set[int] = set()
    arg_groups = [tensor_args(f"in_{f.name}", f, True) for f in sop.inputs]
    arg_groups += [tensor_args(f"out_{f.name}", f, True) for f in sop.outputs]
    arg_groups += [tensor_args(f"init_{f.name}", f, False) for f in sop.state]
    arg_groups += [tensor_args(f"final_{f.name}", f, False) for f in sop.state]

    tiles, loads = [], []
    for f in sop.inputs:
        p = f"in_{f.name}"
        tiles.append(f"{p}_tile = {p}_ptr + {fields.offsets(p, f)}")
        m = fields.mask(f)
        cast = ".to(ACC)" if ir.is_float(f.dtype) and f.dtype != "f64" else ""
        mask = f", mask={m}, other=0" if m else ""
        loads.append(f"x_{f.name} = tl.load({p}_tile + t * {p}_st{mask}){cast}")
    stores_out = []
    for f in sop.outputs:
        p = f"out_{f.name}"
        tiles.append(f"{p}_tile = {p}_ptr + {fields.offsets(p, f)}")
        m = fields.mask(f)
        stores_out.append(f"tl.store({p}_tile + t * {p}_st, y_{f.name}.to({p}_ptr.dtype.element_ty)"
                          + (f", mask={m})" if m else ")"))

    init_loads, fills, finals = [], [], []
    for f in sop.state:
        m = fields.mask(f)
        dt = _dtype(f.dtype)
        mask = f", mask={m}, other={literal(sop.identity[f.name]) if sop.identity[f.name] != 'eye' else 0}" if m else ""
        init_loads.append(f"h_{f.name} = tl.load(init_{f.name}_ptr + {fields.offsets(f'init_{f.name}', f)}"
                          f"{mask}).to({dt})")
        fills.append(f"h_{f.name} = {_identity(sop, f, fields)}")
        finals.append(f"tl.store(final_{f.name}_ptr + {fields.offsets(f'final_{f.name}', f)}, h_{f.name}"
                      + (f", mask={m})" if m else ")"))

    state = {f.name: f for f in sop.state}
    outs = {f.name: f for f in sop.outputs}
    x_env = {("x", f.name): f"x_{f.name}" for f in sop.inputs}
    lift = _body(op.lift, x_env, "lt_", "e", state, fields, sizes)
    cenv = {**{("l", f.name): f"h_{f.name}" for f in sop.state},
            **{("r", f.name): f"e_{f.name}" for f in sop.state}}
    comb = _body(op.combine, cenv, "ct_", "n", state, fields, sizes)
    comb += [f"h_{f.name} = n_{f.name}" for f in sop.state]
    oenv = {**{("s", f.name): f"h_{f.name}" for f in sop.state}, **x_env}
    out = _body(op.output, oenv, "ot_", "y", outs, fields, sizes) + stores_out

    all_sizes = sorted(fields.sizes | sizes)
    ranges = []
    for n in all_sizes:
        ranges.append(f"ar_{n} = tl.arange(0, {pad(n)})")
        if pad(n) != n:
            ranges.append(f"ok_{n} = ar_{n} < {n}")
    return render(
        "triton_recurrent.j2",
        name=op.name,
        lane_name=sop.lane.name,
        arg_groups=arg_groups,
        ranges=ranges,
        tiles=tiles,
        identity_where=f"{sop.path}:{op.state[0].loc.line} state",
        init_loads=init_loads,
        identity_fills=fills,
        loads=loads,
        lift_where=sop.where("lift"),
        lift_body=lift,
        combine_where=sop.where("combine"),
        combine_body=comb,
        output_where=sop.where("output"),
        output_body=out,
        final_stores=finals,
    )
