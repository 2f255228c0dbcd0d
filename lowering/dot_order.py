"""A lowering rewrite for the W4A16 kernel: hand it its activations in the order it reads them.

The kernel's 4 dots per K tile each read a strided quarter of the tile's activations; split in
registers and written back to shared memory, that costs a round trip and a fence per dot
(benchmarks/results/README.md: without it an 8B layer's GEMMs take 72.3 instead of 65.6 us at
M = 1 on an H100, 122.2 instead of 102.0 at M = 64). In dot order
(``hsd.kernels.w4a16.dot_order``) each quarter is one contiguous slice, loaded straight into the
tensor-core operand. The permutation is a view plus a copy, which inductor folds into the kernel
that produces x (the RMSNorm, the SiLU product, the attention output's transpose), so it costs
no launch of its own. It runs at lowering, after every pass, so passes only ever see the op
in its plain form.
"""
import functools

import torch
import torch.fx

from hsd.kernels import w4a16


def _in_features(gm: torch.fx.GraphModule, qweight: torch.fx.Node) -> int:
    return 8 * functools.reduce(getattr, qweight.target.split("."), gm).shape[0]


def w4a16_dot_order(gm: torch.fx.GraphModule) -> int:
    """Rewrite every ``hsd::w4a16_linear(x, ...)`` whose in_features is a multiple of 128 into
    ``hsd::w4a16_linear(dot_order(x), ..., x_dot_order=True)``; returns how many it rewrote."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.hsd.w4a16_linear.default \
                or len(node.args) != 6 or node.kwargs:
            continue
        x, qweight = node.args[:2]
        if qweight.op != "get_attr" or _in_features(gm, qweight) % w4a16.DOT_BLOCK:
            continue
        with graph.inserting_before(node):
            node.args = (graph.call_function(w4a16.dot_order, (x,)), *node.args[1:], True)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done
