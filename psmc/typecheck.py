"""Syntax tree → typed IR: bind static dims, resolve names, infer and check every type.

Shapes broadcast as in torch, dtypes promote as in torch (literals are "weak", like Python
scalars), and every rule that fails raises a `PsmError` pointing at the offending token with a
hint on how to fix it.
"""

from __future__ import annotations

import difflib
import keyword
import math
from typing import Callable

from . import ir
from . import syntax as S
from .errors import Loc, PsmError
from .ir import Type

# Functions of one float argument: the result is float (ints are promoted to f32, as in torch).
FLOAT_FUNCS = ("exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "tanh", "sigmoid", "softplus",
               "sin", "cos", "silu", "logsigmoid")
# Functions of one argument that keep its dtype.
SAME_FUNCS = ("abs", "relu")
BINARY_FUNCS = ("max", "min", "logaddexp")
REDUCTIONS = ("sum", "max", "min")
CASTS = ir.DTYPES
CONSTANTS = {"inf": math.inf, "pi": math.pi, "true": True, "false": False}
BUILTINS = sorted(set(FLOAT_FUNCS + SAME_FUNCS + BINARY_FUNCS + REDUCTIONS + CASTS
                      + ("where", "outer")))

# Keyword arguments of the op's forward(); inputs may not use them.
RESERVED_INPUTS = {"return_state", "initial_state", "backend", "self"}

_CATEGORY = {"bool": 0, "i32": 1, "i64": 1, "f16": 2, "bf16": 2, "f32": 2, "f64": 2}
_DEFAULT_OF_CATEGORY = {0: "bool", 1: "i64", 2: "f32"}
_RANK_IN_CATEGORY = {"bool": 0, "i32": 0, "i64": 1, "f16": 0, "bf16": 0, "f32": 1, "f64": 2}


# ---- dtype promotion and broadcasting (torch's rules) ------------------------------------------

def _promote_strong(a: str, b: str) -> str:
    if a == b:
        return a
    ca, cb = _CATEGORY[a], _CATEGORY[b]
    if ca != cb:
        return a if ca > cb else b
    if {a, b} == {"f16", "bf16"}:
        return "f32"
    return a if _RANK_IN_CATEGORY[a] >= _RANK_IN_CATEGORY[b] else b


def promote(a: Type, b: Type) -> tuple[str, bool]:
    """The dtype of `a op b` and whether it is still weak (both operands were literals)."""
    if a.weak and b.weak:
        cat = max(_CATEGORY[a.dtype], _CATEGORY[b.dtype])
        return _DEFAULT_OF_CATEGORY[cat], True
    if a.weak or b.weak:
        weak, strong = (a, b) if a.weak else (b, a)
        if _CATEGORY[weak.dtype] > _CATEGORY[strong.dtype]:
            return _DEFAULT_OF_CATEGORY[_CATEGORY[weak.dtype]], False
        return strong.dtype, False
    return _promote_strong(a.dtype, b.dtype), False


