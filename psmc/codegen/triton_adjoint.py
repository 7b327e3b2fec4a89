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

Wide adjoints (see `scans`). The scan's tuple is the coefficient pattern plus the live adjoints;
past MAX_ADJOINT_SCALARS it splits into the groups no coefficient couples (Adjoint.components).
s5's adjoint is a 5 x 5 matrix whose rows are independent and share one transition, P_{t+1}ᵀ: as
one scan 125 coefficients + 25 values, as five 25 + 5 each, with the coefficients shared 25 + 25.
The shared form is one scan with a third of the arithmetic (each combine composes the coefficients
once); on sm_90 both spill at s5's tile, the shared one somewhat more (README, figures). Structural
zeros were already dropped: every entry of s5's λ is read by its output, so 25 are live.

Lane shares (see `generate`). softmax_attn's m and z are lane-free, but their adjoints gather
from every lane of o. Rather than a sequential backward (strategy recurrent's needs a lane dim to
split, and walks T one token at a time) the reverse scan carries lane-free adjoints as per-lane
shares summing to their values, which is exact because everything lane-free is linear in them.
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
# A scan whose groups share their coefficients may carry this many (s5: 25 + 5 x 5).
MAX_SHARED_SCALARS = 64


def scans(adj: Adjoint) -> list[list[list[int]]]:
    """The reverse scans the kernel runs. Each is a list of groups of live adjoints (indices into
    `adj.live`) that have the same coefficients, which the scan then carries once.

    One scan over all live adjoints when that fits in MAX_ADJOINT_SCALARS. Else the independent
    groups (Adjoint.components), packed in order into scans of at most MAX_ADJOINT_SCALARS scalars
    (the final-state adjoint of gla at K = V = 16, 64 scalars in 32 groups of 2, is two scans of
    32); but groups with equal coefficients that are too large to share a scan that way share the
    coefficients instead: s5's adjoint is the rows of λ, each with the transition P_{t+1}ᵀ
    (25 coefficients and 5 values a row), one scan of 25 + 5 x 5 scalars rather than five of 30."""
    everything = list(range(len(adj.live)))
    if not everything:  # no gradient flows through the state: nothing to scan
        return []
    if adj.scan_scalars() <= MAX_ADJOINT_SCALARS:
        return [[everything]]
    classes: dict[tuple, list[list[int]]] = {}
    for comp in adj.components:
        classes.setdefault(_coefficients(adj, comp), []).append(comp)
    out: list[list[list[int]]] = []
    alone: list[list[int]] = []
    for comps in classes.values():
        big = 2 * adj.scan_scalars(comps[0]) > MAX_ADJOINT_SCALARS  # two would not fit one scan
        if len(comps) > 1 and big and shared_scalars(adj, comps) <= MAX_SHARED_SCALARS:
            out.append(comps)
        else:
            alone += comps
    packed: list[list[int]] = []
    for comp in sorted(alone):
        if packed and adj.scan_scalars(packed[-1] + comp) <= MAX_ADJOINT_SCALARS:
            packed[-1] = packed[-1] + comp
        else:
            packed.append(list(comp))
    return sorted(out + [[g] for g in packed])


def shared_scalars(adj: Adjoint, groups: list[list[int]]) -> int:
    """Scalars of one scan over groups with equal coefficients: the coefficients once, then the
    values of every group."""
    return len(_local_pattern(adj, groups[0])) + sum(len(g) for g in groups)


def widest(adj: Adjoint) -> int:
    """Scalars of the widest scan the kernel runs (the launcher gives wide ones more warps)."""
    return max((shared_scalars(adj, scan) for scan in scans(adj)), default=0)


def _coefficients(adj: Adjoint, group: list[int]) -> tuple:
    """What makes two groups' recurrences the same: the pattern and the coefficient expressions,
    position by position within the group."""
    entry = {(e.target.name, e.source.name): e.expr for e in adj.entries}
    local = _local_pattern(adj, group)
    names = [adj.live[a].name for a in group]
    return tuple(local), tuple(entry[(names[a], names[b])] for a, b in local)


def supported(adj: Adjoint) -> str | None:
    """Why the reverse-scan backward cannot be generated (None when it can)."""
    for scan in scans(adj):
        if len(scan) == 1 and adj.scan_scalars(scan[0]) > MAX_ADJOINT_SCALARS:
            return (f"its adjoint scan would carry {adj.scan_scalars()} scalars, an independent part "
                    f"of it {adj.scan_scalars(scan[0])} (at most {MAX_ADJOINT_SCALARS})")
    return None


