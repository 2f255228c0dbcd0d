"""The one static KV cache, shared by every step graph and pipeline of an engine.

k, v: [layers, batch, kv_heads, slots, head_dim], preallocated once, so CUDA graphs see fixed
addresses. ``length`` [batch] int32 (on the device) is the number of valid slots per row: the
attention op writes new tokens at ``length`` onwards and only the scheduler advances it.
``slots`` = max_seq_len + slack: a padded prefill chunk may write past max_seq_len.
"""
import torch


class KVCache:
    def __init__(self, layers, batch, kv_heads, head_dim, max_seq_len, slack, dtype, device):
        shape = (layers, batch, kv_heads, max_seq_len + slack, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = torch.zeros(batch, dtype=torch.int32, device=device)
        self.max_seq_len = max_seq_len

    @classmethod
    def for_config(cls, config, batch, max_seq_len, slack, dtype, device):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, batch, kv_heads, head_dim, max_seq_len, slack, dtype, device)

    def reset(self):
        self.length.zero_()
