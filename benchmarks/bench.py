"""psmc on a GPU, side by side with its peers and the memory roofline, in one run.

    python benchmarks/bench.py [--parts copy,linrec,sweep,curve,twopass,examples,backward,wide_bwd,gla,gla_bwd] [--out DIR]

Method (see the device notes' METHOD.md): medians of triton.testing.do_bench, inputs rotated
among several sets whenever one set would fit in L2, random inputs (never zeros), every psmc result
checked against an independent computation before it is timed. Bandwidth counts the bytes a kernel
must move: every input read once and every output written once, in the tensors' own dtypes.
Results go to DIR/results.json and the plot to DIR/bandwidth_vs_T.png; a table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psmc  # noqa: E402
from psmc import triton_backend  # noqa: E402

RESULTS: dict = {"rows": [], "curve": [], "sweep": [], "notes": []}
DEVICE = "cuda"  # a dry run of a part on the CPU (Triton's interpreter) may set "cpu"
L2_BYTES = 64 << 20


def log(*a):
    print(*a, flush=True)


def median_ms(fn, rep=200) -> float:
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rotating(make, bytes_per_set: int):
    """Several input sets when one would sit in L2, so repeated runs measure DRAM, not the cache."""
    n = max(1, math.ceil(4 * L2_BYTES / max(bytes_per_set, 1))) if bytes_per_set < 4 * L2_BYTES else 1
    sets = [make() for _ in range(min(n, 16))]
    state = {"i": 0}

    def nxt():
        s = sets[state["i"] % len(sets)]
        state["i"] += 1
        return s
    return nxt


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def row(name, shape, impl, ms, moved, copy_gbs, extra=None):
    gbs = moved / ms / 1e6
    r = {"op": name, "shape": shape, "impl": impl, "ms": ms, "GB/s": gbs,
         "pct_copy": 100 * gbs / copy_gbs if copy_gbs else None}
    r.update(extra or {})
    RESULTS["rows"].append(r)
    log(f"  {name:14s} {impl:34s} {ms:9.4f} ms  {gbs:8.1f} GB/s  {r['pct_copy'] or 0:6.1f}% of copy")
    return r


def example(name, **dims):
    return psmc.compile_file(ROOT / "examples" / f"{name}.psm", **dims)[name]


def launcher(op):
    return getattr(triton_backend.module(op.ir, interpret=False), f"{op.name}_scan")


# ---- parts -------------------------------------------------------------------------------------

def part_copy(args):
    n = 256 << 20  # 1 GiB of f32
    x = torch.rand(n, device="cuda")
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    gbs = 2 * x.numel() * 4 / ms / 1e6
    RESULTS["copy_GBps"] = gbs
    log(f"device copy: {gbs:.1f} GB/s (1 GiB read + 1 GiB written, {ms:.3f} ms)")
    del x, y
    return gbs


def linrec_inputs(B, C, T, dtype=torch.float32):
    a = torch.rand(B, C, T, device="cuda", dtype=dtype) * 0.5 + 0.5
    b = torch.randn(B, C, T, device="cuda", dtype=dtype)
    return a, b


def rel_err(x, ref) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def torch_linrec_scan():
    """linrec through torch's own `associative_scan`, compiled (the peer the issue names)."""
    from torch._higher_order_ops.associative_scan import associative_scan

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)  # one per shape

    def comb(l, r):
        return (l[0] * r[0], r[0] * l[1] + r[1])

    @torch.compile(fullgraph=True, dynamic=False)
    def torch_scan(a, b):
        return associative_scan(comb, (a, b), dim=2, combine_mode="pointwise")[1]
    return torch_scan


