"""Strategy recurrent under TRITON_INTERPRET (gla, mlstm; padded dims), and both strategies agree."""

from __future__ import annotations

import pytest
import torch

from psmc import triton_backend
from psmc.codegen import triton as triton_codegen

from triton_cases import assert_close, draw, load

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
