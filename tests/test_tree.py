"""Strategy tree: the canonical-tree Triton kernels, run under Triton's interpreter (CPU).

Small blocks (4 to 64 elements) make short sequences span several blocks and several levels of
the block-totals recursion, which is where a wrong alignment would show. Tolerances are tight:
a wrong bracketing moves outputs by O(0.1) (test_wrong_bracketing_is_far_outside_tolerance).
"""

from __future__ import annotations

import re

import pytest
import torch

import psmc
from psmc import cache, tree_backend
from psmc.codegen import tree as tree_codegen
from psmc.errors import PsmCallError
from psmc.runtime import PsmOp
from psmc.standalone import prepare

from helpers import as_tuple, example_op, random_inputs
from oracles import ORACLES, canonical_exclusive, canonical_prefixes

TREE_OPS = ["nonassoc_mix", "softmax_agg"]
F32_TOL = dict(rtol=1e-5, atol=1e-5)  # f32 kernels against the f64 reference
F64_TOL = dict(rtol=1e-12, atol=1e-12)


def run_tree(op, inputs, initial=None, return_state=False, block=16, lanes=None, per_lane=None):
    """tree_backend.run with small blocks: `block` for the split/join family (gradients, stream
    state), `lanes` threads of `per_lane` elements for the forward-only lanes family."""
    with tree_backend.block_size(block, lanes, per_lane):
        return tree_backend.run(op, prepare(op.spec, inputs), initial, return_state, strict=True)


def close(got, want, tol):
    for g, w in zip(as_tuple(got), as_tuple(want)):
        torch.testing.assert_close(g.double(), w.double(), **tol)


@pytest.mark.parametrize("name", TREE_OPS)
@pytest.mark.parametrize("T", [1, 2, 3, 7, 64, 100])
def test_forward_equals_reference(name, T):
    op = example_op(name)
    x64 = random_inputs(op, (2,), T, seed=T)
    want = op.reference(**x64)
    x32 = {k: v.float() for k, v in x64.items()}  # the lanes kernels (more in the tests above)
    got = run_tree(op, x32, lanes=4)
    assert as_tuple(got)[0].dtype == torch.float32
    close(got, want, F32_TOL)
    with torch.enable_grad():  # with gradients: the split/join family, 25 blocks, 3 levels up
        close(run_tree(op, {k: v.requires_grad_() for k, v in x64.items()}, block=4), want, F64_TOL)


@pytest.mark.parametrize("name", TREE_OPS)
def test_forward_long_sequence(name):
    """T = 1000: 16 blocks of 64 (split/join), 16 or 32 blocks of 8 lanes (lanes family), their
    totals scanned by a second tree pass."""
    op = example_op(name)
    x = random_inputs(op, (), 1000, dtype=torch.float32, seed=5)
    want = op(**{k: v.double() for k, v in x.items()}, backend="torch")  # f64, the same tree
    close(run_tree(op, x, lanes=8), want, F32_TOL)
    close(run_tree(op, {k: v.requires_grad_() for k, v in x.items()}, block=64), want, F32_TOL)


# ---- the forward-only lanes kernels: in-lane subtrees, the cross-lane gather tree ----------------

# (lanes, elements a lane, T): T = 1; T shorter than one block; 5 blocks whose totals one more
# block scans; 18 blocks of 4, their totals scanned over three levels of blocks (lanes_up_s);
# whole blocks only (the last lane's end prefix comes from the scan); the GPU's 32 x 4, 3 blocks
LANE_CASES = [(2, 2, 1), (4, 2, 5), (4, 2, 37), (2, 2, 70), (4, 4, 64), (32, 4, 300)]


@pytest.mark.parametrize("name", TREE_OPS)
@pytest.mark.parametrize("lanes,per_lane,T", LANE_CASES)
def test_lanes_kernels_equal_the_designs_tree(name, lanes, per_lane, T):
    """The lanes kernels against tests/oracles.py, which folds DESIGN.md's aligned blocks
    literally (f64, and f32 for the GPU's configuration); softmax_agg's identity has w = -inf."""
    op = example_op(name)
    x = random_inputs(op, (2,), T, seed=lanes * 1000 + T)
    want = ORACLES[name](**x)["y"]
    with torch.no_grad():
        close(run_tree(op, x, lanes=lanes, per_lane=per_lane), want, F64_TOL)
        if (lanes, per_lane) == tree_codegen.lane_config(op.ir):
            x32 = {k: v.float() for k, v in x.items()}
            close(run_tree(op, x32, lanes=lanes, per_lane=per_lane), want, F32_TOL)


