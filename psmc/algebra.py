"""The checker: is `combine` associative, is `e` a left and right identity, is it commutative.

Each law ends in one of three verdicts (DESIGN.md section 3):

- **proved**: sympy reduces `lhs - rhs` to zero on every scalar component (`psmc.symbolic`), at
  the declared dims or, for large states, at small ones (`Verdict.dims` says which);
- **refuted**: a concrete counterexample on reachable states (`psmc.counterexample`);
- **untested-by-proof**: no proof (none found, or the time budget ran out: never "proved" on a
  timeout) and no counterexample in the random screen plus N Hypothesis examples.

Order of work, cheapest first: the identity element against itself (`exp(-inf - -inf)` is NaN),
a batched random screen of every law, then proofs in forked processes under a wall-clock budget
while Hypothesis shrinks what the screen refuted, then Hypothesis on whatever is neither proved
nor refuted. Ops with `extern`s are only tested, with random weights, and their associativity is
never reported as holding: it depends on the weights a user binds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from . import ir
from .counterexample import (
    LAW_TEXT, RTOL, Counterexample, Harness, SearchResult, check_identity_element, hypothesis_search,
    input_range, random_externs, screen,
)
from .errors import PsmError
from .symbolic import LAWS, LawProof, ProofJob, shrink_dims

DEFAULT_MAX_EXAMPLES = 100
DEFAULT_TIME_BUDGET = 5.0
SCREEN_SIZE = 128


@dataclass
class LawResult:
    """One law: `status` is proved | refuted | untested-by-proof | unknown."""

    law: str
    status: str
    method: str | None  # "proof" | "tests" | None
    seconds: float = 0.0
    examples: int = 0  # random screen + Hypothesis examples run
    proof: LawProof | None = None
    counterexample: Counterexample | None = None
    note: str | None = None

    @property
    def holds(self) -> bool | None:
        return {"proved": True, "refuted": False, "untested-by-proof": True}.get(self.status)

    def to_dict(self) -> dict:
        return {
            "law": self.law, "status": self.status, "holds": self.holds, "method": self.method,
            "seconds": round(self.seconds, 4), "examples": self.examples,
            "proof": None if self.proof is None else {
                "status": self.proof.status, "step": self.proof.step, "note": self.proof.note,
                "seconds": round(self.proof.seconds, 4)},
            "counterexample": None if self.counterexample is None else self.counterexample.to_dict(),
            "note": self.note,
        }


@dataclass
class Verdict:
    """The checker's result for one op (`op.verdict`)."""

    op: str
    associative: bool | None  # None: unknown (extern ops, or nothing could be tested)
    method: str | None  # how `associative` was decided: "proof" | "tests"
    left_identity: bool | None
    right_identity: bool | None
    commutative: bool | None
    counterexample: Counterexample | None  # the first failing law's, associativity first
    dims: dict[str, int] | None  # the dims the proofs hold for (None: no dims / no proof)
    declared_dims: dict[str, int]
    tolerance: dict[str, str]  # per state field: how float64 results were compared
    timings: dict[str, float]
    laws: dict[str, LawResult]
    seed: int = 0
    max_examples: int = DEFAULT_MAX_EXAMPLES
    time_budget: float = DEFAULT_TIME_BUDGET
    externs: bool = False
    expect: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def proved(self) -> bool:
        return self.associative is True and self.method == "proof"

    @property
    def status(self) -> str:
        return self.laws["associative"].status

    def expectations(self) -> tuple[list[str], list[str]]:
        """(errors, warnings) against the op's `expect` line and the identity it declares.

        Messages are one line; the counterexamples are in `laws[...]` and in `report()`.
        """
        errors, warnings = [], []
        a = self.laws["associative"]
        if self.expect == "associative":
            if a.status == "refuted":
                errors.append(f"op {self.op} declares `expect associative` but associativity is "
                              f"refuted (counterexample above)")
            elif self.associative is None:
                warnings.append(f"op {self.op} declares `expect associative`, which the checker "
                                f"cannot confirm: {a.note or 'no verdict'}")
        elif self.expect == "nonassociative" and a.status in ("proved", "untested-by-proof"):
            how = "proved" if a.status == "proved" else "no counterexample found"
            warnings.append(
                f"op {self.op} is associative ({how}) but declares `expect nonassociative`, which "
                f"gives up the associative paths (any-bracketing scan/recurrent kernels, one-state "
                f"streaming) for the slower canonical tree")
        for law in ("left_identity", "right_identity"):
            if self.laws[law].status != "refuted":
                continue
            msg = f"op {self.op}: the declared identity is not a {LAW_TEXT[law]} (counterexample above)"
            if not self.externs:
                errors.append(msg)
            elif self.expect == "associative":
                warnings.append(msg + " with random extern weights; check it with your modules")
        return errors, warnings

    def to_dict(self) -> dict:
        errors, warnings = self.expectations()
        return {
            "op": self.op, "expect": self.expect, "associative": self.associative,
            "method": self.method, "status": self.status, "left_identity": self.left_identity,
            "right_identity": self.right_identity, "commutative": self.commutative,
            "dims": self.dims, "declared_dims": self.declared_dims, "tolerance": self.tolerance,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "seed": self.seed, "max_examples": self.max_examples, "time_budget": self.time_budget,
            "externs": self.externs, "notes": self.notes,
            "laws": {k: v.to_dict() for k, v in self.laws.items()},
            "counterexample": None if self.counterexample is None else self.counterexample.to_dict(),
            "errors": errors, "warnings": warnings,
        }

    def table(self) -> str:
        rows = [("law", "verdict", "method", "time")]
        for law in ("associative", "left_identity", "right_identity", "commutative"):
            r = self.laws[law]
            rows.append((LAW_TEXT[law], r.status, r.method or "-", f"{r.seconds:.2f}s"))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows)

    def details(self) -> list[str]:
        out = []
        if self.dims is not None and self.dims != self.declared_dims:
            used = ", ".join(f"{k}={v}" for k, v in self.dims.items())
            decl = ", ".join(f"{k}={v}" for k, v in self.declared_dims.items())
            out.append(f"proofs expand the state at {used} (declared {decl}); tests run at {decl}")
        elif self.dims:
            out.append("proofs hold for " + ", ".join(f"{k}={v}" for k, v in self.dims.items()))
        if any(r.status == "proved" for r in self.laws.values()):
            out.append("proofs: exact real arithmetic on finite state values; the identity "
                       "element against itself is checked in IEEE arithmetic")
        for law in LAWS:
            r = self.laws[law]
            if r.note and not (law == "commutative" and r.status == "refuted"):
                out.append(f"{LAW_TEXT[law]}: {r.note}")
        out.extend(self.notes)
        tol = sorted(set(self.tolerance.values()))
        out.append("tolerance: " + "; ".join(
            f"{', '.join(k for k, v in self.tolerance.items() if v == t)}: {t}" for t in tol))
        return out

    def report(self) -> str:
        """The table, then details and the counterexamples of failing laws."""
        lines = [self.table()]
        lines += ["  " + d for d in self.details()]
        for law in ("associative", "left_identity", "right_identity"):
            r = self.laws[law]
            if r.counterexample is not None:
                lines.append(_indent(r.counterexample.text()))
        return "\n".join(lines)


