"""The Python API of DESIGN.md section 5: call-time validation (errors name the field), streaming
state (return_state / initial_state / init_state / step), dtypes, T = 1 and batch shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import psmc
from psmc import PsmCallError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import as_tuple, example_op, random_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def tpsm_op(C=4, D=3):
    """tpsm with small deterministic externs on (N, C, D) rows; agg is not associative."""
    op = example_op("tpsm", C=C, D=D)
    return op.bind(enc=lambda u: torch.tanh(u), agg=lambda a, b: torch.tanh(a + 0.5 * b),
                   inf=lambda h, u: h + u)


def get(name):
    return tpsm_op() if name == "tpsm" else example_op(name)


def token_shape(op, f):
    """Per-token shape of an output: a chunked op's output type has the chunk axis in front."""
    return f.type.shape[1:] if op.ir.chunk else f.type.shape


def per_token(x, nb, t):
    """Token t of every input shaped (*batch, T, *field) with nb batch dims."""
    return {k: v.select(nb, t) for k, v in x.items()}


def time_slice(x, nb, a, b):
    return {k: v.narrow(nb, a, b - a) for k, v in x.items()}


def cat(parts, nb):
    return tuple(torch.cat(ps, dim=nb) for ps in zip(*[as_tuple(p) for p in parts]))


