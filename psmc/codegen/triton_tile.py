"""IR expressions → Triton expressions on whole tiles (for strategy `recurrent`).

Where `scan` scalarizes, `recurrent` keeps a field's shape: a value of IR shape (K, V) is a Triton
tensor of shape [pad(K), pad(V)] (pad: the next power of two; a lane axis is the program's
BLOCK_L lanes instead). Triton broadcasts like torch (right-aligned), so elementwise code prints
as is; `@`, `outer`, `sum/max/min` and integer indexing become broadcasts and `tl.reduce`.
Padded positions hold garbage that never reaches a result: every reduction over a padded axis
masks it with the reduction's neutral element first, and stores are masked.

Only Triton builtins appear (see triton_expr.py): reductions use the prelude's `_psmc_add`,
`_psmc_max` and `_psmc_min`.
"""

from __future__ import annotations

import math

from .. import ir
from ..errors import PsmError

_FUNC = {
    "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt({0})", "rsqrt": "tl.rsqrt({0})",
    "sin": "tl.sin({0})", "cos": "tl.cos({0})", "abs": "tl.abs({0})",
    "log1p": "tl.log(1.0 + {0})", "expm1": "(tl.exp({0}) - 1.0)",
    "sigmoid": "(1.0 / (1.0 + tl.exp(-({0}))))",
    "tanh": "(2.0 / (1.0 + tl.exp(-2.0 * ({0}))) - 1.0)",
    "softplus": "tl.where(({0}) > 20.0, ({0}), tl.log(1.0 + tl.exp({0})))",
    "silu": "(({0}) / (1.0 + tl.exp(-({0}))))",
    "logsigmoid": "(-tl.where(-({0}) > 20.0, -({0}), tl.log(1.0 + tl.exp(-({0})))))",
    "relu": "tl.maximum({0}, 0)",
}
_BIN = {"+": "+", "-": "-", "*": "*", "/": "/", "==": "==", "!=": "!=", "<": "<", "<=": "<=",
        ">": ">", ">=": ">=", "and": "&", "or": "|"}
_REDUCE = {"sum": ("_psmc_add", "0.0"), "max": ("_psmc_max", 'float("-inf")'),
           "min": ("_psmc_min", 'float("inf")')}
_TL_DTYPE = {"bool": "tl.int1", "i32": "tl.int32", "i64": "tl.int64", "f64": "tl.float64"}


