"""Every generated kernel compiles for sm_90 ahead of time (triton.compile with a GPUTarget).

No GPU is needed: Triton lowers to PTX and runs its bundled ptxas. This is what catches code the
interpreter accepts but the compiler does not (types, layouts, constexpr misuse).
"""

from __future__ import annotations

import pytest

from psmc import triton_backend
from psmc.codegen import triton as triton_codegen

from triton_cases import SCAN_OPS, load

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("name", SCAN_OPS)
def test_scan_kernels_compile_for_sm90(name):
    op = load(name)
    module = triton_backend.module(op.ir, interpret=False)
    compiled = triton_codegen.compile_ahead(op.ir, module, arch=90)
    assert compiled
    for k in compiled:
        assert "cubin" in k.asm and len(k.asm["cubin"]) > 0
        assert ".target sm_90" in k.asm["ptx"]


@pytest.mark.parametrize("name, dims", [("gla", {}), ("gla", dict(K=128, V=128)), ("mlstm", {})])
def test_recurrent_kernels_compile_for_sm90(name, dims):
    op = load(name, **dims)
    module = triton_backend.module(op.ir, interpret=False)
    (k,) = triton_codegen.compile_ahead(op.ir, module, arch=90, input_dtype="bf16")
    assert ".target sm_90" in k.asm["ptx"]


def test_low_precision_input_variant_compiles():
    op = load("linrec")
    module = triton_backend.module(op.ir, interpret=False)
    k = triton_codegen.compile_ahead(op.ir, module, arch=90, input_dtype="bf16")[0]
    assert "bf16" in k.asm["ttir"] or "bf16" in k.asm["ptx"]


def test_two_pass_kernels_are_among_those_compiled():
    """The chunk-totals kernel and the scan kernel's fix-up branch (FROM_TOTALS) are compiled too."""
    sigs = {name: consts for name, _, consts in triton_codegen.kernel_signatures(load("cumcount").ir)}
    assert "cumcount_chunk_totals_kernel" in sigs
    assert sigs["cumcount_scan_kernel"]["FROM_TOTALS"] is True
