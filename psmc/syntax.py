"""The untyped syntax tree of a `.psm` file, exactly as written, with a location on every node.

The parser builds these; the type checker (`typecheck.py`) resolves names, binds static dims and
turns them into the typed IR of `ir.py`. Keeping the two apart means error messages can always
point at what the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .errors import Loc


# ---- expressions -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Num:
    value: int | float
    loc: Loc


@dataclass(frozen=True)
class Name:
    name: str
    loc: Loc


@dataclass(frozen=True)
class Field:
    base: "Expr"
    name: str
    loc: Loc  # the field name's position


@dataclass(frozen=True)
class Slice:
    start: "Expr | None"
    stop: "Expr | None"
    loc: Loc


@dataclass(frozen=True)
class Index:
    base: "Expr"
    items: tuple["Expr | Slice", ...]
    loc: Loc


@dataclass(frozen=True)
class Unary:
    op: str  # "-", "+", "not"
    arg: "Expr"
    loc: Loc


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / ** @ == != < <= > >= and or
    lhs: "Expr"
    rhs: "Expr"
    loc: Loc  # the operator's position


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[tuple[str, "Expr", Loc], ...]
    loc: Loc


Expr = Union[Num, Name, Field, Index, Unary, Binary, Call]


# ---- statements and declarations -------------------------------------------------------------

@dataclass(frozen=True)
class Let:
    name: str
    value: Expr
    loc: Loc


@dataclass(frozen=True)
class Assign:
    name: str
    value: Expr
    loc: Loc


Stmt = Union[Let, Assign]


@dataclass(frozen=True)
class DimRef:
    """A dimension in a shape: an integer or the name of a static dim."""

    value: int | str
    loc: Loc


@dataclass(frozen=True)
class TypeExpr:
    dtype: str
    shape: tuple[DimRef, ...]
    loc: Loc


@dataclass(frozen=True)
class InitExpr:
    """A state field's identity value: a number, `inf`/`-inf`, `eye`, or a (nested) list."""

    kind: str  # "number" | "eye" | "list"
    value: object  # float/int for number, None for eye, tuple[InitExpr, ...] for list
    loc: Loc


@dataclass(frozen=True)
class InputDecl:
    name: str
    type: TypeExpr
    range: tuple[float, float] | None
    loc: Loc


@dataclass(frozen=True)
class StateDecl:
    name: str
    type: TypeExpr
    init: InitExpr
    loc: Loc


@dataclass(frozen=True)
class ExternDecl:
    name: str
    args: tuple[TypeExpr, ...]
    result: TypeExpr
    loc: Loc


@dataclass(frozen=True)
class FuncDef:
    """`lift(x)`, `combine(l, r)` or `output(s, x)`: parameter names and a block."""

    kind: str
    params: tuple[tuple[str, Loc], ...]
    body: tuple[Stmt, ...]
    exclusive: bool
    loc: Loc


@dataclass(frozen=True)
class DimParam:
    name: str
    default: int | None
    loc: Loc


@dataclass(frozen=True)
class OpDecl:
    name: str
    dims: tuple[DimParam, ...]
    expect: tuple[str, Loc] | None
    chunk: DimRef | None
    inputs: tuple[InputDecl, ...]
    state: tuple[StateDecl, ...]
    externs: tuple[ExternDecl, ...]
    lift: FuncDef | None
    combine: FuncDef | None
    output: FuncDef | None
    loc: Loc
    end_loc: Loc