def part_linrec(args, copy_gbs):
    """linrec fp32 (8, 1536, 4096): psmc vs accelerated-scan vs torch associative_scan (compiled)."""
    B, C, T = 8, 1536, 4096
    op = example("linrec")
    run = launcher(op)
    a, b = linrec_inputs(B, C, T)
    moved = nbytes(a, b, a)
    shape = f"({B}, {C}, {T}) f32"
    y = op(a=a, b=b)
    # independent check: float64 sequential scan on a slice, and accelerated-scan on all of it
    ref = op(a=a[:1, :64].double(), b=b[:1, :64].double(), backend="torch")
    err = rel_err(y[:1, :64], ref)
    log(f"linrec check vs float64 torch path: rel err {err:.2e}")
    assert err < 1e-5, err
    ms = median_ms(lambda: op(a=a, b=b))
    row("linrec", shape, "psmc op() [scan]", ms, moved, copy_gbs, {"rel_err": err})
    ms = median_ms(lambda: run({"a": a, "b": b}))
    row("linrec", shape, "psmc launcher [scan]", ms, moved, copy_gbs)
    try:
        from accelerated_scan.scalar import scan as acc_scan
        ya = acc_scan(a, b)
        log(f"accelerated-scan vs psmc: rel diff {rel_err(y, ya):.2e}")
        ms = median_ms(lambda: acc_scan(a, b))
        row("linrec", shape, "accelerated-scan (triton)", ms, moved, copy_gbs)
    except Exception as e:  # noqa: BLE001
        RESULTS["notes"].append(f"accelerated-scan failed: {e!r}")
        log("accelerated-scan failed:", repr(e))
    if "torch" in args.peers:
        try:
            torch_scan = torch_linrec_scan()
            t0 = time.time()
            yt = torch_scan(a, b)
            torch.cuda.synchronize()
            log(f"torch associative_scan compiled in {time.time() - t0:.1f} s; rel diff {rel_err(y, yt):.2e}")
            ms = median_ms(lambda: torch_scan(a, b))
            row("linrec", shape, "torch associative_scan (compiled)", ms, moved, copy_gbs)
        except Exception as e:  # noqa: BLE001
            RESULTS["notes"].append(f"torch associative_scan failed: {e!r}")
            log("torch associative_scan failed:", repr(e)[:400])


def launched_plan(mod, fn):
    """fn()'s result and the last scan plan it launched through `mod` (None if it launched none)."""
    plans = []
    launch = mod._psmc_launch

    def spy(plan, *args):
        plans.append(plan)
        return launch(plan, *args)
    mod._psmc_launch = spy
    try:
        y = fn()
    finally:
        mod._psmc_launch = launch
    return y, (plans[-1] if plans else None)


TWOPASS_SHAPES = [(1, 16, 1 << 20), (2, 32, 1 << 18), (1, 4, 1 << 22)]


