"""The compiled backends (functionalization of the cache-mutating op included) equal eager."""
import operator

import pytest
import torch

import hsd
from hsd import testing
from hsd.kernels import ops, registry, w4a16  # noqa: F401  (ops registers torch.ops.hsd.*)
from hsd.lowering.dot_order import w4a16_dot_order, w4a8_dot_order


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_backend_matches_eager(backend):
    config = testing.tiny_config("qwen2", num_hidden_layers=1)
    model = testing.tiny_model(config)
    ids = testing.random_ids(config, length=6)
    engine = hsd.compile(model, quant="w4a16", group_size=32, backend=backend, max_seq_len=16, prefill_chunk=4)
    eager = hsd.compile(model, quant="w4a16", group_size=32, backend="eager", max_seq_len=16, prefill_chunk=4)
    torch.testing.assert_close(engine(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-5)
    # the cache the compiled graph wrote is the one the next step reads
    assert engine.generate(ids, max_new_tokens=5).tolist() == eager.generate(ids, max_new_tokens=5).tolist()
    torch.testing.assert_close(engine.cache.k, eager.cache.k)


@pytest.mark.gpu
def test_cuda_engine_matches_eager_model():
    config = testing.tiny_config("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    model = testing.tiny_model(config, dtype=torch.float16).cuda()
    ids = testing.random_ids(config, length=9).cuda()
    engine = hsd.compile(model, max_seq_len=64, prefill_chunk=16)
    testing.assert_engine_matches_model(engine, model, ids, min_sqnr_db=40)
    q = hsd.compile(model, quant="w4a16", max_seq_len=64, prefill_chunk=16)
    testing.assert_engine_matches_model(q, testing.fake_quantized(model), ids, min_sqnr_db=35)
    assert q.generate(ids, max_new_tokens=10).shape == (1, 19)


@pytest.mark.gpu
def test_cuda_graphed_tree_step_keeps_the_causal_mask(tmp_path):
    """A tree step as large as the prefill chunk shares its shape: replaying it with a tree mask
    must not change the causal mask later prefills use (EAGLE-2 once diverged from AR so)."""
    from hsd.eagle import save_random_eagle_head
    from hsd.eagle2 import Eagle2Config
    config = testing.tiny_config("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    target = testing.tiny_model(config).cuda()
    save_random_eagle_head(tmp_path, config, 0)
    ids = testing.random_ids(config, length=12).cuda()
    expected = hsd.compile(target, max_seq_len=96, prefill_chunk=16).generate(ids, max_new_tokens=24)
    engine = hsd.compile(target, max_seq_len=96, prefill_chunk=16, spec="eagle2", draft=str(tmp_path),
                         spec_config=Eagle2Config(depth=3, top_k=4, total_tokens=16))
    for _ in range(2):
        assert engine.generate(ids, max_new_tokens=24).tolist() == expected.tolist()


def _one_w4a16_graph(n: int, k: int, group: int) -> torch.fx.GraphModule:
    root = torch.nn.Module()
    qweight, scales, zeros = w4a16.quantize_rtn(torch.randn(n, k), group, symmetric=False)
    root.register_buffer("qweight", qweight)
    root.register_buffer("scales", scales)
    root.register_buffer("zeros", zeros)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    attrs = [graph.get_attr(name) for name in ("qweight", "scales", "zeros")]
    graph.output(graph.call_function(torch.ops.hsd.w4a16_linear.default, (x, *attrs, None, group)))
    return torch.fx.GraphModule(root, graph)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_w4a16_dot_order_rewrite(impl):
    """The lowering rewrite feeds the op dot-ordered activations (K a multiple of 128 only) and
    the step computes what it did before, through the Triton kernel (interpreter) or the reference."""
    x = torch.randn(3, 5, 256)
    gm = _one_w4a16_graph(64, 256, 32)
    with registry.use("w4a16_linear", impl):
        want = gm(x)
        assert w4a16_dot_order(gm) == 1 and w4a16_dot_order(gm) == 0     # once only
        torch.testing.assert_close(gm(x), want, atol=1e-5, rtol=1e-5)
    op = next(n for n in gm.graph.nodes if n.target is torch.ops.hsd.w4a16_linear.default)
    assert op.args[-1] is True and op.args[0].target is w4a16.dot_order
    assert w4a16_dot_order(_one_w4a16_graph(64, 96, 32)) == 0            # K = 96: left as is


def _w4a8_graph(k: int, group: int, norm: bool, extra_user: bool = False) -> torch.fx.GraphModule:
    """x -> quantize_per_token (or rmsnorm_quant) -> two w4a8_linear ops; ``extra_user``: q is
    also a graph output (a reader that wants the natural order)."""
    root, graph = torch.nn.Module(), torch.fx.Graph()
    x = graph.placeholder("x")
    if norm:
        root.register_buffer("norm_weight", torch.rand(k) + 0.5)
        quant = graph.call_function(torch.ops.hsd.rmsnorm_quant.default, (x, graph.get_attr("norm_weight"), 1e-6, "int8"))
    else:
        quant = graph.call_function(torch.ops.hsd.quantize_per_token.default, (x, "int4"))
    q, scale = (graph.call_function(operator.getitem, (quant, i)) for i in range(2))
    outs = []
    for i, n in enumerate((32, 48)):
        qweight, scales, _ = w4a16.quantize_rtn(torch.randn(n, k), group)
        root.register_buffer(f"qweight{i}", qweight)
        root.register_buffer(f"scales{i}", scales)
        attrs = [graph.get_attr(f"{name}{i}") for name in ("qweight", "scales")]
        outs.append(graph.call_function(torch.ops.hsd.w4a8_linear.default, (q, scale, *attrs, None, None, group)))
    graph.output((*outs, q) if extra_user else tuple(outs))
    return torch.fx.GraphModule(root, graph)


@pytest.mark.parametrize("norm", [False, True])
def test_w4a8_dot_order_rewrite(norm):
    """The quantization stores q in dot order and both GEMMs read it so; the outputs are what
    they were (Triton kernels under the interpreter). Left as is: K not a multiple of 128, groups
    the kernel cannot split (32), and a q that something else reads too."""
    x = torch.randn(3, 256)
    gm = _w4a8_graph(256, 128, norm)
    with registry.use("w4a8_linear", "triton"), registry.use("quantize_per_token", "triton"), \
            registry.use("rmsnorm_quant", "triton"):
        want = gm(x)
        assert w4a8_dot_order(gm) == 1 and w4a8_dot_order(gm) == 0
        for got, expected in zip(gm(x), want):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    ops_ = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    assert all(n.args[-1] is True for n in ops_)
    assert w4a8_dot_order(_w4a8_graph(256, 256, norm)) == 1   # per channel: G = K
    for k, group, extra in ((192, 64, False), (256, 32, False), (256, 128, True)):
        assert w4a8_dot_order(_w4a8_graph(k, group, norm, extra)) == 0
