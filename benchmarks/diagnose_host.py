"""Host (Python) time of a linrec forward and forward + backward: psmc against accelerated-scan.

    python benchmarks/diagnose_host.py                  # CUDA, (8, 1536, 4096) fp32, ~1-2 min
    python benchmarks/diagnose_host.py --fake-kernels   # any machine: kernels replaced by no-ops

The device's host runs Python several times slower than a development machine, and there psmc's
0.55 ms forward + backward was CPU-bound (BENCHMARKS.md): the host took longer to enqueue a call
than the GPU to run it. On CUDA this prints, per call: the host's enqueue time (no synchronization
in the loop), the wall time with the GPU drained at the end, and do_bench's median (GPU-bound when
the host time is below it), for psmc's op() and accelerated-scan's Triton scan
(`accelerated_scan.scalar.scan` in accelerated-scan 0.3.1, when importable), an empty autograd
Function for scale, psmc's outputs and gradients checked against accelerated-scan's, and a
profile of psmc's host side.

With --fake-kernels (no GPU needed) the generated modules' kernels are replaced by stand-ins
whose compiled launcher does nothing, and Triton's driver by one that returns a fixed device and
stream, so everything psmc runs per call (validation, dispatch, plans, allocation, the direct
launch's checks, the autograd Function) runs as it would on CUDA tensors, on small CPU tensors:
for the package's op() and for the module `psmc compile` writes (the same host code). Figures
there are CPU time per call (time.process_time, best of --repeat runs: robust to other
processes on a shared machine).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's psmc


# ---- stand-ins for the kernels and Triton's driver (--fake-kernels) --------------------------

class NoOpCompiled:
    """A compiled kernel whose launcher does nothing (it takes every argument, as Triton's does)."""

    def __init__(self):
        self.function, self.packed_metadata = object(), object()

    def run(self, *args):
        pass


class NoOpKernel:
    """Stands in for one `@triton.jit` kernel: `kernel[grid](*args, **constexprs)` does nothing and
    returns the no-op compiled kernel, which psmc's launches then call directly, as on a GPU."""

    def __init__(self, real):
        self.arg_names = list(real.arg_names)
        self.compiled = NoOpCompiled()

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.compiled


class NoOpDriver:
    """Triton's active driver, as far as a direct launch asks it anything."""

    @staticmethod
    def get_current_device():
        return 0

    @staticmethod
    def get_current_stream(device):
        return 0


def stub_kernels(mod) -> None:
    """Replace a generated module's kernels by no-ops; its launches then run CPU tensors directly."""
    import triton

    for name in dir(mod):
        if name.endswith("_kernel") and hasattr(getattr(mod, name), "arg_names"):
            setattr(mod, name, NoOpKernel(getattr(mod, name)))
    mod._psmc_on_gpu = lambda tensor: True  # the only test of the device a launch makes
    triton.runtime.driver.set_active(NoOpDriver())


def vendored_module(out: Path):
    """The module `psmc compile` writes for linrec, imported."""
    subprocess.run([sys.executable, "-m", "psmc.cli", "compile", str(ROOT / "examples/linrec.psm"),
                    "-o", str(out)], check=True, capture_output=True, cwd=ROOT)
    sys.path.insert(0, str(out))
    return importlib.import_module("linrec")


# ---- the calls timed ---------------------------------------------------------------------------

def calls(op, a, b, g, **kw):
    """forward without autograd, forward with inputs requiring grad, forward + backward."""
    def fwd_nograd():
        with torch.no_grad():
            op(a=a, b=b, **kw)

    def fwd_grad():
        op(a=a, b=b, **kw)

    def fwd_bwd():
        a.grad = b.grad = None
        op(a=a, b=b, **kw).backward(g)

    return [("forward, no grad", fwd_nograd), ("forward, inputs require grad", fwd_grad),
            ("forward + backward", fwd_bwd)]


def empty_function(a, b, g):
    """An autograd Function that allocates its output and does nothing else: the engine's own cost."""
    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, gy):
            return gy, gy

    def fwd_bwd():
        a.grad = b.grad = None
        Empty.apply(a, b).backward(g)
    return fwd_bwd


def linrec_op():
    import psmc

    return psmc.compile_file(str(ROOT / "examples/linrec.psm"))["linrec"]


# ---- --fake-kernels: host time on any machine ----------------------------------------------------

def cpu_time_us(fn, n: int, repeat: int) -> float:
    for _ in range(min(n, 200)):
        fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n)
    return best * 1e6


def main_fake(args) -> None:
    from psmc import triton_backend

    shape = (2, 4, 64)
    torch.manual_seed(0)
    a, b = torch.rand(shape).requires_grad_(), torch.randn(shape).requires_grad_()
    g = torch.randn(shape)
    op = linrec_op()
    stub_kernels(triton_backend.module(op.ir, interpret=True))
    rows = [(f"psmc op(): {name}", fn) for name, fn in calls(op, a, b, g, backend="triton")]
    with tempfile.TemporaryDirectory() as tmp:
        vendored = vendored_module(Path(tmp))
        stub_kernels(vendored)
        rows += [(f"vendored linrec.py: {name}", fn) for name, fn in calls(vendored.Linrec(), a, b, g,
                                                                            backend="triton")]
    rows.append(("empty autograd Function: forward + backward", empty_function(a, b, g)))
    print(f"host CPU us per call, no-op kernels, linrec {shape} f32 on CPU, backend='triton' "
          f"(best of {args.repeat} x {args.n})")
    for name, fn in rows:
        print(f"  {name:50s} {cpu_time_us(fn, args.n, args.repeat):7.1f}", flush=True)


