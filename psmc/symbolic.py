"""`combine` and the identity in sympy, and proofs of the laws (DESIGN.md section 3).

Every scalar of every state field becomes one real (or integer) symbol; static dims are expanded,
so a `f32[2, 2]` field is four symbols. `let`s are inlined, `where` and comparisons become
`Piecewise` and relations, `max`/`min` become `Max`/`Min`. A law holds when every component of
`lhs - rhs` reduces to zero. The reductions are tried cheapest first (structural zero, `expand`,
exponent merging, max/min lattice normalization, `cancel`, branch-wise `Piecewise`), and only then
`simplify`, which can run for minutes: callers run `prove_laws` under a wall-clock budget in a
forked process (`ProofJob`) and never count a law as proved when that budget ran out.

Proofs are in exact real arithmetic for finite state values; the identity element (which may hold
`-inf`) is substituted exactly, and `combine(e, e)` is left to the numeric check, which sees
IEEE infinities and NaN the way the runtime does.
"""

from __future__ import annotations

import math
import multiprocessing
import time
import warnings
from dataclasses import dataclass, field
from itertools import product
from typing import Callable

import sympy as sp

from . import ir

LAWS = ("left_identity", "right_identity", "commutative", "associative")


class Unsupported(Exception):
    """A construct the translation does not model (externs, bool state, float→int casts)."""


# ---- a tiny n-d array of sympy expressions (torch broadcasting, row-major) -------------------

@dataclass(frozen=True)
class Arr:
    shape: tuple[int, ...]
    items: tuple  # row-major, len == prod(shape)

    @staticmethod
    def scalar(x) -> "Arr":
        return Arr((), (x,))

    @staticmethod
    def build(shape: tuple[int, ...], f: Callable[[tuple[int, ...]], object]) -> "Arr":
        return Arr(tuple(shape), tuple(f(ix) for ix in product(*(range(n) for n in shape))))

    def at(self, ix: tuple[int, ...]):
        flat = 0
        for i, n in zip(ix, self.shape):
            flat = flat * n + i
        return self.items[flat]

    def broadcast_to(self, shape: tuple[int, ...]) -> "Arr":
        if self.shape == tuple(shape):
            return self
        off = len(shape) - len(self.shape)
        return Arr.build(shape, lambda ix: self.at(tuple(0 if n == 1 else i for i, n in
                                                        zip(ix[off:], self.shape))))


