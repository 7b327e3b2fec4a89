"""An installed wheel carries the grammar and templates and works from another folder."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_grammar_templates_and_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("psmc-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "psmc/_grammar/psm.lark" in names
    assert "psmc/_templates/module.py.j2" in names
    for source in (ROOT / "psmc").rglob("*.py"):
        assert str(source.relative_to(ROOT)) in names, f"{source} is missing from the wheel"
    for template in (ROOT / "templates").glob("*.j2"):
        assert f"psmc/_templates/{template.name}" in names
