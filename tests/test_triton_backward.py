"""The derived backward (reverse-scan kernels) under TRITON_INTERPRET, against torch autograd
through `op.reference` in float64.

`backend="triton"` refuses (PsmCallError) a call whose gradients the derived kernels do not cover,
so every gradient compared here came from them, not from the torch path.
"""

from __future__ import annotations

import pytest
import torch

import psmc
from psmc import triton_backend
from psmc.errors import PsmCallError

from triton_cases import as_tuple, draw, grads_from_state, load

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Every associative example whose adjoint fits the reverse-scan kernel.
BACKWARD_OPS = ["linrec", "cumsum", "cummax", "logcumsumexp", "rotation", "affine"]


def grads(op, x, backend, weights=None, final_weight=False):
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
    if backend == "reference":
        y, st = op.reference(**leaves, return_state=True)
    else:
        y, st = op(**leaves, backend=backend, return_state=True)
    y = [o for o in as_tuple(y) if o.is_floating_point()]
    if weights is None:
        gen = torch.Generator().manual_seed(7)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in y]
    loss = sum((o * w).sum() for o, w in zip(y, weights))
    if final_weight:
        loss = loss + sum((v * (i + 1.5)).sum() for i, v in enumerate(st.prefix.values())
                          if v.is_floating_point())
    loss.backward()
    return {k: v.grad for k, v in leaves.items() if v.is_floating_point()}, weights


def check(op, x, final_weight=False):
    got, w = grads(op, x, "triton", final_weight=final_weight)
    want, _ = grads(op, x, "reference", w, final_weight=final_weight)
    for k in want:
        assert got[k].shape == x[k].shape and got[k].dtype == x[k].dtype
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("name", BACKWARD_OPS)
@pytest.mark.parametrize("T", [1, 7, 100])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=["b", "b3", "b2x3"])
def test_gradients_match_autograd_through_the_reference(name, T, batch):
    op = load(name)
    check(op, draw(op, batch + (T,), gen=torch.Generator().manual_seed(T + len(batch))))


@pytest.mark.parametrize("name", BACKWARD_OPS)
def test_many_blocks_carry_the_adjoint_across_blocks(name, monkeypatch):
    """BLOCK_T = 8 over T = 45: six blocks, checkpoints and the reverse carry all used."""
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", (2, 8, 1))
    op = load(name)
    check(op, draw(op, (3, 45), gen=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("name", ["linrec", "logcumsumexp", "affine"])
def test_gradient_through_the_final_state(name, monkeypatch):
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", (1, 16, 1))
    op = load(name)
    check(op, draw(op, (2, 40), gen=torch.Generator().manual_seed(10)), final_weight=True)


def test_broadcast_inputs_get_summed_gradients():
    op = load("linrec")
    gen = torch.Generator().manual_seed(11)
    x = {"a": torch.rand(1, 30, dtype=torch.float64, generator=gen),
         "b": torch.randn(4, 30, dtype=torch.float64, generator=gen)}
    check(op, x)


def test_low_precision_gradients_come_back_in_the_input_dtype():
    op = load("linrec")
    x = draw(op, (2, 20), dtype=torch.bfloat16)
    got, w = grads(op, x, "triton")
    want, _ = grads(op, {k: v.double() for k, v in x.items()}, "reference",
                    [v.double() for v in w])
    for k in want:
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k].double(), want[k], rtol=3e-2, atol=3e-2)


