"""Golden files: the generated Triton text of every associative example, checked in.

A change to the generator shows up here as a readable diff of the code users get. After an
intended change, regenerate with `PSMC_UPDATE_GOLDEN=1 pytest tests/test_triton_golden.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from psmc.codegen import triton as triton_codegen

from triton_cases import SCAN_OPS, load

GOLDEN = Path(__file__).resolve().parent / "golden_triton"
CASES = SCAN_OPS + ["gla", "mlstm"]


@pytest.mark.parametrize("name", CASES)
def test_generated_triton_matches_golden_file(name):
    parts = triton_codegen.sections(load(name).ir)  # the shared prelude has its own file
    text = "".join(parts[k] for k in ("forward", "backward", "stream"))
    if name == CASES[0]:
        _check(GOLDEN / "prelude.py.txt", parts["prelude"])
    _check(GOLDEN / f"{name}.py.txt", text)


def _check(path: Path, text: str) -> None:
    if os.environ.get("PSMC_UPDATE_GOLDEN") == "1" or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"generated code in {path.name} changed; see the module docstring"
