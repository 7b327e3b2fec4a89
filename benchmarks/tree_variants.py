"""Variants of the tree's forward path (nonassoc_mix[D=4], or softmax_agg), timed side by side:
where does its time go? (Exploratory; results in BENCHMARKS.md.)

    python3 benchmarks/tree_variants.py [--op softmax_agg] [--sizes 64x4096,256x16384] [--variants 32x4,32x4/scan]

Variants (`--variants`): a lanes configuration (lanes x elements a lane); for rows of at most
`lanes` blocks, outputs from the block totals by each program itself (lanes_down_t, two launches)
or from their prefixes scanned by a launch of its own (three launches, `/scan`); with the lane
totals handed from lanes_up_x to the down kernel forced on (`/handoff`) or off (`/recompute`),
else by psmc's rule (tree_codegen.LANE_TOTAL_WORDS). `--op softmax_agg` times that example. Earlier runs
(benchmarks/results/run9/) also compared a one-pass kernel, block-tile moves and programmatic
dependent launch, since removed: the commits that had them say how to run those. Each module is imported
compiled and called through its entry; times are CUDA-graph replays (kernels alone), then GPU
time per kernel from torch.profiler. Every variant is checked against the f64 torch path first.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64x4096,256x16384,64x262144,8x1048576")
    ap.add_argument("--variants", default="32x4,32x4/scan,32x8,32x2",
                    help="config[/scan][/handoff|/recompute], comma-separated")
    ap.add_argument("--op", default="nonassoc_mix", choices=["nonassoc_mix", "softmax_agg"])
    args = ap.parse_args()
    import triton
    from diagnose_host import gpu_kernel_us

    op = psmc.compile_file(ROOT / f"examples/{args.op}.psm")[args.op]
    folder = Path(tempfile.mkdtemp())
    variants = {}  # name -> (module, totals in place?)
    for name in args.variants.split(","):
        config, *flags = name.split("/")
        lanes, per_lane = map(int, config.split("x"))
        handoff = True if "handoff" in flags else False if "recompute" in flags else None
        path = folder / f"v_{config}_{handoff}.py"
        if not path.exists():
            tree_codegen.LANE_TOTALS = handoff
            path.write_text(tree_codegen.generate_module(op.ir, psmc.__version__, tree_codegen.BLOCK, lanes, per_lane))
            tree_codegen.LANE_TOTALS = None
        variants[name] = (cache.load(path), "scan" not in flags)
    fns = op.functions(torch.float32, torch.device("cuda"))
    table, entry = f"{args.op.upper()}_TREE", f"{args.op}_tree"
    bad = 0
    for size in args.sizes.split(","):
        B, T = map(int, size.split("x"))
        xs = {f.name: torch.randn((B, T) + f.type.shape, device="cuda") for f in op.ir.inputs}
        p = prepare(op.spec, xs)
        cells, kernels = [], []
        for name, (mod, in_place) in variants.items():
            nblk = -(-T // getattr(mod, table)["lane_block"])
            if not in_place and nblk > getattr(mod, table)["lanes"]:
                continue  # the same launches as without /scan

            def call(mod=mod, in_place=in_place):
                mod._TREE_TOTALS_IN_PLACE = in_place
                return getattr(mod, entry)(op.spec, fns, p, None, False)

            errs = []
            for _ in range(3):  # fresh inputs each time: a race shows as a moving error
                for x in xs.values():
                    x.copy_(torch.randn_like(x))
                want = op(**{k: x.double() for k, x in xs.items()}, backend="torch")
                errs.append((call().double() - want).abs().max().item())
            err = max(errs)
            bad += not err < 1e-4
            us = triton.testing.do_bench(graph_replay(call), return_mode="median") * 1e3
            eager = triton.testing.do_bench(call, return_mode="median") * 1e3
            cells.append(f"{name} {us:.1f} us (eager {eager:.1f}, err {err:.0e})")
            per = gpu_kernel_us(call, 20)
            kernels.append(f"  {name}: " + ", ".join(f"{k.removeprefix(entry + '_')} {v:.1f}" for k, v in per))
        print(f"{size}: " + "; ".join(cells), flush=True)
        print("\n".join(kernels), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
