"""RotateHadamard: QuaRot's orthogonal rotations folded into the weights, so 4-bit per-token
activations see no outlier channels."""
import operator
import weakref

import torch
import torch.fx

from hsd.capture import is_linear, set_attr
from hsd.kernels.hadamard import hadamard_reference, split_size
from hsd.passes.base import Pass

READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
WRITERS = ("o_proj", "down_proj")
# ops between an RMSNorm's weight multiply and the Linears that read it (logits_to_keep slice)
PASS_THROUGH = (operator.getitem, "to", "contiguous")


def _role(node) -> str:
    return node.meta.get("hsd_module", node.name).rsplit(".", 1)[-1]


def _linear_args(node):
    w = node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return w, b


def _is_norm(node) -> bool:
    return (node.op == "call_function" and node.target in (operator.mul, torch.mul)
            and any(isinstance(a, torch.fx.Node) and a.op == "get_attr" and a.target.endswith("norm.weight")
                    for a in node.args))


def _norm_of(node):
    """The RMSNorm weight multiply feeding ``node`` through PASS_THROUGH ops, or None."""
    while not _is_norm(node):
        if node.op not in ("call_function", "call_method") or node.target not in PASS_THROUGH:
            return None
        index = node.args[1] if node.target is operator.getitem else (slice(None),)
        if not isinstance(index, tuple) or index[-1] != slice(None):
            return None  # a slice of the channels would not commute with the rotation
        node = node.args[0]
    return node


def _norm_weight(norm):
    return next(a for a in norm.args if isinstance(a, torch.fx.Node) and a.op == "get_attr")


def _head_dim(v_proj) -> int:
    """The last size of the view that splits v_proj's output into heads."""
    for user in v_proj.users:
        if user.op == "call_method" and user.target in ("view", "reshape"):
            shape = user.args[1] if len(user.args) == 2 else user.args[1:]
            return int(shape[-1])
    raise ValueError(f"{v_proj.meta.get('hsd_module')}: cannot find the view that splits it into heads")


def _rows(w, fn):
    """fn applied along the output dim of a weight [N, K]."""
    return fn(w.t()).t()


def _per_head(x, head_dim):
    """x @ blockdiag(H_hd, ...) / sqrt(hd) along the last dim (one Hadamard per head)."""
    return hadamard_reference(x.reshape(*x.shape[:-1], -1, head_dim)).reshape(x.shape)


