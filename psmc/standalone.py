"""The torch-only runtime of a psm op: validation, chunking, scans, streaming state.

This file imports nothing from psmc on purpose: `psmc compile` pastes it verbatim into every
generated module, so a compiled op runs with torch (and triton) alone, and the in-process `PsmOp`
runs the very same code with interpreter-backed `lift`/`combine`/`output`. An op is described by a
`Spec` (names, dtypes, shapes) and four functions on dicts of batched tensors:
`lift(x, batch)`, `combine(l, r, batch)`, `output(s, x, batch)`, `identity(batch)`.
"""

import math  # noqa: F401  (generated code that embeds this file writes math.inf)
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

State = Dict[str, torch.Tensor]


# ---- the op's description ------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldSpec:
    name: str
    dtype: str  # psm dtype: bool i32 i64 f16 bf16 f32 f64
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class Spec:
    name: str
    inputs: Tuple[FieldSpec, ...]
    state: Tuple[FieldSpec, ...]
    outputs: Tuple[FieldSpec, ...]
    chunk: Optional[int]  # tokens per element for `chunk C` ops, else None
    exclusive: bool  # output sees the exclusive prefix
    associative: bool  # False: the canonical tree (DESIGN.md section 1)


TORCH_DTYPES = {
    "bool": torch.bool, "i32": torch.int32, "i64": torch.int64, "f16": torch.float16,
    "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64,
}


def compute_dtype(declared: str, float_dtype: torch.dtype) -> torch.dtype:
    """State math is f32 unless declared f64; a float64 run (the oracle) lifts it all to f64."""
    if declared in ("f16", "bf16", "f32", "f64"):
        return torch.float64 if (declared == "f64" or float_dtype == torch.float64) else torch.float32
    return TORCH_DTYPES[declared]


class PsmCallError(ValueError):
    """Wrong inputs at call time (a missing field, a bad shape or dtype)."""


BACKENDS = ("auto", "triton", "torch", "reference")


def check_backend(backend: Optional[str]) -> str:
    """The backend a call asked for (None means "auto"), or an error that lists the choices."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise PsmCallError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def call_key(backend: Optional[str], inputs: Dict[str, torch.Tensor]) -> Optional[tuple]:
    """The signature of a plain call (no stream state): everything its validation and dispatch
    depend on. The backend asked for, whether autograd records, and per input (in the order given)
    its name, type, shape, strides, dtype, device and requires_grad. A call with the signature of an
    earlier one that ran on kernels goes straight to that call's bound kernels (see `remember`);
    anything else takes the full, checked path. None when an input is not a plain tensor."""
    if backend is not None and type(backend) is not str:
        return None
    try:
        return (backend, torch.is_grad_enabled()) + tuple(
            (k, type(t), t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for k, t in inputs.items())
    except (AttributeError, TypeError, RuntimeError):  # not a tensor, or one without strides
        return None


def remember(calls: dict, key: Optional[tuple], call: Callable) -> None:
    """Keep a bound call under its signature (at most 256 per op: an op called with ever new
    shapes, like a growing prefix, stops adding)."""
    if key is not None and len(calls) < 256:
        calls[key] = call


# ---- streaming state -----------------------------------------------------------------------------

@dataclass
class Counter:
    """The binary counter of the canonical tree (DESIGN.md section 1), for streaming.

    `roots[j]` is the total of the j-th aligned block of the prefix (largest first); `folds[j]` is
    `combine(...combine(e, roots[0])..., roots[j])`, the prefix at the end of that block, or None
    where it can never be needed again. After n elements there is one root per set bit of n. The
    fold after a root is needed only as the base of a carry that stops just below that root, so it
    is dropped when the next root is one level lower (that root can only leave together with it);
    the last fold is the prefix and always kept. Roots plus kept folds are then at most
    ceil(log2 n) + 1 states (n >= 2), and `push` costs amortized at most 2 `combine` calls
    (`calls` counts them): the carry merges total n - popcount(n), plus one fold per element.
    """

    identity: State
    roots: List[Tuple[int, State]] = field(default_factory=list)  # (log2 of block size, total)
    folds: List[Optional[State]] = field(default_factory=list)
    count: int = 0
    calls: int = 0

    def prefix(self) -> State:
        """The exclusive prefix of the next element: P_count."""
        return self.folds[-1] if self.folds else self.identity

    def push(self, element: State, combine: Callable[[State, State], State]) -> State:
        """Append one element; return its inclusive prefix P_{count+1}."""
        total, level = element, 0
        while self.roots and self.roots[-1][0] == level:  # carry: merge equal-sized blocks
            _, left = self.roots.pop()
            self.folds.pop()
            total = combine(left, total)
            self.calls += 1
            level += 1
        fold = combine(self.prefix(), total)  # after a carry, the kept fold of the root it stopped at
        self.calls += 1
        if self.roots and self.roots[-1][0] == level + 1:
            self.folds[-1] = None  # that root now only leaves in a carry through this one
        self.roots.append((level, total))
        self.folds.append(fold)
        self.count += 1
        return fold

    def states_held(self) -> int:
        return len(self.roots) + sum(f is not None for f in self.folds)

    def copy(self) -> "Counter":
        return Counter(self.identity, list(self.roots), list(self.folds), self.count, self.calls)


def _drop_unneeded_folds(roots: List[Tuple[int, State]], folds: List[Optional[State]]) -> List[Optional[State]]:
    """Counter's rule: keep the last fold and those whose next root is not one level lower."""
    return [f if j == len(roots) - 1 or roots[j][0] - roots[j + 1][0] > 1 else None
            for j, f in enumerate(folds)]


