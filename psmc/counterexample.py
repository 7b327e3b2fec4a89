"""Numeric law checks on reachable states: a random screen, Hypothesis search, readable failures.

States are *reachable*: inputs drawn in the declared `in [lo, hi]` ranges (defaults below), lifted,
and folded a few at a time, exactly what a scan can hand to `combine`. Everything is evaluated in
float64 with the reference `Evaluator`, so an op that is associative in exact arithmetic is not
refuted by float32 rounding; float fields are compared with a relative tolerance against the
field's scale (the largest magnitude that field takes among the states involved, inner combines
and both results), integer and bool fields exactly. A NaN on one side only is a failure; NaN on
both sides (an overflow, not a law) rejects the example.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import ir
from .semantics import Evaluator, State

# Where an input declares no range, property tests draw from these.
DEFAULT_FLOAT_RANGE = (-5.0, 5.0)
DEFAULT_INT_RANGE = (-50, 50)
# Relative tolerance of float fields (evaluated in float64), by the field's declared dtype.
RTOL = {"f16": 1e-9, "bf16": 1e-9, "f32": 1e-9, "f64": 1e-9, "i32": 0.0, "i64": 0.0, "bool": 0.0}

LAW_TEXT = {
    "associative": "associativity", "left_identity": "left identity",
    "right_identity": "right identity", "commutative": "commutativity",
}
# How many reachable states a law needs, and how many tokens each may fold (0 = the identity).
_ARITY = {"associative": 3, "commutative": 2, "left_identity": 1, "right_identity": 1}
_TOKENS = {"associative": (1, 3), "commutative": (1, 3), "left_identity": (0, 3),
           "right_identity": (0, 3)}
_TORCH = {"bool": torch.bool, "i32": torch.int64, "i64": torch.int64, "f16": torch.float16,
          "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}


def input_range(f: ir.InputField) -> tuple[float, float]:
    if f.range is None:
        return DEFAULT_INT_RANGE if ir.is_int(f.type.dtype) else DEFAULT_FLOAT_RANGE
    lo, hi = f.range
    dlo, dhi = DEFAULT_INT_RANGE if ir.is_int(f.type.dtype) else DEFAULT_FLOAT_RANGE
    if not math.isfinite(lo):
        lo = min(dlo, hi - (dhi - dlo))
    if not math.isfinite(hi):
        hi = max(dhi, lo + (dhi - dlo))
    if ir.is_int(f.type.dtype):
        return int(math.ceil(lo)), int(math.floor(hi))
    return float(lo), float(hi)


def _value_dtype(dtype: str) -> torch.dtype:
    return torch.float64 if ir.is_float(dtype) else torch.int64 if ir.is_int(dtype) else torch.bool


def round_to(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round float64 values to what the declared dtype can hold, kept in float64."""
    if ir.is_float(dtype) and dtype != "f64":
        return t.to(_TORCH[dtype]).to(torch.float64)
    return t


# ---- random externs ----------------------------------------------------------------------------

