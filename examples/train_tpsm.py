"""Train a Transformer-PSM on a toy task on the CPU, then generate with it token by token.

    python examples/train_tpsm.py            # about 10 s on a laptop CPU

The task: sequences of 64 tokens that repeat a random pattern of C = 8 tokens. After the first
chunk every next token is the one C positions back, which sits in an *earlier chunk*, so the model
can only get it right through the PSM state (the canonical-tree prefix of the chunk states, merged
by the learned aggregator). Training runs the parallel path: one batched call of each module per
tree level. Generation then feeds the first chunk and continues greedily with `op.step`, one token
at a time (the state is the binary counter: O(log n) chunk states), and checks two things: the
generated tokens continue the pattern, and the logits streamed token by token equal the logits of
one parallel call on the generated sequence.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import psmc
from psmc.nn import tpsm_modules

HERE = Path(__file__).resolve().parent


class TinyTPSM(nn.Module):
    """Embedding -> tpsm op (enc/agg/inf from psmc.nn) -> linear head."""

    def __init__(self, vocab: int, C: int, D: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, D)
        self.op = psmc.compile_file(HERE / "tpsm.psm", C=C, D=D)["tpsm"]
        self.op.bind(**tpsm_modules(C, D, heads=4))
        self.head = nn.Linear(D, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Parallel: tokens (B, T) -> logits (B, T, vocab)."""
        return self.head(self.op(u=self.embed(tokens)))

    def step(self, state, token: torch.Tensor):
        """Streaming: one token (B,) -> its logits (B, vocab) and the next state."""
        y, state = self.op.step(state, u=self.embed(token))
        return self.head(y), state


def batch(n: int, T: int, C: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    pattern = torch.randint(vocab, (n, C), generator=gen)
    return pattern.repeat(1, T // C)


def train(steps: int = 300, C: int = 8, D: int = 32, T: int = 64, vocab: int = 16, seed: int = 0,
          log=print) -> tuple[TinyTPSM, float]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyTPSM(vocab, C, D)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    loss_fn = nn.CrossEntropyLoss()
    acc = 0.0
    for it in range(1, steps + 1):
        x = batch(32, T, C, vocab, gen)
        logits = model(x[:, :-1])
        target = x[:, 1:]
        # predictable targets: token C onwards (the pattern's second copy), from position C - 1
        loss = loss_fn(logits[:, C - 1:].reshape(-1, vocab), target[:, C - 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 50 == 0 or it == steps:
            acc = (logits[:, C - 1:].argmax(-1) == target[:, C - 1:]).float().mean().item()
            log(f"step {it:4d}  loss {loss.item():.3f}  accuracy on predictable tokens {acc:.3f}")
    return model, acc


@torch.no_grad()
def generate(model: TinyTPSM, prompt: torch.Tensor, total: int):
    """Greedy generation with op.step; returns (tokens, streamed logits of every position)."""
    state = model.op.init_state(prompt.shape[:1])
    tokens, logits = [], []
    token = prompt[:, 0]
    for t in range(total - 1):
        out, state = model.step(state, token)
        logits.append(out)
        tokens.append(token)
        token = prompt[:, t + 1] if t + 1 < prompt.shape[1] else out.argmax(-1)
    tokens.append(token)
    return torch.stack(tokens, 1), torch.stack(logits, 1), state


def main(argv=None) -> int:
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=250)
    args = ap.parse_args(argv)
    C, T, vocab = 8, 64, 16
    t0 = time.time()
    model, acc = train(args.steps, C=C, T=T, vocab=vocab)
    print(f"trained in {time.time() - t0:.1f} s (parallel path: one call per tree level)")

    model.eval()
    gen = torch.Generator().manual_seed(123)
    seqs = batch(8, T, C, vocab, gen)
    tokens, streamed, state = generate(model, seqs[:, :C], T)
    with torch.no_grad():
        parallel = model(tokens[:, :-1])
    diff = (streamed - parallel).abs().max().item()
    correct = (tokens[:, C:] == seqs[:, C:]).float().mean().item()
    print(f"generated {T - C} tokens per sequence with op.step; pattern continued correctly: "
          f"{correct:.3f}")
    print(f"streamed logits vs one parallel call: max |difference| = {diff:.2e}")
    print(f"stream state after {state.tokens} tokens: {state.counter.count} chunk elements, "
          f"{state.states_held()} chunk states held, {next(iter(state.pending.values())).shape[1]} "
          "tokens pending" if state.pending else
          f"stream state after {state.tokens} tokens: {state.counter.count} chunk elements, "
          f"{state.states_held()} chunk states held")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
