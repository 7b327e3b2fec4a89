"""Strategy recurrent under TRITON_INTERPRET (gla, mlstm; padded dims), and both strategies agree."""

from __future__ import annotations

import pytest
import torch

from psmc import triton_backend
from psmc.codegen import triton as triton_codegen

from triton_cases import assert_close, draw, grads_from_state, load

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TIGHT = dict(rtol=1e-9, atol=1e-9)
CASES = [("gla", dict(K=4, V=8)), ("gla", dict(K=5, V=3)), ("mlstm", dict(K=3, V=5)),
         ("softmax_attn", dict(D=4))]


def test_large_states_choose_recurrent():
    assert triton_codegen.strategy(load("gla").ir) == "recurrent"
    assert triton_codegen.strategy(load("mlstm").ir) == "recurrent"
    assert triton_codegen.strategy(load("softmax_attn").ir) == "scan"


@pytest.mark.parametrize("strategy", ["recurrent", "scan"])
@pytest.mark.parametrize("name, dims", CASES, ids=[f"{n}-{'-'.join(map(str, d.values()))}" for n, d in CASES])
@pytest.mark.parametrize("batch, T", [((), 1), ((3,), 9), ((2, 3), 20)], ids=["b-1", "b3-9", "b2x3-20"])
def test_forward_and_state_match_reference(strategy, name, dims, batch, T, monkeypatch):
    monkeypatch.setattr(triton_backend, "FORCE_STRATEGY", strategy)
    op = load(name, **dims)
    x = draw(op, batch + (T,), gen=torch.Generator().manual_seed(T))
    y, st = op(**x, backend="triton", return_state=True)
    ref, ref_st = op.reference(**x, return_state=True)
    assert_close(y, ref, what=f"{name} {strategy}", **TIGHT)
    for k, v in ref_st.prefix.items():
        assert_close(st.prefix[k], v, what=f"{name} {strategy} state {k}", **TIGHT)


def test_recurrent_continues_from_a_state_and_reads_strided_heads(monkeypatch):
    """fla's (B, T, H, K) layout passed as (B, H, T, K) views: no copies, two batch axes."""
    monkeypatch.setattr(triton_backend, "FORCE_STRATEGY", "recurrent")
    op = load("gla", K=4, V=8)
    gen = torch.Generator().manual_seed(3)
    B, T, H = 2, 12, 3
    x = {n: torch.randn(B, T, H, d, dtype=torch.float64, generator=gen).transpose(1, 2)
         for n, d in (("q", 4), ("k", 4), ("v", 8))}
    x["gk"] = -torch.rand(B, T, H, 4, dtype=torch.float64, generator=gen).transpose(1, 2)
    y1, st = op(**{k: v[:, :, :5] for k, v in x.items()}, backend="triton", return_state=True)
    y2 = op(**{k: v[:, :, 5:] for k, v in x.items()}, backend="triton", initial_state=st)
    assert_close(torch.cat([y1, y2], dim=2), op.reference(**x), what="gla chained", **TIGHT)


def test_recurrent_low_precision_inputs(monkeypatch):
    monkeypatch.setattr(triton_backend, "FORCE_STRATEGY", "recurrent")
    op = load("gla", K=4, V=8)
    x = draw(op, (2, 16), dtype=torch.bfloat16)
    y = op(**x, backend="triton")
    assert y.dtype == torch.bfloat16
    ref = op.reference(**{k: v.double() for k, v in x.items()})
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)


# ---- the derived backward ------------------------------------------------------------------

GRAD_CASES = [("gla", dict(K=4, V=8)), ("gla", dict(K=5, V=3)), ("mlstm", dict(K=3, V=5))]


def _grads(op, x, backend, weights, final_weight=False):
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    run = op.reference if backend == "reference" else lambda **kw: op(**kw, backend=backend)
    y, st = run(**leaves, return_state=True)
    loss = (y.double() * weights).sum()
    if final_weight:
        loss = loss + sum((v * (i + 1.5)).sum() for i, v in enumerate(st.prefix.values()))
    loss.backward()
    return {k: v.grad for k, v in leaves.items()}


