"""FuseSiluMulQuant: silu(gate) * up + down_proj's activation quantization on tiny models, in
hsd.compile's pass lists, and on hand-built graphs it must or must not match."""
import copy
import operator

import pytest
import torch
import torch.nn.functional as F

import hsd
from hsd import testing
from hsd.capture import capture
from hsd.engine import Engine
from hsd.kernels import registry
from hsd.passes import (FuseRMSNormQuant, FuseSiblingLinears, FuseSiluMulQuant, PassManager, QuantizeLinear,
                        node_kinds)

QUANTIZE = torch.ops.hsd.quantize_per_token.default


@pytest.mark.parametrize("quant", ["w8a8", "w4a8"])
@pytest.mark.parametrize("fuse", [True, False])
def test_fusion_is_exact_on_a_tiny_model(quant, fuse):
    """gate and up are two GEMM outputs, or slices of one fused gate_up GEMM; on the CPU the op's
    reference runs the very ops it replaces."""
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    ids = testing.random_ids(config)
    passes = ([FuseSiblingLinears()] if fuse else []) + [QuantizeLinear(quant, group_size=32), FuseRMSNormQuant()]
    before, _ = PassManager(passes)(capture(model, *ids.shape))
    after = torch.fx.GraphModule(before, copy.deepcopy(before.graph))
    after, _ = PassManager([FuseSiluMulQuant()])(after)
    for ref, out in zip(testing.run_graph(before, ids), testing.run_graph(after, ids)):
        assert torch.equal(ref, out)
    kinds, unfused = node_kinds(after), node_kinds(before)
    layers = config.num_hidden_layers
    assert kinds["hsd.silu_mul_quant"] == layers and kinds["silu"] == 0
    assert kinds["hsd.quantize_per_token"] == unfused["hsd.quantize_per_token"] - layers  # o_proj's stay


@pytest.mark.parametrize("quant", ["w8a8", "w4a8"])
def test_compiled_engine_matches_the_unfused_engine(quant):
    """hsd.compile runs the pass right after FuseRMSNormQuant; the engine without it computes the
    same logits, and with the op on its Triton kernel under the interpreter, to > 40 dB."""
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    ids = testing.random_ids(config)
    engine = hsd.compile(model, quant=quant, group_size=32, max_seq_len=32)
    without = [p for p in engine.passes.passes if not isinstance(p, FuseSiluMulQuant)]
    unfused = Engine(engine.model, PassManager(without), engine.cache, engine.backend, engine.prefill_chunk)
    ref = unfused(ids).logits
    assert torch.equal(engine(ids).logits, ref)
    with registry.use("silu_mul_quant", "triton"):
        out = engine(ids).logits  # the ops look their implementation up at run time
    assert testing.sqnr_db(ref, out) > 40
    names = [r.name for r in next(iter(engine.pass_report.values()))]
    assert names.index("fuse_silu_mul_quant") == names.index("fuse_rmsnorm_quant") + 1
    (tokens, gm), = engine.graphs.items()
    kinds, unfused_kinds = node_kinds(gm), node_kinds(unfused.graphs[tokens])
    layers = config.num_hidden_layers
    assert kinds["hsd.silu_mul_quant"] == layers
    assert kinds["hsd.quantize_per_token"] == unfused_kinds["hsd.quantize_per_token"] - layers


def test_a_rotated_product_is_left_alone_and_qspec_a8_drafts_fused():
    """W4A4 (and QSpec's 4-bit drafts) put hsd::hadamard between the product and its
    quantization: nothing matches. QSpec's 8-bit drafter fuses every layer's product."""
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    ids = testing.random_ids(config, length=4)
    engine = hsd.compile(model, quant="w4a4", group_size=32, max_seq_len=32)
    engine(ids)
    assert node_kinds(next(iter(engine.graphs.values())))["hsd.silu_mul_quant"] == 0
    qspec = hsd.compile(model, quant="w4a16", group_size=32, max_seq_len=32, prefill_chunk=4, spec="qspec",
                        spec_config=hsd.spec.QSpecConfig(k=2, act_bits=8))
    qspec.generate(ids, max_new_tokens=4)
    kinds = node_kinds(qspec.pipeline.draft.graphs[1])
    assert kinds["hsd.silu_mul_quant"] == config.num_hidden_layers and kinds["hsd.w4a16_linear"] == 0


