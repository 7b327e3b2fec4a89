"""Where the grammar and templates live, in a source checkout and in an installed wheel alike.

`grammar/` and `templates/` sit at the top of the repository. pyproject.toml maps them into the
package as `psmc._grammar` and `psmc._templates`, so an installed wheel carries them; an editable
install or a plain checkout finds them beside the package.
"""

from __future__ import annotations

import importlib.resources
from functools import lru_cache
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _find(folder: str, package: str) -> Path:
    beside = _REPO_ROOT / folder
    if beside.is_dir():
        return beside
    try:
        installed = Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        installed = None
    if installed is not None and installed.is_dir():
        return installed
    raise FileNotFoundError(f"psmc cannot find its {folder}/ folder; reinstall psmc")


@lru_cache(maxsize=None)
def grammar_dir() -> Path:
    return _find("grammar", "psmc._grammar")


@lru_cache(maxsize=None)
def templates_dir() -> Path:
    return _find("templates", "psmc._templates")
