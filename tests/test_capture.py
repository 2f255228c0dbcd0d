import pytest
import torch
from hypothesis import given

from hsd import testing
from hsd.capture import UnsupportedModelError, capture, is_linear


@given(testing.model_configs(), testing.seeds())
def test_captured_graph_equals_eager(config, seed):
    model = testing.tiny_model(config, seed)
    ids = testing.random_ids(config, seed, length=6)
    gm = capture(model, *ids.shape)
    logits, hidden = testing.run_graph(gm, ids)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, ref.hidden_states[-1], atol=1e-5, rtol=1e-5)


def test_weights_are_attributes_and_linears_know_their_module():
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    gm = capture(model, 1, 4)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["input_ids", "position_ids"]
    modules = [n.meta["hsd_module"] for n in gm.graph.nodes if is_linear(n)]
    layers = config.num_hidden_layers
    assert len(modules) == 7 * layers + 1 and modules[-1] == "lm_head"
    assert "model.layers.0.self_attn.q_proj" in modules and f"model.layers.{layers - 1}.mlp.down_proj" in modules
    weight = model.model.layers[0].self_attn.q_proj.weight  # shared, not copied
    assert gm.get_buffer("model.layers.0.self_attn.q_proj.weight").data_ptr() == weight.data_ptr()


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel
    import hsd
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match=r"gpt2.*supported architectures: llama, mistral, qwen2"):
        hsd.compile(model)


def test_sliding_window_beyond_max_seq_len_is_refused():
    import hsd
    config = testing.tiny_config("mistral")
    config.sliding_window = 16
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        hsd.compile(testing.tiny_model(config), max_seq_len=64)


@pytest.mark.parametrize("root", ["L['self']", "L['args'][0]", "L['fn']"])
def test_module_paths_drop_dynamo_root_names(root):
    """Dynamo names the captured root by how it was passed, which changes across versions."""
    from types import SimpleNamespace
    from hsd.capture import _module_path
    node = SimpleNamespace(meta={"nn_module_stack": {"a": (f"{root}.model.layers.3.mlp.down_proj", None)}})
    assert _module_path(node) == "model.layers.3.mlp.down_proj"
    node.meta["nn_module_stack"] = {"a": (f"{root}.lm_head", None)}
    assert _module_path(node) == "lm_head"
