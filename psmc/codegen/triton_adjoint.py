"""The derived backward as a Triton reverse-scan kernel (templates/triton_adjoint_scan.j2).

Saved states or recomputation? Recomputation, per block. The forward stores only its carry at
the start of every block of BLOCK_T tokens (one state per block: ~1/BLOCK_T of the tokens). The
backward must read every input anyway (the Jacobians are functions of the tokens), so rebuilding
the block's states from that checkpoint costs arithmetic only: one forward scan and one combine per
token. Saving every state would instead write n_state tensors in the forward and read them back,
which for linrec is 2 extra passes over memory on top of the 5 the backward needs (read a, b, gy;
write ga, gb). Arithmetic is what these kernels have to spare.

The states a token's Jacobians need are s_{t-1} and s_t. A tile cannot be shifted by one position,
so s_{t-1} comes from a scan of the *previous* tokens' elements (loaded at t - 1: the same bytes,
served by the cache) started from the checkpoint, and s_t = combine(s_{t-1}, e_t). Likewise the
adjoint coefficient A_t = (∂combine/∂l)(s_t, e_{t+1})ᵀ reads token t + 1.
"""

from __future__ import annotations

import sympy as sp

from .. import ir
from . import scalarize as S
from .adjoint import Adjoint
from .templates import render
from .triton_expr import texpr
from .triton_scan import _field_offset, _literal, _plus, _tuple, state_dtype, tensor_args

# The adjoint scan carries the coefficient pattern and the live vector; above this, no kernel.
MAX_ADJOINT_SCALARS = 32


def supported(adj: Adjoint) -> str | None:
    """Why the reverse-scan backward cannot be generated (None when it can)."""
    if not adj.live:
        return "no gradient flows through its state"
    if adj.crosses_lanes:
        return "its adjoint sums over lanes (a lane-free state depends on lane fields)"
    if adj.scan_scalars() > MAX_ADJOINT_SCALARS:
        return (f"its adjoint scan would carry {adj.scan_scalars()} scalars "
                f"(at most {MAX_ADJOINT_SCALARS})")
    return None


def _statements(targets: list[tuple[str, sp.Expr]], tmp: str) -> tuple[list[str], list[tuple[str, str, bool]]]:
    """CSE over the targets: temp lines, and (name, printed value, is constant) per target."""
    exprs = [sp.sympify(e) for _, e in targets]
    reps, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(tmp), order="none")
    lines = [f"{s} = {texpr(v)}" for s, v in reps]
    return lines, [(n, texpr(v), not v.free_symbols) for (n, _), v in zip(targets, reduced)]


def _lift_lines(sop: S.ScalarOp, x_prefix: str, out_prefix: str, tmp: str, cond: str | None,
                needed: set[str] | None = None, shape: str = "[BLOCK_L, BLOCK_T]") -> list[str]:
    """lift applied to the inputs named `{x_prefix}_*`, as `{out_prefix}_*` tiles.

    With `cond`, positions where it fails hold the identity."""
    subs = {s.symbol("x"): S.sym(f"{x_prefix}_{s.name}") for s in sop.input_slots}
    targets = [(f"{out_prefix}_{a.name}", a.expr.xreplace(subs)) for a in sop.lift.assigns
               if needed is None or a.name in needed]
    slots = {s.name: s for s in sop.state_slots}
    lines, outs = _statements(targets, tmp)
    for name, value, const in outs:
        s = slots[name[len(out_prefix) + 1:]]
        dt = state_dtype(s.dtype)
        value = f"tl.full({shape}, {value}, {dt})" if const else f"({value}).to({dt})"
        if cond is not None:
            value = f"tl.where({cond}, {value}, {_literal(sop.identity_value(s))})"
        lines.append(f"{name} = {value}")
    return lines


