"""The reference (interpreter, sequential) and the torch path (generated code, log-depth) of every
example against hand-written loops written from the math (tests/oracles.py)."""

from __future__ import annotations

import pytest
import torch

from helpers import SMALL_DIMS, as_tuple, example_op, max_rel_error, random_inputs
from oracles import ORACLES, canonical_prefixes

EXPRESSION_OPS = sorted(n for n in ORACLES if n != "tpsm")
LENGTHS = [1, 2, 7, 64, 100]


@pytest.mark.parametrize("name", EXPRESSION_OPS)
@pytest.mark.parametrize("T", LENGTHS)
def test_paths_match_hand_written_loops(name, T):
    op = example_op(name)
    x = random_inputs(op, (2, 3) if T < 64 else (2,), T, seed=T)
    want = ORACLES[name](**x)
    for backend in ("reference", "torch"):
        got = as_tuple(op(**x, backend=backend))
        assert len(got) == len(op.ir.outputs)
        for y, f in zip(got, op.ir.outputs):
            assert y.shape == want[f.name].shape
            assert max_rel_error(y, want[f.name]) < 1e-9, (backend, f.name)


@pytest.mark.parametrize("batch", [(), (4,), (2, 1, 3)])
def test_batch_shapes(batch):
    op = example_op("softmax_attn")
    x = random_inputs(op, batch, 9, seed=1)
    want = ORACLES["softmax_attn"](**x)["y"]
    assert max_rel_error(op(**x, backend="reference"), want) < 1e-12
    assert max_rel_error(op(**x), want) < 1e-12


def _tpsm_externs(C, D):
    torch.manual_seed(0)
    w1, w2 = torch.randn(D, D, dtype=torch.float64) / D, torch.randn(D, D, dtype=torch.float64) / D
    enc = lambda u: torch.tanh(u @ w1)  # noqa: E731
    agg = lambda a, b: torch.tanh(a @ w2 + b + a.cumsum(-2) * 0.1)  # noqa: E731  (non-associative)
    inf = lambda h, u: h * u + u.cumsum(-2)  # noqa: E731  (causal within the chunk)
    return enc, agg, inf


@pytest.mark.parametrize("T", [1, 2, 7, 64, 100])
def test_tpsm_with_externs_matches_its_loop(T):
    C, D = SMALL_DIMS["tpsm"]["C"], SMALL_DIMS["tpsm"]["D"]
    op = example_op("tpsm")
    enc, agg, inf = _tpsm_externs(C, D)
    op.bind(enc=enc, agg=agg, inf=inf)
    x = random_inputs(op, (2,), T, seed=T)
    want = ORACLES["tpsm"](x["u"], enc=enc, agg=agg, inf=inf, C=C)["y"]
    for backend in ("reference", "torch"):
        assert max_rel_error(op(**x, backend=backend), want) < 1e-12, backend


def _direct_tree_prefix(i, elements, combine, identity):
    """P_i straight from DESIGN.md: fold the aligned blocks of [0, i), largest first."""
    def total(start, size):
        if size == 1:
            return elements[start]
        return combine(total(start, size // 2), total(start + size // 2, size // 2))

    acc, start = identity, 0
    for bit in reversed(range(i.bit_length())):
        if i >> bit & 1:
            acc = combine(acc, total(start, 1 << bit))
            start += 1 << bit
    return acc


@pytest.mark.parametrize("T", [1, 3, 13, 37])
def test_canonical_tree_is_the_designs_definition(T):
    """Both paths of a non-associative op equal P_{i+1} computed from the definition, and a plain
    left fold (the wrong bracketing) does not."""
    op = example_op("nonassoc_mix")
    x = random_inputs(op, (), T, seed=7)
    u = x["u"] * 3  # large values make tanh's non-associativity obvious
    combine = lambda l, r: {  # noqa: E731  (written from the .psm by hand)
        "n": l["n"] + r["n"],
        "h": l["h"] if r["n"] == 0 else r["h"] if l["n"] == 0 else torch.tanh(l["h"] + r["h"])}
    elements = [{"n": 1.0, "h": u[t]} for t in range(T)]
    e = {"n": 0.0, "h": torch.zeros(3, dtype=torch.float64)}
    want = torch.stack([_direct_tree_prefix(i + 1, elements, combine, e)["h"] for i in range(T)])
    assert torch.allclose(torch.stack([p["h"] for p in canonical_prefixes(elements, combine, e)[1:]]), want)
    for backend in ("reference", "torch"):
        assert max_rel_error(op(u=u, backend=backend), want) < 1e-12, backend
    if T >= 4:  # the first prefix whose brackets differ is P_4 = (s0 s1)(s2 s3)
        acc, fold = e, []
        for s in elements:
            acc = combine(acc, s)
            fold.append(acc["h"])
        assert (torch.stack(fold) - want).abs().max() > 1e-3  # the tree is really a different tree


def test_float32_inputs_stay_float32_and_close():
    op = example_op("linrec")
    x = random_inputs(op, (3,), 50, dtype=torch.float32)
    y = op(**x)
    assert y.dtype == torch.float32
    want = ORACLES["linrec"](**{k: v.double() for k, v in x.items()})["y"]
    assert max_rel_error(y, want) < 1e-5


def test_integer_state_outputs_are_int64():
    op = example_op("cumcount")
    x = random_inputs(op, (2,), 33)
    npos, total = op(**x)
    assert npos.dtype == torch.int64 and total.dtype == torch.int64
    want = ORACLES["cumcount"](**x)
    assert torch.equal(npos, want["npos"]) and torch.equal(total, want["total"])
