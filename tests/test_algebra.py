"""The checker (psmc.algebra): verdicts of every example, counterexamples re-checked by hand, traps."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import pytest
import sympy as sp
import torch

import psmc
from psmc import symbolic
from psmc.algebra import check_op
from psmc.cli import main as cli_main
from psmc.counterexample import Harness

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# name -> (associativity status, commutative); every example's declared identity holds
# (tpsm excepted: its externs are random modules here).
EXPECTED = {
    "cumsum": ("proved", True), "cummax": ("proved", True), "cumcount": ("proved", True),
    "linrec": ("proved", False), "rotation": ("proved", False), "affine": ("proved", False),
    "gla": ("proved", False), "s5": ("proved", False),
    # need case splits on max: proved via the max/min lattice rewrite and exponent merging
    "logcumsumexp": ("proved", True), "softmax_attn": ("proved", True), "mlstm": ("proved", False),
    "nonassoc_mix": ("refuted", True), "softmax_agg": ("refuted", True),
    "tpsm": ("refuted", False),
}


@lru_cache(maxsize=None)
def verdict(name: str):
    op = psmc.compile_file(EXAMPLES / f"{name}.psm")[name]
    return check_op(op, max_examples=40, seed=0)


def compile_one(text: str, **dims) -> psmc.PsmOp:
    return next(iter(psmc.compile_source(text, **dims).values()))


# ---- every example -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_verdict(name):
    v = verdict(name)
    status, commutative = EXPECTED[name]
    assert v.laws["associative"].status == status, v.report()
    if status == "proved":
        assert v.associative is True and v.method == "proof" and v.proved
    if status == "refuted":
        assert v.associative is False and v.method == "tests"
        assert v.counterexample is not None and v.counterexample.law == "associative"
    assert v.commutative is commutative
    if name != "tpsm":
        assert v.left_identity is True and v.right_identity is True, v.report()
        errors, _ = v.expectations()
        assert errors == []
    assert set(v.tolerance) == {f.name for f in psmc.compile_file(EXAMPLES / f"{name}.psm")[name].ir.state}


def test_large_states_are_proved_at_small_dims_and_the_report_says_so():
    v = verdict("gla")
    assert v.dims == {"K": 2, "V": 2} and v.declared_dims == {"K": 64, "V": 64}
    assert any("K=2, V=2" in d and "K=64, V=64" in d for d in v.details())
    assert verdict("affine").dims == {"N": 2}  # small enough: proved at the declared dims
    assert verdict("mlstm").dims == {"K": 2, "V": 2}


def test_extern_op_is_tested_only_never_proved():
    v = verdict("tpsm")
    assert v.externs and all(r.method != "proof" and r.proof is None for r in v.laws.values())
    assert v.associative is False  # random aggregators are refuted, with a counterexample
    assert "random" in " ".join(v.notes)
    # identity failures with random weights are not errors of a non-associative extern op
    errors, warnings = v.expectations()
    assert errors == [] and warnings == []


def test_extern_associativity_is_never_assumed_from_tests():
    op = compile_one("""
