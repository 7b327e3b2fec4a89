"""psmc.testing: strategies, check_laws, check_duality, and `psmc test`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

import psmc
import psmc.testing as T
from psmc.cli import main as cli_main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = {"gla": {"K": 4, "V": 3}, "mlstm": {"K": 4, "V": 3}, "softmax_attn": {"D": 5},
         "affine": {"N": 3}, "tpsm": {"C": 4, "D": 3}}


def example(name: str) -> psmc.PsmOp:
    op = psmc.compile_file(EXAMPLES / f"{name}.psm", **SMALL.get(name, {}))[name]
    if op.ir.externs:
        op.bind(**T.random_externs(op.ir, seed=0))
    return op


LINREC = example("linrec")


# ---- strategies --------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(T.reachable_states(LINREC, n=2))
def test_reachable_states_respect_declared_ranges(states):
    for s in states:
        assert set(s) == {"g", "h"} and s["g"].dtype == torch.float64
        assert 0.0 <= s["g"].item() <= 1.0  # products of gates drawn in [0, 1]


@settings(max_examples=15, deadline=None)
@given(T.sequences(example("gla"), max_T=5))
def test_sequences_have_the_declared_shapes(x):
    nb = x["q"].dim() - 2
    assert x["q"].shape[nb + 1:] == (4,) and x["v"].shape[nb + 1:] == (3,)
    assert 1 <= x["q"].shape[nb] <= 5
    assert (x["gk"] <= 0).all() and (x["gk"] >= -5).all()
    assert torch.equal(x["gk"], x["gk"].float().double())  # f32-representable values


@settings(max_examples=25, deadline=None)
@given(T.field_values("i32", (3,), -5, 5), T.field_values("f16", (8,), -1, 1))
def test_field_values_are_rounded_to_their_dtype(ints, halves):
    assert ints.dtype == torch.int64 and ints.abs().max() <= 5
    assert torch.equal(halves, halves.half().double()) and halves.abs().max() <= 1


# ---- laws ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linrec", "logcumsumexp", "nonassoc_mix", "tpsm", "s5"])
def test_check_laws_passes_on_examples(name):
    T.check_laws(example(name), max_examples=25)


def test_check_laws_raises_with_a_readable_counterexample():
    src = (EXAMPLES / "softmax_agg.psm").read_text().replace("expect nonassociative",
                                                             "expect associative")
    op = next(iter(psmc.compile_source(src, D=2).values()))
    with pytest.raises(AssertionError) as info:
        T.check_laws(op, max_examples=25)
    text = str(info.value)
    assert "associativity fails for op softmax_agg" in text
    assert "combine(combine(a, b), c)" in text and "tolerance" in text and "lift(score=" in text


def test_check_laws_catches_a_nan_identity():
    op = next(iter(psmc.compile_source("""
op lse {
  input x: f32
  state m: f32 = -inf, z: f32 = 0
  lift(x) { m = x.x; z = 1 }
  combine(l, r) { let m2 = max(l.m, r.m); m = m2; z = l.z * exp(l.m - m2) + r.z * exp(r.m - m2) }
  output(s, x) { y = s.m + log(s.z) }
}""").values()))
    with pytest.raises(AssertionError, match="identity fails.*\n(.*\n)*.*NaN"):
        T.check_laws(op, associative=False, max_examples=10)


# ---- duality ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cumsum", "linrec", "cumcount", "mlstm", "softmax_agg", "tpsm"])
def test_check_duality_passes_on_examples(name):
    T.check_duality(example(name), max_examples=8, backends=["torch"])


def test_check_duality_runs_every_available_backend():
    op = example("linrec")
    if "triton" not in T.available_backends(op):
        pytest.skip("no Triton backend here")
    T.check_duality(op, max_examples=5)


def test_check_duality_tells_brackets_apart():
    # nonassoc_mix forced to associative semantics: the torch path scans in another bracketing
    op = psmc.PsmOp(psmc.load_ops((EXAMPLES / "nonassoc_mix.psm").read_text(), D=2)[0],
                    associative=True)
    with pytest.raises(AssertionError, match="differs from the reference"):
        T.check_duality(op, max_examples=20, gradients=False, backends=["torch"])


def test_check_duality_needs_bound_externs():
    op = psmc.compile_file(EXAMPLES / "tpsm.psm", C=2, D=2)["tpsm"]
    with pytest.raises(ValueError, match="random_externs"):
        T.check_duality(op)


def test_backends_list_torch_and_triton_only_when_available():
    got = T.available_backends(LINREC)
    assert got[0] == "torch" and set(got) <= set(T.BACKENDS)


# ---- psmc test ----------------------------------------------------------------------------------

def test_cli_test_exit_codes(tmp_path, capsys):
    assert cli_main(["test", str(EXAMPLES / "cumsum.psm"), "--max-examples", "5",
                     "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "laws" in out and "duality" in out
    wrong = tmp_path / "wrong.psm"
    wrong.write_text((EXAMPLES / "nonassoc_mix.psm").read_text().replace(
        "expect nonassociative", "expect associative").replace("D = 4", "D = 2"))
    assert cli_main(["test", str(wrong), "--max-examples", "10", "--backend", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert cli_main(["test", str(tmp_path / "missing.psm")]) == 2
