"""Streaming decode: Transformer-PSM `op.step` per-token time vs a KV-cache attention decoder.

    python benchmarks/bench_decode.py [--out DIR]           # CUDA; prints a table, writes decode.json
    python benchmarks/bench_decode.py --plot-only DIR        # redraw DIR/tree_decode.png from the JSONs

For each prefix length N the stream state comes from one parallel prefill (`return_state=True`);
then K = 64 tokens are decoded one at a time, and the wall time of the whole window (the GPU
synchronized once at its end) over K is the per-token time; the median of R windows decoded from
the same state is reported, the rounds interleaving all N (a warm-up round first). Windows start
at N = 2^k, so every window does the same chunk merges.

Transformer-PSM: examples/tpsm.psm with psmc.nn (C = 16, D = 64, 4 heads, one block each for
enc/agg/inf), state = binary counter of chunk states: per token one enc, one agg and one inf call
on <= 2C vectors, whatever N is. KV cache: one pre-norm decoder block of the same width whose
attention reads all N cached keys and values per token (F.scaled_dot_product_attention), so its
time grows with N once reading the cache outweighs the launches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class KVDecoder(nn.Module):
    """One pre-norm transformer block decoding against a preallocated KV cache."""

    def __init__(self, D: int, heads: int):
        super().__init__()
        self.h = heads
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def step(self, x, K, V, n):
        """x: (B, D) token; K, V: (B, H, capacity, D/H), n tokens cached. Returns y, n + 1."""
        B, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, 3, self.h, D // self.h).unbind(1)
        K[:, :, n] = k
        V[:, :, n] = v
        a = F.scaled_dot_product_attention(q[:, :, None], K[:, :, :n + 1], V[:, :, :n + 1])
        x = x + self.proj(a.reshape(B, D))
        return x + self.mlp(self.norm2(x)), n + 1


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def window(step, K: int, R: int, warm: bool = True) -> float:
    """Median over R windows of the per-token wall time of K decode steps, in microseconds."""
    if warm:
        step(K)  # warm-up: allocator, kernels, caches
    sync()
    times = []
    for _ in range(R):
        t0 = time.perf_counter()
        step(K)
        sync()
        times.append((time.perf_counter() - t0) / K * 1e6)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--plot-only", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--logn", default="10,11,12,13,14,15,16,17")
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--R", type=int, default=7)
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(Path(args.plot_only))
        return 0
    import psmc
    from psmc.nn import tpsm_modules

    dev = torch.device(args.device)
    B, C, D, H, K = args.B, 16, 64, 4, args.K
    torch.manual_seed(0)
    op = psmc.compile_file(ROOT / "examples/tpsm.psm", C=C, D=D)["tpsm"]
    op.bind(**tpsm_modules(C, D, heads=H)).to(dev).eval()
    kv = KVDecoder(D, H).to(dev).eval()
    toks = torch.randn(K, B, D, device=dev)
    Ns = [1 << int(k) for k in args.logn.split(",")]
    states, caches, prefill_ms = {}, {}, {}
    for N in Ns:  # one parallel prefill per N (the level path), one KV cache per N
        u = torch.randn(B, N, D, device=dev)
        sync()
        t0 = time.perf_counter()
        _, states[N] = op(u=u, return_state=True)
        sync()
        prefill_ms[N] = (time.perf_counter() - t0) * 1e3
        del u
        caches[N] = (torch.randn(B, H, N + K, D // H, device=dev), torch.randn(B, H, N + K, D // H, device=dev))

    def tpsm_steps(N):
        def run(k):
            st = states[N]
            for t in range(k):
                _, st = op.step(st, u=toks[t])
            return st
        return run

    def kv_steps(N):
        Kc, Vc = caches[N]

        def run(k):
            n = N
            for t in range(k):
                _, n = kv.step(toks[t], Kc, Vc, n)
        return run

    # Rounds interleave the N values, so drifting clocks or a busy host spread over all of them.
    samples = {N: {"tpsm": [], "kv": []} for N in Ns}
    for rnd in range(args.R + 1):
        for N in Ns:
            for what, fn in (("tpsm", tpsm_steps(N)), ("kv", kv_steps(N))):
                t = window(fn, K, 1, warm=False)
                if rnd:  # round 0 warms up
                    samples[N][what].append(t)
    rows = []
    for N in Ns:
        held = tpsm_steps(N)(K).states_held()
        row = {"N": N, "tpsm_us_per_token": statistics.median(samples[N]["tpsm"]),
               "kv_us_per_token": statistics.median(samples[N]["kv"]),
               "tpsm_samples": samples[N]["tpsm"], "kv_samples": samples[N]["kv"],
               "tpsm_states_held": held, "prefill_ms": prefill_ms[N],
               "kv_cache_MB": 2 * B * (N + K) * D * 4 / 1e6}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": __import__("triton").__version__, "B": B, "C": C, "D": D, "heads": H, "K": K,
            "R": args.R}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    first, last = rows[0], rows[-1]
    print(f"\n{meta}")
    print("| N | Transformer-PSM step (us/token) | states held | KV-cache decode (us/token) | KV cache MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| 2^{r['N'].bit_length() - 1} | {r['tpsm_us_per_token']:.0f} | {r['tpsm_states_held']} | "
              f"{r['kv_us_per_token']:.0f} | {r['kv_cache_MB']:.0f} |")
    print(f"ratio N=2^{last['N'].bit_length() - 1} / N=2^{first['N'].bit_length() - 1}: "
          f"tpsm {last['tpsm_us_per_token'] / first['tpsm_us_per_token']:.3f} (median), "
          f"{min(last['tpsm_samples']) / min(first['tpsm_samples']):.3f} (best of {args.R}); "
          f"kv {last['kv_us_per_token'] / first['kv_us_per_token']:.3f}")
    try:
        plot(out)
    except ImportError as e:
        print(f"no plot: {e}")
    return 0


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = json.loads((out / "decode.json").read_text())
    tree = json.loads((out / "tree.json").read_text()) if (out / "tree.json").exists() else None
    fig, axes = plt.subplots(1, 2 if tree else 1, figsize=(11 if tree else 5.5, 4))
    axes = axes if tree else [axes]
    ax = axes[0]
    Ns = [r["N"] for r in dec["rows"]]
    ax.plot(Ns, [r["tpsm_us_per_token"] for r in dec["rows"]], "o-", label="Transformer-PSM op.step (median)")
    if "tpsm_samples" in dec["rows"][0]:
        ax.plot(Ns, [min(r["tpsm_samples"]) for r in dec["rows"]], "o--", color="C0", alpha=0.6,
                label=f"Transformer-PSM op.step (best of {dec['meta']['R']})")
    ax.plot(Ns, [r["kv_us_per_token"] for r in dec["rows"]], "s-", label="KV-cache attention decode")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens already in the stream (N)")
    ax.set_ylabel("us per decoded token")
    ax.set_title(f"decode, B={dec['meta']['B']}, D={dec['meta']['D']}, {dec['meta']['device']}", fontsize=9)
    ax.legend()
    if tree:  # bench_tree.py's tree.json: the default lanes configuration's kernels against the scan's
        ax = axes[1]
        rows = [r for r in tree["rows"] if r.get("tree_graph_us") and r.get("psmc_scan_graph_us")]
        name = tree["meta"]["default"]
        labels = [f"{r['B']}x{r['T']}" for r in rows]
        xs = list(range(len(rows)))
        w = 0.38
        scan = [r["psmc_scan_graph_us"] for r in rows]
        ax.bar([x - w / 2 for x in xs], [r["tree_graph_us"][name] for r in rows], w,
               label=f"tree, nonassoc_mix ({name} lanes)")
        ax.bar([x + w / 2 for x in xs], scan, w, label="psmc scan, cumsum over the same bytes")
        ax.scatter(xs, [2 * s for s in scan], marker="_", s=900, color="k", zorder=3, label="2 x scan (target)")
        for x, r in zip(xs, rows):
            ratio = r["tree_graph_us"][name] / r["psmc_scan_graph_us"]
            ax.annotate(f"{ratio:.2f}x", (x - w / 2, r["tree_graph_us"][name]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, labels)
        ax.set_yscale("log")
        ax.set_xlabel("B x T (f32, 32 bytes moved an element)")
        ax.set_ylabel("us, kernels alone (CUDA graph replay, median)")
        ax.set_title(f"forward, tree against scan, {tree['meta']['device']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tree_decode.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