def pad(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def literal(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float) and math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    return repr(v)


def axis_mask(n: int, axis: int, rank: int) -> str | None:
    """`ok_5[:, None]`: the valid positions of an axis of size n (None when n is a power of 2)."""
    if pad(n) == n:
        return None
    key = ", ".join(":" if a == axis else "None" for a in range(rank))
    return f"ok_{n}" + (f"[{key}]" if rank > 1 else "")


class TilePrinter:
    """Prints IR expressions of one function; `env` maps (role, field) to a tile variable."""

    def __init__(self, env: dict[tuple[str, str], str], local_prefix: str):
        self.env = env
        self.local_prefix = local_prefix
        self.sizes: set[int] = set()  # axis sizes whose arange / mask the kernel must define

    def __call__(self, e: ir.Expr) -> str:
        return getattr(self, "_" + type(e).__name__.lower())(e)

    def _const(self, e: ir.Const) -> str:
        return literal(e.value)

    def _fieldref(self, e: ir.FieldRef) -> str:
        return self.env[(e.role, e.name)]

    def _localref(self, e: ir.LocalRef) -> str:
        return f"{self.local_prefix}{e.name}"

    def _unary(self, e: ir.Unary) -> str:
        a = self(e.arg)
        return f"(-{a})" if e.op == "neg" else f"(~{a})"

    def _binary(self, e: ir.Binary) -> str:
        if e.op == "@":
            return self._matmul(e)
        a, b = self(e.lhs), self(e.rhs)
        if e.op == "**":
            if isinstance(e.rhs, ir.Const) and e.rhs.value == 2:
                return f"({a} * {a})"
            return f"tl.exp({b} * tl.log({a}))"
        return f"({a} {_BIN[e.op]} {b})"

    def _reduce_text(self, value: str, axis: int, rank: int, n: int, op: str = "sum") -> str:
        fn, neutral = _REDUCE[op]
        mask = axis_mask(n, axis, rank)
        if mask:
            self.sizes.add(n)
            value = f"tl.where({mask}, {value}, {neutral})"
        return f"tl.reduce({value}, {axis}, {fn})"

    def _matmul(self, e: ir.Binary) -> str:
        a, b = self(e.lhs), self(e.rhs)
        ra, rb = e.lhs.type.rank, e.rhs.type.rank
        k = e.lhs.type.shape[-1]
        if ra == 1 and rb == 1:
            return self._reduce_text(f"({a} * {b})", 0, 1, k)
        if ra == 1 and rb == 2:
            return self._reduce_text(f"({a}[:, None] * {b})", 0, 2, k)
        if ra == 2 and rb == 1:
            return self._reduce_text(f"({a} * {b}[None, :])", 1, 2, k)
        if ra == 2 and rb == 2:
            return self._reduce_text(f"({a}[:, :, None] * {b}[None, :, :])", 1, 3, k)
        raise PsmError("strategy recurrent handles '@' of vectors and matrices only", e.loc)

    def _call(self, e: ir.Call) -> str:
        args = [self(a) for a in e.args]
        f = e.func
        if f in ir.DTYPES:
            src = e.args[0].type.dtype
            if ir.is_float(f) and ir.is_float(src):
                return args[0]
            return f"({args[0]}).to({_TL_DTYPE.get(f, 'ACC')})"
        if f == "where":
            return f"tl.where({args[0]}, {args[1]}, {args[2]})"
        if f == "outer":
            return f"({args[0]}[:, None] * {args[1]}[None, :])"
        if f == "max":
            return f"tl.maximum({args[0]}, {args[1]})"
        if f == "min":
            return f"tl.minimum({args[0]}, {args[1]})"
        if f == "logaddexp":
            a, b = args
            m = f"tl.maximum({a}, {b})"
            return (f'tl.where({m} == float("-inf"), {m}, '
                    f"{m} + tl.log(tl.exp({a} - {m}) + tl.exp({b} - {m})))")
        if f in _FUNC:
            return _FUNC[f].format(args[0])
        raise PsmError(f"{f}() has no tile form for strategy recurrent", e.loc)

    def _reduce(self, e: ir.Reduce) -> str:
        x = self(e.arg)
        shape = e.arg.type.shape
        if not shape:
            return x
        axes = range(len(shape)) if e.axis is None else [e.axis]
        rank = len(shape)
        for ax in sorted(axes, reverse=True):
            x = self._reduce_text(x, ax, rank, shape[ax], e.op)
            rank -= 1
        return x

    def _index(self, e: ir.Index) -> str:
        x = self(e.base)
        shape = e.base.type.shape
        if any(it.kind == "int" for it in e.items):
            if any(it.kind == "newaxis" for it in e.items):
                raise PsmError("strategy recurrent cannot mix integer indices and None", e.loc)
            rank = len(shape)
            picks = [(a, it.start) for a, it in enumerate(e.items) if it.kind == "int"]
            for ax, i in reversed(picks):  # pick position i of the axis: a masked sum over it
                self.sizes.add(shape[ax])
                x = (f"tl.reduce(tl.where({axis_range(shape[ax], ax, rank)} == {i}, {x}, 0), {ax}, "
                     f"_psmc_add)")
                rank -= 1
            for a, it in enumerate(e.items):
                if it.kind == "slice" and ((it.start or 0) != 0 or it.stop not in (None, shape[a])):
                    raise PsmError("strategy recurrent handles whole-axis slices only", e.loc)
            return x
        keys, axis = [], 0
        for it in e.items:
            if it.kind == "newaxis":
                keys.append("None")
                continue
            if (it.start or 0) != 0 or it.stop not in (None, shape[axis]):
                raise PsmError("strategy recurrent handles whole-axis slices only", e.loc)
            keys.append(":")
            axis += 1
        return f"{x}[{', '.join(keys)}]" if "None" in keys else x

    def _externcall(self, e: ir.ExternCall) -> str:
        raise PsmError(f"extern '{e.name}' cannot be compiled to Triton", e.loc)


def axis_range(n: int, axis: int, rank: int) -> str:
    key = ", ".join(":" if a == axis else "None" for a in range(rank))
    return f"ar_{n}" + (f"[{key}]" if rank > 1 else "")