op keep {
  input u: f32[2]
  state h: f32[2] = 0, n: f32 = 0
  extern f(f32[2]) -> f32[2]
  lift(x) { h = f(x.u); n = 1 }
  combine(l, r) { h = l.h + r.h; n = l.n + r.n }
  output(s, x) { y = s.h }
}""")
    v = check_op(op, max_examples=10)
    assert v.laws["associative"].status == "untested-by-proof"
    assert v.associative is None and "random weights" in v.laws["associative"].note
    assert op.associative is False  # no expect, unknown verdict: the canonical tree


# ---- refutations, re-evaluated by hand ----------------------------------------------------------

def _mix_combine(l, r):
    n = l["n"] + r["n"]
    if l["n"] == 0:
        h = list(r["h"])
    elif r["n"] == 0:
        h = list(l["h"])
    else:
        h = [math.tanh(a + b) for a, b in zip(l["h"], r["h"])]
    return {"n": n, "h": h}


def _agg_combine(l, r):
    a = 1 / (1 + math.exp(-(l["w"] - r["w"])))
    n = l["n"] + r["n"]
    w = max(l["w"], r["w"])
    if l["n"] == 0:
        h = list(r["h"])
    elif r["n"] == 0:
        h = list(l["h"])
    else:
        h = [a * x + (1 - a) * y for x, y in zip(l["h"], r["h"])]
    return {"n": n, "w": w, "h": h}


def _mix_lift(t):
    return {"n": 1.0, "h": list(t["u"])}


def _agg_lift(t):
    return {"n": 1.0, "w": t["score"], "h": list(t["v"])}


@pytest.mark.parametrize("name, lift, combine", [("nonassoc_mix", _mix_lift, _mix_combine),
                                                 ("softmax_agg", _agg_lift, _agg_combine)])
def test_refutation_is_real_by_hand(name, lift, combine):
    cx = verdict(name).counterexample
    assert cx.law == "associative" and "shrunk" in cx.found_by
    # the states are reachable: folds of the printed inputs
    for s in "abc":
        toks = cx.tokens[s]
        st = lift(toks[0])
        for t in toks[1:]:
            st = combine(st, lift(t))
        for k, v in st.items():
            assert v == pytest.approx(cx.states[s][k], rel=1e-12, abs=1e-12)
    a, b, c = (cx.states[s] for s in "abc")
    left = combine(combine(a, b), c)
    right = combine(a, combine(b, c))
    assert left["h"] == pytest.approx(cx.sides["combine(combine(a, b), c)"]["h"], rel=1e-12, abs=1e-12)
    assert right["h"] == pytest.approx(cx.sides["combine(a, combine(b, c))"]["h"], rel=1e-12, abs=1e-12)
    diff = max(abs(x - y) for x, y in zip(left["h"], right["h"]))
    assert diff > 1e-3  # a real, O(1) difference: not rounding
    assert diff == pytest.approx(cx.difference["h"], rel=1e-9)
    text = cx.text()
    for needed in ("a = lift(", "combine(combine(a, b), c)", "combine(a, combine(b, c))",
                   "difference", "tolerance"):
        assert needed in text


def test_counterexample_is_deterministic_for_a_seed():
    op = psmc.compile_file(EXAMPLES / "softmax_agg.psm")["softmax_agg"]
    v1 = check_op(op, max_examples=20, seed=3)
    v2 = check_op(op, max_examples=20, seed=3)
    assert v1.counterexample.text() == v2.counterexample.text()
    assert json.dumps(v1.counterexample.to_dict()) == json.dumps(v2.counterexample.to_dict())


# ---- traps --------------------------------------------------------------------------------------

QUATERNION = """
op quat {
  input w: f32 in [-1, 1], i: f32 in [-1, 1], j: f32 in [-1, 1], k: f32 in [-1, 1]
  state a: f32 = 1, b: f32 = 0, c: f32 = 0, d: f32 = 0
  lift(x) { a = x.w; b = x.i; c = x.j; d = x.k }
  combine(l, r) {
    a = l.a * r.a - l.b * r.b - l.c * r.c - l.d * r.d
    b = l.a * r.b + l.b * r.a + l.c * r.d - l.d * r.c
    c = l.a * r.c - l.b * r.d + l.c * r.a + l.d * r.b
    d = l.a * r.d + l.b * r.c - l.c * r.b + l.d * r.a
  }
  output(s, x) { y = s.a }
}"""

MATRIX = """
op mat2 {
  input A: f32[2, 2] in [-2, 2]
  state M: f32[2, 2] = eye
  lift(x) { M = x.A }
  combine(l, r) { M = l.M @ r.M }
  output(s, x) { y = s.M }
}"""


@pytest.mark.parametrize("src", [QUATERNION, MATRIX], ids=["quaternion", "matrix2x2"])
def test_noncommutative_associative_is_not_refuted(src):
    op = compile_one(src)
    v = check_op(op, max_examples=30)
    assert v.laws["associative"].status == "proved" and v.commutative is False
    # by tests alone (no time for a proof) it is still not refuted
    t = check_op(op, max_examples=60, time_budget=1e-3)
    assert t.laws["associative"].status == "untested-by-proof" and t.associative is True
    assert t.commutative is False and t.laws["commutative"].counterexample is not None


BIGSUM = """
op bigsum {
  input x: f64 in [-1e30, 1e30]
  state s: f64 = 0
  lift(x) { s = x.x }
  combine(l, r) { s = l.s + r.s }
  output(s, x) { y = s.s }
}"""


def test_exact_arithmetic_associativity_survives_rounding():
    op = compile_one(BIGSUM)
    h = Harness(op.ir)
    states = {"s": torch.tensor([[1e30, -1e30, 1.0]], dtype=torch.float64)}
    ev = h.evaluate("associative", states)
    left, right = ev.sides[0]["s"].item(), ev.sides[1]["s"].item()
    assert left == 1.0 and right == 0.0  # float64 rounding really differs here ...
    assert not bool(ev.fail[0])  # ... but within the tolerance relative to the field's scale
    v = check_op(op, max_examples=200, time_budget=1e-3)  # tests only: no proof to lean on
    assert v.laws["associative"].status == "untested-by-proof", v.report()
    assert "timed out" in v.laws["associative"].note


def test_only_a_right_identity_is_reported_as_such():
    op = compile_one("""