class RandomExtern(torch.nn.Module):
    """A small random net with an extern's declared shapes: tanh(W [args flattened] + b).

    `rows`: apply the net to each position of the leading axis separately (for chunked ops,
    whose chunk axis comes first: a position-wise net is causal within a chunk, which streaming
    needs, and still far from associative).
    """

    def __init__(self, ext: ir.Extern, generator: torch.Generator, rows: bool = False):
        super().__init__()
        self.ext = ext
        self.rows = ext.result.shape[0] if rows else 1
        n_in = sum(math.prod(a.shape) for a in ext.args) // self.rows
        n_out = math.prod(ext.result.shape) // self.rows
        self.weight = torch.nn.Parameter(
            torch.randn(n_out, n_in, generator=generator, dtype=torch.float64) / math.sqrt(max(n_in, 1)),
            requires_grad=False)
        self.bias = torch.nn.Parameter(0.1 * torch.randn(n_out, generator=generator, dtype=torch.float64),
                                       requires_grad=False)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        n, k = args[0].shape[0], self.rows
        x = torch.cat([a.reshape(n, k, math.prod(t.shape) // k).to(torch.float64)
                       for a, t in zip(args, self.ext.args)], dim=2)
        w, b = self.weight.to(x.device), self.bias.to(x.device)
        y = torch.tanh(x @ w.T + b).reshape((n,) + self.ext.result.shape)
        want = self.ext.result.dtype
        if ir.is_float(want):
            dtype = args[0].dtype if args[0].is_floating_point() else torch.float32
            return y.to(dtype)
        if want == "bool":
            return y > 0
        return torch.round(10 * y).to(torch.int64)


def random_externs(op: ir.Op, seed: int = 0) -> dict[str, RandomExtern]:
    """Random modules for every extern; position-wise along the chunk axis for chunked ops."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in op.externs:
        shapes = [a.shape for a in e.args] + [e.result.shape]
        rows = op.chunk is not None and all(s and s[0] == op.chunk for s in shapes)
        out[e.name] = RandomExtern(e, g, rows)
    return out


# ---- the numeric harness -----------------------------------------------------------------------

@dataclass
class Sample:
    """States given by their tokens: `tokens[k]` is state k's list of lifted-element inputs."""

    tokens: list[list[dict[str, torch.Tensor]]]


@dataclass
class LawEval:
    """One law evaluated on N samples."""

    states: State  # (N, m, *field)
    sides: tuple[State, State]  # (N, *field) each
    inner: list[State]  # intermediate combines, for scale and display
    fail: torch.Tensor  # (N,) bool
    reject: torch.Tensor  # (N,) bool
    diff: dict[str, torch.Tensor]  # (N,) max abs difference per field
    tol: dict[str, torch.Tensor]  # (N,) absolute tolerance per field


class Harness:
    """Lift, fold and combine in float64 on CPU with the reference evaluator."""

    def __init__(self, op: ir.Op, externs: Mapping[str, Callable] | None = None):
        self.op = op
        self.ev = Evaluator(op, torch.float64, "cpu", externs)
        self.fields = [f.name for f in op.state]

    def lifted_shape(self, f: ir.InputField) -> tuple[int, ...]:
        return self.op.lifted_input_type(f).shape

    def combine(self, a: State, b: State) -> State:
        batch = next(iter(a.values())).shape[: next(iter(a.values())).dim() - self.op.state[0].type.rank]
        return self.ev.run(self.op.combine, {"l": a, "r": b}, tuple(batch))

    def identity(self, batch: tuple[int, ...]) -> State:
        return {k: v.clone() for k, v in self.ev.identity(batch).items()}

    def fold(self, x: dict[str, torch.Tensor], counts: torch.Tensor) -> State:
        """x: inputs (B, K, *lifted); counts: (B,) in [0, K]. Left fold of the first counts[b]."""
        B, K = counts.shape[0], next(iter(x.values())).shape[1]
        if K == 0:
            return self.identity((B,))
        elems = self.ev.run(self.op.lift, {"x": x}, (B, K))
        acc = {k: v[:, 0] for k, v in elems.items()}
        for j in range(1, K):
            new = self.combine(acc, {k: v[:, j] for k, v in elems.items()})
            acc = {k: torch.where(_rows(counts > j, v), new[k], v) for k, v in acc.items()}
        e = self.identity((B,))
        return {k: torch.where(_rows(counts == 0, v), e[k], v) for k, v in acc.items()}

    def states(self, samples: list[Sample]) -> State:
        """(N, m, *field) reachable states from N samples of m token lists each."""
        N, m = len(samples), len(samples[0].tokens)
        K = max(1, max(len(t) for s in samples for t in s.tokens))
        counts = torch.tensor([len(t) for s in samples for t in s.tokens])
        x = {}
        for f in self.op.inputs:
            shape = self.lifted_shape(f)
            zero = torch.zeros(shape, dtype=_value_dtype(f.type.dtype))
            rows = [torch.stack([t[j][f.name] if j < len(t) else zero for j in range(K)])
                    for s in samples for t in s.tokens]
            x[f.name] = torch.stack(rows)
        st = self.fold(x, counts)
        return {k: v.reshape((N, m) + v.shape[1:]) for k, v in st.items()}

    def evaluate(self, law: str, states: State) -> LawEval:
        pick = lambda i: {k: v[:, i] for k, v in states.items()}  # noqa: E731
        N = next(iter(states.values())).shape[0]
        inner: list[State] = []
        if law == "associative":
            a, b, c = pick(0), pick(1), pick(2)
            both = self.combine(_cat(a, b), _cat(b, c))
            ab, bc = _split(both, N)
            sides = _split(self.combine(_cat(ab, a), _cat(c, bc)), N)
            inner = [ab, bc]
            parts = [a, b, c, ab, bc]
        elif law == "commutative":
            a, b = pick(0), pick(1)
            sides = _split(self.combine(_cat(a, b), _cat(b, a)), N)
            parts = [a, b]
        else:
            a = pick(0)
            e = self.identity((N,))
            got = self.combine(e, a) if law == "left_identity" else self.combine(a, e)
            sides = (got, a)
            parts = [a]
        fail, reject, diff, tol = self._compare(sides, parts)
        return LawEval(states, sides, inner, fail, reject, diff, tol)

    def _compare(self, sides: tuple[State, State], parts: list[State]):
        x, y = sides
        N = next(iter(x.values())).shape[0]
        fail = torch.zeros(N, dtype=torch.bool)
        reject = torch.zeros(N, dtype=torch.bool)
        for p in parts:  # an input state with NaN is not a law's fault (a bad lift)
            for v in p.values():
                if v.is_floating_point():
                    reject |= torch.isnan(v).reshape(N, -1).any(1)
        diff, tol = {}, {}
        for f in self.op.state:
            a, b = x[f.name].reshape(N, -1), y[f.name].reshape(N, -1)
            if not a.is_floating_point():
                d = (a != b).any(1).to(torch.float64)
                diff[f.name], tol[f.name] = d, torch.zeros(N, dtype=torch.float64)
                fail |= d > 0
                continue
            na, nb = torch.isnan(a), torch.isnan(b)
            reject |= (na & nb).any(1)
            same = (a == b) | (na & nb)
            d = torch.where(same, torch.zeros_like(a), (a - b).abs())
            d = torch.where(na ^ nb, torch.full_like(d, math.nan), d)
            dmax = torch.where(torch.isnan(d).any(1), torch.full((N,), math.nan, dtype=torch.float64),
                               d.amax(1) if d.shape[1] else torch.zeros(N, dtype=torch.float64))
            vals = [v[f.name].reshape(N, -1) for v in parts + [x, y]]
            mag = torch.stack([torch.where(torch.isfinite(v), v.abs(), torch.zeros_like(v)).amax(1)
                               if v.shape[1] else torch.zeros(N, dtype=torch.float64) for v in vals]).amax(0)
            t = RTOL[f.type.dtype] * mag
            diff[f.name], tol[f.name] = dmax, t
            fail |= torch.isnan(dmax) | (dmax > t)
        return fail & ~reject, reject, diff, tol


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape + (1,) * (like.dim() - 1))


