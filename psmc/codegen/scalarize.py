"""Scalarization: an op's functions as straight-line programs over scalars, in sympy.

Every field of static shape becomes one scalar per index (`A: f32[2, 2]` gives `A_0_0 … A_1_1`),
and `@`, `outer` and `sum` expand into sums of products. The result is one sympy expression per
scalar the function assigns, written in the scalars it reads. Sympy is the scalar IR because both
consumers need it: the Triton printer (`triton_expr`) prints it, and the adjoint derivation
(`adjoint`) differentiates it.

Lanes. A dim is a *lane* dim when every function is elementwise along it (no reduction, matmul or
fixed index crosses it): then each index along it is an independent copy of the same scalar
program, and kernels run those copies side by side instead of scalarizing them (softmax_attn's
`D`, gla's `V`). `lane_dim` finds such a dim by re-checking the op at tiny sizes and reading the
dependencies; `ScalarOp` then scalarizes the op with the lane dim set to 1, so a field with the lane
axis contributes one scalar per index of its *other* axes, and that scalar stands for "this lane".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, Iterable

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from .. import ir
from ..errors import PsmError

# ---- scalar functions sympy lacks, with their derivatives ------------------------------------


class sigmoid(sp.Function):
    """1 / (1 + exp(-x)); printed as tl.sigmoid."""

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)


class softplus(sp.Function):
    """log(1 + exp(x)), computed as torch does (linear above 20)."""

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])


class logaddexp(sp.Function):
    """log(exp(a) + exp(b)), exact at -inf (both -inf gives -inf)."""

    def fdiff(self, argindex=1):
        a, b = self.args
        mine = a if argindex == 1 else b
        return sp.exp(mine - logaddexp(a, b))


class trunc(sp.Function):
    """Float to integer conversion (round toward zero). Not differentiable."""


CASTABLE_INT = ("i32", "i64")


# ---- naming ---------------------------------------------------------------------------------

def sym(name: str) -> sp.Symbol:
    """A scalar variable: extended real (it may be ±inf, as identities are, but never complex),
    so derivatives of abs or max stay real and `x == -inf` stays a condition."""
    return sp.Symbol(name, extended_real=True)


def scalar_name(role: str, field: str, index: tuple[int, ...]) -> str:
    """`l_A_0_1` for l.A[0, 1]; `x_a` for the scalar input x.a."""
    return "_".join([role, field] + [str(i) for i in index])


def field_indices(shape: tuple[int, ...], lane_axis: int | None) -> list[tuple[int, ...]]:
    """Every index of a field with the lane axis pinned to 0 (the op is scalarized at lane = 1)."""
    ranges = [range(1) if a == lane_axis else range(n) for a, n in enumerate(shape)]
    return list(itertools.product(*ranges))


def _drop(index: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    return index if axis is None else index[:axis] + index[axis + 1:]


# ---- expression evaluation into object arrays -------------------------------------------------

def _obj(value, shape=()) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    if shape == ():
        out[()] = value
    else:
        out.fill(value)
    return out


def _map(fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    """Elementwise `fn` over broadcast object arrays; always returns an object array."""
    b = np.broadcast_arrays(*[np.asarray(a, dtype=object) for a in arrays])
    out = np.empty(b[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = fn(*(x[idx] for x in b))
    return out


def _const(v) -> sp.Expr:
    if isinstance(v, bool):
        return sp.true if v else sp.false
    if isinstance(v, int):
        return sp.Integer(v)
    if math.isinf(v):
        return sp.oo if v > 0 else -sp.oo
    return sp.Float(v)  # kernels compute in floats: a float literal, not symbolic.py's exact Rational


def _as_bool(x):
    if isinstance(x, (sp.logic.boolalg.Boolean, sp.core.relational.Relational)):
        return x
    return sp.Ne(x, 0)


def _as_number(x):
    if isinstance(x, (sp.logic.boolalg.Boolean, sp.core.relational.Relational)) and not isinstance(x, sp.Expr):
        return sp.Piecewise((sp.Integer(1), x), (sp.Integer(0), True))
    return x


_FUNCS: dict[str, Callable] = {
    "exp": sp.exp, "log": sp.log, "log1p": log1p, "expm1": expm1, "sqrt": sp.sqrt,
    "rsqrt": lambda x: 1 / sp.sqrt(x), "tanh": sp.tanh, "sigmoid": sigmoid,
    "softplus": softplus, "sin": sp.sin, "cos": sp.cos, "silu": lambda x: x * sigmoid(x),
    "logsigmoid": lambda x: -softplus(-x), "abs": sp.Abs, "relu": lambda x: sp.Max(x, 0),
}

_BINARY: dict[str, Callable] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b, "**": lambda a, b: a ** b,
    "==": sp.Eq, "!=": sp.Ne, "<": sp.Lt, "<=": sp.Le, ">": sp.Gt, ">=": sp.Ge,
    "and": lambda a, b: sp.And(_as_bool(a), _as_bool(b)),
    "or": lambda a, b: sp.Or(_as_bool(a), _as_bool(b)),
}


class _Scalarizer:
    """Evaluates IR expressions of one function into object arrays of sympy expressions."""

    def __init__(self, env: dict[tuple[str, str], np.ndarray]):
        self.env = env
        self.locals: dict[str, np.ndarray] = {}

    def eval(self, e: ir.Expr) -> np.ndarray:
        return getattr(self, "_" + type(e).__name__.lower())(e)

    def _const(self, e: ir.Const):
        return _obj(_const(e.value))

    def _fieldref(self, e: ir.FieldRef):
        return self.env[(e.role, e.name)]

    def _localref(self, e: ir.LocalRef):
        return self.locals[e.name]

    def _unary(self, e: ir.Unary):
        a = self.eval(e.arg)
        return _map((lambda x: -x) if e.op == "neg" else (lambda x: sp.Not(_as_bool(x))), a)

    def _binary(self, e: ir.Binary):
        a, b = self.eval(e.lhs), self.eval(e.rhs)
        if e.op == "@":
            return _matmul(a, b)
        fn = _BINARY[e.op]
        if e.op in ("+", "-", "*", "/", "**"):
            return _map(lambda x, y: fn(_as_number(x), _as_number(y)), a, b)
        return _map(fn, a, b)

    def _call(self, e: ir.Call):
        args = [self.eval(a) for a in e.args]
        name = e.func
        if name in ir.DTYPES:
            src = e.args[0].type.dtype
            return _map(lambda x: _cast(x, src, name), args[0])
        if name == "where":
            return _map(lambda c, a, b: sp.Piecewise((_as_number(a), _as_bool(c)), (_as_number(b), True)),
                        *args)
        if name == "outer":
            a, b = args
            return _map(lambda x, y: x * y, a[:, None], b[None, :])
        if name == "max":
            return _map(sp.Max, *args)
        if name == "min":
            return _map(sp.Min, *args)
        if name == "logaddexp":
            return _map(logaddexp, *args)
        if name in _FUNCS:
            return _map(lambda x: _FUNCS[name](_as_number(x)), args[0])
        raise PsmError(f"{name}() has no scalar form for code generation", e.loc)

    def _reduce(self, e: ir.Reduce):
        a = self.eval(e.arg)
        if a.ndim == 0:
            return a
        axes = tuple(range(a.ndim)) if e.axis is None else (e.axis,)
        fn = {"sum": lambda x, y: x + y, "max": sp.Max, "min": sp.Min}[e.op]
        out = a
        for ax in sorted(axes, reverse=True):
            out = np.asarray(np.frompyfunc(fn, 2, 1).reduce(out, axis=ax), dtype=object)
        return out if isinstance(out, np.ndarray) else _obj(out)

    def _index(self, e: ir.Index):
        a = self.eval(e.base)
        key = tuple(it.start if it.kind == "int" else None if it.kind == "newaxis"
                    else slice(it.start, it.stop) for it in e.items)
        out = a[key]
        return out if isinstance(out, np.ndarray) else _obj(out)

    def _externcall(self, e: ir.ExternCall):
        raise PsmError(f"extern '{e.name}' cannot be compiled to Triton (externs run through torch)",
                       e.loc)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.ndim == 1 and b.ndim == 1:
        return _obj(sp.Add(*[x * y for x, y in zip(a, b)]))
    if a.ndim == 1:
        a2 = a[None, :]
        return _matmul(a2, b)[..., 0, :]
    if b.ndim == 1:
        return _matmul(a, b[:, None])[..., 0]
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = np.broadcast_to(a, lead + a.shape[-2:])
    b = np.broadcast_to(b, lead + b.shape[-2:])
    out = np.empty(lead + (a.shape[-2], b.shape[-1]), dtype=object)
    for idx in np.ndindex(out.shape):
        *L, i, j = idx
        L = tuple(L)
        out[idx] = sp.Add(*[a[L + (i, k)] * b[L + (k, j)] for k in range(a.shape[-1])])
    return out


def _cast(x, src: str, dst: str):
    if dst == "bool":
        return _as_bool(x)
    x = _as_number(x)
    if ir.is_int(dst) and ir.is_float(src):
        return trunc(x)
    return x  # int <-> int, int -> float, float -> float: the kernel's typed stores do the rest


def one_exp_per_max(expr):
    """exp(P - max(P, Q)) → where(P >= Q, 1, exp(-|P - Q|)), and likewise for Q.

    The max-stabilized forms of online softmax, logsumexp and mLSTM compute exp(l - max) and
    exp(r - max), one of which is always exactly 1; written this way both share one exp(-|P - Q|)
    (the printer names it once), which halves the special-function work of such combines. Equal
    to the original wherever that is a number.
    """
    if not isinstance(expr, sp.Basic) or not expr.has(sp.Max):
        return expr

    def rewrite(e):
        if not isinstance(e, sp.exp):
            return None
        arg = e.args[0]
        for m in arg.atoms(sp.Max):
            if len(m.args) != 2:
                continue
            rest = sp.expand(arg + m)
            P, Q = m.args
            if sp.expand(rest - P) == 0:
                return sp.Piecewise((sp.Integer(1), sp.Ge(P, Q)), (sp.exp(-sp.Abs(P - Q)), True))
            if sp.expand(rest - Q) == 0:
                return sp.Piecewise((sp.Integer(1), sp.Ge(Q, P)), (sp.exp(-sp.Abs(P - Q)), True))
        return None

    return expr.replace(lambda e: rewrite(e) is not None, rewrite)


# ---- scalar programs ------------------------------------------------------------------------

@dataclass(frozen=True)
class ScalarAssign:
    """One scalar a function assigns: `field[index]` (lane axis dropped) = expr.

    `expr` is what kernels print (one_exp_per_max applied), `raw` the expression as the op writes
    it: the derived backward differentiates `raw`, since the rewrite keeps values but not the
    derivatives at ties (d/dP of where(P >= Q, 1, ...) is 0 at P = Q, where max's own derivative
    splits, 1/2 each, as torch's does: mixing the two gives wrong gradients there)."""

    field: str
    index: tuple[int, ...]
    expr: sp.Expr
    dtype: str
    line: int
    raw: sp.Expr | None = None

    @property
    def name(self) -> str:
        return "_".join([self.field] + [str(i) for i in self.index])


@dataclass(frozen=True)
class ScalarFunction:
    kind: str  # "lift" | "combine" | "output"
    line: int
    assigns: tuple[ScalarAssign, ...]


@dataclass(frozen=True)
class Slot:
    """One scalar of a field: its index within the field (lane axis dropped)."""

    field: str
    index: tuple[int, ...]  # without the lane axis
    full_index: tuple[int, ...]  # with the lane axis pinned to 0
    dtype: str

    @property
    def name(self) -> str:
        return "_".join([self.field] + [str(i) for i in self.index])

    def symbol(self, role: str) -> sp.Symbol:
        return sym(f"{role}_{self.name}")


@dataclass(frozen=True)
class FieldInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]  # the real shape (lane axis at its real size)
    lane_axis: int | None
    line: int

    @property
    def scalar_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a != self.lane_axis)


