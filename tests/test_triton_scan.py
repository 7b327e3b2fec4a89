"""Strategy scan under TRITON_INTERPRET: every associative scalar-state example against the oracle.

`backend="triton"` on CPU tensors runs the generated kernels in Triton's interpreter. Inputs are
float64, so kernels run their state math in float64 too and agree with `op.reference` to ~1e-12.
The interpreter applies `combine` element by element, so shapes stay tiny (softmax_attn at D = 4).
"""

from __future__ import annotations

import pytest
import torch

from triton_cases import SCAN_OPS, as_tuple, assert_close, draw, load, strided_linrec_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TIGHT = dict(rtol=1e-9, atol=1e-9)


def small(name: str):
    return load(name, D=4) if name == "softmax_attn" else load(name)


@pytest.mark.parametrize("name", SCAN_OPS)
@pytest.mark.parametrize("T", [1, 7, 100])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=["b", "b3", "b2x3"])
def test_forward_matches_reference(name, T, batch):
    op = small(name)
    gen = torch.Generator().manual_seed(hash((name, T, batch)) % 2**31)
    x = draw(op, batch + (T,), gen=gen)
    y, st = op(**x, backend="triton", return_state=True)
    ref, ref_st = op.reference(**x, return_state=True)
    assert_close(y, ref, what=f"{name} outputs", **TIGHT)
    assert st.tokens == ref_st.tokens == T
    for k, v in ref_st.prefix.items():
        assert_close(st.prefix[k], v, what=f"{name} final state {k}", **TIGHT)


@pytest.mark.parametrize("name", SCAN_OPS)
def test_prefill_then_continue(name):
    """initial_state / return_state: two calls equal one call on the concatenation."""
    op = small(name)
    gen = torch.Generator().manual_seed(1)
    x = draw(op, (2, 37), gen=gen)
    whole = op(**x, backend="triton")
    nb = 1
    first = {k: v.narrow(nb, 0, 20) for k, v in x.items()}
    rest = {k: v.narrow(nb, 20, 17) for k, v in x.items()}
    y1, st = op(**first, backend="triton", return_state=True)
    y2, st2 = op(**rest, backend="triton", return_state=True, initial_state=st)
    joined = tuple(torch.cat([a, b], dim=nb) for a, b in zip(as_tuple(y1), as_tuple(y2)))
    assert_close(joined if len(joined) > 1 else joined[0], whole, what=name, **TIGHT)
    assert st2.tokens == 37
    # the state also feeds the reference path, and back
    y3 = op.reference(**rest, initial_state=st)
    assert_close(y3, y2, what=f"{name} state into reference", **TIGHT)


def test_strided_and_broadcast_inputs_are_not_copied_wrongly():
    op = load("linrec")
    gen = torch.Generator().manual_seed(2)
    a, bs = strided_linrec_inputs(gen)
    for bb in bs:
        assert_close(op(a=a, b=bb, backend="triton"), op.reference(a=a, b=bb), what="linrec strided",
                     **TIGHT)


def test_field_strides_and_lanes():
    """Matrix fields read through their own strides; softmax_attn's lanes from a transposed v."""
    op = load("affine")
    gen = torch.Generator().manual_seed(3)
    x = draw(op, (2, 9), gen=gen)
    x["A"] = x["A"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert_close(op(**x, backend="triton"), op.reference(**x), what="affine", **TIGHT)
    sm = load("softmax_attn", D=4)
    x = draw(sm, (3, 11), gen=gen)
    x["v"] = x["v"].transpose(0, 1).contiguous().transpose(0, 1)
    assert_close(sm(**x, backend="triton"), sm.reference(**x), what="softmax_attn", **TIGHT)


def test_many_batch_axes_fall_back_to_a_copy():
    op = load("cumsum")
    x = torch.randn(2, 3, 4, 5, 6, dtype=torch.float64)[:, :, ::2, :, ::2]  # 4 odd-strided batch axes
    assert_close(op(x=x, backend="triton"), op.reference(x=x), what="cumsum", **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_keep_f32_state(dtype):
    op = load("linrec")
    gen = torch.Generator().manual_seed(4)
    x = draw(op, (3, 50), dtype=dtype, gen=gen)
    y = op(**x, backend="triton")
    assert y.dtype == dtype
    ref = op.reference(**{k: v.double() for k, v in x.items()})
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_empty_sequence_keeps_the_state():
    op = load("linrec")
    a, b = torch.rand(2, 0, dtype=torch.float64), torch.randn(2, 0, dtype=torch.float64)
    y, st = op(a=a, b=b, backend="triton", return_state=True)
    assert y.shape == (2, 0)
    assert torch.equal(st.prefix["g"], torch.ones(2, dtype=torch.float64))


def test_initial_state_broadcasts_over_the_batch():
    op = load("linrec")
    gen = torch.Generator().manual_seed(5)
    x = draw(op, (4, 10), gen=gen)
    st = op.init_state((), dtype=torch.float64)
    st.prefix = {"g": torch.tensor(0.5, dtype=torch.float64), "h": torch.tensor(2.0, dtype=torch.float64)}
    assert_close(op(**x, backend="triton", initial_state=st), op.reference(**x, initial_state=st),
                 what="linrec broadcast state", **TIGHT)


def test_auto_backend_on_cpu_stays_on_torch():
    op = load("linrec")
    x = draw(op, (2, 5))
    assert_close(op(**x), op.reference(**x), what="auto", **TIGHT)


def test_softmax_attn_full_width_lanes():
    """D = 64 lanes across one program (the default dims), a short sequence."""
    op = load("softmax_attn")
    x = draw(op, (5,), gen=torch.Generator().manual_seed(6))
    assert_close(op(**x, backend="triton"), op.reference(**x), what="softmax_attn D=64", **TIGHT)


def test_printed_powers_keep_their_precedence():
    """`a / b**2` must not print as `a/b * b` (which Python reads as (a / b) * b)."""
    import sympy as sp

    from psmc.codegen.triton_expr import texpr

    a, b, c = sp.symbols("a b c")
    for e in (a / b**2, a * b**3 / c, a / (b**2 * c), -a / b**4):
        assert eval(texpr(e), {"a": 3.0, "b": 2.0, "c": 5.0}) == pytest.approx(float(e.subs({a: 3, b: 2, c: 5})))
