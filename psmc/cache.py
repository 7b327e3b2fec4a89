"""On-disk cache of generated modules.

Triton reads a kernel's source from its file, so generated modules must live in real files. Each
is stored once under a key that hashes everything its text depends on: the `.psm` source, the op's
name and dims, psmc's version and a fingerprint of the code generator itself (its Python files and
templates), so editing psmc never serves a stale module. Writes go to a temporary file in the same
folder and are moved into place with `os.replace`, which is atomic: a concurrent reader sees
either no file or the whole file, never half of one, and two writers of the same key write the
same bytes.

The folder is `$PSMC_CACHE_DIR`, else `$XDG_CACHE_HOME/psmc`, else `~/.cache/psmc`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

from . import __version__, ir
from .resources import templates_dir

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, bool], ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get("PSMC_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "psmc"


@lru_cache(maxsize=1)
def generator_fingerprint() -> str:
    """A hash of the code generator's own files: psmc/codegen/*.py and templates/*.j2."""
    h = hashlib.sha256()
    files = sorted((Path(__file__).parent / "codegen").glob("*.py")) + sorted(templates_dir().glob("*.j2"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def key(op: ir.Op, kind: str) -> str:
    """The cache key of one generated module of `op` (kind: what was generated, e.g. "triton")."""
    h = hashlib.sha256()
    for part in (op.source.text, op.name, repr(op.dims), __version__, generator_fingerprint(), kind):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def module_file(op: ir.Op, kind: str, generate: Callable[[], str]) -> Path:
    """The cached file of a generated module, generating and writing it on first use."""
    path = cache_dir() / f"{op.name}_{kind}_{key(op, kind)}.py"
    if not path.exists():
        write_atomic(path, generate())
    return path


def load(path: Path, interpret: bool = False) -> ModuleType:
    """Import a generated module; `interpret=True` builds its kernels for Triton's interpreter.

    Triton decides at decoration time whether `@triton.jit` makes a compiled or an interpreted
    kernel, so the interpreted twin (for CPU tensors) is a second import of the same file with
    TRITON_INTERPRET=1 set while it runs.
    """
    k = (str(path), interpret)
    with _LOCK:
        mod = _LOADED.get(k)
        if mod is not None:
            return mod
        import triton.language  # noqa: F401  (triton's own kernels decorated under the caller's settings)

        name = f"psmc_generated.{path.stem}{'_interpreted' if interpret else ''}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        with _interpreter(interpret):
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        _LOADED[k] = mod
        return mod


@contextlib.contextmanager
def _interpreter(on: bool) -> Iterator[None]:
    """TRITON_INTERPRET set to `on` while a module imports, then everything as it was: the
    environment variable, and any value set on triton.knobs (which would override it)."""
    import triton

    rt = triton.knobs.runtime
    had, old = "interpret" in vars(rt), vars(rt).get("interpret")
    env = os.environ.get("TRITON_INTERPRET")
    rt.__dict__.pop("interpret", None)
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env
        if had:
            rt.__dict__["interpret"] = old