@dataclass(frozen=True)
class LaneDim:
    name: str
    size: int


class ScalarOp:
    """An op scalarized for code generation: fields, slots, and the three scalar functions."""

    def __init__(self, op: ir.Op, lane: LaneDim | None = None):
        self.op = op
        self.lane = lane
        self.path = op.source.path.replace("\\", "/").rsplit("/", 1)[-1]
        one = _recheck(op, {lane.name: 1}) if lane else op
        self.op1 = one
        self.lane_axes = _lane_axes(op, lane) if lane else {}
        self.inputs = [self._info(f.name, f.type, f.loc.line, "x") for f in op.inputs]
        self.state = [self._info(f.name, f.type, f.loc.line, "s") for f in op.state]
        self.outputs = [self._info(f.name, f.type, f.loc.line, "y") for f in op.outputs]
        self.identity = {f.name: f.init for f in op.state}

    def _info(self, name: str, t: ir.Type, line: int, kind: str) -> FieldInfo:
        return FieldInfo(name, t.dtype, t.shape, self.lane_axes.get((kind, name)), line)

    @staticmethod
    def slots(f: FieldInfo) -> list[Slot]:
        shape1 = tuple(1 if a == f.lane_axis else n for a, n in enumerate(f.shape))
        return [Slot(f.name, _drop(idx, f.lane_axis), idx, f.dtype)
                for idx in field_indices(shape1, None)]

    @cached_property
    def state_slots(self) -> list[Slot]:
        return [s for f in self.state for s in self.slots(f)]

    @cached_property
    def input_slots(self) -> list[Slot]:
        return [s for f in self.inputs for s in self.slots(f)]

    @cached_property
    def output_slots(self) -> list[Slot]:
        return [s for f in self.outputs for s in self.slots(f)]

    def is_lane(self, kind: str, name: str) -> bool:
        return (kind, name) in self.lane_axes

    def identity_value(self, slot: Slot) -> float | int:
        init = self.identity[slot.field]
        if init == "eye":
            return 1 if len(set(slot.full_index)) <= 1 else 0
        v = init
        for i in slot.full_index:
            if isinstance(v, (tuple, list)):
                v = v[i]
        return v

    def _env(self, role: str, fields: list[FieldInfo]) -> dict[tuple[str, str], np.ndarray]:
        env = {}
        for f in fields:
            shape1 = tuple(1 if a == f.lane_axis else n for a, n in enumerate(f.shape))
            arr = np.empty(shape1, dtype=object)
            for s in self.slots(f):
                arr[s.full_index] = s.symbol(role)
            env[(role, f.name)] = arr
        return env

    def _scalarize(self, fn: ir.Function, env, targets: list[FieldInfo]) -> ScalarFunction:
        sc = _Scalarizer(env)
        by_name = {f.name: f for f in targets}
        out: list[ScalarAssign] = []
        for st in fn.body:
            v = sc.eval(st.value)
            if isinstance(st, ir.Let):
                sc.locals[st.name] = v
                continue
            f = by_name[st.name]
            shape1 = tuple(1 if a == f.lane_axis else n for a, n in enumerate(f.shape))
            v = np.broadcast_to(v, shape1)
            for s in self.slots(f):
                raw = _as_number(v[s.full_index])
                out.append(ScalarAssign(f.name, s.index, one_exp_per_max(raw), f.dtype, st.loc.line, raw))
        order = {(s.field, s.index): i for i, s in enumerate(s for f in targets for s in self.slots(f))}
        out.sort(key=lambda a: order[(a.field, a.index)])
        return ScalarFunction(fn.kind, fn.loc.line, tuple(out))

    @cached_property
    def lift(self) -> ScalarFunction:
        return self._scalarize(self.op1.lift, self._env("x", self.inputs), self.state)

    @cached_property
    def combine(self) -> ScalarFunction:
        env = {**self._env("l", self.state), **self._env("r", self.state)}
        return self._scalarize(self.op1.combine, env, self.state)

    @cached_property
    def output(self) -> ScalarFunction:
        env = {**self._env("s", self.state), **self._env("x", self.inputs)}
        return self._scalarize(self.op1.output, env, self.outputs)

    def where(self, kind: str) -> str:
        """`linrec.psm:11 combine`: the comment that ties generated code to the source."""
        line = {"lift": self.op.lift, "combine": self.op.combine, "output": self.op.output}[kind].loc.line
        return f"{self.path}:{line} {kind}"


