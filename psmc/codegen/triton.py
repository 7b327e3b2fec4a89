"""The Triton part of a generated module: kernels, their launchers and the helpers they share.

`generate_module_section(op)` is what `psmc compile` pastes into `DIR/<op>.py` (after importing
torch, triton and triton.language as tl); `generate_module(op)` wraps it into a module of its
own, which is what triton_backend caches and imports.
"""

from __future__ import annotations

import math
from functools import lru_cache

from .. import ir
from . import scalarize as S
from . import adjoint, triton_adjoint, triton_recurrent, triton_scan
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


def strategy(op: ir.Op, sop: S.ScalarOp | None = None, force: str | None = None) -> str:
    """`scan` when the state per lane is a few scalars, else `recurrent` (or `force`)."""
    if force:
        return force
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


@lru_cache(maxsize=256)
def backward_plan(sop: S.ScalarOp) -> tuple[adjoint.Adjoint | None, adjoint.Adjoint | None, str | None]:
    """(adjoint, adjoint with final-state gradients, why not) for strategy scan."""
    if not any(ir.is_float(f.dtype) for f in sop.inputs):
        return None, None, "it has no float inputs"
    adj = adjoint.derive(sop)
    why = triton_adjoint.supported(adj)
    if why:
        return None, None, why
    adjf = adjoint.derive(sop, final_grads=True)
    if triton_adjoint.supported(adjf):
        adjf = None
    return adj, adjf, None


def recurrent_backward_why_not(op: ir.Op, sop: S.ScalarOp | None = None) -> str | None:
    """Why strategy recurrent has no derived backward for this op (None when it has one)."""
    return _recurrent_why(sop or S.scalarize(op))


@lru_cache(maxsize=256)
def _recurrent_why(sop: S.ScalarOp) -> str | None:
    return triton_recurrent.backward_why_not(sop.op, sop)


def sections(op: ir.Op, force: str | None = None) -> dict[str, str]:
    """The generated text in parts: prelude (shared helpers), forward (kernel and launcher with
    its spec), backward (derived kernels and launcher; empty when not derived), stream (step)."""
    sop = S.scalarize(op)
    name, spec_name = op.name, f"{op.name.upper()}_SPEC"
    out = {"prelude": render("triton_prelude.j2"), "backward": ""}
    strat = strategy(op, sop, force)
    if strat == "scan":
        spec = dict(triton_scan.spec(sop), strategy="scan", vectors=triton_scan.vector_fields(sop))
        adj, adjf, why = backward_plan(sop)
        saved = triton_adjoint.saved_states(sop, adj) if adj is not None else None
        shares = triton_adjoint.lane_shares(adj, adjf)
        spec["backward"] = None if adj is None else dict(
            triton_adjoint.spec(sop, shares), final=adjf is not None,
            scalars=max(triton_adjoint.widest(a) for a in (adj, adjf) if a is not None),
            saved=None if saved is None else list(dict.fromkeys(f.name for f, _ in saved.values())))
        out["forward"] = _join(triton_scan.generate(op, sop),
                               render("triton_launch_scan.j2", name=name, path=sop.path,
                                      spec_name=spec_name, spec=literal(spec),
                                      has_backward=adj is not None))
        if adj is not None:
            same = adjf is not None and adjf.live == adj.live and adjf.pattern == adj.pattern
            kernels = [triton_adjoint.generate(op, sop, adj, shares=shares)]
            if saved is not None:
                kernels.append(triton_adjoint.generate(op, sop, adj, "_saved", saved, shares))
            if adjf is not None and not same:
                kernels.append(triton_adjoint.generate(op, sop, adjf, "_final", shares=shares))
            n_scans = len(triton_adjoint.scans(adj))
            summary = (f"a reverse scan over {len(adj.live)} live adjoint(s) "
                       f"({', '.join(s.name for s in adj.live)}), "
                       + ("diagonal" if adj.diagonal else f"{len(adj.pattern)} coefficients")
                       + (f", in {n_scans} independent scans" if n_scans > 1 else "")
                       + ("; lane-free adjoints as per-lane shares" if shares else "") + ".")
            kernel = f"{name}_backward_kernel"
            final = None if adjf is None else (kernel if same else f"{name}_backward_final_kernel")
            out["backward"] = _join(*kernels, render(
                "triton_launch_backward.j2", name=name, path=sop.path, spec_name=spec_name,
                summary=summary, kernel=kernel, final_kernel=final,
                saved_kernel=None if saved is None else f"{name}_backward_saved_kernel"))
    else:
        why = recurrent_backward_why_not(op, sop)
        spec = dict(triton_recurrent.spec(sop, backward=why is None), strategy="recurrent")
        out["forward"] = _join(triton_recurrent.generate(op, sop),
                               render("triton_launch_recurrent.j2", name=name, path=sop.path,
                                      spec_name=spec_name, spec=literal(spec), lane=sop.lane.name,
                                      has_backward=why is None))
        if why is None:
            out["backward"] = _join(triton_recurrent.generate_backward(op, sop), render(
                "triton_launch_recurrent_backward.j2", name=name, path=sop.path,
                spec_name=spec_name, lane=sop.lane.name))
    out["stream"] = render("triton_step.j2", name=name, path=sop.path, strategy=strat,
                           spec_name=spec_name)
    return out