def test_ops_without_a_derived_backward_say_so_or_fall_back(monkeypatch):
    """Where the backward cannot be derived (here: as if), backend="triton" says why, and the
    default backend takes the torch path, autograd included."""
    monkeypatch.setattr(triton_backend, "_backward_why_not_op", lambda op: "a reason")
    op = load("linrec")
    x = {k: v.requires_grad_() for k, v in draw(op, (2, 5)).items()}
    with pytest.raises(PsmCallError, match="cannot run this call: a reason"):
        op(**x, backend="triton")
    op(**x).sum().backward()
    torch.testing.assert_close(x["b"].grad[:, -1], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("name, dims, field", [("logcumsumexp", {}, "x"), ("softmax_attn", dict(D=4), "score")])
def test_ties_with_the_running_max(name, dims, field):
    """Tokens equal to the running max (repeated tokens; common in f16 and bf16). max splits its
    derivative there, 1/2 each, and the max-stabilized exponentials must follow: the kernels print
    exp(P - max(P, Q)) as where(P >= Q, 1, exp(-|P - Q|)), whose own derivative at P = Q is 0,
    so the backward differentiates the expressions as written (autograd through the reference
    agrees with finite differences here: the outputs are smooth in the scores)."""
    op = load(name, **dims)
    x = draw(op, (2, 12), gen=torch.Generator().manual_seed(24))
    for t in (3, 4, 9):
        x[field][:, t] = x[field][:, :t].max(dim=1).values
    check(op, x)


# A float input whose gradient does not flow through the (integer) state: no adjoint to scan.
GATED = """
op gated {
  expect associative
  input  x: f32, c: i32 in [0, 3]
  state  n: i64 = 0
  lift(x)       { n = i64(x.c) }
  combine(l, r) { n = l.n + r.n }
  output(s, x)  { y = x.x * f32(s.n) }
}
"""


def test_gradients_that_bypass_an_integer_state():
    op = psmc.compile_source(GATED)["gated"]
    mod = triton_backend.module(op.ir, interpret=True)
    assert mod.GATED_SPEC["backward"]["scalars"] == 0  # no adjoint scan
    check(op, draw(op, (2, 9), gen=torch.Generator().manual_seed(20)))


# ---- ops whose adjoint is wide (s5) or gathers over lanes (softmax_attn, gla, mlstm) ----------

# s5: 150 adjoint scalars, five rows of 5 sharing their 25 coefficients. The others carry their
# lane-free adjoints as per-lane shares. Small dims: the interpreter scans element by element.
WIDE_OPS = [("s5", {}), ("softmax_attn", dict(D=4)), ("gla", dict(K=4, V=4)), ("mlstm", dict(K=3, V=4))]
WIDE_IDS = [n for n, _ in WIDE_OPS]


@pytest.mark.parametrize("name, dims", WIDE_OPS[:3], ids=WIDE_IDS[:3])
@pytest.mark.parametrize("batch, T", [((), 1), ((3,), 7), ((), 33)], ids=["b-1", "b3-7", "b-33"])
def test_wide_and_lane_gathering_gradients(name, dims, batch, T):
    op = load(name, **dims)
    check(op, draw(op, batch + (T,), gen=torch.Generator().manual_seed(T)))


def test_kernel_specs_carry_lane_shares_where_the_adjoint_gathers():
    specs = {n: getattr(triton_backend.module(load(n, **d).ir, interpret=True), f"{n.upper()}_SPEC")
             for n, d in WIDE_OPS}
    assert specs["s5"]["backward"]["partial"] == []
    assert specs["softmax_attn"]["backward"]["partial"] == ["score"]
    assert specs["gla"]["backward"]["partial"] == ["q", "k", "gk"]
    assert specs["mlstm"]["backward"]["partial"] == ["q", "k", "i", "f"]


def test_s5_gradients_of_transposed_and_time_strided_inputs():
    """s5 is not commutative: a transposed P (non-contiguous field axes) and every other token."""
    op = load("s5")
    gen = torch.Generator().manual_seed(14)
    P = (torch.rand(1, 14, 5, 5, dtype=torch.float64, generator=gen) * 0.4).transpose(-1, -2)[:, ::2]
    assert not P.is_contiguous()
    check(op, {"P": P})


def test_softmax_attn_gradients_of_strided_broadcast_and_masked_inputs():
    """Lanes not contiguous (v laid out (D, T, B)), a score shared over a batch axis, and -inf
    scores (masked tokens; not the first, whose output would be 0 / 0)."""
    op = load("softmax_attn", D=4)
    gen = torch.Generator().manual_seed(15)
    v = torch.randn(4, 11, 3, dtype=torch.float64, generator=gen).permute(2, 1, 0)
    score = torch.randn(1, 11, dtype=torch.float64, generator=gen)
    score[:, 3] = score[:, 7] = float("-inf")
    check(op, {"score": score, "v": v})


def test_lane_shares_with_batch_axes_that_do_not_fold():
    """Three batch axes that no stride merges: the launcher copies, and the lane dim stays whole."""
    op = load("softmax_attn", D=4)
    gen = torch.Generator().manual_seed(16)
    x = {"score": torch.randn(2, 2, 2, 4, dtype=torch.float64, generator=gen).permute(1, 0, 2, 3),
         "v": torch.randn(2, 2, 2, 4, 4, dtype=torch.float64, generator=gen).transpose(0, 2)}
    check(op, x)


@pytest.mark.parametrize("name, dims, dtype", [("s5", {}, torch.float16), ("softmax_attn", dict(D=4), torch.bfloat16)])
def test_wide_low_precision_gradients(name, dims, dtype):
    op = load(name, **dims)
    x = draw(op, (2, 12), dtype=dtype, gen=torch.Generator().manual_seed(17))
    got, w = grads(op, x, "triton")
    want, _ = grads(op, {k: v.double() for k, v in x.items()}, "reference", [v.double() for v in w])
    for k in want:
        assert got[k].dtype == dtype
        torch.testing.assert_close(got[k].double(), want[k], rtol=3e-2, atol=3e-2)


# 24 scalars of state, a 48-scalar final-state adjoint of 24 independent pairs: two packed scans.
WIDE_LINREC = """
op wide {
  expect associative
  input  a: f32[12] in [0, 1], b: f32[12]
  state  g: f32[12] = 1, h: f32[12] = 0
  lift(x)       { g = x.a; h = x.b }
  combine(l, r) { g = l.g * r.g; h = r.g * l.h + r.h }
  output(s, x)  { y = s.h }
}
"""


def test_independent_adjoints_packed_into_several_scans(monkeypatch):
    from psmc.codegen import adjoint, scalarize, triton_adjoint

    op = psmc.compile_source(WIDE_LINREC)["wide"]
    plan = triton_adjoint.scans(adjoint.derive(scalarize.scalarize(op.ir), final_grads=True))
    assert [sum(len(g) for g in scan) for scan in plan] == [16, 8]
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", (2, 8, 1))
    check(op, draw(op, (1, 9), gen=torch.Generator().manual_seed(18)), final_weight=True)


# ---- the initial state ------------------------------------------------------------------------

INIT_OPS = [("linrec", {})] + WIDE_OPS


@pytest.mark.parametrize("name, dims", INIT_OPS, ids=[n for n, _ in INIT_OPS])
def test_gradients_of_the_initial_state(name, dims, monkeypatch):
    """A call that continues a stream: gradients of the inputs, of the state it starts from and
    of the final state, over several blocks of T (BLOCK_T = 8) and, for lane dims of 4, two blocks
    of lanes whose shares the launcher adds."""
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", (2, 8, 1))
    op = load(name, **dims)
    batch = (1,) if name == "s5" else (2,)  # s5 is slow to interpret; its final-state kernel is the same
    _, st = op.reference(**draw(op, batch + (4,), gen=torch.Generator().manual_seed(22)), return_state=True)
    x = draw(op, batch + (13,), gen=torch.Generator().manual_seed(23))
    for final in (True,) if name == "s5" else (False, True):
        got = grads_from_state(op, x, st, "triton", final)
        want = grads_from_state(op, x, st, "reference", final)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("strategy", ["scan", "recurrent"])
def test_gradients_of_the_initial_state_of_an_empty_call(strategy, monkeypatch):
    """T = 0: the final state is the initial one, and so are their gradients."""
    monkeypatch.setattr(triton_backend, "FORCE_STRATEGY", strategy)
    op = load("gla", K=4, V=8)
    _, st = op.reference(**draw(op, (3, 2)), return_state=True)
    x = draw(op, (3, 0))
    got = grads_from_state(op, x, st, "triton", final_weight=True)
    want = grads_from_state(op, x, st, "reference", final_weight=True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