def lane_shares(*adjs: Adjoint | None) -> bool:
    """Whether the kernels carry lane-free adjoints as per-lane shares (see generate): when a
    lane-free adjoint gathers from lane quantities (Adjoint.crosses_lanes) in any of them."""
    return any(a is not None and a.crosses_lanes for a in adjs)


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


def _adjoint_combine(mname: dict[tuple[int, int], str], vnames: list[list[str]]) -> tuple[str, list[str], str]:
    """Composition of affine maps λ ↦ M λ + v restricted to the coefficient pattern (the keys of
    `mname`, positions in a group), for one or more groups of values (`vnames`) sharing M."""
    pattern = list(mname)
    Pset = set(pattern)
    n = len(vnames[0])
    params_ = [mname[k] for k in pattern] + [v for group in vnames for v in group]
    params = ", ".join([f"l_{p}" for p in params_] + [f"r_{p}" for p in params_])
    L = {p: S.sym(f"l_{p}") for p in params_}
    R = {p: S.sym(f"r_{p}") for p in params_}
    targets = []
    for a, b in pattern:  # M = r.M @ l.M (r: the earlier token, applied last)
        terms = [R[mname[(a, c)]] * L[mname[(c, b)]] for c in range(n)
                 if (a, c) in Pset and (c, b) in Pset]
        targets.append((mname[(a, b)], sp.Add(*terms)))
    for vname in vnames:  # v = r.M @ l.v + r.v
        for a in range(n):
            terms = [R[mname[(a, c)]] * L[vname[c]] for c in range(n) if (a, c) in Pset]
            targets.append((vname[a], sp.Add(*terms) + R[vname[a]]))
    lines, outs = _statements(targets, "k")
    lines += [f"{p} = {v}" for p, v, _ in outs]
    rets = [f"{p}.to(l_{p}.dtype)" for p in params_]
    return params, lines, _tuple(rets)


def _local_pattern(adj: Adjoint, group: list[int]) -> list[tuple[int, int]]:
    """The pattern restricted to one group, in positions within the group."""
    pos = {a: i for i, a in enumerate(group)}
    return sorted((pos[a], pos[b]) for a, b in adj.pattern if a in pos)


