"""torch.compile(fullgraph=True) traces a model that calls a psm op, forward and backward."""

from __future__ import annotations

import torch

from helpers import example_op


class _Model(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.7, -1.3, 0.4]))
        self.op = op

    def forward(self, x):
        a = torch.sigmoid(x * self.w[0])
        b = x * self.w[1] + self.w[2]
        return (self.op(a=a, b=b) ** 2).sum()


def test_fullgraph_compile_matches_eager_forward_and_backward():
    model = _Model(example_op("linrec"))
    x = torch.randn(3, 37)
    eager = model(x)
    eager.backward()
    grad_eager = model.w.grad.clone()
    model.w.grad = None
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(model.w.grad, grad_eager, rtol=1e-4, atol=1e-6)
