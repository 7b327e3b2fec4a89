"""The backward of an associative op, derived: sympy Jacobians of combine, lift and output.

Forward, for any bracketing of the scan (they agree for an associative op):
    e_t = lift(x_t),   s_t = combine(s_{t-1}, e_t),   y_t = output(s_t, x_t).
With λ_t = dLoss/ds_t the adjoint is a *linear* recurrence backwards in time,

    λ_t  = c_t + A_t λ_{t+1},   c_t = (∂output/∂s)(s_t, x_t)ᵀ gy_t,   A_t = (∂combine/∂l)(s_t, e_{t+1})ᵀ
    ge_t = (∂combine/∂r)(s_{t-1}, e_t)ᵀ λ_t
    gx_t = (∂lift/∂x)(x_t)ᵀ ge_t + (∂output/∂x)(s_t, x_t)ᵀ gy_t

and a linear recurrence is itself associative: its elements are affine maps λ ↦ A λ + c, composed
like affine.psm's combine. Only what can be nonzero is carried:

- *live* adjoints: λ_j is live if s_j is a float, and the outputs read s_j (c_j ≠ 0) or a live
  λ_i depends on it (∂combine_i/∂l_j ≠ 0). Dead ones are zero for every input and are dropped. For linrec the
  output reads h only and ∂h/∂l.g = 0, so λ_g is dead and the adjoint is one scalar recurrence:
  λ_t = gy_t + a_{t+1} λ_{t+1}, exactly the classic reverse scan.
- the coefficient pattern: the entries of A that are structurally nonzero, closed under products
  (a segment's coefficient is a product of A's), plus the diagonal (the identity). A diagonal
  pattern gives one (a, c) pair per live field.

Symbols used in the derived expressions (all are kernel variables):
  x_*  inputs at t        e_*  lift(x_t)      n_*  lift(x_{t+1})
  p_*  state s_{t-1}      s_*  state s_t      gy_* output gradients     lam_*  λ_t
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import sympy as sp

from .. import ir
from . import scalarize as S


def _sym(prefix: str, slot: S.Slot) -> sp.Symbol:
    return S.sym(f"{prefix}_{slot.name}")


@dataclass(frozen=True)
class AdjointEntry:
    """One coefficient of A: λ_target(t) gets `expr` · λ_source(t + 1)."""

    target: S.Slot
    source: S.Slot
    expr: sp.Expr


class Adjoint:
    """The derived backward of one scalarized op (optionally with every state field a source)."""

    def __init__(self, sop: S.ScalarOp, final_grads: bool = False):
        self.sop = sop
        self.final_grads = final_grads
        slots = sop.state_slots
        self.slots = slots
        lsub = {s.symbol("l"): _sym("s", s) for s in slots}
        lsub.update({s.symbol("r"): _sym("n", s) for s in slots})
        rsub = {s.symbol("l"): _sym("p", s) for s in slots}
        rsub.update({s.symbol("r"): _sym("e", s) for s in slots})
        comb = [a.raw for a in sop.combine.assigns]  # as written: see ScalarAssign
        # Jl[i][j] = ∂combine_i/∂l_j at (s_t, e_{t+1});  Jr[i][k] = ∂combine_i/∂r_k at (s_{t-1}, e_t)
        self.Jl = [[_d(c, sj.symbol("l")).xreplace(lsub) for sj in slots] for c in comb]
        self.Jr = [[_d(c, sk.symbol("r")).xreplace(rsub) for sk in slots] for c in comb]
        outs = sop.output.assigns
        self.gy = [S.sym(f"gy_{a.name}") for a in outs]
        float_out = [ir.is_float(a.dtype) for a in outs]
        self.Os = [[_d(o.raw, sj.symbol("s")) if fo else sp.S.Zero for sj in slots]
                   for o, fo in zip(outs, float_out)]
        self.float_inputs = [s for f in sop.inputs if ir.is_float(f.dtype) for s in sop.slots(f)]
        self.Ox = [[_d(o.raw, xm.symbol("x")) if fo else sp.S.Zero for xm in self.float_inputs]
                   for o, fo in zip(outs, float_out)]
        self.Lx = [[_d(a.raw, xm.symbol("x")) for xm in self.float_inputs] for a in sop.lift.assigns]

    # ---- structure ----
    @cached_property
    def live(self) -> list[S.Slot]:
        """Float state slots whose adjoint can be nonzero (integer states carry no gradient)."""
        floats = [j for j, s in enumerate(self.slots) if ir.is_float(s.dtype)]
        live = {j for j in floats if self.final_grads or any(row[j] != 0 for row in self.Os)}
        changed = True
        while changed:
            changed = False
            for j in floats:
                if j not in live and any(self.Jl[i][j] != 0 for i in live):
                    live.add(j)
                    changed = True
        return [self.slots[j] for j in sorted(live)]

    @cached_property
    def _live_idx(self) -> list[int]:
        return [self.slots.index(s) for s in self.live]

    @cached_property
    def pattern(self) -> set[tuple[int, int]]:
        """(target, source) positions (indices into `live`) of A's structural nonzeros, closed
        under products, with the diagonal."""
        idx = self._live_idx
        P = {(a, b) for a, j in enumerate(idx) for b, i in enumerate(idx) if self.Jl[i][j] != 0}
        closure = set(P)
        while True:
            more = {(a, c) for (a, b) in closure for (b2, c) in P if b == b2} - closure
            if not more:
                break
            closure |= more
        return closure | {(a, a) for a in range(len(idx))}

    @property
    def diagonal(self) -> bool:
        return all(a == b for a, b in self.pattern)

    @cached_property
    def entries(self) -> list[AdjointEntry]:
        """A's structurally nonzero entries at one step (t ← t + 1), in pattern order."""
        idx = self._live_idx
        out = []
        for a, b in sorted(self.pattern):
            j, i = idx[a], idx[b]
            out.append(AdjointEntry(self.slots[j], self.slots[i], self.Jl[i][j]))
        return out

    @cached_property
    def sources(self) -> dict[str, sp.Expr]:
        """c_j = Σ_o ∂output_o/∂s_j · gy_o for each live j."""
        return {s.name: sp.Add(*[self.Os[o][self.slots.index(s)] * self.gy[o]
                                 for o in range(len(self.gy))]) for s in self.live}

    @cached_property
    def element_grads(self) -> dict[str, sp.Expr]:
        """ge_k = Σ_i ∂combine_i/∂r_k · λ_i over live i (k: every state slot)."""
        idx = self._live_idx
        return {sk.name: sp.Add(*[self.Jr[i][k] * _sym("lam", self.slots[i]) for i in idx])
                for k, sk in enumerate(self.slots)}

    @cached_property
    def input_grads(self) -> dict[str, sp.Expr]:
        """gx_m = Σ_k ∂lift_k/∂x_m · ge_k + Σ_o ∂output_o/∂x_m · gy_o, per float input slot.

        ge_k appear as symbols `ge_*`, computed first (see element_grads)."""
        out = {}
        for m, xm in enumerate(self.float_inputs):
            terms = [self.Lx[k][m] * S.sym(f"ge_{sk.name}") for k, sk in enumerate(self.slots)]
            terms += [self.Ox[o][m] * self.gy[o] for o in range(len(self.gy))]
            out[xm.name] = sp.Add(*terms)
        return out

    @cached_property
    def crosses_lanes(self) -> bool:
        """True when a lane-free adjoint gathers from lane quantities (a sum over lanes):
        softmax_attn's λ_m and λ_z gather (d o / d l.m)ᵀ λ_o from every lane of o.

        A per-lane scan then carries such adjoints as per-lane shares (triton_adjoint.generate)."""
        sop = self.sop
        if sop.lane is None:
            return False
        lane_state = {s.name for f in sop.state if f.lane_axis is not None for s in sop.slots(f)}
        lane_out = {s.name for f in sop.outputs if f.lane_axis is not None for s in sop.slots(f)}
        lane_in = {s.name for f in sop.inputs if f.lane_axis is not None for s in sop.slots(f)}
        for e in self.entries:
            if e.target.name not in lane_state and e.source.name in lane_state:
                return True
        for j, c in self.sources.items():
            if j not in lane_state and any(s.name[3:] in lane_out for s in c.free_symbols
                                           if s.name.startswith("gy_")):
                return True
        for k, g in self.element_grads.items():
            if k not in lane_state and any(s.name[4:] in lane_state for s in g.free_symbols
                                           if s.name.startswith("lam_")):
                return True
        for m, g in self.input_grads.items():
            if m in lane_in:
                continue
            for s in g.free_symbols:
                if s.name.startswith("ge_") and s.name[3:] in lane_state:
                    return True
                if s.name.startswith("gy_") and s.name[3:] in lane_out:
                    return True
        return False

    @cached_property
    def components(self) -> list[list[int]]:
        """The live adjoints (indices into `live`) in groups that no coefficient couples: the
        connected components of the pattern, each in `live` order, ordered by its first member.

        Each group is a linear recurrence of its own, so it can be scanned on its own. s5's
        adjoint is the 5 x 5 matrix λ with λ_t = gy_t + λ_{t+1} P_{t+1}ᵀ: every row of λ is
        coupled within itself (25 coefficients) and to no other row, so one scan over all 25
        would carry 125 coefficients and 25 values, five scans over the rows 25 + 5 each."""
        parent = list(range(len(self.live)))

        def root(a: int) -> int:
            while parent[a] != a:
                a = parent[a]
            return a

        for a, b in self.pattern:
            parent[root(a)] = root(b)
        groups: dict[int, list[int]] = {}
        for a in range(len(self.live)):
            groups.setdefault(root(a), []).append(a)
        return sorted(groups.values())

    def scan_scalars(self, group: list[int] | None = None) -> int:
        """How many scalars the adjoint scan carries: A's pattern plus the live vector (restricted
        to `group`, indices into `live`, when given)."""
        if group is None:
            return len(self.pattern) + len(self.live)
        members = set(group)
        return sum(1 for a, _ in self.pattern if a in members) + len(group)

    def needs(self, prefix: str) -> set[str]:
        """Slot names of symbols with this prefix that the derived expressions read."""
        exprs = [e.expr for e in self.entries] + list(self.sources.values()) \
            + list(self.element_grads.values()) + list(self.input_grads.values())
        out = set()
        for e in exprs:
            for s in e.free_symbols:
                if s.name.startswith(prefix + "_"):
                    out.add(s.name[len(prefix) + 1:])
        return out


def _d(expr: sp.Expr, sym: sp.Symbol) -> sp.Expr:
    """∂expr/∂sym of an expression as written, then printed the cheap way (S.one_exp_per_max
    keeps values, and the derivative is taken already)."""
    if sym not in expr.free_symbols:
        return sp.S.Zero
    return S.one_exp_per_max(sp.diff(expr, sym))


def derive(sop: S.ScalarOp, final_grads: bool = False) -> Adjoint:
    return Adjoint(sop, final_grads)
