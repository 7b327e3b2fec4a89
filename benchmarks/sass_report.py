"""Registers, spills and SASS of the generated forward scan kernels, compiled ahead of time for
sm_90 (no GPU needed): what bench_examples.py times, read from the cubin.

    python benchmarks/sass_report.py [--ops affine,s5] [--configs 1x64x1,32x4x1x3] [--sass DIR]

Each op is compiled as its launcher would launch it at bench.py's shape (EXAMPLE_SHAPES) on a GPU
of 132 SMs: the same stride arguments, specialized as Triton specializes them at run time (an int
equal to 1 becomes a constant, one divisible by 16 gets the divisibility hint, pointers are
16-byte aligned), and the plan's constexprs (one pass or two, no initial or final state; with two
passes the chunk-totals kernel is compiled too). Block shapes: the heuristic and the autotune
candidates with their pipeline depths, or --configs (BLOCK_LxBLOCK_TxWARPS[xSTAGES]). Printed per
kernel: registers, spill bytes, and counts over the SASS of the loop over blocks of T (from its
label to its backward branch; the whole kernel when T is one block): instructions per element
(per thread: BLOCK_L * BLOCK_T / (32 * warps) elements), loads and stores by width, MUFU
(ex2/lg2), barriers, shuffles, shared-memory accesses. Counts are static: code that rarely runs
(sin/cos argument reduction) counts as much as the rest. Run it with the Triton the GPU runs
(register allocation differs between versions).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import psmc  # noqa: E402
from psmc import triton_backend  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench import EXAMPLE_SHAPES  # noqa: E402  (bench.py's examples part: name -> (dims, batch, T))

SMS = 132  # H100 / H200 multiprocessors: decides one pass or two as the launcher would


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _meta_inputs(op, batch, T):
    out = {}
    for f in op.ir.inputs:
        dt = {"i32": torch.int32, "i64": torch.int64}.get(f.type.dtype, torch.float32)
        out[f.name] = torch.empty(batch + (T,) + f.type.shape, dtype=dt, device="meta")
    return out


def plan_for(mod, spec, kernels, xs, config):
    """The launcher's plan for these inputs (meta tensors) and config, with the GPU's SM count.
    kernels: (the scan kernel, the chunk-totals kernel)."""
    sms = mod._psmc_sms
    mod._psmc_sms = lambda device: SMS
    try:
        return mod._PsmcScanPlan(*kernels, spec, xs, None, False, False, torch.float32, torch.float32,
                                 config)
    finally:
        mod._psmc_sms = sms


def _spec_int(v: int):
    if v == 1:
        return "constexpr", 1
    return ("i64" if abs(v) >= 2 ** 31 else "i32"), ("D" if v % 16 == 0 else "")


def compile_plan(mod, spec, kernel, plan, xs, totals=False):
    """triton.compile of the scan kernel (totals: of the chunk-totals kernel of a two-pass plan)
    with the plan's arguments, specialized as at run time."""
    outs = [torch.empty(0, dtype=d, device="meta") for _, d in plan.outs]
    tots = [torch.empty(0, dtype=d, device="meta") for _, d in plan.totals] if plan.totals else []
    # the plan's bound launch: its argument template (pointer slots None), the slots of the groups
    # present (inputs, outputs, totals: no initial, final state or checkpoints here), constexprs
    launch = plan.launch_totals if totals else plan.launch
    values = list(launch.template)
    for i, t in zip(launch.slots, list(xs) + ([] if totals else outs) + tots):
        values[i] = t
    for i in launch.absent:
        values[i] = outs[0]  # a dummy pointer, as at run time
    consts_src = launch.constexprs
    names = kernel.arg_names
    signature, constexprs, attrs = {}, {}, {}
    ptr_types = {torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}
    for i, (name, v) in enumerate(zip(names, values)):
        if isinstance(v, torch.Tensor):
            signature[name] = ptr_types[v.dtype]
            attrs[(i,)] = BaseBackend.parse_attr("D")
        else:
            ty, hint = _spec_int(int(v))
            signature[name] = ty
            if ty == "constexpr":
                constexprs[(i,)] = 1
            elif hint:
                attrs[(i,)] = BaseBackend.parse_attr(hint)
    consts = dict(consts_src)
    warps = consts.pop("num_warps")
    for name in names[len(values):]:
        signature[name] = "constexpr"
        v = consts[name]
        constexprs[(names.index(name),)] = v
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    return {"regs": regs, "spill": sum(spill), "sass": sass}


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loop_body(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of the loop over blocks of T: the largest span between a
    backward BRA and its target that stores outputs (sin/cos have loops of their own); the
    whole kernel when there is none (one block of T: the compiler drops the loop)."""
    insns = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSN.finditer(sass)]
    best = []
    for addr, opc, ops in insns:
        if opc.startswith("BRA"):
            t = re.search(r"0x([0-9a-f]+)", ops)
            if t and int(t.group(1), 16) < addr:
                body = [i for i in insns if int(t.group(1), 16) <= i[0] <= addr]
                if len(body) > len(best) and any(o.startswith("STG") for _, o, _ in body):
                    best = body
    return best or insns


def summarize(body, elements_per_thread: float) -> dict:
    ops = Counter(o for _, o, _ in body)
    def count(pred):
        return sum(n for o, n in ops.items() if pred(o))
    out = {
        "insn/elem": len(body) / elements_per_thread,
        "LDG": {o: n for o, n in ops.items() if o.startswith("LDG")},
        "STG": {o: n for o, n in ops.items() if o.startswith("STG")},
        "MUFU": count(lambda o: o.startswith("MUFU")),
        "BAR": count(lambda o: o.startswith("BAR")),
        "SHFL": count(lambda o: o.startswith("SHFL")),
        "LDS/STS": count(lambda o: o.startswith(("LDS", "STS"))),
        "FP32": count(lambda o: o.split(".")[0] in ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL")),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", default="affine,logcumsumexp,softmax_attn,s5")
    ap.add_argument("--configs", default="",
                    help="BLOCK_LxBLOCK_TxWARPS[xSTAGES],... (default: the launcher's candidates)")
    ap.add_argument("--sass", default="", help="write each kernel's SASS to this folder")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90")
    for name in args.ops.split(","):
        dims, batch, T = EXAMPLE_SHAPES[name]
        op = psmc.compile_file(ROOT / "examples" / f"{name}.psm", **dims)[name]
        mod = triton_backend.module(op.ir, interpret=False)
        spec = getattr(mod, f"{name.upper()}_SPEC")
        kernel = getattr(mod, f"{name}_scan_kernel")
        kernels = (kernel, getattr(mod, f"{name}_chunk_totals_kernel"))
        xs = list(_meta_inputs(op, batch, T).values())
        if args.configs:
            configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
        else:
            first = plan_for(mod, spec, kernels, xs, None)
            layout = mod._PsmcLayout(first.batch, spec["lane"],
                                     [(x, f, True) for x, f in zip(xs, spec["inputs"])]
                                     + [(torch.empty(s, dtype=d, device="meta"), f, True)
                                        for (s, d), f in zip(first.outs, spec["outputs"])])
            configs = [c + (st,) for c in mod._psmc_scan_candidates(spec, layout, T, False)
                       for st in mod._psmc_stages(c)]
        for cfg in configs:
            plan = plan_for(mod, spec, kernels, xs, cfg)
            try:
                c = compile_plan(mod, spec, kernel, plan, xs)
            except Exception as e:  # noqa: BLE001  (a shape this Triton cannot compile)
                print(f"{name:13s} {cfg}: failed: {str(e).splitlines()[0][:200]}")
                continue
            r = resources(c)
            bl, bt, w = cfg[:3]
            if plan.totals is not None:  # two passes: the chunk-totals kernel must compile too
                t = resources(compile_plan(mod, spec, getattr(mod, f"{name}_chunk_totals_kernel"),
                                           plan, xs, totals=True))
                print(f"{name:13s} {cfg}: two passes, chunk totals kernel {t['regs']} regs, "
                      f"{t['spill']} B spill")
            s = summarize(loop_body(r["sass"]), bl * bt / (32 * w))
            print(f"{name:13s} {cfg}: {r['regs']:3d} regs, {r['spill']:4d} B spill, "
                  f"{s['insn/elem']:6.1f} insn/elem; loop: LDG {s['LDG']} STG {s['STG']} "
                  f"MUFU {s['MUFU']} BAR {s['BAR']} SHFL {s['SHFL']} LDS/STS {s['LDS/STS']} "
                  f"FP32 {s['FP32']}", flush=True)
            if args.sass:
                d = Path(args.sass)
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{name}_{'x'.join(map(str, cfg))}.sass").write_text(r["sass"])


if __name__ == "__main__":
    main()
