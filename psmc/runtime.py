"""The torch module around a checked op: input validation, chunking, paths, streaming state.

Every path (reference, vectorized torch, Triton) shares this front end, so inputs are validated and
chunked the same way, and `return_state` / `initial_state` mean the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import ir, scan_torch
from .errors import PsmCallError
from .semantics import Counter, Evaluator, State, compute_dtype, counter_scan, left_fold, stack_states, index_state

BACKENDS = ("auto", "triton", "torch", "reference")


@dataclass
class StreamState:
    """What streaming keeps between calls.

    Associative ops keep one state, `prefix` (everything so far folded). Non-associative ops keep
    the binary counter of the canonical tree. Chunked ops also keep the tokens of the unfinished
    chunk in `pending` (shaped `(*batch, k, *field)` with k < C).
    """

    batch_shape: tuple[int, ...]
    tokens: int = 0
    prefix: State | None = None
    counter: Counter | None = None
    pending: dict[str, torch.Tensor] = field(default_factory=dict)

    def states_held(self) -> int:
        return self.counter.states_held() if self.counter is not None else 1


@dataclass
class _Prepared:
    inputs: dict[str, torch.Tensor]  # (*batch, T, *shape), in compute dtypes
    raw: dict[str, torch.Tensor]  # the caller's tensors, validated but not cast or broadcast
    batch_shape: tuple[int, ...]
    T: int
    float_dtype: torch.dtype  # f32, or f64 when a float input is f64
    out_dtype: torch.dtype | None  # dtype of float outputs (the inputs' float dtype)
    device: torch.device


class PsmOp(torch.nn.Module):
    """A compiled prefix-scannable op (DESIGN.md section 5)."""

    def __init__(self, op: ir.Op, associative: bool | None = None):
        super().__init__()
        self.ir = op
        self.name = op.name
        self._associative = associative
        self._verdict = None
        self._externs: dict[str, Callable] = {}
        self.externs = torch.nn.ModuleDict()

    # ---- configuration ----
    @property
    def associative(self) -> bool:
        """Which semantics the op has: the checker's verdict, else the `expect` line.

        Without either the op is treated as non-associative: the canonical tree is always right,
        only slower.
        """
        if self._associative is not None:
            return self._associative
        return self.ir.expect == "associative"

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
        return self

    def _check_bound(self) -> None:
        missing = [e.name for e in self.ir.externs if e.name not in self._externs]
        if missing:
            raise PsmCallError(f"op '{self.name}' needs its externs bound before use: "
                               f"op.bind({', '.join(m + '=...' for m in missing)})")

    # ---- input validation ----
    def _prepare(self, inputs: dict[str, torch.Tensor], per_token: bool = False) -> _Prepared:
        """Check names, shapes and dtypes; errors name the field. per_token: no time axis."""
        op = self.ir
        declared = {f.name: f for f in op.inputs}
        unknown = [k for k in inputs if k not in declared]
        if unknown:
            raise PsmCallError(f"{self.name}: unexpected input '{unknown[0]}'; inputs are "
                               f"{', '.join(declared)}")
        missing = [k for k in declared if k not in inputs]
        if missing:
            f = declared[missing[0]]
            raise PsmCallError(f"{self.name}: missing input '{f.name}' ({_expected(f, per_token)})")
        float_dtypes, batches, Ts, devices = [], [], [], set()
        for name, f in declared.items():
            t = inputs[name]
            if not isinstance(t, torch.Tensor):
                raise PsmCallError(f"{self.name}: input '{name}' must be a torch.Tensor, got "
                                   f"{type(t).__name__}")
            fr = f.type.rank
            lead = 0 if per_token else 1
            if t.dim() < fr + lead or tuple(t.shape[t.dim() - fr:]) != f.type.shape:
                raise PsmCallError(f"{self.name}: input '{name}' has shape {tuple(t.shape)}; "
                                   f"expected {_expected(f, per_token)}")
            kind = f.type.dtype
            if ir.is_float(kind) and not t.is_floating_point():
                raise PsmCallError(f"{self.name}: input '{name}' must be a floating-point tensor "
                                   f"(declared {kind}), got {t.dtype}")
            if ir.is_int(kind) and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
                raise PsmCallError(f"{self.name}: input '{name}' must be an integer tensor "
                                   f"(declared {kind}), got {t.dtype}")
            if kind == "bool" and t.dtype != torch.bool:
                raise PsmCallError(f"{self.name}: input '{name}' must be a bool tensor, got {t.dtype}")
            if t.is_floating_point():
                float_dtypes.append(t.dtype)
            nb = t.dim() - fr - lead
            batches.append((name, tuple(t.shape[:nb])))
            if not per_token:
                Ts.append((name, t.shape[nb]))
            devices.add(t.device)
        if len(devices) > 1:
            raise PsmCallError(f"{self.name}: inputs are on different devices: {sorted(map(str, devices))}")
        if Ts and len({T for _, T in Ts}) > 1:
            raise PsmCallError(f"{self.name}: inputs disagree on the sequence length T: " +
                               ", ".join(f"{n}: {T}" for n, T in Ts))
        try:
            batch = tuple(torch.broadcast_shapes(*(b for _, b in batches)))
        except RuntimeError:
            raise PsmCallError(f"{self.name}: batch shapes do not broadcast: " +
                               ", ".join(f"{n}: {b}" for n, b in batches)) from None
        float_dtype = torch.float64 if torch.float64 in float_dtypes else torch.float32
        out_dtype = float_dtypes[0] if float_dtypes else None
        for d in float_dtypes[1:]:
            out_dtype = torch.promote_types(out_dtype, d)
        cast = {}
        for name, f in declared.items():
            t = inputs[name]
            lead = () if per_token else (t.shape[t.dim() - f.type.rank - 1],)
            t = t.to(compute_dtype(f.type.dtype, float_dtype))
            cast[name] = torch.broadcast_to(t, batch + lead + f.type.shape)
        return _Prepared(cast, dict(inputs), batch, Ts[0][1] if Ts else 1, float_dtype, out_dtype,
                         devices.pop())

    # ---- public API ----
    def forward(self, *, return_state: bool = False, initial_state: StreamState | None = None,
                backend: str | None = None, **inputs: torch.Tensor):
        backend = backend or "auto"
        if backend not in BACKENDS:
            raise PsmCallError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self._check_bound()
        p = self._prepare(inputs)
        if backend == "triton" or (backend == "auto" and p.device.type == "cuda"):
            from . import triton_backend  # imported lazily: CPU users never need triton

            result = triton_backend.run(self, p, initial_state, return_state, strict=backend == "triton")
            if result is not None:
                return result
        mode = "reference" if backend == "reference" else "torch"
        return self._run(p, initial_state, return_state, mode)

    def reference(self, *, return_state: bool = False, initial_state: StreamState | None = None,
                  **inputs: torch.Tensor):
        """The oracle: plain torch, sequential over T, exactly DESIGN.md section 1."""
        return self.forward(return_state=return_state, initial_state=initial_state,
                            backend="reference", **inputs)

    def init_state(self, batch_shape=(), device=None, dtype: torch.dtype | None = None) -> StreamState:
        """The empty stream: the identity (or an empty counter) for every batch element."""
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        float_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        ev = self._evaluator(float_dtype, torch.device(device or "cpu"))
        e = ev.identity(batch_shape)
        if self.associative:
            return StreamState(batch_shape, prefix=e)
        return StreamState(batch_shape, counter=Counter(identity=e))

    def step(self, state: StreamState, **inputs: torch.Tensor):
        """One token: inputs shaped `(*batch, *field_shape)`. Returns (outputs, new state)."""
        self._check_bound()
        if not isinstance(state, StreamState):
            raise PsmCallError(f"{self.name}.step: state must come from init_state() or "
                               f"return_state=True, got {type(state).__name__}")
        p = self._prepare(inputs, per_token=True)
        seq = {k: v.unsqueeze(len(p.batch_shape)) for k, v in p.inputs.items()}
        p = _Prepared(seq, seq, p.batch_shape, 1, p.float_dtype, p.out_dtype, p.device)
        outs, new = self._run(p, state, True, "reference")
        nb = len(p.batch_shape)
        outs = tuple(o.squeeze(nb) for o in outs) if isinstance(outs, tuple) else outs.squeeze(nb)
        return outs, new

    # ---- the shared pipeline ----
    def _evaluator(self, float_dtype: torch.dtype, device: torch.device) -> Evaluator:
        return Evaluator(self.ir, float_dtype, device, self._externs)

    def _run(self, p: _Prepared, initial: StreamState | None, return_state: bool, mode: str):
        op, ev = self.ir, self._evaluator(p.float_dtype, p.device)
        C = op.tokens_per_element
        batch, nb = p.batch_shape, len(p.batch_shape)
        if initial is None:
            initial = self.init_state(batch, p.device, p.float_dtype)
        _check_state(self, initial, batch)
        inputs = p.inputs
        n_old = 0
        if initial.pending:  # tokens of an unfinished chunk, already emitted: replay them first
            old = {k: torch.broadcast_to(v, batch + v.shape[len(initial.batch_shape):])
                   for k, v in initial.pending.items()}
            n_old = next(iter(old.values())).shape[nb]
            inputs = {k: torch.cat([old[k].to(v.dtype), v], dim=nb) for k, v in inputs.items()}
        T = n_old + p.T
        n_full, rest = divmod(T, C)
        n_elem = n_full + (1 if rest else 0)
        padded = {k: _pad_time(v, nb, n_elem * C) for k, v in inputs.items()}
        chunks = {k: _chunk(v, nb, C, op.chunk is not None) for k, v in padded.items()}
        elem_batch = batch + (n_elem,)
        elements = ev.run(op.lift, {"x": chunks}, elem_batch)
        full = {k: v.narrow(nb, 0, n_full) for k, v in elements.items()}
        combine = lambda a, b: ev.run(op.combine, {"l": a, "r": b},
                                      torch.broadcast_shapes(*(t.shape[:t.dim() - op.field(k).type.rank]
                                                               for k, t in list(a.items()) + list(b.items()))))
        excl, incl, final = self._scan(full, n_full, initial, combine, ev, batch, mode)
        if rest:  # the unfinished chunk: outputs from its exclusive prefix and padded tokens
            last_e = final.prefix if final.prefix is not None else final.counter.prefix()
            last = {k: v.narrow(nb, n_full, 1) for k, v in elements.items()}
            last_i = combine({k: v.unsqueeze(nb) for k, v in last_e.items()}, last)
            excl = _cat_time(excl, {k: v.unsqueeze(nb) for k, v in last_e.items()}, nb)
            incl = _cat_time(incl, last_i, nb)
            final.pending = {k: v.narrow(nb, n_full * C, rest) for k, v in inputs.items()}
        final.tokens = initial.tokens + p.T
        prefixes = excl if op.exclusive else incl
        outs = ev.run(op.output, {"s": prefixes, "x": chunks}, elem_batch)
        results = []
        for f in op.outputs:
            y = outs[f.name]
            if op.chunk is not None:
                y = y.flatten(nb, nb + 1)
            y = y.narrow(nb, n_old, p.T)
            if ir.is_float(f.type.dtype) and p.out_dtype is not None and f.type.dtype != "f64":
                y = y.to(p.out_dtype)
            results.append(y.contiguous())
        out = results[0] if len(results) == 1 else tuple(results)
        return (out, final) if return_state else out

    def _scan(self, elements: State, n: int, initial: StreamState, combine, ev, batch, mode):
        """Exclusive and inclusive prefixes of n elements after `initial`, and the new state."""
        nb = len(batch)
        if n == 0:
            empty = {k: v.narrow(nb, 0, 0) for k, v in elements.items()}
            final = StreamState(batch, prefix=initial.prefix, counter=_copy_counter(initial.counter))
            return empty, empty, final
        if self.associative:
            start = {k: torch.broadcast_to(v, batch + v.shape[len(initial.batch_shape):])
                     for k, v in initial.prefix.items()}
            if mode == "torch":
                excl, incl = scan_torch.associative_scan(elements, start, combine, nb, n)
            else:
                items = [index_state(elements, i, nb) for i in range(n)]
                e_list, i_list = left_fold(items, start, combine)
                excl, incl = stack_states(e_list, nb), stack_states(i_list, nb)
            final = StreamState(batch, prefix=index_state(incl, n - 1, nb))
            return excl, incl, final
        counter = _copy_counter(initial.counter)
        if mode == "torch" and counter.count == 0:
            identity = {k: torch.broadcast_to(v, batch + v.shape[len(initial.batch_shape):])
                        for k, v in counter.identity.items()}
            excl, incl, counter = scan_torch.tree_scan(elements, identity, combine, nb, n)
        else:
            items = [index_state(elements, i, nb) for i in range(n)]
            e_list, i_list = counter_scan(items, counter, combine)
            excl, incl = stack_states(e_list, nb), stack_states(i_list, nb)
        return excl, incl, StreamState(batch, counter=counter)

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.ir.dims)
        kind = "associative" if self.associative else "canonical tree"
        return f"{self.name}[{dims}]: {kind}" if dims else f"{self.name}: {kind}"


def _expected(f: ir.InputField, per_token: bool) -> str:
    shape = ", ".join(["*batch"] + ([] if per_token else ["T"]) + [str(s) for s in f.type.shape])
    return f"shape ({shape}), {f.type.dtype}"


def _pad_time(v: torch.Tensor, nb: int, length: int) -> torch.Tensor:
    T = v.shape[nb]
    if T == length:
        return v
    pad_shape = v.shape[:nb] + (length - T,) + v.shape[nb + 1:]
    return torch.cat([v, v.new_zeros(pad_shape)], dim=nb)


def _chunk(v: torch.Tensor, nb: int, C: int, chunked: bool) -> torch.Tensor:
    if not chunked:
        return v
    return v.unflatten(nb, (v.shape[nb] // C, C))


def _cat_time(a: State, b: State, nb: int) -> State:
    return {k: torch.cat([a[k], b[k].to(a[k].dtype)], dim=nb) for k in a}


def _copy_counter(c: Counter | None) -> Counter | None:
    if c is None:
        return None
    return Counter(identity=c.identity, roots=list(c.roots), folds=list(c.folds), count=c.count)


def _check_state(op: PsmOp, st: StreamState, batch: tuple[int, ...]) -> None:
    if not isinstance(st, StreamState):
        raise PsmCallError(f"{op.name}: initial_state must come from init_state() or "
                           f"return_state=True, got {type(st).__name__}")
    if (st.prefix is None) == op.associative:
        raise PsmCallError(f"{op.name}: this state belongs to an op with other semantics")
    try:
        torch.broadcast_shapes(st.batch_shape, batch)
    except RuntimeError:
        raise PsmCallError(f"{op.name}: the state's batch shape {st.batch_shape} does not match the "
                           f"inputs' {batch}") from None
