"""Capture a Hugging Face causal LM into a torch.fx graph with dynamo.

The captured graph is the model's plain forward for one fixed [batch, tokens] shape, without any
transformers cache: ``(input_ids, position_ids) -> (logits, hidden)`` where ``hidden`` is the
final-norm output that feeds the lm_head (EAGLE heads need it). Weights are ``get_attr`` nodes
named by their module path (``model.layers.0.self_attn.q_proj.weight``), so passes can replace
them. Nodes are annotated in ``node.meta``:
  "hsd_module": module path of a Linear call ("model.layers.0.mlp.down_proj", "lm_head")
The KV cache enters later, when ``RewriteAttention`` turns each SDPA node into ``hsd::attention``.
"""
import re

import torch
import torch.fx

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    pass


def check_supported(config, max_seq_len: int):
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"hsd cannot compile model_type {kind!r} ({type(config).__name__}); "
            f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_seq_len:
        raise UnsupportedModelError(
            f"{kind} uses sliding-window attention ({window} tokens) and hsd's attention op is full "
            f"attention: pass max_seq_len <= {window}")


def capture(model: torch.nn.Module, batch: int, tokens: int, device=None) -> torch.fx.GraphModule:
    """Trace ``model`` for input_ids of shape [batch, tokens]; see the module docstring.

    A skeleton on the meta device (no weight ever materialised) is traced on meta; ``device``
    then names where the graph will run, and device constants in the graph are retargeted."""
    graphs = []

    def grab(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    traced_on = next(model.parameters()).device
    input_ids = torch.zeros(batch, tokens, dtype=torch.long, device=traced_on)
    position_ids = torch.arange(tokens, device=traced_on).expand(batch, tokens)
    torch._dynamo.reset()
    traced = torch.compile(model.forward, backend=grab, fullgraph=True, dynamic=False)
    with torch.no_grad():
        traced(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    torch._dynamo.reset()
    (gm, example_inputs), = graphs
    gm = _own_graph(model, gm, example_inputs)
    if device is not None and torch.device(device) != torch.device(traced_on):
        _retarget(gm, traced_on, torch.device(device))
    return gm


def _retarget(gm, old: torch.device, new: torch.device):
    swap = lambda a: new if isinstance(a, torch.device) and a == old else a
    for node in gm.graph.nodes:
        node.args = torch.fx.node.map_aggregate(node.args, swap)
        node.kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
    gm.recompile()


def _own_graph(model, gm: torch.fx.GraphModule, example_inputs) -> torch.fx.GraphModule:
    """Turn dynamo's graph (weights lifted to placeholders) into one whose weights are attributes."""
    names = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), name)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        if id(example) in names:
            target = names[id(example)]
            set_attr(gm, target, example.detach())
            with graph.inserting_before(node):
                attr = graph.get_attr(target)
            attr.meta.update(node.meta)
            node.replace_all_uses_with(attr)
            graph.erase_node(node)
        else:
            for arg in ("input_ids", "position_ids"):
                if arg in node.name:
                    node.target = node.name = arg
    output = next(n for n in graph.nodes if n.op == "output")
    logits = torch.fx.node.map_aggregate(output.args[0], lambda n: n)
    while isinstance(logits, (tuple, list)):
        logits = logits[0]
    for node in graph.nodes:
        if is_linear(node):
            node.meta["hsd_module"] = _module_path(node)
    if not is_linear(logits):
        raise UnsupportedModelError("captured graph does not end in the lm_head Linear")
    hidden = logits.args[0]
    output.args = ((logits, hidden),)
    graph.eliminate_dead_code()
    owned = torch.fx.GraphModule(gm, graph)
    owned.graph.lint()
    return owned


def set_attr(root: torch.nn.Module, target: str, value):
    """setattr for a dotted path, creating empty parent modules on the way."""
    *parents, name = target.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    if isinstance(value, torch.Tensor):
        root.register_buffer(name, value, persistent=False)
    else:
        setattr(root, name, value)


def is_linear(node) -> bool:
    return node.op == "call_function" and node.target is torch._C._nn.linear


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        # dynamo names the root by how it was passed: L['self'].model..., L['args'][0].model...
        return re.sub(r"^L(\[[^\]]*\])+\.?", "", list(stack.values())[-1][0])
    weight = node.args[1]
    return weight.target.rsplit(".", 1)[0] if weight.op == "get_attr" else node.name
