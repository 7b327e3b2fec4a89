"""End-to-end check on a CUDA machine: every example's default CUDA path against the float64
reference on the CPU (forward, gradients, prefill + step), and a compiled module on its own.

    python3 benchmarks/check_cuda.py            # prints one row per example, then "all ok"
    python3 benchmarks/check_cuda.py --cpu      # the same on the CPU (torch paths): a dry run
    python3 benchmarks/check_cuda.py --ops s5,softmax_attn   # some examples only

The gradient column compares the default path with autograd through the torch path (also for a
call continuing from a state: the initial state's gradients, and the final state's); the `bwd`
column says which backward the default path ran: `kernel` (the derived backward kernel of the
op's generated module), `torch`, or `tree` (the tree backend's reverse kernels). On CUDA every
associative example with float inputs must say `kernel` (gla16: GLA at K = V = 16, which runs
strategy scan; gla and mlstm at their sizes here run strategy recurrent).
"""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psmc  # noqa: E402
from helpers import SMALL_DIMS, random_inputs  # noqa: E402

DEVICE = "cpu" if "--cpu" in sys.argv else "cuda"  # --cpu: a dry run of the script itself
DIMS = dict(SMALL_DIMS, softmax_attn={"D": 64}, gla={"K": 64, "V": 64}, mlstm={"K": 16, "V": 16},
            gla16={"K": 16, "V": 16})
# ops whose gradients must come from a derived backward kernel on CUDA
KERNEL_BACKWARD = {"cumsum", "cummax", "logcumsumexp", "linrec", "rotation", "affine", "softmax_attn",
                   "gla", "gla16", "mlstm", "s5"}


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tup(y):
    return y if isinstance(y, tuple) else (y,)


class _BackwardSpy:
    """Counts calls of the derived backward's entry in the op's generated module (strategy scan:
    `{op}_backward_select`, which picks the kernel; recurrent: the launcher `{op}_backward`), so a
    row can say which backward ran."""

    def __init__(self, op):
        from psmc import triton_backend

        self.mod, self.calls = None, 0
        if DEVICE == "cuda" and triton_backend.why_not(op, op._prepare(random_inputs(op, (1,), 2))) is None:
            self.mod = triton_backend.module(op.ir, interpret=False)
            self.name = f"{op.name}_backward_select"
            if not hasattr(self.mod, self.name):
                self.name = f"{op.name}_backward"
            self.inner = getattr(self.mod, self.name, None)

    def __enter__(self):
        if self.mod is not None and self.inner is not None:
            def counted(*a, **k):
                self.calls += 1
                return self.inner(*a, **k)
            setattr(self.mod, self.name, counted)
        return self

    def __exit__(self, *exc):
        if self.mod is not None and self.inner is not None:
            setattr(self.mod, self.name, self.inner)

    def path(self, op) -> str:
        if not op.associative:
            return "tree"
        return "kernel" if self.calls else "torch"


def check(label: str) -> tuple[str, float, float, float, float, str]:
    name = "gla" if label == "gla16" else label
    op = psmc.compile_file(ROOT / "examples" / f"{name}.psm", **DIMS.get(label, {}))[name]
    t0 = time.perf_counter()
    fwd = 0.0
    # two input sets of one shape: the second call reuses the first's launch plan (the direct
    # launcher), so both paths are compared with the reference
    for seed in (1, 2):
        x64 = random_inputs(op, (3,), 300, seed=seed)
        want = tup(op.reference(**x64))
        x = {k: (v.float() if v.is_floating_point() else v).to(DEVICE) for k, v in x64.items()}
        got = tup(op(**x))
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        fwd = max(fwd, max(rel(g, w) for g, w in zip(got, want) if w.is_floating_point()) if any(
            w.is_floating_point() for w in want) else max((g.cpu() != w).float().max().item()
                                                          for g, w in zip(got, want)))
    # prefill + step over the last 5 tokens
    head = {k: v[:, :295] for k, v in x.items()}
    _, st = op(**head, return_state=True)
    steps = []
    for t in range(295, 300):
        y, st = op.step(st, **{k: v[:, t] for k, v in x.items()})
        steps.append(tup(y)[0])
    step_err = rel(torch.stack(steps, 1), want[0][:, 295:]) if want[0].is_floating_point() else 0.0
    # gradients: default path vs the torch path, both on CUDA
    grad_err, path = float("nan"), "-"
    floats = [k for k, v in x.items() if v.is_floating_point()]
    if floats and op.ir.outputs[0].type.dtype.startswith("f"):
        grad_err = 0.0
        with _BackwardSpy(op) as spy:
            for scale in (1.0, 0.5):  # twice: the second backward reuses its launch plan
                xs = {k: (v * scale if k in floats else v) for k, v in x.items()}
                xa = {k: v.clone().requires_grad_(k in floats) for k, v in xs.items()}
                tup(op(**xa))[0].pow(2).mean().backward()
                xb = {k: v.clone().requires_grad_(k in floats) for k, v in xs.items()}
                tup(op(**xb, backend="torch"))[0].pow(2).mean().backward()
                grad_err = max(grad_err, max(rel(xa[k].grad, xb[k].grad) for k in floats))
            if op.associative:  # continuing a stream: the initial state's gradients too
                grad_err = max(grad_err, _state_grad_err(op, x, floats))
        path = spy.path(op)
    return label, fwd, grad_err, step_err, time.perf_counter() - t0, path