def part_twopass(args, copy_gbs):
    """linrec fp32 with few lanes and long T, where one program per lane leaves most SMs idle:
    psmc with one pass forced, psmc's choice (two passes here), two passes at other chunk sizes,
    and accelerated-scan. Each result is checked against a float64 computation (the torch path) on
    two whole lanes first, so chunk boundaries and the end of T are covered."""
    op = example("linrec")
    run = launcher(op)
    mod = triton_backend.module(op.ir, interpret=False)
    try:
        from accelerated_scan.scalar import scan as acc_scan
    except Exception as e:  # noqa: BLE001
        acc_scan = None
        log("accelerated-scan not importable:", repr(e)[:200])
    for B, C, T in TWOPASS_SHAPES:
        a, b = linrec_inputs(B, C, T)
        moved = nbytes(a, b, a)
        shape = f"({B}, {C}, {T}) f32"
        ref = op(a=a[:1, :2].double(), b=b[:1, :2].double(), backend="torch")
        impls = {"psmc one pass (chunk_t=0)": lambda: run({"a": a, "b": b}, chunk_t=0)[0][0],
                 "psmc auto": lambda: run({"a": a, "b": b})[0][0]}
        for chunk_t in (T // 64, T // 16):
            impls[f"psmc two passes chunk_t={chunk_t}"] = (
                lambda c=chunk_t: run({"a": a, "b": b}, chunk_t=c)[0][0])
        if acc_scan is not None:
            impls["accelerated-scan (triton)"] = lambda: acc_scan(a, b)
        for impl, fn in impls.items():
            try:
                y, plan = launched_plan(mod, fn)
                err = rel_err(y[:1, :2], ref)
                if err > 1e-4:
                    raise AssertionError(f"rel err {err:.2e} vs float64")
                extra = {"rel_err": err}
                if plan is not None:
                    extra.update(config=plan.config, grid=plan.grid,
                                 two_pass=plan.totals is not None)
                    impl = f"{impl} {plan.config} grid {plan.grid}"
                ms = median_ms(fn, rep=100)
                row("linrec few lanes", shape, impl, ms, moved, copy_gbs, extra)
            except Exception as e:  # noqa: BLE001
                RESULTS["notes"].append(f"twopass {shape} {impl} failed: {e!r}")
                log(f"  twopass {shape} {impl} failed: {e!r}"[:400])
        del a, b


def part_sweep(args, copy_gbs):
    """Block shapes for linrec at the anchor shape: which tile the heuristic should pick."""
    B, C, T = 8, 1536, 4096
    op = example("linrec")
    run = launcher(op)
    a, b = linrec_inputs(B, C, T)
    moved = nbytes(a, b, a)
    ref = run({"a": a, "b": b})[0][0]
    for cfg in [(1, 512, 4), (1, 1024, 4), (1, 1024, 8), (1, 2048, 4), (1, 2048, 8), (1, 4096, 4),
                (1, 4096, 8), (1, 4096, 16), (2, 1024, 4), (2, 2048, 8)]:
        try:
            y = run({"a": a, "b": b}, config=cfg)[0][0]
            assert torch.equal(y, ref) or rel_err(y, ref) < 1e-6
            ms = median_ms(lambda: run({"a": a, "b": b}, config=cfg))
            gbs = moved / ms / 1e6
            RESULTS["sweep"].append({"config": cfg, "ms": ms, "GB/s": gbs})
            log(f"  sweep {cfg}: {ms:.4f} ms {gbs:.0f} GB/s {100 * gbs / copy_gbs:.1f}%")
        except Exception as e:  # noqa: BLE001
            log(f"  sweep {cfg} failed: {e!r}"[:300])


def part_curve(args, copy_gbs):
    """Achieved bandwidth against T for linrec, 50M tokens per call ((8, 1536 * 4096 / T, T)):
    every call moves 604 MB, so timings measure the kernels, not the launch or the cache."""
    op = example("linrec")
    run = launcher(op)
    try:
        from accelerated_scan.scalar import scan as acc_scan
    except Exception:  # noqa: BLE001
        acc_scan = None
    for T in [64, 256, 1024, 4096, 16384, 65536]:
        B, C = 8, 1536 * 4096 // T
        a, b = linrec_inputs(B, C, T)
        moved = 3 * a.numel() * 4
        impls = {"psmc": lambda: run({"a": a, "b": b})}
        if acc_scan is not None:
            impls["accelerated-scan"] = lambda: acc_scan(a, b)
        if "torch" in args.peers:  # compiled once per T (dynamic=False): a few seconds each
            torch_scan = torch_linrec_scan()
            impls["torch associative_scan"] = lambda: torch_scan(a, b)
        for impl, fn in impls.items():
            try:
                ms = median_ms(fn, rep=100)
            except Exception as e:  # noqa: BLE001
                log(f"  curve T={T} {impl} failed: {e!r}"[:200])
                continue
            gbs = moved / ms / 1e6
            RESULTS["curve"].append({"T": T, "impl": impl, "ms": ms, "GB/s": gbs})
            log(f"  curve T={T:6d} {impl:18s} {ms:.4f} ms {gbs:7.0f} GB/s")
        RESULTS["curve"].append({"T": T, "impl": "copy", "GB/s": copy_gbs})
        del a, b


def part_backward(args, copy_gbs):
    """linrec forward + backward at (8, 1536, 4096) fp32, through autograd."""
    B, C, T = 8, 1536, 4096
    op = example("linrec")
    a, b = linrec_inputs(B, C, T)
    a.requires_grad_(True)
    b.requires_grad_(True)
    g = torch.randn_like(a)
    shape = f"({B}, {C}, {T}) f32"
    moved = 8 * a.numel() * 4  # forward: a, b, y; backward: a, b, gy read, ga, gb written

    def psmc_fb():
        op(a=a, b=b).backward(g)
    psmc_fb()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    ms = do_bench(psmc_fb, warmup=25, rep=200, grad_to_none=[a, b], return_mode="median")
    row("linrec fwd+bwd", shape, "psmc (derived backward)", ms, moved, copy_gbs)
    # the block shape's effect: the backward shares BLOCK_T with the forward and runs at least
    # BLOCK_T / 256 warps, so (1, 4096, 8) means a 16-warp backward (psmc caps training tiles at 2048)
    for cfg in args.bwd_configs:
        triton_backend.FORCE_CONFIG = cfg
        try:
            a.grad = b.grad = None
            psmc_fb()
            err = max(rel_err(ga, a.grad), rel_err(gb, b.grad))
            ms = do_bench(psmc_fb, warmup=25, rep=200, grad_to_none=[a, b], return_mode="median")
            row("linrec fwd+bwd", shape, f"psmc forced {cfg}", ms, moved, copy_gbs, {"grad_rel_err": err})
        except Exception as e:  # noqa: BLE001
            log(f"forced {cfg} failed: {e!r}"[:300])
        finally:
            triton_backend.FORCE_CONFIG = None
    try:
        from accelerated_scan.scalar import scan as acc_scan

        def acc_fb():
            acc_scan(a, b).backward(g)
        a.grad = b.grad = None
        acc_fb()
        log(f"grads vs accelerated-scan: a {rel_err(ga, a.grad):.2e}, b {rel_err(gb, b.grad):.2e}")
        a.grad = b.grad = None
        ms = do_bench(acc_fb, warmup=25, rep=200, grad_to_none=[a, b], return_mode="median")
        row("linrec fwd+bwd", shape, "accelerated-scan (triton)", ms, moved, copy_gbs)
    except Exception as e:  # noqa: BLE001
        RESULTS["notes"].append(f"accelerated-scan backward failed: {e!r}")
        log("accelerated-scan backward failed:", repr(e)[:300])
    if "torch" in args.peers:
        try:
            torch_scan = torch_linrec_scan()
            t0 = time.time()
            torch_scan(a, b).backward(g)
            torch.cuda.synchronize()
            log(f"torch associative_scan fwd+bwd compiled and ran once in {time.time() - t0:.1f} s; "
                f"grad rel diff a {rel_err(ga, a.grad):.2e}")
            times = []
            for _ in range(2):
                a.grad = b.grad = None
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch_scan(a, b).backward(g)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            row("linrec fwd+bwd", shape, "torch associative_scan (compiled)", min(times), moved, copy_gbs,
                {"timing": "best of 2 wall-clock runs"})
        except Exception as e:  # noqa: BLE001
            RESULTS["notes"].append(f"torch associative_scan backward failed: {e!r}")
            log("torch associative_scan backward failed:", repr(e)[:400])


WIDE_SHAPES = {"s5": ({}, (256, 2048)), "softmax_attn": ({"D": 64}, (64, 4096))}  # dims, (B, T)


def part_wide_bwd(args, copy_gbs):
    """s5 and softmax_attn forward + backward through autograd: the derived backward kernels
    (s5: one reverse scan of 25 shared coefficients and 25 values; softmax_attn: lane-free adjoints
    as per-lane shares) vs autograd through psmc's torch path on the same GPU, gradients compared
    first. Cases: --wide-cases op:dtype,... (s5:bf16 adds s5's recomputing backward, whose compile
    is the slowest). Bytes: the forward reads the inputs and writes the outputs, the backward reads
    the inputs and output gradients (and, for s5 in f32, the outputs) and writes input gradients."""
    shapes = WIDE_SHAPES
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    for case in args.wide_cases.split(","):
        name, dt = case.split(":")
        dims, (B, T) = shapes[name]
        dtype = dtypes[dt]
        op = example(name, **dims)
        x = draw(op, (B, T), device=DEVICE)
        if name == "s5":  # permutation matrices, as meant: long products stay well scaled
            x["P"] = torch.nn.functional.one_hot(torch.rand(B, T, 5, device=DEVICE).argsort(-1), 5).float()
        x = {k: v.to(dtype) for k, v in x.items()}
        leaves = list(x.values())
        gy = torch.randn((B, T) + op.ir.outputs[0].type.shape, device=DEVICE, dtype=dtype)
        shape = f"({B}, {T}){' D=' + str(dims['D']) if dims else ''} {dt} fwd+bwd"
        spy = {"calls": 0}
        mod = triton_backend.module(op.ir, interpret=DEVICE != "cuda")
        entry = f"{name}_backward_select"  # the derived backward's entry: picks the kernel
        inner = getattr(mod, entry)

        def counted(*a, **k):
            spy["calls"] += 1
            return inner(*a, **k)

        def fb(backend):
            def run():
                y = op(**{k: v.requires_grad_(True) for k, v in x.items()}, backend=backend)
                return torch.autograd.grad(y, leaves, gy)
            return run

        try:
            t0 = time.time()
            setattr(mod, entry, counted)
            got = fb("triton")()
            assert spy["calls"] == 1, "the derived backward kernel did not run"
            log(f"{case}: first fwd+bwd (compiles, autotunes the forward) {time.time() - t0:.1f} s")
            want = fb("torch")()
            errs = {k: rel_err(g, w) for k, g, w in zip(x, got, want)}
            log(f"{case}: grads rel diff kernel vs torch path " + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()))
            assert all(e < (1e-4 if dt == "f32" else 3e-2) for e in errs.values()), errs
            ys = op(**x)
            ys = ys if isinstance(ys, tuple) else (ys,)
            moved = 2 * nbytes(*leaves) + 2 * nbytes(*ys) + nbytes(gy) + (nbytes(*ys) if dt == "f32" else 0)
            ms = median_ms(fb("triton"), rep=50)
            row(f"{name} fwd+bwd", shape, "psmc (derived backward kernel)", ms, moved, copy_gbs)
            ms = median_ms(fb("torch"), rep=20)
            row(f"{name} fwd+bwd", shape, "psmc torch path (autograd)", ms, moved, copy_gbs)
        except Exception as e:  # noqa: BLE001
            RESULTS["notes"].append(f"{case} backward failed: {e!r}")
            log(f"{case} backward failed: {e!r}"[:500])
        finally:
            setattr(mod, entry, inner)


