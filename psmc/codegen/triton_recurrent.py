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
from . import tile_adjoint
from .templates import render
from .triton_scan import tensor_args
from .tile_adjoint import tile_dims
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


def _ranges(sizes: set[int]) -> list[str]:
    out = []
    for n in sorted(sizes):
        out.append(f"ar_{n} = tl.arange(0, {pad(n)})")
        if pad(n) != n:
            out.append(f"ok_{n} = ar_{n} < {n}")
    return out


def _input_loads(sop: S.ScalarOp, fields: _Fields) -> tuple[list[str], list[str]]:
    """The input tiles' pointers, and the loads of token t (x_*, in ACC)."""
    tiles, loads = [], []
    for f in sop.inputs:
        p = f"in_{f.name}"
        tiles.append(f"{p}_tile = {p}_ptr + {fields.offsets(p, f)}")
        m = fields.mask(f)
        cast = ".to(ACC)" if ir.is_float(f.dtype) and f.dtype != "f64" else ""
        mask = f", mask={m}, other=0" if m else ""
        loads.append(f"x_{f.name} = tl.load({p}_tile + t * {p}_st{mask}){cast}")
    return tiles, loads


def _step(op: ir.Op, sop: S.ScalarOp, fields: _Fields, sizes: set[int]) -> tuple[list[str], list[str]]:
    """e_* = lift(x_t), then h_* = combine(h_*, e_*)."""
    state = {f.name: f for f in sop.state}
    x_env = {("x", f.name): f"x_{f.name}" for f in sop.inputs}
    lift = _body(op.lift, x_env, "lt_", "e", state, fields, sizes)
    cenv = {**{("l", f.name): f"h_{f.name}" for f in sop.state},
            **{("r", f.name): f"e_{f.name}" for f in sop.state}}
    comb = _body(op.combine, cenv, "ct_", "n", state, fields, sizes)
    comb += [f"h_{f.name} = n_{f.name}" for f in sop.state]
    return lift, comb


def spec(sop: S.ScalarOp, backward: bool = False) -> dict:
    """The scan spec; with `backward`, what the backward launcher needs: the float outputs (gy)
    and inputs (gx), and the lane-free inputs whose gradients come in per-program shares."""
    from .triton_scan import spec as scan_spec

    out = scan_spec(sop)
    out["backward"] = None
    if backward:
        gx = [f for f in sop.inputs if ir.is_float(f.dtype)]
        out["backward"] = {
            "gy": [f.name for f in sop.outputs if ir.is_float(f.dtype)],
            "gx": [f.name for f in gx],
            "partial": [f.name for f in gx if f.lane_axis is None],
            "final": True,
        }
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
    arg_groups += [tensor_args(f"ckpt_{f.name}", f, True) for f in sop.state]

    tiles, loads = _input_loads(sop, fields)
    stores_out = []
    for f in sop.outputs:
        p = f"out_{f.name}"
        tiles.append(f"{p}_tile = {p}_ptr + {fields.offsets(p, f)}")
        m = fields.mask(f)
        stores_out.append(f"tl.store({p}_tile + t * {p}_st, y_{f.name}.to({p}_ptr.dtype.element_ty)"
                          + (f", mask={m})" if m else ")"))

    init_loads, fills, finals, ckpts = [], [], [], []
    for f in sop.state:
        m = fields.mask(f)
        dt = _dtype(f.dtype)
        mask = f", mask={m}, other={literal(sop.identity[f.name]) if sop.identity[f.name] != 'eye' else 0}" if m else ""
        init_loads.append(f"h_{f.name} = tl.load(init_{f.name}_ptr + {fields.offsets(f'init_{f.name}', f)}"
                          f"{mask}).to({dt})")
        fills.append(f"h_{f.name} = {_identity(sop, f, fields)}")
        finals.append(f"tl.store(final_{f.name}_ptr + {fields.offsets(f'final_{f.name}', f)}, h_{f.name}"
                      + (f", mask={m})" if m else ")"))
        ckpts.append(f"tl.store(ckpt_{f.name}_ptr + {fields.offsets(f'ckpt_{f.name}', f)} "
                     f"+ (t // CKPT_T) * ckpt_{f.name}_st, h_{f.name}" + (f", mask={m})" if m else ")"))

    outs = {f.name: f for f in sop.outputs}
    x_env = {("x", f.name): f"x_{f.name}" for f in sop.inputs}
    lift, comb = _step(op, sop, fields, sizes)
    oenv = {**{("s", f.name): f"h_{f.name}" for f in sop.state}, **x_env}
    out = _body(op.output, oenv, "ot_", "y", outs, fields, sizes) + stores_out

    return render(
        "triton_recurrent.j2",
        name=op.name,
        lane_name=sop.lane.name,
        arg_groups=arg_groups,
        ranges=_ranges(fields.sizes | sizes),
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
        ckpt_stores=ckpts,
    )