def _state_grad_err(op, x, floats) -> float:
    """Relative difference of the inputs' and the initial state's gradients of a call that
    continues from a state (and returns its final state), default path vs the torch path."""
    _, st = op(**{k: v[:, :100] for k, v in x.items()}, backend="torch", return_state=True)
    got = []
    for backend in ("auto", "torch"):
        init = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in st.prefix.items()}
        xs = {k: v[:, 100:].clone().requires_grad_(k in floats) for k, v in x.items()}
        y, fin = op(**xs, initial_state=dataclasses.replace(st, prefix=init), return_state=True, backend=backend)
        loss = tup(y)[0].pow(2).mean() + sum(v.mean() for v in fin.prefix.values() if v.is_floating_point())
        loss.backward()
        got.append([v.grad for v in list(xs.values()) + list(init.values()) if v.grad is not None])
    return max(rel(a, b) for a, b in zip(*got))


def check_compiled_module() -> float:
    out = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "psmc.cli", "compile", str(ROOT / "examples" / "linrec.psm"),
                    "-o", str(out)], check=True, cwd=ROOT)
    sys.path.insert(0, str(out))
    mod = importlib.import_module("linrec")
    op = mod.Linrec()
    a = torch.rand(4, 5000, device=DEVICE, requires_grad=True)
    b = torch.randn(4, 5000, device=DEVICE, requires_grad=True)
    y = op(a=a, b=b)
    y.square().sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    yt = op(a=a, b=b, backend="torch")
    yt.square().sum().backward()
    return max(rel(y, yt), rel(ga, a.grad), rel(gb, b.grad))


def main() -> int:
    names = ["cumsum", "cummax", "logcumsumexp", "linrec", "rotation", "affine", "softmax_attn",
             "gla", "gla16", "mlstm", "s5", "cumcount", "nonassoc_mix", "softmax_agg"]
    print(f"{'op':14s} {'fwd rel':>10s} {'grad rel':>10s} {'bwd':>6s} {'step rel':>10s} {'s':>6s}", flush=True)
    if "--ops" in sys.argv:
        names = sys.argv[sys.argv.index("--ops") + 1].split(",")
    ok = True
    for n in names:
        try:
            name, f, g, s, t, path = check(n)
        except Exception as e:  # report and go on: one broken op must not hide the others
            print(f"{n:14s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            ok = False
            continue
        bad = f > 1e-4 or s > 1e-4 or (g == g and g > 1e-3)
        wrong_path = DEVICE == "cuda" and name in KERNEL_BACKWARD and path != "kernel"
        ok &= not bad and not wrong_path
        note = "  <-- too large" if bad else "  <-- not the derived kernel" if wrong_path else ""
        grad = f"{g:10.2e}" if g == g else f"{'-':>10s}"  # nan: no float input, no gradient
        print(f"{name:14s} {f:10.2e} {grad} {path:>6s} {s:10.2e} {t:6.1f}{note}", flush=True)
    m = check_compiled_module()
    print(f"compiled linrec module on CUDA: fwd/grad rel {m:.2e}", flush=True)
    ok &= m < 1e-4
    print("all ok" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
