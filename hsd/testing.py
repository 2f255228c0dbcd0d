"""Equivalence testing for hsd and for your own passes and models.

Hypothesis strategies for tiny Llama / Mistral / Qwen2 configs and inputs, and assertions that
compare at every level:

    from hypothesis import given
    from hsd import testing

    @given(testing.model_configs(), testing.seeds())
    def test_my_pass(config, seed):
        model = testing.tiny_model(config, seed)
        testing.assert_pass_equivalent(my_pass, model, testing.random_ids(config, seed))

``assert_pass_equivalent`` captures the model, runs the graph before and after the pass on the
same inputs and compares logits and hidden states (``min_sqnr_db`` for lossy passes such as
quantization). ``assert_engine_matches_model`` compares a compiled engine's logits with the
eager model's, and ``assert_generate_matches_hf`` greedy tokens with transformers' generate.
"""
import copy

import torch
import torch.fx
from hypothesis import strategies as st

from hsd.capture import capture
from hsd.passes import PassManager

ARCHITECTURES = ("llama", "mistral", "qwen2")


def _config_class(arch):
    import transformers
    return {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config}[arch]


def tiny_config(arch: str = "llama", **overrides):
    """A small config of a supported architecture (2 layers, GQA 2:1, width 64) with overrides."""
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  initializer_range=0.1, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return _config_class(arch)(**kwargs)


@st.composite
def model_configs(draw, archs=ARCHITECTURES, width_multiple: int = 32, max_layers: int = 2):
    """Tiny configs: GQA ratios 1, 2 and 4, head dims 16/32, every Linear width a multiple of
    ``width_multiple`` (a power of two: pass the quantization group size), tied or untied
    embeddings, two RoPE bases."""
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([16, 32]))
    head_dim = max(head_dim, width_multiple // heads)
    hidden = max(heads * head_dim, width_multiple)
    return tiny_config(
        draw(st.sampled_from(archs)), vocab_size=draw(st.sampled_from([64, 96])), hidden_size=hidden,
        intermediate_size=width_multiple * draw(st.integers(1, 4)),
        num_hidden_layers=draw(st.integers(1, max_layers)), num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, tie_word_embeddings=draw(st.booleans()),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])))


def seeds():
    return st.integers(0, 2**16)