def spec(sop: S.ScalarOp, shares: bool = False) -> dict:
    """What the backward launcher needs: float outputs (gy), float inputs (gx), whether the kernels
    carry lane shares, and then the lane-free inputs whose gradients come as one share per block
    of lanes."""
    gx = [f for f in sop.inputs if ir.is_float(f.dtype)]
    return {
        "gy": [f.name for f in sop.outputs if ir.is_float(f.dtype)],
        "gx": [f.name for f in gx],
        "shares": shares,
        "partial": [f.name for f in gx if f.lane_axis is None] if shares else [],
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
             saved: dict[str, tuple[S.FieldInfo, S.Slot]] | None = None, shares: bool = False) -> str:
    """The backward kernel `{op}_backward{suffix}_kernel` for one derived adjoint; with `saved`
    (see saved_states) the states come from the forward's outputs instead of a recomputation.

    With `shares` (see lane_shares) the programs' lanes are lanes of the op's lane dim, and every
    lane-free adjoint is carried as one share per lane whose sum over the lanes is its value:
    softmax_attn's λ_m gathers (d o / d l.m)ᵀ λ_o from every lane of o. The lane-free sources
    (gradients of lane-free outputs and of the final state) enter at the dim's first lane only;
    everything else is linear in the shares, with lane-free coefficients (a lane-free state never
    reads a lane field, else the dim would not be a lane dim, so lane adjoints never read lane-free
    ones). The gradient of a lane-free input is then the sum of its shares: each program sums its
    lanes and stores one row per block of lanes, and the launcher adds the rows in a fixed order,
    as the recurrent backward does.
    """
    name = op.name
    slots = sop.state_slots
    live = adj.live
    float_inputs = [f for f in sop.inputs if ir.is_float(f.dtype)]
    float_outputs = [f for f in sop.outputs if ir.is_float(f.dtype)]
    shared_inputs = [f for f in float_inputs if shares and f.lane_axis is None]

    arg_groups = [tensor_args(f"in_{f.name}", f, True) for f in sop.inputs]
    arg_groups += [tensor_args(f"gy_{f.name}", f, True) for f in float_outputs]
    arg_groups += [tensor_args(f"gx_{f.name}", f, True) for f in float_inputs]
    arg_groups += [tensor_args(f"ckpt_{f.name}", f, True) for f in sop.state]
    arg_groups += [tensor_args(f"gfinal_{f.name}", f, False) for f in sop.state]
    arg_groups += [tensor_args(f"ginit_{f.name}", f, False) for f in sop.state]
    shared_state = [f for f in sop.state if shares and f.lane_axis is None and ir.is_float(f.dtype)]
    saved_fields = [] if saved is None else list(dict.fromkeys(f.name for f, _ in saved.values()))
    out_info = {f.name: f for f in sop.outputs}
    arg_groups += [tensor_args(f"sy_{n}", out_info[n], True) for n in saved_fields]
    if shared_inputs or shared_state:  # the stride between the rows of lane-block shares
        arg_groups.append(", ".join([f"gx_{f.name}_sp" for f in shared_inputs]
                                    + [f"ginit_{f.name}_sp" for f in shared_state]))

    def base(prefix: str) -> str:
        return (f"{prefix}_base = {prefix}_ptr + o0 * {prefix}_so0 + o1 * {prefix}_so1 "
                f"+ lanes64[:, None] * {prefix}_sl")

    timed = [f"in_{f.name}" for f in sop.inputs] + [f"gy_{f.name}" for f in float_outputs] \
        + [f"gx_{f.name}" for f in float_inputs if f not in shared_inputs] \
        + [f"ckpt_{f.name}" for f in sop.state] + [f"sy_{n}" for n in saved_fields]
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
    # A wide adjoint (several scans), or one reading the outputs as states, defers what only the
    # gradients read until after its scans, when its elements read no state: fewer values live
    # across them (s5: the 25 states; linrec: its backward 320 -> 302 us on the H200, reading
    # y[t-1] after the scan, benchmarks/bwd_warps.py).
    element_syms = {x.name for e in adj.entries for x in e.expr.free_symbols}
    element_syms |= {x.name for c in adj.sources.values() for x in c.free_symbols}
    defer = len(scans(adj)) > 1 or any(len(scan) > 1 for scan in scans(adj)) or saved is not None
    defer = defer and not any(n.startswith(("s_", "p_")) for n in element_syms)
    loads, late_loads = [], []
    for f in sop.inputs:
        cast = ".to(ACC)" if ir.is_float(f.dtype) and f.dtype != "f64" else ""
        for s in sop.slots(f):
            off = _field_offset(f"in_{f.name}", f, s)
            here = _plus(f"in_{f.name}_t", off)
            if s.name in now_inputs:
                (late_loads if defer and f"x_{s.name}" not in element_syms else loads).append(
                    f"x_{s.name} = tl.load({here}, mask=mask, other=0){cast}")
            if s.name in lift_inputs:
                (late_loads if defer else loads).append(
                    f"xp_{s.name} = tl.load({here} - in_{f.name}_st, mask=prev_ok, other=0){cast}")
            if s.name in next_inputs:
                loads.append(f"xn_{s.name} = tl.load({here} + in_{f.name}_st, mask=next_ok, other=0){cast}")
    for f in float_outputs:
        for s in sop.slots(f):
            ptr = _plus(f"gy_{f.name}_t", _field_offset(f"gy_{f.name}", f, s))
            load = f"tl.load({ptr}, mask=mask, other=0).to(ACC)"
            if shares and f.lane_axis is None:  # a lane-free source: the first lane's share
                load = f"tl.where(lane0, {load}, 0.0)"
            loads.append(f"gy_{s.name} = {load}")

    state_lines = []
    next_lines = _lift_lines(sop, "xn", "n", "q", None, next_needed)
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
        next_at = len(state_lines)
        state_lines += next_lines
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
        next_at = len(state_lines)
        state_lines += next_lines
    late_lines = []
    if defer:  # lift(x_{t+1}) before the scans, the rest after them
        late_lines = late_loads + state_lines[:next_at] + state_lines[next_at + len(next_lines):]
        state_lines = next_lines

    # adjoint elements, one reverse scan per entry of `scans`
    entry = {(e.target.name, e.source.name): e.expr for e in adj.entries}
    plan = scans(adj)
    combines: dict[tuple, tuple[str, str, list[str], str]] = {}  # (pattern, groups) -> function
    scan_blocks = []
    for k, groups in enumerate(plan):
        local = _local_pattern(adj, groups[0])
        members = [[live[a] for a in g] for g in groups]
        first = members[0]
        if len(plan) == 1 and len(groups) == 1:  # the combine's parameters: after the adjoints
            fn_name = f"{name}_adjoint{suffix}_combine"
            fn_m = {(a, b): f"M_{first[a].name}__{first[b].name}" for a, b in local}
            fn_v = [[f"v_{m.name}" for m in first]]
        else:  # after positions in a group: scans of one shape share one function
            fn_name = f"{name}_adjoint{suffix}_combine" + (f"_{len(combines)}" if combines else "")
            fn_m = {(a, b): f"M_{a}__{b}" for a, b in local}
            fn_v = [[f"v_{a}" if len(groups) == 1 else f"v_{g}_{a}" for a in range(len(first))]
                    for g in range(len(groups))]
        key = (tuple(local), len(groups))
        if key not in combines:
            combines[key] = (fn_name, *_adjoint_combine(fn_m, fn_v))
        # kernel variables: M named after the first group's adjoints, v after each adjoint
        mname = {(a, b): f"M_{first[a].name}__{first[b].name}" for a, b in local}
        targets = [(mname[(a, b)], entry[(first[a].name, first[b].name)]) for a, b in local]
        targets += [(f"v_{m.name}", adj.sources[m.name]) for ms in members for m in ms]
        lines, outs = _statements(targets, "j" if len(plan) == 1 else f"j{k}_")
        elements = list(lines)
        for (n, v, const), key in zip(outs, local + [None] * (len(outs) - len(local))):
            value = f"tl.full([BLOCK_L, BLOCK_T], {v}, ACC)" if const else v
            if key is not None:
                ident = "1.0" if key[0] == key[1] else "0.0"
                elements.append(f"{n} = tl.where(next_ok, {value}, {ident})")
            else:
                elements.append(f"{n} = tl.where(mask, {value}, 0.0)")
        names_k = [mname[key] for key in local] + [f"v_{m.name}" for ms in members for m in ms]

        # lam_t = v + M @ carry, then the carry moves to the block's first token
        lam_lines = []
        for ms in members:
            for a in range(len(ms)):
                terms = [f"{mname[(a, b)]} * lamc_{ms[b].name}" for b in range(len(ms)) if (a, b) in mname]
                lam_lines.append(f"lam_{ms[a].name} = v_{ms[a].name} + " + " + ".join(terms))
        for ms in members:
            for m in ms:
                lam_lines.append(f"lamc_{m.name} = tl.reduce(tl.where(is_first, lam_{m.name}, 0.0), 1, "
                                 f"_psmc_add, keep_dims=True)")
        comment = None
        if len(groups) > 1:
            comment = (f"adjoints {', '.join(m.name for ms in members for m in ms)}: {len(groups)} groups "
                       f"of {len(first)} with the same coefficients (M, named after the first group), "
                       f"coupled to no other adjoint")
        elif len(plan) > 1:
            comment = (f"adjoints {', '.join(m.name for m in first)}: coupled to no other adjoint, "
                       f"so scanned on their own")
        scan_blocks.append(dict(comment=comment, elements=elements, tuple=_tuple(names_k),
                                combine=combines[(tuple(local), len(groups))][0], lam_lines=lam_lines))

    ge = [(f"ge_{k}", v) for k, v in adj.element_grads.items()
          if any(S.sym(f"ge_{k}") in g.free_symbols for g in adj.input_grads.values())]
    gx = [(f"gx_{k}", v) for k, v in adj.input_grads.items()]
    grad_lines, outs = _statements(ge + gx, "g")
    for n, v, const in outs:
        grad_lines.append(f"{n} = tl.full([BLOCK_L, BLOCK_T], {v}, ACC)" if const else f"{n} = {v}")
    stores = []
    for f in float_inputs:
        for s in sop.slots(f):
            cast = f"gx_{f.name}_ptr.dtype.element_ty"
            if f in shared_inputs:  # this block of lanes' share: one row
                ptr = _plus(f"gx_{f.name}_ptr + o0 * gx_{f.name}_so0 + o1 * gx_{f.name}_so1 + lane_block * "
                            f"gx_{f.name}_sp + t * gx_{f.name}_st", _field_offset(f"gx_{f.name}", f, s))
                stores.append(f"tl.store({ptr}, tl.reduce(tl.where(mask, gx_{s.name}, 0.0), 0, _psmc_add)"
                              f".to({cast}), mask=t < T)")
                continue
            ptr = _plus(f"gx_{f.name}_t", _field_offset(f"gx_{f.name}", f, s))
            stores.append(f"tl.store({ptr}, gx_{s.name}.to({cast}), mask=mask)")

    gfinal_loads, gfinal_zeros = [], []
    for f in sop.state:
        for s in sop.slots(f):
            if s not in live:
                continue
            ptr = _plus(f"gfinal_{f.name}_ptr + o0 * gfinal_{f.name}_so0 + o1 * gfinal_{f.name}_so1 "
                        f"+ lanes64 * gfinal_{f.name}_sl", _field_offset(f"gfinal_{f.name}", f, s))
            load = f"tl.load({ptr}, mask=lane_ok, other=0).to(ACC)[:, None]"
            if shares and f.lane_axis is None:  # a lane-free source: the first lane's share
                load = f"tl.where(lane0, {load}, 0.0)"
            gfinal_loads.append(f"lamc_{s.name} = {load}")
            gfinal_zeros.append(f"lamc_{s.name} = tl.full([BLOCK_L, 1], 0, ACC)")
    if not live:  # nothing flows back through the state
        gfinal_loads = gfinal_zeros = ["pass"]
    init_lines = _initial_state_gradient(sop, adj, shared_state)

    return render(
        "triton_adjoint_scan.j2",
        name=name,
        kernel_name=f"{name}_backward{suffix}_kernel",
        combines=list(combines.values()),
        shares=shares,
        arg_groups=arg_groups,
        bases=bases,
        gfinal_loads=gfinal_loads,
        gfinal_zeros=gfinal_zeros,
        time_offsets=time_offsets,
        loads=loads,
        lift_where=sop.where("lift"),
        combine_where=sop.where("combine"),
        output_where=sop.where("output"),
        states_comment="lift(x_{t+1}) for the elements; the states follow the scans" if defer else states_comment,
        state_lines=state_lines,
        late_comment=states_comment,
        late_lines=late_lines,
        scans=scan_blocks,
        grad_lines=grad_lines,
        stores=stores,
        init_lines=init_lines,
    )


