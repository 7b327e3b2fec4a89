"""IR → plain torch source for `lift`, `combine`, `output` and `identity`.

The generated functions take dicts of batched tensors, like the interpreter in `semantics.py`, but
as straight-line Python that a person can read and that torch runs without interpretive overhead.
Each statement carries a comment with the `.psm` line it came from. Helpers (`_align`, `_as`,
`_store`, ...) come from `psmc/standalone.py`, which the generated module embeds.
"""

from __future__ import annotations

import keyword
import math
from pathlib import Path

from .. import ir

_FLOAT_FUNCS = {
    "exp": "torch.exp", "log": "torch.log", "log1p": "torch.log1p", "expm1": "torch.expm1",
    "sqrt": "torch.sqrt", "rsqrt": "torch.rsqrt", "tanh": "torch.tanh", "sigmoid": "torch.sigmoid",
    "softplus": "torch.nn.functional.softplus", "sin": "torch.sin", "cos": "torch.cos",
    "silu": "torch.nn.functional.silu", "logsigmoid": "torch.nn.functional.logsigmoid",
}
_TORCH_DTYPES = {"bool": "torch.bool", "i32": "torch.int32", "i64": "torch.int64"}
_RESERVED = {"torch", "math", "x", "l", "r", "s", "batch", "fdt", "device", "externs", "out"}


def dtype_expr(dtype: str) -> str:
    """The compute dtype of a psm dtype, as source: floats follow `fdt` (f32, or f64 for oracles)."""
    if dtype == "f64":
        return "torch.float64"
    if ir.is_float(dtype):
        return "fdt"
    return _TORCH_DTYPES[dtype]


def local_name(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) or name in _RESERVED or name.startswith("_") else name


def where(loc) -> str:
    return f"{Path(loc.source.path).name}:{loc.line}"


class _Printer:
    """One expression → one Python expression string."""

    def __init__(self, roles: dict[str, str]):
        self.roles = roles  # role -> the Python parameter name

    def expr(self, e: ir.Expr) -> str:
        return getattr(self, "_" + type(e).__name__.lower())(e)

    def cast(self, e: ir.Expr, dtype: str, text: str | None = None) -> str:
        """e in the compute dtype of `dtype`, converting only where the types say it is needed."""
        text = self.expr(e) if text is None else text
        if not isinstance(e, ir.Const) and dtype_expr(e.type.dtype) == dtype_expr(dtype):
            return text
        return f"_as({text}, {dtype_expr(dtype)}, device)"

    def aligned(self, e: ir.Expr, target: int) -> str:
        text = self.expr(e)
        if isinstance(e, ir.Const) or e.type.rank >= target:
            return text
        return f"_align({text}, {e.type.rank}, {target})"

    def _const(self, e: ir.Const) -> str:
        v = e.value
        if isinstance(v, bool):
            return repr(v)
        if isinstance(v, float) and math.isinf(v):
            return "math.inf" if v > 0 else "-math.inf"
        return repr(v)

    def _fieldref(self, e: ir.FieldRef) -> str:
        return f'{self.roles[e.role]}["{e.name}"]'

    def _localref(self, e: ir.LocalRef) -> str:
        return local_name(e.name)

    def _unary(self, e: ir.Unary) -> str:
        if e.op == "neg":
            return f"(-{self.expr(e.arg)})"
        return f"torch.logical_not({self.cast(e.arg, 'bool')})"

    def _binary(self, e: ir.Binary) -> str:
        if e.op == "@":
            return f"_matmul({self.expr(e.lhs)}, {self.expr(e.rhs)}, {e.lhs.type.rank}, {e.rhs.type.rank})"
        r = e.type.rank
        a, b = self.aligned(e.lhs, r), self.aligned(e.rhs, r)
        if e.op == "/":
            if ir.is_float(e.lhs.type.dtype) and not isinstance(e.lhs, ir.Const):
                return f"({a} / {b})"
            return f"(_floatify({a}, fdt) / {b})"
        if e.op in ("and", "or"):
            fn = "logical_and" if e.op == "and" else "logical_or"
            return f"torch.{fn}({self.cast(e.lhs, 'bool', a)}, {self.cast(e.rhs, 'bool', b)})"
        return f"({a} {e.op} {b})"

    def _call(self, e: ir.Call) -> str:
        name, r = e.func, e.type.rank
        dt = dtype_expr(e.type.dtype)
        if name in ir.DTYPES:
            return f"_as({self.expr(e.args[0])}, {dtype_expr(name)}, device)"
        if name == "where":
            c, a, b = (self.aligned(x, r) for x in e.args)
            c = self.cast(e.args[0], "bool", c)
            both_const = all(isinstance(x, ir.Const) for x in e.args[1:])
            a = self.cast(e.args[1], e.type.dtype, a) if both_const or not isinstance(e.args[1], ir.Const) else a
            b = self.cast(e.args[2], e.type.dtype, b) if both_const or not isinstance(e.args[2], ir.Const) else b
            return f"torch.where({c}, {a}, {b})"
        if name == "outer":
            a, b = (self.expr(x) for x in e.args)
            return f"({a}.unsqueeze(-1) * {b}.unsqueeze(-2))"
        if name in ("max", "min", "logaddexp"):
            fn = {"max": "torch.maximum", "min": "torch.minimum", "logaddexp": "torch.logaddexp"}[name]
            a, b = (self.cast(x, e.type.dtype, self.aligned(x, r)) for x in e.args)
            return f"{fn}({a}, {b})"
        a = self.cast(e.args[0], e.type.dtype)
        if name == "abs":
            return f"{a}.abs()"
        if name == "relu":
            return f"{a}.clamp_min(0)"
        return f"{_FLOAT_FUNCS[name]}({a})"

    def _reduce(self, e: ir.Reduce) -> str:
        rank = e.arg.type.rank
        a = self.cast(e.arg, e.arg.type.dtype)
        dims = tuple(range(-rank, 0)) if e.axis is None else (e.axis - rank,)
        if not dims:
            return a
        fn = {"sum": "torch.sum", "max": "torch.amax", "min": "torch.amin"}[e.op]
        return f"{fn}({a}, dim={dims!r})"

    def _index(self, e: ir.Index) -> str:
        parts = ["..."]
        for it in e.items:
            if it.kind == "int":
                parts.append(str(it.start))
            elif it.kind == "newaxis":
                parts.append("None")
            else:
                parts.append(f"{it.start}:{it.stop}")
        return f"{self.cast(e.base, e.base.type.dtype)}[{', '.join(parts)}]"

    def _externcall(self, e: ir.ExternCall) -> str:
        args = ", ".join(self.cast(a, a.type.dtype) for a in e.args)
        ranks = tuple(a.type.rank for a in e.args)
        return (f'_extern(externs.get("{e.name}"), ({args},), {ranks!r}, {e.type.shape!r}, "{e.name}")')