def part_diagnose(args, copy_gbs):
    """linrec training: forward with checkpoints and each backward variant timed alone, and a
    profile of one forward + backward through autograd."""
    B, C, T = 8, 1536, 4096
    op = example("linrec")
    mod = triton_backend.module(op.ir, interpret=False)
    a, b = linrec_inputs(B, C, T)
    g = torch.randn_like(a)
    x = {"a": a, "b": b}
    n = a.numel() * 4
    for cfg in [None, (1, 2048, 8), (1, 1024, 4), (1, 4096, 8)]:
        (y,), _, saved = mod.linrec_scan(x, want_ckpt=True, config=cfg)
        ms = median_ms(lambda: mod.linrec_scan(x, want_ckpt=True, config=cfg))
        log(f"  forward+ckpt {cfg} -> {saved[1]}: {ms:.4f} ms ({3 * n / ms / 1e6:.0f} GB/s)")
        for label, outs in (("from outputs", {"y": y}), ("recomputed", None)):
            ms = median_ms(lambda: mod.linrec_backward(x, {"y": g}, saved, outputs=outs))
            log(f"  backward {label} {saved[1]}: {ms:.4f} ms ({5 * n / ms / 1e6:.0f} GB/s)")
            RESULTS["sweep"].append({"op": f"linrec backward {label}", "config": saved[1], "ms": ms})
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()

    def fb():
        op(a=aa, b=bb).backward(g)
    fb()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            aa.grad = bb.grad = None
            fb()
        torch.cuda.synchronize()
    log(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50))
    t0 = time.perf_counter()
    for _ in range(20):
        aa.grad = bb.grad = None
        fb()
    torch.cuda.synchronize()
    log(f"  20 x fwd+bwd wall: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms per iteration")


