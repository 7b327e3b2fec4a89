"""Lane-free factoring of strategy scan: state that does not depend on the lane dim is scanned once
per token, and the lane state as a linear recurrence whose coefficients come from it.

Why. A plain scan kernel runs `combine` on [lanes, T] tiles, so every lane repeats the work on the
state scalars that have no lane axis: softmax_attn's running max `m` and normalizer `z` (the max,
the compares and the exp of each combine) are computed 64 times per token for D = 64, and that work
is most of the kernel. mlstm's and gla's gates are the same kind.

When (`factor`). The op has a lane dim, state scalars without it (L) and with it (V), every V
scalar is a float, and each V scalar's combine is affine in its own two values with coefficients
in L alone:

    combine(l, r).v = A_v(l_L, r_L) * l.v + B_v(l_L, r_L) * r.v + C_v(l_L, r_L).

(L's own combine reads only L: that is what makes the dim a lane dim, and it is checked again.)
Found by differentiating the scalarized combine (sympy): dv/dl.v and dv/dr.v must be free of V.

How (templates/triton_scan.j2). By associativity the prefix at token t is combine(P_{t-1}, e_t),
P_{t-1} the prefix before t and e_t = lift(x_t). Per block of T: one scan of the L scalars over a
[BLOCK_T] row, of the elements shifted by one token with the carry in front, gives P_{t-1}; then,
once per token, combine's L part gives P_t and the coefficients a_t = A(P_{t-1}, e_t),
b_t = B(...), c_t = C(...). Each lane's V is then V_t = a_t V_{t-1} + (b_t w_t + c_t), w_t the
lane's lifted value: a linear recurrence scanned as pairs (a, h) like linrec's, with a product and
a multiply-add per combine instead of the op's combine. Each carry is still the op's own state.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .. import ir
from . import scalarize as S


@dataclass(frozen=True)
class Factoring:
    """The split of an op's state into lane-free scalars and lanes, with the lanes' coefficients.

    gates: the distinct A_v (in the symbols l_L, r_L); gate_of[i]: the gate of lanes[i];
    inputs[i], biases[i]: B_v and C_v of lanes[i] (C_v is 0 for most ops)."""

    free: tuple[S.Slot, ...]
    lanes: tuple[S.Slot, ...]
    gates: tuple[sp.Expr, ...]
    gate_of: tuple[int, ...]
    inputs: tuple[sp.Expr, ...]
    biases: tuple[sp.Expr, ...]

    def free_inputs(self, sop: S.ScalarOp) -> list[S.Slot]:
        """Input scalars without the lane axis (loaded once per token, not once per lane)."""
        return [s for f in sop.inputs if f.lane_axis is None for s in sop.slots(f)]


def factor(sop: S.ScalarOp) -> Factoring | None:
    """The lane-free factoring of `sop`, or None when it does not apply (see the module doc)."""
    if sop.lane is None:
        return None
    lane_fields = {f.name for f in sop.state if f.lane_axis is not None}
    free = tuple(s for s in sop.state_slots if s.field not in lane_fields)
    lanes = tuple(s for s in sop.state_slots if s.field in lane_fields)
    if not free or not lanes or not all(ir.is_float(s.dtype) for s in lanes):
        return None
    free_syms = {s.symbol(r) for s in free for r in ("l", "r")}
    exprs = {(a.field, a.index): a.expr for a in sop.combine.assigns}
    for s in free:
        if not exprs[(s.field, s.index)].free_symbols <= free_syms:
            return None
    free_x = {s.symbol("x") for f in sop.inputs if f.lane_axis is None for s in sop.slots(f)}
    for a in sop.lift.assigns:
        if a.field not in lane_fields and not a.expr.free_symbols <= free_x:
            return None
    gates: list[sp.Expr] = []
    gate_of, inputs, biases = [], [], []
    for s in lanes:
        f = exprs[(s.field, s.index)]
        lv, rv = s.symbol("l"), s.symbol("r")
        if not f.free_symbols <= free_syms | {lv, rv}:
            return None
        A, B = sp.diff(f, lv), sp.diff(f, rv)
        if not (A.free_symbols | B.free_symbols) <= free_syms:
            return None
        C = f.xreplace({lv: sp.Integer(0), rv: sp.Integer(0)})
        if sp.expand(f - A * lv - B * rv - C) != 0:
            return None
        if A not in gates:
            gates.append(A)
        gate_of.append(gates.index(A))
        inputs.append(B)
        biases.append(C)
    return Factoring(free, lanes, tuple(gates), tuple(gate_of), tuple(inputs), tuple(biases))