def broadcast_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """Right-aligned broadcasting; None when the shapes are incompatible."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y) if 1 in (x, y) else x)
    return tuple(reversed(out))


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"did you mean '{close[0]}'?" if close else ""


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]" if shape else "a scalar"


# ---- the checker -------------------------------------------------------------------------------

class _Scope:
    """Names visible inside one function body."""

    def __init__(self, op: "_OpChecker", kind: str, roles: dict[str, str]):
        self.op = op
        self.kind = kind
        self.roles = roles  # user's param name -> role ("x", "l", "r", "s")
        self.locals: dict[str, Type] = {}


class _OpChecker:
    def __init__(self, decl: S.OpDecl, overrides: dict[str, int]):
        self.decl = decl
        self.dims = self._bind_dims(decl, overrides)
        self.externs: dict[str, ir.Extern] = {}

    # -- declarations --
    @staticmethod
    def _bind_dims(decl: S.OpDecl, overrides: dict[str, int]) -> dict[str, int]:
        dims: dict[str, int] = {}
        for d in decl.dims:
            _check_identifier(d.name, "a dim", d.loc)
            if d.name in dims:
                raise PsmError(f"dim '{d.name}' is declared twice", d.loc, "remove one of them")
            value = overrides.get(d.name, d.default)
            if value is None:
                raise PsmError(f"dim '{d.name}' has no default and no value was given", d.loc,
                               f"give it a default (op {decl.name}[{d.name} = 64]) or set it at "
                               f"compile time: --set {d.name}=64 or compile_file(..., {d.name}=64)")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PsmError(f"dim '{d.name}' must be a positive integer, got {value!r}", d.loc,
                               f"set {d.name} to 1 or more")
            dims[d.name] = value
        return dims

    def dim_value(self, d: S.DimRef) -> int:
        if isinstance(d.value, int):
            if d.value < 1:
                raise PsmError(f"a dimension must be at least 1, got {d.value}", d.loc,
                               "use a positive size")
            return d.value
        if d.value not in self.dims:
            declared = ", ".join(self.dims) or "none"
            raise PsmError(f"undeclared dim '{d.value}'", d.loc,
                           f"declare it on the op: op {self.decl.name}[{d.value} = 64] "
                           f"(declared dims: {declared})")
        return self.dims[d.value]

    def type_of(self, t: S.TypeExpr) -> Type:
        if t.dtype not in ir.DTYPES:
            hint = _suggest(t.dtype, ir.DTYPES)
            raise PsmError(f"unknown type '{t.dtype}'", t.loc,
                           (hint + " " if hint else "") + "types are " + " ".join(ir.DTYPES))
        return Type(t.dtype, tuple(self.dim_value(d) for d in t.shape))

    def check(self) -> ir.Op:
        d = self.decl
        _check_identifier(d.name, "an op", d.loc)
        expect = None
        if d.expect is not None:
            word, loc = d.expect
            if word not in ("associative", "nonassociative"):
                raise PsmError(f"unknown expectation '{word}'", loc,
                               "write `expect associative` or `expect nonassociative`")
            expect = word
        chunk = self.dim_value(d.chunk) if d.chunk is not None else None

        if not d.inputs:
            raise PsmError(f"op '{d.name}' declares no inputs", d.loc,
                           "add one, e.g. `input x: f32`: inputs give the sequence its length")
        if not d.state:
            raise PsmError(f"op '{d.name}' declares no state", d.loc,
                           "add the state fields and their identity, e.g. `state h: f32 = 0`")
        for kind in ("lift", "combine", "output"):
            if getattr(d, kind) is None:
                sig = {"lift": "lift(x) { ... }", "combine": "combine(l, r) { ... }",
                       "output": "output(s, x) { ... }"}[kind]
                raise PsmError(f"op '{d.name}' has no {kind}", d.end_loc, f"add `{sig}`")

        self.inputs = self._inputs(d.inputs)
        self.state = self._state(d.state)
        for e in d.externs:
            _check_identifier(e.name, "an extern", e.loc)
            if e.name in self.externs:
                raise PsmError(f"extern '{e.name}' is declared twice", e.loc, "remove one")
            self.externs[e.name] = ir.Extern(e.name, tuple(self.type_of(a) for a in e.args),
                                             self.type_of(e.result), e.loc)
        self.chunk = chunk

        lift = self._function(d.lift, ("x",))
        combine = self._function(d.combine, ("l", "r"))
        output = self._function(d.output, ("s", "x"))
        outputs = tuple(ir.OutputField(a.name, a.type, a.loc) for a in output.assigns)
        if chunk is not None:
            for a in outputs:
                if not a.type.shape or a.type.shape[0] != chunk:
                    raise PsmError(
                        f"output '{a.name}' of a chunked op must have the chunk axis first "
                        f"(shape [{chunk}, ...]), got {_shape_text(a.type.shape)}", a.loc,
                        "output sees one chunk of tokens and returns one value per token")
        return ir.Op(
            name=d.name, dims=tuple(self.dims.items()), expect=expect, chunk=chunk,
            inputs=tuple(self.inputs.values()), state=tuple(self.state.values()),
            externs=tuple(self.externs.values()), lift=lift, combine=combine, output=output,
            exclusive=d.output.exclusive, outputs=outputs, source=d.loc.source, loc=d.loc,
        )

    def _inputs(self, decls) -> dict[str, ir.InputField]:
        out: dict[str, ir.InputField] = {}
        for i in decls:
            _check_identifier(i.name, "an input", i.loc)
            if i.name in RESERVED_INPUTS:
                raise PsmError(f"'{i.name}' cannot name an input: it is an argument of the op call",
                               i.loc, f"rename it, e.g. '{i.name}_'")
            if i.name in out:
                raise PsmError(f"input '{i.name}' is declared twice", i.loc, "rename or remove one")
            t = self.type_of(i.type)
            rng = None
            if i.range is not None:
                lo, hi, rloc = i.range
                if t.dtype == "bool":
                    raise PsmError("a bool input cannot have a range", rloc, "remove `in [...]`")
                if not lo <= hi:
                    raise PsmError(f"empty range [{lo}, {hi}]", rloc, "write `in [low, high]` with low <= high")
                rng = (lo, hi)
            out[i.name] = ir.InputField(i.name, t, rng, i.loc)
        return out

    def _state(self, decls) -> dict[str, ir.StateField]:
        out: dict[str, ir.StateField] = {}
        for s in decls:
            _check_identifier(s.name, "a state field", s.loc)
            if s.name in out:
                raise PsmError(f"state field '{s.name}' is declared twice", s.loc, "rename or remove one")
            t = self.type_of(s.type)
            out[s.name] = ir.StateField(s.name, t, self._init(s.init, t, s.name), s.loc)
        return out

    def _init(self, init: S.InitExpr, t: Type, name: str):
        if init.kind == "eye":
            if t.rank != 2 or t.shape[0] != t.shape[1]:
                raise PsmError(f"`eye` needs a square matrix field, but '{name}' is {_shape_text(t.shape)}",
                               init.loc, "use eye only for fields of shape [N, N]")
            return "eye"
        if init.kind == "number":
            return self._init_number(init, t)

        def nested(e: S.InitExpr, shape: tuple[int, ...]):
            if e.kind != "list":
                if shape:
                    raise PsmError(f"expected a list of {shape[0]} items here", e.loc,
                                   f"the identity of '{name}' must have shape {_shape_text(t.shape)}")
                return self._init_number(e, t)
            if not shape:
                raise PsmError("too many nested lists", e.loc,
                               f"the identity of '{name}' must have shape {_shape_text(t.shape)}")
            if len(e.value) != shape[0]:
                raise PsmError(f"this list has {len(e.value)} items but the axis has size {shape[0]}",
                               e.loc, f"the identity of '{name}' must have shape {_shape_text(t.shape)}")
            return tuple(nested(c, shape[1:]) for c in e.value)

        return nested(init, t.shape)

    @staticmethod
    def _init_number(e: S.InitExpr, t: Type):
        v = e.value
        if t.dtype in ir.INT_DTYPES + ("bool",):
            if isinstance(v, float) and not v.is_integer():
                raise PsmError(f"{v} is not a valid {t.dtype} value", e.loc,
                               "integer fields need integer identities (inf is not an integer)")
            v = int(v)
            bits = {"i32": 31, "i64": 63}.get(t.dtype)
            if bits is not None and not -(2 ** bits) <= v < 2 ** bits:
                raise PsmError(f"{v} does not fit in {t.dtype}", e.loc,
                               f"{t.dtype} holds {-(2 ** bits)} to {2 ** bits - 1}; use i64 or a smaller value")
            if t.dtype == "bool" and v not in (0, 1):
                raise PsmError(f"{v} is not a bool", e.loc, "use 0 or 1")
        return v

    # -- functions --
    def _function(self, f: S.FuncDef, roles: tuple[str, ...]) -> ir.Function:
        if len(f.params) != len(roles):
            raise PsmError(f"{f.kind} takes {len(roles)} parameter(s), got {len(f.params)}", f.loc,
                           {"lift": "write lift(x)", "combine": "write combine(l, r)",
                            "output": "write output(s, x)"}[f.kind])
        names = {}
        for (p, loc), role in zip(f.params, roles):
            if p in names:
                raise PsmError(f"parameter '{p}' appears twice", loc, "give each parameter its own name")
            if p in self.dims or p in CONSTANTS:
                raise PsmError(f"parameter '{p}' hides the {'dim' if p in self.dims else 'constant'} '{p}'",
                               loc, "rename the parameter")
            names[p] = role
        scope = _Scope(self, f.kind, names)
        body: list[ir.Stmt] = []
        assigned: dict[str, Loc] = {}
        for st in f.body:
            if isinstance(st, S.Let):
                self._check_new_local(st.name, st.loc, scope)
                value = self.expr(st.value, scope)
                scope.locals[st.name] = Type(value.type.dtype, value.type.shape, False)
                body.append(ir.Let(st.name, value, st.loc))
                continue
            if st.name in assigned:
                prev = assigned[st.name]
                raise PsmError(f"'{st.name}' is assigned twice in {f.kind} (first at line {prev.line})",
                               st.loc, "assign each field once; use `let` for intermediate values")
            value = self.expr(st.value, scope)
            if f.kind == "output":
                _check_identifier(st.name, "an output", st.loc)
                target = Type(_strong_dtype(value.type), value.type.shape)
            else:
                if st.name not in self.state:
                    raise PsmError(
                        f"{f.kind} assigns '{st.name}', which is not a state field", st.loc,
                        (_suggest(st.name, self.state) + " " if _suggest(st.name, self.state) else "")
                        + f"state fields: {', '.join(self.state)}; use `let` for a local value")
                target = self.state[st.name].type
                self._check_assignable(value, target, st.name, st.loc)
            assigned[st.name] = st.loc
            body.append(ir.Assign(st.name, value, target, st.loc))
        if f.kind in ("lift", "combine"):
            missing = [n for n in self.state if n not in assigned]
            if missing:
                raise PsmError(f"{f.kind} does not assign state field(s) {', '.join(missing)}", f.loc,
                               f"{f.kind} must assign every state field exactly once")
        elif not assigned:
            raise PsmError("output assigns nothing", f.loc, "assign at least one output, e.g. `y = s.h`")
        return ir.Function(f.kind, tuple(p for p, _ in f.params), tuple(body), f.loc)

    def _check_new_local(self, name: str, loc: Loc, scope: _Scope) -> None:
        what = None
        if name in scope.locals:
            what = "an earlier let"
        elif name in scope.roles:
            what = "a parameter"
        elif name in self.dims:
            what = "a dim"
        elif name in CONSTANTS:
            what = "a constant"
        elif name in self.externs:
            what = "an extern"
        if what:
            raise PsmError(f"let '{name}' shadows {what} of the same name", loc,
                           "pick a new name: psm does not allow shadowing")

    @staticmethod
    def _check_assignable(value: ir.Expr, target: Type, name: str, loc: Loc) -> None:
        vt = value.type
        if broadcast_shapes(vt.shape, target.shape) != target.shape:
            raise PsmError(f"'{name}' has shape {_shape_text(target.shape)} but the value has shape "
                           f"{_shape_text(vt.shape)}", loc,
                           "the value must have the field's shape or broadcast to it")
        if not vt.weak and _promote_strong(vt.dtype, target.dtype) != target.dtype:
            raise PsmError(f"'{name}' is {target.dtype} but the value is {vt.dtype}", loc,
                           f"convert explicitly: {name} = {target.dtype}(...)")
        if vt.weak and _CATEGORY[vt.dtype] > _CATEGORY[target.dtype]:
            raise PsmError(f"'{name}' is {target.dtype} but the value is a {vt.dtype} constant", loc,
                           f"use a {target.dtype} value")

    # -- expressions --
    def expr(self, e: S.Expr, scope: _Scope) -> ir.Expr:
        method: Callable = getattr(self, "_" + type(e).__name__.lower())
        return _fold(method(e, scope))

    def _num(self, e: S.Num, scope) -> ir.Expr:
        dtype = "i64" if isinstance(e.value, int) else "f32"
        return ir.Const(e.value, Type(dtype, (), True), e.loc)

    def _name(self, e: S.Name, scope: _Scope) -> ir.Expr:
        n = e.name
        if n in scope.locals:
            return ir.LocalRef(n, scope.locals[n], e.loc)
        if n in self.dims:
            return ir.Const(self.dims[n], Type("i64", (), True), e.loc)
        if n in CONSTANTS:
            v = CONSTANTS[n]
            return ir.Const(v, Type("bool" if isinstance(v, bool) else "f32", (), True), e.loc)
        if n in scope.roles:
            role = scope.roles[n]
            what = "the inputs" if role == "x" else "a state"
            example = next(iter(self.inputs if role == "x" else self.state))
            raise PsmError(f"'{n}' is {what}, not a value", e.loc, f"read one field, e.g. {n}.{example}")
        if n == "None":
            raise PsmError("None is only allowed inside [ ] to add an axis", e.loc, "e.g. v[:, None]")
        assigned_here = n in self.state or scope.kind == "output"
        hint = _suggest(n, list(scope.locals) + list(self.dims) + list(CONSTANTS) + list(scope.roles))
        if assigned_here and not hint:
            hint = "assigned values cannot be read back; name the value with `let` and use it twice"
        raise PsmError(f"unknown name '{n}'", e.loc, hint or "names are let-locals, dims and parameters")

    def _field(self, e: S.Field, scope: _Scope) -> ir.Expr:
        if not isinstance(e.base, S.Name) or e.base.name not in scope.roles:
            params = ", ".join(scope.roles)
            raise PsmError(f"'.{e.name}' must follow a parameter ({params})", e.loc,
                           "fields are read from the parameters of lift, combine and output")
        role = scope.roles[e.base.name]
        if role == "x":
            if e.name not in self.inputs:
                raise PsmError(f"the inputs have no field '{e.name}'", e.loc,
                               (_suggest(e.name, self.inputs) + " " if _suggest(e.name, self.inputs) else "")
                               + f"inputs: {', '.join(self.inputs)}")
            f = self.inputs[e.name]
            t = f.type if self.chunk is None else Type(f.type.dtype, (self.chunk,) + f.type.shape)
            return ir.FieldRef("x", e.name, t, e.loc)
        if e.name not in self.state:
            raise PsmError(f"the state has no field '{e.name}'", e.loc,
                           (_suggest(e.name, self.state) + " " if _suggest(e.name, self.state) else "")
                           + f"state fields: {', '.join(self.state)}")
        return ir.FieldRef(role, e.name, self.state[e.name].type, e.loc)

    def _unary(self, e: S.Unary, scope) -> ir.Expr:
        a = self.expr(e.arg, scope)
        if e.op == "+":
            _require_numeric(a, "+", e.loc)
            return a
        if e.op == "-":
            _require_numeric(a, "-", e.loc)
            if isinstance(a, ir.Const):
                return ir.Const(-a.value, a.type, e.loc)
            return ir.Unary("neg", a, a.type, e.loc)
        if a.type.dtype != "bool":
            raise PsmError(f"'not' needs a bool operand, got {a.type.dtype}", e.loc,
                           "compare first, e.g. not (x > 0)")
        return ir.Unary("not", a, a.type, e.loc)

    def _binary(self, e: S.Binary, scope) -> ir.Expr:
        a, b = self.expr(e.lhs, scope), self.expr(e.rhs, scope)
        op = e.op
        if op == "@":
            return self._matmul(a, b, e.loc)
        shape = broadcast_shapes(a.type.shape, b.type.shape)
        if shape is None:
            raise PsmError(f"shape mismatch for '{op}': {_shape_text(a.type.shape)} and "
                           f"{_shape_text(b.type.shape)} do not broadcast", e.loc,
                           "shapes broadcast as in torch: align them with [:, None] or index one")
        if op in ("and", "or"):
            for x in (a, b):
                if x.type.dtype != "bool":
                    raise PsmError(f"'{op}' needs bool operands, got {x.type.dtype}", e.loc,
                                   "compare first, e.g. (a > 0) and (b > 0)")
            return ir.Binary(op, a, b, Type("bool", shape, a.type.weak and b.type.weak), e.loc)
        _require_numeric(a, op, e.loc)
        _require_numeric(b, op, e.loc)
        dtype, weak = promote(a.type, b.type)
        if op in ("==", "!=", "<", "<=", ">", ">="):
            return ir.Binary(op, a, b, Type("bool", shape, weak), e.loc)
        if op == "/" and not ir.is_float(dtype):
            dtype = "f32"
        if (op == "**" and not ir.is_float(dtype) and isinstance(b, ir.Const)
                and not isinstance(b.value, bool) and b.value < 0):
            raise PsmError("an integer to a negative power is not an integer", e.loc,
                           "make the base a float, e.g. f32(x) ** -1 or 1.0 / x")
        return ir.Binary(op, a, b, Type(dtype, shape, weak), e.loc)

    def _matmul(self, a: ir.Expr, b: ir.Expr, loc: Loc) -> ir.Expr:
        sa, sb = a.type.shape, b.type.shape
        for x in (a, b):
            if x.type.rank == 0:
                raise PsmError("'@' needs vectors or matrices, got a scalar", loc, "use '*' to scale")
            if x.type.dtype == "bool":
                raise PsmError("'@' needs numbers, got bool", loc, "convert with f32(...)")
        ka = sa[-1]
        kb = sb[0] if len(sb) == 1 else sb[-2]
        if ka != kb:
            raise PsmError(f"shape mismatch for '@': {_shape_text(sa)} @ {_shape_text(sb)} "
                           f"(inner sizes {ka} and {kb} differ)", loc,
                           "the last axis of the left must equal the first (vector) or second-to-last "
                           "(matrix) axis of the right")
        if len(sa) == 1 and len(sb) == 1:
            shape: tuple[int, ...] = ()
        elif len(sa) == 1:
            shape = sb[:-2] + sb[-1:]
        elif len(sb) == 1:
            shape = sa[:-1]
        else:
            batch = broadcast_shapes(sa[:-2], sb[:-2])
            if batch is None:
                raise PsmError(f"batch axes of '@' do not broadcast: {_shape_text(sa)} @ {_shape_text(sb)}",
                               loc, "give both sides compatible leading axes")
            shape = batch + (sa[-2], sb[-1])
        dtype, _ = promote(a.type, b.type)
        return ir.Binary("@", a, b, Type(dtype, shape), loc)

    def _index(self, e: S.Index, scope) -> ir.Expr:
        base = self.expr(e.base, scope)
        shape = base.type.shape
        used = sum(1 for it in e.items if not _is_none(it))
        if used > len(shape):
            raise PsmError(f"too many indices: {used} for a value of shape {_shape_text(shape)}",
                           e.loc, "index at most one position per axis")
        items: list[ir.IndexItem] = []
        out: list[int] = []
        axis = 0
        for it in e.items:
            if _is_none(it):
                items.append(ir.IndexItem("newaxis"))
                out.append(1)
                continue
            size = shape[axis]
            if isinstance(it, S.Slice):
                start = self._static_int(it.start, scope) if it.start is not None else None
                stop = self._static_int(it.stop, scope) if it.stop is not None else None
                lo, hi, _ = slice(start, stop).indices(size)
                length = max(hi - lo, 0)
                if length == 0:
                    raise PsmError(f"this slice of an axis of size {size} is empty", it.loc,
                                   "check the bounds")
                items.append(ir.IndexItem("slice", lo, hi))
                out.append(length)
            else:
                i = self._static_int(it, scope)
                if not -size <= i < size:
                    raise PsmError(f"index {i} is out of range for an axis of size {size}", it.loc,
                                   f"use an index from {-size} to {size - 1}")
                items.append(ir.IndexItem("int", i % size))
            axis += 1
        for rest in shape[axis:]:
            items.append(ir.IndexItem("slice", 0, rest))
            out.append(rest)
        return ir.Index(base, tuple(items), Type(base.type.dtype, tuple(out), base.type.weak), e.loc)

    def _static_int(self, e: S.Expr, scope) -> int:
        v = self.expr(e, scope)
        if not isinstance(v, ir.Const) or not isinstance(v.value, int) or isinstance(v.value, bool):
            raise PsmError("indices must be integer constants", getattr(e, "loc", None),
                           "use a literal or a dim, e.g. x[0] or x[K - 1]")
        return v.value

    def _call(self, e: S.Call, scope) -> ir.Expr:
        name = e.func
        if name in self.externs:
            return self._extern_call(e, scope)
        if name not in BUILTINS:
            hint = _suggest(name, BUILTINS + list(self.externs))
            raise PsmError(f"unknown function '{name}'", e.loc,
                           (hint + " " if hint else "") + "declare it with `extern` if it is a torch module")
        kwargs = {k: (v, loc) for k, v, loc in e.kwargs}
        for k, (_, loc) in kwargs.items():
            if k != "axis" or name not in REDUCTIONS:
                raise PsmError(f"{name}() takes no keyword argument '{k}'", loc,
                               "only sum, max and min take axis=")
        args = [self.expr(a, scope) for a in e.args]
        if name in REDUCTIONS and ("axis" in kwargs or len(args) == 1 or
                                   (name == "sum" and len(args) == 2)):
            return self._reduce(name, args, kwargs, e, scope)
        if name in CASTS:
            self._arity(e, args, 1)
            return ir.Call(name, tuple(args), Type(name, args[0].type.shape), e.loc)
        if name in FLOAT_FUNCS:
            self._arity(e, args, 1)
            a = args[0]
            _require_numeric(a, name, e.loc)
            dtype = a.type.dtype if ir.is_float(a.type.dtype) else "f32"
            return ir.Call(name, (a,), Type(dtype, a.type.shape, a.type.weak), e.loc)
        if name in SAME_FUNCS:
            self._arity(e, args, 1)
            _require_numeric(args[0], name, e.loc)
            return ir.Call(name, tuple(args), args[0].type, e.loc)
        if name in BINARY_FUNCS:
            self._arity(e, args, 2)
            a, b = args
            for x in args:
                _require_numeric(x, name, e.loc)
            shape = broadcast_shapes(a.type.shape, b.type.shape)
            if shape is None:
                raise PsmError(f"shape mismatch in {name}(): {_shape_text(a.type.shape)} and "
                               f"{_shape_text(b.type.shape)} do not broadcast", e.loc,
                               "shapes broadcast as in torch")
            dtype, weak = promote(a.type, b.type)
            if name == "logaddexp" and not ir.is_float(dtype):
                dtype = "f32"
            return ir.Call(name, (a, b), Type(dtype, shape, weak), e.loc)
        if name == "where":
            self._arity(e, args, 3)
            c, a, b = args
            if c.type.dtype != "bool":
                raise PsmError(f"where() needs a bool condition, got {c.type.dtype}", e.loc,
                               "compare first, e.g. where(x > 0, a, b)")
            shape = broadcast_shapes(c.type.shape, a.type.shape)
            shape = broadcast_shapes(shape, b.type.shape) if shape is not None else None
            if shape is None:
                raise PsmError("shape mismatch in where(): condition and values do not broadcast",
                               e.loc, "shapes broadcast as in torch")
            dtype, weak = promote(a.type, b.type)
            return ir.Call("where", (c, a, b), Type(dtype, shape, weak), e.loc)
        if name == "outer":
            self._arity(e, args, 2)
            a, b = args
            if a.type.rank != 1 or b.type.rank != 1:
                raise PsmError(f"outer() needs two vectors, got {_shape_text(a.type.shape)} and "
                               f"{_shape_text(b.type.shape)}", e.loc, "outer(u, v) has shape [len(u), len(v)]")
            dtype, _ = promote(a.type, b.type)
            return ir.Call("outer", (a, b), Type(dtype, a.type.shape + b.type.shape), e.loc)
        raise PsmError(f"{name}() cannot be called with these arguments", e.loc,
                       "see the language reference in README.md")  # pragma: no cover

    @staticmethod
    def _arity(e: S.Call, args, n: int) -> None:
        if len(args) != n:
            raise PsmError(f"{e.func}() takes {n} argument{'s' if n != 1 else ''}, got {len(args)}",
                           e.loc, f"call it as {e.func}({', '.join('xyz'[:n]) if n <= 3 else '...'})")

    def _reduce(self, name: str, args, kwargs, e: S.Call, scope) -> ir.Expr:
        if len(args) == 2:
            axis_expr, axis_loc = e.args[1], e.args[1].loc
        elif "axis" in kwargs:
            axis_expr, axis_loc = kwargs["axis"]
        else:
            axis_expr = None
        if len(args) > 2 or (len(args) == 2 and "axis" in kwargs) or not args:
            raise PsmError(f"{name}() takes a value and an optional axis", e.loc,
                           f"write {name}(e) or {name}(e, axis=0)")
        a = args[0]
        _require_numeric(a, name, e.loc)
        if axis_expr is None:
            axis = None
            shape: tuple[int, ...] = ()
        else:
            axis = self._static_int(axis_expr, scope)
            if not -a.type.rank <= axis < a.type.rank or a.type.rank == 0:
                raise PsmError(f"axis {axis} is out of range for a value of shape "
                               f"{_shape_text(a.type.shape)}", axis_loc,
                               f"use an axis from {-a.type.rank} to {a.type.rank - 1}")
            axis %= a.type.rank
            shape = a.type.shape[:axis] + a.type.shape[axis + 1:]
        dtype = a.type.dtype
        if name == "sum" and not ir.is_float(dtype):
            dtype = "i64"
        return ir.Reduce(name, a, axis, Type(dtype, shape), e.loc)

    def _extern_call(self, e: S.Call, scope) -> ir.Expr:
        ext = self.externs[e.func]
        if e.kwargs:
            raise PsmError(f"extern {ext.name}() takes no keyword arguments", e.kwargs[0][2],
                           "pass arguments by position")
        args = [self.expr(a, scope) for a in e.args]
        if len(args) != len(ext.args):
            raise PsmError(f"extern {ext.name}() takes {len(ext.args)} argument(s), got {len(args)}",
                           e.loc, f"its declaration: line {ext.loc.line}")
        for i, (a, want) in enumerate(zip(args, ext.args), 1):
            if a.type.shape != want.shape:
                raise PsmError(f"argument {i} of extern {ext.name}() must have shape "
                               f"{_shape_text(want.shape)}, got {_shape_text(a.type.shape)}",
                               getattr(e.args[i - 1], "loc", e.loc),
                               f"its declaration at line {ext.loc.line} fixes the shapes")
            if not a.type.weak and a.type.dtype != want.dtype:
                raise PsmError(f"argument {i} of extern {ext.name}() must be {want.dtype}, "
                               f"got {a.type.dtype}", getattr(e.args[i - 1], "loc", e.loc),
                               f"convert it: {want.dtype}(...)")
        return ir.ExternCall(ext.name, tuple(args), ext.result, e.loc)


def _fold(e: ir.Expr) -> ir.Expr:
    """Replace an operation on constants by its value (torch's rules: 1 / 0 is inf).

    Dims arithmetic then works wherever a constant is needed (`x[K - 1]`), and generated code
    never applies a torch function to a bare Python number.
    """
    if isinstance(e, (ir.Const, ir.FieldRef, ir.LocalRef, ir.ExternCall)) or e.type.shape:
        return e
    kids = ir.children(e)
    if not kids or not all(isinstance(k, ir.Const) for k in kids):
        return e
    import torch

    from .semantics import Evaluator

    class _OnTensors(Evaluator):
        def _const(self, c: ir.Const):
            dtype = {"bool": torch.bool}.get(c.type.dtype, torch.float64 if ir.is_float(c.type.dtype)
                                             else torch.int64)
            return torch.tensor(c.value, dtype=dtype)

    try:
        value = _OnTensors(None, torch.float64, "cpu").eval(e)
    except RuntimeError as err:
        raise PsmError(f"this constant expression cannot be evaluated: {str(err).splitlines()[0]}",
                       e.loc, "rewrite it, e.g. with float literals") from None
    value = value.item() if isinstance(value, torch.Tensor) else value
    if ir.is_float(e.type.dtype):
        value = float(value)
    elif e.type.dtype == "bool":
        value = bool(value)
    else:
        value = int(value)
    return ir.Const(value, e.type, e.loc)


def _is_none(it) -> bool:
    return isinstance(it, S.Name) and it.name == "None"


def _strong_dtype(t: Type) -> str:
    return t.dtype


def _require_numeric(x: ir.Expr, op: str, loc: Loc) -> None:
    if x.type.dtype == "bool":
        raise PsmError(f"'{op}' needs numbers, got a bool", loc,
                       "convert it first, e.g. f32(cond), or use where(cond, a, b)")


def _check_identifier(name: str, what: str, loc: Loc) -> None:
    """Names become Python identifiers in generated code and keyword arguments of calls."""
    if keyword.iskeyword(name) or name in ("None", "True", "False"):
        raise PsmError(f"'{name}' cannot name {what}: it is a Python keyword", loc,
                       f"rename it, e.g. '{name}_'")
    if name.startswith("__"):
        raise PsmError(f"'{name}' cannot name {what}: names starting with '__' are reserved", loc,
                       f"rename it, e.g. '{name.lstrip('_') or 'x'}'")


def check(decls: list[S.OpDecl], overrides: dict[str, int] | None = None) -> list[ir.Op]:
    """Type-check every op of a file; `overrides` sets static dims (`--set K=128`)."""
    overrides = dict(overrides or {})
    declared = {d.name for op in decls for d in op.dims}
    unknown = [k for k in overrides if k not in declared]
    if unknown:
        loc = decls[0].loc if decls else None
        raise PsmError(f"no op in {loc.source.path if loc else 'the file'} declares a dim "
                       f"'{unknown[0]}'", None,
                       f"declared dims: {', '.join(sorted(declared)) or 'none'}")
    ops: list[ir.Op] = []
    seen: dict[str, Loc] = {}
    for d in decls:
        if d.name in seen:
            raise PsmError(f"op '{d.name}' is declared twice (first at line {seen[d.name].line})",
                           d.loc, "give each op its own name")
        seen[d.name] = d.loc
        ops.append(_OpChecker(d, overrides).check())
    return ops