op first {
  input x: f32
  state h: f32 = 0
  lift(x) { h = x.x }
  combine(l, r) { h = l.h }
  output(s, x) { y = s.h }
}""")
    v = check_op(op, max_examples=30)
    assert v.associative is True
    assert v.right_identity is True and v.laws["right_identity"].status == "proved"
    assert v.left_identity is False
    cx = v.laws["left_identity"].counterexample
    assert cx.law == "left_identity" and "left identity fails" in cx.text()
    errors, _ = v.expectations()
    assert any("not a left identity" in e for e in errors)
    assert not any("right identity" in e for e in errors)


LSE_NO_GUARD = """
op lse {
  expect associative
  input x: f32
  state m: f32 = -inf, z: f32 = 0
  lift(x) { m = x.x; z = 1 }
  combine(l, r) {
    let m2 = max(l.m, r.m)
    m = m2
    z = l.z * exp(l.m - m2) + r.z * exp(r.m - m2)
  }
  output(s, x) { y = s.m + log(s.z) }
}"""


def test_nan_identity_is_caught(tmp_path):
    op = compile_one(LSE_NO_GUARD)
    v = check_op(op, max_examples=20)
    assert v.left_identity is False and v.right_identity is False
    cx = v.laws["left_identity"].counterexample
    assert cx.tokens["a"] == []  # e itself: combine(e, e) = (-inf, nan)
    assert math.isnan(cx.sides["combine(e, a)"]["z"]) and cx.states["a"]["m"] == -math.inf
    assert "NaN" in cx.text()
    assert json.loads(json.dumps(v.to_dict(), allow_nan=False))  # JSON-safe despite inf/nan
    f = tmp_path / "lse.psm"
    f.write_text(LSE_NO_GUARD)
    assert cli_main(["check", str(f), "--max-examples", "10"]) == 1


def test_slow_simplification_falls_back_to_tests_and_says_so():
    op = psmc.compile_file(EXAMPLES / "logcumsumexp.psm")["logcumsumexp"]
    v = check_op(op, max_examples=30, time_budget=1e-3)
    a = v.laws["associative"]
    assert a.status == "untested-by-proof" and a.method == "tests" and v.method == "tests"
    assert v.associative is True and not v.proved
    assert "timed out" in a.note and a.examples >= 30
    assert "timed out" in v.report()


# ---- the symbolic layer -------------------------------------------------------------------------

def test_lattice_rewrite_makes_stabilizers_equal():
    a, b, c, g, h = sp.symbols("a b c g h", real=True)
    lhs = sp.Max(sp.Max(a + g, b) + h, c)
    rhs = sp.Max(a + g + h, sp.Max(b + h, c))
    assert lhs != rhs and symbolic._lattice(lhs) == symbolic._lattice(rhs)
    assert symbolic.reduce_to_zero(lhs - rhs, allow_simplify=False) == "max/min lattice"
    assert symbolic.reduce_to_zero(sp.tanh(a + sp.tanh(b)) - sp.tanh(b + sp.tanh(a)), False) is None


def test_translation_expands_dims_and_guards():
    op = psmc.load_ops((EXAMPLES / "softmax_attn.psm").read_text(), D=2)[0]
    lhs, rhs = symbolic.law_sides(op, "left_identity")
    assert lhs["o"].shape == (2,) and len(symbolic.symbols(op, "a")["o"].items) == 2
    e = symbolic.identity(op)
    assert e["m"].items == (-sp.oo,) and e["z"].items == (0,)
    assert symbolic.prove_law(op, "left_identity").status == "proved"
    aff = psmc.load_ops((EXAMPLES / "affine.psm").read_text())[0]
    assert symbolic.identity(aff)["A"].items == (1, 0, 0, 1)


# ---- the op's semantics follow the verdict ------------------------------------------------------

def test_without_expect_the_verdict_picks_the_semantics():
    lin = (EXAMPLES / "linrec.psm").read_text().replace("expect associative", "")
    mix = (EXAMPLES / "nonassoc_mix.psm").read_text().replace("expect nonassociative", "")
    op = compile_one(lin)
    assert op.associative is True and op.verdict.proved
    op = compile_one(mix)
    assert op.associative is False and op.verdict.associative is False


def test_with_expect_the_checker_is_not_run():
    op = psmc.compile_file(EXAMPLES / "linrec.psm")["linrec"]
    assert op.associative is True
    assert op._verdict is None  # `expect` decided; the checker was not run


# ---- the CLI ------------------------------------------------------------------------------------

def test_cli_exit_codes_and_json(tmp_path, capsys):
    assert cli_main(["check", str(EXAMPLES / "linrec.psm"), "--max-examples", "10"]) == 0
    out = capsys.readouterr().out
    assert "associativity" in out and "proved" in out and "1 op checked" in out

    wrong = tmp_path / "wrong.psm"
    wrong.write_text((EXAMPLES / "nonassoc_mix.psm").read_text().replace(
        "expect nonassociative", "expect associative"))
    assert cli_main(["check", str(wrong), "--max-examples", "10"]) == 1
    out = capsys.readouterr().out
    assert "error:" in out and "associativity fails" in out

    slow = tmp_path / "slow.psm"
    slow.write_text((EXAMPLES / "cumsum.psm").read_text().replace(
        "expect associative", "expect nonassociative"))
    assert cli_main(["check", str(slow)]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "gives up the associative paths" in out

    assert cli_main(["check", str(EXAMPLES / "gla.psm"), "--json", "--set", "K=4",
                     "--max-examples", "5", "--seed", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    (g,) = report["ops"]
    assert report["ok"] and g["op"] == "gla" and g["declared_dims"] == {"K": 4, "V": 64}
    assert g["laws"]["associative"]["status"] == "proved" and g["dims"] == {"K": 2, "V": 2}
    assert g["seed"] == 2

    bad = tmp_path / "bad.psm"
    bad.write_text("op broken {\n  input x: f32\n  state h: f32 = 0\n  lift(x) { h = x.nope }\n"
                   "  combine(l, r) { h = l.h }\n  output(s, x) { y = s.h }\n}\n")
    assert cli_main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.psm:4" in err and "^" in err and "Traceback" not in err
    assert cli_main(["check", str(EXAMPLES / "linrec.psm"), "--op", "nope"]) == 2
    assert "no op named 'nope'" in capsys.readouterr().err
    assert cli_main(["check", str(tmp_path / "missing.psm")]) == 2
