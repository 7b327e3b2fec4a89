"""Where the grammar and templates live, in a source checkout and in an installed wheel alike.

`grammar/` and `templates/` sit at the top of the repository. pyproject.toml maps them into the
package as `psmc/_grammar` and `psmc/_templates`, so an installed wheel carries them; an editable
install or a plain checkout finds them beside the package (marked by a `.psmc-data` file, so an
unrelated `grammar/` folder next to site-packages is never mistaken for ours).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _find(folder: str) -> Path:
    beside = _REPO_ROOT / folder  # a source checkout or an editable install
    if (beside / ".psmc-data").is_file():
        return beside
    installed = Path(__file__).resolve().parent / f"_{folder}"  # a wheel
    if installed.is_dir():
        return installed
    raise FileNotFoundError(f"psmc cannot find its {folder}/ folder; reinstall psmc")


@lru_cache(maxsize=None)
def grammar_dir() -> Path:
    return _find("grammar")


@lru_cache(maxsize=None)
def templates_dir() -> Path:
    return _find("templates")