@pytest.mark.parametrize("name", TREE_OPS)
@pytest.mark.parametrize("T,kinds", [
    (9, ["lanes_up_x", "lanes_down_t"]),    # 2 blocks of 8: each block scans the 2 totals itself
    (32, ["lanes_up_x", "lanes_down_t"]),   # 4 blocks, as many as lanes: still in place
    (33, ["lanes_up_x", "lanes_down_s", "lanes_down_x"]),  # 5 blocks: their totals' own launch
])
def test_lanes_launches_by_row_length(monkeypatch, name, T, kinds):
    """A fresh forward call of more than one block: lanes_up_x (block totals and every lane's
    up-sweep total), then for rows of at most `lanes` blocks lanes_down_t (each program scans the
    row's totals itself), else the totals' prefixes by lanes_down_s and lanes_down_x. Both agree
    with the design's tree, and with each other when the in-place start is switched off."""
    op = example_op(name)
    x = random_inputs(op, (3,), T, seed=T)
    want = ORACLES[name](**x)["y"]
    mod = tree_backend.module(op.ir, 16, 4, interpret=True, per_lane=2)
    ran = []
    launch = mod._TreeCall.launch
    monkeypatch.setattr(mod._TreeCall, "launch", lambda self, kind, *a, **k: (ran.append(kind), launch(self, kind, *a, **k)))
    with torch.no_grad():
        got = run_tree(op, x, lanes=4, per_lane=2)
        assert ran == kinds
        close(got, want, F64_TOL)
        monkeypatch.setattr(mod, "_TREE_TOTALS_IN_PLACE", False)
        ran.clear()
        close(run_tree(op, x, lanes=4, per_lane=2), got, dict(rtol=0, atol=0))
        assert "lanes_down_t" not in ran


@pytest.mark.parametrize("per_lane,computed,skipped", [(4, ["u1_0"], ["u1_1", "u2_0"]),
                                                        (8, ["u1_0", "u1_1", "u1_2", "u2_0"], ["u1_3", "u2_1", "u3_0"])])
def test_down_kernels_take_the_up_sweep_from_lanes_up_x(per_lane, computed, skipped):
    """After lanes_up_x the down kernels load every lane's up-sweep total and compute only the
    in-lane left children their down-sweep reads: no cross-lane up-sweep, no lane total."""
    op = example_op("nonassoc_mix")
    src = tree_codegen.generate(op.ir, 8, lanes=4, per_lane=per_lane).source
    kernel = src[src.index("def nonassoc_mix_tree_lanes_down_t("):]
    assert "tl.load(lt_ptr" in kernel and "tl.gather(t0_n, lane ^ 1, 0)" not in kernel
    for u in computed:
        assert f"{u}_n, " in kernel, u
    for u in skipped:
        assert f"{u}_n, " not in kernel, u
    up = src[src.index("def nonassoc_mix_tree_lanes_up_x("):src.index("def nonassoc_mix_tree_lanes_up_s(")]
    assert "tl.store(lt_ptr" in up


# the tests' examples have 4 (nonassoc_mix[D=3]) and 6 (softmax_agg[D=4]) state scalars
@pytest.mark.parametrize("name,D,per_lane,handoff", [
    ("nonassoc_mix", 3, 2, True), ("nonassoc_mix", 4, 2, False),  # 4 / 2 = 2 words; 5 / 2
    ("softmax_agg", 4, 2, False), ("softmax_agg", 4, 4, True)])  # 6 / 2 = 3; 6 / 4 = 1.5
def test_lane_totals_handed_over_when_they_are_few_words(name, D, per_lane, handoff):
    """lanes_up_x hands its lane totals to the down kernels only at <= LANE_TOTAL_WORDS (2)
    state words an element; else the down kernels run the whole up-sweep themselves and nothing
    is written for them."""
    assert tree_codegen.LANE_TOTAL_WORDS == 2
    op = example_op(name, D=D)
    tk = tree_codegen.generate(op.ir, 8, lanes=4, per_lane=per_lane)
    assert tk.lane_totals is handoff
    src = tk.source
    down = src[src.index(f"def {name}_tree_lanes_down_t("):]
    assert ("tl.load(lt_ptr" in down) is handoff
    assert ("tl.store(lt_ptr" in src) is handoff
    assert ("tl.gather(t0_n, lane ^ 1, 0)" in down) is not handoff  # the cross-lane up-sweep


