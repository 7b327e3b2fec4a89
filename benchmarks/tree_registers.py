"""Registers and spills of the tree's lanes kernels, compiled ahead of time for sm_90 (no GPU).

    python benchmarks/tree_registers.py [--configs 32x4,128x8] [--op nonassoc_mix] [--D 4]

Register allocation differs between Triton releases: put the release the GPU host runs first on
PYTHONPATH to see what it will get. Each kernel is compiled as Triton's JIT specializes it for
the benchmark's calls (16-byte aligned tensors, lengths divisible by 16: see `tt.divisibility`
below), with the configuration's warps, and the counts are read from the cubin with the
cuobjdump bundled with Triton: registers, stack bytes, and the spill stores / loads (STL / LDL)
and warp shuffles (SHFL) in the SASS.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psmc  # noqa: E402
from psmc import tree_backend  # noqa: E402
from psmc.codegen import tree as tree_codegen  # noqa: E402

KINDS = ("lanes_up_x", "lanes_down_x", "lanes_up_s", "lanes_down_s")


def cuobjdump(cubin: bytes) -> dict:
    """Registers, stack, spill instructions and shuffles of one kernel's cubin."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(tool), "--dump-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(w.split(":", 1) for w in usage.split("Resource usage:")[-1].split() if ":" in w)
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "stl": sass.count(" STL"),
            "ldl": sass.count(" LDL"), "shfl": sass.count("SHFL")}


def report(op_ir, lanes: int, per_lane: int, arch: int = 90) -> dict:
    """{kind: counts} of the lanes kernels of one configuration (HAS_START=True where it applies)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tk, fns = tree_backend.kernels(op_ir, tree_codegen.BLOCK, False, lanes, per_lane)
    out = {}
    for kind in KINDS:
        sig = tk.signature(kind)
        consts = {"ACC": tl.float32, **({"HAS_START": True} if "HAS_START" in sig else {})}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(sig) if sig[a] != "constexpr"}
        t0 = time.perf_counter()
        c = triton.compile(ASTSource(fn=fns[kind], signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": tree_codegen.num_warps(lanes)})
        out[kind] = dict(cuobjdump(c.asm["cubin"]), compile_s=round(time.perf_counter() - t0, 1))
    return out


def main(argv=None) -> int:
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--op", default="nonassoc_mix")
    ap.add_argument("--D", type=int, default=4)
    ap.add_argument("--configs", default="", help="lanes x elements a lane, comma-separated "
                    "(default: psmc's lane_config)")
    args = ap.parse_args(argv)
    op = psmc.compile_file(ROOT / f"examples/{args.op}.psm", D=args.D)[args.op]
    configs = ([tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")] if args.configs
               else [tree_codegen.lane_config(op.ir)])
    print(f"triton {triton.__version__}, sm_90, {args.op}[D={args.D}]")
    for lanes, per_lane in configs:
        for kind, r in report(op.ir, lanes, per_lane).items():
            print(f"{lanes}x{per_lane} (w{tree_codegen.num_warps(lanes)}) {kind:13s} {r['regs']:3d} registers, "
                  f"{r['stack']:4d} B stack, {r['stl']} STL / {r['ldl']} LDL, {r['shfl']} SHFL "
                  f"({r['compile_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
