"""Transformer-PSM (examples/tpsm.psm with psmc.nn): chunking, token-by-token streaming, gradients.

Strategy level: the canonical tree over chunk states, one batched call of each extern per tree
level, autograd through torch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import psmc
from psmc.nn import ChunkReadout, tpsm_modules
from psmc.runtime import PsmOp

from helpers import EXAMPLES
from oracles import tpsm as tpsm_oracle

C, D = 4, 8
TOL = dict(rtol=1e-12, atol=1e-12)


def make_op(seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    op = psmc.compile_file(EXAMPLES / "tpsm.psm", C=C, D=D)["tpsm"]
    mods = tpsm_modules(C, D, heads=2)
    op.bind(**mods).to(dtype)
    return op, mods


@pytest.mark.parametrize("T", [1, 3, 4, 5, 17, 30, 64])
def test_chunked_parallel_equals_reference_and_oracle(T):
    """T need not be a multiple of C: the last chunk is padded, its outputs cut back to T."""
    op, mods = make_op(T)
    u = torch.randn(2, T, D, dtype=torch.float64)
    want = tpsm_oracle(u, C=C, **mods)["y"]
    torch.testing.assert_close(op.reference(u=u), want, **TOL)
    y = op(u=u)
    assert y.shape == (2, T, D)
    torch.testing.assert_close(y, want, **TOL)


def test_wrong_bracketing_differs():
    op, mods = make_op(1)
    u = torch.randn(2, 40, D, dtype=torch.float64)
    left_fold = PsmOp(op.ir, associative=True).bind(**mods).reference(u=u)
    assert (left_fold - op(u=u)).abs().max().item() > 1e-3


def test_step_returns_each_token_as_it_arrives():
    """step buffers the unfinished chunk (state.pending) yet answers every token at once."""
    op, _ = make_op(2)
    T = 23
    u = torch.randn(3, T, D, dtype=torch.float64)
    want = op(u=u)
    st = op.init_state((3,), dtype=torch.float64)
    for t in range(T):
        y, st = op.step(st, u=u[:, t])
        torch.testing.assert_close(y, want[:, t], **TOL)
        pending = next(iter(st.pending.values())).shape[1] if st.pending else 0
        assert (st.tokens, st.counter.count, pending) == (t + 1, (t + 1) // C, (t + 1) % C)


@pytest.mark.parametrize("split", [0, 1, 4, 6, 13])
def test_prefill_then_step(split):
    """A parallel prefill that ends mid-chunk hands its partial chunk to step."""
    op, _ = make_op(3)
    T = 21
    u = torch.randn(2, T, D, dtype=torch.float64)
    want = op.reference(u=u)
    y, st = op(u=u[:, :split], return_state=True)
    outs = [y]
    for t in range(split, T):
        yt, st = op.step(st, u=u[:, t])
        outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, dim=1), want, **TOL)
    y2, _ = op(u=u[:, split:], initial_state=op(u=u[:, :split], return_state=True)[1],
               return_state=True)  # continuing in parallel from any state
    torch.testing.assert_close(y2, want[:, split:], **TOL)


def test_gradients_through_the_level_path():
    """Autograd through one batched call per tree level = autograd through the sequential oracle."""
    op, mods = make_op(4)
    u = torch.randn(2, 27, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 27, D, dtype=torch.float64)
    params = [p for m in mods.values() for p in m.parameters()]
    got = torch.autograd.grad((op(u=u) * w).sum(), [u] + params)
    want = torch.autograd.grad((op.reference(u=u) * w).sum(), [u] + params)
    assert any(g.abs().sum() > 0 for g in got[1:])
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-10)


def test_readout_is_causal_within_the_chunk():
    torch.manual_seed(5)
    inf = ChunkReadout(C, D, heads=2).double()
    s, u = torch.randn(2, C, D, dtype=torch.float64), torch.randn(2, C, D, dtype=torch.float64)
    y = inf(s, u)
    for t in range(C - 1):
        u2 = u.clone()
        u2[:, t + 1:] = torch.randn_like(u2[:, t + 1:])
        torch.testing.assert_close(inf(s, u2)[:, :t + 1], y[:, :t + 1], **TOL)


def test_training_script_runs_and_streams():
    """examples/train_tpsm.py, shortened: parallel training, then step-by-step generation."""
    path = EXAMPLES / "train_tpsm.py"
    spec = importlib.util.spec_from_file_location("train_tpsm", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["train_tpsm"] = mod
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    model, _ = mod.train(steps=40, C=4, D=16, T=24, vocab=8, log=lambda *_: None)
    model.eval()
    seqs = mod.batch(4, 24, 4, 8, torch.Generator().manual_seed(1))
    tokens, streamed, state = mod.generate(model, seqs[:, :4], 24)
    with torch.no_grad():
        parallel = model(tokens[:, :-1])
    torch.testing.assert_close(streamed, parallel, rtol=1e-5, atol=1e-5)
    assert state.tokens == 23 and state.counter.count == 5
