"""Bad .psm programs: each gives a PsmError at the exact line and column, with a readable message,
the source line, a caret under the column and a hint. No Python traceback reaches the CLI user."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import psmc
from psmc.errors import PsmError
from psmc.parser import decode

ROOT = Path(__file__).resolve().parent.parent


def prog(head="op t", decls="  input a: f32\n  state h: f32 = 0", lift="h = x.a",
         combine="h = l.h + r.h", output="y = s.h", extra=""):
    """A small valid op, one piece replaced. Lines: 1 head, 2.. decls, then lift, combine, output."""
    return (f"{head} {{\n{decls}\n  lift(x) {{ {lift} }}\n  combine(l, r) {{ {combine} }}\n"
            f"  output(s, x) {{ {output} }}\n}}\n{extra}")


TWO = "  input a: f32, q: f32[3], k: f32[4]\n  state h: f32 = 0, g: f32 = 1"


def two(lift="h = x.a; g = x.a", combine="h = l.h + r.h; g = l.g * r.g", output="y = s.h"):
    """Two state fields and vector inputs; lift on line 4, combine 5, output 6."""
    return prog(decls=TWO, lift=lift, combine=combine, output=output)


VALID = prog()

# (id, source, line, column, phrase in the message)
CASES = [
    # ---- syntax ----
    ("missing closing brace", VALID[:-2], 6, 27, "unexpected end of file"),
    ("missing brace inside", VALID.replace("h = x.a }", "h = x.a"), 5, 3, "unexpected 'combine'"),
    ("stray character", prog(lift="h = x.a $ 1"), 4, 21, "unexpected character '$'"),
    ("stray unicode character", prog(output="y = s.h × 2"), 6, 26, "unexpected character '×'"),
    ("missing separator between statements", two(lift="g = x.a h = x.a"), 4, 21, "unexpected 'h'"),
    ("missing separator between items", "op t {\n  input a: f32 state h: f32 = 0\n}\n", 2, 16,
     "unexpected 'state'"),
    ("keyword as input name", "op t {\n  input in: f32\n}\n", 2, 9, "unexpected 'in'"),
    ("keyword as let name", prog(lift="let let = 1; h = x.a"), 4, 17, "unexpected 'let'"),
    ("keyword as state name", "op t {\n  input a: f32\n  state output: f32 = 0\n}\n", 3, 9,
     "unexpected 'output'"),
    ("unexpected EOF in an expression", "op t {\n  input a: f32\n  state h: f32 = 0\n  lift(x) { h = x.a +",
     4, 22, "unexpected end of file"),
    ("unexpected EOF after op header", "op t {", 1, 7, "unexpected end of file"),
    ("unclosed parenthesis", prog(lift="h = (x.a + 1"), 4, 26, "unexpected '}'"),
    ("unknown output modifier", VALID.replace("output(s, x) {", "output(s, x) inclusive {"), 6, 16,
     "unexpected 'inclusive'"),
    ("second lift", VALID.replace("  combine", "  lift(x) { h = x.a }\n  combine"), 5, 3,
     "second 'lift'"),
    ("name as initializer", prog(decls="  input a: f32\n  state h: f32 = foo"), 3, 18,
     "expected a number here, found 'foo'"),
    ("NUL byte", "op t {\x00}", 1, 7, "NUL byte"),
    # ---- names ----
    ("unknown name", two(output="y = s.h + q"), 6, 28, "unknown name 'q'"),
    ("unknown input field", two(lift="h = x.b; g = x.a"), 4, 19, "the inputs have no field 'b'"),
    ("unknown state field", two(combine="h = l.hh + r.h; g = l.g * r.g"), 5, 25,
     "the state has no field 'hh'"),
    ("unknown function", two(output="y = exq(s.h)"), 6, 22, "unknown function 'exq'"),
    ("unknown type", prog(decls="  input a: f33\n  state h: f32 = 0"), 2, 12, "unknown type 'f33'"),
    ("unknown expectation", prog(decls="  expect commutative\n  input a: f32\n  state h: f32 = 0"), 2, 10,
     "unknown expectation 'commutative'"),
    ("assigning a non-state name", two(lift="h = x.a; g = x.a; z = 1"), 4, 31, "not a state field"),
    ("parameter used as a value", two(output="y = x"), 6, 22, "'x' is the inputs, not a value"),
    # ---- assignments ----
    ("lift assigns a field twice", two(lift="h = x.a; g = x.a; h = x.a"), 4, 31,
     "'h' is assigned twice in lift"),
    ("lift never assigns a field", two(lift="h = x.a"), 4, 3, "lift does not assign state field(s) g"),
    ("combine assigns a field twice", two(combine="h = l.h; g = l.g; g = r.g"), 5, 37,
     "'g' is assigned twice in combine"),
    ("combine never assigns a field", two(combine="g = l.g * r.g"), 5, 3,
     "combine does not assign state field(s) h"),
    ("output assigns nothing", two(output="let z = 1"), 6, 3, "output assigns nothing"),
    # ---- let shadowing ----
    ("let shadows a let", two(output="let a = s.h; let a = 2; y = a"), 6, 35, "shadows an earlier let"),
    ("let shadows a parameter", two(lift="let x = 1; h = 1; g = 1"), 4, 17, "shadows a parameter"),
    ("let shadows a dim", prog(head="op t[K = 2]", output="let K = 3; y = s.h"), 6, 22, "shadows a dim"),
    ("let shadows a constant", two(output="let pi = 3; y = s.h"), 6, 22, "shadows a constant"),
    # ---- shapes and dtypes ----
    ("shape mismatch under broadcasting", two(output="y = x.q + x.k"), 6, 26,
     "[3] and [4] do not broadcast"),
    ("@ inner dims differ", two(output="y = x.q @ x.k"), 6, 26, "inner sizes 3 and 4 differ"),
    ("@ on a scalar", two(output="y = s.h @ x.q"), 6, 26, "'@' needs vectors or matrices"),
    ("assigned value has the wrong shape", two(lift="h = x.q; g = x.a"), 4, 13,
     "'h' has shape a scalar but the value has shape [3]"),
    ("f32 into an i32 field", prog(decls="  input a: f32\n  state h: i32 = 0"), 4, 13,
     "'h' is i32 but the value is f32"),
    ("f64 into an f32 field", prog(decls="  input a: f64\n  state h: f32 = 0"), 4, 13,
     "'h' is f32 but the value is f64"),
    ("bool arithmetic", two(output="y = (s.h > 0) + 1"), 6, 32, "'+' needs numbers, got a bool"),
    ("not on a number", two(output="y = not s.h"), 6, 22, "'not' needs a bool operand"),
    ("non-bool where condition", two(output="y = where(s.h, 1, 2)"), 6, 22,
     "where() needs a bool condition, got f32"),
    ("outer of a scalar", two(output="y = outer(s.h, x.q)"), 6, 22, "outer() needs two vectors"),
    ("wrong arity of a builtin", two(output="y = exp(s.h, s.h)"), 6, 22, "exp() takes 1 argument, got 2"),
    ("axis= on an elementwise function", two(output="y = exp(s.h, axis=0)"), 6, 31,
     "exp() takes no keyword argument 'axis'"),
    # ---- dims ----
    ("undeclared dim", prog(decls="  input a: f32[K]\n  state h: f32 = 0", lift="h = sum(x.a)"), 2, 16,
     "undeclared dim 'K'"),
    ("dim without default and no value", prog(head="op t[K = 2, V]"), 1, 13,
     "dim 'V' has no default and no value was given"),
    ("zero-sized dim", prog(decls="  input a: f32[0]\n  state h: f32 = 0", lift="h = 0"), 2, 16,
     "a dimension must be at least 1"),
    # ---- externs ----
    ("extern called with a wrong shape",
     prog(decls="  input a: f32, q: f32[3]\n  state h: f32 = 0\n  extern f(f32[4]) -> f32", lift="h = f(x.q)"),
     5, 21, "argument 1 of extern f() must have shape [4], got [3]"),
    ("extern called with a wrong arity",
     prog(decls="  input a: f32\n  state h: f32 = 0\n  extern f(f32, f32) -> f32", lift="h = f(x.a)"),
     5, 17, "extern f() takes 2 argument(s), got 1"),
    ("extern called with a wrong dtype",
     prog(decls="  input a: f32, i: i32\n  state h: f32 = 0\n  extern f(f32) -> f32", lift="h = f(x.i)"),
     5, 21, "argument 1 of extern f() must be f32, got i32"),
    # ---- identifiers ----
    ("Python keyword as input name", prog(decls="  input class: f32\n  state h: f32 = 0", lift="h = 0"),
     2, 9, "'class' cannot name an input: it is a Python keyword"),
    ("Python keyword as state name", prog(decls="  input a: f32\n  state lambda: f32 = 0",
                                          lift="lambda = 0", combine="lambda = l.lambda", output="y = 1"),
     3, 9, "'lambda' cannot name a state field"),
    ("Python keyword as output name", prog(output="def = s.h"), 6, 18, "'def' cannot name an output"),
    ("dunder input name", prog(decls="  input __x: f32\n  state h: f32 = 0"), 2, 9,
     "names starting with '__' are reserved"),
    ("dunder op name", prog(head="op __t"), 1, 4, "'__t' cannot name an op"),
    ("reserved input name return_state", prog(decls="  input return_state: f32\n  state h: f32 = 0"),
     2, 9, "'return_state' cannot name an input"),
    ("reserved input name initial_state", prog(decls="  input a: f32, initial_state: f32\n  state h: f32 = 0"),
     2, 17, "'initial_state' cannot name an input"),
    # ---- duplicates ----
    ("duplicate input", prog(decls="  input a: f32\n  input a: f32\n  state h: f32 = 0"), 3, 9,
     "input 'a' is declared twice"),
    ("duplicate state field", prog(decls="  input a: f32\n  state h: f32 = 0, h: f32 = 1"), 3, 21,
     "state field 'h' is declared twice"),
    ("duplicate op", prog(extra=prog()), 8, 4, "op 't' is declared twice (first at line 1)"),
    ("duplicate dim", prog(head="op t[K = 1, K = 2]"), 1, 13, "dim 'K' is declared twice"),
    ("duplicate extern", prog(decls="  input a: f32\n  state h: f32 = 0\n  extern f(f32) -> f32\n"
                                    "  extern f(f32) -> f32"), 5, 10, "extern 'f' is declared twice"),
    ("duplicate parameter", VALID.replace("combine(l, r)", "combine(l, l)"), 5, 14,
     "parameter 'l' appears twice"),
    # ---- indices and axes ----
    ("index out of range", two(output="y = x.q[3]"), 6, 26, "index 3 is out of range for an axis of size 3"),
    ("negative index out of range", two(output="y = x.q[-4]"), 6, 26, "index -4 is out of range"),
    ("too many indices", two(output="y = x.q[0, 1]"), 6, 22, "too many indices"),
    ("empty slice", two(output="y = x.q[2:1]"), 6, 26, "slice of an axis of size 3 is empty"),
    ("non-constant index", two(output="y = x.q[s.h]"), 6, 28, "indices must be integer constants"),
    ("axis out of range (positional)", two(output="y = sum(x.q, 1)"), 6, 31,
     "axis 1 is out of range for a value of shape [3]"),
    ("axis out of range (keyword)", two(output="y = max(x.q, axis=-2)"), 6, 31,
     "axis -2 is out of range"),
    # ---- identities ----
    ("eye on a non-square field", prog(decls="  input a: f32\n  state h: f32 = 0, M: f32[2, 3] = eye",
                                       lift="h = x.a; M = 0", combine="h = l.h; M = l.M"), 3, 36,
     "`eye` needs a square matrix field, but 'M' is [2, 3]"),
    ("eye on a scalar", prog(decls="  input a: f32\n  state h: f32 = eye"), 3, 18, "`eye` needs a square"),
    ("list init of wrong length", prog(decls="  input a: f32\n  state h: f32 = 0, v: f32[3] = [1, 2]",
                                       lift="h = x.a; v = 0", combine="h = l.h; v = l.v"), 3, 33,
     "this list has 2 items but the axis has size 3"),
    ("nested list init of wrong length",
     prog(decls="  input a: f32\n  state h: f32 = 0, v: f32[2, 2] = [[1, 2], [3]]",
          lift="h = x.a; v = 0", combine="h = l.h; v = l.v"), 3, 45, "this list has 1 items"),
    ("flat list for a matrix", prog(decls="  input a: f32\n  state h: f32 = 0, v: f32[2, 2] = [1, 2]",
                                    lift="h = x.a; v = 0", combine="h = l.h; v = l.v"), 3, 37,
     "expected a list of 2 items here"),
    ("list for a scalar", prog(decls="  input a: f32\n  state h: f32 = [1]"), 3, 18, "too many nested lists"),
    ("int field with inf init", prog(decls="  input a: i32\n  state c: i32 = inf", lift="c = x.a",
                                     combine="c = l.c + r.c", output="y = s.c"), 3, 18,
     "inf is not a valid i32 value"),
    ("int field with -inf init", prog(decls="  input a: i32\n  state c: i64 = -inf", lift="c = x.a",
                                      combine="c = l.c + r.c", output="y = s.c"), 3, 18,
     "-inf is not a valid i64 value"),
    ("int field with fractional init", prog(decls="  input a: i32\n  state c: i64 = 0.5", lift="c = x.a",
                                            combine="c = l.c + r.c", output="y = s.c"), 3, 18,
     "0.5 is not a valid i64 value"),
    ("bool field with init 2", prog(decls="  input a: i32\n  state c: bool = 2", lift="c = x.a > 0",
                                    combine="c = l.c or r.c", output="y = s.c"), 3, 19, "2 is not a bool"),
    # ---- inputs, chunks, missing pieces ----
    ("bool input with a range", prog(decls="  input a: f32, c: bool in [0, 1]\n  state h: f32 = 0"), 2, 25,
     "a bool input cannot have a range"),
    ("empty range", prog(decls="  input a: f32 in [2, 1]\n  state h: f32 = 0"), 2, 16, "empty range [2, 1]"),
    ("chunked output without the chunk axis",
     prog(head="op t[C = 4]", decls="  chunk C\n  input a: f32\n  state h: f32 = 0", lift="h = sum(x.a)"),
     7, 18, "output 'y' of a chunked op must have the chunk axis first"),
    ("missing lift", "op t {\n  input a: f32\n  state h: f32 = 0\n  combine(l, r) { h = l.h }\n"
                     "  output(s, x) { y = s.h }\n}\n", 6, 1, "op 't' has no lift"),
    ("missing combine", "op t {\n  input a: f32\n  state h: f32 = 0\n  lift(x) { h = x.a }\n"
                        "  output(s, x) { y = s.h }\n}\n", 6, 1, "op 't' has no combine"),
    ("missing output", "op t {\n  input a: f32\n  state h: f32 = 0\n  lift(x) { h = x.a }\n"
                       "  combine(l, r) { h = l.h }\n}\n", 6, 1, "op 't' has no output"),
    ("missing state", "op t {\n  input a: f32\n  lift(x) { h = x.a }\n  combine(l, r) { h = l.h }\n"
                      "  output(s, x) { y = s.h }\n}\n", 1, 4, "op 't' declares no state"),
    ("missing input", "\nop  t {\n  state h: f32 = 0\n  lift(x) { h = 0 }\n  combine(l, r) { h = l.h }\n"
                      "  output(s, x) { y = s.h }\n}\n", 2, 5, "op 't' declares no inputs"),
    ("lift with two parameters", VALID.replace("lift(x)", "lift(x, y)"), 4, 9, "unexpected ','"),
    ("tab-indented unknown name", "op t {\n\tinput a: f32\n\tstate h: f32 = 0\n\tlift(x) { h = x.a }\n"
                                  "\tcombine(l, r) { h = l.h + r.h }\n\toutput(s, x) { y = s.h + qq }\n}\n",
     6, 27, "unknown name 'qq'"),
    ("CRLF line endings", prog(output="y = s.h + q").replace("\n", "\r\n"), 6, 28, "unknown name 'q'"),
]


def check_error(err: PsmError, line: int, column: int, phrase: str) -> None:
    assert err.loc is not None
    assert (err.loc.line, err.loc.column) == (line, column), err.render()
    assert phrase in err.message, err.render()
    assert err.hint, err.render()
    text = err.render()
    lines = text.splitlines()
    assert lines[0].startswith(f"{err.loc.source.path}:{line}:{column}: error: ")
    source_line = err.loc.source.line(line).expandtabs(1)
    if source_line:  # the offending line, and a caret under the column
        gutter = f"{line:>4} | "
        assert gutter + source_line in lines, text
        caret = lines[lines.index(gutter + source_line) + 1]
        assert caret.strip() == "^" and caret.index("^") == len(gutter) + column - 1, text
    assert lines[-1].startswith("hint: ")


def test_enough_distinct_bad_programs():
    assert len(CASES) >= 30
    assert len({c[1] for c in CASES}) == len(CASES)  # distinct programs
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name, source, line, column, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_program(name, source, line, column, phrase):
    with pytest.raises(PsmError) as info:
        psmc.load_ops(source, "bad.psm")
    check_error(info.value, line, column, phrase)


def test_the_valid_base_programs_compile():
    """The bad programs above are one change away from these."""
    assert psmc.load_ops(VALID)[0].name == "t"
    assert psmc.load_ops(two())[0].name == "t"


def test_caret_points_into_the_line():
    with pytest.raises(PsmError) as info:
        psmc.load_ops(two(output="y = s.h + q"), "where.psm")
    assert info.value.render() == (
        "where.psm:6:28: error: unknown name 'q'\n"
        "   6 |   output(s, x) { y = s.h + q }\n"
        "                                  ^\n"
        "hint: assigned values cannot be read back; name the value with `let` and use it twice")


def test_unknown_function_suggests_the_closest():
    with pytest.raises(PsmError) as info:
        psmc.load_ops(two(output="y = sigmod(s.h)"))
    assert "did you mean 'sigmoid'?" in info.value.hint
    with pytest.raises(PsmError) as info:
        psmc.load_ops(two(output="y = logaddexq(s.h, s.h)"))
    assert "did you mean 'logaddexp'?" in info.value.hint


def test_unknown_field_suggests_the_closest():
    with pytest.raises(PsmError) as info:
        psmc.load_ops(two(combine="h = l.hh + r.h; g = l.g * r.g"))
    assert "did you mean 'h'?" in info.value.hint


def test_keyword_hint():
    with pytest.raises(PsmError) as info:
        psmc.load_ops("op t {\n  input in: f32\n}\n")
    assert "keyword" in info.value.hint


def test_missing_separator_hint():
    with pytest.raises(PsmError) as info:
        psmc.load_ops(two(lift="g = x.a h = x.a"))
    assert "newline or ';' missing" in info.value.hint


# ---- files that are not programs at all ----

def test_binary_garbage():
    with pytest.raises(PsmError) as info:
        decode(b"\xff\xfe\x00garbage", "garbage.psm")
    err = info.value
    assert (err.loc.line, err.loc.column) == (1, 1)
    assert "not UTF-8" in err.message and err.hint
    assert err.render().startswith("garbage.psm:1:1: error: ")
    with pytest.raises(PsmError, match="not UTF-8"):  # the same through the API
        psmc.load_ops(b"\xff\xfe\x00garbage")


def test_invalid_utf8_after_some_text_points_at_the_byte():
    with pytest.raises(PsmError) as info:
        decode(b"op t {\n  input a\xff: f32\n}", "bad.psm")
    err = info.value
    assert (err.loc.line, err.loc.column) == (2, 10)
    assert "byte 0xff at offset 16" in err.message


@pytest.mark.parametrize("text", ["", "\n\n", "   \t  ", "# only\n# comments\n", ";;\n;", "# c\n\n  # c"])
def test_empty_and_comment_only_files(text):
    with pytest.raises(PsmError) as info:
        psmc.load_ops(text, "empty.psm")
    err = info.value
    assert (err.loc.line, err.loc.column) == (1, 1)
    assert err.message == "no op declarations found"
    assert err.render().startswith("empty.psm:1:1: error: no op declarations found")
    assert "hint: " in err.render()


def test_compile_file_that_does_not_exist(tmp_path):
    with pytest.raises(PsmError, match="cannot read"):
        psmc.compile_file(tmp_path / "nope.psm")


# ---- the CLI: compiler-style messages, exit status 2, never a traceback ----

def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "psmc.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_check_bad_files(tmp_path):
    bad = tmp_path / "bad.psm"
    bad.write_text(two(output="y = s.h + q"))
    garbage = tmp_path / "garbage.psm"
    garbage.write_bytes(b"\xff\xfe\x00garbage")
    empty = tmp_path / "empty.psm"
    empty.write_text("")
    for path, where in [(bad, "6:28"), (garbage, "1:1"), (empty, "1:1")]:
        r = run_cli("check", path)
        assert r.returncode == 2, r.stderr
        assert f"{path}:{where}: error:" in r.stderr
        assert "hint:" in r.stderr
        assert "Traceback" not in r.stderr + r.stdout
    r = run_cli("check", tmp_path / "missing.psm")
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


# ---- regressions ------------------------------------------------------------

@pytest.mark.parametrize("expr", [" + ".join(["s.h"] * 3000), "-" * 3000 + "s.h",
                                  "where(" + "not " * 3000 + "true, 1, 2)"],
                         ids=["3000-term sum", "3000 unary minus", "3000 nots"])
def test_deeply_nested_expression_gives_a_psm_error_not_recursion_error(expr):
    """A long sum (500 terms is enough) overflows the recursive parse-tree transformer and the
    checker: RecursionError, a Python traceback from `psmc check`. It must compile or be a PsmError."""
    try:
        psmc.load_ops(two(output=f"y = {expr}"))
    except PsmError as err:
        err.render()


def test_int_identity_out_of_range_is_a_compile_error():
    """99999999999 does not fit an i32: accepted by the checker, then a RuntimeError (overflow) at
    the first call instead of a located PsmError."""
    with pytest.raises(PsmError) as info:
        psmc.load_ops(prog(decls="  input a: i32\n  state c: i32 = 99999999999", lift="c = x.a",
                           combine="c = l.c + r.c", output="y = s.c"))
    assert (info.value.loc.line, info.value.loc.column) == (3, 18)
