"""The meaning of an op's expressions, in plain torch: the IR interpreter.

With the sequential scans of `standalone.py` (the left fold, the binary counter) this is the oracle
every generated path is compared with (DESIGN.md section 1), so it favours obviously-correct code
over speed. Values are tensors shaped
`(*batch, *field_shape)`; an expression of field rank r is aligned with others by inserting axes
between the batch and field axes, which is what makes the language's torch broadcasting of field
shapes work on batched tensors.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from . import ir
from .standalone import _align, _matmul

State = dict[str, torch.Tensor]

TORCH_DTYPES = {
    "bool": torch.bool, "i32": torch.int32, "i64": torch.int64, "f16": torch.float16,
    "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64,
}


def compute_dtype(declared: str, float_dtype: torch.dtype) -> torch.dtype:
    """State math is f32 unless declared f64; a float64 run (the oracle) lifts it all to f64."""
    if ir.is_float(declared):
        return torch.float64 if (declared == "f64" or float_dtype == torch.float64) else torch.float32
    return TORCH_DTYPES[declared]


class Evaluator:
    """Evaluates IR functions on batched torch tensors."""

    def __init__(self, op: ir.Op, float_dtype: torch.dtype, device: torch.device | str,
                 externs: Mapping[str, Callable] | None = None):
        self.op = op
        self.float_dtype = float_dtype
        self.device = torch.device(device)
        self.externs = dict(externs or {})

    # -- functions --
    def run(self, fn: ir.Function, env: Mapping[str, Mapping[str, torch.Tensor]],
            batch_shape: tuple[int, ...]) -> State:
        """Run a lift/combine/output body; `env` maps roles ("x", "l", "r", "s") to fields."""
        self._env = env
        self._locals: dict[str, object] = {}
        out: State = {}
        for st in fn.body:
            v = self.eval(st.value)
            if isinstance(st, ir.Let):
                self._locals[st.name] = v
                continue
            dtype = compute_dtype(st.type.dtype, self.float_dtype)
            t = torch.as_tensor(v, device=self.device).to(dtype) if not isinstance(v, torch.Tensor) else v.to(dtype)
            t = _align(t, st.value.type.rank, st.type.rank)
            out[st.name] = torch.broadcast_to(t, tuple(batch_shape) + st.type.shape)
        return out

    def identity(self, batch_shape: tuple[int, ...]) -> State:
        """The declared identity element, broadcast over the batch."""
        out: State = {}
        for f in self.op.state:
            dtype = compute_dtype(f.type.dtype, self.float_dtype)
            if f.init == "eye":
                base = torch.eye(f.type.shape[0], dtype=dtype, device=self.device)
            else:
                base = torch.tensor(f.init, dtype=dtype, device=self.device)
            out[f.name] = torch.broadcast_to(base, tuple(batch_shape) + f.type.shape)
        return out

    # -- expressions --
    def eval(self, e: ir.Expr):
        return getattr(self, "_" + type(e).__name__.lower())(e)

    def _const(self, e: ir.Const):
        return e.value

    def _fieldref(self, e: ir.FieldRef):
        return self._env[e.role][e.name]

    def _localref(self, e: ir.LocalRef):
        return self._locals[e.name]

    def _unary(self, e: ir.Unary):
        a = self.eval(e.arg)
        if e.op == "neg":
            return -a
        return torch.logical_not(a) if isinstance(a, torch.Tensor) else not a

    def _binary(self, e: ir.Binary):
        a, b = self.eval(e.lhs), self.eval(e.rhs)
        if e.op == "@":
            return _matmul(a, b, e.lhs.type.rank, e.rhs.type.rank)
        r = e.type.rank
        a, b = _align(a, e.lhs.type.rank, r), _align(b, e.rhs.type.rank, r)
        op = e.op
        if op == "/":
            return self._floatify(a) / b
        if op in ("and", "or"):
            a, b = self._tensor(a, torch.bool), self._tensor(b, torch.bool)
            return torch.logical_and(a, b) if op == "and" else torch.logical_or(a, b)
        return _PY_BINARY[op](a, b)  # Python operators: torch's scalar/tensor promotion rules

    def _call(self, e: ir.Call):
        name = e.func
        args = [self.eval(a) for a in e.args]
        r = e.type.rank
        if name in ir.DTYPES:
            dtype = compute_dtype(name, self.float_dtype)
            return self._tensor(args[0], dtype).to(dtype)
        if name == "where":
            c, a, b = (_align(x, y.type.rank, r) for x, y in zip(args, e.args))
            dtype = compute_dtype(e.type.dtype, self.float_dtype)
            return torch.where(self._tensor(c, torch.bool), self._tensor(a, dtype), self._tensor(b, dtype))
        if name == "outer":
            a, b = args
            return a.unsqueeze(-1) * b.unsqueeze(-2)
        if name in ("max", "min", "logaddexp"):
            dtype = compute_dtype(e.type.dtype, self.float_dtype)
            a, b = (self._tensor(_align(x, y.type.rank, r), dtype) for x, y in zip(args, e.args))
            return {"max": torch.maximum, "min": torch.minimum, "logaddexp": torch.logaddexp}[name](a, b)
        x = args[0]
        if name in ("abs", "relu"):
            x = self._tensor(x, compute_dtype(e.type.dtype, self.float_dtype))
            return x.abs() if name == "abs" else x.clamp_min(0)
        x = self._tensor(x, compute_dtype(e.type.dtype, self.float_dtype))
        return _FLOAT_FUNCS[name](x)

    def _reduce(self, e: ir.Reduce):
        x = self._tensor(self.eval(e.arg), compute_dtype(e.arg.type.dtype, self.float_dtype))
        rank = e.arg.type.rank
        dims = tuple(range(-rank, 0)) if e.axis is None else (e.axis - rank,)
        if e.op == "sum":
            return x.sum(dim=dims) if dims else x
        f = torch.amax if e.op == "max" else torch.amin
        return f(x, dim=dims) if dims else x

    def _index(self, e: ir.Index):
        x = self.eval(e.base)
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x, device=self.device)
        key: list[object] = [Ellipsis]
        for it in e.items:
            key.append(it.start if it.kind == "int" else None if it.kind == "newaxis"
                       else slice(it.start, it.stop))
        return x[tuple(key)]

    def _externcall(self, e: ir.ExternCall):
        fn = self.externs.get(e.name)
        if fn is None:
            raise RuntimeError(f"extern '{e.name}' is not bound; call op.bind({e.name}=module) first")
        args = [self._tensor(self.eval(a), compute_dtype(a.type.dtype, self.float_dtype)) for a in e.args]
        batch = torch.broadcast_shapes(*(a.shape[: a.dim() - t.type.rank] for a, t in zip(args, e.args)))
        flat = [torch.broadcast_to(a, batch + a.shape[a.dim() - t.type.rank:]).reshape((-1,) + t.type.shape)
                for a, t in zip(args, e.args)]
        out = fn(*flat)
        want = (flat[0].shape[0],) + e.type.shape
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RuntimeError(f"extern '{e.name}' returned {got}, expected a tensor of shape {want} "
                               f"(N flattened batch rows, then the declared shape)")
        return out.reshape(batch + e.type.shape)

    # -- helpers --
    def _tensor(self, x, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x if x.dtype == dtype else x.to(dtype)
        return torch.tensor(x, dtype=dtype, device=self.device)

    def _floatify(self, x):
        if isinstance(x, torch.Tensor) and not x.is_floating_point():
            return x.to(self.float_dtype)
        return float(x) if isinstance(x, (int, bool)) else x


_PY_BINARY = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "**": lambda a, b: a ** b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}
_FLOAT_FUNCS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp": torch.exp, "log": torch.log, "log1p": torch.log1p, "expm1": torch.expm1,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "softplus": F.softplus, "sin": torch.sin, "cos": torch.cos, "silu": F.silu,
    "logsigmoid": F.logsigmoid,
}
