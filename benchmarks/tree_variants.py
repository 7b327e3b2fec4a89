"""Variants of the tree's forward path for nonassoc_mix[D=4] (32 lanes x 4), timed side by side:
where does its time go? (Exploratory; results in BENCHMARKS.md.)

    python3 benchmarks/tree_variants.py [--sizes 64x4096,256x16384,64x262144,8x1048576]

Variants: the three-launch path (block totals, their prefixes, outputs) and the one-pass kernel
(lanes_chain_x), each generated with inputs and outputs moved as block tiles (TILE_MOVES, the
default) or as strided per-element vectors; and text edits of the one-pass kernel (no waiting,
a probe that computes wrong prefixes; nanosleep between polls). Each is imported compiled and
called through its entry; times are CUDA-graph replays (kernels alone), then GPU time per kernel
from torch.profiler.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import psmc  # noqa: E402
from benchmarks.timing import graph_replay  # noqa: E402
from psmc import cache  # noqa: E402
from psmc.codegen import tree as tree_codegen  # noqa: E402
from psmc.standalone import prepare  # noqa: E402

SLEEP = ('        _ = tl.inline_asm_elementwise("nanosleep.u32 {ns}; mov.u32 $0, 0;", "=r,r", [tag.to(tl.int32)], '
         'dtype=tl.int32, is_pure=False, pack=1)\n')


def no_wait(text: str) -> str:
    """The records' wait loop removed: one load each (a timing probe, wrong when a record is late)."""
    return re.sub(r"    while tl\.reduce\(.*?\n(        .*\n)+", "", text)


def sleep(ns: int):
    def edit(text: str) -> str:
        i = text.index("    while tl.reduce(")
        j = text.index("\n", i) + 1
        return text[:j] + SLEEP.format(ns=ns) + text[j:]
    return edit


EDITS = {"no-wait": no_wait, "sleep-500": sleep(500)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64x4096,256x16384,64x262144,8x1048576")
    args = ap.parse_args()
    import triton
    from diagnose_host import gpu_kernel_us

    op = psmc.compile_file(ROOT / "examples/nonassoc_mix.psm", D=4)["nonassoc_mix"]
    texts = {}
    for tiles in (True, False):
        tree_codegen.TILE_MOVES = tiles
        texts["tile" if tiles else "strided"] = tree_codegen.generate_module(
            op.ir, psmc.__version__, tree_codegen.BLOCK, 32, 4)
    tree_codegen.TILE_MOVES = True
    folder = Path(tempfile.mkdtemp())
    variants = {}  # name -> (module, one pass?)
    for layout, text in texts.items():
        for one_pass in (False, True):
            name = f"{layout}/{'1-pass' if one_pass else '3-launch'}"
            path = folder / f"v_{layout}_{int(one_pass)}.py"
            path.write_text(text)
            variants[name] = (cache.load(path), one_pass)
    for edit, fn in EDITS.items():
        path = folder / f"v_{edit.replace('-', '_')}.py"
        path.write_text(fn(texts["tile"]))
        variants[f"tile/1-pass/{edit}"] = (cache.load(path), True)
    fns = op.functions(torch.float32, torch.device("cuda"))
    for size in args.sizes.split(","):
        B, T = map(int, size.split("x"))
        u = torch.randn(B, T, 4, device="cuda")
        want = op(u=u.double(), backend="torch")
        p = prepare(op.spec, {"u": u})
        cells, kernels = [], []
        for name, (mod, one_pass) in variants.items():
            mod._TREE_ONE_PASS = one_pass
            call = lambda: mod.nonassoc_mix_tree(op.spec, fns, p, None, False)
            err = (call().double() - want).abs().max().item()
            us = triton.testing.do_bench(graph_replay(call), return_mode="median") * 1e3
            cells.append(f"{name} {us:.1f} us (err {err:.0e})")
            per = gpu_kernel_us(call, 20)
            kernels.append(f"  {name}: " + ", ".join(f"{k.removeprefix('nonassoc_mix_tree_')} {v:.1f}" for k, v in per))
        print(f"{size}: " + "; ".join(cells), flush=True)
        print("\n".join(kernels), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
