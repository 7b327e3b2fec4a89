"""The `psmc` command: check, compile, emit, test, bench (DESIGN.md section 6).

Exit codes: 0 success, 1 an expectation or property fails, 2 bad input (a `.psm` error, a bad
flag). Errors in `.psm` files print compiler-style messages, never a Python traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .errors import PsmError


def parse_sets(values: list[str] | None) -> dict[str, int]:
    """`--set K=128 --set V=64` → {"K": 128, "V": 64}."""
    dims: dict[str, int] = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise PsmError(f"--set expects DIM=VALUE, got {item!r}", hint="e.g. --set K=128")
        try:
            dims[name.strip()] = int(value)
        except ValueError:
            raise PsmError(f"--set {name}: {value!r} is not an integer", hint="e.g. --set K=128") from None
    return dims


def load(path: str, dims: dict[str, int]):
    """Compile one file; `PsmError` on any problem with it."""
    from .api import compile_file

    return compile_file(path, **dims)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- commands ----------------------------------------------------------------------------------

def cmd_compile(args) -> int:
    dims = parse_sets(args.set)
    _check_sets_declared(args.files, dims)
    out = Path(args.output)
    ops = {}
    for path in args.files:  # check everything before writing anything
        for name, op in _load_for_dims(path, dims).items():
            if name in ops:
                raise PsmError(f"op '{name}' is declared in two of the files given", op.ir.loc,
                               "compile them into different folders, or rename one")
            ops[name] = op
    for name, op in ops.items():
        target = out / f"{name}.py"
        write_atomic(target, op.module_source())
        kind = "associative" if op.associative else "canonical tree"
        print(f"wrote {target}  ({kind}; inputs {', '.join(f.name for f in op.ir.inputs)})")
    return 0


def _load_for_dims(path: str, dims: dict[str, int]):
    """Apply only the --set values that this file's ops declare (several files, one flag set)."""
    from .api import load_ops
    from .parser import decode, parse

    data = _read(path)
    declared = {d.name for op in parse(decode(data, path)) for d in op.dims}
    mine = {k: v for k, v in dims.items() if k in declared}
    from .runtime import PsmOp

    return {op.name: PsmOp(op) for op in load_ops(data, path, **mine)}


def _check_sets_declared(paths: list[str], dims: dict[str, int]) -> None:
    from .parser import decode, parse

    declared = {d.name for p in paths for op in parse(decode(_read(p), p)) for d in op.dims}
    unknown = sorted(set(dims) - declared)
    if unknown:
        raise PsmError(f"--set {unknown[0]}: no op in the files given declares a dim '{unknown[0]}'",
                       hint=f"declared dims: {', '.join(sorted(declared)) or 'none'}")


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise PsmError(f"cannot read {path}: {e.strerror or e}", hint="check the path") from None


def cmd_emit(args) -> int:
    dims = parse_sets(args.set)
    _check_sets_declared([args.file], dims)
    ops = _load_for_dims(args.file, dims)
    op = _pick(ops, args.op, args.file)
    if args.target == "reference":
        from .codegen import torch_ref

        print(torch_ref.generate(op.ir), end="")
        return 0
    if args.target == "module":
        print(op.module_source(), end="")
        return 0
    text = _kernel_text(op, args.target)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


def _kernel_text(op, target: str) -> str:
    """Triton text of one op: scan/recurrent kernels (associative) or tree kernels."""
    if op.ir.externs:
        raise PsmError(f"op '{op.name}' calls externs: it runs on the torch level path, with no "
                       f"{target} kernels", op.ir.loc, "use --target reference or module")
    if op.associative:
        from .codegen import emit, triton

        why = triton.unsupported(op.ir)
        if why:
            raise PsmError(f"op '{op.name}' has no Triton code: {why}", op.ir.loc,
                           "it runs on the torch path; use --target reference or module")
        return emit(op.ir, target)
    from .codegen import tree

    why = tree.supported(op.ir)
    if why:
        raise PsmError(f"op '{op.name}' has no tree kernels: {why}", op.ir.loc,
                       "it runs on the torch path; use --target reference or module")
    if target == "stream":
        return (f"# {op.name}: non-associative; streaming is the binary counter of the canonical "
                f"tree,\n# run by the torch code (see --target module: `Counter` and `step`).\n")
    # forward and reverse (backward) kernels and their host code: the module's tree section
    return tree.generate_module_section(op.ir)


def _pick(ops: dict, name: str | None, path: str):
    if name is None:
        if len(ops) == 1:
            return next(iter(ops.values()))
        raise PsmError(f"{path} declares several ops ({', '.join(ops)})", hint="choose one with --op NAME")
    if name not in ops:
        raise PsmError(f"{path} has no op '{name}'", hint=f"ops in it: {', '.join(ops)}")
    return ops[name]


def cmd_check_basic(args) -> int:
    """Parse and type-check; the algebra checker (psmc.cli_check) replaces this when present."""
    dims = parse_sets(args.set)
    _check_sets_declared(args.files, dims)
    for path in args.files:
        for name, op in _load_for_dims(path, dims).items():
            print(f"{path}: op {name}: ok (expect {op.ir.expect or 'nothing'})")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    ops = _load_for_dims(args.file, parse_sets(args.set))
    return bench.run(_pick(ops, args.op, args.file), args)


# ---- the parser --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psmc", description="A compiler for prefix-scannable models (.psm files).")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"psmc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    try:
        from . import cli_check
    except ImportError:
        cli_check = None
    if cli_check is not None:
        cli_check.add_check_parser(sub)
    else:
        p = sub.add_parser("check", help="parse, type-check and report each op")
        p.add_argument("files", nargs="+", metavar="FILE")
        p.add_argument("--set", action="append", metavar="DIM=V", help="set a static dim")
        p.set_defaults(func=cmd_check_basic)

    p = sub.add_parser("compile", help="write one self-contained module per op")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for DIR/<op>.py")
    p.add_argument("--set", action="append", metavar="DIM=V", help="set a static dim, e.g. K=128")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("emit", help="print generated code")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--op", metavar="NAME", help="the op (needed when the file has several)")
    p.add_argument("--target", default="reference",
                   choices=["reference", "module", "triton", "backward", "stream"],
                   help="which code: reference (plain torch), module (the whole file), triton, "
                        "backward, stream")
    p.add_argument("--set", action="append", metavar="DIM=V", help="set a static dim")
    p.set_defaults(func=cmd_emit)

    if cli_check is not None:
        cli_check.add_test_parser(sub)

    p = sub.add_parser("bench", help="GPU timings against the reference path and the memory roofline")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--op", metavar="NAME")
    p.add_argument("--shape", default="8,4096", metavar="B,...,T",
                   help="batch dims then T, comma-separated (default 8,4096)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--set", action="append", metavar="DIM=V", help="set a static dim")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PsmError as err:
        print(err.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
