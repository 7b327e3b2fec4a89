"""The `psmc` command: compile writes importable, self-contained modules that agree with the
in-process ops; exit codes (DESIGN.md section 6); emit; --help of every subcommand."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import psmc
from psmc.cli import build_parser, main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import SMALL_DIMS, as_tuple, random_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.psm"))


def run_cli(*args, cwd=ROOT, **kw):
    return subprocess.run([sys.executable, "-m", "psmc.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kw)


def import_path(path: Path):
    spec = importlib.util.spec_from_file_location(f"generated_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def op_class(module):
    """The torch module class a generated file defines (it carries the op's SPEC)."""
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, torch.nn.Module) and getattr(v, "spec", None) is not None]
    assert len(classes) == 1
    return classes[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """`psmc compile examples/*.psm -o DIR`, run once as a user would."""
    out = tmp_path_factory.mktemp("build")
    r = run_cli("compile", *[p.relative_to(ROOT) for p in EXAMPLES], "-o", out)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return out, r


def test_compile_writes_one_module_per_op(compiled):
    out, r = compiled
    names = sorted(p.stem for p in out.glob("*.py"))
    assert names == sorted(p.stem for p in EXAMPLES)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    for name in names:
        assert f"{out / name}.py" in r.stdout


def test_generated_linrec_module_works(compiled):
    out, _ = compiled
    module = import_path(out / "linrec.py")
    gen = op_class(module)()
    ref_op = psmc.compile_file(ROOT / "examples" / "linrec.psm")["linrec"]
    g = torch.Generator().manual_seed(0)
    for batch, T in [((), 1), ((3,), 17), ((2, 3), 64)]:
        a = torch.rand(*batch, T, generator=g)
        b = torch.randn(*batch, T, generator=g)
        y = gen(a=a, b=b)
        torch.testing.assert_close(y, ref_op(a=a, b=b), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gen.reference(a=a, b=b), y, rtol=1e-5, atol=1e-6)
        # a hand-written loop: h_t = a_t h_{t-1} + b_t
        h = torch.zeros(batch)
        for t in range(T):
            h = a[..., t] * h + b[..., t]
            torch.testing.assert_close(y[..., t], h, rtol=1e-5, atol=1e-5)
        # streaming: init_state then step token by token
        st = gen.init_state(batch)
        for t in range(T):
            y_t, st = gen.step(st, a=a[..., t], b=b[..., t])
            torch.testing.assert_close(y_t, y[..., t], rtol=1e-5, atol=1e-6)
        # prefill + continue
        y1, st = gen(a=a[..., : T // 2], b=b[..., : T // 2], return_state=True)
        y2 = gen(a=a[..., T // 2:], b=b[..., T // 2:], initial_state=st)
        torch.testing.assert_close(torch.cat([y1, y2], -1), y, rtol=1e-5, atol=1e-6)


def test_every_generated_module_matches_psmc(compiled):
    out, _ = compiled
    for path in EXAMPLES:
        name = path.stem
        module = import_path(out / f"{name}.py")
        op = psmc.compile_file(path)[name]  # default dims, as compiled
        gen = op_class(module)()
        if op.ir.externs:
            C, D = op.ir.dim_values["C"], op.ir.dim_values["D"]
            W = torch.randn(D, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / D
            fns = dict(enc=lambda u: torch.tanh(u @ W.to(u.dtype)), agg=lambda a, b: torch.tanh(a + 0.5 * b),
                       inf=lambda h, u: h + u)
            op.bind(**fns)
            gen.bind(**fns)
        x = random_inputs(op, (2,), 11, dtype=torch.float64, seed=5)
        for want, got in zip(as_tuple(op(**x)), as_tuple(gen(**x))):
            assert got.dtype == want.dtype and got.shape == want.shape, name
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)
        for want, got in zip(as_tuple(op.reference(**x)), as_tuple(gen.reference(**x))):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)


def test_generated_module_needs_torch_only(compiled):
    """Import and run a generated module in a fresh interpreter where `import psmc` fails."""
    out, _ = compiled
    code = ("import sys; sys.modules['psmc'] = None\n"
            "import torch, linrec, nonassoc_mix\n"
            "op = linrec.Linrec(); y = op(a=torch.rand(2, 9), b=torch.randn(2, 9))\n"
            "assert y.shape == (2, 9)\n"
            "m = nonassoc_mix.NonassocMix(); z = m(u=torch.randn(5, 4))\n"
            "assert z.shape == (5, 4)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(out)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


# ---- exit codes ----

def test_compile_bad_input_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.psm"
    bad.write_text((ROOT / "examples" / "cumsum.psm").read_text().replace("l.s + r.s", "l.s + r.t"))
    r = run_cli("compile", ROOT / "examples" / "linrec.psm", bad, "-o", tmp_path / "out")
    assert r.returncode == 2
    assert f"{bad}:10:" in r.stderr and "error: the state has no field 't'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # everything is checked before anything is written


def test_exit_codes_in_process(tmp_path, capsys):
    linrec, gla = str(ROOT / "examples" / "linrec.psm"), str(ROOT / "examples" / "gla.psm")
    out = tmp_path / "out"
    assert main(["compile", linrec, "-o", str(out)]) == 0
    assert (out / "linrec.py").exists()
    # --set: an undeclared dim, a malformed flag, a non-integer, a non-positive value
    assert main(["compile", linrec, "-o", str(out), "--set", "K=4"]) == 2
    assert "no op in the files given declares a dim 'K'" in capsys.readouterr().err
    assert main(["compile", gla, "-o", str(out), "--set", "K"]) == 2
    assert "--set expects DIM=VALUE" in capsys.readouterr().err
    assert main(["compile", gla, "-o", str(out), "--set", "K=four"]) == 2
    assert "is not an integer" in capsys.readouterr().err
    assert main(["compile", gla, "-o", str(out), "--set", "K=0"]) == 2
    assert "must be a positive integer" in capsys.readouterr().err
    # the same op from two files
    assert main(["compile", linrec, linrec, "-o", str(out)]) == 2
    assert "declared in two of the files given" in capsys.readouterr().err
    # a missing file
    assert main(["compile", str(tmp_path / "nope.psm"), "-o", str(out)]) == 2
    assert "cannot read" in capsys.readouterr().err
    # emit: an unknown op, several ops without --op
    assert main(["emit", linrec, "--op", "nope"]) == 2
    assert "has no op 'nope'" in capsys.readouterr().err
    two = tmp_path / "two.psm"
    two.write_text(Path(linrec).read_text() + "\n" + Path(linrec).read_text().replace("op linrec", "op linrec2"))
    assert main(["emit", str(two)]) == 2
    assert "--op" in capsys.readouterr().err
    assert main(["emit", str(two), "--op", "linrec2"]) == 0
    assert "def combine(" in capsys.readouterr().out


def test_set_applies(tmp_path, capsys):
    gla = str(ROOT / "examples" / "gla.psm")
    out = tmp_path / "out"
    assert main(["compile", gla, "-o", str(out), "--set", "K=4", "--set", "V=3"]) == 0
    spec = import_path(out / "gla.py").SPEC
    shapes = {f.name: f.shape for f in spec.inputs + spec.state + spec.outputs}
    assert shapes == {"q": (4,), "k": (4,), "v": (3,), "gk": (4,), "d": (4,), "S": (4, 3), "o": (3,)}
    # only K set: V keeps its default; --set applies to the files that declare the dim
    assert main(["compile", gla, str(ROOT / "examples" / "linrec.psm"), "-o", str(out), "--set", "K=4"]) == 0
    spec = import_path(out / "gla.py").SPEC
    assert {f.name: f.shape for f in spec.state} == {"d": (4,), "S": (4, 64)}
    capsys.readouterr()
    # emit honours --set too
    assert main(["emit", gla, "--set", "K=5", "--target", "module"]) == 0
    assert "FieldSpec('q', 'f32', (5,))" in capsys.readouterr().out


def test_emit_reference(capsys):
    assert main(["emit", str(ROOT / "examples" / "linrec.psm"), "--target", "reference"]) == 0
    text = capsys.readouterr().out
    assert "def combine(" in text and "def lift(" in text and "def output(" in text
    assert "def identity(" in text
    compile(text, "<emitted>", "exec")  # valid Python
    # the default target is reference, and --op picks the op
    assert main(["emit", str(ROOT / "examples" / "cumsum.psm"), "--op", "cumsum"]) == 0
    assert "def combine(" in capsys.readouterr().out


def test_emit_through_the_command():
    r = run_cli("emit", "examples/softmax_attn.psm", "--target", "reference")
    assert r.returncode == 0, r.stderr
    assert "def combine(" in r.stdout


SUBCOMMANDS = sorted(next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices
                          and "compile" in a.choices).choices)


def test_every_subcommand_exists():
    assert {"check", "compile", "emit", "test", "bench"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: psmc {command}")


def test_top_level_help_and_usage_errors():
    r = run_cli("--help")
    assert r.returncode == 0 and "usage: psmc" in r.stdout
    for command in SUBCOMMANDS:
        assert command in r.stdout
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli("compile", "examples/linrec.psm")  # -o missing
    assert r.returncode == 2 and "-o" in r.stderr


@pytest.mark.parametrize("target", ["triton", "backward", "stream", "module"])
def test_emit_every_target_for_every_example(target, capsys):
    """Every example and target prints code (exit 0) or, for extern ops, a located error (exit 2)."""
    for path in sorted((ROOT / "examples").glob("*.psm")):
        code = main(["emit", str(path), "--target", target])
        out, err = capsys.readouterr()
        if path.stem == "tpsm" and target != "module":
            assert code == 2 and f"{path}:" in err and "error:" in err
        else:
            assert code == 0 and out.strip(), (path.name, err)
