"""The two-pass variant of strategy scan (chunk totals, then each chunk scanned from the fold of
the totals before it) under TRITON_INTERPRET, forced with tiny blocks and chunks, against the
reference path.

BLOCK_T = 4 and chunks of 8 tokens: T = 37 makes 5 chunks (the last one partial), and a fix-up
folds up to 4 earlier totals in tiles of BLOCK_C = 4, so the fold's own carry is used too.
"""

from __future__ import annotations

import pytest
import torch

from psmc import cache, triton_backend
from psmc.codegen import triton as triton_codegen

from triton_cases import SCAN_OPS, as_tuple, assert_close, draw, load, strided_linrec_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TIGHT = dict(rtol=1e-9, atol=1e-9)
CONFIG, CHUNK_T = (1, 4, 1), 8


def small(name: str):
    return load(name, D=4) if name == "softmax_attn" else load(name)


@pytest.fixture
def two_pass(monkeypatch):
    """Force tiny blocks and two passes over 8-token chunks; yields the grids launched."""
    monkeypatch.setattr(triton_backend, "FORCE_CONFIG", CONFIG)
    monkeypatch.setattr(triton_backend, "FORCE_CHUNK_T", CHUNK_T)
    return monkeypatch


def spy_grids(monkeypatch, mod) -> list:
    grids = []
    launch = mod._psmc_launch

    def spy(plan, *args):
        grids.append(plan.grid)
        return launch(plan, *args)
    monkeypatch.setattr(mod, "_psmc_launch", spy)
    return grids


def split_state(op, x, cut: int):
    """initial_state from the reference path on the first `cut` tokens, and the rest of x."""
    head = {k: v.narrow(1, 0, cut) for k, v in x.items()}
    rest = {k: v.narrow(1, cut, v.shape[1] - cut) for k, v in x.items()}
    _, st = op.reference(**head, return_state=True)
    return st, rest


@pytest.mark.parametrize("name", SCAN_OPS)
def test_two_pass_matches_reference(name, two_pass):
    """T = 1 (one chunk), 8 (one full chunk), 13 and 37 (partial last chunks), with or without
    initial_state, returning the state; T = 37 also without either; batch (2,)."""
    op = small(name)
    grids = spy_grids(two_pass, triton_backend.module(op.ir, interpret=True))
    gen = torch.Generator().manual_seed(len(name))
    for T, with_init in ((1, False), (8, True), (13, False), (37, True)):
        x = draw(op, (2, T + 5), gen=gen)
        st0, x = split_state(op, x, 5)
        init = st0 if with_init else None
        y, st = op(**x, backend="triton", return_state=True, initial_state=init)
        ref, ref_st = op.reference(**x, return_state=True, initial_state=init)
        what = f"{name} T={T} init={with_init}"
        assert_close(y, ref, what=f"{what} outputs", **TIGHT)
        for k, v in ref_st.prefix.items():
            assert_close(st.prefix[k], v, what=f"{what} final state {k}", **TIGHT)
    y = op(**x, backend="triton")  # no state in or out
    assert_close(y, op.reference(**x), what=f"{name} T={T} outputs only", **TIGHT)
    assert {g[1] for g in grids} == {1, 2, 5}  # chunks per lane: T = 1 and 8 run one pass


def _reverse_tiles(text: str, name: str) -> str:
    """Each tile of earlier totals scanned back to front."""
    return text.replace("k = k0 + ks", "k = k0 + (BLOCK_C - 1 - ks)")


def _init_last(text: str, name: str) -> str:
    """combine(totals, initial state) instead of combine(initial state, totals)."""
    good = next(line.strip() for line in text.splitlines()
                if f"= {name}_combine(c_" in line and ", p_" in line)
    lhs, call = good.split(" = ")
    args = call[call.index("(") + 1:-1].split(", ")
    half = len(args) // 2
    return text.replace(good, f"{lhs} = {name}_combine({', '.join(args[half:] + args[:half])})")


@pytest.mark.parametrize("name, mutate", [("affine", _reverse_tiles), ("affine", _init_last)],
                         ids=["affine-reversed", "affine-init-last"])
