"""Strategy tree: the canonical-tree Triton kernels, run under Triton's interpreter (CPU).

Small blocks (4 to 64 elements) make short sequences span several blocks and several levels of
the block-totals recursion, which is where a wrong alignment would show. Tolerances are tight:
a wrong bracketing moves outputs by O(0.1) (test_wrong_bracketing_is_far_outside_tolerance).
"""

from __future__ import annotations

import re

import pytest
import torch

from psmc import tree_backend
from psmc.codegen import tree as tree_codegen
from psmc.errors import PsmCallError
from psmc.runtime import PsmOp
from psmc.standalone import prepare

from helpers import as_tuple, example_op, random_inputs

TREE_OPS = ["nonassoc_mix", "softmax_agg"]
F32_TOL = dict(rtol=1e-5, atol=1e-5)  # f32 kernels against the f64 reference
F64_TOL = dict(rtol=1e-12, atol=1e-12)


def run_tree(op, inputs, initial=None, return_state=False, block=16, lanes=None):
    """tree_backend.run with small blocks: `block` for the split/join family (gradients, stream
    state), `lanes` threads for the forward-only lanes family (a few elements each)."""
    with tree_backend.block_size(block, lanes):
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
    close(run_tree(op, x64, lanes=2), want, F64_TOL)  # 100 elements: 7 or 13 blocks, 2 levels up
    x32 = {k: v.float() for k, v in x64.items()}
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


@pytest.mark.parametrize("name", TREE_OPS)
def test_every_kernel_compiles_for_sm90(name):
    """Ahead of time, no GPU: the Triton → PTX → cubin pipeline for Hopper."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    op = example_op(name, D=2)
    tk, fns = tree_backend.kernels(op.ir, 8, interpret=False, lanes=4)
    assert set(tree_codegen.LANE_KINDS) <= set(tk.kinds)
    target = GPUTarget("cuda", 90, 32)
    for kind in tk.kinds:
        sig = tk.signature(kind)
        for has_start in ([True, False] if "HAS_START" in sig else [None]):
            consts = {"ACC": tl.float32}
            if has_start is not None:
                consts["HAS_START"] = has_start
            compiled = triton.compile(ASTSource(fn=fns[kind], signature=sig, constexprs=consts),
                                      target=target)
            assert compiled.asm["cubin"], (kind, has_start)