@pytest.mark.parametrize("name", TREE_OPS)
@pytest.mark.parametrize("T", [40, 100])  # 5 blocks of 8 (lanes_down_t), 13 (the totals' launch)
def test_lane_totals_handed_over_or_not_give_the_designs_tree(monkeypatch, tmp_path, name, T):
    """Both settings of the hand-over, forced (modules generated into tmp_path, not the cache),
    against the design's tree at f64 tolerance and bit for bit against each other."""
    op = example_op(name)
    x = random_inputs(op, (2,), T, seed=T)
    want = ORACLES[name](**x)["y"]
    got = []
    for handoff in (True, False):
        monkeypatch.setattr(tree_codegen, "LANE_TOTALS", handoff)
        path = tmp_path / f"handoff_{handoff}.py"
        path.write_text(tree_codegen.generate_module(op.ir, "test", 16, lanes=8, per_lane=2))
        mod = cache.load(path, interpret=True)
        assert getattr(mod, f"{name.upper()}_TREE")["lane_totals"] is handoff
        with torch.no_grad():
            got.append(getattr(mod, f"{name}_tree")(op.spec, op.functions(torch.float64, torch.device("cpu")),
                                                    prepare(op.spec, x), None, False))
        close(got[-1], want, F64_TOL)
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)


MIX_EXCLUSIVE = """
op mix_excl[D = 3] {
  expect nonassociative
  input  u: f32[D]
  state  n: f32 = 0, h: f32[D] = 0
  lift(x) { n = 1; h = x.u }
  combine(l, r) {
    n = l.n + r.n
    h = where(l.n == 0, r.h, where(r.n == 0, l.h, tanh(l.h + r.h)))
  }
  output(s, x) exclusive { y = s.h * x.u }
}
"""


@pytest.mark.parametrize("lanes,per_lane,T", [(2, 2, 1), (4, 2, 37), (2, 2, 40), (4, 4, 64)])
def test_lanes_kernels_exclusive_output(lanes, per_lane, T):
    """`output(s, x) exclusive`: element i reads P_i (P_0 = e), from the definition."""
    op = psmc.compile_source(MIX_EXCLUSIVE)["mix_excl"]
    u = random_inputs(op, (2,), T, seed=T)["u"] * 3

    def combine(l, r):  # written from the .psm by hand
        ln, rn = l["n"][..., None], r["n"][..., None]
        return {"n": l["n"] + r["n"],
                "h": torch.where(ln == 0, r["h"], torch.where(rn == 0, l["h"], torch.tanh(l["h"] + r["h"])))}

    elements = [{"n": torch.ones(2, dtype=u.dtype), "h": u[:, t]} for t in range(T)]
    e = {"n": torch.zeros(2, dtype=u.dtype), "h": torch.zeros(2, 3, dtype=u.dtype)}
    want = torch.stack([p["h"] for p in canonical_exclusive(elements, combine, e)], dim=1) * u
    with torch.no_grad():
        close(run_tree(op, {"u": u}, lanes=lanes, per_lane=per_lane), want, F64_TOL)


@pytest.mark.parametrize("name", TREE_OPS)
@pytest.mark.parametrize("lanes,per_lane,T", [(2, 2, 1), (4, 2, 8), (2, 2, 37), (4, 4, 70)])
def test_lanes_prefix_kernels_give_every_canonical_prefix(name, lanes, per_lane, T):
    """The prefix kernels (lanes_up_s / lanes_down_s, which scan the block totals) on lifted
    states: all T + 1 prefixes P_0 = e ... P_T, against canonical_prefixes with the op's IR
    interpreter as combine."""
    op = example_op(name)
    x = random_inputs(op, (2,), T, seed=T)
    fns = op.functions(torch.float64, torch.device("cpu"), interpreted=True)
    states = fns.lift(x, (2, T))
    elements = [{k: v[:, t] for k, v in states.items()} for t in range(T)]
    want = canonical_prefixes(elements, lambda l, r: fns.combine(l, r, (2,)),
                              fns.identity((2,), torch.float64, torch.device("cpu")))
    mod = tree_backend.module(op.ir, 16, lanes, interpret=True, per_lane=per_lane)
    tree = mod._TreeCall(getattr(mod, f"{name.upper()}_TREE"), op.spec, torch.device("cpu"), 2, torch.float64)
    got = mod._tree_fast_prefixes(tree, mod._tree_to_slots(tree, op.spec, states, T), T)
    stacked = {k: torch.stack([p[k] for p in want], dim=1) for k in states}
    torch.testing.assert_close(got, mod._tree_to_slots(tree, op.spec, stacked, T + 1), **F64_TOL)


