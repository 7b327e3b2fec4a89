"""The scan kernel's alternative code paths under TRITON_INTERPRET, each against the reference:
lane-free factoring (lane_free.py), vector fields (`{p}_VEC`), the carry gathered from the last
token (GATHER_LAST), and the generator with its optimizations switched off (the benchmarks'
baseline). Inputs are float64, so the kernels agree with `op.reference` to ~1e-12.
"""

from __future__ import annotations

import pytest
import sympy as sp
import torch

import psmc
from psmc import cache, triton_backend
from psmc.codegen import lane_free, triton_scan
from psmc.codegen import scalarize as S
from psmc.codegen import triton as triton_codegen

from triton_cases import as_tuple, assert_close, draw, load

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TIGHT = dict(rtol=1e-9, atol=1e-9)

# Lane ops that exercise the factoring's corners: an integer lane-free state, a lane scalar with a
# constant gate (u), one with a lane-free bias (s: + r.d), an output mixing lane-free and lane
# state; and one whose lanes combine by max, which does not factor and takes the plain kernel.
LANE_OPS = """
op lanemix[D = 4] {
  expect associative
  input  g: f32 in [0.5, 1], v: f32[D], n: i32 in [0, 3]
  state  c: i64 = 0, d: f32 = 1, s: f32[D] = -1, u: f32[D] = 0
  lift(x)       { c = i64(x.n); d = x.g; s = x.v; u = x.v * x.g }
  combine(l, r) { c = l.c + r.c; d = l.d * r.d; s = r.d * l.s + r.s + r.d; u = l.u + r.u }
  output(s, x)  { y = s.s + s.u * s.d + f32(s.c) }
}
op lanecummax[D = 4] {
  expect associative
  input  a: f32, v: f32[D]
  state  m: f32 = -inf, o: f32[D] = -inf
  lift(x)       { m = x.a; o = x.v }
  combine(l, r) { m = max(l.m, r.m); o = max(l.o, r.o) }
  output(s, x)  { y = s.o - s.m }
}
"""


def lane_op(name: str) -> psmc.PsmOp:
    return psmc.compile_source(LANE_OPS, path="lane_ops.psm")[name]


def test_factoring_applies_where_the_lanes_combine_linearly():
    fac = lane_free.factor(S.scalarize(load("softmax_attn", D=4).ir))
    assert [s.name for s in fac.free] == ["m", "z"] and [s.name for s in fac.lanes] == ["o"]
    assert fac.biases == (0,) and len(fac.gates) == 1
    mix = lane_free.factor(S.scalarize(lane_op("lanemix").ir))
    assert [s.name for s in mix.free] == ["c", "d"] and [s.name for s in mix.lanes] == ["s", "u"]
    assert mix.gates == (S.sym("r_d"), sp.Integer(1)) and mix.biases == (S.sym("r_d"), 0)
    mlstm = lane_free.factor(S.scalarize(load("mlstm", K=3, V=5).ir))
    assert {s.field for s in mlstm.lanes} == {"C"} and len(mlstm.gates) == 1  # one gate, shared
    assert lane_free.factor(S.scalarize(lane_op("lanecummax").ir)) is None  # max is not linear
    assert lane_free.factor(S.scalarize(load("linrec").ir)) is None  # no lane dim


@pytest.mark.parametrize("name", ["lanemix", "lanecummax", "softmax_attn"])
@pytest.mark.parametrize("config", [(1, 4, 1), (4, 8, 1), (2, 4, 2)], ids=["1x4x1", "4x8x1", "2x4x2"])
def test_lane_ops_match_reference(name, config, monkeypatch):
    """T = 1 and 13 (partial blocks), batch (2, 3), from an initial state, returning the state."""
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", config)
    op = load("softmax_attn", D=4) if name == "softmax_attn" else lane_op(name)
    gen = torch.Generator().manual_seed(sum(config))
    for T in (1, 13):
        x = draw(op, (2, 3, T + 4), gen=gen)
        head = {k: v[:, :, :4] for k, v in x.items()}
        rest = {k: v[:, :, 4:] for k, v in x.items()}
        _, st0 = op.reference(**head, return_state=True)
        y, st = op(**rest, backend="triton", return_state=True, initial_state=st0)
        ref, ref_st = op.reference(**rest, return_state=True, initial_state=st0)
        assert_close(y, ref, what=f"{name} {config} T={T}", **TIGHT)
        for k, v in ref_st.prefix.items():
            assert_close(st.prefix[k], v, what=f"{name} {config} T={T} state {k}", **TIGHT)


