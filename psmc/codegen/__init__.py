"""Code generators, one module per strategy (see DESIGN.md section 4).

    scalarize        fields → scalars (sympy), lane dims
    triton_expr      sympy scalars → Triton expressions
    triton_tile      IR → Triton expressions on whole tiles
    triton_scan      strategy scan (tl.associative_scan over blocks, carry across blocks)
    triton_recurrent strategy recurrent (state tiles on chip, sequential over T) and its backward
    tile_adjoint     vector-Jacobian products of IR functions on tiles (recurrent's backward)
    adjoint          the derived backward: Jacobians, live adjoints, coefficient pattern
    triton_adjoint   the backward as a reverse-scan kernel
    triton           a module's Triton section: prelude, forward, backward, stream
"""

from __future__ import annotations

TARGETS = ("triton", "backward", "stream")


def emit(op, target: str) -> str:
    """Generated text for `psmc emit --target triton|backward|stream` (Triton targets).

    triton: the whole Triton section (helpers, forward, backward, step); backward: the derived
    backward kernels and launcher; stream: the step launcher (it runs the forward kernel on one
    token, so the forward kernel is part of what it needs).
    """
    from . import triton

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; Triton targets are {', '.join(TARGETS)}")
    if target == "triton":
        return triton.generate_module_section(op)
    s = triton.sections(op)
    if target == "backward":
        if not s["backward"]:
            from . import scalarize

            sop = scalarize.scalarize(op)
            if triton.strategy(op, sop) == "recurrent":
                why = triton.recurrent_backward_why_not(op, sop)
            else:
                _, _, why = triton.backward_plan(sop)
            return f"# {op.name}: no derived backward kernel: {why}; autograd runs through torch.\n"
        return s["backward"]
    return s["stream"]
