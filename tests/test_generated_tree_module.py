"""The module `psmc compile` writes for a non-associative expression op runs the canonical-tree
kernels on its own (torch + triton only): forward, gradients through the reverse kernels, and
return_state / initial_state with the binary counter, under TRITON_INTERPRET=1 in a fresh process.
Results come back in a file and are checked here against the package's reference path (the
canonical tree by definition), with the tolerances of test_tree.py, which a wrong bracketing
misses by orders of magnitude (checked below as well).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from psmc import cache
from psmc.codegen import tree as tree_codegen
from psmc.runtime import PsmOp

from helpers import as_tuple, example_op, random_inputs
from test_tree import F32_TOL, F64_TOL, TREE_OPS, close

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (1, 2, 3, 7, 64, 100)
GRAD_LENGTHS = (7, 100)  # one block of 64; two blocks, their totals scanned by the same tree
SPLIT, LONG = 10, 200  # continuing at 10: torch head 10..63, kernels on 64..191, torch tail

SCRIPT = textwrap.dedent("""
    import importlib, sys, torch
    sys.path.insert(0, sys.argv[1])
    mod = importlib.import_module(sys.argv[2])
    assert "psmc" not in sys.modules  # torch and triton only
    op = getattr(mod, sys.argv[3])()
    inputs = torch.load(sys.argv[4])
    one = lambda y: y if isinstance(y, tuple) else (y,)
    out = {}
    for T in %(lengths)r:
        x = inputs[T]
        out["f64", T] = one(op(**x, backend="triton"))
        out["f32", T] = one(op(**{k: v.float() for k, v in x.items()}, backend="triton"))
    for T in %(grad_lengths)r:
        xs = {k: v.clone().requires_grad_() for k, v in inputs[T].items()}
        ys = one(op(**xs, backend="triton"))
        loss = sum((y * w).sum() for y, w in zip(ys, inputs["w", T]))
        out["grad", T] = torch.autograd.grad(loss, list(xs.values()))
    x = inputs[%(long)d]
    head = {k: v[:, :%(split)d] for k, v in x.items()}
    tail = {k: v[:, %(split)d:] for k, v in x.items()}
    y1, st = op(**head, backend="triton", return_state=True)   # the counter after a prefill
    y2, st = op(**tail, backend="triton", initial_state=st, return_state=True)
    out["continued"] = tuple(torch.cat([a, b], dim=1) for a, b in zip(one(y1), one(y2)))
    out["counter"] = (st.counter.count, st.tokens, [(lv, r) for lv, r in st.counter.roots],
                      [f is None for f in st.counter.folds])
    x = inputs[100]
    _, st = op(**{k: v[:, :70] for k, v in x.items()}, backend="triton", return_state=True)
    steps = []
    for t in range(70, 100):
        y, st = op.step(st, **{k: v[:, t] for k, v in x.items()})
        steps.append(one(y))
    out["stepped"] = tuple(torch.stack(ys, dim=1) for ys in zip(*steps))
    torch.save(out, sys.argv[5])
    print("ok")