def _bshape(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        sizes = {s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0} - {1}
        if len(sizes) > 1:
            raise Unsupported(f"shapes {shapes} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _map(f: Callable, *arrs: Arr) -> Arr:
    shape = _bshape(*(a.shape for a in arrs))
    bs = [a.broadcast_to(shape) for a in arrs]
    return Arr(shape, tuple(f(*xs) for xs in zip(*(b.items for b in bs))))


# ---- translation -------------------------------------------------------------------------------

def _number(v) -> sp.Expr:
    if isinstance(v, bool):
        return sp.true if v else sp.false
    if isinstance(v, int):
        return sp.Integer(v)
    if math.isinf(v):
        return sp.oo if v > 0 else -sp.oo
    if math.isnan(v):
        return sp.nan
    return sp.Rational(repr(float(v)))  # the decimal the user wrote, exactly


def symbols(op: ir.Op, prefix: str) -> dict[str, Arr]:
    """One symbol per scalar of each state field: `a_h`, `a_S_0_1`, ..."""
    out = {}
    for f in op.state:
        if f.type.dtype == "bool":
            raise Unsupported(f"bool state field '{f.name}'")
        kw = {"integer": True} if ir.is_int(f.type.dtype) else {"real": True}

        def sym(ix, f=f, kw=kw):
            return sp.Symbol("_".join([prefix, f.name] + [str(i) for i in ix]), **kw)
        out[f.name] = Arr.build(f.type.shape, sym)
    return out


def identity(op: ir.Op) -> dict[str, Arr]:
    """The declared identity element, exactly (`inf` as sympy's `oo`, `eye` as 0/1)."""
    out = {}
    for f in op.state:
        if f.init == "eye":
            out[f.name] = Arr.build(f.type.shape, lambda ix: sp.Integer(int(ix[0] == ix[1])))
        elif isinstance(f.init, tuple):
            def nested(ix, v=f.init):
                for i in ix:
                    v = v[i]
                return _number(v)
            out[f.name] = Arr.build(f.type.shape, nested)
        else:
            out[f.name] = Arr.build(f.type.shape, lambda ix, v=_number(f.init): v)
    return out


def _sigmoid(x):
    return 1 / (1 + sp.exp(-x))


_FUNCS: dict[str, Callable] = {
    "exp": sp.exp, "log": sp.log, "log1p": lambda x: sp.log(1 + x), "expm1": lambda x: sp.exp(x) - 1,
    "sqrt": sp.sqrt, "rsqrt": lambda x: 1 / sp.sqrt(x), "tanh": sp.tanh, "sigmoid": _sigmoid,
    "softplus": lambda x: sp.log(1 + sp.exp(x)), "sin": sp.sin, "cos": sp.cos,
    "silu": lambda x: x * _sigmoid(x), "logsigmoid": lambda x: -sp.log(1 + sp.exp(-x)),
    "abs": sp.Abs, "relu": lambda x: sp.Max(x, 0),
}
_REL = {"==": sp.Eq, "!=": sp.Ne, "<": sp.Lt, "<=": sp.Le, ">": sp.Gt, ">=": sp.Ge}


def _where(c, a, b):
    if c is sp.true:
        return a
    if c is sp.false:
        return b
    return sp.Piecewise((a, c), (b, True))


def _to_bool(x):
    return x if isinstance(x, sp.logic.boolalg.Boolean) else sp.Ne(x, 0)


class Translator:
    """Evaluates an IR function body on `Arr`s of sympy expressions."""

    def __init__(self, env: dict[str, dict[str, Arr]]):
        self.env = env
        self.locals: dict[str, Arr] = {}

    def run(self, fn: ir.Function) -> dict[str, Arr]:
        out = {}
        for st in fn.body:
            v = self.eval(st.value)
            if isinstance(st, ir.Let):
                self.locals[st.name] = v
            else:
                out[st.name] = v.broadcast_to(st.type.shape)
        return out

    def eval(self, e: ir.Expr) -> Arr:
        return getattr(self, "_" + type(e).__name__.lower())(e)

    def _const(self, e: ir.Const) -> Arr:
        return Arr.scalar(_number(e.value))

    def _fieldref(self, e: ir.FieldRef) -> Arr:
        return self.env[e.role][e.name]

    def _localref(self, e: ir.LocalRef) -> Arr:
        return self.locals[e.name]

    def _externcall(self, e: ir.ExternCall) -> Arr:
        raise Unsupported(f"extern '{e.name}' (externs are tested, never proved)")

    def _unary(self, e: ir.Unary) -> Arr:
        a = self.eval(e.arg)
        return _map((lambda x: -x) if e.op == "neg" else (lambda x: sp.Not(_to_bool(x))), a)

    def _binary(self, e: ir.Binary) -> Arr:
        a, b = self.eval(e.lhs), self.eval(e.rhs)
        if e.op == "@":
            return _matmul(a, b)
        op = e.op
        if op in _REL:
            return _map(_REL[op], a, b)
        if op in ("and", "or"):
            f = sp.And if op == "and" else sp.Or
            return _map(lambda x, y: f(_to_bool(x), _to_bool(y)), a, b)
        if op == "**":
            return _map(lambda x, y: x ** y, a, b)
        if op == "/":
            return _map(lambda x, y: x / y, a, b)
        f = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}[op]
        return _map(f, a, b)

    def _call(self, e: ir.Call) -> Arr:
        name = e.func
        args = [self.eval(a) for a in e.args]
        if name in ir.DTYPES:
            src, dst = e.args[0].type.dtype, name
            if src == "bool" and dst != "bool":
                return _map(lambda c: sp.Piecewise((1, c), (0, True)), args[0])
            if ir.is_float(src) and not ir.is_float(dst):
                raise Unsupported(f"cast from {src} to {dst}")
            if dst == "bool":
                return _map(_to_bool, args[0])
            return args[0]
        if name == "where":
            return _map(lambda c, x, y: _where(_to_bool(c), x, y), *args)
        if name == "outer":
            a, b = args
            return Arr.build(a.shape + b.shape, lambda ix: a.items[ix[0]] * b.items[ix[1]])
        if name == "max":
            return _map(sp.Max, *args)
        if name == "min":
            return _map(sp.Min, *args)
        if name == "logaddexp":
            return _map(lambda x, y: sp.log(sp.exp(x) + sp.exp(y)), *args)
        if name in _FUNCS:
            return _map(_FUNCS[name], args[0])
        raise Unsupported(f"function {name}()")

    def _reduce(self, e: ir.Reduce) -> Arr:
        a = self.eval(e.arg)
        f = {"sum": lambda xs: sp.Add(*xs), "max": lambda xs: sp.Max(*xs),
             "min": lambda xs: sp.Min(*xs)}[e.op]
        if e.axis is None:
            return Arr.scalar(f(a.items))
        ax = e.axis
        shape = a.shape[:ax] + a.shape[ax + 1:]
        return Arr.build(shape, lambda ix: f([a.at(ix[:ax] + (k,) + ix[ax:])
                                              for k in range(a.shape[ax])]))

    def _index(self, e: ir.Index) -> Arr:
        a = self.eval(e.base)
        # picks: per input axis, ("int", i) or ("slice", output axis, start); `None` adds an axis
        out_shape, picks = [], []
        for it in e.items:
            if it.kind == "newaxis":
                out_shape.append(1)
            elif it.kind == "int":
                picks.append(("int", it.start))
            else:
                picks.append(("slice", len(out_shape), it.start))
                out_shape.append(it.stop - it.start)

        def get(ix):
            src = tuple(p[1] if p[0] == "int" else p[2] + ix[p[1]] for p in picks)
            return a.at(src)
        return Arr.build(tuple(out_shape), get)


def _matmul(a: Arr, b: Arr) -> Arr:
    """torch.matmul on ranks 1 and 2 (batched matmul of higher ranks is not modelled)."""
    if a.shape == () or b.shape == () or len(a.shape) > 2 or len(b.shape) > 2:
        raise Unsupported("@ on arrays of rank > 2")
    k = a.shape[-1]
    if len(a.shape) == 1 and len(b.shape) == 1:
        return Arr.scalar(sp.Add(*(a.items[i] * b.items[i] for i in range(k))))
    if len(a.shape) == 1:
        return Arr.build(b.shape[1:], lambda ix: sp.Add(*(a.items[i] * b.at((i, ix[0])) for i in range(k))))
    if len(b.shape) == 1:
        return Arr.build(a.shape[:1], lambda ix: sp.Add(*(a.at((ix[0], i)) * b.items[i] for i in range(k))))
    return Arr.build((a.shape[0], b.shape[1]),
                     lambda ix: sp.Add(*(a.at((ix[0], i)) * b.at((i, ix[1])) for i in range(k))))


def combine(op: ir.Op, l: dict[str, Arr], r: dict[str, Arr]) -> dict[str, Arr]:
    return Translator({"l": l, "r": r}).run(op.combine)


def law_sides(op: ir.Op, law: str) -> tuple[dict[str, Arr], dict[str, Arr]]:
    """Both sides of a law, as state dicts of sympy arrays."""
    a, b, c = symbols(op, "a"), symbols(op, "b"), symbols(op, "c")
    if law == "associative":
        return combine(op, combine(op, a, b), c), combine(op, a, combine(op, b, c))
    if law == "commutative":
        return combine(op, a, b), combine(op, b, a)
    e = identity(op)
    if law == "left_identity":
        return combine(op, e, a), a
    if law == "right_identity":
        return combine(op, a, e), a
    raise ValueError(law)


# ---- reductions to zero ------------------------------------------------------------------------

def _lattice(e: sp.Expr) -> sp.Expr:
    """Distribute sums over max/min: max(x, y) + z -> max(x + z, y + z), bottom-up.

    With `Max`'s own flattening this makes max(max(a + g, b) + h, c) and
    max(a + g + h, max(b + h, c)) the same expression, which is what log-space stabilizers need.
    Only a lone `Max`/`Min` with coefficient +1 is distributed (no other term holds a max), so
    `m - max(...)` in an exponent and a difference `max(...) - max(...)` keep their shape and
    cancel against twins.
    """
    if not e.args or e.is_Atom:
        return e
    args = [_lattice(a) for a in e.args]
    if isinstance(e, sp.Add):
        lat = [a for a in args if isinstance(a, (sp.Max, sp.Min))]
        if len(lat) == 1:
            m = lat[0]
            rest = [a for a in args if a is not m]
            if not any(a.has(sp.Max, sp.Min) for a in rest):
                return type(m)(*(_lattice(x + sp.Add(*rest)) for x in m.args))
    return e.func(*args)


def _merge_exp(e: sp.Expr) -> sp.Expr:
    return sp.expand(sp.powsimp(sp.expand(e, power_exp=False), combine="exp"), power_exp=False)


# (name, reduction); each maps a difference to something that is 0 when the law holds.
_CHEAP_STEPS: tuple[tuple[str, Callable[[sp.Expr], sp.Expr]], ...] = (
    ("expand", lambda e: sp.expand(e)),
    ("merge exponents", _merge_exp),
    ("max/min lattice", lambda e: _merge_exp(_lattice(_merge_exp(e)))),
    ("cancel", lambda e: sp.cancel(sp.together(e))),
)


def _is_zero(e) -> bool:
    return e == 0 or e is sp.S.Zero


def reduce_to_zero(d: sp.Expr, allow_simplify: bool) -> str | None:
    """The name of the first step that shows `d == 0`, or None."""
    if _is_zero(d):
        return "structural"
    if d.has(sp.nan, sp.zoo):
        return None
    if isinstance(d, sp.Piecewise) or d.has(sp.Piecewise):
        folded = sp.piecewise_fold(d)
        if isinstance(folded, sp.Piecewise):
            steps = [reduce_to_zero(branch, allow_simplify) for branch, _ in folded.args]
            if all(s is not None for s in steps):
                return "piecewise: " + ", ".join(sorted(set(steps)))
        d = folded
    for name, step in _CHEAP_STEPS:
        try:
            if _is_zero(step(d)):
                return name
        except (TypeError, ValueError, NotImplementedError, RecursionError):
            continue
    if allow_simplify:
        if _is_zero(sp.simplify(_lattice(d))):
            return "simplify"
    return None


@dataclass
class LawProof:
    """The symbolic outcome for one law. `status`: proved | not-proved | timeout | unsupported."""

    law: str
    status: str
    step: str | None = None
    seconds: float = 0.0
    note: str | None = None
    failed_component: str | None = None


@dataclass
class _Pending:
    """A law after the cheap steps: the components they could not reduce."""

    law: str
    t0: float
    steps: set
    left: list  # (field, index, difference)


def _cheap_stage(op: ir.Op, law: str) -> LawProof | _Pending:
    """Translate and try the cheap steps on every component: a proof, or what is left."""
    t0 = time.perf_counter()
    try:
        lhs, rhs = law_sides(op, law)
    except Unsupported as e:
        return LawProof(law, "unsupported", note=str(e), seconds=time.perf_counter() - t0)
    steps, left = set(), []
    for f in op.state:
        for ix, (x, y) in zip(product(*(range(n) for n in f.type.shape)),
                              zip(lhs[f.name].items, rhs[f.name].items)):
            s = reduce_to_zero(x - y, allow_simplify=False)
            if s is None:
                left.append((f.name, ix, x - y))
            else:
                steps.add(s)
    if not left:
        return LawProof(law, "proved", step=", ".join(sorted(steps)), seconds=time.perf_counter() - t0)
    return _Pending(law, t0, steps, left)


def _simplify_stage(p: _Pending, allow_simplify: bool = True) -> LawProof:
    for name, ix, d in p.left:
        s = reduce_to_zero(d, allow_simplify=True) if allow_simplify else None
        if s is None:
            where = name + (str(list(ix)) if ix else "")
            return LawProof(p.law, "not-proved", seconds=time.perf_counter() - p.t0,
                            failed_component=where,
                            note=f"{where}: the difference does not reduce to 0")
        p.steps.add(s)
    return LawProof(p.law, "proved", step=", ".join(sorted(p.steps)),
                    seconds=time.perf_counter() - p.t0)


def prove_law(op: ir.Op, law: str, allow_simplify: bool = True) -> LawProof:
    """Prove one law: cheap steps on every component, then `simplify` (unbounded in time)."""
    r = _cheap_stage(op, law)
    return r if isinstance(r, LawProof) else _simplify_stage(r, allow_simplify)


# ---- running proofs under a wall-clock budget ---------------------------------------------------

def _child(op: ir.Op, laws: tuple[str, ...], conn) -> None:
    """Cheap steps for every law first (each result sent at once), then `simplify` law by law,
    so one hard law cannot starve the easy ones of the budget."""
    pending = []
    for law in laws:
        try:
            r = _cheap_stage(op, law)
        except Exception as e:  # a sympy failure is "no proof", never a crash of the checker
            r = LawProof(law, "not-proved", note=f"sympy failed: {type(e).__name__}: {e}")
        if isinstance(r, LawProof):
            conn.send(r)
        else:
            pending.append(r)
    for p in pending:
        try:
            r = _simplify_stage(p)
        except Exception as e:
            r = LawProof(p.law, "not-proved", note=f"sympy failed: {type(e).__name__}: {e}")
        conn.send(r)
    conn.close()


@dataclass
class ProofJob:
    """Proofs of several laws in one forked process, killed when the budget runs out.

    Python threads cannot be interrupted inside sympy, so a wall-clock limit needs a process;
    `fork` shares the IR with the child for free. Where no child can be started the cheap steps
    run in-process and `simplify` is skipped (said so in the note).
    """

    op: ir.Op
    laws: tuple[str, ...]
    budget: float
    started: float = field(default_factory=time.monotonic)
    results: dict[str, LawProof] = field(default_factory=dict)
    _proc: object = None
    _recv: object = None

    def __post_init__(self):
        if not self.laws:
            return
        why = None
        if "fork" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("fork")
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(self.op, tuple(self.laws), send), daemon=True)
            try:
                with warnings.catch_warnings():  # the child runs sympy only, never torch threads
                    warnings.simplefilter("ignore", DeprecationWarning)
                    p.start()
                send.close()
                self._proc, self._recv = p, recv
                return
            except (AssertionError, OSError) as e:  # e.g. inside a daemonic worker: no children
                send.close()
                recv.close()
                why = str(e)
        else:
            why = "no fork()"
        for law in self.laws:
            r = prove_law(self.op, law, allow_simplify=False)
            if r.status == "not-proved":
                r.note = (r.note or "") + f" (no subprocess: {why}; simplify not tried)"
            self.results[law] = r

    def wait(self) -> dict[str, LawProof]:
        """Every law's result, waiting until the budget is spent; the unfinished time out."""
        deadline = self.started + self.budget
        if self._proc is not None:
            while len(self.results) < len(self.laws):
                left = deadline - time.monotonic()
                if left <= 0 or not self._recv.poll(left):
                    break
                try:
                    r = self._recv.recv()
                except EOFError:
                    break
                self.results[r.law] = r
            self.cancel()
        for law in self.laws:
            if law not in self.results:
                self.results[law] = LawProof(law, "timeout", seconds=self.budget,
                                             note=f"no proof within the {self.budget:g} s budget")
        return dict(self.results)

    def cancel(self) -> None:
        p, self._proc = self._proc, None
        if p is None:
            return
        if p.is_alive():
            p.kill()
        p.join()
        self._recv.close()

    def __del__(self):
        try:
            self.cancel()
        except Exception:
            pass


def shrink_dims(op: ir.Op, max_scalars: int = 32, small: int = 2) -> dict[str, int] | None:
    """Dims to prove at: the declared ones if the state is small, else each dim cut to `small`."""
    n = sum(math.prod(f.type.shape) for f in op.state)
    if n <= max_scalars or not op.dims:
        return None
    return {k: min(v, small) for k, v in op.dims}


__all__ = ["Arr", "LAWS", "LawProof", "ProofJob", "Unsupported", "combine", "identity",
           "law_sides", "prove_law", "reduce_to_zero", "shrink_dims", "symbols"]
