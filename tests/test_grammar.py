"""Every construct of the .psm language parses and round-trips to the typed IR.

The IR is checked field by field (dims, expectations, chunk, inputs with types/shapes/ranges,
state identities, extern signatures, function parameters, exclusive outputs) and expression by
expression (dtype and shape of every form, compared where possible with what torch itself does
with tensors of those dtypes and shapes).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import psmc
from psmc import ir
from psmc.errors import PsmError
from psmc.typecheck import BINARY_FUNCS, CASTS, FLOAT_FUNCS, SAME_FUNCS

TORCH = {"bool": torch.bool, "i32": torch.int32, "i64": torch.int64, "f16": torch.float16,
         "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}
PSM = {v: k for k, v in TORCH.items()}


def one(text: str, **dims) -> ir.Op:
    ops = psmc.load_ops(text, **dims)
    assert len(ops) == 1
    return ops[0]


# ---- declarations -------------------------------------------------------------------------------

FULL = """\
# a file-level comment before anything
op first[K = 4, V] {   # V has no default: it must be given at compile time
  expect associative; chunk 2
  input a: f32 in [-1.5, 2], b: i64 in [-inf, inf], c: f64[K] in [-3, -1e-3]  # trailing comment
  input m: f32[K,
               V], flag: bool
  state e: f32[K, K] = eye, l: f32[2, 2] = [[1, 2.5], [-3, inf]], n: f32 = -inf, z: i32 = -4
  state p: f32 = inf, v: f32[3] = [1, 2, 3,]
  state big: f64 = 1e3, w: bf16[V] = 0.5, t: i64 = 7, u: bool = 1
  extern f(f32[K], f32) -> f32[K]
  extern g() -> f32
  lift(x) {
    e = outer(x.m[0, :, 0], x.m[1, :, 0])
    l = 0; n = 1; z = 2; p = 3
    v = 0
    big = 0; w = 0; t = 0; u = true
  }
  combine(l, r) { e = l.e; l = r.l; n = max(l.n,
      r.n); z = l.z + r.z; p = l.p; v = r.v
    big = l.big; w = l.w; t = l.t; u = l.u or r.u }
  output(s, x) exclusive {
    let t0 = s.n      # a local
    y = t0 + x.a ; w2 = x.a[:, None] * f(s.e[0], 1.0)
  }
}