def _cat(a: State, b: State) -> State:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _split(s: State, n: int) -> tuple[State, State]:
    return {k: v[:n] for k, v in s.items()}, {k: v[n:] for k, v in s.items()}


# ---- random inputs (the screen) ----------------------------------------------------------------

def random_tokens(op: ir.Op, shape: tuple[int, ...], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Inputs shaped (*shape, *lifted) drawn in the declared ranges; 10% of scalars at the ends."""
    out = {}
    for f in op.inputs:
        full = shape + op.lifted_input_type(f).shape
        lo, hi = input_range(f) if f.type.dtype != "bool" else (0, 1)
        if f.type.dtype == "bool":
            out[f.name] = torch.rand(full, generator=g) < 0.5
            continue
        if ir.is_int(f.type.dtype):
            v = torch.randint(int(lo), int(hi) + 1, full, generator=g)
        else:
            v = lo + (hi - lo) * torch.rand(full, generator=g, dtype=torch.float64)
            ends = torch.tensor([lo, hi, 0.0 if lo <= 0 <= hi else lo], dtype=torch.float64)
            special = torch.rand(full, generator=g) < 0.1
            v = torch.where(special, ends[torch.randint(0, 3, full, generator=g)], v)
            v = round_to(v, f.type.dtype)
        out[f.name] = v
    return out


def screen_samples(op: ir.Op, law: str, n: int, g: torch.Generator) -> list[Sample]:
    m = _ARITY[law]
    kmin, kmax = _TOKENS[law]
    x = random_tokens(op, (n, m, kmax), g)
    counts = torch.randint(kmin, kmax + 1, (n, m), generator=g)
    return [Sample([[{k: v[i, j, t] for k, v in x.items()} for t in range(int(counts[i, j]))]
                    for j in range(m)]) for i in range(n)]


# ---- counterexamples ---------------------------------------------------------------------------

@dataclass
class Counterexample:
    """A concrete failure of a law, in the op's own terms (fields, inputs)."""

    law: str
    op: str
    where: str  # file:line of the combine
    tokens: dict[str, list[dict[str, object]]]  # state name -> the inputs it folds
    states: dict[str, dict[str, object]]  # state name -> field -> value
    sides: dict[str, dict[str, object]]  # expression -> field -> value
    difference: dict[str, float]  # field -> max |lhs - rhs| (nan: NaN on one side only)
    tolerance: dict[str, float]  # field -> absolute tolerance used
    rtol: dict[str, float]
    found_by: str
    dtypes: dict[str, str] = field(default_factory=dict)

    @property
    def failing_fields(self) -> list[str]:
        return [k for k, d in self.difference.items() if not d <= self.tolerance[k]]

    def text(self) -> str:
        lines = [f"{LAW_TEXT[self.law]} fails for op {self.op} (combine at {self.where}; "
                 f"found by {self.found_by})"]
        for name, toks in self.tokens.items():
            if name == "e":
                continue
            lines.append(f"  {name} = {_describe_tokens(toks)}")
            lines.append(f"      {_fmt_state(self.states[name])}")
        for expr, st in self.sides.items():
            lines.append(f"  {expr}:")
            lines.append(f"      {_fmt_state(st)}")
        parts = []
        for k in self.failing_fields:
            d = self.difference[k]
            if math.isnan(d):
                parts.append(f"{k}: NaN on one side only")
            elif self.rtol[k]:
                scale = self.tolerance[k] / self.rtol[k]
                parts.append(f"{k}: max |difference| {_num(d)} (tolerance {_num(self.tolerance[k])} = rtol "
                             f"{self.rtol[k]:g} x scale {_num(scale)})")
            else:
                parts.append(f"{k}: max |difference| {_num(d)} (compared exactly)")
        lines.append("  difference: " + "; ".join(parts))
        return "\n".join(lines)

    __str__ = text

    def to_dict(self) -> dict:
        return _jsonable({
            "law": self.law, "op": self.op, "where": self.where, "found_by": self.found_by,
            "tokens": self.tokens, "states": self.states, "sides": self.sides,
            "difference": self.difference, "tolerance": self.tolerance, "rtol": self.rtol,
            "failing_fields": self.failing_fields, "text": self.text(),
        })


def side_names(law: str) -> tuple[str, str]:
    return {"associative": ("combine(combine(a, b), c)", "combine(a, combine(b, c))"),
            "commutative": ("combine(a, b)", "combine(b, a)"),
            "left_identity": ("combine(e, a)", "a"),
            "right_identity": ("combine(a, e)", "a")}[law]


def make_counterexample(h: Harness, law: str, sample: Sample, ev: LawEval, row: int,
                        found_by: str) -> Counterexample:
    op = h.op
    names = "abc"[: _ARITY[law]]
    states = {n: _to_py({k: v[row, i] for k, v in ev.states.items()}) for i, n in enumerate(names)}
    tokens = {n: [_to_py(t) for t in toks] for n, toks in zip(names, sample.tokens)}
    lhs, rhs = side_names(law)
    sides = {lhs: _to_py({k: v[row] for k, v in ev.sides[0].items()})}
    if rhs not in states:
        sides[rhs] = _to_py({k: v[row] for k, v in ev.sides[1].items()})
    return Counterexample(
        law=law, op=op.name, where=str(op.combine.loc), tokens=tokens, states=states, sides=sides,
        difference={k: float(v[row]) for k, v in ev.diff.items()},
        tolerance={k: float(v[row]) for k, v in ev.tol.items()},
        rtol={f.name: RTOL[f.type.dtype] for f in op.state}, found_by=found_by,
        dtypes={f.name: f.type.dtype for f in op.state})


def _to_py(st: Mapping[str, torch.Tensor]) -> dict[str, object]:
    out = {}
    for k, v in st.items():
        v = v.detach().cpu()
        out[k] = v.item() if v.dim() == 0 else v.tolist()
    return out


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _num(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"


def _flat(v) -> list:
    return [y for x in v for y in _flat(x)] if isinstance(v, list) else [v]


def _fmt_value(v) -> str:
    if not isinstance(v, list):
        return _num(v)
    flat = _flat(v)
    if len(flat) <= 16:
        def rec(x):
            return "[" + ", ".join(rec(y) for y in x) + "]" if isinstance(x, list) else _num(x)
        return rec(v)
    shape = []
    y = v
    while isinstance(y, list):
        shape.append(len(y))
        y = y[0] if y else None
    if all(x == flat[0] for x in flat):
        return f"<{'x'.join(map(str, shape))}, all {_num(flat[0])}>"
    finite = [abs(x) for x in flat if isinstance(x, (int, float)) and math.isfinite(x)]
    return (f"<{'x'.join(map(str, shape))}: first {', '.join(_num(x) for x in flat[:3])}, ..., "
            f"max |.| {_num(max(finite) if finite else float('nan'))}>")


def _fmt_state(st: Mapping[str, object]) -> str:
    return ", ".join(f"{k} = {_fmt_value(v)}" for k, v in st.items())


def _describe_tokens(toks: list[dict[str, object]]) -> str:
    if not toks:
        return "e (the identity)"
    lifts = [f"lift({', '.join(f'{k}={_fmt_value(v)}' for k, v in t.items())})" for t in toks]
    if len(lifts) == 1:
        return lifts[0]
    acc = lifts[0]
    for x in lifts[1:]:
        acc = f"combine({acc}, {x})"
    return acc


# ---- the searches ------------------------------------------------------------------------------

def check_identity_element(h: Harness, law: str) -> Counterexample | None:
    """combine(e, e) == e, exactly as IEEE arithmetic has it (exp(-inf - -inf) is NaN)."""
    sample = Sample([[]])
    ev = h.evaluate(law, h.states([sample]))
    if bool(ev.fail[0]):
        return make_counterexample(h, law, sample, ev, 0, "the identity element itself")
    return None


@dataclass
class SearchResult:
    counterexample: Counterexample | None = None
    examples: int = 0
    rejected: int = 0
    seconds: float = 0.0
    note: str | None = None


def screen(h: Harness, law: str, n: int, seed: int) -> SearchResult:
    """n random reachable samples, evaluated in one batch: fast, unshrunk."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed * 7919 + list(_ARITY).index(law))
    samples = screen_samples(h.op, law, n, g)
    ev = h.evaluate(law, h.states(samples))
    res = SearchResult(examples=n, rejected=int(ev.reject.sum()))
    bad = torch.nonzero(ev.fail).flatten()
    if len(bad):
        # the first failing sample with the fewest tokens reads best
        i = min(bad.tolist(), key=lambda r: (sum(len(t) for t in samples[r].tokens), r))
        res.counterexample = make_counterexample(h, law, samples[i], ev, i, f"random screen (seed {seed})")
    res.seconds = time.perf_counter() - t0
    return res


class _LawFailed(AssertionError):
    pass


def hypothesis_search(h: Harness, law: str, max_examples: int, seed: int,
                      progress: Callable[[int], None] | None = None) -> SearchResult:
    """Hypothesis over reachable states; the shrunk failing example, if any."""
    from hypothesis import HealthCheck, Phase, Verbosity, assume, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable

    from .testing import sample_strategy

    t0 = time.perf_counter()
    res = SearchResult()
    found: list[Counterexample] = []

    @hseed(seed)
    @settings(max_examples=max_examples, database=None, deadline=None, derandomize=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
              phases=(Phase.explicit, Phase.generate, Phase.shrink), verbosity=Verbosity.quiet,
              print_blob=False)
    @given(sample_strategy(h.op, law))
    def prop(sample: Sample):
        res.examples += 1
        if progress is not None:
            progress(res.examples)
        ev = h.evaluate(law, h.states([sample]))
        if bool(ev.reject[0]):
            res.rejected += 1
        assume(not bool(ev.reject[0]))
        if bool(ev.fail[0]):
            found.append(make_counterexample(h, law, sample, ev, 0, f"Hypothesis (seed {seed}, shrunk)"))
            raise _LawFailed(found[-1].text())

    try:
        prop()
    except _LawFailed:
        res.counterexample = found[-1]
    except Unsatisfiable:
        res.note = "every drawn example was rejected (NaN in the lifted states)"
    res.seconds = time.perf_counter() - t0
    return res