def close(got, want, tol=1e-10):
    for g, w in zip(as_tuple(got), as_tuple(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


# ---- validation: every error names what is wrong --------------------------------------------------

def expect_call_error(fn, *phrases):
    with pytest.raises(PsmCallError) as info:
        fn()
    for p in phrases:
        assert p in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


def test_missing_input():
    lin = get("linrec")
    expect_call_error(lambda: lin(a=torch.rand(2, 5)), "missing input 'b'", "(*batch, T)", "f32")
    expect_call_error(lambda: lin.step(lin.init_state((2,)), a=torch.rand(2)), "missing input 'b'")


def test_unexpected_input():
    lin = get("linrec")
    expect_call_error(lambda: lin(a=torch.rand(5), b=torch.rand(5), c=torch.rand(5)),
                      "unexpected input 'c'", "inputs are a, b")


def test_wrong_trailing_shape():
    sm = get("softmax_attn")  # v: f32[5]
    expect_call_error(lambda: sm(score=torch.rand(2, 7), v=torch.rand(2, 7, 4)),
                      "input 'v' has shape (2, 7, 4)", "(*batch, T, 5)")
    expect_call_error(lambda: sm(score=torch.rand(7), v=torch.rand(5)), "input 'v' has shape (5,)")  # no T
    expect_call_error(lambda: sm.step(sm.init_state((2,)), score=torch.rand(2), v=torch.rand(2, 3)),
                      "input 'v' has shape (2, 3)", "(*batch, 5)")
    lin = get("linrec")
    expect_call_error(lambda: lin(a=torch.rand(()), b=torch.rand(())), "input 'a' has shape ()")


def test_float_tensor_for_int_input():
    cc = get("cumcount")
    expect_call_error(lambda: cc(x=torch.randn(2, 5)), "input 'x' must be an integer tensor", "i32",
                      "torch.float32")
    expect_call_error(lambda: cc(x=torch.ones(2, 5, dtype=torch.bool)), "input 'x'")


def test_int_tensor_for_float_input():
    lin = get("linrec")
    expect_call_error(lambda: lin(a=torch.ones(2, 5, dtype=torch.int64), b=torch.rand(2, 5)),
                      "input 'a' must be a floating-point tensor", "torch.int64")
    expect_call_error(lambda: lin(a=torch.rand(2, 5), b=torch.ones(2, 5, dtype=torch.bool)), "input 'b'")
    expect_call_error(lambda: lin(a=[0.5], b=torch.rand(1)), "input 'a' must be a torch.Tensor")


def test_sequence_length_mismatch():
    lin = get("linrec")
    expect_call_error(lambda: lin(a=torch.rand(2, 5), b=torch.rand(2, 6)), "sequence length T",
                      "a: 5", "b: 6")


def test_batch_not_broadcastable():
    lin = get("linrec")
    expect_call_error(lambda: lin(a=torch.rand(2, 5), b=torch.rand(3, 5)), "batch shapes do not broadcast",
                      "a: (2,)", "b: (3,)")
    # broadcastable batches are fine: (2, 1) with (3,) gives (2, 3)
    y = lin(a=torch.rand(2, 1, 5), b=torch.rand(3, 5))
    assert y.shape == (2, 3, 5)


def test_bad_backend_name():
    lin = get("linrec")
    expect_call_error(lambda: lin(a=torch.rand(5), b=torch.rand(5), backend="cuda"),
                      "backend must be one of", "'cuda'")


def test_step_with_wrong_state_type():
    lin, mix = get("linrec"), get("nonassoc_mix")
    a, b = torch.rand(2), torch.rand(2)
    expect_call_error(lambda: lin.step({"g": a, "h": b}, a=a, b=b), "state must come from init_state()", "dict")
    expect_call_error(lambda: lin.step(None, a=a, b=b), "NoneType")
    expect_call_error(lambda: lin(a=a[:, None], b=b[:, None], initial_state="state"), "initial_state", "str")
    # a canonical-tree state given to an associative op, and the other way round
    expect_call_error(lambda: lin.step(mix.init_state((2,)), a=a, b=b), "other semantics")
    expect_call_error(lambda: mix.step(lin.init_state((2,)), u=torch.rand(2, 3)), "other semantics")
    # a state for another batch shape
    expect_call_error(lambda: lin.step(lin.init_state((3,)), a=a, b=b), "batch shape (3,)")


def test_unbound_extern():
    op = example_op("tpsm", C=4, D=3)
    expect_call_error(lambda: op(u=torch.rand(8, 3)), "needs its externs bound", "enc=...", "agg=...", "inf=...")
    expect_call_error(lambda: op.bind(foo=torch.tanh), "declares no extern 'foo'")
    expect_call_error(lambda: op.bind(enc=3), "extern 'enc' must be callable")
    op.bind(enc=torch.tanh, agg=lambda a, b: a + b)
    expect_call_error(lambda: op(u=torch.rand(8, 3)), "op.bind(inf=...)")
    expect_call_error(lambda: op.step(op.init_state(()), u=torch.rand(3)), "inf=...")


def test_bind_registers_modules():
    op = example_op("tpsm", C=4, D=3)
    enc = torch.nn.Tanh()
    assert op.bind(enc=enc, agg=lambda a, b: a + b, inf=lambda h, u: h) is op
    assert op.externs["enc"] is enc


# ---- streaming: prefill + continue, prefill + step -------------------------------------------------

STREAM_OPS = ["linrec", "softmax_attn", "nonassoc_mix", "tpsm"]


@pytest.mark.parametrize("name", STREAM_OPS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_prefill_then_parallel_equals_all_at_once(name, backend):
    op = get(name)
    T, batch = 13, (2,)  # tpsm: C = 4, so T and most splits are not multiples of C
    x = random_inputs(op, batch, T, seed=7)
    full = op(**x, backend=backend)
    close(full, op.reference(**x))
    for t in (1, 3, 4, 8, 9, 12):
        y1, st = op(**time_slice(x, 1, 0, t), return_state=True, backend=backend)
        y2, st2 = op(**time_slice(x, 1, t, T), initial_state=st, return_state=True, backend=backend)
        close(cat([y1, y2], 1), full)
        assert st2.tokens == T
    # three calls, the middle one mid-chunk for tpsm
    y1, st = op(**time_slice(x, 1, 0, 2), return_state=True, backend=backend)
    y2, st = op(**time_slice(x, 1, 2, 7), initial_state=st, return_state=True, backend=backend)
    y3 = op(**time_slice(x, 1, 7, T), initial_state=st, backend=backend)
    close(cat([y1, y2, y3], 1), full)


@pytest.mark.parametrize("name", STREAM_OPS)
def test_prefill_then_step_equals_all_at_once(name):
    op = get(name)
    T = 11
    x = random_inputs(op, (3,), T, seed=3)
    full = op(**x)
    for t in (0, 1, 5, 8):
        if t:
            y1, st = op(**time_slice(x, 1, 0, t), return_state=True)
            parts = [y1]
        else:
            st, parts = op.init_state((3,), dtype=torch.float64), []
        for i in range(t, T):
            y_i, st = op.step(st, **per_token(x, 1, i))
            parts.append(tuple(y.unsqueeze(1) for y in as_tuple(y_i)))
        close(cat(parts, 1), full)
        assert st.tokens == T


def test_step_then_parallel_continues_the_stream():
    op = get("nonassoc_mix")
    T = 10
    x = random_inputs(op, (2,), T, seed=11)
    full = op(**x)
    st = op.init_state((2,), dtype=torch.float64)
    parts = []
    for i in range(3):
        y_i, st = op.step(st, **per_token(x, 1, i))
        parts.append(y_i.unsqueeze(1))
    parts.append(op(**time_slice(x, 1, 3, T), initial_state=st))
    close(torch.cat(parts, 1), full)


def test_state_broadcasts_over_a_larger_batch():
    op = get("linrec")
    x = random_inputs(op, (4,), 6, seed=2)
    st = op.init_state(())  # batch () broadcasts to (4,)
    y = op(**x, initial_state=st)
    close(y, op(**x))


def test_canonical_tree_is_not_a_left_fold():
    """nonassoc_mix is non-associative: the streaming/parallel result is the canonical tree, which
    differs from a plain left fold by O(1) (so the equalities above do tell trees apart)."""
    op = get("nonassoc_mix")
    x = random_inputs(op, (), 7, seed=1)
    y = op(**x)
    h = x["u"][0]
    for t in range(1, 7):
        h = torch.tanh(h + x["u"][t])
    assert (y[-1] - h).abs().max() > 1e-3


# ---- dtypes, T = 1, batch shapes ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["linrec", "softmax_attn", "nonassoc_mix", "tpsm"])
def test_low_precision_inputs_give_outputs_in_the_same_dtype(name, dtype):
    op = get(name)
    x = random_inputs(op, (2,), 9, dtype=dtype, seed=4)
    want = op(**{k: v.double() for k, v in x.items()})  # the same values in float64
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for backend in ("torch", "reference"):
        y = op(**x, backend=backend)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    y_t, st = op.step(op.init_state((2,)), **per_token(x, 1, 0))
    assert y_t.dtype == dtype
    y, st = op(**x, return_state=True)
    assert y.dtype == dtype


def test_int_states_give_int64_outputs():
    op = get("cumcount")
    x = torch.randint(-5, 6, (2, 3, 17), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    for backend in ("torch", "reference"):
        npos, total = op(x=x, backend=backend)
        assert npos.dtype == torch.int64 and total.dtype == torch.int64
        assert torch.equal(npos, torch.cumsum((x > 0).long(), -1))
        assert torch.equal(total, torch.cumsum(x.long(), -1))
    st = op.init_state((2, 3))
    for t in range(17):
        (c, s), st = op.step(st, x=x[..., t])
        assert c.dtype == torch.int64 and torch.equal(s, torch.cumsum(x.long(), -1)[..., t])
    y1, st = op(x=x[..., :5], return_state=True)
    y2 = op(x=x[..., 5:], initial_state=st)
    assert torch.equal(torch.cat([y1[1], y2[1]], -1), torch.cumsum(x.long(), -1))
    # int64 inputs are accepted for an i32 field
    assert op(x=x.long())[1].dtype == torch.int64


@pytest.mark.parametrize("name", ["linrec", "softmax_attn", "nonassoc_mix", "cumcount", "tpsm", "gla"])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_T1_and_batch_shapes(name, batch):
    op = get(name)
    for T in (1, 6):
        x = random_inputs(op, batch, T, seed=T)
        ys = as_tuple(op(**x))
        refs = as_tuple(op.reference(**x))
        for y, r, f in zip(ys, refs, op.ir.outputs):
            assert y.shape == tuple(batch) + (T,) + token_shape(op, f)
            close(y, r)
        st = op.init_state(batch, dtype=torch.float64)
        y_0, st = op.step(st, **per_token(x, len(batch), 0))
        for y, f in zip(as_tuple(y_0), op.ir.outputs):
            assert y.shape == tuple(batch) + token_shape(op, f)
        for y, r in zip(as_tuple(y_0), refs):
            close(y, r.select(len(batch), 0))


def test_one_output_is_a_tensor_several_are_a_tuple():
    lin, rot = get("linrec"), get("rotation")
    assert isinstance(lin(**random_inputs(lin, (), 4)), torch.Tensor)
    out = rot(**random_inputs(rot, (), 4))
    assert isinstance(out, tuple) and len(out) == 2  # yre, yim in declaration order


def test_compile_source_and_file_agree():
    text = (ROOT / "examples" / "gla.psm").read_text()
    a = psmc.compile_source(text, K=4, V=3)["gla"]
    b = psmc.compile_file(ROOT / "examples" / "gla.psm", K=4, V=3)["gla"]
    assert isinstance(a, torch.nn.Module) and isinstance(a, psmc.PsmOp)
    x = random_inputs(a, (2,), 5)
    close(a(**x), b(**x))


# ---- regressions -------------------------------------------------------------

def test_state_of_another_op_is_rejected_with_a_call_error():
    """A StreamState of another op with the same semantics (cumsum's state given to linrec) fails
    deep inside the scan with KeyError 's' / a RuntimeError instead of a PsmCallError."""
    lin, cs = get("linrec"), get("cumsum")
    a, b = torch.rand(2, 5), torch.rand(2, 5)
    expect_call_error(lambda: lin.step(cs.init_state((2,)), a=a[:, 0], b=b[:, 0]), "state")
    expect_call_error(lambda: lin(a=a, b=b, initial_state=cs.init_state((2,))), "state")
    mix, agg = get("nonassoc_mix"), get("softmax_agg")
    expect_call_error(lambda: mix(u=torch.rand(2, 5, 3), initial_state=agg.init_state((2,))), "state")


def test_validation_cache_never_skips_an_error():
    """prepare() reuses what it derived for a signature it has seen; errors must still surface."""
    op = example_op("linrec")
    a, b = torch.rand(2, 9), torch.randn(2, 9)
    torch.testing.assert_close(op(a=a, b=b), op(a=a, b=b, backend="reference"))
    torch.testing.assert_close(op(a=a, b=b), op(a=a, b=b, backend="reference"))  # cached signature
    with pytest.raises(PsmCallError, match="sequence length"):
        op(a=a, b=torch.randn(2, 8))
    with pytest.raises(PsmCallError, match="must be a torch.Tensor"):
        op(a=a, b=[1.0] * 9)
    with pytest.raises(PsmCallError, match="floating-point"):
        op(a=a, b=torch.ones(2, 9, dtype=torch.int32))
