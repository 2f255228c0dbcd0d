"""RotateHadamard: the rotated graph computes the original logits and hidden states; rotations
help 4-bit per-token activations with outlier channels; weights shared, user tensors untouched."""
import copy

import pytest
import torch
from hypothesis import given, settings

import hsd
from hsd import testing
from hsd.capture import capture, is_linear
from hsd.kernels import act_quant
from hsd.passes import FuseSiblingLinears, PassError, PassManager, QuantizeLinear, RotateHadamard, node_kinds

# HF's RMSNorm runs in fp32 even in an fp64 model, so "exact" means fp32 rounding (~135 dB here)
EXACT_DB = 110


def randomize(model, seed):
    """Norm weights and biases away from HF's init (ones / zeros), so folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inject_outliers(model, scale, channels=(1, 7, 20)):
    """Scale a few channels of every layer's norm weights by ``scale`` and the matching weight
    columns of the Linears reading them by 1 / scale: the same function, but Linear inputs with
    ``scale`` times larger outlier channels (what real LLMs' activations look like)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, readers in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[list(channels)] *= scale
                for module in (layer.self_attn, layer.mlp):
                    for r in readers:
                        if hasattr(module, r):
                            getattr(module, r).weight[:, list(channels)] /= scale
    return model


@settings(max_examples=5)
@given(testing.model_configs(), testing.seeds())
def test_rotation_is_exact(config, seed):
    model = randomize(testing.tiny_model(config, seed, torch.float64), seed)
    _, after = testing.assert_pass_equivalent(RotateHadamard(seed), model, testing.random_ids(config, seed),
                                              min_sqnr_db=EXACT_DB)
    kinds = node_kinds(after)
    assert kinds["hsd.hadamard"] == config.num_hidden_layers and kinds["linear"] == 7 * config.num_hidden_layers + 1
    norms = [b for name, b in after.named_buffers() if name.endswith("norm.weight")]
    assert norms and all(bool((b == 1).all()) for b in norms)


def test_rotated_weights_change_and_are_shared_between_step_graphs():
    config = testing.tiny_config("qwen2", tie_word_embeddings=True)
    model = randomize(testing.tiny_model(config), 0)
    original = {name: p.clone() for name, p in model.state_dict().items()}
    rotate = RotateHadamard()
    graphs = [PassManager([rotate])(capture(model, 1, t))[0] for t in (1, 5)]
    for name, p in model.state_dict().items():  # capture shares tensors: none may change in place
        assert torch.equal(p, original[name]), name
    first, second = (dict(g.named_buffers()) for g in graphs)
    assert first.keys() == second.keys()
    assert all(first[k].data_ptr() == second[k].data_ptr() for k in first)  # one copy, not one per step
    assert not torch.allclose(first["model.layers.0.self_attn.q_proj.weight"],
                              original["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(first["model.layers.0.self_attn.k_proj.bias"], original["model.layers.0.self_attn.k_proj.bias"])
    # the tied lm_head got its own tensor (the final norm is folded into it, not into the embedding)
    assert first["lm_head.weight"].shape == first["model.embed_tokens.weight"].shape
    assert not torch.allclose(first["lm_head.weight"], first["model.embed_tokens.weight"])


def _int4(x):
    return act_quant.dequantize(*act_quant.quantize_per_token_reference(x, "int4")).to(x.dtype)


def fake_int4_activations(gm):
    """Per-token int4 fake quantization of every Linear input but the lm_head's."""
    for node in list(gm.graph.nodes):
        if is_linear(node) and node.meta.get("hsd_module") != "lm_head":
            with gm.graph.inserting_before(node):
                q = gm.graph.call_function(_int4, (node.args[0],))
            node.replace_input_with(node.args[0], q)


def _logits_sqnr(model, ids, passes):
    gm = capture(model, *ids.shape)
    ref = testing.run_graph(gm, ids)[0]
    after, _ = PassManager(passes)(torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)))
    return testing.sqnr_db(ref, testing.run_graph(after, ids)[0])


def test_rotation_rescues_int4_activations_with_outliers():
    config = testing.tiny_config("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32, initializer_range=0.02)
    model = randomize(testing.tiny_model(config, 1), 1)
    ids = testing.random_ids(config, 1, length=16)
    clean = _logits_sqnr(model, ids, [fake_int4_activations])
    inject_outliers(model, 50.0)
    plain = _logits_sqnr(model, ids, [fake_int4_activations])
    rotated = _logits_sqnr(model, ids, [RotateHadamard(), fake_int4_activations])
    # outliers wreck per-token int4; the rotation (norms folded, channels spread) undoes that
    assert plain < clean - 10 and rotated > plain + 12 and rotated > clean, (clean, plain, rotated)


def test_runs_before_fusion_and_w4a16():
    config = testing.tiny_config("qwen2", intermediate_size=96)  # down_proj input 96 = 12 * 8
    model = randomize(testing.tiny_model(config), 2)
    passes = [RotateHadamard(), FuseSiblingLinears(), QuantizeLinear("w4a16", group_size=32)]
    gm, _ = PassManager(passes)(capture(model, 1, 6))
    down = [n for n in gm.graph.nodes if n.meta.get("hsd_module", "").endswith("down_proj")]
    assert down and all(n.args[0].target is torch.ops.hsd.hadamard.default for n in down)
    assert node_kinds(gm)["hsd.w4a16_linear"] == 4 * config.num_hidden_layers


def test_compiled_engine_with_rotation_matches_model():
    config = testing.tiny_config("mistral")
    model = randomize(testing.tiny_model(config, 3), 3)
    engine = hsd.compile(model, passes=[RotateHadamard(seed=5)], max_seq_len=32, prefill_chunk=4)
    testing.assert_engine_matches_model(engine, model, testing.random_ids(config, 3, length=9))
    testing.assert_generate_matches_hf(engine, model, testing.random_ids(config, 4, length=5), max_new_tokens=6)


@pytest.mark.parametrize("overrides, match", [
    (dict(hidden_size=144), "hidden size 144"),
    (dict(intermediate_size=72), "mlp.down_proj input: hadamard: size 72"),
    (dict(head_dim=36), "head dim 36"),
])
def test_unsupported_widths_raise(overrides, match):
    config = testing.tiny_config(**overrides)
    gm = capture(testing.tiny_model(config), 1, 3)
    with pytest.raises(PassError, match=f"rotate_hadamard.*{match}"):
        PassManager([RotateHadamard()])(gm)


def test_meta_weights_raise():
    config = testing.tiny_config()
    with torch.device("meta"):
        model = testing.tiny_model(config)
    with pytest.raises(PassError, match="meta device"):
        PassManager([RotateHadamard()])(capture(model, 1, 3))


def test_rotated_linear_weights_are_released_once_quantized():
    """The pass's cache is weak: after QuantizeLinear replaced them, no 16-bit rotated Linear
    weight stays alive (they would double a model's memory)."""
    import gc
    from hsd.passes import FuseSiblingLinears, QuantizeLinear
    config = testing.tiny_config()
    model = randomize(testing.tiny_model(config), 0)
    rotate = RotateHadamard()
    gm, _ = PassManager([rotate, FuseSiblingLinears(), QuantizeLinear(group_size=32)])(capture(model, 1, 3))
    gc.collect()
    kept = set(rotate._done.keys())
    assert not any(name.endswith("proj.weight") for name in kept), kept
    assert "lm_head.weight" in kept   # still read by the graph: shared with the next step graph
