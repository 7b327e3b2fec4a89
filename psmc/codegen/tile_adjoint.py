"""Vector-Jacobian products of IR functions on whole tiles: the math of strategy recurrent's backward.

adjoint.py differentiates the *scalarized* op with sympy, one expression per scalar; a recurrent
op's state is a tile (gla's S: [K, V]) whose Jacobians are as large as the tile squared, while the
backward only ever needs their products with a cotangent: given the cotangents of what a function
assigns, the cotangents of the fields it reads. `TileVJP` derives those node by node from the IR
(reverse mode) and prints them as Triton tile expressions, the way triton_tile.TilePrinter prints
the forward:

- a broadcast in the forward is a sum in the backward (over the axes it added or stretched);
- `@` and `outer` give a product and a sum; `sum(e, axis)` a broadcast back;
- `where` routes the cotangent to the branch it took; `max`/`min` to the winning argument, half
  to each on a tie (torch.maximum's rule, so the torch reference agrees exactly);
- elementwise functions multiply by their derivative, printed from the forward values.

Sums over the lane axis only see the program's BLOCK_L lanes. For a lane field that is the whole
sum; for a lane-free value (gla's d, q, k) it is this program's share, and every such share is
linear in the cotangents, so the launcher adds the shares of all programs (triton_recurrent.py).
Padded positions of an axis (pad(5) = 8) and lanes past the end are masked before every sum.
"""

from __future__ import annotations

import itertools

from .. import ir
from ..errors import PsmError
from . import scalarize as S
from .triton_tile import TilePrinter, pad

_DERIVATIVE = {  # d f(a) / d a, in terms of a ({a}) and f(a) ({y})
    "exp": "{y}", "expm1": "tl.exp({a})", "log": "(1.0 / {a})", "log1p": "(1.0 / (1.0 + {a}))",
    "sqrt": "(0.5 / {y})", "rsqrt": "(-0.5 * {y} / {a})", "sin": "tl.cos({a})",
    "cos": "(-tl.sin({a}))", "sigmoid": "({y} * (1.0 - {y}))", "tanh": "(1.0 - {y} * {y})",
    "softplus": "tl.where(({a}) > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-({a}))))",
    "silu": "((1.0 / (1.0 + tl.exp(-({a})))) * (1.0 + ({a}) * (1.0 - 1.0 / (1.0 + tl.exp(-({a}))))))",
    "logsigmoid": "(1.0 / (1.0 + tl.exp({a})))",
}


def lane_axes(op: ir.Op, sop: S.ScalarOp) -> dict[int, int | None]:
    """The lane axis of every expression node of lift, combine and output, by id(node).

    The op is checked again with the lane dim at 2 and at 3; the axis whose size moves is the
    lane axis (the same trick as scalarize._lane_axes, node by node)."""
    a = S._recheck(op, {sop.lane.name: 2})
    b = S._recheck(op, {sop.lane.name: 3})
    out: dict[int, int | None] = {}
    for kind in ("lift", "combine", "output"):
        for s0, s2, s3 in zip(*(getattr(o, kind).body for o in (op, a, b))):
            for n0, n2, n3 in zip(ir.walk(s0.value), ir.walk(s2.value), ir.walk(s3.value)):
                moved = [i for i, (x, y) in enumerate(zip(n2.type.shape, n3.type.shape)) if x != y]
                out[id(n0)] = moved[0] if moved else None
    return out


def tile_dims(shape: tuple[int, ...], lane: int | None) -> list[str]:
    return ["BLOCK_L" if a == lane else str(pad(n)) for a, n in enumerate(shape)]


def _wrap(g: str) -> str:
    return g if g.isidentifier() else f"({g})"


def _key(axis: int, rank: int) -> str:
    return "[" + ", ".join(":" if a == axis else "None" for a in range(rank)) + "]" if rank > 1 else ""


class _NamingPrinter(TilePrinter):
    """TilePrinter that names every computed forward value the backward reads (`{prefix}v0 = ...`),
    once per distinct expression: the rules read a value several times (x / y for `/` and its
    derivative), and names keep the generated lines short."""

    def __init__(self, env: dict, local: str, prefix: str, lines: list[str]):
        super().__init__(env, local)
        self.prefix, self.lines = prefix, lines
        self.names: dict[ir.Expr, str] = {}

    def __call__(self, e: ir.Expr) -> str:
        if e in self.names:
            return self.names[e]
        text = super().__call__(e)
        if not isinstance(e, (ir.Binary, ir.Call, ir.Reduce)):
            return text
        name = f"{self.prefix}v{len(self.names)}"
        self.lines.append(f"{name} = {text}")
        self.names[e] = name
        return name


