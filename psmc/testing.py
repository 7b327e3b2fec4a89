"""Property tests and Hypothesis strategies for `.psm` ops, ready for a user's pytest suite.

```python
# test_my_ops.py
import psmc, psmc.testing
from hypothesis import given

ops = psmc.compile_file("my_ops.psm")

def test_laws():                      # associativity (if the op runs as associative), identities
    psmc.testing.check_laws(ops["linrec"])

def test_duality():                   # every path against the reference, streaming, prefill+step
    psmc.testing.check_duality(ops["linrec"])

@given(psmc.testing.reachable_states(ops["linrec"], n=2))
def test_gate_stays_in_unit_interval(states):
    a, b = states
    assert 0 <= a["g"] <= 1 and 0 <= b["g"] <= 1
```

Failures raise `AssertionError` with the counterexample in the op's own terms: the states by
field and the inputs they were lifted from, both sides, the difference and the tolerance.
Everything is deterministic for a given `seed`. `psmc test FILE...` runs the same checks.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from typing import Callable, Iterable, Mapping

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

from . import ir
from .counterexample import (
    _ARITY, _TOKENS, DEFAULT_FLOAT_RANGE, DEFAULT_INT_RANGE, Harness, Sample, _value_dtype, check_identity_element,
    hypothesis_search, input_range, random_externs, random_tokens, round_to, screen,
)

__all__ = ["DEFAULT_FLOAT_RANGE", "DEFAULT_INT_RANGE", "field_values", "tokens", "state_tokens", "sample_strategy", "reachable_states",
           "sequences", "check_laws", "check_duality", "random_externs", "available_backends",
           "BACKENDS"]

# Paths compared with the reference by check_duality, with the input dtype each runs on and
# its relative tolerance. Later kernels add themselves here.
BACKENDS: dict[str, tuple[torch.dtype, float]] = {
    "torch": (torch.float64, 1e-7),
    "triton": (torch.float32, 2e-4),
}


# ---- strategies --------------------------------------------------------------------------------

def field_values(dtype: str, shape: tuple[int, ...], lo: float, hi: float) -> st.SearchStrategy:
    """Tensors of one input field (float64/int64/bool), values in [lo, hi], rounded to `dtype`.

    Small fields are drawn scalar by scalar; large ones as a fill value with a few overrides (which
    shrink to readable constant vectors) or as seeded uniform noise.
    """
    vdtype = _value_dtype(dtype)
    if dtype == "bool":
        elem = st.booleans()
    elif ir.is_int(dtype):
        elem = st.integers(int(lo), int(hi))
    else:
        elem = st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    n = math.prod(shape)

    def finish(vals) -> torch.Tensor:
        t = torch.tensor(vals, dtype=vdtype).reshape(shape)
        return round_to(t, dtype)

    if n <= 4:
        return st.lists(elem, min_size=n, max_size=n).map(finish)

    def sparse(args):
        fill, overrides = args
        vals = [fill] * n
        for i, v in overrides:
            vals[i] = v
        return finish(vals)

    def noise(s: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(s)
        if dtype == "bool":
            return (torch.rand(shape, generator=g) < 0.5)
        if ir.is_int(dtype):
            return torch.randint(int(lo), int(hi) + 1, shape, generator=g)
        return round_to(lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64), dtype)

    return st.one_of(
        st.tuples(elem, st.lists(st.tuples(st.integers(0, n - 1), elem), max_size=4)).map(sparse),
        st.integers(0, 2**31 - 1).map(noise),
    )


def tokens(op) -> st.SearchStrategy:
    """The inputs of one lifted element: {input name: tensor of the lifted shape}."""
    o = _ir(op)
    parts = {}
    for f in o.inputs:
        lo, hi = input_range(f) if f.type.dtype != "bool" else (0, 1)
        parts[f.name] = field_values(f.type.dtype, o.lifted_input_type(f).shape, lo, hi)
    return st.fixed_dictionaries(parts)


def state_tokens(op, min_tokens: int = 1, max_tokens: int = 3) -> st.SearchStrategy:
    """A reachable state, given by the tokens it folds (none: the identity)."""
    return st.lists(tokens(op), min_size=min_tokens, max_size=max_tokens)


def sample_strategy(op, law: str) -> st.SearchStrategy:
    """The states one law needs (3 for associativity, 2 commutativity, 1 an identity)."""
    kmin, kmax = _TOKENS[law]
    return st.tuples(*[state_tokens(op, kmin, kmax)] * _ARITY[law]).map(lambda ts: Sample(list(ts)))


def reachable_states(op, n: int = 1, min_tokens: int = 1, max_tokens: int = 3,
                     externs: Mapping[str, Callable] | None = None) -> st.SearchStrategy:
    """A tuple of n reachable states (dicts of float64/int64 tensors by field)."""
    h = Harness(_ir(op), externs if externs is not None else _externs(op))

    def build(ts) -> tuple[dict[str, torch.Tensor], ...]:
        s = h.states([Sample(list(ts))])
        return tuple({k: v[0, i] for k, v in s.items()} for i in range(n))

    return st.tuples(*[state_tokens(op, min_tokens, max_tokens)] * n).map(build)


def sequences(op, max_T: int = 12, batch_shapes: Iterable[tuple[int, ...]] = ((), (2,))
              ) -> st.SearchStrategy:
    """Keyword inputs for `op(**x)`: float64/int64/bool tensors shaped (*batch, T, *field).

    Values are seeded noise in the declared ranges (ends included); T shrinks towards 1.
    """
    o = _ir(op)

    def build(args) -> dict[str, torch.Tensor]:
        T, batch, s = args
        g = torch.Generator().manual_seed(s)
        x = random_tokens(_untokenized(o), batch + (T,), g)
        return x

    return st.tuples(st.integers(1, max_T), st.sampled_from(list(batch_shapes)),
                     st.integers(0, 2**31 - 1)).map(build)


# ---- the laws ----------------------------------------------------------------------------------

def check_laws(op, *, associative: bool | None = None, identity: bool | None = None,
               max_examples: int = 100, seed: int = 0,
               externs: Mapping[str, Callable] | None = None) -> None:
    """Property-test the laws the op relies on; raise AssertionError with a counterexample.

    associative: test associativity (default: when the op runs as associative, `op.associative`).
    identity: test combine(e, s) == s == combine(s, e) on reachable s and on e itself (default:
    always for ops without externs; for extern ops only when they run as associative, since the
    canonical tree of a learned aggregator only starts from e).
    Extern ops use their bound modules, or random ones (`random_externs`) when unbound.
    """
    o = _ir(op)
    runs_assoc = bool(getattr(op, "associative", o.expect == "associative"))
    if associative is None:
        associative = runs_assoc
    if identity is None:
        identity = not o.externs or runs_assoc
    h = Harness(o, externs if externs is not None else _externs(op, seed))
    laws = (["left_identity", "right_identity"] if identity else []) + (["associative"] if associative else [])
    for law in laws:
        cx = check_identity_element(h, law) if law != "associative" else None
        if cx is None:
            cx = screen(h, law, 64, seed).counterexample
        if cx is None:
            cx = hypothesis_search(h, law, max_examples, seed).counterexample
        if cx is not None:
            raise AssertionError(cx.text())


# ---- duality -----------------------------------------------------------------------------------

def available_backends(op, device: str | torch.device = "cpu") -> list[str]:
    """The parallel paths this op may run here: "torch", and "triton" when psmc.triton_backend
    imports and does not rule the op out (`supports(op)`, where it has one). Per call, a backend's
    `why_not(op, prepared)` can still decline (see `_declines`): such calls are skipped."""
    out = ["torch"]
    tb = _backend_module("triton")
    supports = getattr(tb, "supports", None)
    if tb is not None and (supports is None or supports(op)):
        out.append("triton")
    return out


def _backend_module(name: str):
    mod = f"psmc.{name}_backend"
    if name == "torch" or importlib.util.find_spec(mod) is None:
        return None
    try:
        return importlib.import_module(mod)
    except Exception:  # e.g. triton missing or broken: the torch path still works
        return None


def _declines(op, name: str, x: dict[str, torch.Tensor]) -> str | None:
    """Why backend `name` will not take this call (its own `why_not`), or None."""
    tb = _backend_module(name)
    why_not = getattr(tb, "why_not", None)
    if why_not is None:
        return None
    return why_not(op, op._prepare(x))


def check_duality(op, *, max_examples: int = 20, seed: int = 0, device: str | torch.device = "cpu",
                  backends: Iterable[str] | None = None, gradients: bool = True, max_T: int = 12) -> None:
    """Every path equals the reference: parallel backends, token-by-token streaming, and prefill
    followed by `step` (and by a parallel call from the returned state). Raises AssertionError
    naming the path, the output, the difference and the inputs' shapes.

    Externs must be bound (e.g. `op.bind(**psmc.testing.random_externs(op.ir))`).
    """
    missing = [e.name for e in op.ir.externs if e.name not in op._externs]
    if missing:
        raise ValueError(f"op '{op.name}' has unbound externs ({', '.join(missing)}); bind them first, "
                         f"e.g. op.bind(**psmc.testing.random_externs(op.ir))")
    device = torch.device(device)
    names = list(backends) if backends is not None else available_backends(op, device)

    @hseed(seed)
    @settings(max_examples=max_examples, database=None, deadline=None, derandomize=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate, Phase.shrink), verbosity=Verbosity.quiet,
              print_blob=False)
    @given(sequences(op, max_T=max_T), st.floats(0, 1))
    def prop(x: dict[str, torch.Tensor], frac: float):
        _duality_once(op, x, frac, names, device, gradients)

    prop()


def _duality_once(op, x: dict[str, torch.Tensor], frac: float, backends: list[str],
                  device: torch.device, gradients: bool) -> None:
    o = op.ir
    x = {k: v.to(device) for k, v in x.items()}
    shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in x.items())
    nb = next(v.dim() - f.type.rank - 1 for f in o.inputs for k, v in x.items() if k == f.name)
    T = next(iter(x.values())).shape[nb]
    ref = _outs(op.reference(**x))
    rtol = BACKENDS["torch"][1]

    def same(what: str, got, want, tol: float = rtol) -> None:
        for f, a, b in zip(o.outputs, _outs(got), want):
            _assert_close(a, b, tol, f"{op.name}: {what} differs from the reference in output "
                                     f"'{f.name}' (inputs {shapes})")

    for name in backends:
        dtype, tol = BACKENDS.get(name, (torch.float64, rtol))
        xi = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
        if _declines(op, name, xi):
            continue
        want = ref if dtype == torch.float64 else _outs(op.reference(**{
            k: v.to(torch.float64) if v.is_floating_point() else v for k, v in xi.items()}))
        same(f'backend="{name}"', op(**xi, backend=name), want, tol)

    # streaming: one token at a time from init_state
    batch = tuple(next(iter(x.values())).shape[:nb])
    stt = op.init_state(batch, device=device, dtype=torch.float64)
    steps = []
    for t in range(T):
        y, stt = op.step(stt, **{k: v.select(nb, t) for k, v in x.items()})
        steps.append(_outs(y))
    same("streaming (init_state + step per token)",
         tuple(torch.stack([s[i] for s in steps], dim=nb) for i in range(len(o.outputs))), ref)

    # prefill the first t tokens in parallel, then step / continue in parallel
    t = int(round(frac * T))
    head = {k: v.narrow(nb, 0, t) for k, v in x.items()}
    tail = {k: v.narrow(nb, t, T - t) for k, v in x.items()}
    y1, st1 = op(**head, return_state=True, backend="torch")
    y1 = _outs(y1)
    cont = []
    st2 = st1
    for j in range(T - t):
        y, st2 = op.step(st2, **{k: v.select(nb, j) for k, v in tail.items()})
        cont.append(_outs(y))
    joined = tuple(torch.cat([y1[i]] + [c[i].unsqueeze(nb) for c in cont], dim=nb)
                   for i in range(len(o.outputs)))
    same(f"prefill of {t} tokens (return_state=True) then step", joined, ref)
    if T - t:
        y2 = _outs(op(**tail, initial_state=st1, backend="torch"))
        want = tuple(r.narrow(nb, t, T - t) for r in ref)
        same(f"prefill of {t} tokens then a parallel call with initial_state", y2, want)

    if gradients:
        _check_gradients(op, x, shapes)


def _check_gradients(op, x: dict[str, torch.Tensor], shapes: str) -> None:
    """Gradients of a fixed random functional of the outputs: torch path vs reference."""
    floats = [k for k, v in x.items() if v.is_floating_point()]
    if not floats:
        return
    grads = {}
    for path in ("torch", "reference"):
        xs = {k: (v.clone().requires_grad_(True) if k in floats else v) for k, v in x.items()}
        outs = _outs(op(**xs, backend=path))
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum()
                   for o in outs if o.is_floating_point())
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            return
        gs = torch.autograd.grad(loss, [xs[k] for k in floats], allow_unused=True)
        grads[path] = {k: (gr if gr is not None else torch.zeros_like(x[k])) for k, gr in zip(floats, gs)}
    for k in floats:
        _assert_close(grads["torch"][k], grads["reference"][k], 1e-6,
                      f"{op.name}: the gradient with respect to '{k}' differs between the torch path "
                      f"and the reference (inputs {shapes})")


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
    if not a.is_floating_point():
        if not torch.equal(a, b):
            raise AssertionError(f"{what}: {int((a != b).sum())} of {a.numel()} values differ")
        return
    a, b = a.double(), b.double()
    na, nb_ = torch.isnan(a), torch.isnan(b)
    if (na ^ nb_).any():
        raise AssertionError(f"{what}: NaN on one side at {int((na ^ nb_).sum())} positions")
    finite = torch.isfinite(b)
    scale = b[finite].abs().max().item() if finite.any() else 0.0
    d = torch.where((a == b) | (na & nb_), torch.zeros_like(a), (a - b).abs())
    tol = rtol * (scale + 1e-3)
    if d.numel() and d.max().item() > tol:
        i = tuple(torch.nonzero(d == d.max())[0].tolist())
        raise AssertionError(f"{what}: max |difference| {d.max().item():.3g} at {list(i)} "
                             f"({a[i].item():.9g} vs {b[i].item():.9g}; tolerance {tol:.3g} = "
                             f"rtol {rtol:g} x (scale {scale:.3g} + 1e-3))")


# ---- helpers -----------------------------------------------------------------------------------

def _ir(op) -> ir.Op:
    return op if isinstance(op, ir.Op) else op.ir


def _externs(op, seed: int = 0):
    """The op's bound externs when all are bound, else random ones."""
    o = _ir(op)
    bound = getattr(op, "_externs", {}) or {}
    if o.externs and all(e.name in bound for e in o.externs):
        return dict(bound)
    return random_externs(o, seed)


def _untokenized(o: ir.Op) -> ir.Op:
    """The op with lifted shapes equal to per-token shapes (sequences are drawn per token)."""
    import dataclasses
    return dataclasses.replace(o, chunk=None) if o.chunk is not None else o


def _outs(y) -> tuple[torch.Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)