def test_factored_two_pass_matches_reference(monkeypatch):
    """Chunk totals, then each chunk from the fold of those before it: the lane-free carries are
    narrowed to one value per program after the fold."""
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", (2, 4, 1))
    monkeypatch.setattr(triton_backend, "FORCE_CHUNK_T", 8)
    op = lane_op("lanemix")
    x = draw(op, (3, 29), gen=torch.Generator().manual_seed(5))
    y, st = op(**x, backend="triton", return_state=True)
    ref, ref_st = op.reference(**x, return_state=True)
    assert_close(y, ref, what="lanemix two passes", **TIGHT)
    for k, v in ref_st.prefix.items():
        assert_close(st.prefix[k], v, what=f"lanemix two passes state {k}", **TIGHT)


@pytest.mark.parametrize("name", ["softmax_attn", "lanemix"])
def test_factored_checkpoints_are_the_states_before_each_block(name):
    """What a backward recomputes from: the state before every block of BLOCK_T tokens."""
    op = load("softmax_attn", D=4) if name == "softmax_attn" else lane_op(name)
    mod = triton_backend.module(op.ir, interpret=True)
    x = draw(op, (3, 13), gen=torch.Generator().manual_seed(7))
    _, _, (ckpt, config) = getattr(mod, f"{name}_scan")(x, want_ckpt=True, config=(2, 4, 1))
    assert config == (2, 4, 1)
    for j, t in enumerate(range(0, 13, 4)):
        if t == 0:
            want = op.init_state((3,), dtype=torch.float64).prefix
        else:
            _, st = op.reference(**{k: v[:, :t] for k, v in x.items()}, return_state=True)
            want = st.prefix
        for k, v in want.items():
            assert_close(ckpt[k][:, j].to(v.dtype), v, what=f"{name} checkpoint {j} {k}", **TIGHT)


def test_vector_width_follows_the_strides():
    mod = triton_backend.module(load("affine").ir, interpret=True)
    f = {"name": "A", "shape": [2, 2], "dtype": "f32", "lane_axis": None}
    assert mod._psmc_vec(f, [0, 0, 4096 * 4, 4, 2, 1], None) == 4  # dense, token stride 4
    assert mod._psmc_vec(f, [0, 0, 4096 * 6, 6, 2, 1], None) == 2  # token stride 6: pairs
    assert mod._psmc_vec(f, [0, 0, 4096 * 4, 4, 1, 2], None) == 1  # transposed: not dense
    assert mod._psmc_vec(f, [0, 0, 4097 * 4 + 1, 4, 2, 1], None) == 1  # odd lane stride
    b = {"name": "b", "shape": [3], "dtype": "f32", "lane_axis": None}
    assert mod._psmc_vec(b, [0, 0, 30, 3, 1], None) == 1 and mod._psmc_vec(b, [0, 0, 32, 4, 1], None) == 2
    v = {"name": "v", "shape": [4, 64], "dtype": "f32", "lane_axis": 1}  # lane axis dropped
    assert mod._psmc_vec(v, [0, 0, 1, 256, 64], 64) == 1 and mod._psmc_vec(v, [0, 0, 4, 256, 1], 64) == 4