# ---- lane dims ------------------------------------------------------------------------------

def _recheck(op: ir.Op, dims: dict[str, int]) -> ir.Op:
    """The same op with some static dims changed (parsed again from its source)."""
    return _recheck_cached(op.source.text, op.source.path, op.name,
                           tuple(sorted({**op.dim_values, **dims}.items())))


@lru_cache(maxsize=256)
def _recheck_cached(text: str, path: str, name: str, dims: tuple[tuple[str, int], ...]) -> ir.Op:
    from ..parser import decode, parse
    from ..typecheck import check

    decls = [d for d in parse(decode(text.encode("utf-8"), path)) if d.name == name]
    return check(decls, dict(dims))[0]


def _all_fields(op: ir.Op) -> Iterable[tuple[str, str, ir.Type]]:
    for f in op.inputs:
        yield "x", f.name, f.type
    for f in op.state:
        yield "s", f.name, f.type
    for f in op.outputs:
        yield "y", f.name, f.type


def _lane_axes(op: ir.Op, lane: LaneDim) -> dict[tuple[str, str], int]:
    """Which axis of each field is the lane dim: the axis whose size follows the dim."""
    a = _recheck(op, {lane.name: 2})
    b = _recheck(op, {lane.name: 3})
    out = {}
    for (k, n, ta), (_, _, tb) in zip(_all_fields(a), _all_fields(b)):
        moved = [i for i, (x, y) in enumerate(zip(ta.shape, tb.shape)) if x != y]
        if len(moved) > 1:
            raise ValueError(f"{k}.{n} has the lane dim twice")
        if moved:
            out[(k, n)] = moved[0]
    return out


