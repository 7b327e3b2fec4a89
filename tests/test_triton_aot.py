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


def _scan_kernels() -> list[tuple[str, str]]:
    """(op, kernel) for every kernel of every scan example: one test each, so that pytest-xdist
    spreads the slow compiles (s5's backward kernels take tens of seconds) over the workers."""
    return [(name, sig[0]) for name in SCAN_OPS for sig in triton_codegen.kernel_signatures(load(name).ir)]


def test_every_scan_example_has_its_forward_and_backward_kernels():
    kernels = _scan_kernels()
    for name in SCAN_OPS:
        names = {k for op, k in kernels if op == name}
        assert {f"{name}_scan_kernel", f"{name}_chunk_totals_kernel"} <= names
        assert (f"{name}_backward_kernel" in names) == (name != "cumcount")  # cumcount: no float inputs


@pytest.mark.parametrize("name, kernel", _scan_kernels())
def test_scan_kernel_compiles_for_sm90(name, kernel):
    """One forward or derived backward kernel; registers and spills are printed (pytest -s)."""
    op = load(name)
    module = triton_backend.module(op.ir, interpret=False)
    (k,) = triton_codegen.compile_ahead(op.ir, module, arch=90, only=kernel)
    assert k.name == kernel
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
