"""Attention over hsd's static KV cache, with a tree (or causal) mask on the new tokens.

One op serves prefill (causal block), decode (one token), chain verification (k causal tokens)
and tree verification (n nodes). For layer ``layer`` it
  1. writes the new k/v [B, Hkv, T, D] into cache slots cache_len[b] .. cache_len[b] + T - 1,
  2. lets new token t attend to every cached slot s < cache_len[b] and to new token u
     where tree_mask[t, u] (the causal mask for a chain, the ancestor mask for a tree).
cache_len is NOT advanced here: the scheduler decides how many tokens are kept.
Cache layout: k_cache, v_cache [L, B, Hkv, S, D]. q is [B, Hq, T, D], Hq a multiple of Hkv.
"""
import torch

from hsd.kernels import registry


def visible_mask(cache_len: torch.Tensor, tree_mask: torch.Tensor, slots: int) -> torch.Tensor:
    """[B, T, S] bool: may new token t see cache slot s (after the new tokens are written)?"""
    t = tree_mask.shape[-1]
    s = torch.arange(slots, device=cache_len.device)
    rel = s[None, :] - cache_len.long()[:, None]                       # [B, S]: slot - prefix
    in_block = (rel >= 0) & (rel < t)
    tree = tree_mask.expand(cache_len.shape[0], t, t)                  # [B, T, T]
    idx = rel.clamp(0, t - 1)[:, None, :].expand(-1, t, -1)           # [B, T, S]
    return (rel < 0)[:, None, :] | (in_block[:, None, :] & torch.gather(tree, 2, idx))


def write_kv(cache: torch.Tensor, layer: int, new: torch.Tensor, cache_len: torch.Tensor):
    b, h, t, d = new.shape
    slots = (cache_len.long()[:, None] + torch.arange(t, device=new.device))   # [B, T]
    cache[layer].scatter_(2, slots[:, None, :, None].expand(b, h, t, d), new.to(cache.dtype))


@registry.register("attention", "cpu", "reference")
def attention_reference(q, k, v, k_cache, v_cache, layer: int, cache_len, tree_mask, scale: float):
    write_kv(k_cache, layer, k, cache_len)
    write_kv(v_cache, layer, v, cache_len)
    b, hq, t, d = q.shape
    hkv, slots = k_cache.shape[2], k_cache.shape[3]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp64 tests stay fp64
    kc, vc = k_cache[layer].to(acc), v_cache[layer].to(acc)                    # [B, Hkv, S, D]
    qg = q.to(acc).reshape(b, hkv, hq // hkv, t, d)
    scores = torch.einsum("bhgtd,bhsd->bhgts", qg, kc) * scale
    mask = visible_mask(cache_len, tree_mask, slots)[:, None, None]             # [B, 1, 1, T, S]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, vc)
    return out.reshape(b, hq, t, d).to(q.dtype)
