"""Timing helpers the benchmark scripts share."""

from __future__ import annotations

from typing import Callable

import torch


def graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn`'s GPU work captured once in a CUDA graph; the returned callable replays it.

    Timing the replay gives the kernels' GPU time alone. do_bench on the call itself hides host
    time only up to the length of its L2 flush, and the lent GPU machine's host runs Python several
    times slower than a workstation, so for calls of a few short kernels (or forward + backward
    through autograd) the plain timing can measure the host instead; the replay cannot. `fn` runs
    twice first on a side stream (compiles, launch plans, allocations stay out of the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
