"""`compile_file` / `compile_source`: text → checked IR → one torch module per op."""

from __future__ import annotations

from pathlib import Path

from . import ir
from .errors import Loc, PsmError
from .parser import decode, parse
from .runtime import PsmOp
from .typecheck import check


def load_ops(text: str | bytes, path: str = "<string>", **dims: int) -> list[ir.Op]:
    """Parse and type-check; the IR of every op in the text, with `dims` bound."""
    source = decode(text if isinstance(text, bytes) else text.encode("utf-8"), path)
    try:
        return check(parse(source), dims)
    except RecursionError:
        raise PsmError("the program nests too deeply for psmc to read", Loc(source, 1, 1),
                       "split long expressions into several `let`s") from None


def compile_source(text: str, path: str = "<string>", **dims: int) -> dict[str, PsmOp]:
    """Compile `.psm` text into `{op name: torch module}`; keyword arguments set static dims."""
    return {op.name: PsmOp(op) for op in load_ops(text, path, **dims)}


def compile_file(path: str | Path, **dims: int) -> dict[str, PsmOp]:
    """Compile a `.psm` file; `psmc.compile_file("linrec.psm", K=128)`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise PsmError(f"cannot read {p}: {e.strerror or e}") from None
    return {op.name: PsmOp(op) for op in load_ops(data, str(path), **dims)}