def _is_lane_dim(op: ir.Op, name: str) -> bool:
    """Elementwise along `name` everywhere: checked on the scalarized op at size 2 (others small)."""
    small = {d: 3 for d, _ in op.dims}
    small[name] = 2
    try:
        small_op = _recheck(op, small)
        axes = _lane_axes(small_op, LaneDim(name, 2))
    except (PsmError, ValueError):
        return False
    if not axes:
        return False
    sop = ScalarOp(small_op)  # fully scalarized at lane size 2
    lane_of: dict[str, int | None] = {}
    roles = {"x": "x", "l": "s", "r": "s", "s": "s"}
    for kind, f in [("x", f) for f in sop.inputs] + [("s", f) for f in sop.state]:
        ax = axes.get((kind, f.name))
        for s in sop.slots(f):
            for role, k in roles.items():
                if k == kind:
                    lane_of[f"{role}_{s.name}"] = None if ax is None else s.full_index[ax]
    for fn, targets, kind in ((sop.lift, sop.state, "s"), (sop.combine, sop.state, "s"),
                              (sop.output, sop.outputs, "y")):
        tax = {f.name: axes.get((kind, f.name)) for f in targets}
        for a in fn.assigns:
            ax = tax[a.field]
            want = None if ax is None else a.index[ax]
            for sym in a.expr.free_symbols:
                got = lane_of.get(sym.name)
                if got is not None and got != want:
                    return False
    return True


def lane_dim(op: ir.Op, limit: int = 32) -> LaneDim | None:
    """The lane dim that leaves the fewest state scalars per lane, if any dim is one."""
    best: tuple[int, LaneDim] | None = None
    for name, size in op.dims:
        if not _is_lane_dim(op, name):
            continue
        one = _recheck(op, {name: 1})
        n = sum(math.prod(f.type.shape) for f in one.state)
        if best is None or n < best[0]:
            best = (n, LaneDim(name, size))
    return best[1] if best else None


def state_scalars(op: ir.Op, lane: LaneDim | None) -> int:
    one = _recheck(op, {lane.name: 1}) if lane else op
    return sum(math.prod(f.type.shape) for f in one.state)


def scalarize(op: ir.Op) -> ScalarOp:
    """The op scalarized along its best lane dim (or fully, when it has none); cached per op."""
    return _scalarize_cached(op.source.text, op.source.path, op.name, op.dims)


@lru_cache(maxsize=128)
def _scalarize_cached(text: str, path: str, name: str, dims) -> ScalarOp:
    op = _recheck_cached(text, path, name, tuple(sorted(dims)))
    return ScalarOp(op, lane_dim(op))