def _indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line for line in text.splitlines())


# ---- the check ---------------------------------------------------------------------------------

def check_op(op, *, max_examples: int = DEFAULT_MAX_EXAMPLES, seed: int = 0,
             time_budget: float = DEFAULT_TIME_BUDGET, screen_size: int = SCREEN_SIZE,
             externs: Mapping[str, Callable] | None = None,
             progress: Callable[[str], None] | None = None) -> Verdict:
    """Decide the laws of one op (a `PsmOp` or an `ir.Op`); see the module docstring.

    max_examples: Hypothesis examples per law that is neither proved nor refuted.
    seed: makes the screen and Hypothesis deterministic.
    time_budget: wall-clock seconds for all symbolic proofs of this op together.
    externs: modules to test extern ops with (default: random ones seeded by `seed`).
    """
    o: ir.Op = op if isinstance(op, ir.Op) else op.ir
    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    has_externs = bool(o.externs)
    h = Harness(o, externs if externs is not None else random_externs(o, seed))
    found: dict[str, Counterexample] = {}
    tested: dict[str, int] = {law: 0 for law in LAWS}
    test_time: dict[str, float] = {law: 0.0 for law in LAWS}
    notes: list[str] = []

    def record(law: str, res: SearchResult) -> None:
        tested[law] += res.examples
        test_time[law] += res.seconds
        if res.counterexample is not None:
            found[law] = res.counterexample
        if res.note:
            notes.append(f"{LAW_TEXT[law]}: {res.note}")

    # 1. the identity element against itself, exactly
    for law in ("left_identity", "right_identity"):
        t0 = time.perf_counter()
        cx = check_identity_element(h, law)
        test_time[law] += time.perf_counter() - t0
        tested[law] += 1
        if cx is not None:
            found[law] = cx
    # 2. a batched random screen of every law (fewer samples for large states)
    scalars = sum(math.prod(f.type.shape) for f in o.state) + sum(
        math.prod(o.lifted_input_type(f).shape) for f in o.inputs)
    n_screen = max(16, min(screen_size, 200_000 // scalars))
    say(f"{o.name}: random screen")
    for law in LAWS:
        if law not in found:
            record(law, screen(h, law, n_screen, seed))
    # 3. proofs, in a forked process under the budget, of what the screen did not refute
    proof_op, proof_dims, dims_note = (None, None, None) if has_externs else _proof_op(o)
    if dims_note:
        notes.append(dims_note)
    order = ("left_identity", "right_identity", "associative", "commutative")  # information last
    to_prove = tuple(law for law in order if law not in found) if proof_op is not None else ()
    t_proof = time.perf_counter()
    job = ProofJob(proof_op, to_prove, time_budget) if to_prove else None
    if to_prove:
        say(f"{o.name}: proving {', '.join(LAW_TEXT[x] for x in to_prove)}")
    # 4. meanwhile, shrink what the screen refuted (commutativity is information: left unshrunk)
    for law in ("associative", "left_identity", "right_identity"):
        if law in found and found[law].found_by.startswith("random screen"):
            say(f"{o.name}: shrinking the {LAW_TEXT[law]} counterexample")
            res = hypothesis_search(h, law, max_examples, seed, _ticker(say, o.name, law, max_examples))
            if res.counterexample is None:
                res.counterexample = found[law]  # keep the screen's, unshrunk
            record(law, res)
    proofs: dict[str, LawProof] = job.wait() if job is not None else {}
    proof_time = time.perf_counter() - t_proof
    # 5. Hypothesis on every law neither proved nor refuted
    for law in LAWS:
        if law in found or (law in proofs and proofs[law].status == "proved"):
            continue
        n = max_examples if law != "commutative" else max(10, max_examples // 4)  # information
        say(f"{o.name}: testing {LAW_TEXT[law]}")
        record(law, hypothesis_search(h, law, n, seed, _ticker(say, o.name, law, n)))

    laws = {law: _law_result(law, proofs.get(law), found.get(law), tested[law], test_time[law],
                             has_externs, time_budget) for law in LAWS}
    a = laws["associative"]
    associative = a.holds
    if has_externs and associative:
        associative = None
        a.note = ("externs: tested with random weights only; associativity depends on the "
                  "modules bound, so it is not assumed")
    method = a.method
    cx = next((laws[k].counterexample for k in ("associative", "left_identity", "right_identity")
               if laws[k].counterexample is not None), None)
    tolerance = {f.name: (f"rtol {RTOL[f.type.dtype]:g} x field scale ({f.type.dtype}, evaluated in f64)"
                          if ir.is_float(f.type.dtype) else f"exact ({f.type.dtype})") for f in o.state}
    ranges = ", ".join(f"{f.name} in [{_g(input_range(f)[0])}, {_g(input_range(f)[1])}]"
                       + ("" if f.range else " (default)") for f in o.inputs if f.type.dtype != "bool")
    if ranges:
        notes.append(f"inputs drawn with {ranges}; states fold 1-3 lifted elements")
    if has_externs:
        notes.append("externs bound to " + ("the given modules" if externs is not None else
                                            f"random tanh(linear) modules (seed {seed})"))
    return Verdict(
        op=o.name, associative=associative, method=method,
        left_identity=laws["left_identity"].holds, right_identity=laws["right_identity"].holds,
        commutative=laws["commutative"].holds, counterexample=cx,
        dims=proof_dims if any(laws[k].status == "proved" for k in LAWS) else None,
        declared_dims=dict(o.dims), tolerance=tolerance,
        timings={"proof": proof_time, "tests": sum(test_time.values()),
                 "total": time.perf_counter() - t_start},
        laws=laws, seed=seed, max_examples=max_examples, time_budget=time_budget,
        externs=has_externs, expect=o.expect, notes=notes)


def _law_result(law: str, proof: LawProof | None, cx: Counterexample | None, examples: int,
                seconds: float, has_externs: bool, budget: float) -> LawResult:
    pt = proof.seconds if proof is not None else 0.0
    if cx is not None:
        note = None
        if proof is not None and proof.status == "proved":
            note = ("the symbolic proof (exact real arithmetic, finite values) disagrees with this "
                    "float64 counterexample: check for overflow or division by zero")
        return LawResult(law, "refuted", "tests", seconds + pt, examples, proof, cx, note)
    if proof is not None and proof.status == "proved":
        return LawResult(law, "proved", "proof", seconds + pt, examples, proof,
                         note=None)
    if has_externs:
        return LawResult(law, "untested-by-proof", "tests", seconds, examples, None,
                         note="externs: random weights, never proved")
    if examples == 0:
        return LawResult(law, "unknown", None, seconds + pt, 0, proof, note="nothing could be tested")
    why = {"timeout": f"proof timed out after {budget:g} s, fell back to tests",
           "not-proved": "no proof found" + (f" ({proof.note})" if proof and proof.note else ""),
           "unsupported": f"not provable symbolically ({proof.note if proof else ''})"}
    note = why.get(proof.status if proof else "", "no proof attempted")
    return LawResult(law, "untested-by-proof", "tests", seconds + pt, examples, proof,
                     note=f"{note}; no counterexample in {examples} examples")


def _proof_op(o: ir.Op) -> tuple[ir.Op | None, dict[str, int] | None, str | None]:
    """The op to prove at: itself, or re-checked at small dims when its state is large."""
    small = shrink_dims(o)
    if small is None:
        return o, dict(o.dims) or None, None
    from .api import load_ops

    for size in (2, 3):
        dims = {k: min(v, size) for k, v in o.dims}
        try:
            again = [x for x in load_ops(o.source.text, o.source.path, **dims) if x.name == o.name]
        except PsmError:
            continue
        if again:
            return again[0], dims, None
    n = sum(math.prod(f.type.shape) for f in o.state)
    return None, None, f"no proof attempted: {n} state scalars and the op does not type-check at small dims"


def _g(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _ticker(say: Callable[[str], None], name: str, law: str, total: int) -> Callable[[int], None]:
    last = [0.0]

    def tick(n: int) -> None:
        now = time.monotonic()
        if now - last[0] > 0.5:
            last[0] = now
            say(f"{name}: testing {LAW_TEXT[law]} ({n}/{total} examples)")
    return tick