@pytest.fixture
def recurrent_backward(monkeypatch):
    """Strategy recurrent with 2 lanes a program (several programs share the lane-free sums)
    and a checkpoint every 4 tokens (several blocks); the backward must be the derived kernel."""
    monkeypatch.setattr(triton_backend, "FORCE_STRATEGY", "recurrent")
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", (2, 1, 1, 4))
    calls = []

    def spy(psm):
        why = backward_why_not(psm)
        calls.append(why)
        return why

    backward_why_not = triton_backend.backward_why_not
    monkeypatch.setattr(triton_backend, "backward_why_not", spy)
    return calls


@pytest.mark.parametrize("name, dims", GRAD_CASES, ids=[f"{n}-{'-'.join(map(str, d.values()))}" for n, d in GRAD_CASES])
@pytest.mark.parametrize("batch, T", [((), 1), ((3,), 7), ((2, 2), 33)], ids=["b-1", "b3-7", "b2x2-33"])
@pytest.mark.parametrize("final", [False, True], ids=["y", "y+final"])
def test_recurrent_gradients_match_autograd_through_the_reference(name, dims, batch, T, final,
                                                                   recurrent_backward):
    op = load(name, **dims)
    x = draw(op, batch + (T,), gen=torch.Generator().manual_seed(T + len(batch)))
    w = torch.randn(batch + (T,) + op.ir.outputs[0].type.shape, generator=torch.Generator().manual_seed(5),
                    dtype=torch.float64)
    got = _grads(op, x, "triton", w, final)
    want = _grads(op, x, "reference", w, final)
    assert recurrent_backward == [None]  # the derived kernel ran, not the torch path
    for k in want:
        assert got[k].shape == x[k].shape and got[k].dtype == x[k].dtype
        assert_close(got[k], want[k], what=f"{name} grad {k}", rtol=1e-9, atol=1e-9)


def test_recurrent_gradients_of_strided_heads_and_broadcast_inputs(recurrent_backward):
    """fla's (B, T, H, K) layout as (B, H, T, K) views, and a gate shared by all heads."""
    op = load("gla", K=4, V=8)
    gen = torch.Generator().manual_seed(11)
    B, T, H = 2, 10, 3
    x = {n: torch.randn(B, T, H, d, dtype=torch.float64, generator=gen).transpose(1, 2)
         for n, d in (("q", 4), ("k", 4), ("v", 8))}
    x["gk"] = -torch.rand(B, 1, T, 4, dtype=torch.float64, generator=gen)
    w = torch.randn(B, H, T, 8, dtype=torch.float64, generator=gen)
    got = _grads(op, x, "triton", w)
    want = _grads(op, x, "reference", w)
    for k in want:
        assert_close(got[k], want[k], what=f"gla grad {k}", rtol=1e-9, atol=1e-9)


def test_recurrent_gradients_of_bf16_inputs(recurrent_backward):
    """bf16 inputs, f32 state math: gradients in bf16 close to float64 autograd."""
    op = load("gla", K=4, V=8)
    x = draw(op, (2, 16), dtype=torch.bfloat16, gen=torch.Generator().manual_seed(2))
    w = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _grads(op, x, "triton", w)
    want = _grads(op, {k: v.double() for k, v in x.items()}, "reference", w)
    for k in want:
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k].double(), want[k], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name, dims", GRAD_CASES[1:], ids=[f"{n}-{'-'.join(map(str, d.values()))}" for n, d in GRAD_CASES[1:]])
def test_recurrent_gradients_of_the_initial_state(name, dims, recurrent_backward):
    """A call that continues a stream: the state it starts from gets its gradient too (lane-free
    fields, gla's d and mlstm's g, m, n: summed over the programs' shares), with and without the
    final state's."""
    op = load(name, **dims)
    _, st = op.reference(**draw(op, (2, 3), gen=torch.Generator().manual_seed(6)), return_state=True)
    x = draw(op, (2, 10), gen=torch.Generator().manual_seed(7))
    for final in (False, True):
        got = grads_from_state(op, x, st, "triton", final)
        want = grads_from_state(op, x, st, "reference", final)
        assert recurrent_backward[-1] is None  # the derived kernel ran, not the torch path
        for k in want:
            assert_close(got[k], want[k], what=f"{name} grad {k}", rtol=1e-9, atol=1e-9)


def test_backward_target_shows_the_recurrent_kernel():
    from psmc.codegen import emit

    text = emit(load("gla").ir, "backward")
    assert "def gla_recurrent_backward_kernel(" in text and "def gla_backward(" in text
    assert "gla.psm:12 combine" in text
