"""Programmatic dependent launch (PDL, Hopper and later): the next kernel starts while this one ends.

In a decode step each kernel waits for the one before it. On an H100 the gap between two kernels
(the next grid's launch, then its first loads from DRAM) costs 1-2 us, as much as a small
linear's whole body (benchmarks/results/README.md). Launched with PDL, a kernel's programs become
resident while the previous grid finishes; they prefetch into L2 the bytes that no earlier kernel
writes (the weights), then wait for the previous grid to complete and flush its writes
(griddepcontrol.wait) and run as usual.

The rule of every hsd kernel with a PDL prologue: before ``wait`` it only prefetches into L2
(no load into registers, no store), so the result is the same whatever the previous kernel
writes. ``wait`` then lets the NEXT grid launch (griddepcontrol.launch_dependents), so that grid
overlaps this grid's body only, never an earlier kernel. A kernel's ``PDL`` constexpr is False
off the GPU: the interpreter never sees these instructions.

Inductor's kernels (the rest of a step graph) get PDL too, through its own ``triton.enable_pdl``
option (hsd.lowering). ``HSD_PDL=0`` in the environment turns all of it off (to time both:
benchmarks/bench_pdl.py, bench_decode.py).
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.lru_cache(maxsize=None)
def _supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def enabled(device: torch.device) -> bool:
    """PDL on: a Hopper or later GPU, and HSD_PDL is not 0."""
    return _supported(device) and os.environ.get("HSD_PDL", "1") != "0"


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a launch of a kernel with a ``PDL`` constexpr."""
    return dict(PDL=True, launch_pdl=True) if enabled(device) else dict(PDL=False)


@triton.jit
def prefetch_l2(ptrs, nbytes: tl.constexpr):
    """Prefetch ``nbytes`` (a multiple of 16) from every address of ``ptrs`` into L2 (the TMA
    unit's bulk prefetch: one instruction per contiguous range). GPU only."""
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0;", "=r,l,r",
                              [ptrs, tl.full(ptrs.shape, nbytes, tl.int32)], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def wait():
    """Wait for the previous grid to complete; then let the next one launch."""
    gdc_wait()
    gdc_launch_dependents()
