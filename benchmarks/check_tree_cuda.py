"""The tree kernels compiled for the GPU, checked before timing them (CI checks the interpreter).

    python benchmarks/check_tree_cuda.py

For both expression examples: forward at several T (f32 kernels against the f64 torch level
path), gradients against autograd through the f64 torch level path, and a prefill continued from
its stream state. Then the same op compiled by `psmc compile` into a temporary folder and imported
from there (the vendored module, which carries its own tree kernels and host code): its CUDA
forward, gradients and prefill + continue against the package's tree kernels and the f64 torch
path. Prints one line per check and exits 1 on any failure.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psmc  # noqa: E402
from psmc import tree_backend  # noqa: E402
from psmc.codegen.module import class_name  # noqa: E402
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
        bad += check_vendored(op, name, dev, gen)
    return 1 if bad else 0


def vendored(op, name: str, folder: Path):
    """The op's module as `psmc compile` writes it, imported from `folder` (not through psmc)."""
    path = folder / f"{name}.py"
    path.write_text(op.module_source())
    spec = importlib.util.spec_from_file_location(f"vendored_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def check_vendored(op, name: str, dev, gen) -> int:
    """The vendored module on CUDA tensors: forward, backward, prefill + continue. Failures."""
    bad = 0

    def report(what, err, tol):
        nonlocal bad
        ok = err < tol
        bad += not ok
        print(f"{name} vendored {what}: max err {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        mod = vendored(op, name, Path(folder))
        assert f"def {name}_tree_lanes_down_x(" in Path(folder, f"{name}.py").read_text()
        vop = getattr(mod, class_name(op.ir))()
        for T in (1, 100, 5000):
            x = {k: v.float() for k, v in draw(op, 3, T, dev, gen).items()}
            got, pkg = vop(**x, backend="triton"), op(**x, backend="triton")  # both on tree kernels
            report(f"forward T={T} vs package", (got - pkg).abs().max().item(), 1e-5)
            want = op(**{k: v.double() for k, v in x.items()}, backend="torch")
            report(f"forward T={T} vs f64 torch", (got.double() - want).abs().max().item(), 1e-4)
        x = draw(op, 2, 3000, dev, gen)
        w = torch.randn(2, 3000, *op.ir.outputs[0].type.shape, device=dev, dtype=torch.float64)
        x64 = {k: v.clone().requires_grad_() for k, v in x.items()}
        want = torch.autograd.grad((op(**x64, backend="torch") * w).sum(), list(x64.values()))
        grads = []
        for run in (vop, op):  # the vendored module, then the package
            x32 = {k: v.float().requires_grad_() for k, v in x.items()}
            y = run(**x32, backend="triton")
            grads.append(torch.autograd.grad((y.double() * w).sum(), list(x32.values())))
        err = max(((g.double() - h).abs().max() / (1 + h.abs().max())).item() for g, h in zip(grads[0], want))
        report("backward T=3000 vs f64 torch (relative)", err, 1e-3)
        err = max(((g - h).abs().max() / (1 + h.abs().max())).item() for g, h in zip(*grads))
        report("backward T=3000 vs package (relative)", err, 1e-5)
        x32 = {k: v.float() for k, v in x.items()}
        y1, st = vop(**{k: v[:, :1234] for k, v in x32.items()}, backend="triton", return_state=True)
        y2 = vop(**{k: v[:, 1234:] for k, v in x32.items()}, backend="triton", initial_state=st)
        want = op(**x, backend="torch")
        report("prefill 1234 + continue", (torch.cat([y1, y2], 1).double() - want).abs().max().item(), 1e-4)
    return bad


if __name__ == "__main__":
    raise SystemExit(main())