def tiny_model(config, seed: int = 0, dtype=torch.float32):
    """A randomly initialised causal LM for ``config`` (deterministic in ``seed``)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval()


def random_ids(config, seed: int = 0, batch: int = 1, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g)


def fake_quantized(model, group_size: int = 128, symmetric: bool = True):
    """A copy of ``model`` whose Linears (all but the lm_head) hold their round-to-nearest W4
    weights dequantized: what ``quant="w4a16"`` must compute, in plain transformers."""
    from hsd.kernels import w4a16
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                k = module.in_features
                qweight, scales, zeros = w4a16.quantize_rtn(module.weight, group_size, symmetric)
                module.weight.copy_(w4a16.dequantize(qweight, scales, zeros, k if group_size == -1 else group_size))
    return model


def save_quantized_checkpoint(model, path, checkpoint_format: str = "gptq", group_size: int = 128,
                              symmetric: bool = True, quantize_lm_head: bool = False, shards: int = 1,
                              act_order: bool = False) -> dict:
    """Write ``model`` as a quantized checkpoint of ``checkpoint_format``: 4-bit "gptq"
    (AutoGPTQ's v1, zero - 1 stored), "gptq_v2" or compressed-tensors "pack-quantized"; or
    compressed-tensors 8-bit "int-quantized" (W8A8) / "float-quantized" (FP8), per channel (the
    4-bit options do not apply); layouts in ``hsd.checkpoint``'s docstring. Round-to-nearest
    weights, config.json with the quantization_config, ``shards`` safetensors files in the
    directory ``path``. ``act_order``: groups formed in a random order of K (one per K, so
    Linears sharing an input agree), as GPTQ's desc_act without static groups leaves them: a
    permuted g_idx. Packs by the formats' definitions, not with hsd's own packing, so a test of
    the loader checks hsd against the format. Returns {Linear name: its dequantized [N, K] fp32
    weight}."""
    import json
    import pathlib
    from safetensors.torch import save_file
    path = pathlib.Path(path)
    model.config.save_pretrained(path)
    state, dequantized = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (quantize_lm_head or name != "lm_head"):
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().half()
            if checkpoint_format in ("int-quantized", "float-quantized"):
                dequantized[name] = _eight_bit(state, name, module.weight, checkpoint_format == "int-quantized")
            else:
                dequantized[name] = _four_bit(state, name, module.weight, checkpoint_format, group_size, symmetric,
                                              act_order)
        elif not list(module.children()):
            state.update({f"{name}.{p}": t.detach().contiguous() for p, t in module.named_parameters(recurse=False)})
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    names = sorted(state)
    for i in range(shards):
        save_file({n: state[n] for n in names[i::shards]}, path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = _quantization_config(checkpoint_format, group_size, symmetric, act_order,
                                                          quantize_lm_head)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return dequantized


def _four_bit(state, name, w, checkpoint_format, group_size, symmetric, act_order) -> torch.Tensor:
    """Store one Linear's 4-bit GPTQ or pack-quantized tensors; returns its dequantized weight."""
    from hsd.kernels import w4a16
    n, k = w.shape
    g = k if group_size == -1 else group_size
    order = torch.randperm(k, generator=torch.Generator().manual_seed(k)) if act_order else torch.arange(k)
    wg = w.detach().float()[:, order].reshape(n, k // g, g)        # groups in quantization order
    scale, zero = w4a16.grid(wg, symmetric)                         # [N, K / G]
    q = torch.empty(n, k)
    q[:, order] = w4a16.to_grid(wg, scale[..., None], zero[..., None]).reshape(n, k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).int()
    scale = scale.half().float()                                    # what the checkpoint keeps
    if checkpoint_format == "pack-quantized":
        state[f"{name}.weight_packed"] = _nibbles(q.long(), 1)       # value + 8, along K
        state[f"{name}.weight_scale"] = scale.half()
        state[f"{name}.weight_shape"] = torch.tensor([n, k])
        if not symmetric:                                           # zero point + 8, along N
            state[f"{name}.weight_zero_point"] = _nibbles(zero.long(), 0)
        if act_order:
            state[f"{name}.weight_g_idx"] = g_idx
    else:
        offset = 1 if checkpoint_format == "gptq" else 0
        stored_zero = zero.t().long() - offset
        zero = ((stored_zero & 0xF) + offset).t().float()           # v1 reads a zero of 0 as 16
        state[f"{name}.qweight"] = _nibbles(q.t().long(), 0)         # along K
        state[f"{name}.qzeros"] = _nibbles(stored_zero, 1)           # along N
        state[f"{name}.scales"] = scale.t().half().contiguous()
        state[f"{name}.g_idx"] = g_idx
    return (q - zero[:, g_idx.long()]) * scale[:, g_idx.long()]


def _eight_bit(state: dict, name: str, w: torch.Tensor, integer: bool) -> torch.Tensor:
    """Store compressed-tensors' per-channel 8-bit weight and scale; returns the dequantized weight."""
    top = 127.0 if integer else 448.0
    scale = w.detach().float().abs().amax(1, keepdim=True).clamp(min=1e-8) / top
    q = (w.detach().float() / scale).clamp(-top, top)
    q = torch.round(q).to(torch.int8) if integer else q.to(torch.float8_e4m3fn)
    state[f"{name}.weight"], state[f"{name}.weight_scale"] = q, scale
    return q.float() * scale


def _quantization_config(checkpoint_format, group_size, symmetric, act_order, quantize_lm_head) -> dict:
    """config.json's quantization_config for ``save_quantized_checkpoint``."""
    if checkpoint_format in ("gptq", "gptq_v2"):
        return dict(quant_method="gptq", bits=4, group_size=group_size, sym=symmetric, desc_act=act_order,
                    checkpoint_format=checkpoint_format)
    if checkpoint_format == "pack-quantized":
        weights = dict(num_bits=4, type="int", symmetric=symmetric, strategy="channel" if group_size == -1 else "group",
                       group_size=None if group_size == -1 else group_size, actorder="group" if act_order else None)
        acts = None
    else:
        kind = "int" if checkpoint_format == "int-quantized" else "float"
        weights = dict(num_bits=8, type=kind, symmetric=True, strategy="channel", dynamic=False)
        acts = dict(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)
    return dict(quant_method="compressed-tensors", format=checkpoint_format, ignore=[] if quantize_lm_head else ["lm_head"],
                config_groups={"group_0": dict(targets=["Linear"], weights=weights, input_activations=acts)})


def _nibbles(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Entries 8 c .. 8 c + 7 along ``dim`` (ints, two's complement kept to 4 bits) into int32
    word c, entry 8 c + i in bits 4 i .. 4 i + 3."""
    q = q.movedim(dim, 0)
    word = torch.zeros((q.shape[0] // 8, *q.shape[1:]), dtype=torch.int64)
    for i in range(8):
        word |= (q[i::8] & 0xF) << (4 * i)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).movedim(0, dim).contiguous()


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``x`` against ``ref`` in dB."""
    ref, x = ref.double(), x.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum().clamp(min=1e-300)))


def _close(name, ref, out, atol, rtol, min_sqnr_db):
    if min_sqnr_db is not None:
        got = sqnr_db(ref, out)
        assert got >= min_sqnr_db, f"{name}: SQNR {got:.1f} dB < {min_sqnr_db} dB"
    else:
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def run_graph(gm: torch.fx.GraphModule, input_ids: torch.Tensor):
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        return gm(input_ids, positions)


def assert_pass_equivalent(pass_, model, input_ids, atol=1e-5, rtol=1e-4, min_sqnr_db=None):
    """Run ``pass_`` on the captured graph of ``model`` and check the graph computes the same
    logits and hidden states on ``input_ids`` (or within ``min_sqnr_db`` for lossy passes).
    Returns (graph before, graph after)."""
    before = capture(model, *input_ids.shape)
    after = torch.fx.GraphModule(before, copy.deepcopy(before.graph))
    after, _ = PassManager([pass_])(after)
    for name, ref, out in zip(("logits", "hidden"), run_graph(before, input_ids), run_graph(after, input_ids)):
        _close(name, ref, out, atol, rtol, min_sqnr_db)
    return before, after


def assert_engine_matches_model(engine, model, input_ids, atol=1e-4, rtol=1e-4, min_sqnr_db=None):
    """The engine's logits for ``input_ids`` equal the eager model's."""
    with torch.no_grad():
        ref = model(input_ids).logits
    _close("logits", ref, engine(input_ids).logits.to(ref.device), atol, rtol, min_sqnr_db)


def assert_generate_matches_hf(engine, model, input_ids, max_new_tokens=12, eos_token_id=None):
    """Greedy ``engine.generate`` equals transformers' greedy ``generate`` token for token."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_id,
                  pad_token_id=eos_token_id if eos_token_id is not None else 0)
    with torch.no_grad():
        ref = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    out = engine.generate(input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          pad_token_id=kwargs["pad_token_id"])
    assert out.tolist() == ref.tolist(), f"engine {out.tolist()} != transformers {ref.tolist()}"
