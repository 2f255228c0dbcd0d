"""Lowering: turn a rewritten step graph into something fast to call on its device.

The ``hsd`` ops inside the graph already dispatch to Triton kernels on CUDA and to torch
references elsewhere (``hsd.kernels.registry``); lowering compiles the rest of the graph:
  "inductor"  torch inductor (``compile_fx``), then the step is captured in a CUDA graph on CUDA
  "aot_eager" AOT autograd + functionalization without code generation (tests the same path cheaply)
  "eager"     the fx graph's own Python code (CPU default: no compile time)
On CUDA the W4A16 and W4A8 / W4A4 GEMMs first get their activations in the order their kernels
read them (``hsd.lowering.dot_order``; HSD_DOT_ORDER=0: off).
"""
import os

import torch
import torch.fx

from hsd.lowering.cuda_graphs import GraphedStep
from hsd.lowering.dot_order import w4a16_dot_order, w4a8_dot_order

BACKENDS = ("inductor", "aot_eager", "eager")


def default_backend(device: torch.device) -> str:
    return "inductor" if device.type == "cuda" else "eager"


def lower(gm: torch.fx.GraphModule, inputs: dict, backend: str, cuda_graph: bool):
    """Compile ``gm`` for example step inputs (placeholder name -> tensor). Returns a callable
    taking the step inputs as keyword arguments and returning the graph's outputs."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if set(names) != set(inputs):
        raise ValueError(f"step graph inputs {names} do not match the step's inputs {list(inputs)}")
    inputs = {name: inputs[name] for name in names}
    example = list(inputs.values())
    if any(t.is_cuda for t in example) and os.environ.get("HSD_DOT_ORDER", "1") != "0":
        w4a16_dot_order(gm)
        w4a8_dot_order(gm)
    if backend == "inductor":
        from torch._inductor.compile_fx import compile_fx
        fn = compile_fx(gm, example)
    elif backend == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager
        fn = aot_eager(gm, example)
    else:
        fn = gm
    if cuda_graph:
        return GraphedStep(fn, inputs)
    return lambda **kw: fn(*[kw[name] for name in names])
