"""W4A8 / W4A4 Linears on the int8 tensor cores, over the W4A16 weight format.

The schemes "w4a8" (int8 activations) and "w4a4" (int4 activations, -7..7) store exactly what
"w4a16" stores (same quantizer, same checkpoint loading) and emit
``hsd::quantize_per_token(x, kind)`` + ``hsd::w4a8_linear``. ``LowBitActivations`` turns the
W4A16 GEMMs of an already quantized graph into these, reading the very same weight attributes:
QSpec's draft mode. (Rotations for W4A4, e.g. QuaRot's Hadamards, are a separate pass in front.)
"""
import torch
import torch.fx

from hsd.kernels import w4a8
from hsd.passes.base import Pass
from hsd.passes.linear import W4A16, _fetch, permuted_input, quantize_input, register_scheme

KIND_OF_BITS = {8: "int8", 4: "int4"}


def emit_low_bit(graph: torch.fx.Graph, x, qweight, scales, zeros, bias, group_size: int, kind: str):
    """Insert quantize_per_token(x, kind) and the int8-MMA GEMM; returns the GEMM node."""
    xq, xscale = quantize_input(graph, x, kind)
    return graph.call_function(torch.ops.hsd.w4a8_linear.default,
                               (xq, xscale, qweight, scales, zeros, bias, group_size))


class W4A8(W4A16):
    """4-bit weights in the GPTQ layout (as "w4a16"), per-token int8 activations."""
    name = "w4a8"
    kind = "int8"

    def check(self, module, n, k, group_size):
        super().check(module, n, k, group_size)
        w4a8.check_group_size(k, k if group_size in (None, -1) else group_size, module)

    def emit(self, graph, x, attrs, bias, tensors):
        group_size = tensors["qweight"].shape[0] * 8 // tensors["scales"].shape[0]
        return emit_low_bit(graph, permuted_input(graph, x, attrs), attrs["qweight"], attrs["scales"], attrs["zeros"],
                            bias, group_size, self.kind)


class W4A4(W4A8):
    """4-bit weights (as "w4a16"), per-token int4 activations carried in int8: on Hopper they
    run on the int8 MMA (there is no int4 one), so only the accuracy differs from "w4a8"."""
    name = "w4a4"
    kind = "int4"


register_scheme(W4A8())
register_scheme(W4A4())


class LowBitActivations(Pass):
    """Matches every ``hsd::w4a16_linear`` node; emits ``hsd::quantize_per_token(x, kind)``
    (kind "int8" or "int4") and ``hsd::w4a8_linear`` over the same qweight / scales / zeros /
    bias nodes, so no weight is copied: QSpec drafts with this, verifies with the W4A16 graph."""
    name = "low_bit_activations"

    def __init__(self, kind: str = "int8"):
        if kind not in KIND_OF_BITS.values():
            raise ValueError(f"low-bit activations are 'int8' or 'int4', got {kind!r}")
        self.kind = kind

    def settings(self):
        return {"kind": self.kind}

    def __call__(self, gm: torch.fx.GraphModule):
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is torch.ops.hsd.w4a16_linear.default:
                x, qweight, scales, zeros, bias, group_size = node.args
                w4a8.check_group_size(8 * _fetch(gm, qweight).shape[0], group_size,
                                      node.meta.get("hsd_module", node.name))
                with graph.inserting_before(node):
                    new = emit_low_bit(graph, x, qweight, scales, zeros, bias, group_size, self.kind)
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
