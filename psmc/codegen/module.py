"""The generated module of one op: runtime + generated torch functions (+ Triton kernels).

`psmc compile` writes `module_source(op)` to `DIR/<op>.py`; `torch_functions(op)` execs the same
generated torch code in-process for the op's vectorized torch path.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Callable

import jinja2
import torch

from .. import ir, standalone
from ..resources import templates_dir
from . import torch_ref


def _runtime_source() -> str:
    """psmc/standalone.py without its module docstring."""
    text = inspect.getsource(standalone)
    if text.startswith('"""'):
        text = text[text.index('"""', 3) + 3:].lstrip("\n")
    return text.rstrip() + "\n"


def _spec_source(op: ir.Op, associative: bool) -> str:
    def fields(fs):
        inner = ", ".join(f"FieldSpec({f.name!r}, {f.type.dtype!r}, {f.type.shape!r})" for f in fs)
        return f"({inner},)"

    return (f"Spec(\n    name={op.name!r},\n    inputs={fields(op.inputs)},\n    state={fields(op.state)},\n"
            f"    outputs={fields(op.outputs)},\n    chunk={op.chunk!r},\n    exclusive={op.exclusive!r},\n"
            f"    associative={associative!r},\n)")


def class_name(op: ir.Op) -> str:
    return "".join(part[:1].upper() + part[1:] for part in op.name.split("_") if part) or "Op"


def triton_section(op: ir.Op, associative: bool) -> tuple[str, dict]:
    """Kernels + launchers for the module, and what the dispatch needs to know; "" when the
    Triton generators do not cover the op (ops with externs, chunks or non-float fields that are
    not associative run the torch level path)."""
    if not associative:
        from . import tree

        if tree.supported(op):
            return "", {}
        return tree.generate_module_section(op), {"strategy": "tree", "has_backward": True}
    from . import scalarize, triton

    if triton.unsupported(op):
        return "", {}
    sop = scalarize.scalarize(op)
    strategy = triton.strategy(op, sop)
    if strategy == "recurrent" and sop.lane is None:
        return "", {}
    if strategy == "scan":
        has_backward = triton.backward_plan(sop)[2] is None
    else:
        has_backward = triton.recurrent_backward_why_not(op, sop) is None
    return triton.generate_module_section(op), {
        "strategy": strategy, "has_backward": has_backward, "spec_name": f"{op.name.upper()}_SPEC"}


def module_source(op: ir.Op, associative: bool, with_triton: bool = True) -> str:
    """The whole generated module, as text."""
    from .. import __version__

    kernels, kinfo = triton_section(op, associative) if with_triton else ("", {})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    first = op.inputs[0]
    example = ", ".join(f"{f.name}={f.name}" for f in op.inputs)
    semantics = ("associative: any bracketing, one state when streaming" if associative else
                 "non-associative: the canonical tree of DESIGN.md section 1, binary-counter streaming")
    return env.get_template("module.py.j2").render(
        name=op.name, version=__version__, source=Path(op.source.path).name,
        summary=f"Generated from the `op {op.name}` declaration at {torch_ref.where(op.loc)}.",
        dims=", ".join(f"{k}={v}" for k, v in op.dims), semantics=semantics,
        inputs=", ".join(f"{f.name}: {f.type}" for f in op.inputs),
        outputs=", ".join(f"{f.name}: {f.type}" for f in op.outputs),
        class_name=class_name(op), call_example=example or first.name,
        runtime=_runtime_source().rstrip(), spec=_spec_source(op, associative),
        torch_functions=torch_ref.generate(op).rstrip(), triton_section=kernels.rstrip(),
        externs=repr(tuple(e.name for e in op.externs)),
        strategy=kinfo.get("strategy", ""), has_backward=kinfo.get("has_backward", False),
        spec_name=kinfo.get("spec_name", ""),
    )


def torch_functions(op: ir.Op) -> dict[str, Callable]:
    """exec the generated torch code; returns {"lift", "combine", "output", "identity"}."""
    namespace = {"torch": torch, "math": math}
    namespace.update({k: getattr(standalone, k) for k in ("_align", "_as", "_floatify", "_matmul",
                                                        "_store", "_extern")})
    code = compile(torch_ref.generate(op), f"<psmc generated torch code for {op.name}>", "exec")
    exec(code, namespace)  # the text is psmc's own output: names are checked identifiers
    return {k: namespace[k] for k in ("lift", "combine", "output", "identity")}
