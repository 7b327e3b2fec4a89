"""The module `psmc compile` writes runs its Triton kernels on its own (torch + triton only):
forward, the derived backward and the step kernel, under TRITON_INTERPRET=1 in a fresh process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import dataclasses, importlib, sys, torch
    sys.path.insert(0, sys.argv[1])
    mod = importlib.import_module(sys.argv[2])
    assert "psmc" not in sys.modules  # torch and triton only
    op = getattr(mod, sys.argv[3])()
    torch.manual_seed(0)
    x = {}
    for f in mod.SPEC.inputs:
        shape = (2, 37) + f.shape
        x[f.name] = (torch.rand(shape, dtype=torch.float64) if f.dtype.startswith("f")
                     else torch.randint(-3, 4, shape))
    want = op.reference(**x)
    got = op(**x, backend="triton")
    again = op(**x, backend="triton")  # the same signature: the fast path, the same kernels
    assert len(op._fast) == 1
    want, got = (want if isinstance(want, tuple) else (want,)), (got if isinstance(got, tuple) else (got,))
    again = again if isinstance(again, tuple) else (again,)
    for w, g, h in zip(want, got, again):
        assert torch.allclose(g.double(), w.double(), rtol=1e-9, atol=1e-9), (g, w)
        assert torch.equal(g, h)
    # prefill, then continue from the kernel's state
    head = {k: v[:, :20] for k, v in x.items()}
    tail = {k: v[:, 20:] for k, v in x.items()}
    _, st = op(**head, backend="triton", return_state=True)
    rest = op(**tail, backend="triton", initial_state=st)
    rest = rest if isinstance(rest, tuple) else (rest,)
    for w, g in zip(want, rest):
        assert torch.allclose(g.double(), w[:, 20:].double(), rtol=1e-9, atol=1e-9)
    if sys.argv[4] == "grad":  # the derived backward kernel against autograd through the torch code
        calls = []  # the derived backward's entry (scan: its kernel's selection; recurrent: its launcher)
        entry = sys.argv[2] + ("_backward_select" if hasattr(mod, sys.argv[2] + "_backward_select") else "_backward")
        inner = getattr(mod, entry)
        setattr(mod, entry, lambda *a, **k: calls.append(1) or inner(*a, **k))
        short = {k: v[:, :12] for k, v in x.items()}  # the interpreter scans element by element
        runs = []
        for _ in range(2 if sys.argv[2] == "linrec" else 1):  # linrec's second call: the fast path
            xs = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in short.items()}
            y = op(**xs, backend="triton")
            (y if not isinstance(y, tuple) else y[0]).pow(2).sum().backward()
            runs.append({k: v.grad.clone() for k, v in xs.items() if v.grad is not None})
            assert len(op._fast) == 2
        assert calls  # the kernel, not autograd through the torch code
        g_kernel = runs[0]
        assert all(torch.equal(r[k], g_kernel[k]) for r in runs for k in g_kernel)
        ys = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in short.items()}
        y = op(**ys, backend="torch")
        (y if not isinstance(y, tuple) else y[0]).pow(2).sum().backward()
        assert g_kernel and all(torch.allclose(g_kernel[k], ys[k].grad, rtol=1e-7, atol=1e-9) for k in g_kernel)
        # continuing a stream: the initial state's and the final state's gradients, same kernels
        _, st = op(**{k: v[:, :3] for k, v in x.items()}, backend="torch", return_state=True)

        def state_grads(backend):
            init = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in st.prefix.items()}
            xs = {k: v[:, :6].clone().requires_grad_(v.is_floating_point()) for k, v in short.items()}
            y, fin = op(**xs, backend=backend, initial_state=dataclasses.replace(st, prefix=init),
                        return_state=True)
            loss = (y if not isinstance(y, tuple) else y[0]).pow(2).sum()
            loss = loss + sum(v.sum() for v in fin.prefix.values() if v.is_floating_point())
            loss.backward()
            return {k: v.grad for k, v in list(xs.items()) + list(init.items()) if v.grad is not None}
        calls.clear()
        g_kernel = state_grads("triton")
        assert calls
        g_torch = state_grads("torch")
        assert g_kernel.keys() == g_torch.keys() and any(k in st.prefix for k in g_kernel)
        assert all(torch.allclose(g_kernel[k], g_torch[k], rtol=1e-7, atol=1e-9) for k in g_kernel)
    print("ok")
""")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    files = [str(ROOT / "examples" / f"{n}.psm") for n in ("linrec", "affine", "softmax_attn", "cumcount", "s5")]
    subprocess.run([sys.executable, "-m", "psmc.cli", "compile", *files, "-o", str(out), "--set", "D=4"],
                   check=True, capture_output=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "psmc.cli", "compile", str(ROOT / "examples" / "gla.psm"), "-o",
                    str(out), "--set", "K=4", "--set", "V=4"], check=True, capture_output=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "psmc.cli", "compile", str(ROOT / "examples" / "mlstm.psm"),
                    "-o", str(out)], check=True, capture_output=True, cwd=ROOT)
    return out


@pytest.mark.parametrize("name, cls, grad", [("linrec", "Linrec", "grad"), ("affine", "Affine", "grad"),
                                             ("softmax_attn", "SoftmaxAttn", "grad"),
                                             ("cumcount", "Cumcount", "nograd"),
                                             ("mlstm", "Mlstm", "grad"), ("s5", "S5", "grad"),
                                             ("gla", "Gla", "grad")])
def test_compiled_module_runs_its_kernels_alone(build, name, cls, grad):
    text = (build / f"{name}.py").read_text()
    assert "@triton.jit" in text and f"def {name}_step(" in text
    assert (f"def {name}_backward(" in text) == (grad == "grad")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(build), name, cls, grad],
                       capture_output=True, text=True, timeout=300,
                       env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin", "HOME": str(build)})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


BAD_BACKENDS = textwrap.dedent("""
    import importlib, sys, torch
    sys.path.insert(0, sys.argv[1])
    mod = importlib.import_module("linrec")
    op = mod.Linrec()
    a, b = torch.rand(2, 5), torch.randn(2, 5)
    for kwargs in ({"backend": "triton"}, {"backend": "tirton"}):
        try:
            op(a=a, b=b, **kwargs)
        except mod.PsmCallError as e:
            print("error:", e)
    try:
        op(a=a.to("meta"), b=b.to("meta"), backend="triton")
    except mod.PsmCallError as e:
        print("error:", e)
    print(op(a=a, b=b).shape)  # the default still runs the torch code on CPU
""")


def test_compiled_module_says_when_its_kernels_cannot_run(build):
    """backend="triton" without CUDA or the interpreter, or an unknown backend: a clear error."""
    r = subprocess.run([sys.executable, "-c", BAD_BACKENDS, str(build)], capture_output=True, text=True,
                       timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(build)})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == "torch.Size([2, 5])", r.stdout
    assert "TRITON_INTERPRET=1" in lines[0] and "backend='torch'" in lines[0]
    assert "backend must be one of auto, triton, torch, reference, got 'tirton'" in lines[1]
    assert "needs CUDA tensors" in lines[2] and "meta" in lines[2]
