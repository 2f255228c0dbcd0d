"""The captured RMSNorm, and the pass that fuses it with the per-token quantization it feeds."""
import operator

import torch
import torch.fx

from hsd.passes.base import Pass


def _is(node, op, target):
    return isinstance(node, torch.fx.Node) and node.op == op and node.target == target


def _to_dtype(node):
    """The dtype of a ``x.to(dtype)`` call_method node, else None."""
    if _is(node, "call_method", "to") and len(node.args) == 2 and isinstance(node.args[1], torch.dtype):
        return node.args[1]
    return None


def match_rmsnorm(node):
    """If ``node`` is the output of a Hugging Face RMSNorm as dynamo captures it,
        h = x.to(float32); h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * h.to(dtype)                  (weight a get_attr node)
    return (x, weight node, eps, dtype), else None."""
    if not _is(node, "call_function", operator.mul) or len(node.args) != 2:
        return None
    weight, cast = node.args if getattr(node.args[0], "op", None) == "get_attr" else node.args[::-1]
    dtype = _to_dtype(cast)
    if getattr(weight, "op", None) != "get_attr" or dtype is None:
        return None
    scaled = cast.args[0]
    if not _is(scaled, "call_function", operator.mul) or len(scaled.args) != 2:
        return None
    h, rsqrt = scaled.args if _is(scaled.args[1], "call_function", torch.rsqrt) else scaled.args[::-1]
    if not _is(rsqrt, "call_function", torch.rsqrt) or _to_dtype(h) != torch.float32:
        return None
    add = rsqrt.args[0]
    if not _is(add, "call_function", operator.add) or not isinstance(add.args[1], float):
        return None
    mean, eps = add.args
    if not (_is(mean, "call_method", "mean") and mean.args[1:] == (-1,) and mean.kwargs == {"keepdim": True}):
        return None
    square = mean.args[0]
    if not (_is(square, "call_method", "pow") and square.args == (h, 2)):
        return None
    return h.args[0], weight, eps, dtype


class FuseRMSNormQuant(Pass):
    """Matches ``hsd::quantize_per_token(norm, kind)`` where ``norm`` is a captured RMSNorm
    (``match_rmsnorm``) whose weight has the normed dtype. Emits
    ``hsd::rmsnorm_quant(x, weight, eps, kind)`` in its place (one per norm and kind). The
    unfused norm stays for any other user of the normed hidden state (e.g. the final norm's
    "hidden" output); dead-code elimination drops it otherwise."""
    name = "fuse_rmsnorm_quant"

    def __call__(self, gm: torch.fx.GraphModule):
        graph, fused = gm.graph, {}
        for node in list(graph.nodes):
            if not (node.op == "call_function" and node.target is torch.ops.hsd.quantize_per_token.default):
                continue
            norm, kind = node.args
            match = match_rmsnorm(norm)
            if match is None:
                continue
            x, weight, eps, dtype = match
            if gm.get_submodule("").get_buffer(weight.target).dtype != dtype:
                continue  # the fused op computes the product in x's dtype
            if (norm, kind) not in fused:
                with graph.inserting_before(node):
                    fused[norm, kind] = graph.call_function(torch.ops.hsd.rmsnorm_quant.default,
                                                            (x, weight, eps, kind))
            node.replace_all_uses_with(fused[norm, kind])
            graph.erase_node(node)
        graph.eliminate_dead_code()