class RotateHadamard(Pass):
    """Matches the Llama / Mistral / Qwen2 graph: RMSNorm weight multiplies (``*norm.weight``
    attributes) read by q/k/v, gate/up and lm_head; o_proj and down_proj writing the residual;
    the token embedding. Emits the same function with QuaRot's rotations folded in, Q = H D /
    sqrt(d) (Hadamard times a random +-1 diagonal drawn from ``seed``):
      norm weights folded into their readers and set to ones; embedding W_e Q; readers W Q;
      writers Q^T W (and their biases b Q); v_proj's heads rotated by H_hd and o_proj's inputs
      rotated back; an ``hsd::hadamard`` node on down_proj's input, with H folded into down_proj;
      lm_head untied from the embedding; the graph's hidden-state output rotated back (a
      d x d matmul, not a Linear, so it stays unquantized) so EAGLE heads see the original.
    Must run before FuseSiblingLinears and QuantizeLinear. Needs real (not meta) weights.
    """
    name = "rotate_hadamard"

    def __init__(self, seed: int = 0):
        self.seed = seed
        # attribute name -> rotated tensor, shared by the step graphs that hold it. Weak: once
        # QuantizeLinear has replaced a rotated Linear weight in every graph, its 16-bit copy is
        # freed (a later step graph rotates it again) instead of doubling the model's memory.
        self._done = weakref.WeakValueDictionary()

    def settings(self):
        return {"seed": self.seed}

    def __call__(self, gm: torch.fx.GraphModule):
        plan = self._plan(gm)
        for node, role in plan["linears"]:
            self._rewrite_linear(gm, node, role, plan)
        self._rewrite_embedding(gm, plan)
        self._rewrite_hidden(gm, plan)
        for norm in plan["norms"]:
            w = _norm_weight(norm)
            self._set(gm, w, w.target, lambda t: torch.ones_like(t))

    def _plan(self, gm):
        """Check the whole graph before changing anything."""
        linears = [n for n in gm.graph.nodes if is_linear(n)]
        embeds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.embedding]
        if len(embeds) != 1:
            raise ValueError(f"rotate_hadamard: expected one token embedding, found {len(embeds)}")
        plan = {"linears": [], "norms": set(), "embed": embeds[0], "head_dim": None}
        for node in linears:
            role = _role(node)
            if role not in READERS + WRITERS:
                raise ValueError(f"rotate_hadamard: Linear {node.meta.get('hsd_module', node.name)} is neither "
                                 f"a reader ({', '.join(READERS)}) nor a writer ({', '.join(WRITERS)}) of the residual")
            if any(a is not None and a.op != "get_attr" for a in _linear_args(node)):
                raise ValueError(f"rotate_hadamard: {node.meta.get('hsd_module')} weight is not a graph attribute")
            if role in READERS:
                norm = _norm_of(node.args[0])
                if norm is None:
                    raise ValueError(f"rotate_hadamard: {node.meta.get('hsd_module')} does not read an RMSNorm output")
                plan["norms"].add(norm)
            if role == "v_proj":
                plan["head_dim"] = _head_dim(node)
            plan["linears"].append((node, role))
        for norm in plan["norms"]:
            outside = [u for u in norm.users if not _reader_is_ok(u)]
            if outside:
                raise ValueError(f"rotate_hadamard: {_norm_weight(norm).target} output feeds {outside[0]}, not only Linears")
        if plan["head_dim"] is None:
            raise ValueError("rotate_hadamard: no v_proj Linear in the graph")
        weight = gm.get_buffer(plan["embed"].args[1].target)
        if weight.is_meta:
            raise ValueError("rotate_hadamard: weights are on the meta device; rotate real weights "
                             "(pre-quantized checkpoints must come rotated)")
        plan["dim"] = weight.shape[1]
        for what, n in (("hidden size", plan["dim"]), ("head dim", plan["head_dim"])):
            try:
                split_size(n)
            except ValueError as e:
                raise ValueError(f"rotate_hadamard: {what} {n}: {e}") from None
        for node, role in plan["linears"]:
            if role == "down_proj":
                try:
                    split_size(gm.get_buffer(node.args[1].target).shape[1])
                except ValueError as e:
                    raise ValueError(f"rotate_hadamard: {node.meta.get('hsd_module')} input: {e}") from None
        return plan

    def _signs(self, dim, device):
        g = torch.Generator().manual_seed(self.seed)
        return (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).to(device, torch.float64)

    def _q(self, x):
        """x @ Q along the last dim."""
        return hadamard_reference(x) * self._signs(x.shape[-1], x.device).to(x.dtype)

    def _set(self, gm, node, target, fn):
        """Point get_attr ``node`` at ``target`` = fn(its tensor), computed once per target."""
        rotated = self._done.get(target)
        if rotated is None:
            t = gm.get_buffer(node.target)
            work = torch.float64 if t.dtype == torch.float64 else torch.float32
            rotated = self._done[target] = fn(t.to(work)).to(t.dtype)
        set_attr(gm, target, rotated)
        node.target = target

    def _rewrite_linear(self, gm, node, role, plan):
        name = node.meta.get("hsd_module", node.name)
        w, b = _linear_args(node)
        hd = plan["head_dim"]
        if role in READERS:
            g = gm.get_buffer(_norm_weight(_norm_of(node.args[0])).target)
            fn = lambda t: self._q(t * g.to(t.dtype))  # noqa: E731
            if role == "v_proj":
                fn = lambda t, f=fn: _rows(f(t), lambda r: _per_head(r, hd))  # noqa: E731
            if role == "lm_head":
                w = _own_node(gm, node, w)  # a tied lm_head gets its own attribute
            self._set(gm, w, f"{name}.weight", fn)
            if b is not None and role == "v_proj":
                self._set(gm, b, f"{name}.bias", lambda t: _per_head(t, hd))
            return
        if role == "o_proj":
            fn = lambda t: _rows(_per_head(t, hd), self._q)  # noqa: E731
        else:
            fn = lambda t: _rows(hadamard_reference(t), self._q)  # noqa: E731
            with gm.graph.inserting_before(node):
                x = gm.graph.call_function(torch.ops.hsd.hadamard.default, (node.args[0],))
            node.replace_input_with(node.args[0], x)
        self._set(gm, w, f"{name}.weight", fn)
        if b is not None:
            self._set(gm, b, f"{name}.bias", self._q)

    def _rewrite_embedding(self, gm, plan):
        embed = plan["embed"]
        w = _own_node(gm, embed, embed.args[1])
        self._set(gm, w, w.target, self._q)

    def _rewrite_hidden(self, gm, plan):
        """hidden = rotated hidden @ Q^T diag(g): the original final-norm output."""
        output = next(n for n in gm.graph.nodes if n.op == "output")
        logits, hidden = output.args[0]
        norm = _norm_of(hidden)
        if norm is None:
            return
        g = _norm_weight(norm)
        dim = plan["dim"]
        with gm.graph.inserting_before(output):
            u = gm.graph.get_attr(g.target)
            back = gm.graph.call_function(torch.matmul, (hidden, u))
        eye = lambda t: torch.eye(dim, dtype=t.dtype, device=t.device)  # noqa: E731
        self._set(gm, u, "rotate.unrotate_hidden", lambda t: self._q(eye(t)).t() * t)
        output.args = ((logits, back),)


def _reader_is_ok(node):
    """Users of a norm output that may see the rotated stream: Linears (through PASS_THROUGH
    ops) and the graph output (rotated back in ``_rewrite_hidden``)."""
    if node.op == "output" or is_linear(node):
        return True
    if node.op in ("call_function", "call_method") and node.target in PASS_THROUGH:
        return all(_reader_is_ok(u) for u in node.users)
    return False


def _own_node(gm, user, attr):
    """A get_attr node read only by ``user`` (so retargeting it leaves other readers alone)."""
    if len(attr.users) == 1:
        return attr
    with gm.graph.inserting_before(user):
        own = gm.graph.get_attr(attr.target)
    user.replace_input_with(attr, own)
    return own

