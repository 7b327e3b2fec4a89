"""psmc: a compiler for prefix-scannable models (see README.md and DESIGN.md)."""

from __future__ import annotations

from .api import compile_file, compile_source, load_ops
from .errors import PsmCallError, PsmError
from .runtime import PsmOp, StreamState

__version__ = "0.1.0"

__all__ = ["compile_file", "compile_source", "load_ops", "PsmError", "PsmCallError", "PsmOp",
           "StreamState", "__version__"]