@dataclass
class StreamState:
    """What streaming keeps between calls.

    Associative ops keep one state, `prefix` (everything so far, folded). Non-associative ops keep
    the binary counter of the canonical tree. Chunked ops also keep the tokens of the unfinished
    chunk in `pending` (shaped `(*batch, k, *field)` with k < C). `tokens` counts tokens seen.
    """

    batch_shape: Tuple[int, ...]
    op: str = ""  # the op (name and state fields) this stream belongs to
    tokens: int = 0
    prefix: Optional[State] = None
    counter: Optional[Counter] = None
    pending: Dict[str, torch.Tensor] = field(default_factory=dict)

    def states_held(self) -> int:
        return self.counter.states_held() if self.counter is not None else 1


# ---- scans over the time axis (axis `nb` of every tensor) ---------------------------------------

def _take(st: State, nb: int, index) -> State:
    key = (slice(None),) * nb + (index,)
    return {k: v[key] for k, v in st.items()}


def _cat(a: State, b: State, nb: int) -> State:
    return {k: torch.cat([a[k], b[k].to(a[k].dtype)], dim=nb) for k in a}


def _with_time(st: State, nb: int, n: int) -> State:
    """A state without a time axis, repeated n times along a new time axis."""
    return {k: v.unsqueeze(nb).expand(v.shape[:nb] + (n,) + v.shape[nb:]) for k, v in st.items()}


def _stack(states: List[State], nb: int) -> State:
    return {k: torch.stack([s[k] for s in states], dim=nb) for k in states[0]}


def sequential_scan(elements: State, n: int, nb: int, combine, start: Optional[State],
                    counter: Optional[Counter]) -> Tuple[State, State]:
    """The reference: a left fold (associative) or the binary counter (canonical tree)."""
    excl, incl = [], []
    acc = start
    for i in range(n):
        s = _take(elements, nb, i)
        if counter is None:
            excl.append(acc)
            acc = combine(acc, s)
            incl.append(acc)
        else:
            excl.append(counter.prefix())
            incl.append(counter.push(s, combine))
    return _stack(excl, nb), _stack(incl, nb)


def associative_scan(elements: State, n: int, nb: int, combine, start: State) -> Tuple[State, State]:
    """Log-depth Hillis–Steele scan, then the start state folded in front of every prefix."""
    acc = elements
    d = 1
    while d < n:
        merged = combine(_take(acc, nb, slice(0, n - d)), _take(acc, nb, slice(d, n)))
        acc = _cat(_take(acc, nb, slice(0, d)), merged, nb)
        d *= 2
    incl = combine(_with_time(start, nb, n), acc)
    excl = _cat(_with_time(start, nb, 1), _take(incl, nb, slice(0, n - 1)), nb)
    return excl, incl


