"""GPU timing for kernel benchmarks and tuning: the median of CUDA-graph replays.

A Triton launcher costs tens of microseconds of Python per call, more than a small-M kernel
runs, so timing plain calls measures the host. hsd's decode steps replay CUDA graphs, and so
does this. ``triton.testing.do_bench`` clears the L2 cache before each replay: weights come
from HBM as they do in a real forward pass.
"""
import torch
import triton


def graphed(fn):
    fn()  # compile and autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_us(fn, warmup: int = 5, rep: int = 40) -> float:
    """Median microseconds of ``fn`` replayed from a CUDA graph."""
    return 1e3 * triton.testing.do_bench(graphed(fn), warmup=warmup, rep=rep, return_mode="median")
