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
    """The forward kernels and every derived backward kernel; registers and spills are printed
    (pytest -s)."""
    op = load(name)
    module = triton_backend.module(op.ir, interpret=False)
    compiled = triton_codegen.compile_ahead(op.ir, module, arch=90)
    names = {k.name for k in compiled}
    assert f"{name}_scan_kernel" in names
    assert (f"{name}_backward_kernel" in names) == (name != "cumcount")  # cumcount: no float inputs
    for k in compiled:
        assert "cubin" in k.asm and len(k.asm["cubin"]) > 0
        assert ".target sm_90" in k.asm["ptx"]
        print(f"{k.name}: {_resources(k)}")


@pytest.mark.parametrize("name, dims", [("gla", {}), ("gla", dict(K=128, V=128)), ("mlstm", {})])
def test_recurrent_kernels_compile_for_sm90(name, dims):
    """The forward and the derived backward; registers and spills are printed (pytest -s)."""
    op = load(name, **dims)
    module = triton_backend.module(op.ir, interpret=False)
    forward, backward = triton_codegen.compile_ahead(op.ir, module, arch=90, input_dtype="bf16")
    for k in (forward, backward):
        assert ".target sm_90" in k.asm["ptx"]
        print(f"{k.name}{dims}: {_resources(k)}")
    assert backward.name == f"{name}_recurrent_backward_kernel"


def _resources(kernel) -> str:
    """Registers and spills from the cubin (n_regs needs a GPU): the bundled cuobjdump."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    return " ".join(out.split("Resource usage:")[-1].split()) if "Resource usage:" in out else out


def test_low_precision_input_variant_compiles():
    op = load("linrec")
    module = triton_backend.module(op.ir, interpret=False)
    k = triton_codegen.compile_ahead(op.ir, module, arch=90, input_dtype="bf16")[0]
    assert "bf16" in k.asm["ttir"] or "bf16" in k.asm["ptx"]


def test_two_pass_kernels_are_among_those_compiled():
    """The chunk-totals kernel and the scan kernel's fix-up branch (FROM_TOTALS) are compiled too."""
    sigs = {name: consts for name, _, consts, _ in triton_codegen.kernel_signatures(load("cumcount").ir)}
    assert "cumcount_chunk_totals_kernel" in sigs
    assert sigs["cumcount_scan_kernel"]["FROM_TOTALS"] is True