def _initial_state_gradient(sop: S.ScalarOp, adj: Adjoint, shared_state: list[S.FieldInfo]) -> list[str]:
    """After the last block: the initial state's gradient, (∂combine/∂l)ᵀ at (s_{-1}, lift(x_0))
    applied to λ_0 (the carry, lamc_), stored per field (lane-free fields with lane shares: this
    block of lanes' sum, one row per block). s_{-1} is the checkpoint before block 0."""
    syms = {x.name for e in adj.entries for x in e.expr.free_symbols}
    lines = []
    for f in sop.state:
        for s in sop.slots(f):
            if f"s_{s.name}" in syms:
                ptr = _plus(f"ckpt_{f.name}_base", _field_offset(f"ckpt_{f.name}", f, s))
                lines.append(f"i_{s.name} = tl.load({ptr}, mask=lane_ok[:, None], "
                             f"other={_literal(sop.identity_value(s))})")
    first = {n[2:] for n in syms if n.startswith("n_")}
    inputs = {x.name[2:] for a in sop.lift.assigns if a.name in first for x in a.expr.free_symbols}
    for f in sop.inputs:
        cast = ".to(ACC)" if ir.is_float(f.dtype) and f.dtype != "f64" else ""
        for s in sop.slots(f):
            if s.name in inputs:
                ptr = _plus(f"in_{f.name}_base", _field_offset(f"in_{f.name}", f, s))
                lines.append(f"x0_{s.name} = tl.load({ptr}, mask=lane_ok[:, None], other=0){cast}")
    lines += _lift_lines(sop, "x0", "f", "z", None, first, shape="[BLOCK_L, 1]")
    subs = {S.sym(n): S.sym(("i_" if n.startswith("s_") else "f_") + n[2:]) for n in syms}
    targets = [(f"gi_{j.name}", sp.Add(*[e.expr.xreplace(subs) * S.sym(f"lamc_{e.source.name}")
                                         for e in adj.entries if e.target == j])) for j in adj.live]
    tmp, outs = _statements(targets, "h")
    lines += tmp
    lines += [f"{n} = tl.full([BLOCK_L, 1], {v}, ACC)" if const else f"{n} = {v}" for n, v, const in outs]
    live = {s.name for s in adj.live}
    for f in sop.state:
        if not ir.is_float(f.dtype):
            continue
        for s in sop.slots(f):
            g = f"gi_{s.name}" if s.name in live else "tl.full([BLOCK_L, 1], 0, ACC)"
            at = f"ginit_{f.name}_ptr + o0 * ginit_{f.name}_so0 + o1 * ginit_{f.name}_so1"
            off = _field_offset(f"ginit_{f.name}", f, s)
            if f in shared_state:
                lines.append(f"tl.store({_plus(at + f' + lane_block * ginit_{f.name}_sp', off)}, "
                             f"tl.reduce(tl.reshape(tl.where(lane_ok[:, None], {g}, 0.0), [BLOCK_L]), 0, _psmc_add))")
            else:
                lines.append(f"tl.store({_plus(at + f' + lanes64 * ginit_{f.name}_sl', off)}, "
                             f"tl.reshape({g}, [BLOCK_L]), mask=lane_ok)")
    return lines or ["pass"]  # no float state
