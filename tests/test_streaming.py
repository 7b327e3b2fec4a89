"""Streaming non-associative ops: the binary counter's costs, and the duality guarantee.

DESIGN.md section 1: streaming keeps the counter's roots and the folds it may still need (at most
ceil(log2 N) + 1 states) and spends amortized at most 2 `combine` calls per element; the parallel
paths (torch levels, Triton tree), prefill + step, and the sequential reference all compute the
same canonical tree.
"""

from __future__ import annotations

import math

import pytest
import torch

from psmc import tree_backend
from psmc.standalone import Counter, tree_scan

from helpers import as_tuple, example_op, random_inputs
from test_tree import F32_TOL, F64_TOL, close, run_tree

NONASSOC = ["nonassoc_mix", "softmax_agg", "tpsm"]
LENGTHS = [1, 2, 3, 7, 64, 100, 1000]


def test_counter_costs_up_to_2_16():
    """Amortized combine calls per element <= 2 and states held <= ceil(log2 N) + 1, every N."""
    calls = 0

    def combine(a, b):
        nonlocal calls
        calls += 1
        return (a, b)  # any non-associative value: the nesting records the bracketing

    c = Counter(identity=())
    worst_states = 0
    for N in range(1, (1 << 16) + 1):
        c.push(N, combine)
        assert calls == c.calls <= 2 * N
        held = c.states_held()
        if N >= 2:  # one element: its root and its prefix (2 states; the bound reads 1)
            assert held <= math.ceil(math.log2(N)) + 1, (N, held)
        worst_states = max(worst_states, held)
    assert calls == 2 * (1 << 16) - 1  # merges N - popcount(N), folds N
    assert worst_states == 17  # reached at N = 2^16 - 1: 16 roots and the prefix


def test_counter_prefix_is_the_canonical_bracketing():
    def combine(a, b):
        return (a, b)

    c = Counter(identity="e")
    c.push("s0", combine), c.push("s1", combine), c.push("s2", combine)
    assert c.prefix() == (("e", ("s0", "s1")), "s2")  # P_3 = (e . T[0,2)) . T[2,3)
    c.push("s3", combine)
    assert c.prefix() == ("e", (("s0", "s1"), ("s2", "s3")))


def test_step_costs_through_the_op():
    op = example_op("nonassoc_mix")
    x = random_inputs(op, (), 2048, dtype=torch.float32, seed=3)["u"]
    st = op.init_state((), dtype=torch.float32)
    for t in range(x.shape[0]):
        _, st = op.step(st, u=x[t])
        n = t + 1
        assert st.counter.calls <= 2 * n
        assert n < 2 or st.states_held() <= math.ceil(math.log2(n)) + 1


@pytest.mark.parametrize("c", [0, 1, 2, 3, 5, 8, 13, 31])
def test_tree_scan_continues_any_counter(c):
    """The level path from a non-empty counter (global block alignment) = the sequential counter."""
    op = example_op("softmax_agg")
    fns = op.functions(torch.float64, torch.device("cpu"))
    x = random_inputs(op, (3,), c + 40, seed=c)
    el = fns.lift(x, (3, c + 40))
    comb = lambda a, b: fns.combine(a, b, next(iter(a.values())).shape[:2])
    take = lambda st, i: {k: v[:, i] for k, v in st.items()}
    seq = Counter(identity=fns.identity((3,), torch.float64, torch.device("cpu")))
    for i in range(c):
        seq.push(take(el, i), comb)
    for n in (1, 2, 3, 7, 16, 40):
        want = seq.copy()
        incl = [want.push(take(el, c + i), comb) for i in range(n)]
        part = {k: v[:, c:c + n] for k, v in el.items()}
        excl_p, incl_p, after = tree_scan(part, n, 1, comb, seq.identity, seq.copy())
        for i in range(n):
            close(tuple(take(incl_p, i).values()), tuple(incl[i].values()), F64_TOL)
        assert after.count == c + n and len(after.roots) == len(want.roots)
        for (la, a), (lb, b) in zip(after.roots, want.roots):
            assert la == lb
            close(tuple(a.values()), tuple(b.values()), F64_TOL)
        for a, b in zip(after.folds, want.folds):
            assert (a is None) == (b is None)
            if a is not None:
                close(tuple(a.values()), tuple(b.values()), F64_TOL)


def _prefill_then_step(op, x, t, nb):
    """op(x[:t], return_state=True), then op.step over x[t:], outputs concatenated."""
    ys, st = op(**{k: v.narrow(nb, 0, t) for k, v in x.items()}, return_state=True)
    ys = [as_tuple(ys)]
    for i in range(t, next(iter(x.values())).shape[nb]):
        y, st = op.step(st, **{k: v.select(nb, i) for k, v in x.items()})
        ys.append(tuple(o.unsqueeze(nb) for o in as_tuple(y)))
    return tuple(torch.cat(parts, dim=nb) for parts in zip(*ys))


@pytest.mark.parametrize("name", NONASSOC)
@pytest.mark.parametrize("T", LENGTHS)
def test_duality(name, T):
    """parallel (torch levels; Triton tree) = prefill + step = reference, tight tolerances."""
    op = example_op(name)
    if op.ir.externs:
        torch.manual_seed(0)
        from psmc.nn import tpsm_modules

        op.bind(**tpsm_modules(op.ir.chunk, op.ir.dim_values["D"], heads=1)).double()
    x = random_inputs(op, (2,), T, seed=T)
    want = op.reference(**x)
    close(op(**x, backend="torch"), want, F64_TOL)
    steps = 24 if op.ir.externs else 70  # the step loop is Python: keep it short at T = 1000
    for t in sorted({max(0, T - steps), max(0, T - 5), T - 1}):
        close(_prefill_then_step(op, x, t, 1), want, F64_TOL)
    if not op.ir.externs and T <= 100:  # the interpreted kernels: T = 1000 is in test_tree
        x32 = {k: v.float() for k, v in x.items()}
        close(run_tree(op, x32, lanes=2), want, F32_TOL)
        y1, st = run_tree(op, {k: v[:, :T // 2] for k, v in x32.items()}, return_state=True)
        y2 = run_tree(op, {k: v[:, T // 2:] for k, v in x32.items()}, initial=st)
        close(torch.cat([y1, y2], dim=1), want, F32_TOL)
