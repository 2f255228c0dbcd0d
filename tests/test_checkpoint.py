"""Quantized checkpoints from disk (hsd.checkpoint: GPTQ, compressed-tensors): written by
``testing.save_quantized_checkpoint`` from each format's definition, compiled with ``hsd.compile(path)``,
against a float model holding the dequantized weights."""
import copy
import json

import pytest
import torch

import hsd
from hsd import testing


def reference(model, dequantized):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in dequantized:
                module.weight.copy_(dequantized[name])
    return model


@pytest.mark.parametrize("arch, group_size, symmetric, fmt, shards, tied, act_order", [
    ("llama", 32, True, "gptq", 1, False, False),
    ("llama", -1, False, "gptq", 2, True, False),
    ("qwen2", 32, False, "gptq_v2", 3, False, True),   # q/k/v biases
    ("mistral", 16, True, "gptq_v2", 1, True, False),
    ("llama", 32, False, "pack-quantized", 2, False, True),
    ("qwen2", -1, True, "pack-quantized", 1, True, False),
    ("llama", 16, False, "gptq", 1, False, True),
])
def test_checkpoint_equals_its_dequantized_model(tmp_path, arch, group_size, symmetric, fmt, shards, tied, act_order):
    config = testing.tiny_config(arch, tie_word_embeddings=tied)
    model = testing.tiny_model(config, seed=3)
    dequantized = testing.save_quantized_checkpoint(model, tmp_path, fmt, group_size, symmetric, shards=shards,
                                             act_order=act_order)
    engine = hsd.compile(str(tmp_path), device="cpu", dtype=torch.float32, max_seq_len=16, prefill_chunk=4)
    ids = testing.random_ids(config, length=6)
    want = reference(model, dequantized)
    testing.assert_engine_matches_model(engine, want, ids, atol=1e-5, rtol=1e-5)
    testing.assert_generate_matches_hf(engine, want, ids[:, :3], max_new_tokens=6)
    names = {name for name, _ in engine.graphs[4].named_buffers()}
    assert not any(name.endswith("proj.weight") for name in names)       # never dequantized
    assert any(name.endswith("qweight") for name in names)


@pytest.mark.parametrize("fmt", ["gptq", "pack-quantized"])
def test_quantized_lm_head_is_dequantized_and_w4a8_reads_the_same_weights(tmp_path, fmt):
    config = testing.tiny_config(tie_word_embeddings=False)
    model = testing.tiny_model(config, seed=1)
    dequantized = testing.save_quantized_checkpoint(model, tmp_path, fmt, 32, symmetric=False, quantize_lm_head=True,
                                             act_order=True)
    ids = testing.random_ids(config, length=5)
    engine = hsd.compile(str(tmp_path), device="cpu", dtype=torch.float32, max_seq_len=16, prefill_chunk=4)
    testing.assert_engine_matches_model(engine, reference(model, dequantized), ids, atol=1e-5, rtol=1e-5)
    w4a8 = hsd.compile(str(tmp_path), quant="w4a8", device="cpu", dtype=torch.float32, max_seq_len=16,
                       prefill_chunk=4)
    testing.assert_engine_matches_model(w4a8, reference(model, dequantized), ids, min_sqnr_db=25)