EXAMPLE_SHAPES = {
    # name: (dims, batch, T)
    "cumsum": ({}, (8, 1536), 4096),
    "cummax": ({}, (8, 1536), 4096),
    "logcumsumexp": ({}, (8, 1536), 4096),
    "cumcount": ({}, (8, 1536), 4096),
    "rotation": ({}, (8, 1536), 4096),
    "affine": ({}, (4096,), 4096),
    "s5": ({}, (512,), 4096),
    "softmax_attn": ({}, (256,), 4096),
}


def draw(op, lead, device="cuda"):
    out = {}
    for f in op.ir.inputs:
        shape = lead + f.type.shape
        if f.type.dtype in ("i32", "i64"):
            out[f.name] = torch.randint(-5, 6, shape, device=device,
                                        dtype=torch.int32 if f.type.dtype == "i32" else torch.int64)
        else:
            lo, hi = f.range or (-1.0, 1.0)
            out[f.name] = torch.rand(shape, device=device) * (hi - lo) + lo
    return out


def part_examples(args, copy_gbs):
    """Every other associative example against its own roofline."""
    for name, (dims, batch, T) in EXAMPLE_SHAPES.items():
        if args.examples and name not in args.examples.split(","):
            continue
        try:
            op = example(name, **dims)
            run = launcher(op)
            x = draw(op, batch + (T,))
            outs, _, _ = run(x, out_dtype=torch.float32)
            moved = nbytes(*x.values(), *outs)
            small = {k: (v[:2, :300].double() if v.is_floating_point() else v[:2, :300])
                     for k, v in x.items()}
            ref = op(**small, backend="torch")
            ref = ref if isinstance(ref, tuple) else (ref,)
            errs = [rel_err(o[:2, :300], r) for o, r in zip(outs, ref)]
            err = max(errs)
            log(f"{name}: rel err vs float64 torch path {err:.2e}")
            shape = f"batch {batch}, T {T}" + (f", {dims}" if dims else "")
            ms = median_ms(lambda: run(x, out_dtype=torch.float32))
            mod = triton_backend.module(op.ir, interpret=False)
            kernel = getattr(mod, f"{name}_scan_kernel")
            chosen = [p.config for k, p in mod._PSMC_PLANS.items() if k[0] is kernel][-1]
            row(name, shape, f"psmc launcher [scan] {chosen}", ms, moved, copy_gbs, {"rel_err": err})
        except Exception as e:  # noqa: BLE001
            RESULTS["notes"].append(f"{name} failed: {e!r}")
            log(f"{name} failed: {e!r}"[:500])