_SIGNATURES = {
    "lift": ("x",), "combine": ("l", "r"), "output": ("s", "x"),
}
_DOCS = {
    "lift": "One token (or chunk) → one state element.",
    "combine": "Two adjacent states → their aggregate (left, right).",
    "output": "The prefix state and the current token (or chunk) → the outputs.",
}


def function_source(op: ir.Op, fn: ir.Function) -> str:
    """`def lift(x, batch, fdt, device, externs)` and friends, as Python source."""
    roles = _SIGNATURES[fn.kind]
    printer = _Printer({role: role for role in roles})
    params = ", ".join(roles)
    user = f"{fn.kind}({', '.join(fn.params)})"
    lines = [f"def {fn.kind}({params}, batch, fdt=torch.float32, device=None, externs={{}}):",
             f'    """{_DOCS[fn.kind]} `{user}` at {where(fn.loc)}."""']
    out: list[str] = []
    for st in fn.body:
        value = printer.expr(st.value)
        if isinstance(st, ir.Let):
            lines.append(f"    {local_name(st.name)} = {value}  # {where(st.loc)}")
            continue
        target = f"out_{st.name}"
        lines.append(f"    {target} = _store({value}, {st.value.type.rank}, {st.type.shape!r}, "
                     f"{dtype_expr(st.type.dtype)}, batch, device)  # {where(st.loc)}")
        out.append(f'"{st.name}": {target}')
    lines.append("    return {" + ", ".join(out) + "}")
    return "\n".join(lines)


def identity_source(op: ir.Op) -> str:
    lines = ["def identity(batch, fdt=torch.float32, device=None):",
             f'    """The identity element `e` of combine, from the state declaration."""']
    items = []
    for f in op.state:
        dt = dtype_expr(f.type.dtype)
        if f.init == "eye":
            base = f"torch.eye({f.type.shape[0]}, dtype={dt}, device=device)"
        else:
            base = f"torch.tensor({_literal(f.init)}, dtype={dt}, device=device)"
        items.append(f'        "{f.name}": torch.broadcast_to({base}, tuple(batch) + {f.type.shape!r}),'
                     f"  # {where(f.loc)}")
    return "\n".join(lines + ["    return {"] + items + ["    }"])


def _literal(v) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(_literal(x) for x in v) + "]"
    if isinstance(v, float) and math.isinf(v):
        return "math.inf" if v > 0 else "-math.inf"
    return repr(v)


def generate(op: ir.Op) -> str:
    """All four functions of an op, separated by blank lines."""
    parts = [identity_source(op)] + [function_source(op, f) for f in (op.lift, op.combine, op.output)]
    return "\n\n\n".join(parts) + "\n"
