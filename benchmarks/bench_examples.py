"""Every associative example's forward against its own roofline, the kernels psmc generates now
beside the baseline, in one GPU call (issue 4: >= 90% of copy bandwidth).

    python benchmarks/bench_examples.py [--examples affine,s5] [--ablation] [--jobs 8] [--out DIR]
    python benchmarks/bench_examples.py --dry-run    # the same plumbing on the CPU, interpreted

Per example (the shapes of bench.py's examples part; fp32, cumcount i32 in and i64 out):
  check     the launcher's outputs over all of T for two lanes against the float64 torch path
            (relative error below 1e-4), for two input sets (the second call launches directly);
  new       the module as psmc generates it, block shape (BLOCK_L, BLOCK_T, warps, STAGES) autotuned
            on the first call (printed);
  baseline  the module generated with triton_scan.FEATURES empty (no lane-free factoring, exp and
            log through tl.exp / tl.log, a load per scalar, the carry summed out of the tile) at
            the block shape the H100's autotuner chose for the old kernels (BENCHMARKS.md, run B);
  ablation  (--ablation) the new kernel at its chosen shape with one feature off at a time.
% of copy = bytes (inputs read once, outputs written once) / time, over the copy bandwidth
measured first; medians of triton.testing.do_bench (L2 flushed). First, --jobs processes compile
every kernel into Triton's on-disk cache (each example's autotune candidates and its baseline), so
the timed process only loads them. Writes DIR/examples.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import psmc  # noqa: E402
from psmc import cache, triton_backend  # noqa: E402
from psmc.codegen import triton as triton_codegen  # noqa: E402
from psmc.codegen import triton_scan  # noqa: E402

from bench import EXAMPLE_SHAPES, draw, nbytes, rel_err  # noqa: E402

# the block shapes the H100's autotuner chose for the old kernels, and their % of copy (run B)
BASELINE = {
    "cumsum": ((1, 4096, 8), 97.1), "cummax": ((1, 4096, 8), 96.6),
    "rotation": ((1, 512, 4), 94.3), "cumcount": ((1, 512, 4), 90.1),
    "affine": ((1, 64, 1), 86.7), "logcumsumexp": ((1, 256, 1), 59.6),
    "softmax_attn": ((16, 16, 2), 24.7), "s5": ((1, 256, 4), 15.2),
}
DRY = {"device": "cpu", "batch": (2,), "T": 70}  # --dry-run: interpreted kernels, tiny shapes


def log(*a):
    print(*a, flush=True)


class Bench:
    """One process's view: the device, the shapes, where variant modules are written."""

    def __init__(self, dry: bool, modules: Path):
        self.dry, self.modules = dry, modules
        self.device = "cpu" if dry else "cuda"

    def op(self, name):
        return psmc.compile_file(ROOT / "examples" / f"{name}.psm", **EXAMPLE_SHAPES[name][0])[name]

    def inputs(self, name, seed=0):
        _, batch, T = EXAMPLE_SHAPES[name]
        if self.dry:
            batch, T = DRY["batch"], DRY["T"]
        torch.manual_seed(seed)
        return draw(self.op(name), batch + (T,), device=self.device)

    def launcher(self, name):
        mod = triton_backend.module(self.op(name).ir, interpret=self.dry)
        return mod, getattr(mod, f"{name}_scan")

    def variant(self, name, features: frozenset):
        """The launcher of the module generated with only `features` on, from its own file."""
        op = self.op(name)
        old = triton_scan.FEATURES
        triton_scan.FEATURES = features
        try:
            text = triton_codegen.generate_module(op.ir, psmc.__version__)
        finally:
            triton_scan.FEATURES = old
        path = self.modules / f"{name}_{'-'.join(sorted(features)) or 'baseline'}.py"
        if not path.exists() or path.read_text() != text:
            cache.write_atomic(path, text)
        return getattr(cache.load(path, interpret=self.dry), f"{name}_scan")

    def ms(self, fn) -> float:
        if self.dry:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def check(self, name, run, x) -> float:
        """Max relative error of two lanes over all of T against the float64 torch path."""
        outs, _, _ = run(x, out_dtype=torch.float32)
        small = {k: (v[:2].double() if v.is_floating_point() else v[:2]) for k, v in x.items()}
        ref = self.op(name)(**small, backend="torch")
        ref = ref if isinstance(ref, tuple) else (ref,)
        return max(rel_err(o[:2], r) for o, r in zip(outs, ref))


