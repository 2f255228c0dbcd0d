"""Lowering rewrites for the 4-bit GEMMs: hand each kernel its activations in the order it reads them.

The W4A16 kernel's 4 dots (the W4A8 kernel's 2) per K tile each read a strided part of the
tile's activations; split in registers and written back to shared memory, that costs a round
trip and a fence per dot (benchmarks/results/README.md: without it an 8B layer's W4A16 GEMMs
take 72.3 instead of 65.6 us at M = 1 on an H100, 122.2 instead of 102.0 at M = 64). In dot
order each part is one contiguous slice, loaded straight into the tensor-core operand.
  W4A16: the permutation (``hsd.kernels.w4a16.dot_order``) is a view plus a copy in front of
         the op, which inductor folds into the kernel that produces x (the RMSNorm, the SiLU
         product, the attention output's transpose), so it costs no launch of its own.
  W4A8 / W4A4: x comes from hsd's own quantization ops, which store q in dot order
         (``hsd.kernels.w4a8.dot_order``) when asked: a permuted store, free.
The rewrites run at lowering, after every pass, so passes only ever see the ops in their plain
form.
"""
import functools
import operator

import torch
import torch.fx

from hsd.kernels import w4a8, w4a16
from hsd.kernels.w4a16 import DOT_BLOCK


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
        if qweight.op != "get_attr" or _in_features(gm, qweight) % DOT_BLOCK:
            continue
        with graph.inserting_before(node):
            node.args = (graph.call_function(w4a16.dot_order, (x,)), *node.args[1:], True)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done


def _reads_dot_order(gm: torch.fx.GraphModule, node: torch.fx.Node, q: torch.fx.Node) -> bool:
    """Is ``node`` a plain ``hsd::w4a8_linear(q, ...)`` whose kernel can read q in dot order?"""
    if node.op != "call_function" or node.target is not torch.ops.hsd.w4a8_linear.default \
            or len(node.args) != 7 or node.kwargs or node.args[0] is not q or node.args[2].op != "get_attr":
        return False
    return w4a8.reads_dot_order(_in_features(gm, node.args[2]), node.args[6])


def w4a8_dot_order(gm: torch.fx.GraphModule) -> int:
    """Rewrite every ``hsd::quantize_per_token`` / ``hsd::rmsnorm_quant`` whose q feeds only
    ``hsd::w4a8_linear`` ops that can read dot order: the quantization stores q in dot order
    (dot_order=True) and each of those ops reads it so (x_dot_order=True). Returns how many
    quantizations it rewrote."""
    graph, done = gm.graph, 0
    plain_args = {torch.ops.hsd.quantize_per_token.default: 2, torch.ops.hsd.rmsnorm_quant.default: 4}
    for node in list(graph.nodes):
        if node.op != "call_function" or plain_args.get(node.target) != len(node.args) or node.kwargs:
            continue
        if not all(u.target is operator.getitem for u in node.users):
            continue
        readers = [(lin, q) for q in node.users if q.args[1] == 0 for lin in q.users]
        if not readers or not all(_reads_dot_order(gm, lin, q) for lin, q in readers):
            continue
        node.args = (*node.args, True)
        for lin, _ in readers:
            lin.args = (*lin.args, True)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done
