"""Streaming on the Triton path (`{op}_step`: the forward kernel at T = 1) and the emit targets."""

from __future__ import annotations

import pytest
import torch

import psmc
from psmc import triton_backend
from psmc.codegen import emit

from triton_cases import SCAN_OPS, as_tuple, assert_close, draw, load

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STREAM_CASES = [(n, {"D": 4} if n == "softmax_attn" else {}) for n in SCAN_OPS] + [("gla", dict(K=5, V=70))]


@pytest.mark.parametrize("name, dims", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_prefill_then_steps_equal_one_parallel_call(name, dims):
    op = load(name, **dims)
    x = draw(op, (2, 9), gen=torch.Generator().manual_seed(4))
    whole = as_tuple(op(**x, backend="triton"))
    _, st = op(**{k: v[:, :4] for k, v in x.items()}, backend="triton", return_state=True)
    for t in range(4, 9):
        p = op._prepare({k: v[:, t] for k, v in x.items()}, per_token=True)
        y, st = triton_backend.step(op, st, p)
        for a, b in zip(as_tuple(y), whole):
            assert_close(a, b[:, t], rtol=1e-9, atol=1e-9, what=f"{name} step {t}")
    assert st.tokens == 9
    ref = op.reference(**x, return_state=True)[1]
    for k, v in ref.prefix.items():
        assert_close(st.prefix[k], v, rtol=1e-9, atol=1e-9, what=f"{name} state {k}")


def test_emit_targets_are_readable_python():
    op = load("linrec").ir
    text = emit(op, "triton")
    compile(text, "<linrec>", "exec")
    for needle in ("def linrec_combine", "# linrec.psm:10 combine", "def linrec_scan_kernel",
                   "def linrec_backward_kernel", "def linrec_scan(", "def linrec_backward(",
                   "def linrec_step("):
        assert needle in text, needle
    assert "def linrec_backward_kernel" in emit(op, "backward")
    assert "def linrec_step" in emit(op, "stream")
    assert "def s5_backward_kernel" in emit(load("s5").ir, "backward")
    assert "no derived backward kernel: it has no float inputs" in emit(load("cumcount").ir, "backward")
    with pytest.raises(ValueError):
        emit(op, "cuda")


def test_emitted_section_runs_standalone(tmp_path):
    """The section needs only torch and triton: write it as a module and call its launcher."""
    op = load("cumsum").ir
    src = "import torch\nimport triton\nimport triton.language as tl\n\n" + emit(op, "triton")
    path = tmp_path / "cumsum_standalone.py"
    path.write_text(src)
    from psmc import cache

    mod = cache.load(path, interpret=True)
    x = torch.randn(3, 11, dtype=torch.float64)
    (y,), final, _ = mod.cumsum_scan({"x": x}, want_final=True, acc_dtype=torch.float64)
    torch.testing.assert_close(y, x.cumsum(-1))
    torch.testing.assert_close(final["s"], x.sum(-1))
    assert psmc.__version__
