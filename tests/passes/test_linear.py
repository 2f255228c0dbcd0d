import pytest
import torch
from hypothesis import given, strategies as st

import hsd
from hsd import testing
from hsd.capture import is_linear
from hsd.kernels import registry
from hsd.passes import FuseSiblingLinears, PassError, QuantizeLinear, node_kinds


@given(testing.model_configs(), testing.seeds())
def test_fuse_sibling_linears_is_exact(config, seed):
    model = testing.tiny_model(config, seed)
    _, after = testing.assert_pass_equivalent(FuseSiblingLinears(), model, testing.random_ids(config, seed))
    # q/k/v -> 1 and gate/up -> 1 per layer; o, down and lm_head stay
    assert node_kinds(after)["linear"] == 4 * config.num_hidden_layers + 1


def test_fusion_keeps_biases():
    config = testing.tiny_config("qwen2")
    model = testing.tiny_model(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    _, after = testing.assert_pass_equivalent(FuseSiblingLinears(), model, testing.random_ids(config))
    fused = [n for n in after.graph.nodes if is_linear(n) and "q_proj+" in n.meta["hsd_module"]]
    assert fused and all(n.args[2] is not None for n in fused)


def _rtn_reference_sqnr(model, ids, group_size):
    with torch.no_grad():
        return testing.sqnr_db(model(ids).logits, testing.fake_quantized(model, group_size)(ids).logits)


@given(testing.model_configs(width_multiple=32), testing.seeds(), st.sampled_from([32, -1]))
def test_quantize_linear_matches_rtn_reference(config, seed, group_size):
    model = testing.tiny_model(config, seed)
    ids = testing.random_ids(config, seed)
    expected = _rtn_reference_sqnr(model, ids, group_size)
    _, after = testing.assert_pass_equivalent(QuantizeLinear("w4a16", group_size=group_size), model, ids,
                                              min_sqnr_db=min(expected, 30) - 3)
    kinds = node_kinds(after)
    assert kinds["hsd.w4a16_linear"] == 7 * config.num_hidden_layers and kinds["linear"] == 1  # lm_head kept


def test_quantize_linear_with_triton_kernel_under_interpreter():
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    ids = testing.random_ids(config)
    with registry.use("w4a16_linear", "triton"):
        testing.assert_pass_equivalent(QuantizeLinear("w4a16", group_size=32), model, ids,
                                       min_sqnr_db=min(_rtn_reference_sqnr(model, ids, 32), 30) - 3)


def test_group_size_must_divide_width():
    config = testing.tiny_config()
    config.intermediate_size = 48
    model = testing.tiny_model(config)
    with pytest.raises(PassError, match=r"quantize_linear.*mlp.down_proj: in_features 48 is not divisible by the group size 32"):
        hsd.compile(model, quant="w4a16", group_size=32, max_seq_len=32)(testing.random_ids(config))


def test_unknown_quant_is_refused():
    with pytest.raises(ValueError, match="unknown quant .w3a16.; known: .*w4a16"):
        hsd.compile(testing.tiny_model(testing.tiny_config()), quant="w3a16")


def test_replaced_weights_are_released():
    config = testing.tiny_config(tie_word_embeddings=False)
    model = testing.tiny_model(config)
    gm = hsd.capture.capture(model, 1, 4)
    gm, _ = hsd.passes.PassManager([FuseSiblingLinears(), QuantizeLinear(group_size=32)])(gm)
    names = {name for name, _ in gm.named_buffers()}
    assert not any(name.endswith("proj.weight") for name in names), names
    assert "lm_head.weight" in names and "model.layers.0.mlp.down_proj.qweight" in names