def test_vector_and_scalar_fields_match_reference(monkeypatch):
    """affine at N = 3 (A: 9 scalars, in vectors of 4, 4, 1): A inside rows of 12 and 14 scalars
    per token (VEC 4 and 2), contiguous (9 per token: no aligned vectors) and transposed (not
    dense): a load per scalar."""
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", (2, 4, 1))
    op = load("affine", N=3)
    mod = triton_backend.module(op.ir, interpret=True)
    x = draw(op, (3, 10), gen=torch.Generator().manual_seed(11))

    def padded(width):
        out = torch.zeros(3, 10, width, dtype=torch.float64)
        out[..., :9] = x["A"].reshape(3, 10, 9)
        return out[..., :9].unflatten(-1, (3, 3))
    cases = {"rows of 12": (padded(12), 4), "rows of 14": (padded(14), 2), "contiguous": (x["A"], 1),
             "transposed": (x["A"].transpose(-1, -2).contiguous().transpose(-1, -2), 1)}
    for what, (A, vec) in cases.items():
        y = op(A=A, b=x["b"], backend="triton")
        assert_close(y, op.reference(A=A, b=x["b"]), what=f"affine {what}", **TIGHT)
        plans = [p for k, p in mod._PSMC_PLANS.items() if k[1][0][1] == A.stride()]
        assert plans and plans[-1].launch.constexprs["in_A_VEC"] == vec, what
        consts = plans[-1].launch.constexprs
        assert consts["in_b_VEC"] == consts["out_y_VEC"] == 1  # 3 scalars a token


def test_carry_gathered_from_the_last_token(monkeypatch):
    """One lane in one warp gathers its carry (GATHER_LAST); other shapes sum it out."""
    op = load("rotation")
    mod = triton_backend.module(op.ir, interpret=True)
    x = draw(op, (2, 21), gen=torch.Generator().manual_seed(13))
    for config, gather in (((1, 8, 1), True), ((1, 8, 2), False), ((2, 8, 1), False)):
        monkeypatch.setattr(triton_backend, "FORCE_CONFIG", config)
        assert_close(op(**x, backend="triton"), op.reference(**x), what=f"rotation {config}", **TIGHT)
        plan = [p for k, p in mod._PSMC_PLANS.items() if k[0] is mod.rotation_scan_kernel and k[-2] == config][-1]
        assert plan.launch.constexprs["GATHER_LAST"] is gather


def test_pipelined_block_loop(monkeypatch):
    """A fourth config entry sets STAGES (the interpreter runs the same loop); a backward is
    handed the block shape alone."""
    op = load("linrec")
    mod = triton_backend.module(op.ir, interpret=True)
    x = draw(op, (2, 19), gen=torch.Generator().manual_seed(19))
    (y,), _, (_, config) = mod.linrec_scan(x, config=(1, 4, 1, 3), want_ckpt=True)
    assert config == (1, 4, 1)
    plans = [p for k, p in mod._PSMC_PLANS.items() if k[-2] == (1, 4, 1, 3)]  # key: (..., config, chunk_t)
    assert plans and plans[-1].stages == 3
    assert_close(y, op.reference(**x), what="linrec, 3 stages", **TIGHT)


def test_inline_ptx_only_where_triton_compiles():
    """_psmc_log's lg2.approx is inline PTX, which the interpreter cannot run."""
    op = load("logcumsumexp")
    assert triton_backend.module(op.ir, interpret=True)._PSMC_PTX.value is False
    assert triton_backend.module(op.ir, interpret=False)._PSMC_PTX.value is True


def test_generator_without_its_optimizations(tmp_path, monkeypatch):
    """FEATURES off (benchmarks/bench.py's baseline): a plain kernel for softmax_attn, exp and log
    through tl.exp / tl.log, no vector fields, and still the reference's results."""
    monkeypatch.setattr(triton_scan, "FEATURES", frozenset())
    op = load("softmax_attn", D=4)
    text = triton_codegen.generate_module(op.ir, psmc.__version__)
    kernels = text.split("def softmax_attn_combine")[1]  # after the shared prelude
    assert "_free_combine" not in kernels and "_VEC" not in kernels and "tl.exp(" in kernels
    path = tmp_path / "softmax_attn_plain.py"
    path.write_text(text)
    mod = cache.load(path, interpret=True)
    x = draw(op, (2, 9), gen=torch.Generator().manual_seed(17))
    (y,), _, _ = mod.softmax_attn_scan(x)
    assert_close(y, as_tuple(op.reference(**x))[0], what="softmax_attn, no optimizations", **TIGHT)
