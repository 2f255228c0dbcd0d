"""The captured SwiGLU product of an MLP, and the pass that fuses it with the per-token
quantization that feeds down_proj."""
import operator

import torch
import torch.fx

from hsd.passes.base import Pass
from hsd.passes.norm import _is


def _silu_input(node):
    """x if ``node`` is ``silu(x)`` as dynamo captures ``ACT2FN["silu"]`` (not in place), else None."""
    if not _is(node, "call_function", torch.nn.functional.silu) or node.args[1:] not in ((), (False,)):
        return None
    return node.args[0] if node.kwargs in ({}, {"inplace": False}) else None


def match_silu_mul(node):
    """If ``node`` is a Hugging Face LlamaMLP's ``act_fn(gate_proj(x)) * up_proj(x)`` with act_fn
    SiLU, in either operand order, return (gate, up), else None. gate and up are whatever nodes
    feed it: Linear outputs, or slices of one fused gate_up Linear."""
    if not (_is(node, "call_function", operator.mul) or _is(node, "call_function", torch.mul)):
        return None
    if len(node.args) != 2 or node.kwargs:
        return None
    for act, up in (node.args, node.args[::-1]):
        gate = _silu_input(act)
        if gate is not None and isinstance(up, torch.fx.Node) and _one_value_type(act, up, node):
            return gate, up
    return None


def _one_value_type(*nodes):
    """False when captured values show a broadcast or a dtype promotion in the product, which the
    fused op (gate, up and h of one shape and dtype) does not compute. Nodes a pass inserted (e.g.
    the GEMMs feeding the product) carry no captured value; the op refuses mismatched inputs."""
    values = [n.meta["example_value"] for n in nodes if isinstance(n.meta.get("example_value"), torch.Tensor)]
    return all(v.shape == values[0].shape and v.dtype == values[0].dtype for v in values)


class FuseSiluMulQuant(Pass):
    """Matches ``hsd::quantize_per_token(h, kind)`` where ``h = silu(gate) * up`` is a captured
    SwiGLU product (``match_silu_mul``). Emits ``hsd::silu_mul_quant(gate, up, kind)`` in its
    place (one per product and kind). The unfused product stays for any other user of it;
    dead-code elimination drops it otherwise. A product rotated before its quantization
    (``hsd::hadamard`` in front of down_proj, for W4A4) does not match and is left as it is."""
    name = "fuse_silu_mul_quant"

    def __call__(self, gm: torch.fx.GraphModule):
        graph, fused = gm.graph, {}
        for node in list(graph.nodes):
            if not (node.op == "call_function" and node.target is torch.ops.hsd.quantize_per_token.default):
                continue
            product, kind = node.args
            match = match_silu_mul(product)
            if match is None:
                continue
            if (product, kind) not in fused:
                with graph.inserting_before(node):
                    fused[product, kind] = graph.call_function(torch.ops.hsd.silu_mul_quant.default,
                                                               (*match, kind))
            node.replace_all_uses_with(fused[product, kind])
            graph.erase_node(node)
        graph.eliminate_dead_code()
