"""EAGLE-1 draft head for Llama-family targets (Li et al., 2024).

The head drafts from the target's own features. Entry t reads the target's last hidden state
f_t (after its final norm) and the embedding of token t+1, and predicts f_{t+1}:

    h = fc(cat(embed(x_{t+1}), f_t)),  h = decoder_layer(h)   (no input_layernorm)
    logits = target.lm_head(h)                                (no final norm)

Its one layer keeps its own static KV cache (``KVCache`` with one layer) and runs
``hsd::attention`` with a tree mask, so a draft tree is run one depth at a time.

Checkpoints (e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B): config.json, a LlamaConfig with
num_hidden_layers=1 and an optional "bias" (of fc, default true), and model.safetensors or
pytorch_model.bin with the keys of ``EagleHead.state_dict()``; ``embed_tokens.weight`` is
optional (else the target's embedding is used).
"""
import json
import pathlib

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from hsd.kernels import w4a16
from hsd.kernels.attention import MAX_NEW_TOKENS, pack_tree_mask
from hsd.kv_cache import KVCache
from hsd.lowering.cuda_graphs import GraphedStep

# buffers some checkpoints saved; recomputed from the config here
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=bias)

    def forward(self, x, cos, sin, cache: KVCache, tree_mask):
        b, t, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(b, t, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        earlier = tree_mask.shape[0] - t
        if earlier:
            # The op lets new tokens see either the whole cached prefix or new tokens under the
            # mask. Tree entries drafted earlier in this step sit past cache.length: re-send their
            # K/V (rewritten in place, unchanged) with zero queries, so the mask picks ancestors.
            slots = cache.length.long()[:, None] + torch.arange(earlier, device=x.device)
            index = slots[:, None, :, None].expand(b, self.kv_heads, earlier, d)
            k = torch.cat([cache.k[0].gather(2, index), k], 2)
            v = torch.cat([cache.v[0].gather(2, index), v], 2)
            q = torch.cat([q.new_zeros(b, self.heads, earlier, d), q], 2)
        out = torch.ops.hsd.attention(q.contiguous(), k.contiguous(), v.contiguous(), cache.k, cache.v, 0,
                                      cache.length, pack_tree_mask(tree_mask), d ** -0.5)
        return self.o_proj(out[:, :, earlier:].transpose(1, 2).reshape(b, t, -1))


class _DecoderLayer(nn.Module):
    """A Llama decoder layer without input_layernorm (EAGLE's layer 0)."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = _Attention(config)
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, cache, tree_mask):
        x = x + self.self_attn(x, cos, sin, cache, tree_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class EagleHead(nn.Module):
    """The head's own weights; ``attach`` a target (whose lm_head, and embedding unless
    ``own_embedding``, it shares) and ``allocate_cache`` before running it."""

    def __init__(self, config: LlamaConfig, bias: bool = True, own_embedding: bool = False):
        super().__init__()
        if config.num_hidden_layers != 1:
            raise ValueError(f"an EAGLE-1 head has one decoder layer, its config says num_hidden_layers="
                             f"{config.num_hidden_layers}")
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=bias)
        self.layers = nn.ModuleList([_DecoderLayer(config)])
        self.rotary = LlamaRotaryEmbedding(config)
        if own_embedding:
            self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.cache = None
        self._shared = None
        self._lm_head_w4 = None   # (qweight, scales, zeros, bias, group) when drafting from 4 bits
        self._steps = {}  # (new entries, mask size) -> CUDA-graphed forward
        self._masks = {}

    def attach(self, target, quantize_lm_head: bool = False):
        """Share the lm_head and embedding of ``target`` (a Hugging Face causal LM) and move to
        its device and dtype. ``quantize_lm_head``: draft logits come from a 4-bit copy of the
        lm_head (W4A16, g128 or per channel): a draft round reads a quarter of its bytes (1 GB
        of fp16 for Llama-3's vocabulary); drafts only, the target verifies with its own."""
        for key in ("hidden_size", "vocab_size"):
            mine, theirs = getattr(self.config, key), getattr(target.config, key)
            if mine != theirs:
                raise ValueError(f"EAGLE head {key} {mine} != target {key} {theirs}: the head was trained for another model")
        shared = (target.get_input_embeddings(), target.get_output_embeddings())
        if any(module.weight.is_meta for module in shared):
            raise ValueError("the target's embedding or lm_head is on the meta device (compiled from a skeleton "
                             "with weights=): an EAGLE head needs them materialised")
        # a tuple keeps the target's modules out of the head's module tree and state
        self._shared = shared
        self._lm_head_w4 = None
        if quantize_lm_head:
            w = shared[1].weight.detach()
            group = 128 if w.shape[1] % 128 == 0 else -1
            self._lm_head_w4 = (*w4a16.quantize_rtn(w, group), None, w.shape[1] if group == -1 else group)
        param = next(target.parameters())
        return self.to(device=param.device, dtype=param.dtype)

    def allocate_cache(self, max_seq_len: int, batch: int = 1):
        """A fresh one-layer cache of ``max_seq_len`` committed entries plus room for a draft tree."""
        attn = self.layers[0].self_attn
        param = self.fc.weight
        self.cache = KVCache(1, batch, attn.kv_heads, attn.head_dim, max_seq_len, MAX_NEW_TOKENS,
                             param.dtype, param.device)
        self._steps = {}  # the graphs captured the old cache

    def embed(self, tokens):
        return (self.embed_tokens if hasattr(self, "embed_tokens") else self._shared[0])(tokens)

    def forward(self, tokens, features, positions, tree_mask):
        """Run new entries: tokens [B, T] (token t+1) and features [B, T, H] (target feature t)
        at positions [B, T]. The cache holds ``cache.length`` committed entries, then
        tree_mask.shape[0] - T draft entries of this step; tree_mask (bool, those entries then
        the new ones) says which of them each entry sees. Writes the new entries' K/V after
        them, leaves cache.length alone and returns their hidden states [B, T, H]."""
        x = self.fc(torch.cat([self.embed(tokens), features], -1))
        cos, sin = self.rotary(x, positions)
        return self.layers[0](x, cos, sin, self.cache, tree_mask)

    def step(self, tokens, features, positions, tree_mask):
        """``forward``; on CUDA replayed from a CUDA graph captured per (T, mask size) on first
        use, so a draft round costs one launch, not one per op. The returned hidden states
        live in that graph's buffer: the next call of the same shape overwrites them."""
        if not self.fc.weight.is_cuda:
            return self(tokens, features, positions, tree_mask)
        key = (tokens.shape[1], tree_mask.shape[0])
        if key not in self._steps:
            inputs = dict(tokens=tokens.clone(), features=features.clone(), positions=positions.clone(),
                          tree_mask=tree_mask.clone())
            self._steps[key] = GraphedStep(self, inputs)
        return self._steps[key](tokens=tokens, features=features, positions=positions, tree_mask=tree_mask)

    def logits(self, hidden):
        if self._lm_head_w4 is not None:
            return torch.ops.hsd.w4a16_linear(hidden, *self._lm_head_w4)
        return self._shared[1](hidden)

    def extend(self, tokens, features):
        """Commit entries [B, T] (causally, in chunks the attention op takes) and advance the
        cache; returns the hidden state of the last one [B, H]. A chunk of n entries runs
        padded to the next power of two, so a handful of step shapes serve every length; the
        padding's K/V land past the committed entries, where the next write replaces them."""
        for start in range(0, tokens.shape[1], MAX_NEW_TOKENS):
            n = min(MAX_NEW_TOKENS, tokens.shape[1] - start)
            t = 1 << (n - 1).bit_length()
            ids = torch.nn.functional.pad(tokens[:, start:start + n], (0, t - n))
            feats = torch.nn.functional.pad(features[:, start:start + n], (0, 0, 0, t - n))
            positions = self.cache.length.long()[:, None] + torch.arange(t, device=tokens.device)
            hidden = self.step(ids, feats, positions, self._causal(t))
            self.cache.length += n
        return hidden[:, n - 1].clone()

    def _causal(self, t):
        if t not in self._masks or self._masks[t].device != self.fc.weight.device:
            self._masks[t] = torch.ones(t, t, dtype=torch.bool, device=self.fc.weight.device).tril()
        return self._masks[t]


def load_eagle_head(path, target) -> EagleHead:
    """Load an EAGLE-1 head from a checkpoint directory for ``target`` (a Hugging Face causal
    LM), in the target's dtype and on its device."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in EAGLE head directory {path}")
    raw = json.loads((path / "config.json").read_text())
    config = LlamaConfig(**{key: value for key, value in raw.items() if key != "bias"})
    weights = _read_weights(path)
    head = EagleHead(config, bias=raw.get("bias", True), own_embedding="embed_tokens.weight" in weights)
    expected = head.state_dict()
    missing = [key for key in expected if key not in weights]
    if missing:
        raise KeyError(f"EAGLE head checkpoint {path} lacks {', '.join(missing)}")
    extra = [key for key in weights if key not in expected and not key.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise KeyError(f"EAGLE head checkpoint {path} has unexpected keys {', '.join(extra)}")
    head.load_state_dict({key: weights[key] for key in expected})
    return head.attach(target).eval()


def _read_weights(path):
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in EAGLE head directory {path}")


def save_random_eagle_head(path, target_config, seed: int = 0, bias: bool = True):
    """Write a randomly initialised head for a target of ``target_config`` in the public layout
    (config.json + model.safetensors); for tests and benchmarks."""
    from safetensors.torch import save_file
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=target_config.vocab_size, hidden_size=target_config.hidden_size,
        intermediate_size=target_config.intermediate_size, num_hidden_layers=1,
        num_attention_heads=target_config.num_attention_heads,
        num_key_value_heads=target_config.num_key_value_heads,
        head_dim=getattr(target_config, "head_dim", None) or target_config.hidden_size // target_config.num_attention_heads,
        rms_norm_eps=target_config.rms_norm_eps, rope_parameters=target_config.rope_parameters,
        max_position_embeddings=target_config.max_position_embeddings)
    torch.manual_seed(seed)
    head = EagleHead(config, bias=bias)
    (path / "config.json").write_text(json.dumps({**config.to_dict(), "bias": bias}, indent=2))
    save_file({key: value.contiguous() for key, value in head.state_dict().items()}, path / "model.safetensors")
    return path