def part_gla(args, copy_gbs):
    """GLA forward, B=4, T=4096, H=16, K=V=128, bf16: psmc recurrent vs flash-linear-attention."""
    B, T, H, K, V = 4, 4096, 16, 128, 128
    op = example("gla", K=K, V=V)
    mod = triton_backend.module(op.ir, interpret=False)
    run = getattr(mod, "gla_recurrent")
    dt = torch.bfloat16
    q = torch.randn(B, T, H, K, device="cuda", dtype=dt)
    k = torch.randn(B, T, H, K, device="cuda", dtype=dt) * K ** -0.5
    v = torch.randn(B, T, H, V, device="cuda", dtype=dt)
    gk = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda")).to(dt) / 16
    moved = nbytes(q, k, v, gk, v)
    shape = f"B={B} T={T} H={H} K=V={K} bf16"
    # psmc takes (*batch, T, *field): the (B, H, T, K) views of the same memory, no copies
    x = {"q": q.transpose(1, 2), "k": k.transpose(1, 2), "v": v.transpose(1, 2), "gk": gk.transpose(1, 2)}
    ref = None
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        ref, _ = fused_recurrent_gla(q, k, v, gk, scale=1.0)
    except Exception as e:  # noqa: BLE001
        RESULTS["notes"].append(f"fla import/run failed: {e!r}")
        log("fla failed:", repr(e)[:400])
        fused_recurrent_gla = chunk_gla = None
    best = None
    for cfg in [(8, 1, 2), (8, 1, 3), (4, 1, 2), (16, 1, 3)][:args.gla_configs]:
        try:
            (o,), _, _ = run(x, out_dtype=dt, config=cfg)
            if ref is not None:
                err = rel_err(o.transpose(1, 2), ref)
                assert err < 2e-2, err
            ms = median_ms(lambda: run(x, out_dtype=dt, config=cfg), rep=100)
            log(f"  gla config {cfg}: {ms:.3f} ms" + (f" (rel err vs fla {err:.1e})" if ref is not None else ""))
            RESULTS["sweep"].append({"op": "gla", "config": cfg, "ms": ms})
            if best is None or ms < best[0]:
                best = (ms, cfg)
        except Exception as e:  # noqa: BLE001
            log(f"  gla config {cfg} failed: {e!r}"[:300])
    if best:
        row("gla", shape, f"psmc recurrent {best[1]}", best[0], moved, copy_gbs)
    (o,), _, _ = run(x, out_dtype=dt)
    ms = median_ms(lambda: op(**x))
    row("gla", shape, "psmc op() default config", ms, moved, copy_gbs)
    if fused_recurrent_gla is not None:
        ms = median_ms(lambda: fused_recurrent_gla(q, k, v, gk, scale=1.0), rep=100)
        row("gla", shape, "fla fused_recurrent_gla", ms, moved, copy_gbs)
        try:
            oc, _ = chunk_gla(q, k, v, gk, scale=1.0)
            log(f"chunk_gla vs fused_recurrent: rel diff {rel_err(oc, ref):.1e}")
            ms = median_ms(lambda: chunk_gla(q, k, v, gk, scale=1.0), rep=100)
            row("gla", shape, "fla chunk_gla", ms, moved, copy_gbs)
        except Exception as e:  # noqa: BLE001
            log("chunk_gla failed:", repr(e)[:300])