# ---- the backward --------------------------------------------------------------------------

def backward_why_not(op: ir.Op, sop: S.ScalarOp) -> str | None:
    """Why no backward kernel can be derived for this op (None when it can)."""
    if sop.lane is None:
        return "it has no lane dim"
    if not any(ir.is_float(f.dtype) for f in sop.inputs):
        return "it has no float inputs"
    try:
        generate_backward(op, sop)
    except PsmError as e:
        return e.message
    return None


def _flat(f: S.FieldInfo) -> tuple[str, str]:
    """(elements of the field's tile, the flat offset of every tile position) for the scratch."""
    dims = tile_dims(f.shape, f.lane_axis)
    rank = len(dims)
    terms = []
    for a, n in enumerate(f.shape):
        ar = "ar_lane" if a == f.lane_axis else f"ar_{n}"
        stride = " * ".join(dims[a + 1:])
        terms.append(f"{ar}{_key(a, rank)}" + (f" * {stride}" if stride else ""))
    return (" * ".join(dims) or "1"), (" + ".join(terms) or "0")


def generate_backward(op: ir.Op, sop: S.ScalarOp) -> str:
    """`{op}_recurrent_backward_kernel`: the adjoint recurrence, derived with tile_adjoint.

    With e_t = lift(x_t), s_t = combine(s_{t-1}, e_t), y_t = output(s_t, x_t) and lam_t =
    dLoss/ds_t, one step backwards is

        lam_t += (d output / d s)^T gy_t          gx_t  = (d output / d x)^T gy_t
        ge_t   = (d combine / d r)^T lam_t        gx_t += (d lift / d x)^T ge_t
        lam_{t-1} = (d combine / d l)^T lam_t     (Jacobians at s_{t-1}, e_t and s_t, x_t)

    every product a VJP of the IR (tile_adjoint.TileVJP), none a Jacobian.

    The states s_{t-1}, s_t are needed backwards in time. Running the recurrence backwards
    (s_{t-1} = (s_t - k v^T) / exp(gk) for gla) divides by decays that underflow: unstable.
    Storing every state costs T * K * V floats per head. So the forward keeps a checkpoint before
    every block of CKPT_T tokens (T / CKPT_T states), and the backward, block by block from the
    last, recomputes the block's CKPT_T states from it into a per-program scratch (CKPT_T tiles:
    small enough to stay in L2) and walks the block backwards reading them: one extra forward in
    arithmetic, no recurrence run backwards.

    Lane-free fields (gla's d, q, k, gk) are shared by all lanes, so their gradients sum over the
    lanes, which are split over programs. Each program writes its share to its own slice of a
    [n_lane_blocks, ...] buffer and the launcher sums the slices: deterministic (atomics would
    add in a different order each run) and, for the few lane blocks there are, cheap. This is
    exact because a lane-free state never reads a lane field (else V would not be a lane dim), so
    lane adjoints never read lane-free ones, and everything else is linear in the shares.
    """
    lanes = tile_adjoint.lane_axes(op, sop)
    fields = _Fields(sop)
    sizes: set[int] = set()
    float_in = [f for f in sop.inputs if ir.is_float(f.dtype)]
    float_out = [f for f in sop.outputs if ir.is_float(f.dtype)]
    float_state = [f for f in sop.state if ir.is_float(f.dtype)]
    state = {f.name: f for f in sop.state}
    arg_groups = [tensor_args(f"in_{f.name}", f, True) for f in sop.inputs]
    arg_groups += [tensor_args(f"gy_{f.name}", f, True) for f in float_out]
    arg_groups += [tensor_args(f"gx_{f.name}", f, True) for f in float_in]
    arg_groups += [tensor_args(f"ckpt_{f.name}", f, True) for f in sop.state]
    arg_groups += [tensor_args(f"gfinal_{f.name}", f, False) for f in sop.state]
    arg_groups += [tensor_args(f"ginit_{f.name}", f, False) for f in sop.state]
    work_args = ", ".join(f"work_{f.name}_ptr" for f in sop.state)
    partial = [f for f in float_in if f.lane_axis is None]
    partial_state = [f for f in float_state if f.lane_axis is None]
    partial_args = ", ".join([f"gx_{f.name}_sp" for f in partial] + [f"ginit_{f.name}_sp" for f in partial_state])

    tiles, loads = _input_loads(sop, fields)
    gy_loads = []
    for f in float_out:
        p = f"gy_{f.name}"
        tiles.append(f"{p}_tile = {p}_ptr + {fields.offsets(p, f)}")
        m = fields.mask(f)
        load = f"tl.load({p}_tile + t * {p}_st" + (f", mask={m}, other=0)" if m else ")") + ".to(ACC)"
        if f.lane_axis is None:
            load = f"tl.where(block0, {load}, 0.0)"
        gy_loads.append(f"gy_{f.name} = {load}")
    stores = []
    for f in float_in:
        p = f"gx_{f.name}"
        share = f" + lane_block * {p}_sp" if f.lane_axis is None else ""
        tiles.append(f"{p}_tile = {p}_ptr{share} + {fields.offsets(p, f)}")
        m = fields.mask(f)
        stores.append(f"tl.store({p}_tile + t * {p}_st, gx_{f.name}.to({p}_ptr.dtype.element_ty)"
                      + (f", mask={m})" if m else ")"))
    work_stores, work_loads, ckpt_loads = [], [], []
    for f in sop.state:
        elems, flat = _flat(f)
        size = "" if elems == "1" else f" * {elems}"
        tiles.append(f"work_{f.name} = work_{f.name}_ptr + pid.to(tl.int64) * (CKPT_T{size})"
                     + ("" if flat == "0" else f" + {flat}"))
        work_stores.append(f"tl.store(work_{f.name} + j{size}, h_{f.name})")
        work_loads.append(f"p_{f.name} = tl.load(work_{f.name} + (t - start){size})")
        m = fields.mask(f)
        ckpt_loads.append(f"h_{f.name} = tl.load(ckpt_{f.name}_ptr + {fields.offsets(f'ckpt_{f.name}', f)} "
                          f"+ blk * ckpt_{f.name}_st" + (f", mask={m}, other=0)" if m else ")"))
    gfinal_loads, gfinal_zeros = [], []
    for f in float_state:
        m = fields.mask(f)
        load = (f"tl.load(gfinal_{f.name}_ptr + {fields.offsets(f'gfinal_{f.name}', f)}"
                + (f", mask={m}, other=0)" if m else ")") + ".to(ACC)")
        if f.lane_axis is None:
            load = f"tl.where(block0, {load}, 0.0)"
        gfinal_loads.append(f"lam_{f.name} = {load}")
        gfinal_zeros.append(f"lam_{f.name} = tl.full({fields.shape(f)}, 0, ACC)")
    ginit_stores = []  # after the first token, lam_ is the initial state's gradient
    for f in float_state:
        m = fields.mask(f)
        share = f" + lane_block * ginit_{f.name}_sp" if f.lane_axis is None else ""
        ginit_stores.append(f"tl.store(ginit_{f.name}_ptr{share} + {fields.offsets(f'ginit_{f.name}', f)}, "
                            f"lam_{f.name}" + (f", mask={m})" if m else ")"))

    lift, comb = _step(op, sop, fields, sizes)
    x_env = {("x", f.name): f"x_{f.name}" for f in sop.inputs}
    gx_terms: dict[str, list[str]] = {f.name: [] for f in float_in}

    # output at (s_t, x_t)
    oenv = {**{("s", f.name): f"h_{f.name}" for f in sop.state}, **x_env}
    vo = tile_adjoint.TileVJP(op.output, oenv, "ot_", {"s", "x"}, "go_", lanes)
    vo.run({f.name: f"gy_{f.name}" for f in float_out}, {f.name: f for f in sop.outputs})
    output_grad = _lets(op.output, oenv, "ot_", sizes) + vo.lines
    for f in float_state:
        g = vo.total("s", f.name)
        if g:
            output_grad.append(f"lam_{f.name} = lam_{f.name} + {g}")
    for f in float_in:
        if vo.total("x", f.name):
            gx_terms[f.name].append(vo.total("x", f.name))

    # combine at (s_{t-1}, e_t)
    cenv = {**{("l", f.name): f"p_{f.name}" for f in sop.state},
            **{("r", f.name): f"e_{f.name}" for f in sop.state}}
    vc = tile_adjoint.TileVJP(op.combine, cenv, "ct_", {"l", "r"}, "gc_", lanes)
    vc.run({f.name: f"lam_{f.name}" for f in float_state}, state)
    combine_grad = _lets(op.combine, cenv, "ct_", sizes) + vc.lines
    ge = {}
    for f in float_state:
        g = vc.total("r", f.name)
        if g:
            ge[f.name] = f"ge_{f.name}"
            combine_grad.append(f"ge_{f.name} = {g}")
    carry = []
    for f in float_state:
        g = vc.total("l", f.name)
        zero = f"tl.full({fields.shape(f)}, 0, ACC)"  # not tl.zeros: a library jit function (triton_expr.py)
        combine_grad.append(f"gs_{f.name} = {g or zero}")
        carry.append(f"lam_{f.name} = gs_{f.name}")
    carry += [f"h_{f.name} = p_{f.name}" for f in sop.state]

    # lift at x_t
    vl = tile_adjoint.TileVJP(op.lift, x_env, "lt_", {"x"}, "gl_", lanes)
    vl.run(ge, state)
    lift_grad = list(vl.lines)
    for f in float_in:
        if vl.total("x", f.name):
            gx_terms[f.name].append(vl.total("x", f.name))
        terms = gx_terms[f.name]
        zero = f"tl.full({fields.shape(f)}, 0, ACC)"
        lift_grad.append(f"gx_{f.name} = " + (" + ".join(terms) if terms else zero))

    sizes |= vo.sizes | vc.sizes | vl.sizes
    ranges = ["ar_lane = tl.arange(0, BLOCK_L)"] if any(f.lane_axis is not None for f in sop.state) else []
    for f in sop.state:
        for a, n in enumerate(f.shape):
            if a != f.lane_axis:
                sizes.add(n)
    return render(
        "triton_recurrent_backward.j2",
        name=op.name,
        lane_name=sop.lane.name,
        arg_groups=arg_groups,
        work_args=work_args,
        partial_args=partial_args,
        ranges=ranges + _ranges(fields.sizes | sizes),
        tiles=tiles,
        gfinal_loads=gfinal_loads or ["pass"],
        gfinal_zeros=gfinal_zeros or ["pass"],
        ginit_stores=ginit_stores or ["pass"],
        identity_where=f"{sop.path}:{op.state[0].loc.line} state",
        ckpt_loads=ckpt_loads,
        work_stores=work_stores,
        work_loads=work_loads,
        loads=loads,
        gy_loads=gy_loads,
        lift_where=sop.where("lift"),
        lift_body=lift,
        combine_where=sop.where("combine"),
        combine_body=comb,
        output_where=sop.where("output"),
        output_grad=output_grad,
        combine_grad=combine_grad,
        lift_grad=lift_grad,
        stores=stores,
        carry=carry,
    )


def _lets(fn: ir.Function, env: dict, local: str, sizes: set[int]) -> list[str]:
    """The `let`s of a function: the forward values its backward reads."""
    pr = TilePrinter(env, local)
    lines = [f"{local}{st.name} = {pr(st.value)}" for st in fn.body if isinstance(st, ir.Let)]
    sizes |= pr.sizes
    return lines
