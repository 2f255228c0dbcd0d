"""Passes on Linear nodes: horizontal fusion and quantization."""
import collections
import hashlib
import operator

import torch
import torch.fx
from tqdm import tqdm

from hsd.capture import is_linear, set_attr
from hsd.kernels import w4a16
from hsd.passes import gptq
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


class Scheme:
    """One quantization scheme: how a Linear's weight is stored and which hsd ops compute it.

    A scheme is registered once by name (``register_scheme``); ``QuantizeLinear`` does the
    graph surgery and asks the scheme three things:
      ``tensors``   names of the attributes that replace ``<module>.weight``
      ``quantize``  [N, K] float weight -> those tensors (None for an absent optional one)
      ``emit``      insert the nodes computing ``x @ W.T + b`` from those attributes
    ``load`` builds the tensors from a pre-quantized checkpoint (only some schemes can).
    A scheme with ``supports_gptq`` also takes ``quantize(..., hessian=H, act_order=...)``.
    """
    name: str
    tensors: tuple
    supports_gptq = False  # quantize accepts a GPTQ Hessian (4-bit weight schemes)

    def check(self, module: str, n: int, k: int, group_size: int):
        """Raise ValueError (naming ``module``) if this scheme cannot quantize an [n, k] weight."""

    def check_device(self, device):
        """Raise ValueError if this scheme's kernels cannot run on ``device`` (before any run)."""

    def quantize(self, w: torch.Tensor, group_size: int, symmetric: bool) -> tuple:
        raise NotImplementedError

    def emit(self, graph: torch.fx.Graph, x, attrs: dict, bias, tensors: dict):
        """Insert the nodes; ``attrs`` and ``tensors``: attribute name -> get_attr node / tensor."""
        raise NotImplementedError

    def load(self, parts, prequantized: dict, w: torch.Tensor) -> tuple:
        raise ValueError(f"{'+'.join(parts)}: scheme {self.name!r} cannot load pre-quantized weights")


def _group(group_size, k):
    return k if group_size in (None, -1) else group_size


