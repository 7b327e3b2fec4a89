"""The derived backward (reverse-scan kernels) under TRITON_INTERPRET, against torch autograd
through `op.reference` in float64."""

from __future__ import annotations

import pytest
import torch

from psmc import triton_backend
from psmc.errors import PsmCallError

from triton_cases import as_tuple, draw, load

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


def test_ops_without_a_derived_backward_say_so_or_fall_back():
    op = load("s5")
    x = {k: v.requires_grad_() for k, v in draw(op, (2, 5)).items()}
    with pytest.raises(PsmCallError, match="derived backward"):
        op(**x, backend="triton")
    y = op(**x)  # auto on CPU: the torch path, with autograd
    y.sum().backward()
    assert x["P"].grad is not None


@pytest.mark.parametrize("name", ["linrec", "cummax", "rotation", "affine"])
def test_states_read_from_outputs_equal_recomputed_states(name):
    """Where outputs are states (y = s.h), the backward reads them instead of recomputing."""
    op = load(name)
    mod = triton_backend.module(op.ir, interpret=True)
    spec = getattr(mod, f"{name.upper()}_SPEC")
    assert spec["backward"]["saved"], spec["backward"]
    x = draw(op, (2, 30), gen=torch.Generator().manual_seed(12))
    outs, _, saved = getattr(mod, f"{name}_scan")(x, want_ckpt=True, config=(2, 8, 1))
    names = [f["name"] for f in spec["outputs"]]
    gy = {n: torch.randn_like(o) for n, o in zip(names, outs)}
    back = getattr(mod, f"{name}_backward")
    from_outputs = back(x, gy, saved, outputs=dict(zip(names, outs)))
    recomputed = back(x, gy, saved)
    for k in recomputed:
        torch.testing.assert_close(from_outputs[k], recomputed[k], rtol=1e-12, atol=1e-12)


def test_outputs_that_are_not_states_mean_recomputation():
    mod = triton_backend.module(load("logcumsumexp").ir, interpret=True)
    assert mod.LOGCUMSUMEXP_SPEC["backward"]["saved"] is None