op second { input u: f32; state h: f32 = 0; lift(x) { h = x.u }; combine(a, b) { h = a.h + b.h }; output(st, inp) { y = st.h } }
"""


def test_full_program_round_trips_to_ir():
    first, second = psmc.load_ops(FULL, "full.psm", V=3)
    assert first.name == "first" and second.name == "second"
    assert first.dims == (("K", 4), ("V", 3))
    assert first.expect == "associative" and second.expect is None
    assert first.chunk == 2 and second.chunk is None
    assert first.exclusive is True and second.exclusive is False

    inputs = {f.name: f for f in first.inputs}
    assert list(inputs) == ["a", "b", "c", "m", "flag"]
    assert inputs["a"].type == ir.Type("f32") and inputs["a"].range == (-1.5, 2)
    assert inputs["b"].type == ir.Type("i64") and inputs["b"].range == (-math.inf, math.inf)
    assert inputs["c"].type == ir.Type("f64", (4,)) and inputs["c"].range == (-3, -1e-3)
    assert inputs["m"].type == ir.Type("f32", (4, 3)) and inputs["m"].range is None
    assert inputs["flag"].type == ir.Type("bool")

    state = {f.name: f for f in first.state}
    assert list(state) == ["e", "l", "n", "z", "p", "v", "big", "w", "t", "u"]
    assert state["e"].type == ir.Type("f32", (4, 4)) and state["e"].init == "eye"
    assert state["l"].init == ((1, 2.5), (-3, math.inf))
    assert state["n"].init == -math.inf
    assert state["z"].type.dtype == "i32" and state["z"].init == -4
    assert state["p"].init == math.inf
    assert state["v"].init == (1, 2, 3)
    assert state["big"].type.dtype == "f64" and state["big"].init == 1000.0
    assert state["w"].type == ir.Type("bf16", (3,)) and state["w"].init == 0.5
    assert state["t"].init == 7 and state["u"].init == 1

    f, g = first.externs
    assert (f.name, f.args, f.result) == ("f", (ir.Type("f32", (4,)), ir.Type("f32")), ir.Type("f32", (4,)))
    assert (g.name, g.args, g.result) == ("g", (), ir.Type("f32"))

    assert first.lift.params == ("x",) and first.combine.params == ("l", "r")
    assert first.output.params == ("s", "x")
    assert second.combine.params == ("a", "b") and second.output.params == ("st", "inp")
    assert [a.name for a in first.lift.assigns] == ["e", "l", "n", "z", "p", "v", "big", "w", "t", "u"]
    let = first.output.body[0]
    assert isinstance(let, ir.Let) and let.name == "t0"
    # chunked: lift and output see inputs with the chunk axis in front
    outs = {o.name: o.type for o in first.outputs}
    assert outs == {"y": ir.Type("f32", (2,)), "w2": ir.Type("f32", (2, 4))}
    assert first.loc.line == 2 and second.loc.line == 27
    assert first.source.path == "full.psm"


def test_dims_are_bound_at_compile_time():
    text = """op t[K = 4, V = 3] {
      input q: f32[K], k: f32[K], v: f32[V]
      state S: f32[K, V] = 0
      lift(x) { S = outer(x.k, x.v) }
      combine(l, r) { S = l.S + r.S }
      output(s, x) { o = x.q @ s.S; n = K * V + 0 * sum(x.q) }
    }"""
    op = one(text)
    assert op.dims == (("K", 4), ("V", 3))
    assert op.outputs[0].type == ir.Type("f32", (3,))
    op = one(text, K=7, V=2)
    assert op.dims == (("K", 7), ("V", 2))
    assert op.input("q").type.shape == (7,) and op.field("S").type.shape == (7, 2)
    assert op.outputs[0].type == ir.Type("f32", (2,))
    op = one(text, V=5)
    assert op.dims == (("K", 4), ("V", 5))
    # the same through compile_source: the module's spec carries the bound shapes
    m = psmc.compile_source(text, K=2)["t"]
    assert m.spec.inputs[0].shape == (2,)
    x = {"q": torch.randn(3, 2), "k": torch.randn(3, 2), "v": torch.randn(3, 3)}
    o, n = m(**x)
    assert o.shape == (3, 3) and torch.all(n == 6)


def test_dim_without_default_takes_the_given_value():
    text = ("op t[D] { input u: f32[D]; state h: f32[D] = 0; lift(x) { h = x.u }\n"
            "combine(l, r) { h = l.h + r.h }; output(s, x) { y = s.h } }")
    assert one(text, D=5).input("u").type.shape == (5,)


def test_unknown_dim_override_is_an_error():
    with pytest.raises(PsmError, match="declares a dim 'Q'"):
        psmc.load_ops(FULL, V=3, Q=2)


def test_chunk_with_integer_and_dim():
    body = ("  input a: f32[2]\n  state h: f32[2] = 0\n  lift(x) {{ h = sum(x.a, 0) }}\n"
            "  combine(l, r) {{ h = l.h + r.h }}\n  output(s, x) {{ y = x.a * s.h }}\n}}")
    op = one(("op t {{\n  chunk 3\n" + body).format())
    assert op.chunk == 3 and op.tokens_per_element == 3
    assert op.outputs[0].type == ir.Type("f32", (3, 2))
    op = one(("op t[C = 5] {{\n  chunk C\n" + body).format(), C=4)
    assert op.chunk == 4 and op.lifted_input_type(op.input("a")) == ir.Type("f32", (4, 2))


@pytest.mark.parametrize("word", ["associative", "nonassociative"])
def test_expect(word):
    op = one(f"op t {{ expect {word}; input a: f32; state h: f32 = 0; lift(x) {{ h = x.a }}\n"
             "combine(l, r) { h = l.h + r.h }; output(s, x) { y = s.h } }")
    assert op.expect == word


def test_every_input_type():
    types = ["f16", "bf16", "f32", "f64", "i32", "i64", "bool"]
    decl = ", ".join(f"v{i}: {t}[2, 1]" for i, t in enumerate(types))
    op = one(f"op t {{ input {decl}; state h: f32 = 0; lift(x) {{ h = 0 }}\n"
             "combine(l, r) { h = l.h }; output(s, x) { y = s.h } }")
    assert [f.type for f in op.inputs] == [ir.Type(t, (2, 1)) for t in types]


def test_ranges_with_negative_numbers_floats_and_inf():
    op = one("op t { input a: f32 in [-inf, 0], b: f32 in [-2.5e1, 3], c: i32 in [-7, -7]\n"
             "input d: f64 in [.5, inf], e: f32 in [1e-3, 2.] ; state h: f32 = 0\n"
             "lift(x) { h = x.a } ; combine(l, r) { h = l.h } ; output(s, x) { y = s.h } }")
    ranges = [f.range for f in op.inputs]
    assert ranges == [(-math.inf, 0), (-25.0, 3), (-7, -7), (0.5, math.inf), (1e-3, 2.0)]


def test_state_initializers():
    op = one("""op t[N = 3] {
      expect associative
      input a: f32
      state I: f32[N, N] = eye, J: f64[1, 1] = eye, m: f32 = -inf, p: f32 = inf
      state k: i64 = -3, z: f32 = 0, f: f32 = 2.5e-1, neg: f32 = -0.5
      state v: f32[N] = [1, -2, inf], M: f32[2, N] = [[1, 2, 3],
                                                      [-inf, 0, 1.5],]
      state T3: f32[2, 1, 2] = [[[1, 2]], [[3, 4]]], b: bool = 0, c: i32[2] = [1, -1]
      lift(x) { I = 0; J = 0; m = 0; p = 0; k = 0; z = 0; f = 0; neg = 0; v = 0; M = 0; T3 = 0; b = false; c = 0 }
      combine(l, r) { I = l.I; J = l.J; m = l.m; p = l.p; k = l.k; z = l.z; f = l.f; neg = l.neg
                      v = l.v; M = l.M; T3 = l.T3; b = l.b; c = l.c }
      output(s, x) { y = s.z }
    }""")
    inits = {f.name: f.init for f in op.state}
    assert inits == {
        "I": "eye", "J": "eye", "m": -math.inf, "p": math.inf, "k": -3, "z": 0, "f": 0.25,
        "neg": -0.5, "v": (1, -2, math.inf), "M": ((1, 2, 3), (-math.inf, 0, 1.5)),
        "T3": (((1, 2),), ((3, 4),)), "b": 0, "c": (1, -1),
    }
    # and the identity the runtime builds from them
    e = psmc.compile_source(op.source.text)["t"].init_state(()).prefix
    assert torch.equal(e["I"], torch.eye(3)) and e["J"].dtype == torch.float64
    assert torch.equal(e["M"], torch.tensor([[1, 2, 3], [-math.inf, 0, 1.5]]))
    assert e["k"].dtype == torch.int64 and e["k"].item() == -3
    assert e["c"].dtype == torch.int32 and e["b"].dtype == torch.bool


def test_externs_with_every_arity():
    op = one("""op t[D = 3] {
      expect nonassociative
      input u: f32[D]
      state h: f32[D] = 0
      extern zero() -> f32
      extern one(f32[D]) -> f32[D]
      extern two(f32[D], f32) -> f32[D]
      extern three(f32[D], f32[D], f32[D, D]) -> f32[D, D]
      lift(x) { h = one(x.u) * zero() }
      combine(l, r) { h = two(l.h, 1.0) + sum(three(l.h, r.h, outer(l.h, r.h)), 0) }
      output(s, x) { y = s.h }
    }""")
    sigs = {e.name: (e.args, e.result) for e in op.externs}
    D = ir.Type("f32", (3,))
    assert sigs == {"zero": ((), ir.Type("f32")), "one": ((D,), D), "two": ((D, ir.Type("f32")), D),
                    "three": ((D, D, ir.Type("f32", (3, 3))), ir.Type("f32", (3, 3)))}
    call = op.lift.assigns[0].value
    assert isinstance(call, ir.Binary) and isinstance(call.lhs, ir.ExternCall) and call.lhs.name == "one"


def test_separators_comments_and_wrapped_lines():
    texts = [
        # one line, ';' everywhere, several ops without a separator between them
        "op t { input a: f32, b: f32; state h: f32 = 0; lift(x) { h = x.a }; "
        "combine(l, r) { h = l.h + r.h }; output(s, x) { y = s.h } } op u { input a: f32, b: f32; "
        "state h: f32 = 0; lift(x) { h = x.a }; combine(l, r) { h = l.h + r.h }; output(s, x) { y = s.h } }",
        # newlines, blank lines, runs of separators, separators next to braces, comments
        "\n\n# c\nop t {   # c\n\n  input a: f32, b: f32 ;; \n\n  state h: f32 = 0\n"
        "  lift(x) { ; h = x.a ;\n }\n  combine(l, r) {\n\n    h = l.h + r.h  # c\n\n  }\n"
        "  # a comment line between items\n  output(s, x) { y = s.h }\n} ;\n\n"
        "op u { input a: f32, b: f32\n state h: f32 = 0\n lift(x) { h = x.a }\n"
        " combine(l, r) { h = l.h + r.h }\n output(s, x) { y = s.h } }\n# trailing comment",
        # wrapped inside () and [] (with comments inside), backslash continuation, CRLF
        "op t[K =\n 1] {\r\n  input a: f32[\r\n K], b: f32[K\n]\r\n  state h: f32 = 0\r\n"
        "  lift(x) { h = (x.a[0] +  # first\r\n   x.b[\n0]) }\r\n"
        "  combine(l, r) { h = l.h + \\\n r.h }\r\n  output(s, x) { y = max(s.h,\n\n 0) }\r\n}\r\n"
        "op u { input a: f32, b: f32\n state h: f32 = 0\n lift(x) { h = x.a }\n"
        " combine(l, r) { h = l.h + r.h }\n output(s, x) { y = s.h } }",
    ]
    for text in texts:
        t, u = psmc.load_ops(text)
        assert (t.name, u.name) == ("t", "u")
        assert len(t.combine.body) == 1 and t.combine.body[0].name == "h"
        assert t.outputs[0].name == "y"


def test_keywords_only_reserved_where_they_are_keywords():
    # `inf`, `eye`, `exclusive`, function names and dtype names are ordinary names elsewhere
    op = one("op t { input exp: f32, eye: f32, exclusive: f32; state f32: f32 = 0\n"
             "lift(x) { f32 = x.exp + x.eye + x.exclusive }; combine(l, r) { f32 = l.f32 }\n"
             "output(s, x) { let e = exp(s.f32); inf2 = e } }")
    assert [f.name for f in op.inputs] == ["exp", "eye", "exclusive"]
    assert op.outputs[0].name == "inf2"


# ---- expressions: types and shapes ---------------------------------------------------------------

TEMPLATE = """op t[K = 4, V = 3] {
  input a: f32, b: f32, q: f32[K], k: f32[K], w: f32[V], M: f32[K, V], N: f32[V, K]
  input B: f32[2, K, V], i: i32, j: i64, c: bool, h: f16, bh: bf16, d: f64, hv: f16[K], iv: i32[K]
  state S: f32[K, V] = 0, v: f32[K] = 0, n: i64 = 0
  lift(x) { S = x.M; v = x.q; n = 1 }
  combine(l, r) { S = l.S + r.S; v = l.v + r.v; n = l.n + r.n }
  output(s, x) { y = %s }
}
"""


def out(expr: str, **dims) -> ir.Assign:
    op = one(TEMPLATE % expr, **dims)
    return op.output.assigns[0]


def ty(expr: str, **dims) -> ir.Type:
    """dtype and shape of `y = expr` (weakness, i.e. literal-ness, is checked separately)."""
    t = out(expr, **dims).value.type
    return ir.Type(t.dtype, t.shape)


@pytest.mark.parametrize("expr, dtype, shape", [
    # literals, constants, dims
    ("1", "i64", ()), ("2.5", "f32", ()), ("1e3", "f32", ()), (".5", "f32", ()), ("3.", "f32", ()),
    ("inf", "f32", ()), ("-inf", "f32", ()), ("pi", "f32", ()), ("true", "bool", ()),
    ("false", "bool", ()), ("K", "i64", ()), ("K * V", "i64", ()), ("K / V", "f32", ()),
    ("x.a * K", "f32", ()), ("x.q * V", "f32", (4,)),
    # field access
    ("x.a", "f32", ()), ("x.q", "f32", (4,)), ("s.S", "f32", (4, 3)), ("s.n", "i64", ()),
    ("x.B", "f32", (2, 4, 3)),
    # arithmetic and power
    ("x.a + x.b", "f32", ()), ("x.a - x.b * x.a / x.b", "f32", ()), ("x.a ** 2", "f32", ()),
    ("x.i ** 2", "i32", ()), ("2 ** x.a", "f32", ()), ("x.a ** x.b ** 2", "f32", ()),
    ("-x.a", "f32", ()), ("+x.a", "f32", ()), ("-x.i", "i32", ()), ("--x.q", "f32", (4,)),
    ("-2 ** 2", "i64", ()),
    # comparisons and logic
    ("x.a > 1", "bool", ()), ("x.i == x.j", "bool", ()), ("x.q != 0", "bool", (4,)),
    ("x.a <= x.b", "bool", ()), ("x.a >= x.b", "bool", ()), ("x.a < x.b", "bool", ()),
    ("x.c and x.a > 0", "bool", ()), ("x.c or not x.c", "bool", ()), ("not x.q > 0", "bool", (4,)),
    ("x.a > 0 and x.b > 0 or x.c", "bool", ()),
    # where
    ("where(x.c, x.a, x.b)", "f32", ()), ("where(x.q > 0, x.q, 0)", "f32", (4,)),
    ("where(x.c, 1, 2)", "i64", ()), ("where(x.c, x.i, 2.0)", "f32", ()),
    ("where(x.q[:, None] > 0, x.M[:, 0, None], x.w[None, :] * x.q[:, None])", "f32", (4, 3)),
    # indexing and slicing, None for new axes
    ("x.q[0]", "f32", ()), ("x.q[-1]", "f32", ()), ("x.q[1:3]", "f32", (2,)), ("x.q[:2]", "f32", (2,)),
    ("x.q[2:]", "f32", (2,)), ("x.q[:]", "f32", (4,)), ("x.q[-3:-1]", "f32", (2,)),
    ("x.q[None]", "f32", (1, 4)), ("x.q[:, None]", "f32", (4, 1)), ("x.q[None, :, None]", "f32", (1, 4, 1)),
    ("x.M[0]", "f32", (3,)), ("x.M[:, 1]", "f32", (4,)), ("x.M[-1, 2]", "f32", ()),
    ("x.M[:2, 1:]", "f32", (2, 2)), ("x.M[None, 1]", "f32", (1, 3)), ("x.M[:, None, :]", "f32", (4, 1, 3)),
    ("x.B[1][2]", "f32", (3,)), ("s.S[1:3][0]", "f32", (3,)), ("x.q[V]", "f32", ()),
    ("x.q[1:V]", "f32", (2,)), ("x.M[-K]", "f32", (3,)),
    # matmul in every shape case
    ("x.q @ x.k", "f32", ()), ("x.q @ s.S", "f32", (3,)), ("x.M @ x.w", "f32", (4,)),
    ("x.M @ x.N", "f32", (4, 4)), ("x.N @ x.M", "f32", (3, 3)), ("x.B @ x.N", "f32", (2, 4, 4)),
    ("x.N @ x.B", "f32", (2, 3, 3)), ("x.q @ x.B", "f32", (2, 3)), ("x.B @ x.w", "f32", (2, 4)),
    ("x.hv @ x.M", "f32", (3,)), ("x.iv @ x.iv", "i32", ()),
    # outer
    ("outer(x.q, x.w)", "f32", (4, 3)), ("outer(x.w, x.q)", "f32", (3, 4)), ("outer(x.iv, x.iv)", "i32", (4, 4)),
    # reductions: positional axis for sum, axis= for all, negative axes, no axis
    ("sum(x.M)", "f32", ()), ("sum(x.M, 0)", "f32", (3,)), ("sum(x.M, 1)", "f32", (4,)),
    ("sum(x.M, -1)", "f32", (4,)), ("sum(x.M, axis=0)", "f32", (3,)), ("sum(x.B, axis=-2)", "f32", (2, 3)),
    ("max(x.M, axis=0)", "f32", (3,)), ("min(x.M, axis=-1)", "f32", (4,)), ("max(x.M)", "f32", ()),
    ("min(x.q)", "f32", ()), ("sum(x.iv)", "i64", ()), ("max(x.iv, axis=0)", "i32", ()),
    ("sum(x.q, axis=0)", "f32", ()), ("sum(x.M, axis=-2)", "f32", (3,)),
    # two-argument max/min are elementwise (only sum takes a positional axis)
    ("max(x.M, 0)", "f32", (4, 3)), ("min(x.q, x.M[:, 0])", "f32", (4,)),
    # casts
    ("f64(x.a)", "f64", ()), ("i32(x.q)", "i32", (4,)), ("bool(x.a)", "bool", ()),
    ("f16(x.M)", "f16", (4, 3)), ("bf16(x.i)", "bf16", ()), ("i64(x.c)", "i64", ()), ("f32(x.c)", "f32", ()),
    # nested forms
    ("sum(where(x.q > 0, exp(x.q), 0) * s.v) / max(abs(sum(x.q * s.v)), exp(-x.a))", "f32", ()),
    ("(x.q @ s.S) / max(abs(sum(x.q * s.v)), 1)", "f32", (3,)),
])
def test_expression_types(expr, dtype, shape):
    assert ty(expr) == ir.Type(dtype, shape)


def test_matmul_shape_from_the_brief():
    assert ty("x.q @ s.S", K=4, V=3).shape == (3,)
    assert ty("x.q @ s.S", K=2, V=5).shape == (5,)


@pytest.mark.parametrize("left, right", [
    ("x.q", "x.k"), ("x.q", "s.S"), ("x.M", "x.w"), ("x.M", "x.N"), ("x.B", "x.N"), ("x.N", "x.B"),
    ("x.q", "x.B"), ("x.B", "x.w"),
])
def test_matmul_shapes_agree_with_torch(left, right):
    shapes = {"x.q": (4,), "x.k": (4,), "s.S": (4, 3), "x.M": (4, 3), "x.w": (3,), "x.N": (3, 4),
              "x.B": (2, 4, 3)}
    want = torch.matmul(torch.ones(shapes[left]), torch.ones(shapes[right])).shape
    assert ty(f"{left} @ {right}").shape == tuple(want)


def test_ir_nodes():
    e = out("x.q @ s.S").value
    assert isinstance(e, ir.Binary) and e.op == "@"
    assert isinstance(e.lhs, ir.FieldRef) and (e.lhs.role, e.lhs.name) == ("x", "q")
    assert isinstance(e.rhs, ir.FieldRef) and (e.rhs.role, e.rhs.name) == ("s", "S")
    e = out("sum(x.M, axis=-1)").value
    assert isinstance(e, ir.Reduce) and (e.op, e.axis) == ("sum", 1)
    e = out("max(x.M)").value
    assert isinstance(e, ir.Reduce) and e.axis is None
    e = out("max(x.M, 0)").value
    assert isinstance(e, ir.Call) and e.func == "max"
    e = out("x.M[:, None, 1:]").value
    assert isinstance(e, ir.Index)
    assert e.items == (ir.IndexItem("slice", 0, 4), ir.IndexItem("newaxis"), ir.IndexItem("slice", 1, 3))
    e = out("x.q[-1]").value
    assert e.items == (ir.IndexItem("int", 3),)
    e = out("-x.a").value
    assert isinstance(e, ir.Unary) and e.op == "neg"
    e = out("not x.c").value
    assert isinstance(e, ir.Unary) and e.op == "not"
    e = out("-2").value
    assert isinstance(e, ir.Const) and e.value == -2
    e = out("pi").value
    assert isinstance(e, ir.Const) and e.value == math.pi
    e = out("inf").value
    assert e.value == math.inf
    e = out("true").value
    assert e.value is True and e.type.dtype == "bool"
    e = out("K").value
    assert isinstance(e, ir.Const) and e.value == 4 and e.type.weak
    e = out("where(x.c, x.a, 0)").value
    assert isinstance(e, ir.Call) and e.func == "where" and len(e.args) == 3
    e = out("i32(x.a)").value
    assert isinstance(e, ir.Call) and e.func == "i32"
    e = out("outer(x.q, x.w)").value
    assert isinstance(e, ir.Call) and e.func == "outer"
    # precedence: * binds tighter than +, ** tighter than unary -, comparisons tighter than and/or
    e = out("x.a + x.b * x.a").value
    assert e.op == "+" and e.rhs.op == "*"
    e = out("-x.a ** 2").value
    assert isinstance(e, ir.Unary) and e.arg.op == "**"
    e = out("x.a ** x.b ** 2").value  # right-associative
    assert e.op == "**" and isinstance(e.rhs, ir.Binary) and e.rhs.op == "**"
    e = out("x.a - x.b - x.a").value  # left-associative
    assert e.op == "-" and isinstance(e.lhs, ir.Binary)
    e = out("x.c or x.a > 0 and not x.c").value
    assert e.op == "or" and e.rhs.op == "and" and e.rhs.lhs.op == ">"
    # let: a local, read back as LocalRef
    op = one(TEMPLATE % "s.n + 1; let z2 = s.n; y2 = z2 * 2")
    let = op.output.body[1]
    assert isinstance(let, ir.Let) and let.name == "z2"
    y2 = op.output.assigns[1].value
    assert isinstance(y2.lhs, ir.LocalRef) and y2.lhs.type == ir.Type("i64")


def test_walk_visits_every_node():
    e = out("where(x.c, exp(x.a), -x.b) + sum(x.q)").value
    kinds = [type(n).__name__ for n in ir.walk(e)]
    assert kinds == ["Binary", "Call", "FieldRef", "Call", "FieldRef", "Unary", "FieldRef", "Reduce", "FieldRef"]


# ---- elementwise functions ----------------------------------------------------------------------

TORCH_FUNCS = {
    "exp": torch.exp, "log": torch.log, "log1p": torch.log1p, "expm1": torch.expm1,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "softplus": F.softplus, "sin": torch.sin, "cos": torch.cos, "silu": F.silu,
    "logsigmoid": F.logsigmoid, "abs": torch.abs, "relu": torch.relu,
    "max": torch.maximum, "min": torch.minimum, "logaddexp": torch.logaddexp,
}


def test_every_function_has_a_torch_twin_here():
    assert set(FLOAT_FUNCS + SAME_FUNCS + BINARY_FUNCS) <= set(TORCH_FUNCS)


@pytest.mark.parametrize("name", FLOAT_FUNCS)
def test_float_functions(name):
    assert ty(f"{name}(x.a)") == ir.Type("f32")
    assert ty(f"{name}(x.q)") == ir.Type("f32", (4,))
    assert ty(f"{name}(x.h)") == ir.Type("f16")  # keeps a float dtype
    assert ty(f"{name}(x.d)") == ir.Type("f64")
    assert ty(f"{name}(x.i)") == ir.Type("f32")  # ints promote to f32, as in torch
    assert ty(f"{name}(x.iv)") == ir.Type("f32", (4,))


@pytest.mark.parametrize("name", SAME_FUNCS)
def test_same_dtype_functions(name):
    for field, t in [("x.a", "f32"), ("x.i", "i32"), ("x.j", "i64"), ("x.h", "f16"), ("x.d", "f64")]:
        assert ty(f"{name}({field})") == ir.Type(t)
    assert ty(f"{name}(x.M)") == ir.Type("f32", (4, 3))


@pytest.mark.parametrize("name", BINARY_FUNCS)
def test_binary_functions(name):
    assert ty(f"{name}(x.a, x.b)") == ir.Type("f32")
    assert ty(f"{name}(x.q, x.M[:, 0])") == ir.Type("f32", (4,))
    assert ty(f"{name}(x.q[:, None], x.w)") == ir.Type("f32", (4, 3))
    assert ty(f"{name}(x.h, 1)") == ir.Type("f16")
    assert ty(f"{name}(x.d, x.a)") == ir.Type("f64")
    want_int = "f32" if name == "logaddexp" else "i32"
    assert ty(f"{name}(x.i, 2)") == ir.Type(want_int)


@pytest.mark.parametrize("name", FLOAT_FUNCS + SAME_FUNCS + BINARY_FUNCS)
def test_functions_compute_what_torch_computes(name):
    """Both paths (generated torch code and the IR interpreter) agree with torch itself."""
    call = f"{name}(x.a)" if name not in BINARY_FUNCS else f"{name}(x.a, x.b)"
    src = ("op t { expect associative; input a: f64 in [0.1, 2], b: f64; state h: f64 = 0\n"
           "lift(x) { h = x.a }; combine(l, r) { h = l.h + r.h }\n"
           f"output(s, x) {{ y = {call} }} }}")
    op = psmc.compile_source(src)["t"]
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 5, generator=g, dtype=torch.float64) * 1.9 + 0.1
    b = torch.randn(2, 5, generator=g, dtype=torch.float64)
    want = TORCH_FUNCS[name](a, b) if name in BINARY_FUNCS else TORCH_FUNCS[name](a)
    for backend in ("torch", "reference"):
        got = op(a=a, b=b, backend=backend)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cast", CASTS)
def test_casts(cast):
    assert ty(f"{cast}(x.a)") == ir.Type(cast)
    assert ty(f"{cast}(x.M)") == ir.Type(cast, (4, 3))
    assert ty(f"{cast}(1)") == ir.Type(cast)


# ---- torch's broadcasting and dtype promotion ---------------------------------------------------

NUMERIC = ["i32", "i64", "f16", "bf16", "f32", "f64"]
FIELD_OF = {"i32": "x.i", "i64": "x.j", "f16": "x.h", "bf16": "x.bh", "f32": "x.a", "f64": "x.d"}


@pytest.mark.parametrize("lhs", NUMERIC)
@pytest.mark.parametrize("rhs", NUMERIC)
def test_promotion_matches_torch(lhs, rhs):
    a, b = torch.ones(2, dtype=TORCH[lhs]), torch.ones(2, dtype=TORCH[rhs])
    fa, fb = FIELD_OF[lhs], FIELD_OF[rhs]
    for op in ("+", "-", "*"):
        assert ty(f"{fa} {op} {fb}").dtype == PSM[(a * b).dtype], op
    assert ty(f"{fa} / {fb}").dtype == PSM[(a / b).dtype]  # int / int is float
    assert ty(f"max({fa}, {fb})").dtype == PSM[torch.maximum(a, b).dtype]
    assert ty(f"where(x.c, {fa}, {fb})").dtype == PSM[torch.where(a > 0, a, b).dtype]
    for cmp in ("==", "!=", "<", "<=", ">", ">="):
        assert ty(f"{fa} {cmp} {fb}").dtype == "bool"


@pytest.mark.parametrize("dtype", NUMERIC)
@pytest.mark.parametrize("literal", ["2", "2.5", "K", "pi", "-1", "1e3"])
def test_weak_literals_keep_the_tensor_dtype(dtype, literal):
    t = torch.ones(2, dtype=TORCH[dtype])
    value = {"2": 2, "2.5": 2.5, "K": 4, "pi": math.pi, "-1": -1, "1e3": 1e3}[literal]
    f = FIELD_OF[dtype]
    assert ty(f"{f} * {literal}").dtype == PSM[(t * value).dtype]
    assert ty(f"{literal} + {f}").dtype == PSM[(value + t).dtype]
    assert ty(f"{f} / {literal}").dtype == PSM[(t / value).dtype]
    assert ty(f"{f} < {literal}").dtype == "bool"


def test_literal_only_arithmetic():
    assert ty("1 + 2") == ir.Type("i64")
    assert ty("1 + 2.0") == ir.Type("f32")
    assert ty("7 / 2") == ir.Type("f32")
    assert ty("K * 2 + 1") == ir.Type("i64")


@pytest.mark.parametrize("lhs, rhs", [
    ("x.q", "x.k"), ("x.M", "x.w"), ("x.M", "x.q[:, None]"), ("x.q[:, None]", "x.w"),
    ("x.q[None]", "x.q[:, None]"), ("x.B", "x.M"), ("x.B", "x.w"), ("x.B", "x.M[None]"),
    ("x.B", "x.q[:, None]"), ("x.a", "x.B"), ("x.M[:, :1]", "x.w"), ("x.M[:1]", "x.M"),
])
def test_broadcasting_matches_torch(lhs, rhs):
    shapes = {"x.q": (4,), "x.k": (4,), "x.M": (4, 3), "x.w": (3,), "x.B": (2, 4, 3), "x.a": ()}

    def shape_of(e):
        base = e.split("[")[0]
        t = torch.ones(shapes[base])
        if "[" in e:
            t = eval("t" + e[len(base):])  # noqa: S307  (the index expressions above)
        return t.shape

    want = torch.broadcast_shapes(shape_of(lhs), shape_of(rhs))
    assert ty(f"{lhs} + {rhs}").shape == tuple(want)
    assert ty(f"{lhs} > {rhs}") == ir.Type("bool", tuple(want))


@pytest.mark.parametrize("lhs, rhs", [("x.M", "x.q"), ("x.q", "x.w"), ("x.B", "x.N")])
def test_incompatible_shapes_are_rejected(lhs, rhs):
    with pytest.raises(PsmError, match="do not broadcast"):
        ty(f"{lhs} * {rhs}")


def test_runtime_dtypes_follow_the_ir():
    """Outputs come back in the dtypes the IR promises (floats in the inputs' float dtype)."""
    src = """op t {
      expect associative
      input a: f32, i: i32, j: i64, c: bool
      state h: f32 = 0
      lift(x) { h = x.a }
      combine(l, r) { h = l.h + r.h }
      output(s, x) { p = x.i / x.i; q = x.i * 2; r = x.j + x.i; cmp = x.a > 0; d = f64(x.a); sh = s.h * 2 }
    }"""
    op = psmc.compile_source(src)["t"]
    want = {o.name: TORCH[o.type.dtype] for o in op.ir.outputs}
    assert want == {"p": torch.float32, "q": torch.int32, "r": torch.int64, "cmp": torch.bool,
                    "d": torch.float64, "sh": torch.float32}
    x = {"a": torch.randn(2, 4), "i": torch.arange(1, 9, dtype=torch.int32).view(2, 4),
         "j": torch.ones(2, 4, dtype=torch.int64), "c": torch.ones(2, 4, dtype=torch.bool)}
    for backend in ("torch", "reference"):
        ys = op(**x, backend=backend)
        assert [y.dtype for y in ys] == list(want.values())
        assert torch.equal(ys[0], torch.ones(2, 4))
        assert torch.equal(ys[2], x["j"] + x["i"])


# ---- regressions: arithmetic on dims in an index ------------------------------

@pytest.mark.parametrize("expr, shape", [("x.q[K - 1]", ()), ("x.M[:, V - 1]", (4,)),
                                         ("x.q[1:K - 1]", (2,)), ("sum(x.M, axis=2 - 1)", (4,))])
def test_index_with_dim_arithmetic_is_a_static_index(expr, shape):
    """The checker's own hint ("use a literal or a dim, e.g. x[0] or x[K - 1]") suggests this, but
    `K - 1` is a Binary of two constants, not folded, so `_static_int` rejects it."""
    assert ty(expr) == ir.Type("f32", shape)
