"""Sympy scalar expressions → Triton expressions, with common subexpressions named once.

Everything a scalar program can contain prints to Triton *builtins* that exist in Triton 3.x and
in its interpreter: `where` for Piecewise, `maximum`/`minimum` for Max/Min, `exp`/`log`/`sin`/
`cos`/`sqrt`/`rsqrt`. Triton's library functions written with `@triton.jit` (tl.sum, tl.sigmoid,
…) are avoided: they are decorated once, when triton is imported, so a process that runs compiled
kernels on CUDA tensors and interpreted ones on CPU tensors cannot call them from both. Sigmoid,
tanh, softplus, logaddexp, log1p and expm1 print as short formulas.

`fast=True` prints exp and log as the generated module's own `_psmc_exp` / `_psmc_log` (defined
in templates/triton_prelude.j2): for f32 on a GPU, one MUFU instruction each (ex2.approx.ftz and
lg2.approx.ftz) instead of tl.exp's four and tl.log's ~25; for f64, and under the interpreter,
tl.exp and tl.log. The forward scan kernels use it, where exp and log are most of the work of a
combine (logcumsumexp, online softmax).
"""

from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p
from sympy.printing.precedence import PRECEDENCE, precedence
from sympy.printing.str import StrPrinter

from .scalarize import logaddexp, sigmoid, softplus, trunc


class TritonPrinter(StrPrinter):
    """Prints one scalar expression as Triton code (operands are tensors of one shape)."""

    def __init__(self, settings=None, fast: bool = False):
        super().__init__(settings)
        self.exp, self.log = ("_psmc_exp", "_psmc_log") if fast else ("tl.exp", "tl.log")

    def _print_Symbol(self, e):
        return e.name

    def _print_Integer(self, e):
        return str(int(e))

    def _print_Float(self, e):
        return repr(float(e))

    def _print_Rational(self, e):
        return repr(float(e))

    def _print_Half(self, e):
        return "0.5"

    def _print_Infinity(self, e):
        return 'float("inf")'

    def _print_NegativeInfinity(self, e):
        return 'float("-inf")'

    def _print_NaN(self, e):
        return 'float("nan")'

    def _print_Exp1(self, e):
        return "2.718281828459045"

    def _print_Pi(self, e):
        return "3.141592653589793"

    def _print_BooleanTrue(self, e):
        return "True"

    def _print_BooleanFalse(self, e):
        return "False"

    def _print_Pow(self, e, rational=False):
        b, x = e.args
        base = self.parenthesize(b, PRECEDENCE["Mul"] + 1)
        if x == -1:
            return f"1.0 / {base}"
        if x == sp.Rational(1, 2):
            return f"tl.sqrt({self._print(b)})"
        if x == -sp.Rational(1, 2):
            return f"tl.rsqrt({self._print(b)})"
        if x.is_Integer and 2 <= int(x) <= 4:  # parenthesized: `a / b**2` prints as `a / (b * b)`
            return "(" + " * ".join([base] * int(x)) + ")"
        if x.is_Integer and -4 <= int(x) <= -2:
            return "1.0 / (" + " * ".join([base] * -int(x)) + ")"
        return f"{self.exp}({self._print(x)} * {self.log}({self._print(b)}))"

    def _fn(self, name, e):
        return f"{name}({', '.join(self._print(a) for a in e.args)})"

    def _print_exp(self, e):
        return self._fn(self.exp, e)

    def _print_log(self, e):
        return self._fn(self.log, e)

    def _print_sin(self, e):
        return self._fn("tl.sin", e)

    def _print_cos(self, e):
        return self._fn("tl.cos", e)

    def _print_Abs(self, e):
        return self._fn("tl.abs", e)

    def _print_sigmoid(self, e):  # tl.sigmoid is a jit function of triton's library: see module doc
        return f"(1.0 / (1.0 + {self.exp}(-({self._print(e.args[0])}))))"

    def _print_tanh(self, e):
        x = self._print(e.args[0])
        return f"(2.0 / (1.0 + {self.exp}(-2.0 * ({x}))) - 1.0)"

    def _print_softplus(self, e):
        x = self._print(e.args[0])
        return f"tl.where(({x}) > 20.0, ({x}), {self.log}(1.0 + {self.exp}({x})))"

    def _print_logaddexp(self, e):
        a, b = (self._print(x) for x in e.args)
        m = f"tl.maximum({a}, {b})"
        return (f"tl.where({m} == float(\"-inf\"), {m}, "
                f"{m} + {self.log}({self.exp}(({a}) - {m}) + {self.exp}(({b}) - {m})))")

    def _print_log1p(self, e):
        return f"{self.log}(1.0 + {self.parenthesize(e.args[0], PRECEDENCE['Add'])})"

    def _print_expm1(self, e):
        return f"({self.exp}({self._print(e.args[0])}) - 1.0)"

    def _print_trunc(self, e):
        return f"({self._print(e.args[0])}).to(tl.int64)"

    def _print_Heaviside(self, e):
        x = self._print(e.args[0])
        return f"tl.where(({x}) > 0, 1.0, tl.where(({x}) == 0, 0.5, 0.0))"

    def _print_sign(self, e):
        x = self._print(e.args[0])
        return f"tl.where(({x}) > 0, 1.0, tl.where(({x}) < 0, -1.0, 0.0))"

    def _print_DiracDelta(self, e):
        return "0.0"  # almost everywhere

    def _minmax(self, fn, args):
        args = list(args)
        out = self._print(args[-1])
        for a in reversed(args[:-1]):
            out = f"{fn}({self._print(a)}, {out})"
        return out

    def _print_Max(self, e):
        return self._minmax("tl.maximum", e.args)

    def _print_Min(self, e):
        return self._minmax("tl.minimum", e.args)

    def _print_Piecewise(self, e):
        *pieces, (val, cond) = e.args
        out = self._print(val)
        if cond != sp.true:  # not total: undefined where no condition holds
            out = f'tl.where({self._print(cond)}, {out}, float("nan"))'
        for v, c in reversed(pieces):
            out = f"tl.where({self._print(c)}, {self._print(v)}, {out})"
        return out

    def _print_Relational(self, e):
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[e.rel_op]
        return f"({self._print(e.lhs)} {op} {self._print(e.rhs)})"

    def _print_And(self, e):
        return "(" + " & ".join(self._print(a) for a in e.args) + ")"

    def _print_Or(self, e):
        return "(" + " | ".join(self._print(a) for a in e.args) + ")"

    def _print_Not(self, e):
        return f"(~{self._print(e.args[0])})"


_PRINTERS = {fast: TritonPrinter({"order": "none"}, fast=fast) for fast in (False, True)}


def texpr(e: sp.Expr, fast: bool = False) -> str:
    """One expression as Triton code (`fast`: exp and log as the module's _psmc_exp/_psmc_log)."""
    return _PRINTERS[fast].doprint(e)


def statements(targets: list[tuple[str, sp.Expr]], tmp: str, fast: bool = False) -> list[str]:
    """`name = expr` lines for every target, shared subexpressions first as `{tmp}0, {tmp}1, …`."""
    names = [n for n, _ in targets]
    exprs = [sp.sympify(e) for _, e in targets]
    reps, reduced = sp.cse(exprs, symbols=sp.numbered_symbols(tmp), order="none")
    lines = [f"{s} = {texpr(v, fast)}" for s, v in reps]
    lines += [f"{n} = {texpr(v, fast)}" for n, v in zip(names, reduced)]
    return lines


__all__ = ["texpr", "statements", "TritonPrinter", "sigmoid", "softplus", "logaddexp", "trunc",
           "log1p", "expm1", "precedence"]
