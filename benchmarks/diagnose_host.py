"""Where the host time of a linrec forward + backward goes, on the GPU machine.

    python benchmarks/diagnose_host.py

Host enqueue time per call (no synchronization inside the loop, so a GPU-bound loop ends its
host part early), the same with a synchronization per call, and a cProfile of the host side.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import psmc  # noqa: E402
from psmc import triton_backend  # noqa: E402


def host_us(fn, n=50):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def main():
    ops = psmc.compile_file(str(Path(__file__).resolve().parent.parent / "examples/linrec.psm"))
    op = ops["linrec"] if isinstance(ops, dict) else ops
    B, C, T = 8, 1536, 4096
    a = torch.rand(B, C, T, device="cuda").requires_grad_()
    b = torch.randn(B, C, T, device="cuda").requires_grad_()
    g = torch.randn(B, C, T, device="cuda")
    mod = triton_backend.module(op.ir, interpret=False)
    x = {"a": a.detach(), "b": b.detach()}

    def fwd_launcher():
        mod.linrec_scan(x)

    def fwd_nograd():
        with torch.no_grad():
            op(a=a, b=b)

    def fwd_grad():
        op(a=a, b=b)

    def fwd_bwd():
        a.grad = b.grad = None
        op(a=a, b=b).backward(g)

    small = {k: v[:1, :4, :64].detach().clone().requires_grad_() for k, v in (("a", a), ("b", b))}
    gs = g[:1, :4, :64].contiguous()

    def small_fwd_bwd():
        small["a"].grad = small["b"].grad = None
        op(**small).backward(gs)

    class Clone(torch.autograd.Function):  # the autograd engine's own cost, for scale
        @staticmethod
        def forward(ctx, x, y):
            return x.clone()

        @staticmethod
        def backward(ctx, gy):
            return gy, gy

    ta = small["a"].detach().clone().requires_grad_()
    tb = small["b"].detach().clone().requires_grad_()

    def trivial_fwd_bwd():
        ta.grad = tb.grad = None
        Clone.apply(ta, tb).backward(gs)

    peers = [("trivial autograd Function fwd+bwd (tiny)", trivial_fwd_bwd)]
    try:
        from accelerated_scan.scalar import scan as acc_scan

        def acc_fwd_bwd():
            a.grad = b.grad = None
            acc_scan(a, b).backward(g)

        def acc_small():
            small["a"].grad = small["b"].grad = None
            acc_scan(small["a"], small["b"]).backward(gs)
        peers += [("accelerated-scan fwd+bwd", acc_fwd_bwd), ("accelerated-scan fwd+bwd tiny", acc_small)]
    except ImportError as e:
        print("accelerated-scan not importable:", e)
    for name, fn in [("launcher fwd", fwd_launcher), ("op() fwd no grad", fwd_nograd),
                     ("op() fwd with grad", fwd_grad), ("op() fwd+bwd", fwd_bwd),
                     ("op() fwd+bwd tiny (1,4,64): pure host", small_fwd_bwd)] + peers:
        try:
            h, w = host_us(fn)
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not fatal
            print(f"{name:42s} failed: {e!r}"[:200], flush=True)
            continue
        print(f"{name:42s} host {h:8.1f} us/call  wall {w:8.1f} us/call  do_bench {ms * 1e3:8.1f} us",
              flush=True)
    plans = list(mod._PSMC_PLANS.values()) + list(mod._PSMC_BACKWARD_PLANS.values())
    print("plans launching directly:", sum(p.launch.compiled is not None for p in plans), "of", len(plans))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        small_fwd_bwd()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    print(s.getvalue()[:6000])


if __name__ == "__main__":
    main()
