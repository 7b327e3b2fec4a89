"""Fuzzing the front end: whatever the text, psmc answers with a PsmError (located, renderable)
or a checked program, never another exception; and the CLI never shows a Python traceback.

* Grammar-based programs: `hypothesis.extra.lark.from_lark` on psmc's own Lark grammar, with
  explicit terminal strategies so the text lexes back into the very tokens drawn (every token
  padded with spaces, names drawn from a pool of non-keywords that the checker knows, `_SEP` a
  newline or ';'). Those programs must parse (raw Lark) and then check or fail with a PsmError.
* The same grammar with Hypothesis' default terminal strategies (any Unicode, tokens glued).
* Typed expressions (a recursive strategy over every expression form) inside a valid op: PsmError
  only, and when the op checks, both paths run and agree with the IR's dtype and shape.
* Byte-level mutations of the example files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark

import psmc
from psmc.errors import PsmError
from psmc.parser import _KEYWORDS, _lark
from psmc.typecheck import BINARY_FUNCS, CASTS, FLOAT_FUNCS, SAME_FUNCS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.psm"))

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# names the checker gives a meaning to somewhere (parameters, fields, types, functions, constants,
# expectations, dims) plus a few it must reject (Python keywords, dunders, reserved inputs)
NAMES = ["x", "l", "r", "s", "a", "b", "h", "g", "y", "u", "K", "C", "D", "f32", "f16", "bf16", "f64",
         "i32", "i64", "bool", "exp", "log", "max", "min", "sum", "where", "outer", "tanh", "abs",
         "inf", "pi", "true", "false", "eye", "exclusive", "associative", "nonassociative", "None",
         "axis", "class", "__x", "return_state", "f"]
assert not set(NAMES) & _KEYWORDS


def _explicit(start: str) -> dict:
    """Terminal strategies that lex back as drawn: each token padded with spaces."""
    lark = _lark()
    terminals, _, ignore = lark.grammar.compile([start], ())
    used = {t.name for t in terminals} | set(ignore)
    pad = lambda s: f" {s} "  # noqa: E731
    explicit = {t.name: st.just(pad(t.pattern.value)) for t in terminals if t.pattern.type == "str"}
    explicit.update({
        "NAME": st.sampled_from(NAMES).map(pad),
        "INT": st.sampled_from(["0", "1", "2", "3", "4", "16"]).map(pad),
        "FLOAT": st.sampled_from(["0.5", "1.0", "1e3", ".25", "2.", "1e-3"]).map(pad),
        "COMPARE": st.sampled_from(["==", "!=", "<=", ">=", "<", ">"]).map(pad),
        "_SEP": st.sampled_from(["\n", ";", "\n\n", " ;\n"]),
        # ignored text between tokens: blanks and line continuations. A comment runs to the end of
        # its line and the newline after it is a separator, which is not valid between any two
        # tokens, so comments are left to the byte-level fuzz.
        "COMMENT": st.just(" "), "__IGNORE_1": st.sampled_from([" ", "\t", " \f "]),
        "__IGNORE_2": st.just(" \\\n "),
    })
    return {k: v for k, v in explicit.items() if k in used}


def only_psm_errors(text, path="<fuzz>"):
    """load_ops(text): a list of ops or a PsmError whose render() works and points into the text."""
    try:
        return psmc.load_ops(text, path)
    except PsmError as err:
        rendered = err.render()
        assert "error: " in rendered and err.message
        if err.loc is not None:
            assert err.loc.line >= 1 and err.loc.column >= 1
            assert rendered.startswith(f"{path}:{err.loc.line}:{err.loc.column}: error: ")
        return None


@pytest.mark.parametrize("start, n", [("start", 300), ("op_decl", 250)])
def test_grammar_generated_programs(start, n):
    strategy = from_lark(_lark(), start=start, explicit=_explicit(start))
    seen = []

    @settings(FUZZ, max_examples=n)
    @given(strategy)
    def run(text):
        seen.append(text)
        _lark().parse(text)  # lexes and parses as drawn (an op_decl is a whole file too)
        only_psm_errors(text)

    run()
    assert len(seen) >= n  # 300 + 250 grammar-generated programs in all
    assert sum(bool(t.strip()) for t in seen) > n // 2


def test_raw_grammar_programs():
    """Default terminal strategies: any Unicode in names and numbers, tokens glued together."""
    strategy = from_lark(_lark())
    seen = []

    @settings(FUZZ, max_examples=150)
    @given(strategy)
    def run(text):
        seen.append(text)
        only_psm_errors(text)

    run()
    assert len(seen) >= 150


# ---- typed expressions inside a valid op ---------------------------------------------------------

TEMPLATE = """op t[K = 3, V = 2] {
  expect associative
  input a: f32, b: f32 in [-1, 1], q: f32[K], M: f32[K, V], i: i32 in [-3, 3], j: i64, c: bool
  state h: f32 = 0, v: f32[K] = 0
  lift(x) { h = x.a; v = x.q }
  combine(l, r) { h = l.h + r.h; v = l.v * r.v }
  output(s, x) { y = %s }
}
"""
LEAVES = ["x.a", "x.b", "x.q", "x.M", "x.i", "x.j", "x.c", "s.h", "s.v", "0", "1", "2", "2.5", "0.5",
          "K", "V", "pi", "true", "false", "inf", "x.z", "zz"]


def _extend(e):
    binary = st.tuples(e, st.sampled_from(["+", "-", "*", "/", "**", "@", "==", "!=", "<", "<=", ">",
                                           ">=", "and", "or"]), e).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
    unary = st.tuples(st.sampled_from(["-", "not "]), e).map(lambda t: f"{t[0]}({t[1]})")
    one = st.tuples(st.sampled_from(FLOAT_FUNCS + SAME_FUNCS + CASTS), e).map(lambda t: f"{t[0]}({t[1]})")
    two = st.tuples(st.sampled_from(BINARY_FUNCS + ("outer", "max")), e, e).map(lambda t: f"{t[0]}({t[1]}, {t[2]})")
    where = st.tuples(e, e, e).map(lambda t: f"where({t[0]}, {t[1]}, {t[2]})")
    reduce = st.tuples(st.sampled_from(["sum", "max", "min"]), e,
                       st.sampled_from(["", ", 0", ", -1", ", 1", ", axis=0", ", axis=1", ", axis=-2"])
                       ).map(lambda t: f"{t[0]}({t[1]}{t[2]})")
    index = st.tuples(e, st.sampled_from(["[0]", "[:, None]", "[None]", "[1:]", "[-1]", "[:2, 0]",
                                          "[None, :]", "[5]", "[0, 0, 0]"])).map(lambda t: f"({t[0]}){t[1]}")
    return st.one_of(binary, unary, one, two, where, reduce, index)


EXPRESSIONS = st.recursive(st.sampled_from(LEAVES), _extend, max_leaves=8)
TORCH_OUT = {"f32": torch.float32, "f16": torch.float32, "bf16": torch.float32,  # f32 inputs
             "f64": torch.float64, "i32": torch.int32, "i64": torch.int64, "bool": torch.bool}


def _inputs(T=3):
    g = torch.Generator().manual_seed(0)
    return dict(a=torch.randn(2, T, generator=g), b=torch.rand(2, T, generator=g) * 2 - 1,
                q=torch.randn(2, T, 3, generator=g), M=torch.randn(2, T, 3, 2, generator=g),
                i=torch.randint(-3, 4, (2, T), generator=g, dtype=torch.int32),
                j=torch.randint(-3, 4, (2, T), generator=g), c=torch.rand(2, T, generator=g) > 0.5)


@settings(FUZZ, max_examples=400)
@given(EXPRESSIONS)
def test_typed_expressions(expr):
    ops = only_psm_errors(TEMPLATE % expr)
    if ops is None:
        return
    op = psmc.PsmOp(ops[0])
    want = op.ir.outputs[0].type
    x = _inputs()
    y = op(**x)  # the generated torch code, log-depth scan
    ref = op.reference(**x)  # the IR interpreter, sequential
    for got in (y, ref):
        assert tuple(got.shape) == (2, 3) + want.shape, expr
        assert got.dtype == TORCH_OUT[want.dtype], expr
    if y.dtype.is_floating_point:
        torch.testing.assert_close(y, ref, equal_nan=True, rtol=1e-4, atol=1e-5, msg=expr)
    else:
        assert torch.equal(y, ref), expr


# ---- byte-level mutations of the examples ---------------------------------------------------------

SNIPPETS = [b"{", b"}", b"(", b")", b"[", b"]", b";", b"\n", b",", b":", b"=", b".", b"@", b"**", b"#",
            b"-", b"inf", b"eye", b"None", b"op", b"let", b"in", b"x", b"s.h", b"0", b"1e9", b"99999",
            b"\\\n", b"\t", b"\r\n", b"\xff", b"\x00", b"\xe2\x82", "λ".encode(), b"$", b"'", b'"',
            b"output(s, x) exclusive { y = 1 }", b"state z: f32 = [1, [2]]", b"extern e(f32) -> f32"]


@st.composite
def mutated(draw):
    data = draw(st.sampled_from(EXAMPLES)).read_bytes()
    if draw(st.booleans()):  # mostly code: drop the comment header so mutations hit the op
        data = b"\n".join(line for line in data.split(b"\n") if not line.startswith(b"#"))
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "duplicate", "truncate", "swap"]))
        n = len(data)
        i = draw(st.integers(0, max(n - 1, 0)))
        if kind == "delete":
            del data[i:i + draw(st.integers(1, 12))]
        elif kind == "insert":
            data[i:i] = draw(st.sampled_from(SNIPPETS) | st.binary(min_size=1, max_size=4))
        elif kind == "replace":
            data[i:i + 1] = draw(st.sampled_from(SNIPPETS))
        elif kind == "duplicate":
            j = draw(st.integers(i, min(n, i + 40)))
            data[j:j] = data[i:j]
        elif kind == "truncate":
            del data[i:]
        else:
            lines = bytes(data).split(b"\n")
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[a], lines[b] = lines[b], lines[a]
            data = bytearray(b"\n".join(lines))
    return bytes(data)


@settings(FUZZ, max_examples=300)
@given(mutated())
def test_mutated_examples(data):
    only_psm_errors(data, "mutated.psm")


# ---- the CLI on a few of those ---------------------------------------------------------------------

def test_cli_never_prints_a_traceback(tmp_path):
    linrec = (ROOT / "examples" / "linrec.psm").read_bytes()
    bad = {
        "syntax.psm": linrec.replace(b"combine(l, r) {", b"combine(l, r) {{"),
        "binary.psm": linrec[:40] + b"\xff\xfe\x00" + linrec[40:],
        "semantic.psm": linrec.replace(b"h = r.g * l.h + r.h", b"h = r.g @ l.h + r.h"),
        "truncated.psm": linrec[: len(linrec) // 2],
    }
    paths = []
    for name, data in bad.items():
        with pytest.raises(PsmError):
            psmc.load_ops(data)
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    runs = [(["check"], p) for p in paths] + [(["compile", "-o", str(tmp_path / "out")], paths[0]),
                                              (["emit", "--target", "reference"], paths[1])]
    for command, path in runs:
        r = subprocess.run([sys.executable, "-m", "psmc.cli", *command, str(path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (command, path.name, r.stderr)
        assert f"{path}:" in r.stderr and ": error: " in r.stderr
        assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


# ---- regressions: bugs the fuzzer found, fixed ----------------------------------------------------

@pytest.mark.parametrize("expr", ["x.a / sqrt(2 * pi)", "exp(0 + 2.5)", "not (1 > 2)", "abs(1 - 2)",
                                  "relu(1 - 2)", "where(1 > 2, x.a, 0)", "x.c and (1 < 2)",
                                  "x.q + max(1 + 1, 2)", "silu(2 - pi)", "x.a * (1 / 0)"])
def test_literal_only_subexpressions_run_on_every_path(expr):
    """A subexpression made only of literals/dims (weak, but not a folded Const) reaches the
    generated torch code as a Python number: torch.sqrt(2 * 3.14159) raises TypeError, (1 - 2).abs()
    AttributeError, 1 / 0 ZeroDivisionError (also in the interpreter). Both paths must run and agree."""
    op = psmc.compile_source(TEMPLATE % expr)["t"]
    x = _inputs()
    want = op.ir.outputs[0].type
    ys = [op(**x, backend=b) for b in ("reference", "torch")]
    for y in ys:
        assert tuple(y.shape) == (2, 3) + want.shape and y.dtype == TORCH_OUT[want.dtype]
    torch.testing.assert_close(ys[0], ys[1], equal_nan=True)