def _adjoint_combine(adj: Adjoint) -> tuple[str, list[str], str]:
    """Composition of the adjoint's affine maps restricted to the coefficient pattern."""
    live = adj.live
    P = sorted(adj.pattern)
    Pset = set(P)
    mname = {(a, b): f"M_{live[a].name}__{live[b].name}" for a, b in P}
    vname = {a: f"v_{live[a].name}" for a in range(len(live))}
    names = [mname[k] for k in P] + [vname[a] for a in range(len(live))]
    params = ", ".join([f"l_{n}" for n in names] + [f"r_{n}" for n in names])
    L = {n: S.sym(f"l_{n}") for n in names}
    R = {n: S.sym(f"r_{n}") for n in names}
    targets = []
    for a, b in P:  # M = r.M @ l.M (r: the earlier token, applied last)
        terms = [R[mname[(a, c)]] * L[mname[(c, b)]] for c in range(len(live))
                 if (a, c) in Pset and (c, b) in Pset]
        targets.append((mname[(a, b)], sp.Add(*terms)))
    for a in range(len(live)):  # v = r.M @ l.v + r.v
        terms = [R[mname[(a, c)]] * L[vname[c]] for c in range(len(live)) if (a, c) in Pset]
        targets.append((vname[a], sp.Add(*terms) + R[vname[a]]))
    lines, outs = _statements(targets, "k")
    lines += [f"{n} = {v}" for n, v, _ in outs]
    rets = [f"{n}.to(l_{n}.dtype)" for n in names]
    return params, lines, _tuple(rets)


def spec(sop: S.ScalarOp) -> dict:
    return {
        "gy": [f.name for f in sop.outputs if ir.is_float(f.dtype)],
        "gx": [f.name for f in sop.inputs if ir.is_float(f.dtype)],
    }


def saved_states(sop: S.ScalarOp, adj: Adjoint) -> dict[str, tuple[S.FieldInfo, S.Slot]] | None:
    """The outputs that *are* the states the backward reads (y = s.h), by state slot, or None.

    When every state the Jacobians need (s_{t-1} and s_t) was written by the forward as an output
    in full precision, the backward reads those instead of recomputing them: no forward scan and
    no loads of the previous token. For linrec this is h, and the backward reads a, y and gy and
    writes ga and gb, like a hand-written one.
    """
    needed = adj.needs("p") | adj.needs("s")
    found: dict[str, tuple[S.FieldInfo, S.Slot]] = {}
    for f in sop.outputs:
        if not ir.is_float(f.dtype):
            continue
        slots = sop.slots(f)
        for a in sop.output.assigns:
            if a.field != f.name or not isinstance(a.expr, sp.Symbol) or not a.expr.name.startswith("s_"):
                continue
            slot = next(s for s in slots if s.index == a.index)
            found.setdefault(a.expr.name[2:], (f, slot))
    if not needed <= set(found):
        return None
    return {k: found[k] for k in sorted(needed)}