def warm(job):
    """Compile what the timed run will launch, for one example, in a process of its own."""
    name, modules, dry = job
    b = Bench(dry, Path(modules))
    x = b.inputs(name)
    b.launcher(name)[1](x, out_dtype=torch.float32)  # the autotuner compiles its candidates
    b.variant(name, frozenset())(x, out_dtype=torch.float32, config=None if dry else BASELINE[name][0])
    if not dry:
        torch.cuda.synchronize()
    return name


def copy_bandwidth(b: Bench) -> float:
    x = torch.rand((128 << 20) if not b.dry else 1 << 20, device=b.device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / b.ms(lambda: y.copy_(x)) / 1e6


def bench(b: Bench, name, copy_gbs, ablation: bool) -> dict:
    x = b.inputs(name)
    mod, run = b.launcher(name)
    err = max(b.check(name, run, x), b.check(name, run, b.inputs(name, seed=1)))
    assert err < 1e-4, f"{name}: rel err {err:.2e}"
    kernel = getattr(mod, f"{name}_scan_kernel")
    plan = [p for k, p in mod._PSMC_PLANS.items() if k[0] is kernel][-1]
    outs, _, _ = run(x, out_dtype=torch.float32)
    moved = nbytes(*x.values(), *outs)

    def pct(ms):
        return 100 * moved / ms / 1e6 / copy_gbs
    ms = b.ms(lambda: run(x, out_dtype=torch.float32))
    passes = "two passes" if plan.totals is not None else "one pass"
    chosen = plan.config + (plan.stages,)  # (BLOCK_L, BLOCK_T, warps, STAGES)
    row = {"op": name, "new_ms": ms, "new_pct": pct(ms), "config": chosen, "passes": passes,
           "rel_err": err}
    base_cfg, h100 = BASELINE[name]
    if b.dry:
        base_cfg = (min(base_cfg[0], 4), min(base_cfg[1], 16), base_cfg[2])
    base = b.variant(name, frozenset())

    def run_base(x, **k):
        return base(x, config=base_cfg, **k)
    berr = b.check(name, run_base, x)
    assert berr < 1e-4, f"{name} baseline: rel err {berr:.2e}"
    bms = b.ms(lambda: run_base(x, out_dtype=torch.float32))
    row.update(base_ms=bms, base_pct=pct(bms), base_config=base_cfg, base_rel_err=berr,
               h100_base_pct=h100)
    log(f"{name:13s} rel err {err:.1e}  new {ms:8.4f} ms {pct(ms):5.1f}% {chosen} {passes}  |  "
        f"baseline {bms:8.4f} ms {pct(bms):5.1f}% {base_cfg}  |  {bms / ms:5.2f}x")
    if ablation:
        row["ablation"] = {}
        for off in sorted(triton_scan.FEATURES):
            m = b.variant(name, triton_scan.FEATURES - {off})
            a = b.ms(lambda: m(x, out_dtype=torch.float32, config=chosen, chunk_t=plan.chunk_t))
            row["ablation"][off] = {"ms": a, "pct": pct(a)}
            log(f"{'':13s} without {off:12s} {a:8.4f} ms {pct(a):5.1f}%")
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", default=",".join(EXAMPLE_SHAPES))
    ap.add_argument("--ablation", action="store_true", help="each feature off, at the chosen shape")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes that compile the kernels first (1: compile while timing)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, interpreted, tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.examples.split(",")
    b = Bench(args.dry_run, Path(tempfile.mkdtemp(prefix="psmc-variants-")))
    t0 = time.time()
    log(f"{'CPU (dry run)' if b.dry else torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {triton.__version__}")
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(min(args.jobs, len(names))) as pool:
            for name in pool.imap_unordered(warm, [(n, str(b.modules), b.dry) for n in names]):
                log(f"  compiled {name} ({time.time() - t0:.0f} s)")
    copy_gbs = copy_bandwidth(b)
    log(f"copy: {copy_gbs:.1f} GB/s ({time.time() - t0:.0f} s)")
    rows = []
    for name in names:
        try:
            rows.append(bench(b, name, copy_gbs, args.ablation))
        except Exception as e:  # noqa: BLE001  (report and go on)
            log(f"{name:13s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    (out / "examples.json").write_text(json.dumps({"copy_GBps": copy_gbs, "rows": rows}, indent=1))
    log(f"--- {time.time() - t0:.0f} s; % of copy ({copy_gbs:.0f} GB/s); target >= 90")
    log(f"{'op':13s} {'new':>6s} {'baseline':>9s} {'H100 before':>12s}")
    for r in rows:
        log(f"{r['op']:13s} {r['new_pct']:6.1f} {r['base_pct']:9.1f} {r['h100_base_pct']:12.1f}  "
            f"{'met' if r['new_pct'] >= 90 else 'not met'}")


if __name__ == "__main__":
    main()