def _edit(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_bad_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    config = testing.tiny_config()
    model = testing.tiny_model(config)
    testing.save_quantized_checkpoint(model, tmp_path, "gptq", 32)
    kwargs = dict(device="cpu", dtype=torch.float32, max_seq_len=16)
    for quant, match in (("w8a8", "runs as quant='w4a16' or 'w4a8'"), ("w4a4", "runs as quant='w4a16' or 'w4a8'")):
        with pytest.raises(ValueError, match=match):
            hsd.compile(str(tmp_path), quant=quant, **kwargs)
    with pytest.raises(ValueError, match="4-bit drafts"):
        hsd.compile(str(tmp_path), spec="qspec", **kwargs)
    with pytest.raises(ValueError, match="brings its own"):
        hsd.compile(str(tmp_path), weights={}, **kwargs)
    _edit(tmp_path, bits=8)
    with pytest.raises(ValueError, match="hsd loads GPTQ checkpoints.*bits=8"):
        hsd.compile(str(tmp_path), **kwargs)
    _edit(tmp_path, bits=4)
    shard = next(tmp_path.glob("*.safetensors"))
    state = load_file(shard)
    original = dict(state)
    name = "model.layers.0.mlp.down_proj.g_idx"
    state[name] = torch.zeros_like(state[name])                         # one group holds every row
    save_file(state, shard)
    with pytest.raises(ValueError, match="down_proj: g_idx does not give each of the 4 groups 32 rows"):
        hsd.compile(str(tmp_path), **kwargs)
    state = dict(original, **{"model.layers.0.mlp.up_proj.bias": torch.ones(config.intermediate_size).half()})
    save_file(state, shard)
    with pytest.raises(ValueError, match="up_proj: the checkpoint has a nonzero bias"):
        hsd.compile(str(tmp_path), **kwargs)
    state = dict(original, **{"model.layers.9.mlp.up_proj.qweight": original["model.layers.0.mlp.up_proj.qweight"].clone()})
    save_file(state, shard)
    with pytest.raises(ValueError, match="modules the model's config does not have: model.layers.9"):
        hsd.compile(str(tmp_path), **kwargs)
    state = dict(original)
    state["model.layers.1.self_attn.o_proj.scales"] = state["model.layers.1.self_attn.o_proj.scales"][:1]
    save_file(state, shard)
    with pytest.raises(ValueError, match="o_proj: GPTQ tensors .* do not fit"):
        hsd.compile(str(tmp_path), **kwargs)


def test_bad_compressed_tensors_checkpoints_are_refused(tmp_path):
    testing.save_quantized_checkpoint(testing.tiny_model(testing.tiny_config()), tmp_path, "pack-quantized", 32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hsd loads GPTQ checkpoints.*input_activations"):
        hsd.compile(str(tmp_path), device="cpu", dtype=torch.float32)


def test_fused_linears_with_different_act_order_permutations_are_refused():
    from hsd.passes.linear import QUANT_SCHEMES
    from hsd.kernels import w4a16
    qweight, scales, _ = w4a16.quantize_rtn(torch.randn(16, 64), 32)
    state = {f"{p}.{t}": v for p in ("q", "k") for t, v in (("qweight", qweight), ("scales", scales))}
    state.update({"q.perm": torch.randperm(64), "k.perm": torch.randperm(64)})
    with pytest.raises(ValueError, match="q\\+k: fused Linears .* different act-order permutations; compile with fuse=False"):
        QUANT_SCHEMES["w4a16"].load(["q", "k"], state, torch.empty(32, 64, device="meta"))
    state["k.perm"] = state["q.perm"]
    assert torch.equal(QUANT_SCHEMES["w4a16"].load(["q", "k"], state, torch.empty(32, 64, device="meta"))[3],
                       state["q.perm"])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, act_order", [("gptq", True), ("pack-quantized", False)])
def test_cuda_engine_runs_a_checkpoint(tmp_path, fmt, act_order):
    """inductor + CUDA graphs + the Triton kernels (dot order, the act-order gather) on a loaded checkpoint."""
    config = testing.tiny_config("llama", hidden_size=128, intermediate_size=256, head_dim=32)
    model = testing.tiny_model(config, seed=2)
    dequantized = testing.save_quantized_checkpoint(model, tmp_path, fmt, 128, symmetric=False, act_order=act_order)
    engine = hsd.compile(str(tmp_path), device="cuda", max_seq_len=64, prefill_chunk=16)
    want = reference(model, dequantized).half().cuda()
    testing.assert_engine_matches_model(engine, want, testing.random_ids(config, length=9).cuda(), min_sqnr_db=35)


def test_dtype_defaults_to_the_checkpoints(tmp_path):
    config = testing.tiny_config(torch_dtype="bfloat16")
    testing.save_quantized_checkpoint(testing.tiny_model(config), tmp_path, "gptq", 32)
    engine = hsd.compile(str(tmp_path), device="cpu", max_seq_len=16, prefill_chunk=4)
    assert engine(testing.random_ids(config, length=3)).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt, quant", [("int-quantized", "w8a8"), ("float-quantized", "fp8")])
def test_eight_bit_checkpoint_equals_quantizing_its_dequantized_model(tmp_path, fmt, quant):
    config = testing.tiny_config("qwen2")
    model = testing.tiny_model(config, seed=4)
    dequantized = testing.save_quantized_checkpoint(model, tmp_path, fmt, shards=2)
    engine = hsd.compile(str(tmp_path), device="cpu", dtype=torch.float32, max_seq_len=16, prefill_chunk=4)
    want = reference(model, dequantized)
    # the same weights quantized in-process (their grid is the checkpoint's): the same engine
    same = hsd.compile(want, quant=quant, smooth_alpha=None, max_seq_len=16, prefill_chunk=4)
    ids = testing.random_ids(config, length=6)
    testing.assert_engine_matches_model(engine, want, ids, min_sqnr_db=20)   # 8-bit activations
    torch.testing.assert_close(engine(ids).logits, same(ids).logits, atol=1e-4, rtol=1e-4)
    buffers = dict(engine.graphs[4].named_buffers())
    assert {t.dtype for n, t in buffers.items() if n.endswith(".wq")} == {torch.int8 if quant == "w8a8" else torch.float8_e4m3fn}
    with pytest.raises(ValueError, match=f"runs as quant='{quant}'"):
        hsd.compile(str(tmp_path), quant="w4a16", device="cpu", dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hsd loads GPTQ checkpoints.*'symmetric': False"):
        hsd.compile(str(tmp_path), device="cpu", dtype=torch.float32)
