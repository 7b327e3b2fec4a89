"""The tree kernels compiled for the GPU, checked before timing them (CI checks the interpreter).

    python benchmarks/check_tree_cuda.py

For both expression examples: forward at several T (f32 kernels against the f64 torch level
path), gradients against autograd through the f64 torch level path, and a prefill continued from
its stream state. Prints one line per check and exits 1 on any failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psmc  # noqa: E402
from psmc import tree_backend  # noqa: E402
from psmc.standalone import prepare  # noqa: E402


def draw(op, B, T, dev, gen):
    out = {}
    for f in op.ir.inputs:
        lo, hi = f.range or (-1.0, 1.0)
        out[f.name] = torch.rand((B, T) + f.type.shape, device=dev, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    return out


def main() -> int:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    bad = 0
    for name in ("nonassoc_mix", "softmax_agg"):
        op = psmc.compile_file(ROOT / f"examples/{name}.psm")[name]
        run = lambda x, **kw: tree_backend.run(op, prepare(op.spec, x), kw.get("initial"),
                                               kw.get("return_state", False), strict=True)
        for T in (1, 7, 100, 257, 5000, 70000):
            x = draw(op, 3, T, dev, gen)
            want = op(**x, backend="torch")
            got = run({k: v.float() for k, v in x.items()})
            err = (got.double() - want).abs().max().item()
            ok = err < 1e-4
            bad += not ok
            print(f"{name} forward T={T}: max err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
        x = {k: v.requires_grad_() for k, v in draw(op, 2, 3000, dev, gen).items()}
        w = torch.randn(2, 3000, *op.ir.outputs[0].type.shape, device=dev, dtype=torch.float64)
        want = torch.autograd.grad((op(**x, backend="torch") * w).sum(), list(x.values()))
        x32 = {k: v.detach().float().requires_grad_() for k, v in x.items()}
        got = torch.autograd.grad((run(x32).double() * w).sum(), list(x32.values()))
        err = max(((g.double() - h).abs().max() / (1 + h.abs().max())).item() for g, h in zip(got, want))
        ok = err < 1e-3
        bad += not ok
        print(f"{name} backward T=3000: max rel err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
        x = draw(op, 2, 3000, dev, gen)
        x32 = {k: v.float() for k, v in x.items()}
        want = op(**x, backend="torch")
        y1, st = run({k: v[:, :1234] for k, v in x32.items()}, return_state=True)
        y2 = run({k: v[:, 1234:] for k, v in x32.items()}, initial=st)
        err = (torch.cat([y1, y2], 1).double() - want).abs().max().item()
        ok = err < 1e-4
        bad += not ok
        print(f"{name} prefill 1234 + continue: max err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