def part_gla_bwd(args, copy_gbs):
    """GLA forward + backward, B=4, T=4096, H=16, K=V=128, bf16: psmc's derived recurrent backward
    vs flash-linear-attention's fused_recurrent_gla and chunk_gla (gradients checked against fla's
    fused_recurrent first)."""
    B, T, H, K, V = 4, 4096, 16, 128, 128
    op = example("gla", K=K, V=V)
    dt = torch.bfloat16
    q = torch.randn(B, T, H, K, device="cuda", dtype=dt)
    k = torch.randn(B, T, H, K, device="cuda", dtype=dt) * K ** -0.5
    v = torch.randn(B, T, H, V, device="cuda", dtype=dt)
    gk = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, device="cuda")).to(dt) / 16
    do = torch.randn(B, T, H, V, device="cuda", dtype=dt)
    leaves = [t.requires_grad_(True) for t in (q, k, v, gk)]
    # forward reads q, k, v, gk, writes o; backward reads them and do, writes dq, dk, dv, dgk
    moved = nbytes(q, k, v, gk, v) + nbytes(q, k, v, gk, do, q, k, v, gk)
    shape = f"B={B} T={T} H={H} K=V={K} bf16 fwd+bwd"

    def psmc_fb():  # psmc takes (*batch, T, *field): (B, H, T, K) views of fla's layout
        o = op(q=q.transpose(1, 2), k=k.transpose(1, 2), v=v.transpose(1, 2), gk=gk.transpose(1, 2))
        return torch.autograd.grad(o, leaves, do.transpose(1, 2))

    fla = {}
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        fla = {"fused_recurrent_gla": fused_recurrent_gla, "chunk_gla": chunk_gla}
    except Exception as e:  # noqa: BLE001
        RESULTS["notes"].append(f"fla import failed: {e!r}")
        log("fla import failed:", repr(e)[:400])

    def fla_fb(fn):
        def run():
            o, _ = fn(q, k, v, gk, scale=1.0)
            return torch.autograd.grad(o, leaves, do)
        return run

    ref = None
    if fla:
        try:
            ref = fla_fb(fla["fused_recurrent_gla"])()
        except Exception as e:  # noqa: BLE001
            log("fla fused_recurrent_gla backward failed:", repr(e)[:400])
    names = ("dq", "dk", "dv", "dgk")
    best = None
    for cfg in [None, (8, 1, 3, 64), (8, 1, 3, 32), (4, 1, 3, 64), (16, 2, 3, 64)]:
        triton_backend.FORCE_CONFIG = cfg
        try:
            got = psmc_fb()
            if ref is not None:
                errs = {n: rel_err(g, r) for n, g, r in zip(names, got, ref)}
                log(f"  gla_bwd config {cfg}: rel err vs fla fused_recurrent "
                    + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
                assert all(e < 5e-2 for e in errs.values()), errs
            ms = median_ms(psmc_fb, rep=50)
            log(f"  gla_bwd config {cfg}: {ms:.3f} ms")
            RESULTS["sweep"].append({"op": "gla_bwd", "config": cfg, "ms": ms})
            if best is None or ms < best[0]:
                best = (ms, cfg)
        except Exception as e:  # noqa: BLE001
            log(f"  gla_bwd config {cfg} failed: {e!r}"[:300])
        finally:
            triton_backend.FORCE_CONFIG = None
    if best:
        row("gla_bwd", shape, f"psmc recurrent {best[1] or 'default'}", best[0], moved, copy_gbs)
    for name, fn in fla.items():
        try:
            if ref is not None and name != "fused_recurrent_gla":
                got = fla_fb(fn)()
                log(f"  {name} vs fused_recurrent_gla: rel diff "
                    + ", ".join(f"{n} {rel_err(g, r):.1e}" for n, g, r in zip(names, got, ref)))
            ms = median_ms(fla_fb(fn), rep=50)
            row("gla_bwd", shape, f"fla {name}", ms, moved, copy_gbs)
        except Exception as e:  # noqa: BLE001
            log(f"{name} fwd+bwd failed:", repr(e)[:300])


def plot(out: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        log("no matplotlib:", e)
        return
    curve = RESULTS["curve"]
    if not curve:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for impl, style in (("psmc", "o-"), ("accelerated-scan", "s--"), ("torch associative_scan", "^-."),
                        ("copy", "k:")):
        pts = sorted((c["T"], c["GB/s"]) for c in curve if c["impl"] == impl)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("T (sequence length); 8 x 1536 x 4096 tokens per call, fp32")
    ax.set_ylabel("achieved bandwidth, GB/s")
    ax.set_title(f"linrec forward on {torch.cuda.get_device_name()}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bandwidth_vs_T.png", dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="copy,linrec,backward,wide_bwd,sweep,curve,twopass,examples,gla,gla_bwd")
    ap.add_argument("--peers", default="acc,torch")
    ap.add_argument("--gla-configs", type=int, default=4)
    ap.add_argument("--bwd-configs", default="1x2048x8,1x4096x8,1x1024x4",
                    type=lambda s: [tuple(int(v) for v in c.split("x")) for c in s.split(",") if c],
                    help="forced (BLOCK_L x BLOCK_T x warps) block shapes for linrec fwd+bwd")
    ap.add_argument("--examples", default="", help="comma-separated subset of the examples part")
    ap.add_argument("--wide-cases", default="s5:f32,softmax_attn:f32,softmax_attn:bf16",
                    help="op:dtype cases of the wide_bwd part")
    ap.add_argument("--wide-unshared", action="store_true",
                    help="generate s5's backward as five scans of 30 instead of one sharing its "
                         "coefficients (fewer spills, 3x the arithmetic; a fresh module cache)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    if args.wide_unshared:  # before any module is generated in this process
        import tempfile

        from psmc.codegen import triton as triton_codegen, triton_adjoint
        triton_adjoint.MAX_SHARED_SCALARS = 0
        triton_codegen.backward_plan.cache_clear()
        os.environ["PSMC_CACHE_DIR"] = tempfile.mkdtemp(prefix="psmc-unshared-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    RESULTS["env"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "psmc": psmc.__version__,
        "command": " ".join(sys.argv),
    }
    log(json.dumps(RESULTS["env"]))
    t0 = time.time()
    copy_gbs = part_copy(args)
    for p in parts:
        if p == "copy":
            continue
        log(f"--- {p} ({time.time() - t0:.0f} s)")
        globals()[f"part_{p}"](args, copy_gbs)
        (out / "results.json").write_text(json.dumps(RESULTS, indent=1))
    plot(out)
    (out / "results.json").write_text(json.dumps(RESULTS, indent=1))
    log(f"--- done in {time.time() - t0:.0f} s")
    log(f"{'op':14s} {'impl':34s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s}")
    for r in RESULTS["rows"]:
        log(f"{r['op']:14s} {r['impl']:34s} {r['ms']:9.4f} {r['GB/s']:8.1f} {r['pct_copy'] or 0:6.1f}")


if __name__ == "__main__":
    main()
