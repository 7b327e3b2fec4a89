"""linrec's derived backward kernel at other warp counts and as edited variants: GPU time by
kernel (torch.profiler).

    python3 benchmarks/bwd_warps.py [--shape 8,1536,4096] [--warps 8,4,2] [--variants]

diagnose_host.py showed the backward kernel, not the host, behind psmc's forward + backward gap
to accelerated-scan on the H200 (353 us against accelerated-scan's backward_scan 263 us, forwards
equal). accelerated-scan runs its 2048-token blocks on 4 warps (16 elements a thread); psmc's
backward plan gives 8 elements a thread. This re-binds the backward launch at each warp count
(its first launch compiles it), checks the gradients equal the default's, and prints the kernels'
GPU time per forward + backward. --variants then swaps in edited copies of the generated
backward kernel (VARIANTS: text edits of the generated module, at the default warps) the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from diagnose_host import gpu_kernel_us, linrec_op  # noqa: E402


CARRY = ("        lam_h = v_h + M_h__h * lamc_h\n"
         "        lamc_h = tl.reduce(tl.where(is_first, lam_h, 0.0), 1, _psmc_add, keep_dims=True)\n")
VARIANTS = {
    # the next block's carry from the scan's first element, off the carry's dependency chain
    "carry-from-scan": (CARRY, "        lam_h = v_h + M_h__h * lamc_h\n"
                        "        lamc_h = (tl.reduce(tl.where(is_first, v_h, 0.0), 1, _psmc_add, keep_dims=True)\n"
                        "                  + tl.reduce(tl.where(is_first, M_h__h, 0.0), 1, _psmc_add, keep_dims=True) * lamc_h)\n"),
    # the carry gathered from the first element instead of reduced
    "carry-gather": (CARRY, "        lam_h = v_h + M_h__h * lamc_h\n"
                     "        lamc_h = tl.gather(lam_h, tl.zeros([BLOCK_L, 1], tl.int32), 1)\n"),
    # the previous states read after b's gradient is stored (accelerated-scan's order)
    "late-states": ("        tl.store(gx_a_t, gx_a.to(gx_a_ptr.dtype.element_ty), mask=mask)\n"
                    "        tl.store(gx_b_t, gx_b.to(gx_b_ptr.dtype.element_ty), mask=mask)\n",
                    "        tl.store(gx_b_t, gx_b.to(gx_b_ptr.dtype.element_ty), mask=mask)\n"
                    "        gx_a = lam_h * tl.where((t == 0)[None, :], ck_h, tl.load(sy_y_t - sy_y_st, "
                    "mask=mask & (t > 0)[None, :], other=0).to(ACC))\n"
                    "        tl.store(gx_a_t, gx_a.to(gx_a_ptr.dtype.element_ty), mask=mask)\n"),
    # no checkpoint at the first token (right only from the identity: a timing probe)
    "no-ckpt": ("tl.where((t == 0)[None, :], ck_h, tl.load(sy_y_t - sy_y_st, mask=mask & (t > 0)[None, :], other=0).to(ACC))",
                "tl.load(sy_y_t - sy_y_st, mask=mask & (t > 0)[None, :], other=0).to(ACC)"),
    # Triton's own software pipelining of the block loop
    "loop-stages-3": ("    for i in range(0, n_blocks):\n", "    for i in tl.range(0, n_blocks, num_stages=3):\n"),
}


def variant_kernel(op, name: str, tmp: Path):
    """The backward_saved kernel of the generated module with one VARIANTS edit, compiled."""
    from psmc import cache

    text = cache.module_file(op.ir, "triton", lambda: None).read_text()
    old, new = VARIANTS[name]
    start = text.index("def linrec_backward_saved_kernel(")
    end = text.index("\n@triton.jit", start)
    assert old in text[start:end], name
    path = tmp / f"linrec_{name.replace('-', '_')}.py"
    path.write_text(text[:start] + text[start:end].replace(old, new) + text[end:])
    return cache.load(path, interpret=False).linrec_backward_saved_kernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8,1536,4096")
    ap.add_argument("--warps", default="8,4,2")
    ap.add_argument("--variants", default="", help="comma-separated VARIANTS names, or all")
    args = ap.parse_args()
    from psmc import triton_backend

    shape = tuple(int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    a = torch.rand(shape, device="cuda").requires_grad_()
    b = torch.randn(shape, device="cuda").requires_grad_()
    g = torch.randn(shape, device="cuda")
    op = linrec_op()

    def fwd_bwd():
        a.grad = b.grad = None
        op(a=a, b=b).backward(g)

    fwd_bwd()
    want = a.grad.clone(), b.grad.clone()
    mod = triton_backend.module(op.ir, interpret=False)
    plans = [p for p in mod._PSMC_BACKWARD_PLANS.values() if not p.empty]
    default_warps = plans[0].launch.constexprs["num_warps"]
    print("backward plans:", len(plans), "default warps", [p.launch.constexprs["num_warps"] for p in plans])
    for w in (int(v) for v in args.warps.split(",")):
        for p in plans:
            p.launch.constexprs["num_warps"] = w
            p.launch.compiled = None  # the next launch compiles for w warps, then goes direct
        fwd_bwd()
        fwd_bwd()
        same = torch.allclose(a.grad, want[0], rtol=1e-6, atol=1e-6) and torch.allclose(b.grad, want[1], rtol=1e-6, atol=1e-6)
        times = ", ".join(f"{k} {us:.1f}" for k, us in gpu_kernel_us(fwd_bwd, 20))
        print(f"backward at {w} warps: grads equal default {same}; us: {times}", flush=True)
    if args.variants:
        import tempfile

        for p in plans:
            p.launch.constexprs["num_warps"] = default_warps
        with tempfile.TemporaryDirectory() as tmp:
            for name in (VARIANTS if args.variants == "all" else args.variants.split(",")):
                try:
                    kernel = variant_kernel(op, name, Path(tmp))
                except Exception as e:  # report and go on
                    print(f"{name}: failed to build: {e!r}"[:300], flush=True)
                    continue
                for p in plans:
                    p.launch.kernel, p.launch.compiled = kernel, None
                try:
                    fwd_bwd()
                    fwd_bwd()
                except Exception as e:
                    print(f"{name}: failed to run: {e!r}"[:300], flush=True)
                    continue
                same = torch.allclose(a.grad, want[0], rtol=1e-6, atol=1e-6) and torch.allclose(b.grad, want[1], rtol=1e-6, atol=1e-6)
                times = ", ".join(f"{k} {us:.1f}" for k, us in gpu_kernel_us(fwd_bwd, 20))
                print(f"variant {name}: grads equal default {same}; us: {times}", flush=True)


if __name__ == "__main__":
    main()