class TileVJP:
    """Reverse mode over one function body.

    env: (role, field) -> tile variable of the forward values; local: the prefix of the forward's
    `let` locals (printed again by the caller before these lines); wrt: the roles whose fields get
    cotangents; prefix: of the temporaries this emits. `lanes`: lane_axes(...)."""

    def __init__(self, fn: ir.Function, env: dict, local: str, wrt: set[str], prefix: str,
                 lanes: dict[int, int | None]):
        self.fn, self.wrt, self.prefix, self.lanes = fn, wrt, prefix, lanes
        self.lines: list[str] = []
        self.pr = _NamingPrinter(env, local, prefix, self.lines)
        self.terms: dict[tuple[str, str], list[str]] = {}  # (role, field) -> cotangent terms
        self._locals: dict[str, list[str]] = {}
        self._kept: dict[str, tuple[int, str]] = {}
        self._n = itertools.count()
        lets = {st.name: st.value for st in fn.body if isinstance(st, ir.Let)}
        self._live_lets: set[str] = set()
        for st in fn.body:  # lets are in order, so one pass settles which ones reach a wrt field
            if isinstance(st, ir.Let) and self._needs(st.value):
                self._live_lets.add(st.name)
        self._lets = lets

    @property
    def sizes(self) -> set[int]:
        return self.pr.sizes

    # ---- which nodes carry a gradient ----
    def _needs(self, e: ir.Expr) -> bool:
        if not ir.is_float(e.type.dtype):
            return False
        for n in ir.walk(e):
            if isinstance(n, ir.FieldRef) and n.role in self.wrt and ir.is_float(n.type.dtype):
                return True
            if isinstance(n, ir.LocalRef) and n.name in self._live_lets:
                return True
        return False

    # ---- driving ----
    def run(self, cotangents: dict[str, str], targets: dict[str, S.FieldInfo]) -> None:
        """Back-propagate the cotangents of the assigned fields (name -> tile of the field's
        shape; absent: zero; `targets`: the fields) through the body."""
        for st in reversed(self.fn.body):
            if isinstance(st, ir.Let):
                terms = self._locals.get(st.name)
                if terms and st.name in self._live_lets:
                    name = f"{self.prefix}{st.name}"
                    self.lines.append(f"{name} = {' + '.join(terms)}")
                    self._grad(st.value, name)
                continue
            g = cotangents.get(st.name)
            if g is None or not self._needs(st.value):
                continue
            self._grad(st.value, self._sum_to(g, st.type.shape, targets[st.name].lane_axis, st.value))

    def total(self, role: str, name: str) -> str | None:
        terms = self.terms.get((role, name))
        return " + ".join(terms) if terms else None

    # ---- helpers ----
    def _p(self, e: ir.Expr) -> str:
        return self.pr(e)

    def _name(self, g: str) -> str:
        """A variable for a cotangent read more than once."""
        if g.isidentifier():
            return g
        name = f"{self.prefix}t{next(self._n)}"
        self.lines.append(f"{name} = {g}")
        return name

    def _sum(self, x: str, axis: int, rank: int, size: int, lane: bool, keep: bool = False) -> str:
        if lane:
            x = f"tl.where(lane_ok{_key(axis, rank)}, {x}, 0.0)"
        elif pad(size) != size:
            self.pr.sizes.add(size)
            x = f"tl.where(ok_{size}{_key(axis, rank)}, {x}, 0.0)"
        if keep:  # a later `[:, None]` drops the axis again: remember the sum without it
            self._kept[f"tl.reduce({x}, {axis}, _psmc_add, keep_dims=True)"] = (axis, f"tl.reduce({x}, {axis}, _psmc_add)")
            return f"tl.reduce({x}, {axis}, _psmc_add, keep_dims=True)"
        return f"tl.reduce({x}, {axis}, _psmc_add)"

    def _sum_to(self, g: str, shape: tuple[int, ...], lane: int | None, child: ir.Expr) -> str:
        """A cotangent of `shape` (lane axis `lane`) reduced to the shape of `child`, which
        broadcasts to it (torch's rules: right-aligned, size-1 axes stretched)."""
        cs = child.type.shape
        rank, lead = len(shape), len(shape) - len(cs)
        for a in range(lead, rank):
            if cs[a - lead] == 1 and shape[a] != 1:
                g = self._sum(g, a, rank, shape[a], a == lane, keep=True)
        for a in range(lead):
            g = self._sum(g, 0, rank - a, shape[a], a == lane)
        return g

    def _node_sum_to(self, g: str, node: ir.Expr, child: ir.Expr) -> str:
        return self._sum_to(g, node.type.shape, self.lanes.get(id(node)), child)

    def _dims(self, e: ir.Expr) -> str:
        return "[" + ", ".join(tile_dims(e.type.shape, self.lanes.get(id(e)))) + "]"

    # ---- the rules ----
    def _grad(self, e: ir.Expr, g: str) -> None:
        if not self._needs(e):
            return
        kids = [c for c in ir.children(e) if self._needs(c)]
        if len(kids) > 1:
            g = self._name(g)
        getattr(self, "_d_" + type(e).__name__.lower())(e, g)

    def _d_fieldref(self, e: ir.FieldRef, g: str) -> None:
        self.terms.setdefault((e.role, e.name), []).append(g)

    def _d_localref(self, e: ir.LocalRef, g: str) -> None:
        self._locals.setdefault(e.name, []).append(g)

    def _d_unary(self, e: ir.Unary, g: str) -> None:
        self._grad(e.arg, f"(-{g})")

    def _d_binary(self, e: ir.Binary, g: str) -> None:
        a, b = e.lhs, e.rhs
        if e.op == "@":
            return self._d_matmul(e, g)
        if e.op in ("+", "-"):
            self._grad(a, self._node_sum_to(g, e, a))
            self._grad(b, self._node_sum_to(g if e.op == "+" else f"(-{g})", e, b))
        elif e.op == "*":
            self._grad(a, self._node_sum_to(f"({g} * {self._p(b)})", e, a))
            self._grad(b, self._node_sum_to(f"({g} * {self._p(a)})", e, b))
        elif e.op == "/":
            self._grad(a, self._node_sum_to(f"({g} / {self._p(b)})", e, a))
            self._grad(b, self._node_sum_to(f"(-{g} * {self._p(e)} / {self._p(b)})", e, b))
        elif e.op == "**":
            pa, pb = self._p(a), self._p(b)
            if isinstance(b, ir.Const):
                da = f"({float(b.value)} * tl.exp({float(b.value) - 1.0} * tl.log({pa})))"
            else:
                da = f"({pb} * tl.exp(({pb} - 1.0) * tl.log({pa})))"
            self._grad(a, self._node_sum_to(f"({g} * {da})", e, a))
            self._grad(b, self._node_sum_to(f"({g} * {self._p(e)} * tl.log({pa}))", e, b))
        else:
            raise PsmError(f"the backward of strategy recurrent cannot differentiate '{e.op}'", e.loc)

    def _d_matmul(self, e: ir.Binary, g: str) -> None:
        a, b = e.lhs, e.rhs
        pa, pb = self._p(a), self._p(b)
        la, lb = self.lanes.get(id(a)), self.lanes.get(id(b))
        ra, rb = a.type.rank, b.type.rank
        if ra == 1 and rb == 1:  # y = sum(a * b)
            self._grad(a, f"({g} * {pb})")
            self._grad(b, f"({g} * {pa})")
        elif ra == 1 and rb == 2:  # y[j] = sum_i a[i] B[i, j]
            self._grad(a, self._sum(f"({pb} * {_wrap(g)}[None, :])", 1, 2, b.type.shape[1], lb == 1))
            self._grad(b, f"({pa}[:, None] * {_wrap(g)}[None, :])")
        elif ra == 2 and rb == 1:  # y[i] = sum_j A[i, j] b[j]
            self._grad(a, f"({_wrap(g)}[:, None] * {pb}[None, :])")
            self._grad(b, self._sum(f"({pa} * {_wrap(g)}[:, None])", 0, 2, a.type.shape[0], la == 0))
        elif ra == 2 and rb == 2:  # Y = A @ B
            self._grad(a, self._sum(f"({_wrap(g)}[:, None, :] * {pb}[None, :, :])", 2, 3, b.type.shape[1], lb == 1))
            self._grad(b, self._sum(f"({pa}[:, :, None] * {_wrap(g)}[:, None, :])", 0, 3, a.type.shape[0], la == 0))
        else:
            raise PsmError("the backward of strategy recurrent handles '@' of vectors and matrices "
                           "only", e.loc)

    def _d_call(self, e: ir.Call, g: str) -> None:
        f, args = e.func, e.args
        if f in ir.DTYPES:  # a float-to-float cast passes the cotangent on
            return self._grad(args[0], g)
        if f == "where":
            c = self._p(args[0])
            self._grad(args[1], self._node_sum_to(f"tl.where({c}, {g}, 0.0)", e, args[1]))
            self._grad(args[2], self._node_sum_to(f"tl.where({c}, 0.0, {g})", e, args[2]))
        elif f == "outer":
            a, b = args
            self._grad(a, self._sum(f"({g} * {self._p(b)}[None, :])", 1, 2, b.type.shape[0],
                                    self.lanes.get(id(b)) == 0))
            self._grad(b, self._sum(f"({g} * {self._p(a)}[:, None])", 0, 2, a.type.shape[0],
                                    self.lanes.get(id(a)) == 0))
        elif f in ("max", "min"):
            pa, pb = self._p(args[0]), self._p(args[1])
            win = ">" if f == "max" else "<"
            for x, px, py in ((args[0], pa, pb), (args[1], pb, pa)):
                gx = f"tl.where({px} {win} {py}, {g}, tl.where({px} == {py}, 0.5 * {g}, 0.0))"
                self._grad(x, self._node_sum_to(gx, e, x))
        elif f == "logaddexp":
            y = self._p(e)
            for x in args:
                gx = f'tl.where({y} == float("-inf"), 0.0, {g} * tl.exp({self._p(x)} - {y}))'
                self._grad(x, self._node_sum_to(gx, e, x))
        elif f == "abs":
            a = self._p(args[0])
            self._grad(args[0], f"tl.where({a} > 0, {g}, tl.where({a} < 0, -{g}, 0.0))")
        elif f == "relu":
            self._grad(args[0], f"tl.where({self._p(args[0])} > 0, {g}, 0.0)")
        elif f in _DERIVATIVE:
            d = _DERIVATIVE[f].format(a=self._p(args[0]), y=self._p(e))
            self._grad(args[0], f"({g} * {d})")
        else:
            raise PsmError(f"the backward of strategy recurrent cannot differentiate {f}()", e.loc)

    def _d_reduce(self, e: ir.Reduce, g: str) -> None:
        arg = e.arg
        shape = arg.type.shape
        if not shape:
            return self._grad(arg, g)
        full = self._dims(arg)
        spread, y = g, self._p(e)
        if e.axis is not None and len(shape) > 1:  # put the reduced axis back (size 1)
            key = "[" + ", ".join("None" if a == e.axis else ":" for a in range(len(shape))) + "]"
            spread, y = f"{_wrap(g)}{key}", f"{_wrap(y)}{key}"
        if e.op == "sum":
            return self._grad(arg, f"tl.broadcast_to({spread}, {full})")
        # max / min: the cotangent goes to every position that attains the extreme
        self._grad(arg, f"tl.where({self._p(arg)} == {y}, tl.broadcast_to({spread}, {full}), 0.0)")

    def _d_index(self, e: ir.Index, g: str) -> None:
        base = e.base
        shape = base.type.shape
        picks = [(a, it.start) for a, it in enumerate(e.items) if it.kind == "int"]
        if picks:  # base[..., i, ...]: the cotangent lands at position i of the axis
            rank = len(shape)
            key = "[" + ", ".join("None" if it.kind == "int" else ":" for it in e.items) + "]"
            spread = f"{_wrap(g)}{key}" if rank > 1 else g
            cond = " & ".join(f"(ar_{shape[a]}{_key(a, rank)} == {i})" for a, i in picks)
            for a, _ in picks:
                self.pr.sizes.add(shape[a])
            self._grad(base, f"tl.where({cond}, {spread}, 0.0)")
            return
        new = [a for a, it in enumerate(e.items) if it.kind == "newaxis"]
        if new == [self._kept.get(g, (None,))[0]]:  # a sum that kept the axis: keep it not
            g = self._kept[g][1]
        elif new:  # drop the new (size-1) axes again
            g = f"tl.reshape({g}, {self._dims(base)})"
        self._grad(base, g)

    def _d_const(self, e: ir.Const, g: str) -> None:
        pass

    def _d_externcall(self, e: ir.ExternCall, g: str) -> None:
        raise PsmError(f"extern '{e.name}' cannot be compiled to Triton", e.loc)