""") % dict(lengths=LENGTHS, grad_lengths=GRAD_LENGTHS, long=LONG, split=SPLIT)

CLASSES = {"nonassoc_mix": "NonassocMix", "softmax_agg": "SoftmaxAgg"}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    files = [str(ROOT / "examples" / f"{n}.psm") for n in TREE_OPS]
    subprocess.run([sys.executable, "-m", "psmc.cli", "compile", *files, "-o", str(out), "--set", "D=3"],
                   check=True, capture_output=True, cwd=ROOT)
    return out


def _inputs(op) -> dict:
    xs = {T: random_inputs(op, (2,), T, seed=T) for T in set(LENGTHS) | {LONG}}
    for T in GRAD_LENGTHS:
        xs["w", T] = [torch.randn_like(y) for y in as_tuple(op.reference(**xs[T]))]
    return xs


@pytest.mark.parametrize("name", TREE_OPS)
def test_vendored_tree_module_matches_the_package(build, tmp_path, name):
    text = (build / f"{name}.py").read_text()
    for kind in tree_codegen.KINDS + tree_codegen.LANE_KINDS:
        assert f"def {name}_tree_{kind}(" in text
    assert "import psmc" not in text and "from psmc" not in text
    assert text.count("class _PsmcLaunch:") == 1  # direct launches, the scan modules' own class
    assert f"return {name}_tree(SPEC, fns, p, initial_state, return_state)" in text
    op = example_op(name, D=3)
    xs = _inputs(op)
    torch.save(xs, tmp_path / "inputs.pt")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(build), name, CLASSES[name],
                        str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                       capture_output=True, text=True, timeout=600,
                       env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")

    for T in LENGTHS:  # forward, f64 and f32 kernels, against the oracle in f64
        want = op.reference(**xs[T])
        close(got["f64", T], want, F64_TOL)
        assert got["f32", T][0].dtype == torch.float32
        close(got["f32", T], want, F32_TOL)
    wrong = PsmOp(op.ir, associative=True).reference(**xs[100])  # a left fold: far outside
    assert (wrong - op.reference(**xs[100])).abs().max().item() > 1e3 * F32_TOL["atol"]

    for T in GRAD_LENGTHS:  # every float input's gradient, against autograd of the oracle
        x = {k: v.clone().requires_grad_() for k, v in xs[T].items()}
        loss = sum((y * w).sum() for y, w in zip(as_tuple(op.reference(**x)), xs["w", T]))
        want = torch.autograd.grad(loss, list(x.values()))
        assert len(got["grad", T]) == len(want)
        for g, h in zip(got["grad", T], want):
            torch.testing.assert_close(g, h, **F64_TOL)

    # prefill (kernels on the first block) + continue (torch head, kernels, torch tail) == one call,
    # and the binary counter equals the reference's
    want, want_state = op.reference(**xs[LONG], return_state=True)
    close(got["continued"], want, F64_TOL)
    count, tokens, roots, dropped = got["counter"]
    assert count == tokens == LONG
    assert [lv for lv, _ in roots] == [lv for lv, _ in want_state.counter.roots]
    for (_, a), (_, b) in zip(roots, want_state.counter.roots):
        close(tuple(a.values()), tuple(b.values()), F64_TOL)
    assert dropped == [f is None for f in want_state.counter.folds]
    # the counter after a parallel prefill of 70, then 30 steps == one parallel call
    close(got["stepped"], tuple(y[:, 70:] for y in as_tuple(op.reference(**xs[100]))), F64_TOL)


@pytest.mark.parametrize("kind", tree_codegen.KINDS + tree_codegen.LANE_KINDS)
@pytest.mark.parametrize("name", TREE_OPS)
def test_vendored_tree_kernels_compile_for_sm90(build, name, kind):
    """The vendored module's own kernels, imported compiled (not interpreted), ahead of time: one
    test a kernel, so that pytest-xdist spreads the compiles over its workers."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    op = example_op(name, D=3)
    mod = cache.load(build / f"{name}.py", interpret=False)
    table = getattr(mod, f"{name.upper()}_TREE")
    lanes = tree_codegen.LANES
    tk = tree_codegen.generate(op.ir, table["block"], lanes, table["lane_block"] // lanes)
    assert set(table["kernels"]) == set(tk.kinds)
    sig = tk.signature(kind)
    for has_start in ([True, False] if "HAS_START" in sig else [None]):  # a stream's blocks; a fresh call's
        consts = {"ACC": tl.float32, **({} if has_start is None else {"HAS_START": has_start})}
        compiled = triton.compile(ASTSource(fn=table["kernels"][kind], signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": table["lane_warps" if kind.startswith("lanes_") else "warps"]})
        assert ".target sm_90" in compiled.asm["ptx"], (kind, has_start)
        assert compiled.asm["cubin"], (kind, has_start)
