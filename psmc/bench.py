"""`psmc bench`: time an op on the GPU against its torch path and the memory roofline.

The roofline is the time to move the bytes the op must move (inputs read once, outputs written
once) at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import torch

from .errors import PsmError


def _inputs(op, batch: tuple[int, ...], T: int, dtype: torch.dtype, device: str) -> dict:
    out = {}
    for f in op.ir.inputs:
        shape = batch + (T,) + f.type.shape
        if f.type.dtype in ("i32", "i64"):
            out[f.name] = torch.randint(-3, 4, shape, device=device)
        elif f.type.dtype == "bool":
            out[f.name] = torch.rand(shape, device=device) > 0.5
        else:
            lo, hi = f.range if f.range and all(abs(v) != float("inf") for v in f.range) else (-1.0, 1.0)
            out[f.name] = (torch.rand(shape, device=device) * (hi - lo) + lo).to(dtype)
    return out


def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def run(op, args) -> int:
    if not torch.cuda.is_available():
        raise PsmError("psmc bench needs a CUDA GPU, and torch sees none",
                       hint="run it on a GPU machine; `psmc test` checks correctness on the CPU")
    from triton.testing import do_bench

    try:
        dims = tuple(int(v) for v in args.shape.split(","))
    except ValueError:
        raise PsmError(f"--shape must be integers separated by commas, got {args.shape!r}") from None
    batch, T = dims[:-1], dims[-1]
    dtype = getattr(torch, args.dtype)
    x = _inputs(op, batch, T, dtype, "cuda")
    y = op(**x)
    outs = y if isinstance(y, tuple) else (y,)
    nbytes = sum(t.numel() * t.element_size() for t in x.values()) + sum(
        t.numel() * t.element_size() for t in outs)
    bw = copy_bandwidth()
    rows = []
    for backend in ("triton", "torch"):
        try:
            ms = do_bench(lambda: op(**x, backend=backend), warmup=25, rep=100, return_mode="median")
        except Exception as e:  # a path that cannot run this op is reported, not fatal
            rows.append((backend, None, str(e).splitlines()[0][:60]))
            continue
        rows.append((backend, ms, ""))
    floor_ms = nbytes / bw * 1e3
    print(f"{op.name}  shape={dims}  dtype={args.dtype}  bytes={nbytes / 1e6:.1f} MB  "
          f"copy bandwidth={bw / 1e9:.0f} GB/s  roofline={floor_ms:.4f} ms")
    print(f"{'path':10s} {'ms':>10s} {'GB/s':>8s} {'% roofline':>11s}")
    for backend, ms, note in rows:
        if ms is None:
            print(f"{backend:10s} {'-':>10s} {'-':>8s} {'-':>11s}  {note}")
        else:
            print(f"{backend:10s} {ms:10.4f} {nbytes / ms / 1e6:8.0f} {100 * floor_ms / ms:10.1f}%")
    return 0