def tree_scan(elements: State, n: int, nb: int, combine, identity: State,
              counter: Optional[Counter] = None) -> Tuple[State, State, Counter]:
    """The canonical tree level by level: one batched `combine` per level and direction.

    The n elements sit at global positions c .. c+n-1 after a stream of c = `counter.count`
    elements (c = 0 without a counter), and blocks are aligned globally: at level k the arrays
    hold the blocks j >= c >> k, and a block that starts before c is completed with the counter's
    root of that level (the set bits of c are exactly those roots). Up-sweep: totals of complete
    blocks. Down-sweep over positions c .. c+n: a left child inherits its parent's prefix, a right
    child gets combine(parent prefix, left sibling total). The sweep starts at the lowest level
    whose single block holds all new positions, from the counter's cached fold there.
    Returns (exclusive, inclusive) prefixes and the binary counter after the c + n elements.
    """
    c = counter.count if counter is not None else 0
    roots = dict(counter.roots) if counter is not None else {}
    end = c + n
    totals = [elements]  # totals[k]: complete level-k blocks j = (c >> k) .. (end >> k) - 1
    k = 0
    while (end >> (k + 1)) - (c >> (k + 1)) > 0:
        m = (end >> (k + 1)) - (c >> (k + 1))
        below = _with_root(totals[k], roots, k, c, nb)
        totals.append(combine(_take(below, nb, slice(0, 2 * m, 2)), _take(below, nb, slice(1, 2 * m, 2))))
        k += 1
    top = len(totals)  # at level `top` one block holds positions c .. end
    # The prefix of that block: the fold of the counter's roots of level >= top, largest first.
    acc, old_folds = identity, {}
    if counter is not None:
        for (lv, root), fold in zip(counter.roots, counter.folds):
            if lv < top:
                break
            acc = fold if fold is not None else combine(acc, root)
            old_folds[lv] = acc
    prefix = _with_time(acc, nb, 1)
    new_folds = {}
    for level in range(top - 1, -1, -1):
        first = 2 * (c >> (level + 1))  # global index of the first left child under the parents
        count = (end >> level) - first + 1  # children from `first` to the block holding `end`
        rights = count // 2
        lefts = _take(prefix, nb, slice(0, (count + 1) // 2))
        if rights:
            sib = _with_root(totals[level], roots, level, c, nb)
            right = combine(_take(prefix, nb, slice(0, rights)), _take(sib, nb, slice(0, 2 * rights, 2)))
            prefix = _interleave(lefts, right, nb, count)
        else:
            prefix = lefts
        if (c >> level) & 1:  # the first child is a right child whose left sibling is an old root
            prefix = _take(prefix, nb, slice(1, None))
        if end >> level & 1:  # a root of the new counter ends at this level's block end >> level
            new_folds[level] = _take(prefix, nb, (end >> level) - (c >> level))
    out = Counter(identity=identity, count=end, calls=counter.calls if counter is not None else 0)
    folds = []
    for level in range(max(top, end.bit_length()), -1, -1):  # one root per set bit of c + n
        if end >> level & 1:
            j = (end >> level) - 1
            if level < top:
                out.roots.append((level, _take(totals[level], nb, j - (c >> level))))
                folds.append(new_folds[level])
            else:  # an old block: the same root as before
                out.roots.append((level, roots[level]))
                folds.append(old_folds[level])
    out.folds = _drop_unneeded_folds(out.roots, folds)
    return _take(prefix, nb, slice(0, n)), _take(prefix, nb, slice(1, n + 1)), out


def _with_root(level_totals: State, roots: Dict[int, State], level: int, c: int, nb: int) -> State:
    """Level totals from global index c >> level, with the old root in front when that is odd."""
    if not (c >> level) & 1:
        return level_totals
    return _cat(_with_time(roots[level], nb, 1), level_totals, nb)


def _interleave(lefts: State, rights: State, nb: int, count: int) -> State:
    """[l0, r0, l1, r1, ...] truncated to count."""
    out = {}
    for k in lefts:
        a, b = lefts[k], rights[k].to(lefts[k].dtype)
        if b.shape[nb] < a.shape[nb]:
            b = torch.cat([b, a.narrow(nb, a.shape[nb] - 1, 1)], dim=nb)
        out[k] = torch.stack([a, b], dim=nb + 1).flatten(nb, nb + 1).narrow(nb, 0, count)
    return out


# ---- validation ----------------------------------------------------------------------------------

@dataclass
class Prepared:
    """Validated inputs. `raw` are the caller's tensors; `inputs` cast them (lazily, so kernel
    paths that read `raw` never pay for a bf16 -> f32 copy)."""

    raw: Dict[str, torch.Tensor]  # validated but not cast or broadcast
    batch_shape: Tuple[int, ...]
    T: int
    float_dtype: torch.dtype  # f32, or f64 when a float input is f64
    out_dtype: Optional[torch.dtype]  # dtype of float outputs: the inputs' float dtype
    device: torch.device
    fields: Tuple[FieldSpec, ...] = ()
    per_token: bool = False
    cast: Optional[Dict[str, torch.Tensor]] = None  # set to skip the cast (already done)

    @property
    def inputs(self) -> Dict[str, torch.Tensor]:
        """(*batch, T, *shape) tensors in the compute dtypes."""
        if self.cast is None:
            out = {}
            for f in self.fields:
                t = self.raw[f.name]
                time = () if self.per_token else (t.shape[t.dim() - len(f.shape) - 1],)
                shape = tuple(self.batch_shape) + time + tuple(f.shape)
                out[f.name] = torch.broadcast_to(t.to(compute_dtype(f.dtype, self.float_dtype)), shape)
            self.cast = out
        return self.cast


def _expected(f: FieldSpec, per_token: bool) -> str:
    dims = ["*batch"] + ([] if per_token else ["T"]) + [str(s) for s in f.shape]
    return f"shape ({', '.join(dims)}), {f.dtype}"


_PREPARED: Dict[tuple, tuple] = {}  # call signature -> what validation derived from it


def prepare(spec: Spec, inputs: Dict[str, torch.Tensor], per_token: bool = False) -> Prepared:
    """Check names, shapes and dtypes (errors name the field); cast to the compute dtypes.

    What validation derives depends only on the names, shapes, dtypes and devices, so a call with
    the signature of an earlier valid one reuses it (a training loop validates once)."""
    try:
        key = (id(spec), per_token) + tuple((k, t.shape, t.dtype, t.device) for k, t in inputs.items())
    except AttributeError:  # not a tensor: the full check names it
        key = None
    hit = _PREPARED.get(key) if key is not None else None
    if hit is not None and hit[0] is spec:
        return Prepared(dict(inputs), *hit[1:], spec.inputs, per_token)
    p = _prepare(spec, inputs, per_token)
    if key is not None and len(_PREPARED) < 4096:
        _PREPARED[key] = (spec, p.batch_shape, p.T, p.float_dtype, p.out_dtype, p.device)
    return p


def _prepare(spec: Spec, inputs: Dict[str, torch.Tensor], per_token: bool) -> Prepared:
    declared = {f.name: f for f in spec.inputs}
    unknown = [k for k in inputs if k not in declared]
    if unknown:
        raise PsmCallError(f"{spec.name}: unexpected input '{unknown[0]}'; inputs are {', '.join(declared)}")
    missing = [k for k in declared if k not in inputs]
    if missing:
        f = declared[missing[0]]
        raise PsmCallError(f"{spec.name}: missing input '{f.name}' ({_expected(f, per_token)})")
    lead = 0 if per_token else 1
    float_dtypes, batches, lengths, devices = [], [], [], set()
    for name, f in declared.items():
        t = inputs[name]
        if not isinstance(t, torch.Tensor):
            raise PsmCallError(f"{spec.name}: input '{name}' must be a torch.Tensor, got {type(t).__name__}")
        fr = len(f.shape)
        if t.dim() < fr + lead or tuple(t.shape[t.dim() - fr:]) != f.shape:
            raise PsmCallError(f"{spec.name}: input '{name}' has shape {tuple(t.shape)}; "
                               f"expected {_expected(f, per_token)}")
        if f.dtype in ("f16", "bf16", "f32", "f64") and not t.is_floating_point():
            raise PsmCallError(f"{spec.name}: input '{name}' must be a floating-point tensor "
                               f"(declared {f.dtype}), got {t.dtype}")
        if f.dtype in ("i32", "i64") and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise PsmCallError(f"{spec.name}: input '{name}' must be an integer tensor "
                               f"(declared {f.dtype}), got {t.dtype}")
        if f.dtype == "bool" and t.dtype != torch.bool:
            raise PsmCallError(f"{spec.name}: input '{name}' must be a bool tensor, got {t.dtype}")
        if t.is_floating_point():
            float_dtypes.append(t.dtype)
        nb = t.dim() - fr - lead
        batches.append((name, tuple(t.shape[:nb])))
        if not per_token:
            lengths.append((name, t.shape[nb]))
        devices.add(t.device)
    if len(devices) > 1:
        raise PsmCallError(f"{spec.name}: inputs are on different devices: {sorted(map(str, devices))}")
    if len({T for _, T in lengths}) > 1:
        raise PsmCallError(f"{spec.name}: inputs disagree on the sequence length T: " +
                           ", ".join(f"{n}: {T}" for n, T in lengths))
    try:
        shapes = {b for _, b in batches}
        # torch.broadcast_shapes is slow (tens of us): most calls have one batch shape
        batch = shapes.pop() if len(shapes) == 1 else tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise PsmCallError(f"{spec.name}: batch shapes do not broadcast: " +
                           ", ".join(f"{n}: {b}" for n, b in batches)) from None
    float_dtype = torch.float64 if torch.float64 in float_dtypes else torch.float32
    out_dtype = None
    for d in float_dtypes:
        out_dtype = d if out_dtype is None else torch.promote_types(out_dtype, d)
    T = lengths[0][1] if lengths else 1
    return Prepared(dict(inputs), batch, T, float_dtype, out_dtype, devices.pop(), spec.inputs, per_token)


# ---- the pipeline: chunk, lift, scan, output -----------------------------------------------------

@dataclass
class Functions:
    """The op's pieces on batched tensors; `batch` is the shape of the leading axes."""

    lift: Callable[[State, Tuple[int, ...]], State]
    combine: Callable[[State, State, Tuple[int, ...]], State]
    output: Callable[[State, State, Tuple[int, ...]], State]
    identity: Callable[[Tuple[int, ...], torch.dtype, torch.device], State]


def init_state(spec: Spec, fns: Functions, batch_shape, device=None, dtype=None) -> StreamState:
    """The empty stream: the identity (or an empty counter) for every batch element."""
    batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    float_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    e = fns.identity(batch_shape, float_dtype, torch.device(device or "cpu"))
    if spec.associative:
        return StreamState(batch_shape, owner(spec), prefix=e)
    return StreamState(batch_shape, owner(spec), counter=Counter(identity=e))


def owner(spec: Spec) -> str:
    """Which op a stream belongs to: its name and state fields."""
    return f"{spec.name}({', '.join(f.name for f in spec.state)})"


def _broadcast_state(st: State, batch: Tuple[int, ...], old_nb: int) -> State:
    return {k: torch.broadcast_to(v, batch + v.shape[old_nb:]) for k, v in st.items()}


def scan(spec: Spec, elements: State, n: int, initial: StreamState, combine, batch, mode: str):
    """Exclusive and inclusive prefixes of n elements after `initial`, and the state after them.

    mode "reference": the sequential left fold / binary counter; "torch": log-depth scans.
    """
    nb, old_nb = len(batch), len(initial.batch_shape)
    if spec.associative:
        start = _broadcast_state(initial.prefix, batch, old_nb)
        if n == 0:
            empty = _take(elements, nb, slice(0, 0))
            return empty, empty, StreamState(batch, prefix=start)
        if mode == "torch":
            excl, incl = associative_scan(elements, n, nb, combine, start)
        else:
            excl, incl = sequential_scan(elements, n, nb, combine, start, None)
        return excl, incl, StreamState(batch, prefix=_take(incl, nb, n - 1))
    counter = initial.counter.copy()
    counter.identity = _broadcast_state(counter.identity, batch, old_nb)
    counter.roots = [(lv, _broadcast_state(r, batch, old_nb)) for lv, r in counter.roots]
    counter.folds = [None if f is None else _broadcast_state(f, batch, old_nb) for f in counter.folds]
    if n == 0:
        empty = _take(elements, nb, slice(0, 0))
        return empty, empty, StreamState(batch, counter=counter)
    if mode == "torch":
        excl, incl, counter = tree_scan(elements, n, nb, combine, counter.identity, counter)
    else:
        excl, incl = sequential_scan(elements, n, nb, combine, None, counter)
    return excl, incl, StreamState(batch, counter=counter)


def run(spec: Spec, fns: Functions, p: Prepared, initial: Optional[StreamState], return_state: bool,
        mode: str = "torch"):
    """Chunk the tokens, lift, scan, output; outputs shaped (*batch, T, *out_shape)."""
    C = spec.chunk or 1
    batch, nb = p.batch_shape, len(p.batch_shape)
    if initial is None:
        initial = init_state(spec, fns, batch, p.device, p.float_dtype)
    check_state(spec, initial, batch)
    inputs = p.inputs
    n_old = 0
    if initial.pending:  # tokens of an unfinished chunk, already emitted: replay them first
        old = _broadcast_state(initial.pending, batch, len(initial.batch_shape))
        n_old = next(iter(old.values())).shape[nb]
        inputs = {k: torch.cat([old[k].to(v.dtype), v], dim=nb) for k, v in inputs.items()}
    T = n_old + p.T
    n_full, rest = divmod(T, C)
    n_elem = n_full + (1 if rest else 0)
    tokens = {k: _pad_time(v, nb, n_elem * C) for k, v in inputs.items()}
    if spec.chunk is not None:
        tokens = {k: v.unflatten(nb, (n_elem, C)) for k, v in tokens.items()}
    elem_batch = batch + (n_elem,)
    elements = fns.lift(tokens, elem_batch)
    full = _take(elements, nb, slice(0, n_full))

    def combine(a: State, b: State) -> State:
        some_a, some_b = next(iter(a)), next(iter(b))
        ra = a[some_a].dim() - len(_field(spec, some_a).shape)
        rb = b[some_b].dim() - len(_field(spec, some_b).shape)
        shape = torch.broadcast_shapes(a[some_a].shape[:ra], b[some_b].shape[:rb])
        return fns.combine(a, b, tuple(shape))

    excl, incl, final = scan(spec, full, n_full, initial, combine, batch, mode)
    if rest:  # the unfinished chunk: outputs from its exclusive prefix and zero-padded tokens
        before = final.prefix if final.prefix is not None else final.counter.prefix()
        before = _with_time(before, nb, 1)
        excl = _cat(excl, before, nb)
        incl = _cat(incl, combine(before, _take(elements, nb, slice(n_full, n_full + 1))), nb)
        final.pending = {k: v.narrow(nb, n_full * C, rest) for k, v in inputs.items()}
    final.tokens = initial.tokens + p.T
    final.op = owner(spec)
    outs = fns.output(excl if spec.exclusive else incl, tokens, elem_batch)
    results = []
    for f in spec.outputs:
        y = outs[f.name]
        if spec.chunk is not None:
            y = y.flatten(nb, nb + 1)
        y = y.narrow(nb, n_old, p.T)
        if f.dtype in ("f16", "bf16", "f32") and p.out_dtype is not None:
            y = y.to(p.out_dtype)
        results.append(y.contiguous())
    out = results[0] if len(results) == 1 else tuple(results)
    return (out, final) if return_state else out


def step(spec: Spec, fns: Functions, state: StreamState, inputs: Dict[str, torch.Tensor]):
    """One token: inputs shaped (*batch, *field_shape). Returns (outputs, new state)."""
    if not isinstance(state, StreamState):
        raise PsmCallError(f"{spec.name}.step: state must come from init_state() or "
                           f"return_state=True, got {type(state).__name__}")
    check_state(spec, state, state.batch_shape)
    p = prepare(spec, inputs, per_token=True)
    nb = len(p.batch_shape)
    seq = {k: v.unsqueeze(nb) for k, v in p.inputs.items()}
    p = Prepared(seq, p.batch_shape, 1, p.float_dtype, p.out_dtype, p.device, spec.inputs, cast=seq)
    outs, new = run(spec, fns, p, state, True, mode="reference")
    if isinstance(outs, tuple):
        return tuple(o.squeeze(nb) for o in outs), new
    return outs.squeeze(nb), new


def check_state(spec: Spec, st: StreamState, batch: Tuple[int, ...]) -> None:
    if not isinstance(st, StreamState):
        raise PsmCallError(f"{spec.name}: initial_state must come from init_state() or "
                           f"return_state=True, got {type(st).__name__}")
    if (st.prefix is not None) != spec.associative:
        raise PsmCallError(f"{spec.name}: this state belongs to an op with other semantics")
    if st.op != owner(spec):
        raise PsmCallError(f"{spec.name}: this state belongs to {st.op or 'another op'}, not "
                           f"{owner(spec)}")
    try:
        torch.broadcast_shapes(st.batch_shape, batch)
    except RuntimeError:
        raise PsmCallError(f"{spec.name}: the state's batch shape {st.batch_shape} does not match "
                           f"the inputs' {batch}") from None


def _field(spec: Spec, name: str) -> FieldSpec:
    for f in spec.state:
        if f.name == name:
            return f
    raise KeyError(name)


def _pad_time(v: torch.Tensor, nb: int, length: int) -> torch.Tensor:
    T = v.shape[nb]
    if T == length:
        return v
    pad = v.new_zeros(v.shape[:nb] + (length - T,) + v.shape[nb + 1:])
    return torch.cat([v, pad], dim=nb)


# ---- helpers for the generated lift / combine / output code --------------------------------------

def _align(x, rank: int, target: int):
    """Insert `target - rank` axes just before the last `rank` (field) axes of x."""
    if not isinstance(x, torch.Tensor) or target <= rank:
        return x
    nb = x.dim() - rank
    return x.reshape(x.shape[:nb] + (1,) * (target - rank) + x.shape[nb:])


def _as(x, dtype: torch.dtype, device=None) -> torch.Tensor:
    """x as a tensor of `dtype` (Python numbers become 0-d tensors)."""
    if isinstance(x, torch.Tensor):
        return x if x.dtype == dtype else x.to(dtype)
    return torch.tensor(x, dtype=dtype, device=device)


def _floatify(x, fdt: torch.dtype):
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.to(fdt)
    return float(x)


def _matmul(a: torch.Tensor, b: torch.Tensor, ra: int, rb: int) -> torch.Tensor:
    """`@` on field axes: vector·vector, vector@matrix, matrix@vector, (batched) matrix@matrix."""
    if ra == 1 and rb == 1:
        return (a * b).sum(-1)
    if ra == 1:
        return (_align(a.unsqueeze(-1), 2, rb) * b).sum(-2)
    if rb == 1:
        return (a * _align(b.unsqueeze(-2), 2, ra)).sum(-1)
    r = max(ra, rb)
    return torch.matmul(_align(a, ra, r), _align(b, rb, r))


def _store(value, rank: int, shape: Tuple[int, ...], dtype: torch.dtype, batch, device=None):
    """An assigned field: cast, field axes aligned, broadcast over the batch."""
    t = _align(_as(value, dtype, device), rank, len(shape))
    return torch.broadcast_to(t, tuple(batch) + tuple(shape))


def _extern(fn, args, ranks, result_shape: Tuple[int, ...], name: str) -> torch.Tensor:
    """Call a bound extern on (N, *shape) rows: the batch axes flattened into one."""
    if fn is None:
        raise RuntimeError(f"extern '{name}' is not bound; call op.bind({name}=module) first")
    batch = torch.broadcast_shapes(*(a.shape[: a.dim() - r] for a, r in zip(args, ranks)))
    flat = [torch.broadcast_to(a, batch + a.shape[a.dim() - r:]).reshape((-1,) + tuple(a.shape[a.dim() - r:]))
            for a, r in zip(args, ranks)]
    out = fn(*flat)
    want = (flat[0].shape[0],) + tuple(result_shape)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(f"extern '{name}' returned {got}, expected a tensor of shape {want} "
                           f"(N flattened batch rows, then the declared shape)")
    return out.reshape(batch + tuple(result_shape))
