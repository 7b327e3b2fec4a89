"""Text → syntax tree (`syntax.py`), with Lark's errors translated into `PsmError`s.

The grammar is `grammar/psm.lark` (LALR). A small post-lexer folds runs of statement separators
and drops separators inside brackets, so expressions and list literals may span lines.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import lark
from lark import Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import syntax as S
from .errors import Loc, PsmError, Source
from .resources import grammar_dir

_KEYWORDS = {"op", "expect", "chunk", "input", "state", "extern", "lift", "combine", "output",
             "let", "in", "and", "or", "not"}
_OPEN = {"LPAR", "LSQB"}
_CLOSE = {"RPAR", "RSQB"}


class _Separators:
    """Post-lexer: one `_SEP` per run of separators; none inside (), [] or next to { and }."""

    always_accept = ("_SEP",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth = 0
        pending: Token | None = None
        previous = "LBRACE"  # a file starts like a block: leading separators are dropped
        for tok in stream:
            if tok.type == "_SEP":
                if depth == 0 and pending is None and previous != "LBRACE":
                    pending = tok
                continue
            if tok.type in _OPEN:
                depth += 1
            elif tok.type in _CLOSE:
                depth = max(depth - 1, 0)
            if pending is not None and tok.type != "RBRACE":
                yield pending
            pending = None
            previous = tok.type
            yield tok


@lru_cache(maxsize=1)
def _lark() -> lark.Lark:
    return lark.Lark(
        (grammar_dir() / "psm.lark").read_text(),
        parser="lalr",
        lexer="basic",
        postlex=_Separators(),
        propagate_positions=True,
        maybe_placeholders=True,
    )


# Human names for the grammar's terminals, used in "expected ..." messages.
_TERMINAL_TEXT = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "_SEP": "a newline or ';'",
    "$END": "end of file", "COMPARE": "a comparison",
}


def _describe(terminal: str) -> str:
    if terminal in _TERMINAL_TEXT:
        return _TERMINAL_TEXT[terminal]
    try:
        pattern = _lark().get_terminal(terminal).pattern
    except KeyError:
        return terminal.lower()
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"'{pattern.value}'"
    return terminal.lower()


def _expected_list(expected: set[str]) -> str:
    names = sorted({_describe(t) for t in expected})
    if len(names) > 8:
        names = names[:8] + ["…"]
    return ", ".join(names)


def _token_text(tok: Token) -> str:
    if tok.type == "_SEP":
        return "end of line" if "\n" in tok.value else "';'"
    if tok.type == "$END":
        return "end of file"
    return f"'{tok.value}'"


def _translate(err: UnexpectedInput, source: Source) -> PsmError:
    """Turn a Lark exception into a located, readable PsmError."""
    if isinstance(err, UnexpectedCharacters):
        ch = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        loc = Loc(source, err.line, err.column)
        return PsmError(f"unexpected character {ch!r}", loc,
                        "psm code uses letters, digits, operators + - * / ** @ and brackets")
    if isinstance(err, UnexpectedEOF):
        lines = source.text.splitlines() or [""]
        loc = Loc(source, len(lines), len(lines[-1]) + 1)
        return PsmError("unexpected end of file", loc,
                        f"expected {_expected_list(set(err.expected))}; is a '}}' missing?")
    if isinstance(err, UnexpectedToken):
        tok = err.token
        if tok.type == "$END" or tok.line is None:
            lines = source.text.splitlines() or [""]
            loc = Loc(source, len(lines), len(lines[-1]) + 1)
            return PsmError("unexpected end of file", loc,
                            f"expected {_expected_list(set(err.expected))}; is a '}}' missing?")
        loc = Loc(source, tok.line, tok.column)
        hint = f"expected {_expected_list(set(err.expected))}"
        if "_SEP" in err.expected and tok.type not in _CLOSE | {"RBRACE"}:
            hint = f"is a newline or ';' missing before {_token_text(tok)}? ({hint})"
        elif tok.value in _KEYWORDS and "NAME" in err.expected:
            hint += f"; '{tok.value}' is a keyword of the psm language and cannot be used as a name"
        return PsmError(f"unexpected {_token_text(tok)}", loc, hint)
    return PsmError(str(err), None)


@v_args(meta=True)
class _ToSyntax(Transformer):
    """Parse tree → `syntax` dataclasses. Positions come from Lark's `meta`."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _loc(self, meta_or_tok) -> Loc:
        return Loc(self.source, getattr(meta_or_tok, "line", 1) or 1, getattr(meta_or_tok, "column", 1) or 1)

    # -- expressions --
    def int_lit(self, meta, c):
        return S.Num(int(c[0]), self._loc(c[0]))

    def float_lit(self, meta, c):
        return S.Num(float(c[0]), self._loc(c[0]))

    def name(self, meta, c):
        return S.Name(str(c[0]), self._loc(c[0]))

    def field(self, meta, c):
        return S.Field(c[0], str(c[1]), self._loc(c[1]))

    def index(self, meta, c):
        return S.Index(c[0], tuple(c[1:]), self._loc(meta))

    def slice(self, meta, c):
        return S.Slice(c[0], c[1], self._loc(meta))

    def unary(self, meta, c):
        return S.Unary(str(c[0]), c[1], self._loc(c[0]))

    def binary(self, meta, c):
        return S.Binary(str(c[1]), c[0], c[2], self._loc(c[1]))

    def kwarg(self, meta, c):
        return ("kw", str(c[0]), c[1], self._loc(c[0]))

    def call(self, meta, c):
        args, kwargs = [], []
        for a in c[1:]:
            if a is None:
                continue
            if isinstance(a, tuple) and a and a[0] == "kw":
                kwargs.append((a[1], a[2], a[3]))
            else:
                if kwargs:
                    raise PsmError("positional argument after a keyword argument", a.loc,
                                   "put keyword arguments such as axis=... last")
                args.append(a)
        return S.Call(str(c[0]), tuple(args), tuple(kwargs), self._loc(c[0]))

    # -- declarations --
    def literal(self, meta, c):
        sign = -1 if c[0] is not None else 1
        tok = c[1]
        if tok.type == "NAME":
            if tok == "eye" and c[0] is None:
                return S.InitExpr("eye", None, self._loc(tok))
            if tok != "inf":
                raise PsmError(f"expected a number here, found '{tok}'", self._loc(tok),
                               "write a number, inf or -inf (and eye for a state's identity)")
            value: float = float("inf")
        else:
            value = int(tok) if tok.type == "INT" else float(tok)
        return S.InitExpr("number", sign * value, self._loc(meta))

    def list_init(self, meta, c):
        return S.InitExpr("list", tuple(c), self._loc(meta))

    def dim_name(self, meta, c):
        return S.DimRef(str(c[0]), self._loc(c[0]))

    def dim_int(self, meta, c):
        return S.DimRef(int(c[0]), self._loc(c[0]))

    def shape(self, meta, c):
        return tuple(c)

    def type(self, meta, c):
        return S.TypeExpr(str(c[0]), c[1] or (), self._loc(c[0]))

    def value_range(self, meta, c):
        return (c[0].value, c[1].value, self._loc(meta))

    def input_item(self, meta, c):
        return S.InputDecl(str(c[0]), c[1], c[2], self._loc(c[0]))

    def input_stmt(self, meta, c):
        return ("input", list(c))

    def state_item(self, meta, c):
        return S.StateDecl(str(c[0]), c[1], c[2], self._loc(c[0]))

    def state_stmt(self, meta, c):
        return ("state", list(c))

    def extern_stmt(self, meta, c):
        args = tuple(a for a in c[1:-1] if a is not None)
        return ("extern", S.ExternDecl(str(c[0]), args, c[-1], self._loc(c[0])))

    def expect_stmt(self, meta, c):
        return ("expect", (str(c[0]), self._loc(c[0])), self._loc(meta))

    def chunk_stmt(self, meta, c):
        return ("chunk", c[0], self._loc(meta))

    def let_stmt(self, meta, c):
        return S.Let(str(c[0]), c[1], self._loc(c[0]))

    def assign_stmt(self, meta, c):
        return S.Assign(str(c[0]), c[1], self._loc(c[0]))

    def block(self, meta, c):
        return tuple(c)

    def _func(self, kind, meta, names, body, exclusive=False):
        params = tuple((str(n), self._loc(n)) for n in names)
        return (kind, S.FuncDef(kind, params, body, exclusive, self._loc(meta)), self._loc(meta))

    def lift_def(self, meta, c):
        return self._func("lift", meta, c[:1], c[1])

    def combine_def(self, meta, c):
        return self._func("combine", meta, c[:2], c[2])

    def output_def(self, meta, c):
        if c[2] is not None and c[2] != "exclusive":
            raise PsmError(f"unexpected '{c[2]}' after output's parameters", self._loc(c[2]),
                           "write `output(s, x) exclusive { ... }` or `output(s, x) { ... }`")
        return self._func("output", meta, c[:2], c[3], exclusive=c[2] is not None)

    def dim_param(self, meta, c):
        return S.DimParam(str(c[0]), int(c[1]) if c[1] is not None else None, self._loc(c[0]))

    def dim_params(self, meta, c):
        return tuple(c)

    def op_decl(self, meta, c):
        name_tok, dims, items = c[0], c[1] or (), c[2:]
        found: dict[str, object] = {}
        inputs, state, externs = [], [], []
        for item in items:
            kind = item[0]
            if kind == "input":
                inputs.extend(item[1])
            elif kind == "state":
                state.extend(item[1])
            elif kind == "extern":
                externs.append(item[1])
            else:
                if kind in found:
                    raise PsmError(f"op '{name_tok}' has a second '{kind}'", item[2],
                                   f"an op has at most one '{kind}'; merge them or remove one")
                found[kind] = item[1]
        end = Loc(self.source, meta.end_line, meta.end_column - 1) if meta.end_line else self._loc(meta)
        return S.OpDecl(
            name=str(name_tok), dims=dims, expect=found.get("expect"), chunk=found.get("chunk"),
            inputs=tuple(inputs), state=tuple(state), externs=tuple(externs),
            lift=found.get("lift"), combine=found.get("combine"), output=found.get("output"),
            loc=self._loc(name_tok), end_loc=end,
        )

    def start(self, meta, c):
        return list(c)


def decode(data: bytes, path: str) -> Source:
    """Bytes → Source, rejecting binary files with a located error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-8", errors="replace")
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        src = Source(path, before)
        raise PsmError(f"the file is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                       Loc(src, line, col), "a .psm file is plain UTF-8 text") from None
    if "\x00" in text:
        off = text.index("\x00")
        before = text[:off]
        line = before.count("\n") + 1
        col = len(before) - (before.rfind("\n") + 1) + 1
        raise PsmError("the file contains a NUL byte; is it a binary file?",
                       Loc(Source(path, text), line, col), "a .psm file is plain UTF-8 text")
    return Source(path, text)


def parse(source: Source) -> list[S.OpDecl]:
    """Parse a whole file into its op declarations."""
    try:
        tree = _lark().parse(source.text)
    except UnexpectedInput as err:
        raise _translate(err, source) from None
    try:
        ops = _ToSyntax(source).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, PsmError):
            raise err.orig_exc from None
        raise
    if not ops:
        raise PsmError("no op declarations found", Loc(source, 1, 1),
                       "a .psm file declares one or more operators: op NAME { ... }")
    return ops
