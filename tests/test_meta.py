"""A model skeleton on the meta device compiles from pre-quantized weights: no 16-bit copy of a
Linear weight is ever made (how a 70B W4A16 checkpoint fits one 80 GB GPU)."""
import pytest
import torch

import hsd
from hsd import testing
from hsd.kernels import w4a16


def quantized_checkpoint(model, group_size, symmetric_parts=()):
    """The state a W4 checkpoint loader hands over: 16-bit tensors, and W4 Linears."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            symmetric = not symmetric_parts or name.endswith(symmetric_parts)
            qweight, scales, zeros = w4a16.quantize_rtn(module.weight, group_size, symmetric)
            state.update({f"{name}.qweight": qweight, f"{name}.scales": scales})
            if zeros is not None:
                state[f"{name}.zeros"] = zeros
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach()
        elif not list(module.children()):
            state.update({f"{name}.{p}": t.detach() for p, t in module.named_parameters(recurse=False)})
    return state


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_meta_skeleton_equals_the_real_model(arch):
    config = testing.tiny_config(arch, tie_word_embeddings=False)
    model = testing.tiny_model(config)
    ids = testing.random_ids(config, length=6)
    state = quantized_checkpoint(model, 32, symmetric_parts=("q_proj", "up_proj", "o_proj"))
    with torch.device("meta"):
        skeleton = testing.tiny_model(config)
    engine = hsd.compile(skeleton, weights=state, quant="w4a16", dtype=torch.float32, device="cpu",
                         max_seq_len=16, prefill_chunk=4)
    reference = testing.fake_quantized(model, 32)
    for name, module in reference.named_modules():   # the same per-module zero points
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            zeros = state.get(f"{name}.zeros")
            module.weight.data = w4a16.dequantize(state[f"{name}.qweight"], state[f"{name}.scales"], zeros, 32)
    testing.assert_engine_matches_model(engine, reference, ids, atol=1e-5, rtol=1e-5)
    names = {name for name, _ in engine.graphs[4].named_buffers()}
    assert not any(name.endswith("proj.weight") for name in names)


def test_meta_skeleton_errors():
    config = testing.tiny_config()
    with torch.device("meta"):
        skeleton = testing.tiny_model(config)
    with pytest.raises(ValueError, match="needs weights=, device=, dtype= and quant="):
        hsd.compile(skeleton, quant="w4a16")
    state = quantized_checkpoint(testing.tiny_model(config), 32)
    del state["model.norm.weight"], state["model.layers.1.mlp.down_proj.qweight"]
    engine = hsd.compile(skeleton, weights=state, quant="w4a16", dtype=torch.float32, device="cpu", max_seq_len=8)
    with pytest.raises(hsd.PassError, match="model.layers.1.mlp.down_proj.qweight: the weight is on the meta device"):
        engine(testing.random_ids(config, length=3))
    state = quantized_checkpoint(testing.tiny_model(config), 32)
    del state["model.norm.weight"]
    engine = hsd.compile(skeleton, weights=state, quant="w4a16", dtype=torch.float32, device="cpu", max_seq_len=8)
    with pytest.raises(ValueError, match="no weights were given for 1 tensors .* model.norm.weight"):
        engine(testing.random_ids(config, length=3))
