"""Programmatic dependent launch (PDL, Hopper and later): the next kernel starts while this one ends.

Launched with PDL, a kernel's programs become resident while the previous grid finishes and wait
(griddepcontrol.wait) for it to complete and flush its writes, then run as usual, minus the
launch gap (1-2 us on an H100). The rule of every hsd kernel with PDL: ``wait`` comes first,
before any load or store, so the result is the same whatever the previous kernel writes; it then
lets the NEXT grid launch (griddepcontrol.launch_dependents), so that grid overlaps this grid's
body only, never an earlier kernel's. The ``PDL`` constexpr is False off the GPU: the
interpreter never sees these instructions.

Used by the attention op, whose merge kernel always follows its split kernel (H100, prefix 8192,
decode: 18.6 -> 17.8 us; benchmarks/bench_pdl.py). Measured and not used
(benchmarks/results/README.md): on the W4A16 kernels it saves ~2 us per 8B layer in a stream of
linears but nothing in a decode step, where inductor's kernels sit between them; inductor's own
``triton.enable_pdl`` made the decode step slower; prefetching weights into L2 before the wait
cost 8 us per layer. ``HSD_PDL=0`` turns it off.
"""
import functools
import os

import torch
import triton
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
def wait():
    """Wait for the previous grid to complete; then let the next one launch."""
    gdc_wait()
    gdc_launch_dependents()
