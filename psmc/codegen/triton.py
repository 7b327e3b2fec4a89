"""The Triton part of a generated module: kernels, their launchers and the helpers they share.

`generate_module_section(op)` is what `psmc compile` pastes into `DIR/<op>.py` (after importing
torch, triton and triton.language as tl); `generate_module(op)` wraps it into a module of its
own, which is what triton_backend caches and imports.
"""

from __future__ import annotations

import math

from .. import ir
from . import scalarize as S
from . import triton_scan
from .templates import render


def literal(v, indent: int = 0) -> str:
    """A Python literal for specs: one line where it fits, inf as float("inf")."""
    if isinstance(v, float) and math.isinf(v):
        return 'float("inf")' if v > 0 else 'float("-inf")'
    if not isinstance(v, (dict, list, tuple)):
        return repr(v)
    if isinstance(v, dict):
        flat = "{" + ", ".join(f"{k!r}: {literal(x)}" for k, x in v.items()) + "}"
        items = [f"{k!r}: {literal(x, indent + 4)}" for k, x in v.items()]
        open_, close = "{", "}"
    else:
        flat = "[" + ", ".join(literal(x) for x in v) + "]"
        items = [literal(x, indent + 4) for x in v]
        open_, close = "[", "]"
    if indent + len(flat) <= 92:
        return flat
    pad = " " * (indent + 4)
    return open_ + "\n" + "".join(f"{pad}{i},\n" for i in items) + " " * indent + close


def strategy(op: ir.Op, sop: S.ScalarOp | None = None) -> str:
    """`scan` when the state per lane is a few scalars, else `recurrent`."""
    sop = sop or S.scalarize(op)
    return "scan" if len(sop.state_slots) <= triton_scan.MAX_SCAN_SCALARS else "recurrent"


def unsupported(op: ir.Op) -> str | None:
    """Why the Triton path cannot run this op (None when it can)."""
    if op.externs:
        return "it calls externs (torch modules)"
    if op.chunk is not None:
        return "it is chunked (`chunk C`)"
    if op.exclusive:
        return "its output reads the exclusive prefix"
    return None


def generate_module_section(op: ir.Op) -> str:
    """Kernels and launchers for one op, as Python source text."""
    sop = S.scalarize(op)
    parts = [render("triton_prelude.j2")]
    if strategy(op, sop) == "scan":
        parts.append(triton_scan.generate(op, sop))
        parts.append(render("triton_launch_scan.j2", name=op.name, path=sop.path,
                            spec_name=f"{op.name.upper()}_SPEC",
                            spec=literal(triton_scan.spec(sop))))
    else:
        raise NotImplementedError(f"{op.name}: strategy recurrent is not generated yet")
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def generate_module(op: ir.Op, version: str) -> str:
    sop = S.scalarize(op)
    summary = (f"Strategy {strategy(op, sop)}: {len(sop.state_slots)} state scalars per lane"
               + (f", lanes along {sop.lane.name} = {sop.lane.size}" if sop.lane else "") + ".")
    return render("triton_module.j2", name=op.name, version=version, path=sop.path,
                  summary=summary, section=generate_module_section(op))