def _join(*parts: str) -> str:
    return "\n\n\n".join(p.strip("\n") for p in parts if p.strip()) + "\n"


def generate_module_section(op: ir.Op, force: str | None = None) -> str:
    """Kernels and launchers for one op, as Python source text (`force`: a strategy).

    This is what `psmc compile` pastes into DIR/<op>.py after `import torch`, `import triton` and
    `import triton.language as tl`."""
    s = sections(op, force)
    return _join(s["prelude"], s["forward"], s["backward"], s["stream"])


def generate_module(op: ir.Op, version: str, force: str | None = None) -> str:
    sop = S.scalarize(op)
    summary = (f"Strategy {strategy(op, sop, force)}: {len(sop.state_slots)} state scalars per lane"
               + (f", lanes along {sop.lane.name} = {sop.lane.size}" if sop.lane else "") + ".")
    return render("triton_module.j2", name=op.name, version=version, path=sop.path,
                  summary=summary, section=generate_module_section(op, force))


_PTR = {"f16": "*fp16", "bf16": "*bf16", "f32": "*fp32", "f64": "*fp64", "i32": "*i32",
        "i64": "*i64", "bool": "*i1"}


# the prelude's _PSMC_NARROW_ADJOINT: adjoint scans this narrow run 16 elements a thread
NARROW_ADJOINT = 4


