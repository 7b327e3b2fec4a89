"""The fast path of a plain call: a repeated call signature goes straight to the bound kernels.

After a call ran on the Triton path, `PsmOp` keeps its bound call under the call's signature
(standalone.call_key) and hands later calls with that signature to it without validating or
deriving anything again. It must give what the full path gives (outputs and gradients, here
under the interpreter against the float64 oracle), never serve a call whose signature differs,
and never hide an error.
"""

from __future__ import annotations

import pytest
import torch

from psmc import PsmCallError, triton_backend

from triton_cases import assert_close, draw, load

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TIGHT = dict(rtol=1e-9, atol=1e-9)


def counting(op, monkeypatch) -> list:
    """Count the calls that take the full path (validation, dispatch, binding), from now on:
    nothing bound before (ops are shared between tests) is kept."""
    op._fast.clear()
    calls = []
    full = op._forward

    def spy(*args, **kwargs):
        calls.append(args)
        return full(*args, **kwargs)
    monkeypatch.setattr(op, "_forward", spy)
    return calls


def grads(op, x, w):
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
    y = op(**leaves, backend="triton")
    (y * w).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("T", [1, 37])
def test_repeated_calls_take_the_fast_path_and_agree_with_the_full_one(T, monkeypatch):
    """linrec (a non-commutative combine), b broadcast over the batch (its gradient is summed):
    forward without and with gradients, twice each; the second call of each skips the full path."""
    op = load("linrec")
    full = counting(op, monkeypatch)
    gen = torch.Generator().manual_seed(T)
    x = draw(op, (3, T), gen=gen)
    x["b"] = x["b"][:1]  # batch (1,) against a's (3,)
    w = torch.randn(3, T, dtype=torch.float64, generator=gen)
    want = op.reference(**x)
    ref_x = {k: v.clone().requires_grad_() for k, v in x.items()}
    (op.reference(**ref_x) * w).sum().backward()
    n = len(full)
    with torch.no_grad():
        first, again = op(**x, backend="triton"), op(**x, backend="triton")
    assert len(full) == n + 1
    y1, g1 = grads(op, x, w)
    y2, g2 = grads(op, x, w)
    assert len(full) == n + 2
    for y in (first, again, y1, y2):
        assert_close(y, want, **TIGHT, what="forward")
    for g in (g1, g2):
        for k in x:
            assert g[k].shape == x[k].shape
            assert_close(g[k], ref_x[k].grad, **TIGHT, what=f"grad {k}")


def test_integer_outputs_and_states_on_the_fast_path(monkeypatch):
    """cumcount: integer inputs, int64 outputs; a second call is served by the bound call."""
    op = load("cumcount")
    x = draw(op, (2, 13), gen=torch.Generator().manual_seed(3))
    want = op.reference(**x)
    full = counting(op, monkeypatch)
    got = [op(**x, backend="triton") for _ in range(2)]
    assert len(full) == 1
    for y in got:
        assert_close(y, want, **TIGHT, what="cumcount")


def test_a_changed_signature_never_reuses_a_bound_call(monkeypatch):
    """Length, dtype, strides, requires_grad, grad mode, the order of the keyword arguments:
    each is a new signature and takes the full path, with results right for it."""
    op = load("linrec")
    full = counting(op, monkeypatch)
    gen = torch.Generator().manual_seed(7)
    x = draw(op, (2, 11), gen=gen)
    op(**x, backend="triton")
    variants = [
        ("length", draw(op, (2, 12), gen=gen)),
        ("dtype", {k: v.float() for k, v in x.items()}),
        ("strides", {k: v.t() for k, v in draw(op, (11, 2), gen=gen).items()}),  # (2, 11) transposed
        ("order", {"b": x["b"], "a": x["a"]}),
    ]
    for what, v in variants:
        n = len(full)
        got = op(**v, backend="triton")
        assert len(full) == n + 1, what
        want = op.reference(**{k: u.double() for k, u in v.items()})
        assert_close(got.double(), want, rtol=1e-5, atol=1e-6, what=what)
    # requires_grad and grad mode: the bound call without autograd must not serve a call that
    # needs gradients, nor the reverse
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    n = len(full)
    out = op(**leaves, backend="triton")
    assert out.requires_grad and len(full) == n + 1
    with torch.no_grad():
        assert not op(**leaves, backend="triton").requires_grad
    assert len(full) == n + 2
    assert op(**leaves, backend="triton").requires_grad and len(full) == n + 2  # now cached


def test_a_changed_device_takes_the_full_path_and_its_error():
    """Tensors on another device than the cached call's: the full path decides (meta tensors
    cannot run on the Triton path, and say so)."""
    op = load("linrec")
    x = draw(op, (2, 5), dtype=torch.float32, gen=torch.Generator().manual_seed(1))
    op(**x, backend="triton")
    meta = {k: v.to("meta") for k, v in x.items()}
    with pytest.raises(PsmCallError, match="meta"):
        op(**meta, backend="triton")


def test_errors_still_name_the_field_after_a_cached_call():
    op = load("linrec")
    a, b = torch.rand(2, 9), torch.randn(2, 9)
    for _ in range(2):
        op(a=a, b=b, backend="triton")
    with pytest.raises(PsmCallError, match="sequence length T: a: 9, b: 8"):
        op(a=a, b=torch.randn(2, 8), backend="triton")
    with pytest.raises(PsmCallError, match="'b'.*floating-point"):
        op(a=a, b=torch.ones(2, 9, dtype=torch.int32), backend="triton")
    with pytest.raises(PsmCallError, match="missing input 'b'"):
        op(a=a, backend="triton")
    with pytest.raises(PsmCallError, match="backend must be one of"):
        op(a=a, b=b, backend="tritonn")


def test_knobs_set_after_a_cached_call_are_obeyed(monkeypatch):
    """Tests and benchmarks force a block shape through triton_backend.FORCE_CONFIG; a bound call
    made without it must not serve calls made with it."""
    op = load("linrec")
    x = draw(op, (2, 40), gen=torch.Generator().manual_seed(2))
    op(**x, backend="triton")
    configs = []
    bind = triton_backend.module(op.ir, interpret=True).linrec_bind

    def spy(*args, **kwargs):
        configs.append(kwargs.get("config"))
        return bind(*args, **kwargs)
    monkeypatch.setattr(triton_backend.module(op.ir, interpret=True), "linrec_bind", spy)
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", (1, 8, 1))
    got = op(**x, backend="triton")
    assert configs == [(1, 8, 1)]
    assert_close(got, op.reference(**x), **TIGHT, what="forced config")


def test_recurrent_strategy_on_the_fast_path(monkeypatch):
    """gla (strategy recurrent, lanes along V): forward and the derived backward, twice; the second
    call skips the full path. Against autograd through the float64 oracle."""
    monkeypatch.setattr(triton_backend, "FORCE_STRATEGY", "recurrent")  # scan at these dims
    op = load("gla", K=4, V=3)
    gen = torch.Generator().manual_seed(11)
    x = draw(op, (2, 5), gen=gen)
    w = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)
    ref_x = {k: v.clone().requires_grad_() for k, v in x.items()}
    want = op.reference(**ref_x)
    (want * w).sum().backward()
    full = counting(op, monkeypatch)
    for _ in range(2):
        y, g = grads(op, x, w)
        assert_close(y, want.detach(), **TIGHT, what="gla forward")
        for k in x:
            assert_close(g[k], ref_x[k].grad, **TIGHT, what=f"gla grad {k}")
    assert len(full) == 1
