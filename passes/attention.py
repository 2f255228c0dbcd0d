"""RewriteAttention: SDPA over the new tokens only -> hsd::attention over the static KV cache."""
import operator

import torch
import torch.fx

from hsd.kernels.attention import pack_tree_mask
from hsd.passes.base import Pass

STEP_INPUTS = ("input_ids", "position_ids", "cache_len", "tree_mask", "k_cache", "v_cache")


def _sdpa(node) -> bool:
    return node.op == "call_function" and node.target is torch._C._nn.scaled_dot_product_attention


def _unrepeat_kv(node: torch.fx.Node) -> torch.fx.Node:
    """Undo transformers' repeat_kv: x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h*n_rep, t, d)."""
    if node.op == "call_method" and node.target == "reshape":
        expand = node.args[0]
        if expand.op == "call_method" and expand.target == "expand":
            index = expand.args[0]
            if index.op == "call_function" and index.target is operator.getitem:
                return index.args[0]
    return node


class RewriteAttention(Pass):
    """Matches every ``scaled_dot_product_attention`` node of the captured (cache-less) forward,
    in both GQA forms (K/V repeated with ``repeat_kv``, or ``enable_gqa=True``), with whatever
    mask transformers built in-graph. Emits ``hsd::attention(q, k, v, k_cache, v_cache, layer,
    cache_len, tree_bits, scale)``, which writes the new K/V into the static cache and attends
    over the cached prefix plus the tree (or causal) block. Adds the step inputs ``cache_len``,
    ``tree_mask`` (bool [T, T]), ``k_cache``, ``v_cache`` as placeholders and one
    ``pack_tree_mask`` node (``tree_bits``, shared by every layer); the dead mask code is removed.
    """
    name = "rewrite_attention"

    def __call__(self, gm: torch.fx.GraphModule):
        graph = gm.graph
        nodes = [n for n in graph.nodes if _sdpa(n)]
        if not nodes:
            raise ValueError("no scaled_dot_product_attention node found; hsd needs the sdpa attention path")
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last):
            new_inputs = {}
            for name in reversed(STEP_INPUTS[2:]):
                new_inputs[name] = graph.placeholder(name)
        with graph.inserting_after(new_inputs["v_cache"]):
            tree_bits = graph.call_function(pack_tree_mask, (new_inputs["tree_mask"],))
        for layer, node in enumerate(nodes):
            q, k, v = node.args[:3]
            if node.kwargs.get("dropout_p", 0.0) not in (0.0, None):
                raise ValueError(f"{node.name}: attention dropout is not supported at inference")
            scale = node.kwargs.get("scale")
            if scale is None:
                raise ValueError(f"{node.name}: sdpa without an explicit scale")
            with graph.inserting_before(node):
                out = graph.call_function(torch.ops.hsd.attention.default, (
                    q, _unrepeat_kv(k), _unrepeat_kv(v), new_inputs["k_cache"], new_inputs["v_cache"],
                    layer, new_inputs["cache_len"], tree_bits, float(scale)))
            out.meta.update(node.meta)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        graph.eliminate_dead_code()
