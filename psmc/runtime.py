"""The torch module around a checked op: input validation, chunking, paths, streaming state.

Every path (reference, vectorized torch, Triton) shares this front end, so inputs are validated and
chunked the same way, and `return_state` / `initial_state` mean the same thing everywhere.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import ir, standalone
from .codegen import module
from .custom_op import custom_op_for
from .semantics import Evaluator
from .standalone import Prepared, PsmCallError, StreamState

_Prepared = Prepared  # the name kernel backends import



class PsmOp(torch.nn.Module):
    """A compiled prefix-scannable op (DESIGN.md section 5)."""

    def __init__(self, op: ir.Op, associative: bool | None = None):
        super().__init__()
        self.ir = op
        self.name = op.name
        self._associative = associative
        self._verdict = None
        self._generated: dict[str, Callable] | None = None
        self._custom_op = custom_op_for(self) if not op.externs else None
        self._fast: dict[tuple, Callable] = {}  # call signature -> bound kernels (standalone.call_key)
        self._externs: dict[str, Callable] = {}
        self.externs = torch.nn.ModuleDict()

    # ---- configuration ----
    @property
    def associative(self) -> bool:
        """Which semantics the op has: the `expect` line, else the checker's verdict.

        With `expect` the (slow) checker is not run here. Without it, only a verdict of
        associative (proved, or no counterexample in the tests) selects the associative paths;
        refuted or unknown keeps the canonical tree, which is always right, only slower.
        """
        if self._associative is not None:
            return self._associative
        if self.ir.expect is not None:
            return self.ir.expect == "associative"
        return self.verdict.associative is True

    @property
    def verdict(self):
        """The checker's result (see psmc.algebra), computed on first use."""
        if self._verdict is None:
            from . import algebra  # the checker is optional until first asked for

            self._verdict = algebra.check_op(self)
        return self._verdict

    def bind(self, **externs: Callable) -> "PsmOp":
        """Bind `extern` declarations to torch callables (modules become submodules)."""
        declared = {e.name for e in self.ir.externs}
        for name, fn in externs.items():
            if name not in declared:
                raise PsmCallError(f"op '{self.name}' declares no extern '{name}' "
                                   f"(declared: {', '.join(sorted(declared)) or 'none'})")
            if not callable(fn):
                raise PsmCallError(f"extern '{name}' must be callable, got {type(fn).__name__}")
            self._externs[name] = fn
            if isinstance(fn, torch.nn.Module):
                self.externs[name] = fn
        self._fast.clear()
        return self

    def _check_bound(self) -> None:
        missing = [e.name for e in self.ir.externs if e.name not in self._externs]
        if missing:
            raise PsmCallError(f"op '{self.name}' needs its externs bound before use: "
                               f"op.bind({', '.join(m + '=...' for m in missing)})")

    # ---- the standalone runtime, driven by the interpreter ----
    @property
    def spec(self) -> standalone.Spec:
        """Names, dtypes and shapes: what the torch-only runtime needs to know about the op."""
        associative = self.associative
        cached = self.__dict__.get("_spec")
        if cached is None or cached.associative != associative:  # built once per call otherwise
            op = self.ir
            fs = lambda fields: tuple(standalone.FieldSpec(f.name, f.type.dtype, f.type.shape) for f in fields)
            cached = standalone.Spec(op.name, fs(op.inputs), fs(op.state), fs(op.outputs), op.chunk,
                                     op.exclusive, associative)
            self.__dict__["_spec"] = cached
        return cached

    def functions(self, float_dtype: torch.dtype, device: torch.device,
                  interpreted: bool = False) -> standalone.Functions:
        """lift/combine/output/identity: generated torch code, or the IR interpreter (the oracle)."""
        op = self.ir
        if not interpreted:
            if self._generated is None:
                self._generated = module.torch_functions(op)
            g, ex = self._generated, self._externs
            return standalone.Functions(
                lift=lambda x, batch: g["lift"](x, batch, float_dtype, device, ex),
                combine=lambda l, r, batch: g["combine"](l, r, batch, float_dtype, device, ex),
                output=lambda s, x, batch: g["output"](s, x, batch, float_dtype, device, ex),
                identity=lambda batch, fdt, dev: g["identity"](batch, fdt, dev),
            )
        ev = Evaluator(self.ir, float_dtype, device, self._externs)
        return standalone.Functions(
            lift=lambda x, batch: ev.run(op.lift, {"x": x}, batch),
            combine=lambda l, r, batch: ev.run(op.combine, {"l": l, "r": r}, batch),
            output=lambda s, x, batch: ev.run(op.output, {"s": s, "x": x}, batch),
            identity=lambda batch, fdt, dev: Evaluator(op, fdt, dev).identity(batch),
        )

    def _prepare(self, inputs: dict[str, torch.Tensor], per_token: bool = False) -> Prepared:
        return standalone.prepare(self.spec, inputs, per_token)

    # ---- public API ----
    def forward(self, *, return_state: bool = False, initial_state: StreamState | None = None,
                backend: str | None = None, **inputs: torch.Tensor):
        if (torch.compiler.is_compiling() and not return_state and initial_state is None
                and not self.ir.externs):
            xs = [inputs[f.name] if f.name in inputs else _missing(self, f.name) for f in self.ir.inputs]
            ys = self._custom_op(xs, backend or "auto")  # an opaque op torch.compile can trace
            return ys[0] if len(ys) == 1 else tuple(ys)
        if return_state or initial_state is not None:
            return self._forward(return_state, initial_state, backend, inputs)
        return self._call(backend, inputs)

    def _call(self, backend: str | None, inputs: dict[str, torch.Tensor]):
        """A plain call (no stream state). One with the signature of an earlier call that ran on
        the kernels goes straight to that call's bound kernels: nothing it depends on has changed,
        so nothing is checked or derived again (a training loop validates once)."""
        key = standalone.call_key(backend, inputs)
        fast = self._fast.get(key)
        if fast is not None:
            return fast(inputs)
        return self._forward(False, None, backend, inputs, key)

    def _forward(self, return_state: bool, initial_state: StreamState | None, backend: str | None,
                 inputs: dict[str, torch.Tensor], key: tuple | None = None):
        """The full path: validate, choose a path, run. `key`: the call's signature, under which
        the Triton path keeps its bound call."""
        backend = standalone.check_backend(backend)
        self._check_bound()
        p = self._prepare(inputs)
        if backend == "triton" or (backend == "auto" and p.device.type == "cuda"):
            # kernels imported lazily: CPU users never need triton
            strict = backend == "triton"
            if self.associative:
                from . import triton_backend  # strategies scan / recurrent

                result = triton_backend.run(self, p, initial_state, return_state, strict, key)
            else:
                from . import tree_backend  # strategy tree (externs: the level path)

                result = tree_backend.run(self, p, initial_state, return_state, strict)
            if result is not None:
                return result
        if backend == "reference":  # the oracle: interpreter + sequential scan
            fns = self.functions(p.float_dtype, p.device, interpreted=True)
            return standalone.run(self.spec, fns, p, initial_state, return_state, "reference")
        fns = self.functions(p.float_dtype, p.device)
        return standalone.run(self.spec, fns, p, initial_state, return_state, "torch")

    def reference(self, *, return_state: bool = False, initial_state: StreamState | None = None,
                  **inputs: torch.Tensor):
        """The oracle: plain torch, sequential over T, exactly DESIGN.md section 1."""
        return self._forward(return_state, initial_state, "reference", inputs)

    def init_state(self, batch_shape=(), device=None, dtype: torch.dtype | None = None) -> StreamState:
        """The empty stream: the identity (or an empty counter) for every batch element."""
        float_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return standalone.init_state(self.spec, self.functions(float_dtype, device or "cpu"),
                                     batch_shape, device, dtype)

    def step(self, state: StreamState, **inputs: torch.Tensor):
        """One token: inputs shaped `(*batch, *field_shape)`. Returns (outputs, new state)."""
        self._check_bound()
        p = self._prepare(inputs, per_token=True)
        if p.device.type == "cuda" and self.associative and isinstance(state, StreamState):
            from . import triton_backend  # the forward kernel at T = 1: one small fused launch

            standalone.check_state(self.spec, state, p.batch_shape)
            result = triton_backend.step(self, state, p, strict=False)
            if result is not None:
                return result
        return standalone.step(self.spec, self.functions(p.float_dtype, p.device), state, inputs)

    def module_source(self) -> str:
        """The self-contained module `psmc compile` writes for this op."""
        return module.module_source(self.ir, self.associative)

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.ir.dims)
        kind = "associative" if self.associative else "canonical tree"
        return f"{self.name}[{dims}]: {kind}" if dims else f"{self.name}: {kind}"


def _missing(op: PsmOp, name: str):
    raise PsmCallError(f"{op.name}: missing input '{name}'")