class W4A16(Scheme):
    """4-bit weights in the GPTQ layout (``hsd.kernels.w4a16``), 16-bit activations; quantized
    round-to-nearest, or by GPTQ (``hsd.passes.gptq``) when given a Hessian. Every 4-bit weight
    scheme subclasses it, so all of them read (and quantize) the same tensors. A checkpoint
    quantized with act-order (``hsd.checkpoint``) adds ``perm``: its K rows were sorted by group,
    so the op reads ``x[..., perm]``."""
    name = "w4a16"
    tensors = ("qweight", "scales", "zeros", "perm")
    supports_gptq = True

    def check(self, module, n, k, group_size):
        if k % _group(group_size, k) or k % 8:
            raise ValueError(f"{module}: in_features {k} is not divisible by the group size "
                             f"{_group(group_size, k)} (and by 8); use group_size=-1 (per channel) "
                             "or a group size that divides it")

    def quantize(self, w, group_size, symmetric, hessian=None, act_order=False):
        if hessian is None:
            return w4a16.quantize_rtn(w, group_size, symmetric)
        return gptq.gptq(w, hessian, group_size, symmetric, act_order)

    def emit(self, graph, x, attrs, bias, tensors):
        group_size = tensors["qweight"].shape[0] * 8 // tensors["scales"].shape[0]
        args = (permuted_input(graph, x, attrs), attrs["qweight"], attrs["scales"], attrs["zeros"], bias, group_size)
        return graph.call_function(torch.ops.hsd.w4a16_linear.default, args)

    def load(self, parts, prequantized, w):
        """Pre-quantized tensors of each (fused) part, concatenated along N like the weights."""
        qweight, scales = (torch.cat([prequantized[f"{p}.{t}"] for p in parts], 1) for t in ("qweight", "scales"))
        zeros = [prequantized.get(f"{p}.zeros") for p in parts]
        if all(z is None for z in zeros):
            zeros = None
        else:  # a symmetric part next to an asymmetric one: spell out its zero point
            zeros = torch.cat([z if z is not None else torch.full_like(prequantized[f"{p}.scales"], 8)
                               for p, z in zip(parts, zeros)], 1)
        if qweight.shape != (w.shape[1] // 8, w.shape[0]):
            raise ValueError(f"{'+'.join(parts)}: qweight {tuple(qweight.shape)} does not fit the weight {tuple(w.shape)}")
        perms = [prequantized.get(f"{p}.perm") for p in parts]
        if not (all(q is None for q in perms) or all(q is not None and torch.equal(q, perms[0]) for q in perms)):
            raise ValueError(f"{'+'.join(parts)}: fused Linears read one input but were quantized with different "
                             "act-order permutations; compile with fuse=False")
        return qweight, scales, zeros, perms[0]


def permuted_input(graph: torch.fx.Graph, x, attrs: dict):
    """``x[..., perm]`` for a Linear whose K rows a checkpoint's act-order permuted, else ``x``."""
    if attrs.get("perm") is None:
        return x
    return graph.call_function(torch.ops.aten.index_select.default, (x, -1, attrs["perm"]))


def quantize_input(graph: torch.fx.Graph, x, kind: str) -> tuple:
    """Insert ``hsd::quantize_per_token(x, kind)``; returns its (q, scale) nodes."""
    q = graph.call_function(torch.ops.hsd.quantize_per_token.default, (x, kind))
    return tuple(graph.call_function(operator.getitem, (q, i)) for i in (0, 1))


QUANT_SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Make ``scheme`` available as ``QuantizeLinear(scheme.name)`` and ``hsd.compile(quant=...)``."""
    QUANT_SCHEMES[scheme.name] = scheme
    return scheme


register_scheme(W4A16())


class QuantizeLinear(Pass):
    """Matches Linear nodes whose weight is a graph attribute (all but the lm_head unless
    ``include_lm_head``). Emits the ops of ``scheme`` (see ``QUANT_SCHEMES``; "w4a16":
    ``hsd::w4a16_linear(x, qweight, scales, zeros, bias, group_size)``) over the weight quantized
    round-to-nearest in groups of ``group_size`` along K (``-1``: one group per output channel),
    symmetric unless ``symmetric=False``. The scheme checks every weight's shape before any is
    quantized, so a bad width fails before any work is done.

    ``hessians`` ({module name: [K, K]}, from ``hsd.passes.gptq.hessians``) switches a 4-bit
    scheme from round-to-nearest to GPTQ (``act_order``: GPTQ's desc_act with static groups); a
    fused Linear uses the Hessian of its first part (all parts read the same input). Each Hessian
    is released once its Linear is quantized (the caller's dict keeps its own references).
    """
    name = "quantize_linear"

    def __init__(self, scheme: str = "w4a16", group_size: int = 128, symmetric: bool = True,
                 include_lm_head: bool = False, prequantized=None, hessians=None, act_order: bool = False):
        if scheme not in QUANT_SCHEMES:
            raise ValueError(f"unknown quant scheme {scheme!r}; known: {', '.join(QUANT_SCHEMES)}")
        if hessians is not None and not QUANT_SCHEMES[scheme].supports_gptq:
            known = ", ".join(n for n, s in QUANT_SCHEMES.items() if s.supports_gptq)
            raise ValueError(f"GPTQ quantizes 4-bit weights only ({known}); scheme {scheme!r} cannot use it")
        if act_order and hessians is None:
            raise ValueError("act_order is a GPTQ option: it needs hessians")
        self.scheme, self.group_size, self.symmetric = QUANT_SCHEMES[scheme], group_size, symmetric
        self.include_lm_head = include_lm_head
        self.prequantized = prequantized or {}  # "<module>.qweight" / ".scales" / ... -> tensor
        # our own dict: each Hessian is dropped once its Linear is quantized
        self.hessians, self.act_order = None if hessians is None else dict(hessians), act_order
        self._calibration = None  # fingerprint of the calibration data (it changes the output too)
        if hessians is not None:  # computed once: it reads every Hessian from the device
            traces = repr(sorted((n, float(h.diagonal().sum())) for n, h in hessians.items()))
            self._calibration = hashlib.sha256(traces.encode()).hexdigest()[:16]
        self._done = {}  # weight attribute -> quantized tensors, shared by every step graph

    def settings(self):
        settings = {"scheme": self.scheme.name, "group_size": self.group_size, "symmetric": self.symmetric,
                    "include_lm_head": self.include_lm_head}
        if self.hessians is not None:
            settings.update(quantizer="gptq", act_order=self.act_order, calibration=self._calibration)
        return settings

    def __call__(self, gm: torch.fx.GraphModule):
        graph = gm.graph
        todo = [n for n in graph.nodes if is_linear(n) and _weight(n)
                and (self.include_lm_head or n.meta.get("hsd_module") != "lm_head")]
        pending = {_weight(n)[0].target for n in todo} - set(self._done)
        for node in todo:
            w = _fetch(gm, _weight(node)[0])
            self.scheme.check_device(w.device)
            if not w.is_meta:  # pre-quantized tensors carry their own group size; load checks them
                self.scheme.check(node.meta.get("hsd_module", node.name), *w.shape, self.group_size)
                if _weight(node)[0].target in pending:  # done ones have released their Hessian
                    self._hessian(_parts(node), w)
        for node in tqdm(todo, desc="gptq", unit="linear", disable=self.hessians is None or not pending):
            w_node, b_node = _weight(node)
            tensors = self._quantize(gm, w_node, _parts(node))
            owner = w_node.target.rsplit(".", 1)[0]
            tensors = dict(zip(self.scheme.tensors, tensors))
            attrs = {name: None if t is None else _add_attr(gm, graph, node, f"{owner}.{name}", t)
                     for name, t in tensors.items()}
            with graph.inserting_before(node):
                q = self.scheme.emit(graph, node.args[0], attrs, b_node, tensors)
            q.meta.update(node.meta)
            node.replace_all_uses_with(q)
            graph.erase_node(node)
        _drop_unused_attrs(gm)

    def _quantize(self, gm, w_node, parts):
        if w_node.target not in self._done:
            w = _fetch(gm, w_node)
            if w.is_meta:
                missing = [f"{p}.{self.scheme.tensors[0]}" for p in parts
                           if f"{p}.{self.scheme.tensors[0]}" not in self.prequantized]
                if missing:
                    raise ValueError(f"{missing[0]}: the weight is on the meta device and no quantized tensors were given")
                tensors = self.scheme.load(parts, self.prequantized, w)
            elif self.hessians is not None:
                tensors = self.scheme.quantize(w, self.group_size, self.symmetric,
                                               hessian=self._hessian(parts, w), act_order=self.act_order)
                for p in parts:  # a K x K fp32 matrix per Linear (~32 GB for an 8B model): free it now
                    self.hessians.pop(p, None)
            else:
                tensors = self.scheme.quantize(w, self.group_size, self.symmetric)
            self._done[w_node.target] = tuple(tensors)
        return self._done[w_node.target]

    def _hessian(self, parts, w):
        """The GPTQ Hessian of a (fused) Linear, checked against its [N, K] weight."""
        if self.hessians is None:
            return None
        missing = [p for p in parts if p not in self.hessians]
        if missing:
            raise ValueError(f"{missing[0]}: no GPTQ Hessian (calibration never ran this Linear)")
        h = self.hessians[parts[0]]
        k = w.shape[1]
        if h.shape != (k, k):
            raise ValueError(f"{parts[0]}: Hessian {tuple(h.shape)} does not fit the weight {tuple(w.shape)}")
        if any(self.hessians[p] is not h and not torch.equal(self.hessians[p], h) for p in parts[1:]):
            raise ValueError(f"{'+'.join(parts)}: fused Linears read one input but got different Hessians")
        return h


def _parts(node):
    """The original module names of a (possibly fused) Linear node."""
    return node.meta.get("hsd_parts", [node.meta.get("hsd_module", node.name)])
