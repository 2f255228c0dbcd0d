"""The "w4a8" / "w4a4" schemes and QSpec's LowBitActivations pass: model-level accuracy against
a plain fake-quantized reference, shared weight storage, bad input."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import hsd
from hsd import testing
from hsd.kernels import registry
from hsd.kernels.act_quant import dequantize, quantize_per_token_reference
from hsd.passes import LowBitActivations, PassError, PassManager, QuantizeLinear, node_kinds


def fake_quantized(model, group_size, kind):
    """The plain-transformers reference of quant="w4a8"/"w4a4": RTN weights dequantized, and every
    quantized Linear's input replaced by its per-token fake-quantized value."""
    model = testing.fake_quantized(model, group_size)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.register_forward_pre_hook(
                lambda mod, args: (dequantize(*quantize_per_token_reference(args[0], kind)).to(args[0].dtype),))
    return model


def _sqnr(model, ref_model, ids):
    with torch.no_grad():
        return testing.sqnr_db(model(ids).logits, ref_model(ids).logits)


@settings(max_examples=5)
@given(testing.model_configs(width_multiple=32), testing.seeds(), st.sampled_from(["w4a8", "w4a4"]),
       st.sampled_from([32, -1]))
def test_scheme_matches_fake_quantized_reference(config, seed, scheme, group_size):
    """The graph computes what the fake-quantized model computes (>= 40 dB), so its accuracy
    against the float model is the reference's (within 1 dB); every Linear but the lm_head is
    one quantize_per_token + one w4a8_linear."""
    model = testing.tiny_model(config, seed)
    ids = testing.random_ids(config, seed)
    reference = fake_quantized(model, group_size, {"w4a8": "int8", "w4a4": "int4"}[scheme])
    after, _ = PassManager([QuantizeLinear(scheme, group_size=group_size)])(hsd.capture.capture(model, *ids.shape))
    logits = testing.run_graph(after, ids)[0]
    with torch.no_grad():
        expected, exact = reference(ids).logits, model(ids).logits
    assert testing.sqnr_db(expected, logits) > 40
    assert testing.sqnr_db(exact, logits) > testing.sqnr_db(exact, expected) - 1
    kinds = node_kinds(after)
    layers = 7 * config.num_hidden_layers
    assert kinds["hsd.w4a8_linear"] == kinds["hsd.quantize_per_token"] == layers
    assert kinds["hsd.w4a16_linear"] == 0 and kinds["linear"] == 1


def _quantized(model, ids, *passes, captured=None):
    captured = captured or hsd.capture.capture(model, *ids.shape)
    gm, _ = PassManager(list(passes))(torch.fx.GraphModule(captured, copy.deepcopy(captured.graph)))
    return gm


def test_w4a4_is_less_accurate_than_w4a8():
    config = testing.tiny_config()
    model, ids = testing.tiny_model(config), testing.random_ids(config, length=12)
    with torch.no_grad():
        exact = model(ids).logits
    gm = hsd.capture.capture(model, *ids.shape)
    db = {s: testing.sqnr_db(exact, testing.run_graph(_quantized(model, ids, QuantizeLinear(s, group_size=32),
                                                                 captured=gm), ids)[0])
          for s in ("w4a16", "w4a8", "w4a4")}
    assert db["w4a16"] - 1 < db["w4a8"] <= db["w4a16"] + 0.5 and db["w4a4"] < db["w4a8"] - 3, db


def test_compile_with_triton_kernel_under_interpreter():
    config = testing.tiny_config()
    model, ids = testing.tiny_model(config), testing.random_ids(config)
    reference = fake_quantized(model, 32, "int8")
    with registry.use("w4a8_linear", "triton"):
        engine = hsd.compile(model, quant="w4a8", group_size=32, max_seq_len=16)
        testing.assert_engine_matches_model(engine, reference, ids, min_sqnr_db=40)


def test_low_bit_activations_shares_the_w4a16_weights():
    """QSpec: the draft graph (LowBitActivations after W4A16) reads the very tensors the verify
    graph reads - same attribute names, same storage - and adds none."""
    config = testing.tiny_config()
    engine = hsd.compile(testing.tiny_model(config), quant="w4a16", group_size=32, max_seq_len=32,
                         prefill_chunk=4, spec="qspec", spec_config=hsd.spec.QSpecConfig(k=2, act_bits=4))
    engine.generate(testing.random_ids(config, length=4), max_new_tokens=3)
    verify, drafting = engine.pipeline.target.graphs[3], engine.pipeline.draft.graphs[1]
    weights = dict(verify.named_buffers())
    assert any(name.endswith(".qweight") for name in weights)
    for name, t in drafting.named_buffers():
        assert t.data_ptr() == weights[name].data_ptr(), name
    assert {n for n, _ in drafting.named_buffers()} == set(weights)
    kinds = node_kinds(drafting)
    assert kinds["hsd.w4a8_linear"] == node_kinds(verify)["hsd.w4a16_linear"] > 0
    assert kinds["hsd.w4a16_linear"] == 0
    args = [n.args for n in drafting.graph.nodes if n.target is torch.ops.hsd.quantize_per_token.default]
    assert args and all(a[1] == "int4" for a in args)


def test_low_bit_activations_matches_scheme():
    """W4A16 then LowBitActivations("int8") computes what the "w4a8" scheme computes."""
    config = testing.tiny_config()
    model, ids = testing.tiny_model(config), testing.random_ids(config)
    gm = hsd.capture.capture(model, *ids.shape)
    draft = _quantized(model, ids, QuantizeLinear("w4a16", group_size=32), LowBitActivations("int8"), captured=gm)
    scheme = _quantized(model, ids, QuantizeLinear("w4a8", group_size=32), captured=gm)
    torch.testing.assert_close(testing.run_graph(draft, ids), testing.run_graph(scheme, ids))


def test_bad_input():
    with pytest.raises(ValueError, match="'int8' or 'int4', got 'fp8'"):
        LowBitActivations("fp8")
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    ids = testing.random_ids(config, length=4)
    gm = hsd.capture.capture(model, *ids.shape)
    with pytest.raises(PassError, match=r"quantize_linear.*q_proj.*multiple of 32.*got 16"):
        _quantized(model, ids, QuantizeLinear("w4a8", group_size=16), captured=gm)
    with pytest.raises(PassError, match=r"low_bit_activations.*multiple of 32.*got 16"):
        _quantized(model, ids, QuantizeLinear("w4a16", group_size=16), LowBitActivations("int4"), captured=gm)


@pytest.mark.gpu
def test_cuda_engine_matches_fake_quantized_reference():
    """Inductor + CUDA graphs around the Triton kernels, the quantizations storing q in the
    GEMMs' dot order (hidden 128, intermediate 256: every K a multiple of 128), against plain
    transformers doing the same fake quantization."""
    config = testing.tiny_config("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    model = testing.tiny_model(config, dtype=torch.float16).cuda()
    ids = testing.random_ids(config, length=9).cuda()
    engine = hsd.compile(model, quant="w4a8", max_seq_len=64, prefill_chunk=16)
    testing.assert_engine_matches_model(engine, fake_quantized(model, 128, "int8"), ids, min_sqnr_db=30)