def test_a_fold_in_the_wrong_order_is_caught(name, mutate, two_pass, tmp_path):
    """Non-commutative ops: the generated fix-up with its fold order broken disagrees with the
    reference by O(1) where the intact one agrees, so the comparisons above do check the order."""
    op = small(name)
    path = cache.module_file(op.ir, "triton", lambda: triton_codegen.generate_module(op.ir, "test"))
    text = path.read_text()
    wrong = tmp_path / f"{name}_wrong_order.py"
    wrong.write_text(mutate(text, name))
    assert wrong.read_text() != text
    x = draw(op, (2, 42), gen=torch.Generator().manual_seed(3))
    st, x = split_state(op, x, 5)
    ref = as_tuple(op.reference(**x, initial_state=st))
    for mod, ok in ((triton_backend.module(op.ir, interpret=True), True),
                    (cache.load(wrong, interpret=True), False)):
        got, _, _ = getattr(mod, f"{name}_scan")(x, initial=st.prefix, config=CONFIG, chunk_t=CHUNK_T)
        err = max((g - r).abs().max().item() for g, r in zip(got, ref))
        assert err < 1e-9 if ok else err > 1e-3, (ok, err)


def test_strided_and_broadcast_inputs(two_pass):
    op = load("linrec")
    gen = torch.Generator().manual_seed(2)
    a, bs = strided_linrec_inputs(gen)
    for bb in bs:
        y, st = op(a=a, b=bb, backend="triton", return_state=True)
        ref, ref_st = op.reference(a=a, b=bb, return_state=True)
        assert_close(y, ref, what="linrec strided", **TIGHT)
        assert_close(st.prefix["h"], ref_st.prefix["h"], what="linrec strided final h", **TIGHT)
    sm = load("softmax_attn", D=4)
    x = draw(sm, (3, 21), gen=gen)
    x["v"] = x["v"].transpose(0, 1).contiguous().transpose(0, 1)  # lanes along D, not contiguous
    assert_close(sm(**x, backend="triton"), sm.reference(**x), what="softmax_attn lanes", **TIGHT)


def test_gradients_through_a_two_pass_forward(two_pass):
    """The backward reads the forward's per-block checkpoints; two passes write the same ones."""
    op = load("linrec")
    x = draw(op, (2, 29), gen=torch.Generator().manual_seed(4))
    w = torch.randn(2, 29, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grads(backend):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        y = op.reference(**leaves) if backend == "reference" else op(**leaves, backend=backend)
        (y * w).sum().backward()
        return {k: v.grad for k, v in leaves.items()}
    got, want = grads("triton"), grads("reference")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-9)


def test_low_precision_inputs(two_pass):
    op = load("linrec")
    x = draw(op, (3, 30), dtype=torch.bfloat16, gen=torch.Generator().manual_seed(6))
    y = op(**x, backend="triton")
    assert y.dtype == torch.bfloat16
    ref = op.reference(**{k: v.double() for k, v in x.items()})
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)


