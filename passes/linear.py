"""Passes on Linear nodes: horizontal fusion and quantization."""
import collections
import operator

import torch
import torch.fx

from hsd.capture import is_linear, set_attr
from hsd.kernels import w4a16
from hsd.passes.base import Pass


def _weight(node):
    """The get_attr node of a linear's weight and its bias (or None); None if not attributes."""
    w = node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if w.op != "get_attr" or (b is not None and b.op != "get_attr"):
        return None
    return w, b


def _fetch(gm, node):
    return None if node is None else gm.get_submodule("").get_buffer(node.target)


def _add_attr(gm, graph, before, target, tensor):
    set_attr(gm, target, tensor)
    with graph.inserting_before(before):
        return graph.get_attr(target)


def _drop_unused_attrs(gm):
    """Forget weights no node reads any more, so the graph does not keep them alive."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_buffers()):
        if name not in used:
            *parent, leaf = name.split(".")
            delattr(gm.get_submodule(".".join(parent)), leaf)


class FuseSiblingLinears(Pass):
    """Matches Linear nodes that read the same input and whose weights (and biases) are graph
    attributes of one dtype: q/k/v projections and gate/up projections in every supported
    architecture. Emits one Linear over the concatenated weight (missing biases become zeros)
    and a slice of its output for each original node. The lm_head is never fused.
    """
    name = "fuse_sibling_linears"

    def __init__(self):
        self._done = {}  # fused attribute -> (weight, bias), shared by every step graph

    def __call__(self, gm: torch.fx.GraphModule):
        groups = collections.defaultdict(list)
        for node in gm.graph.nodes:
            if is_linear(node) and node.meta.get("hsd_module") != "lm_head" and _weight(node):
                groups[node.args[0]].append(node)
        for siblings in groups.values():
            weights = [_fetch(gm, _weight(n)[0]) for n in siblings]
            if len(siblings) > 1 and len({w.dtype for w in weights}) == 1:
                self._fuse(gm, siblings, weights)
        _drop_unused_attrs(gm)

    def _fuse(self, gm, siblings, weights):
        graph = gm.graph
        first = siblings[0]
        name = "+".join(n.meta["hsd_module"] for n in siblings)
        target = "fused." + name.replace(".", "_").replace("+", "__")
        if target not in self._done:
            biases = [_fetch(gm, _weight(n)[1]) for n in siblings]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
            self._done[target] = torch.cat(weights), bias
        weight, bias = self._done[target]
        w_node = _add_attr(gm, graph, first, target + ".weight", weight)
        b_node = None if bias is None else _add_attr(gm, graph, first, target + ".bias", bias)
        with graph.inserting_before(first):
            fused = graph.call_function(torch._C._nn.linear, (first.args[0], w_node, b_node))
        fused.meta["hsd_module"] = name
        fused.meta["hsd_parts"] = [n.meta["hsd_module"] for n in siblings]
        start = 0
        for node, w in zip(siblings, weights):
            with graph.inserting_before(first):
                part = graph.call_function(operator.getitem, (fused, (Ellipsis, slice(start, start + w.shape[0]))))
            start += w.shape[0]
            node.replace_all_uses_with(part)
        for node in siblings:
            graph.erase_node(node)


QUANT_SCHEMES = ("w4a16",)


class QuantizeLinear(Pass):
    """Matches Linear nodes whose weight is a graph attribute (all but the lm_head unless
    ``include_lm_head``). Emits ``hsd::w4a16_linear(x, qweight, scales, zeros, bias, group_size)``
    with the weight quantized round-to-nearest to 4 bits in groups of ``group_size`` along K
    (``-1``: one group per output channel), symmetric unless ``symmetric=False``.
    """
    name = "quantize_linear"

    def __init__(self, scheme: str = "w4a16", group_size: int = 128, symmetric: bool = True,
                 include_lm_head: bool = False, prequantized=None):
        if scheme not in QUANT_SCHEMES:
            raise ValueError(f"unknown quant scheme {scheme!r}; known: {', '.join(QUANT_SCHEMES)}")
        self.scheme, self.group_size, self.symmetric = scheme, group_size, symmetric
        self.include_lm_head = include_lm_head
        self.prequantized = prequantized or {}  # "<module>.qweight" / ".scales" / ".zeros" -> tensor
        self._done = {}  # weight attribute -> quantized tensors, shared by every step graph

    def settings(self):
        return {"scheme": self.scheme, "group_size": self.group_size, "symmetric": self.symmetric,
                "include_lm_head": self.include_lm_head}

    def __call__(self, gm: torch.fx.GraphModule):
        graph = gm.graph
        for node in list(graph.nodes):
            if not is_linear(node) or not _weight(node):
                continue
            module = node.meta.get("hsd_module", node.name)
            if module == "lm_head" and not self.include_lm_head:
                continue
            w_node, b_node = _weight(node)
            qweight, scales, zeros = self._quantize(gm, w_node, node.meta.get("hsd_parts", [module]))
            owner = w_node.target.rsplit(".", 1)[0]
            args = [_add_attr(gm, graph, node, f"{owner}.{name}", t) if t is not None else None
                    for name, t in zip(("qweight", "scales", "zeros"), (qweight, scales, zeros))]
            with graph.inserting_before(node):
                q = graph.call_function(torch.ops.hsd.w4a16_linear.default,
                                        (node.args[0], *args, b_node, qweight.shape[0] * 8 // scales.shape[0]))
            q.meta.update(node.meta)
            node.replace_all_uses_with(q)
            graph.erase_node(node)
        _drop_unused_attrs(gm)

    def _group(self, k):
        return k if self.group_size in (None, -1) else self.group_size

    def _quantize(self, gm, w_node, parts):
        if w_node.target not in self._done:
            w = _fetch(gm, w_node)
            self._done[w_node.target] = self._load(parts, w) if w.is_meta else self._rtn(w, "+".join(parts))
        return self._done[w_node.target]

    def _rtn(self, w, module):
        n, k = w.shape
        if k % self._group(k) or k % 8:
            raise ValueError(f"{module}: in_features {k} is not divisible by the group size "
                             f"{self._group(k)} (and by 8); use group_size=-1 (per channel) "
                             "or a group size that divides it")
        return w4a16.quantize_rtn(w, self.group_size, self.symmetric)

    def _load(self, parts, w):
        """Pre-quantized tensors of each (fused) part, concatenated along N like the weights."""
        missing = [f"{p}.qweight" for p in parts if f"{p}.qweight" not in self.prequantized]
        if missing:
            raise ValueError(f"{missing[0]}: the weight is on the meta device and no quantized tensors were given")
        qweight, scales = (torch.cat([self.prequantized[f"{p}.{t}"] for p in parts], 1) for t in ("qweight", "scales"))
        zeros = [self.prequantized.get(f"{p}.zeros") for p in parts]
        if all(z is None for z in zeros):
            zeros = None
        else:  # a symmetric part next to an asymmetric one: spell out its zero point
            zeros = torch.cat([z if z is not None else torch.full_like(self.prequantized[f"{p}.scales"], 8)
                               for p, z in zip(parts, zeros)], 1)
        if qweight.shape != (w.shape[1] // 8, w.shape[0]):
            raise ValueError(f"{'+'.join(parts)}: qweight {tuple(qweight.shape)} does not fit the weight {tuple(w.shape)}")
        return qweight, scales, zeros