def _left_fold_lane_total(self):
    """A wrong in-lane bracketing: a lane's total as ((s0 s1) s2) s3, not (s0 s1)(s2 s3)."""
    lines = _REAL_UP(self)
    i = next(i for i, line in enumerate(lines) if line.startswith("u2_0_"))
    lines[i:i + 1] = [self.fns.call(self.vars("lf"), "combine", self.vars("u1_0"), self.vars("u0_2")),
                      self.fns.call(self.vars("u2_0"), "combine", self.vars("lf"), self.vars("u0_3"))]
    return lines


def _folded_lane_end(self):
    """A wrong cross-lane bracketing: a lane's inclusive end as combine(its prefix, its total),
    not the next lane's prefix (lane 3's end is then (((T0 T1) T2) T3), not (T0 T1)(T2 T3)).
    The lane's total is folded here from its elements (u0_*), which every kernel has (a down
    kernel after lanes_up_x does not run the in-lane up-sweep to its top)."""
    lines = _REAL_CROSS_DOWN(self)
    i = next(i for i, line in enumerate(lines) if line.startswith("q0_"))
    total = [self.fns.call(self.vars("mf0"), "combine", self.vars("u0_0"), self.vars("u0_1"))]
    for j in range(2, self.E):
        total.append(self.fns.call(self.vars(f"mf{j - 1}"), "combine", self.vars(f"mf{j - 2}"), self.vars(f"u0_{j}")))
    # the lane total bracketed as ((s0 s1) s2) s3: wrong too, but the test is about the end
    lines[i:] = total + [self.fns.call(self.vars("q0"), "combine", self.vars("p0"), self.vars(f"mf{self.E - 2}"))]
    return lines


_REAL_UP, _REAL_CROSS_DOWN = tree_codegen._Lanes.up, tree_codegen._Lanes.cross_down


@pytest.mark.parametrize("method,wrong", [("up", _left_fold_lane_total), ("cross_down", _folded_lane_end)])
def test_lanes_tests_catch_a_wrong_bracketing(monkeypatch, tmp_path, method, wrong):
    """The lanes kernels generated with a plausible wrong bracketing miss the oracle by far more
    than the tolerances above (the mutated module is loaded from tmp_path, not the cache)."""
    op = example_op("nonassoc_mix")
    x = random_inputs(op, (2,), 100, seed=3)  # 7 blocks of 16: up_x, the totals' scan, down_x
    want = ORACLES["nonassoc_mix"](**x)["y"]
    monkeypatch.setattr(tree_codegen._Lanes, method, wrong)
    path = tmp_path / "mutant.py"
    path.write_text(tree_codegen.generate_module(op.ir, "mutant", 16, lanes=4, per_lane=4))
    mod = cache.load(path, interpret=True)
    with torch.no_grad():
        got = mod.nonassoc_mix_tree(op.spec, op.functions(torch.float64, torch.device("cpu")),
                                    prepare(op.spec, x), None, False)
    assert (got - want).abs().max().item() > 1e3 * F64_TOL["atol"] + 1e3 * F32_TOL["atol"]


@pytest.mark.parametrize("name", TREE_OPS)
@pytest.mark.parametrize("T,block", [(1, 4), (7, 4), (37, 4), (64, 16)])
def test_backward_equals_reference_autograd(name, T, block):
    """The reverse kernels (sympy Jacobians over the same tree) against autograd of the oracle."""
    op = example_op(name)
    x = {k: v.requires_grad_() for k, v in random_inputs(op, (2,), T, seed=T).items()}
    w = [torch.randn_like(y) for y in as_tuple(op.reference(**x))]
    loss = lambda ys: sum((y * wi).sum() for y, wi in zip(as_tuple(ys), w))
    want = torch.autograd.grad(loss(op.reference(**x)), list(x.values()))
    got = torch.autograd.grad(loss(run_tree(op, x, block=block)), list(x.values()))
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, **F64_TOL)