def kernel_signatures(op: ir.Op, input_dtype: str = "f32") -> list[tuple[str, dict, dict, int]]:
    """(kernel name, signature, constexprs, num_warps) of every kernel of the op, for
    `triton.compile`.

    Float inputs are typed `input_dtype` (f32, f16 or bf16: the kernels upcast in registers);
    outputs and state are f32, integers as declared. Every optional branch is switched on. Scan
    kernels get 4 warps; their backward kernels the warps the backward launcher would give them
    at that tile (`_PsmcBackwardPlan`: 8 elements a thread; 16 for a narrow adjoint scan of at
    most 4 scalars, on its own warp count; 1 for a wide one).
    """
    sop = S.scalarize(op)
    spec = triton_scan.spec(sop)
    types: dict[str, str] = {}
    for f in spec["inputs"]:
        types[f"in_{f['name']}_ptr"] = _PTR[input_dtype if f["dtype"] in ("f16", "bf16", "f32") else f["dtype"]]
    for f in spec["outputs"]:
        types[f"out_{f['name']}_ptr"] = types[f"gy_{f['name']}_ptr"] = types[f"sy_{f['name']}_ptr"] = _PTR[f["dtype"]]
    for f in spec["inputs"]:
        types[f"gx_{f['name']}_ptr"] = _PTR["f32"]
    for f in spec["state"]:
        for role in ("init", "final", "ckpt", "gfinal", "ginit", "tot"):
            types[f"{role}_{f['name']}_ptr"] = _PTR[f["dtype"]]
    if strategy(op, sop) == "recurrent":
        block_l = min(32, 1 << max(0, (sop.lane.size - 1).bit_length()))
        out = [(f"{op.name}_recurrent_kernel", types,
                {"HAS_INIT": True, "STORE_FINAL": True, "STORE_CKPT": True, "ACC": "fp32",
                 "BLOCK_L": block_l, "STAGES": 2, "CKPT_T": 64}, 4)]
        if recurrent_backward_why_not(op, sop) is None:
            for f in spec["state"]:
                types[f"work_{f['name']}_ptr"] = _PTR[f["dtype"]]
            out.append((f"{op.name}_recurrent_backward_kernel", types,
                        {"HAS_GFINAL": True, "HAS_GINIT": True, "ACC": "fp32", "BLOCK_L": block_l,
                         "CKPT_T": 64}, 4))
        return out
    tile = 1 << (16384 // max(1, spec["scalars"])).bit_length() - 1
    block_t = max(128, min(4096, tile))
    # the vector fields take their vector path (dense inputs, as from torch.randn)
    vec = {f"{p}_VEC": 2 for p in triton_scan.vector_fields(sop)}
    out = [(f"{op.name}_scan_kernel", types, {"HAS_INIT": True, "STORE_FINAL": True, "STORE_CKPT": True,
                                              "FROM_TOTALS": True, "ACC": "fp32", "BLOCK_L": 1,
                                              "BLOCK_T": block_t, "BLOCK_C": 64, "GATHER_LAST": True, "STAGES": 2,
                                              **vec}, 4),
           (f"{op.name}_chunk_totals_kernel", types,
            {"ACC": "fp32", "BLOCK_L": 1, "BLOCK_T": block_t, "GATHER_LAST": True, "STAGES": 2,
             **{k: v for k, v in vec.items() if k.startswith("in_")}}, 4)]
    adj, adjf, _ = backward_plan(sop)
    if adj is not None:
        bw = {"HAS_GFINAL": True, "HAS_GINIT": True, "ACC": "fp32", "BLOCK_L": 1, "BLOCK_T": block_t}
        widest = max(triton_adjoint.widest(a) for a in (adj, adjf) if a is not None)
        narrow = widest <= NARROW_ADJOINT
        per_thread = 16 if narrow else 8 if widest <= 32 else 1
        warps = min(16, max(1 if narrow else 4, block_t // (32 * per_thread)))
        out.append((f"{op.name}_backward_kernel", types, bw, warps))
        if triton_adjoint.saved_states(sop, adj) is not None:
            out.append((f"{op.name}_backward_saved_kernel", types, bw, warps))
        same = adjf is not None and adjf.live == adj.live and adjf.pattern == adj.pattern
        if adjf is not None and not same:
            out.append((f"{op.name}_backward_final_kernel", types, bw, warps))
    return out


def compile_ahead(op: ir.Op, module, arch: int = 90, input_dtype: str = "f32",
                  only: str | None = None) -> list:
    """Compile every kernel of a generated module (or the one named `only`) for `sm_{arch}` without
    a GPU (triton.compile)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = []
    for name, types, constexprs, warps in kernel_signatures(op, input_dtype):
        if only is not None and name != only:
            continue
        fn = getattr(module, name)
        consts = {k: (getattr(tl, {"fp32": "float32", "fp64": "float64"}[v]) if k == "ACC" else v)
                  for k, v in constexprs.items()}
        signature = {a: ("constexpr" if a in consts else types.get(a, "i32")) for a in fn.arg_names}
        src = ASTSource(fn, signature, constexprs=consts)
        out.append(triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}))
    return out