def test_chunking_rule():
    """Two passes when the one-pass grid leaves a GPU mostly idle and T is long; never else."""
    mod = triton_backend.module(load("linrec").ir, interpret=True)
    rule = mod._psmc_chunk_t
    T, block_t, sms = 1 << 20, 4096, 132
    chunk_t = rule(T, block_t, 16, sms)  # 16 sequences of 2^20 tokens on an H100
    chunks = -(-T // chunk_t)
    assert chunk_t % block_t == 0 and chunk_t >= 8 * block_t
    assert 16 * chunks >= 2 * sms and chunks <= mod._PSMC_MAX_CHUNKS
    assert rule(1 << 22, 4096, 4, sms) < 1 << 22
    assert rule(T, block_t, 2 * sms, sms) == T  # enough programs already
    assert rule(8 * block_t, block_t, 1, sms) == 8 * block_t  # too short for 2 chunks of 8 blocks
    assert rule(1, 128, 1, 1) == 1
    # forced: 0 is one pass, n rounds up to a multiple of BLOCK_T, a chunk of all of T is one pass
    assert rule(T, block_t, 1, sms, chunk_t=0) == T
    assert rule(37, 4, 600, sms, chunk_t=5) == 8
    assert rule(37, 4, 1, sms, chunk_t=64) == 37


@pytest.mark.parametrize("shape, two", [((1, 16, 1 << 20), True), ((2, 32, 1 << 18), True),
                                        ((1, 4, 1 << 22), True), ((8, 1536, 4096), False),
                                        ((1, 16, 4096), False)])
def test_plans_on_an_h100_sized_gpu(shape, two, monkeypatch):
    """What the launcher picks for linrec on 132 SMs (planned on meta tensors: no GPU needed)."""
    mod = triton_backend.module(load("linrec").ir, interpret=True)
    monkeypatch.setattr(mod, "_psmc_sms", lambda device: 132)
    xs = [torch.empty(shape, device="meta") for _ in range(2)]
    plan = mod._PsmcScanPlan(mod.linrec_scan_kernel, mod.linrec_chunk_totals_kernel, mod.LINREC_SPEC, xs,
                             None, True, False, torch.float32, torch.float32, None)
    programs, chunks = plan.grid
    assert (chunks > 1) == two and (plan.totals is not None) == two
    if two:
        assert programs * chunks >= 2 * 132 and chunks <= mod._PSMC_MAX_CHUNKS
        assert plan.totals[0][0] == shape[:2] + (chunks,)


@pytest.mark.parametrize("faster", ["one", "two"])
def test_autotune_times_one_pass_against_two(faster, monkeypatch):
    """Where the rule picks two passes, the GPU's first call also times one pass and keeps the
    faster (launches and timings faked: the choice is plain Python)."""
    import triton.testing

    mod = triton_backend.module(load("linrec").ir, interpret=True)
    monkeypatch.setattr(mod, "_psmc_sms", lambda device: 132)
    launched = []
    monkeypatch.setattr(mod, "_psmc_launch", lambda plan, *a: launched.append(plan))

    def fake_bench(fn, **kw):
        fn()
        two = launched[-1].totals is not None
        return 1.0 + (two == (faster == "one")) + launched[-1].config[1] / 1e6
    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    x = draw(load("linrec"), (1, 2048), dtype=torch.float32)
    first = mod._PsmcScanPlan(mod.linrec_scan_kernel, mod.linrec_chunk_totals_kernel, mod.LINREC_SPEC,
                              list(x.values()), None, False, False, torch.float32, torch.float32, None)
    best = mod._psmc_autotune(mod.linrec_scan_kernel, mod.linrec_chunk_totals_kernel, mod.LINREC_SPEC,
                              list(x.values()), None, False, False, torch.float32, torch.float32, first, None)
    assert {p.totals is not None for p in launched} == {True, False}
    assert (best.totals is not None) == (faster == "two")


@pytest.mark.parametrize("name, cap", [("linrec", 4096), ("cumsum", 4096), ("affine", 2048), ("rotation", 2048)])
def test_training_tiles_are_capped_by_the_backward(name, cap, monkeypatch):
    """With a backward to follow, the forward's blocks stay at most 2048 tokens, except for a narrow
    adjoint (<= 4 scalars), whose backward runs 16 elements a thread: 4096 is 8 warps there
    (planned on meta tensors for (8, 1536, 4096): no GPU needed)."""
    op = load(name)
    mod = triton_backend.module(op.ir, interpret=True)
    monkeypatch.setattr(mod, "_psmc_sms", lambda device: 132)
    spec = getattr(mod, f"{name.upper()}_SPEC")
    assert mod._psmc_training_cap(spec) == cap
    xs = [torch.empty((8, 1536, 4096) + tuple(f["shape"]), device="meta") for f in spec["inputs"]]
    kernels = getattr(mod, f"{name}_scan_kernel"), getattr(mod, f"{name}_chunk_totals_kernel")
    for want_ckpt, most in ((False, 4096), (True, cap)):
        plan = mod._PsmcScanPlan(*kernels, spec, xs, None, False, want_ckpt, torch.float32, torch.float32, None)
        assert plan.config[1] <= most
        if cap == 4096:  # the heuristic's tile for 4 scalars a token, no longer cut to 2048
            assert plan.config[1] == 4096
        layout = mod._PsmcLayout((8, 1536), spec["lane"], [(x, f, True) for x, f in zip(xs, spec["inputs"])])
        candidates = mod._psmc_scan_candidates(spec, layout, 4096, want_ckpt)
        assert candidates and all(c[1] <= most for c in candidates)
