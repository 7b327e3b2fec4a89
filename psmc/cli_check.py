"""`psmc check` and `psmc test`: the checker's report and the property tests, from the shell.

`psmc/cli.py` registers these on its subcommand parser (`add_check_parser`, `add_test_parser`);
each handler returns the exit code: 0 all expectations hold / all tests pass, 1 one fails,
2 bad input (a `.psm` error is printed compiler-style on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import PsmError


def add_check_parser(subparsers) -> argparse.ArgumentParser:
    from .algebra import DEFAULT_MAX_EXAMPLES, DEFAULT_TIME_BUDGET

    p = subparsers.add_parser(
        "check", help="prove or refute associativity and the identity of each op",
        description="For each op: is combine associative, is the declared state a left and right "
                    "identity, is combine commutative (information). Exit 0 when every `expect` "
                    "holds and every identity holds, 1 when one fails, 2 on bad input.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--op", metavar="NAME", help="check only this op")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-examples", type=_positive_int, default=DEFAULT_MAX_EXAMPLES, metavar="N",
                   help=f"Hypothesis examples per unproved law (default {DEFAULT_MAX_EXAMPLES})")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET, metavar="SEC",
                   help=f"wall-clock seconds for the proofs of one op (default {DEFAULT_TIME_BUDGET:g})")
    p.add_argument("--set", action="append", metavar="DIM=V", help="set a static dim, e.g. K=128")
    p.set_defaults(func=_guarded(cmd_check))
    return p


def add_test_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "test", help="property tests of the compiled ops: laws, duality, gradients",
        description="For each op: the laws it relies on (psmc.testing.check_laws) and every path "
                    "against the reference, streaming and prefill+step, gradients "
                    "(psmc.testing.check_duality). Extern ops get random modules. Exit 0 all pass, "
                    "1 one fails, 2 bad input.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--op", metavar="NAME", help="test only this op")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where duality runs")
    p.add_argument("--max-examples", type=_positive_int, default=50, metavar="N",
                   help="Hypothesis examples per property (default 50)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--backend", action="append", choices=["torch", "triton"], metavar="NAME",
                   help="compare only this parallel path with the reference (repeatable; "
                        "default: every available one)")
    p.add_argument("--set", action="append", metavar="DIM=V", help="set a static dim, e.g. K=128")
    p.set_defaults(func=_guarded(cmd_test))
    return p


# ---- psmc check --------------------------------------------------------------------------------

def cmd_check(args) -> int:
    from .algebra import check_op

    ops = _load_all(args.files, args.set, args.op)
    t0 = time.perf_counter()
    results, n_err, n_warn = [], 0, 0
    progress = _Progress(sys.stderr, quiet=False)
    for path, op in ops:
        progress.start(op.name)
        v = check_op(op, max_examples=args.max_examples, seed=args.seed,
                     time_budget=args.time_budget, progress=progress)
        progress.done()
        op._verdict = v  # later uses of op.verdict in this process reuse it
        errors, warnings = v.expectations()
        n_err += bool(errors)
        n_warn += len(warnings)
        results.append((path, op, v, errors, warnings))
        if not args.json:
            print(_text(path, op, v, errors, warnings), flush=True)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({
            "ok": n_err == 0, "seconds": round(seconds, 3), "seed": args.seed,
            "max_examples": args.max_examples,
            "ops": [dict(file=path, **v.to_dict()) for path, _, v, _, _ in results],
        }, indent=2, allow_nan=False))
    else:
        print(f"{len(results)} op{'s' * (len(results) != 1)} checked in {seconds:.1f} s: "
              f"{n_err} failing, {n_warn} warning{'s' * (n_warn != 1)}")
    return 1 if n_err else 0


def _text(path: str, op, v, errors: list[str], warnings: list[str]) -> str:
    a = v.laws["associative"]
    summary = {"proved": "associative (proved)", "refuted": "not associative (refuted)",
               "untested-by-proof": "associative by tests (untested by proof)",
               "unknown": "associativity unknown"}[a.status]
    if v.externs and a.status != "refuted":
        summary = "associativity not decided (externs: random weights only)"
    expect = f"expect {v.expect}" if v.expect else "no expect"
    path_kind = "associative paths" if op.associative else "canonical tree"
    lines = [f"{path}: op {v.op} ({expect}) -> {summary}; runs as {path_kind}"
             f" [{v.timings['total']:.2f} s]", v.report()]
    lines += ["  error: " + e for e in errors]
    lines += ["  warning: " + w for w in warnings]
    return "\n".join(lines) + "\n"


# ---- psmc test ---------------------------------------------------------------------------------

def cmd_test(args) -> int:
    import torch

    from . import testing

    if args.device == "cuda" and not torch.cuda.is_available():
        raise PsmError("--device cuda: CUDA is not available here", hint="use --device cpu")
    ops = _load_all(args.files, args.set, args.op)
    t_all = time.perf_counter()
    failed = 0
    progress = _Progress(sys.stderr, quiet=False)
    for path, op in ops:
        note = ""
        if op.ir.externs:
            op.bind(**testing.random_externs(op.ir, args.seed))
            op.to(args.device)
            note = " (externs: random modules)"
        checks = (
            ("laws", lambda: testing.check_laws(op, max_examples=args.max_examples, seed=args.seed)),
            ("duality", lambda: testing.check_duality(
                op, max_examples=max(1, args.max_examples // 2), seed=args.seed, device=args.device,
                backends=args.backend)),
        )
        for what, run in checks:
            progress.start(f"{op.name}: {what}")
            t0 = time.perf_counter()
            try:
                run()
                status, detail = "PASS", ""
            except AssertionError as e:
                status, detail = "FAIL", "\n" + "\n".join("    " + x for x in str(e).splitlines())
                failed += 1
            except Exception as e:  # a path that crashes fails its test; the others still run
                msg = f"{type(e).__name__}: {e}"
                status, detail = "FAIL", "\n" + "\n".join("    " + x for x in msg.splitlines()[:20])
                failed += 1
            progress.done()
            print(f"{status}  {path}: op {op.name} {what}{note} [{time.perf_counter() - t0:.2f} s]{detail}",
                  flush=True)
    print(f"{len(ops) * 2 - failed} passed, {failed} failed in {time.perf_counter() - t_all:.1f} s")
    return 1 if failed else 0


# ---- shared ------------------------------------------------------------------------------------

def _guarded(cmd):
    """Bad input exits 2 with the compiler-style message on stderr, never a traceback."""
    def run(args) -> int:
        try:
            return cmd(args)
        except PsmError as err:
            print(err.render(), file=sys.stderr)
            return 2
    run.__name__ = cmd.__name__
    run.__doc__ = cmd.__doc__
    return run


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _load_all(paths: list[str], sets: list[str] | None, only: str | None):
    """Every op of every file, [(path, PsmOp)], all loaded before any is checked.

    `--set` applies to the files whose ops declare the dim; a dim no file declares is an error.
    """
    from .api import load_ops
    from .parser import decode, parse
    from .runtime import PsmOp

    from .cli import parse_sets  # one parser of --set for every subcommand

    dims = parse_sets(sets)
    out, declared_any = [], set()
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise PsmError(f"cannot read {path}: {e.strerror or e}", hint="check the path") from None
        declared = {d.name for op in parse(decode(data, path)) for d in op.dims}
        declared_any |= declared
        mine = {k: v for k, v in dims.items() if k in declared}
        out += [(path, PsmOp(op)) for op in load_ops(data, path, **mine)]
    unknown = sorted(set(dims) - declared_any)
    if unknown:
        raise PsmError(f"--set {unknown[0]}: no op in the files given declares a dim '{unknown[0]}'",
                       hint=f"declared dims: {', '.join(sorted(declared_any)) or 'none'}")
    if only is not None:
        names = [op.name for _, op in out]
        out = [(p, op) for p, op in out if op.name == only]
        if not out:
            raise PsmError(f"no op named '{only}' in the files given", hint=f"ops: {', '.join(names)}")
    return out


class _Progress:
    """Progress on stderr for long searches: a live line on a terminal, else a line every 2 s."""

    def __init__(self, stream, quiet: bool = False, after: float = 1.0):
        self.stream, self.quiet, self.after = stream, quiet, after
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = self.last = 0.0
        self.shown = False

    def start(self, what: str) -> None:
        self.t0 = self.last = time.monotonic()
        self.shown = False
        self(what)

    def __call__(self, msg: str) -> None:
        now = time.monotonic()
        if self.quiet or now - self.t0 < self.after:
            return
        if self.tty:
            self.stream.write("\r\033[K" + msg[:100])
            self.stream.flush()
            self.shown = True
        elif now - self.last >= 2.0:
            self.last = now
            self.stream.write(f"... {msg} ({now - self.t0:.0f} s)\n")
            self.stream.flush()

    def done(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