def _graph(product, also_output=False, captured=None):
    """quantize_per_token(product(gate, up)) over placeholders gate, up [2, 8] (``captured``: node
    name -> its value as dynamo records it); outputs (q, scale) and, with ``also_output``, the
    product too."""
    graph = torch.fx.Graph()
    gate, up = graph.placeholder("gate"), graph.placeholder("up")
    h = product(graph, gate, up)
    for node in graph.nodes:
        if captured and node.name in captured:
            node.meta["example_value"] = captured[node.name]
    q = graph.call_function(QUANTIZE, (h, "int8"))
    graph.output((graph.call_function(operator.getitem, (q, 0)), graph.call_function(operator.getitem, (q, 1)),
                  *((h,) if also_output else ())))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _silu(graph, x, *args, **kwargs):
    return graph.call_function(F.silu, (x, *args), kwargs)


FUSED = {
    "silu(gate) * up": lambda g, gate, up: g.call_function(operator.mul, (_silu(g, gate), up)),
    "up * silu(gate)": lambda g, gate, up: g.call_function(operator.mul, (up, _silu(g, gate))),
    "torch.mul, inplace=False": lambda g, gate, up: g.call_function(torch.mul, (_silu(g, gate, inplace=False), up)),
}
UNCHANGED = {
    "silu(gate) * 2.0": lambda g, gate, up: g.call_function(operator.mul, (_silu(g, gate), 2.0)),
    "in-place silu": lambda g, gate, up: g.call_function(operator.mul, (_silu(g, gate, inplace=True), up)),
    "gelu(gate) * up": lambda g, gate, up: g.call_function(operator.mul, (g.call_function(F.gelu, (gate,)), up)),
    "gate * up": lambda g, gate, up: g.call_function(operator.mul, (gate, up)),
    "silu(gate) + up": lambda g, gate, up: g.call_function(operator.add, (_silu(g, gate), up)),
}


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("also_output", [False, True])
def test_matches_either_operand_order_and_keeps_other_users(name, also_output):
    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    before = _graph(FUSED[name], also_output)
    after = torch.fx.GraphModule(before, copy.deepcopy(before.graph))
    after, _ = PassManager([FuseSiluMulQuant()])(after)
    for ref, out in zip(before(gate, up), after(gate, up)):
        assert torch.equal(ref, out)
    fused = next(n for n in after.graph.nodes if n.target is torch.ops.hsd.silu_mul_quant.default)
    assert [a.name for a in fused.args[:2]] == ["gate", "up"] and fused.args[2] == "int8"
    kinds = node_kinds(after)
    assert kinds["hsd.quantize_per_token"] == 0 and kinds["silu"] == int(also_output)


@pytest.mark.parametrize("name", UNCHANGED)
def test_other_products_are_left_alone(name):
    gm = _graph(UNCHANGED[name])
    code = gm.code
    gm, records = PassManager([FuseSiluMulQuant()])(gm)
    assert gm.code == code and not records[0].added


@pytest.mark.parametrize("up_value", [torch.empty(1, 8), torch.empty(2, 8, dtype=torch.float64)])
def test_a_broadcast_or_promoting_product_is_left_alone(up_value):
    """Where dynamo's captured values show up broadcasting or promoting, the fused op (one shape,
    one dtype) would compute something else."""
    product = FUSED["silu(gate) * up"]
    gm = _graph(product, captured={"silu": torch.empty(2, 8), "up": up_value})
    code = gm.code
    gm, _ = PassManager([FuseSiluMulQuant()])(gm)
    assert gm.code == code
