"""The typed IR: what every later stage (reference semantics, checker, code generators) reads.

Names are resolved (a `FieldRef` says whether it reads an input, the left or right state, or the
prefix state), static dims are bound to integers, and every expression carries its `Type`: a dtype
and a concrete shape. Expression nodes are frozen dataclasses, so passes can hash and share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .errors import Loc, Source

DTYPES = ("bool", "i32", "i64", "f16", "bf16", "f32", "f64")
FLOAT_DTYPES = ("f16", "bf16", "f32", "f64")
INT_DTYPES = ("i32", "i64")


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


def is_int(dtype: str) -> bool:
    return dtype in INT_DTYPES


@dataclass(frozen=True)
class Type:
    """dtype + shape of a value as seen by one element (no batch or time dims).

    `weak` marks Python-scalar-like constants (literals, dims): like torch's Python scalars they
    take the dtype of the tensor they meet, so `2 * x` keeps x's dtype.
    """

    dtype: str
    shape: tuple[int, ...] = ()
    weak: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        dims = f"[{', '.join(map(str, self.shape))}]" if self.shape else ""
        return f"{self.dtype}{dims}"


# ---- expressions -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Const:
    value: float | int | bool
    type: Type
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class FieldRef:
    """`x.a`, `l.h`, `r.h` or `s.h`. `role` is "x" (inputs), "l", "r" or "s" (states)."""

    role: str
    name: str
    type: Type
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class LocalRef:
    name: str
    type: Type
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class Unary:
    op: str  # "neg" | "not"
    arg: "Expr"
    type: Type
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / ** @ == != < <= > >= and or
    lhs: "Expr"
    rhs: "Expr"
    type: Type
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class Call:
    """A built-in function: elementwise math, `where`, `outer`, `max`/`min` of two, or a cast."""

    func: str
    args: tuple["Expr", ...]
    type: Type
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class Reduce:
    op: str  # "sum" | "max" | "min"
    arg: "Expr"
    axis: int | None  # non-negative axis of arg, or None for all
    type: Type
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class IndexItem:
    """One position of a subscript: an integer, a slice, or a new axis (`None`)."""

    kind: str  # "int" | "slice" | "newaxis"
    start: int | None = None
    stop: int | None = None


@dataclass(frozen=True)
class Index:
    """`base[items]`; `items` covers every axis of `base` (trailing `:` made explicit)."""

    base: "Expr"
    items: tuple[IndexItem, ...]
    type: Type
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class ExternCall:
    name: str
    args: tuple["Expr", ...]
    type: Type
    loc: Loc = field(compare=False, repr=False)


Expr = Union[Const, FieldRef, LocalRef, Unary, Binary, Call, Reduce, Index, ExternCall]


def children(e: Expr) -> tuple[Expr, ...]:
    if isinstance(e, (Unary, Reduce)):
        return (e.arg,)
    if isinstance(e, Binary):
        return (e.lhs, e.rhs)
    if isinstance(e, (Call, ExternCall)):
        return e.args
    if isinstance(e, Index):
        return (e.base,)
    return ()


def walk(e: Expr):
    """Every node of an expression, parents first."""
    yield e
    for c in children(e):
        yield from walk(c)


# ---- statements, functions, ops --------------------------------------------------------------

@dataclass(frozen=True)
class Let:
    name: str
    value: Expr
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class Assign:
    """Assign a state field (lift, combine) or an output (output). `type` is the target's."""

    name: str
    value: Expr
    type: Type
    loc: Loc = field(compare=False, repr=False)


Stmt = Union[Let, Assign]


@dataclass(frozen=True)
class Function:
    """A checked `lift`, `combine` or `output` body. `params` are the user's names, by role."""

    kind: str
    params: tuple[str, ...]
    body: tuple[Stmt, ...]
    loc: Loc = field(compare=False, repr=False)

    @property
    def assigns(self) -> tuple[Assign, ...]:
        return tuple(s for s in self.body if isinstance(s, Assign))


@dataclass(frozen=True)
class InputField:
    name: str
    type: Type  # per token
    range: tuple[float, float] | None
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class StateField:
    name: str
    type: Type
    init: object  # "eye", a number, or nested tuples of numbers matching the shape
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class Extern:
    name: str
    args: tuple[Type, ...]
    result: Type
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class OutputField:
    name: str
    type: Type  # per element; for chunked ops the leading axis is the chunk
    loc: Loc = field(compare=False, repr=False)


@dataclass(frozen=True)
class Op:
    """One checked operator with its static dims bound."""

    name: str
    dims: tuple[tuple[str, int], ...]
    expect: str | None  # "associative" | "nonassociative" | None
    chunk: int | None  # tokens per element when the op declares `chunk C`; None otherwise
    inputs: tuple[InputField, ...]
    state: tuple[StateField, ...]
    externs: tuple[Extern, ...]
    lift: Function
    combine: Function
    output: Function
    exclusive: bool
    outputs: tuple[OutputField, ...]
    source: Source = field(compare=False, repr=False)
    loc: Loc = field(compare=False, repr=False)

    @property
    def tokens_per_element(self) -> int:
        return self.chunk or 1

    @property
    def dim_values(self) -> dict[str, int]:
        return dict(self.dims)

    def input(self, name: str) -> InputField:
        return next(f for f in self.inputs if f.name == name)

    def field(self, name: str) -> StateField:
        return next(f for f in self.state if f.name == name)

    def lifted_input_type(self, f: InputField) -> Type:
        """The type `lift` and `output` see: per chunk, with the chunk axis in front."""
        if self.chunk is None:
            return f.type
        return Type(f.type.dtype, (self.chunk,) + f.type.shape)