# ---- CUDA -----------------------------------------------------------------------------------------

def host_us(fn, n: int):
    """(enqueue us per call: no synchronization in the loop; wall us per call, GPU drained)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def gpu_kernel_us(fn, n: int) -> list[tuple[str, float]]:
    """Microseconds of GPU time per call of `fn`, by kernel (and their total), from the profiler's
    CUDA activity: the kernels alone, whatever the host does (a CUDA graph of forward + backward
    could not be captured on the H200)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = e.self_cuda_time_total if us is None else us
        if us > 0:
            out.append((e.key[:40], us / n))
    out.sort(key=lambda kv: -kv[1])
    return out + [("total", sum(us for _, us in out))]


def rel_err(x, y) -> float:
    return ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)).item()


def main_cuda(args) -> None:
    from triton.testing import do_bench

    B, C, T = args.shape
    torch.manual_seed(0)
    a = torch.rand(B, C, T, device="cuda").requires_grad_()
    b = torch.randn(B, C, T, device="cuda").requires_grad_()
    g = torch.randn(B, C, T, device="cuda")
    op = linrec_op()
    t0 = time.perf_counter()
    y = op(a=a, b=b)  # first calls: compile, autotune, bind
    y.backward(g)
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    y2 = op(a=a, b=b)  # the fast path
    y2.backward(g)
    torch.cuda.synchronize()
    print(f"psmc first calls (compile + autotune): {time.perf_counter() - t0:.1f} s; fast path equal to "
          f"the first call: outputs {torch.equal(y, y2)}, gradients "
          f"{torch.equal(ga, a.grad) and torch.equal(gb, b.grad)}", flush=True)
    rows = [(f"psmc op(): {name}", fn) for name, fn in calls(op, a, b, g)]
    for peer in args.peers:
        try:
            acc_scan = importlib.import_module(f"accelerated_scan.{peer}").scan
        except ImportError as e:
            print(f"accelerated_scan.{peer} not importable: {e}")
            continue
        ya = acc_scan(a, b)
        a.grad = b.grad = None
        ya.backward(g)
        print(f"psmc vs accelerated_scan.{peer}, max rel err: y {rel_err(y, ya):.1e}, "
              f"ga {rel_err(ga, a.grad):.1e}, gb {rel_err(gb, b.grad):.1e}", flush=True)
        rows += [(f"accelerated_scan.{peer}: {name}", fn)
                 for name, fn in calls(lambda a, b, scan=acc_scan: scan(a, b), a, b, g)]
    rows.append(("empty autograd Function: forward + backward", empty_function(a, b, g)))
    print(f"linrec {tuple(args.shape)} f32 on {torch.cuda.get_device_name()}: us per call "
          f"(host: enqueue, no sync; wall: GPU drained; do_bench median, L2 flushed)")
    for name, fn in rows:
        h, w = host_us(fn, args.n)
        line = f"  {name:52s} host {h:7.1f}  wall {w:7.1f}"
        if "forward + backward" in name and "empty" not in name:
            line += f"  do_bench {do_bench(fn, warmup=25, rep=200, return_mode='median') * 1e3:7.1f}"

        print(line, flush=True)
    print("GPU time per forward + backward by kernel (torch.profiler, mean of 20 calls):")
    for name, fn in rows:
        if "forward + backward" in name and "empty" not in name:
            print(f"  {name}: " + ", ".join(f"{k} {us:.1f}" for k, us in gpu_kernel_us(fn, 20)), flush=True)
    small = {k: torch.rand(1, 4, 64, device="cuda").requires_grad_() for k in "ab"}
    gs = torch.randn(1, 4, 64, device="cuda")
    tiny = calls(op, small["a"], small["b"], gs)[2][1]
    print(f"  {'psmc op(): forward + backward at (1, 4, 64)':52s} host {host_us(tiny, args.n)[0]:7.1f}  "
          f"(pure host: the GPU idles)")
    from psmc import triton_backend

    mod = triton_backend.module(op.ir, interpret=False)
    plans = list(mod._PSMC_PLANS.values()) + list(mod._PSMC_BACKWARD_PLANS.values())
    launches = [p.launch for p in plans if not p.empty]
    print("launches going direct:", sum(x.compiled is not None for x in launches), "of", len(launches))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        tiny()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(15)
    print(s.getvalue()[:4000])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fake-kernels", action="store_true", help="no GPU: kernels replaced by no-ops")
    ap.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split(",")), default=(8, 1536, 4096),
                    help="B,C,T (CUDA)")
    ap.add_argument("--peers", type=lambda s: [p for p in s.split(",") if p], default=["scalar"],
                    help="accelerated_scan modules to time (CUDA): scalar (its Triton scan), "
                    "warp (a CUDA extension, built on import)")
    ap.add_argument("--n", type=int, default=None, help="calls per timing (CUDA 50, fake 2000)")
    ap.add_argument("--repeat", type=int, default=7, help="timings, the best kept (fake)")
    args = ap.parse_args()
    if args.fake_kernels:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the vendored module's CPU check wants it
        args.n = args.n or 2000
        main_fake(args)
    else:
        args.n = args.n or 50
        main_cuda(args)


if __name__ == "__main__":
    main()