def generate(op: ir.Op, sop: S.ScalarOp, adj: Adjoint, suffix: str = "",
             saved: dict[str, tuple[S.FieldInfo, S.Slot]] | None = None) -> str:
    """The backward kernel `{op}_backward{suffix}_kernel` for one derived adjoint; with `saved`
    (see saved_states) the states come from the forward's outputs instead of a recomputation."""
    name = op.name
    slots = sop.state_slots
    live = adj.live
    P = sorted(adj.pattern)
    float_inputs = [f for f in sop.inputs if ir.is_float(f.dtype)]
    float_outputs = [f for f in sop.outputs if ir.is_float(f.dtype)]
    adj_params, adj_body, adj_rets = _adjoint_combine(adj)

    arg_groups = [tensor_args(f"in_{f.name}", f, True) for f in sop.inputs]
    arg_groups += [tensor_args(f"gy_{f.name}", f, True) for f in float_outputs]
    arg_groups += [tensor_args(f"gx_{f.name}", f, True) for f in float_inputs]
    arg_groups += [tensor_args(f"ckpt_{f.name}", f, True) for f in sop.state]
    arg_groups += [tensor_args(f"gfinal_{f.name}", f, False) for f in sop.state]
    saved_fields = [] if saved is None else list(dict.fromkeys(f.name for f, _ in saved.values()))
    out_info = {f.name: f for f in sop.outputs}
    arg_groups += [tensor_args(f"sy_{n}", out_info[n], True) for n in saved_fields]

    def base(prefix: str) -> str:
        return (f"{prefix}_base = {prefix}_ptr + o0 * {prefix}_so0 + o1 * {prefix}_so1 "
                f"+ lanes64[:, None] * {prefix}_sl")

    timed = [f"in_{f.name}" for f in sop.inputs] + [f"gy_{f.name}" for f in float_outputs] \
        + [f"gx_{f.name}" for f in float_inputs] + [f"ckpt_{f.name}" for f in sop.state] \
        + [f"sy_{n}" for n in saved_fields]
    bases = [base(p) for p in timed]
    time_offsets = [f"{p}_t = {p}_base + t[None, :] * {p}_st" for p in timed if not p.startswith("ckpt")]

    # which input scalars are read where
    next_needed = adj.needs("n")
    next_inputs = {s.name[2:] for a in sop.lift.assigns if a.name in next_needed
                   for s in a.expr.free_symbols}
    if saved is None:  # the recomputation lifts every token t - 1 and t
        lift_inputs = {s.name[2:] for a in sop.lift.assigns for s in a.expr.free_symbols}
        now_needed = {a.name for a in sop.lift.assigns}
    else:
        lift_inputs = set()
        now_needed = adj.needs("e")
    now_inputs = adj.needs("x") | {s.name[2:] for a in sop.lift.assigns if a.name in now_needed
                                   for s in a.expr.free_symbols}
    loads = []
    for f in sop.inputs:
        cast = ".to(ACC)" if ir.is_float(f.dtype) and f.dtype != "f64" else ""
        for s in sop.slots(f):
            off = _field_offset(f"in_{f.name}", f, s)
            here = _plus(f"in_{f.name}_t", off)
            if s.name in now_inputs:
                loads.append(f"x_{s.name} = tl.load({here}, mask=mask, other=0){cast}")
            if s.name in lift_inputs:
                loads.append(f"xp_{s.name} = tl.load({here} - in_{f.name}_st, mask=prev_ok, other=0){cast}")
            if s.name in next_inputs:
                loads.append(f"xn_{s.name} = tl.load({here} + in_{f.name}_st, mask=next_ok, other=0){cast}")
    for f in float_outputs:
        for s in sop.slots(f):
            ptr = _plus(f"gy_{f.name}_t", _field_offset(f"gy_{f.name}", f, s))
            loads.append(f"gy_{s.name} = tl.load({ptr}, mask=mask, other=0).to(ACC)")

    state_lines = []
    ck_slots = sop.state_slots if saved is None else [s for s in sop.state_slots if s.name in adj.needs("p")]
    for f in sop.state:
        for s in sop.slots(f):
            if s not in ck_slots:
                continue
            ptr = _plus(f"ckpt_{f.name}_base + blk * ckpt_{f.name}_st", _field_offset(f"ckpt_{f.name}", f, s))
            state_lines.append(f"ck_{s.name} = tl.load({ptr}, mask=lane_ok[:, None], "
                               f"other={_literal(sop.identity_value(s))})")
    if saved is None:
        states_comment = (f"{sop.where('lift')} and {sop.where('combine')}: states s_{{t-1}} (p_) and "
                          f"s_t (s_) of this block,\n        # recomputed from the checkpoint taken before it")
        state_lines += _lift_lines(sop, "xp", "p", "u", "prev_ok")
        state_lines += _lift_lines(sop, "x", "e", "w", "mask")
        state_lines += _lift_lines(sop, "xn", "n", "q", None, next_needed)
        prev_tuple = _tuple([f"p_{s.name}" for s in slots])
        prev_list = ", ".join(f"p_{s.name}" for s in slots)
        # the first token's previous element is the identity: the checkpoint takes its place
        state_lines += [f"p_{s.name} = tl.where(is_first, ck_{s.name}, p_{s.name})" for s in slots]
        state_lines += [
            f"{prev_tuple} = tl.associative_scan(({prev_tuple}), 1, {name}_combine)",
            f"{_tuple([f's_{s.name}' for s in slots])} = {name}_combine({prev_list}, "
            f"{', '.join(f'e_{s.name}' for s in slots)})",
        ]
    else:
        states_comment = ("states s_{t-1} (p_) and s_t (s_): the forward wrote them as outputs "
                          f"({sop.where('output')})")
        for k, (f, oslot) in saved.items():
            here = _plus(f"sy_{f.name}_t", _field_offset(f"sy_{f.name}", f, oslot))
            if k in adj.needs("p"):
                state_lines.append(f"p_{k} = tl.where((t == 0)[None, :], ck_{k}, tl.load({here} - sy_{f.name}_st, "
                                   f"mask=mask & (t > 0)[None, :], other=0).to(ACC))")
            if k in adj.needs("s"):
                state_lines.append(f"s_{k} = tl.load({here}, mask=mask, other=0).to(ACC)")
        state_lines += _lift_lines(sop, "x", "e", "w", "mask", now_needed)
        state_lines += _lift_lines(sop, "xn", "n", "q", None, next_needed)

    # adjoint elements
    mname = {(a, b): f"M_{live[a].name}__{live[b].name}" for a, b in P}
    vname = {a: f"v_{live[a].name}" for a in range(len(live))}
    entry = {(e.target.name, e.source.name): e.expr for e in adj.entries}
    targets = [(mname[(a, b)], entry.get((live[a].name, live[b].name), sp.S.Zero)) for a, b in P]
    targets += [(vname[a], adj.sources[live[a].name]) for a in range(len(live))]
    lines, outs = _statements(targets, "j")
    adjoint_elements = list(lines)
    for (n, v, const), key in zip(outs, P + [None] * len(live)):
        if key is not None:
            ident = "1.0" if key[0] == key[1] else "0.0"
            value = f"tl.full([BLOCK_L, BLOCK_T], {v}, ACC)" if const else v
            adjoint_elements.append(f"{n} = tl.where(next_ok, {value}, {ident})")
        else:
            value = f"tl.full([BLOCK_L, BLOCK_T], {v}, ACC)" if const else v
            adjoint_elements.append(f"{n} = tl.where(mask, {value}, 0.0)")
    adj_names = [mname[k] for k in P] + [vname[a] for a in range(len(live))]

    # lam_t = v + M @ carry, then the carry moves to the block's first token
    lam_lines = []
    for a in range(len(live)):
        terms = [f"{mname[(a, b)]} * lamc_{live[b].name}" for b in range(len(live)) if (a, b) in adj.pattern]
        lam_lines.append(f"lam_{live[a].name} = {vname[a]} + " + " + ".join(terms))
    for s in live:
        lam_lines.append(f"lamc_{s.name} = tl.reduce(tl.where(is_first, lam_{s.name}, 0.0), 1, _psmc_add, "
                         f"keep_dims=True)")

    ge = [(f"ge_{k}", v) for k, v in adj.element_grads.items()
          if any(S.sym(f"ge_{k}") in g.free_symbols for g in adj.input_grads.values())]
    gx = [(f"gx_{k}", v) for k, v in adj.input_grads.items()]
    grad_lines, outs = _statements(ge + gx, "g")
    for n, v, const in outs:
        grad_lines.append(f"{n} = tl.full([BLOCK_L, BLOCK_T], {v}, ACC)" if const else f"{n} = {v}")
    stores = []
    for f in float_inputs:
        for s in sop.slots(f):
            ptr = _plus(f"gx_{f.name}_t", _field_offset(f"gx_{f.name}", f, s))
            stores.append(f"tl.store({ptr}, gx_{s.name}.to(gx_{f.name}_ptr.dtype.element_ty), mask=mask)")

    gfinal_loads, gfinal_zeros = [], []
    for f in sop.state:
        for s in sop.slots(f):
            if s not in live:
                continue
            ptr = _plus(f"gfinal_{f.name}_ptr + o0 * gfinal_{f.name}_so0 + o1 * gfinal_{f.name}_so1 "
                        f"+ lanes64 * gfinal_{f.name}_sl", _field_offset(f"gfinal_{f.name}", f, s))
            gfinal_loads.append(f"lamc_{s.name} = tl.load({ptr}, mask=lane_ok, other=0).to(ACC)[:, None]")
            gfinal_zeros.append(f"lamc_{s.name} = tl.full([BLOCK_L, 1], 0, ACC)")
    if not live:  # nothing flows back through the state
        gfinal_loads = gfinal_zeros = ["pass"]

    return render(
        "triton_adjoint_scan.j2",
        name=name,
        kernel_name=f"{name}_backward{suffix}_kernel",
        combine_name=f"{name}_adjoint{suffix}_combine",
        adj_params=adj_params,
        adj_body=adj_body,
        adj_returns=adj_rets,
        arg_groups=arg_groups,
        bases=bases,
        gfinal_loads=gfinal_loads,
        gfinal_zeros=gfinal_zeros,
        time_offsets=time_offsets,
        loads=loads,
        lift_where=sop.where("lift"),
        combine_where=sop.where("combine"),
        output_where=sop.where("output"),
        states_comment=states_comment,
        state_lines=state_lines,
        adjoint_elements=adjoint_elements,
        adj_tuple=_tuple(adj_names),
        lam_lines=lam_lines,
        grad_lines=grad_lines,
        stores=stores,
    )