@pytest.mark.parametrize("name", TREE_OPS)
def test_wrong_bracketing_is_far_outside_tolerance(name):
    """A left fold, or a balanced tree aligned differently, is O(0.1) away: the tests can tell."""
    op = example_op(name)
    x = random_inputs(op, (2,), 100, seed=1)
    right = op.reference(**x)
    left_fold = PsmOp(op.ir, associative=True).reference(**x)
    hillis_steele = PsmOp(op.ir, associative=True)(**x, backend="torch")
    shifted = torch.cat([op.reference(**{k: v[:, :3] for k, v in x.items()}),  # blocks from 3 on
                         op.reference(**{k: v[:, 3:] for k, v in x.items()})], dim=1)
    for wrong in (left_fold, hillis_steele):
        assert (wrong - right).abs().max().item() > 1e3 * F32_TOL["atol"]
    assert (shifted[:, 3:] - right[:, 3:]).abs().max().item() > 1e3 * F32_TOL["atol"]
    close(run_tree(op, {k: v.float() for k, v in x.items()}), right, F32_TOL)


@pytest.mark.parametrize("name", TREE_OPS)
@pytest.mark.parametrize("split", [0, 1, 5, 8, 13, 40])
def test_prefill_continue_and_state(name, split):
    """return_state / initial_state: the stream's block grid, torch head and tail, kernel middle."""
    op = example_op(name)
    T = 40
    x = random_inputs(op, (2,), T, seed=split)
    want, want_state = op.reference(**x, return_state=True)
    y1, st = run_tree(op, {k: v[:, :split] for k, v in x.items()}, return_state=True, block=4)
    y2, st = run_tree(op, {k: v[:, split:] for k, v in x.items()}, initial=st, return_state=True, block=4)
    close(torch.cat([y1, y2], dim=1), want, F64_TOL)
    assert st.counter.count == T and st.tokens == T
    assert [lv for lv, _ in st.counter.roots] == [lv for lv, _ in want_state.counter.roots]
    for (_, a), (_, b) in zip(st.counter.roots, want_state.counter.roots):
        close(tuple(a.values()), tuple(b.values()), F64_TOL)
    assert [f is None for f in st.counter.folds] == [f is None for f in want_state.counter.folds]
    y3, _ = op.step(st, **{k: v[:, 0] for k, v in random_inputs(op, (2,), 1, seed=99).items()})
    assert torch.isfinite(y3).all()


def test_extern_and_chunked_ops_go_to_the_level_path():
    op = example_op("tpsm")
    x = random_inputs(op, (1,), 5)
    assert tree_backend.run(op, prepare(op.spec, x), None, False, strict=True) is None


def test_strict_call_says_why():
    op = PsmOp(example_op("nonassoc_mix").ir, associative=True)
    x = random_inputs(op, (1,), 5)
    with pytest.raises(PsmCallError, match="associative"):
        tree_backend.run(op, prepare(op.spec, x), None, False, strict=True)
    assert tree_backend.run(op, prepare(op.spec, x), None, False, strict=False) is None


def test_backend_triton_reaches_the_tree_kernels():
    """Through the public API: backend="triton" takes non-associative ops to the tree kernels."""
    op = example_op("nonassoc_mix")
    x = random_inputs(op, (2,), 9)
    close(op(**x, backend="triton"), op.reference(**x), F64_TOL)


@pytest.mark.parametrize("name", TREE_OPS)
def test_generated_source_is_readable_and_interpreter_safe(name):
    op = example_op(name)
    src = tree_codegen.generate(op.ir, 8).source
    for kind in ("lift", "combine", "output"):
        assert re.search(rf"# {name}\.psm:\d+ {kind}\b", src), kind
    assert "# level 2 -> 3: 1 parent" in src  # straight-line levels for blocks of 8
    # the standard library's @jit helpers cannot run in an interpreted kernel of this process
    assert not re.search(r"tl\.(sigmoid|zeros|zeros_like|cdiv|softmax|sum|max|min)\(", src)
    for k in tree_codegen.KINDS:
        assert f"def {name}_tree_{k}(" in src
    lanes = tree_codegen.generate(op.ir, 8, lanes=4, per_lane=4).source
    for k in tree_codegen.LANE_KINDS:
        assert f"def {name}_tree_{k}(" in lanes
    assert "# inside each lane: the subtree of its 4 elements" in lanes
    # across lanes one value a thread: a gather per level, no split/join
    kernel = lanes[lanes.index(f"def {name}_tree_lanes_up_s("):lanes.index(f"def {name}_tree_lanes_down_x(")]
    assert "tl.gather(t1_n, lane ^ 2, 0)" in kernel and "tl.split" not in kernel and "tl.join" not in kernel
