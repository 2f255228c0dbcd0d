"""GPU timing for kernel benchmarks and tuning, two ways.

A Triton launcher costs tens of microseconds of Python per call, more than a small-M kernel
runs, so timing plain calls measures the host. hsd's decode steps replay CUDA graphs, and so
does this.

``bench_us``: ``triton.testing.do_bench`` of one call replayed from a graph, the L2 cleared
before each replay (the method of the anchors in REFERENCE.md section 1). Two costs come with
it that a decode step does not pay: each replay's launch and events (~5 us for an empty kernel
on an H100), and the clear WRITES 256 MB, so the timed call starts on an L2 full of dirty lines
and writes them back to HBM while it reads (a copy of 8 MB: 12.3 us after do_bench's clear,
10.1 us after one that only reads; benchmarks/results/README.md).

``bench_stream_us``: the calls of many distinct operand sets (several L2 sizes in all) back to
back in one graph, the time per call. Each call reads its operands from HBM, as each layer of a
decode step does, with the gaps between kernels a graph really has, and nothing else.
"""
import math
import statistics

import torch
import triton


def graphed(fn):
    fn()  # compile and autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_us(fn, warmup: int = 5, rep: int = 40) -> float:
    """Median microseconds of ``fn`` replayed from a CUDA graph, L2 cleared before each replay."""
    return 1e3 * triton.testing.do_bench(graphed(fn), warmup=warmup, rep=rep, return_mode="median")


def stream_copies(nbytes: int, l2_multiple: int = 4, most: int = 64) -> int:
    """How many distinct operand sets of ``nbytes`` make a stream of ``l2_multiple`` L2 sizes."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, min(most, math.ceil(l2_multiple * l2 / nbytes)))


def replay_us(replay, reps: int = 20) -> float:
    """Median microseconds of ``reps`` calls of ``replay`` (a graph's replay), after one more."""
    replay()
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(reps)]
    for start, end in events:
        start.record()
        replay()
        end.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in events)


def bench_stream_us(fns, reps: int = 20) -> float:
    """Median microseconds per call of ``fns`` (zero-arg callables, each over its OWN operands,
    see ``stream_copies``) run in order from one CUDA graph, replayed ``reps`` times."""
    return replay_us(graphed(lambda: [fn() for fn in fns]), reps) / len(fns)


def copy_tbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in TB/s (bytes read + written), the ceiling that the
    bandwidth targets are stated against (3.0 TB/s on an H100, 2.76 on the H200 lent on
    2026-11-30, where cuBLAS nonetheless reads weights at 3.7-4.1 TB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / replay_us(graphed(lambda: dst.copy_(src)), reps=10) / 1e6
