"""Attention over hsd's static KV cache, with a tree (or causal) mask on the new tokens.

One op serves prefill (causal block), decode (one token), chain verification (k causal tokens)
and tree verification (n nodes). For layer ``layer`` it
  1. writes the new k/v [B, Hkv, T, D] into cache slots cache_len[b] .. cache_len[b] + T - 1,
  2. lets new token t attend to every cached slot s < cache_len[b] and to new token u
     where tree_mask[t, u] (the causal mask for a chain, the ancestor mask for a tree). The op
     takes that mask packed, ``tree_bits`` int32 [T, ceil(T / 32)]: bit u % 32 of word u // 32
     in row t (``pack_tree_mask``; each node's ancestors in T / 8 bytes).
cache_len is NOT advanced here: the scheduler decides how many tokens are kept.
Cache layout: k_cache, v_cache [L, B, Hkv, S, D]. q is [B, Hq, T, D], Hq a multiple of Hkv.

After verification, ``compact_kv`` moves the K/V of the accepted path to the slots right after
the prefix in every layer.

Input checks: ``validate`` (called by every implementation) looks at shapes and dtypes only, so
the op stays free of device->host reads and can run inside CUDA graphs. The value checks need a
read: ``check_bounds`` (cache_len + T <= S) is run by ``validate`` when cache_len lives on the CPU;
on the GPU the scheduler calls it where it syncs anyway (once per step). ``ancestor_mask`` checks
its parent array. The kernels never touch slots >= S, so a missed bound check gives wrong
attention, not memory corruption.
"""
import functools

import torch
import triton
import triton.language as tl

from hsd.kernels import pdl, registry

MAX_NEW_TOKENS = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def ancestor_mask(parent: torch.Tensor, check: bool = True) -> torch.Tensor:
    """[T] parent indices (parent[0] = -1 for the root, parents before children) -> bool [T, T]
    ancestor-or-self mask. ``check`` reads ``parent`` on the host (one sync on a GPU tensor)."""
    t = parent.shape[0]
    if check:
        p = parent.tolist()
        if not p or p[0] != -1 or any(not 0 <= p[i] < i for i in range(1, t)):
            raise ValueError(f"parent must be [-1, p1, ...] with 0 <= parent[i] < i, got {p}")
    idx = torch.arange(t, device=parent.device)
    reach = torch.eye(t, dtype=torch.bool, device=parent.device)
    reach[idx[1:], parent[1:]] = True
    for _ in range(max(t - 1, 1).bit_length()):          # path doubling: 2^k >= depth
        reach = reach | ((reach.float() @ reach.float()) > 0)
    return reach


def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [T, T] -> int32 [T, ceil(T / 32)]: bit j of word w in row t is mask[t, 32 w + j]
    (torch ops only, so a captured graph packs its step's mask in one fused kernel)."""
    t = mask.shape[-1]
    words = -(-t // 32)
    bits = torch.nn.functional.pad(mask.to(torch.int32), (0, 32 * words - t)).view(*mask.shape[:-1], words, 32)
    # distinct powers of two: the int32 sum is an OR, bit 31 included (two's complement)
    return (bits << torch.arange(32, dtype=torch.int32, device=mask.device)).sum(-1, dtype=torch.int32)


def unpack_tree_mask(bits: torch.Tensor, t: int) -> torch.Tensor:
    """int32 [T, ceil(T / 32)] -> bool [T, T], the inverse of ``pack_tree_mask``."""
    u = torch.arange(t, device=bits.device)
    return ((bits[..., u // 32] >> (u % 32)) & 1).bool()


def check_bounds(cache_len: torch.Tensor, new_tokens: int, slots: int):
    """Raise ValueError unless 0 <= cache_len[b] and cache_len[b] + new_tokens <= slots for every b.
    One device->host read: call it outside CUDA graph capture."""
    lo, hi = (int(x) for x in torch.stack([cache_len.min(), cache_len.max()]).tolist())
    if lo < 0 or hi + new_tokens > slots:
        raise ValueError(f"cache_len in [{lo}, {hi}] + {new_tokens} new tokens must fit in {slots} cache slots")


def validate(q, k, v, k_cache, v_cache, layer: int, cache_len, tree_bits, dtypes=_DTYPES):
    """Shape, dtype and layout checks of the attention op (host only; see the module doc)."""
    if q.dim() != 4 or k_cache.dim() != 5:
        raise ValueError(f"want q [B, Hq, T, D] and caches [L, B, Hkv, S, D], got {tuple(q.shape)}, {tuple(k_cache.shape)}")
    b, hq, t, d = q.shape
    n_layers, _, hkv, slots, _ = k_cache.shape
    if not 1 <= t <= MAX_NEW_TOKENS:
        raise ValueError(f"{t} new tokens; the op takes 1..{MAX_NEW_TOKENS}")
    if k.shape != (b, hkv, t, d) or v.shape != k.shape or v_cache.shape != k_cache.shape \
            or k_cache.shape[1] != b or k_cache.shape[4] != d or hq % hkv:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"caches {tuple(k_cache.shape)} {tuple(v_cache.shape)}")
    if tree_bits.shape != (t, -(-t // 32)) or tree_bits.dtype != torch.int32:
        raise ValueError(f"tree_bits must be int32 [{t}, {-(-t // 32)}] (pack_tree_mask of the [{t}, {t}] mask), "
                         f"got {tree_bits.dtype} {tuple(tree_bits.shape)}")
    if cache_len.shape != (b,) or cache_len.dtype != torch.int32:
        raise ValueError(f"cache_len must be int32 [{b}], got {cache_len.dtype} {tuple(cache_len.shape)}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range for {n_layers} layers")
    if any(x.dtype != q.dtype for x in (k, v, k_cache, v_cache)) or q.dtype not in dtypes:
        raise ValueError(f"q, k, v and the caches must share one of {dtypes}")
    if not all(x.is_contiguous() for x in (q, k, v, k_cache, v_cache, tree_bits)):
        raise ValueError("q, k, v, the caches and tree_bits must be contiguous")
    if cache_len.device.type == "cpu":
        check_bounds(cache_len, t, slots)


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
def attention_reference(q, k, v, k_cache, v_cache, layer: int, cache_len, tree_bits, scale: float):
    validate(q, k, v, k_cache, v_cache, layer, cache_len, tree_bits, dtypes=(*_DTYPES, torch.float64))
    write_kv(k_cache, layer, k, cache_len)
    write_kv(v_cache, layer, v, cache_len)
    b, hq, t, d = q.shape
    hkv, slots = k_cache.shape[2], k_cache.shape[3]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp64 tests stay fp64
    kc, vc = k_cache[layer].to(acc), v_cache[layer].to(acc)                    # [B, Hkv, S, D]
    qg = q.to(acc).reshape(b, hkv, hq // hkv, t, d)
    scores = (qg @ kc.unsqueeze(2).transpose(-1, -2)) * scale                 # [B, Hkv, G, T, S]
    mask = visible_mask(cache_len, unpack_tree_mask(tree_bits, t), slots)[:, None, None]   # [B, 1, 1, T, S]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = probs @ vc.unsqueeze(2)
    return out.reshape(b, hq, t, d).to(q.dtype)


# --- Triton: split-KV ("flash decoding") over the prefix, the masked tree block at the end ----
#
# Grid (row block, split, b * Hkv). The rows of one program are the G = Hq / Hkv query heads of
# one KV group times the T new tokens (row r = head g * T + token t; contiguous in q), so each
# K/V tile is read once per row block. The number of splits is fixed by shapes (so CUDA graphs
# replay with any cache_len); the prefix cache_len[b] is cut into that many equal chunks inside
# the kernel, so every split has work at any fill of the cache (a chunk size fixed by the
# cache's slots would leave most programs idle while the cache is short). The new tokens, read
# from k/v, are attended to under the tree mask either by one more split (TREE_SPLIT: short
# programs at decode, where the critical path is one program's loads) or by the last split with
# prefix work (big trees: no extra programs past one wave). A second kernel merges the partial
# results through their log-sum-exps and writes the new K/V into the cache.

@triton.jit
def _chunking(len_ptr, b, S, N_SPLITS, BLOCK_N: tl.constexpr, TREE_SPLIT: tl.constexpr):
    """Batch row b's (cache_len, prefix length read, chunk, the split that attends to the new
    tokens, partials per KV head). Shared by both kernels, so they agree on who wrote what."""
    cache_len = tl.load(len_ptr + b)
    n = tl.minimum(cache_len, S)
    chunk = tl.cdiv(tl.maximum(tl.cdiv(n, N_SPLITS), 1), BLOCK_N) * BLOCK_N
    tree, parts = tl.maximum(tl.cdiv(n, chunk) - 1, 0), N_SPLITS   # the last split with prefix work
    if TREE_SPLIT:
        tree, parts = N_SPLITS, N_SPLITS + 1
    return cache_len, n, chunk, tree, parts


@triton.jit
def _prefix_step(q, k, v, m_i, l_i, acc, qk_scale, col_ok, MASKED: tl.constexpr):
    # every row sees every valid prefix column, so the running max is finite from the first tile
    # on and needs none of _tree_step's guards; the scale rides in the exponent's FMA
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(col_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _tree_step(q, k, v, visible, m_i, l_i, acc, qk_scale):
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row may see nothing in a tree tile
    alpha = tl.exp2(m_i - base)
    p = tl.exp2(s - base[:, None])
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _attn_split_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, len_ptr, bits_ptr, o_ptr, lse_ptr,
                       qk_scale, HKV, T, S, ROWS, N_SPLITS,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       TREE_SPLIT: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # launched while the previous kernel ends (kernels/pdl.py)
        pdl.wait()
    pid_m, split, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    _, n, chunk, tree_split, parts = _chunking(len_ptr, bh // HKV, S, N_SPLITS, BLOCK_N, TREE_SPLIT)
    lo = split * chunk          # the tree split (N_SPLITS) starts past n: no prefix work
    hi = tl.maximum(tl.minimum(lo + chunk, n), lo)
    tree = split == tree_split
    if (lo < hi) | tree:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < ROWS
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + bh * ROWS * D + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        tile = bh * S * D + offs_n[:, None] * D + offs_d[None, :]
        full = lo + (hi - lo) // BLOCK_N * BLOCK_N   # chunks are whole tiles: only n can cut one
        for n0 in range(lo, full, BLOCK_N):
            k = tl.load(kc_ptr + tile + n0 * D)
            v = tl.load(vc_ptr + tile + n0 * D)
            m_i, l_i, acc = _prefix_step(q, k, v, m_i, l_i, acc, qk_scale, offs_n, MASKED=False)
        if full < hi:
            col_ok = full + offs_n < hi
            k = tl.load(kc_ptr + tile + full * D, mask=col_ok[:, None], other=0.0)
            v = tl.load(vc_ptr + tile + full * D, mask=col_ok[:, None], other=0.0)
            m_i, l_i, acc = _prefix_step(q, k, v, m_i, l_i, acc, qk_scale, col_ok, MASKED=True)
        if tree:
            # one or two tiles: a software pipeline would hide nothing and take shared memory
            # (64-row plans then fit 1 program per SM instead of 2)
            for n0 in tl.range(0, T, BLOCK_N, num_stages=1):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < T
                kv = bh * T * D + cols[:, None] * D + offs_d[None, :]
                k = tl.load(k_ptr + kv, mask=col_ok[:, None], other=0.0)
                v = tl.load(v_ptr + kv, mask=col_ok[:, None], other=0.0)
                words = tl.load(bits_ptr + (rows % T)[:, None] * tl.cdiv(T, 32) + (cols // 32)[None, :],
                                mask=col_ok[None, :], other=0)
                allowed = ((words >> (cols % 32)[None, :]) & 1) != 0
                m_i, l_i, acc = _tree_step(q, k, v, allowed, m_i, l_i, acc, qk_scale)
        part = bh * parts + split
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(o_ptr + part * ROWS * D + rows[:, None] * D + offs_d[None, :], acc / l_safe[:, None],
                 mask=row_ok[:, None])
        tl.store(lse_ptr + part * ROWS + rows, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_reduce_kernel(o_ptr, lse_ptr, len_ptr, out_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, HKV, T, S, ROWS, N_SPLITS,
                        D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, TREE_SPLIT: tl.constexpr,
                        PDL: tl.constexpr = False):
    if PDL:  # launched while the split kernel ends (kernels/pdl.py)
        pdl.wait()
    # all partials of BLOCK_R rows x BLOCK_D columns in one [SPLITS, BLOCK_R, BLOCK_D] tile: one
    # round trip to memory, and (with the column split) enough programs to fill the GPU at decode
    pid_r, bh, pid_d = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    cache_len, n, chunk, tree_split, parts = _chunking(len_ptr, bh // HKV, S, N_SPLITS, BLOCK_N, TREE_SPLIT)
    split = tl.arange(0, SPLITS)[:, None]
    rows = tl.minimum(pid_r * BLOCK_R + tl.arange(0, BLOCK_R), ROWS - 1)[None, :]   # pad: repeat the last
    used = (split * chunk < n) | (split == tree_split)      # what the split kernel wrote
    part_row = (bh * parts + split) * ROWS + rows                          # [SPLITS, BLOCK_R]
    lse = tl.load(lse_ptr + part_row, mask=used, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m)[None, :])
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o = tl.load(o_ptr + part_row[:, :, None] * D + cols[None, None, :], mask=used[:, :, None], other=0.0)
    out = tl.sum(o * w[:, :, None], 0) / tl.sum(w, 0)[:, None]                   # [BLOCK_R, BLOCK_D]
    rows_out = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(out_ptr + (bh * ROWS + rows_out)[:, None] * D + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows_out < ROWS)[:, None])
    if pid_r == 0:
        # the new K/V go into the cache here, not in the split kernel: it reads them from k / v
        # and never the slots they land in, and storing them there would keep both tiles in
        # registers through the tree step (spills)
        t = tl.arange(0, BLOCK_T)
        slots = cache_len + t
        ok = ((t < T) & (slots < S))[:, None]
        new = bh * T * D + t[:, None] * D + cols[None, :]
        cache = bh * S * D + slots[:, None] * D + cols[None, :]
        tl.store(kc_ptr + cache, tl.load(k_ptr + new, mask=ok), mask=ok)
        tl.store(vc_ptr + cache, tl.load(v_ptr + new, mask=ok), mask=ok)


# (BLOCK_M cap, BLOCK_N, num_warps, num_stages, prefix programs per SM, tree split), for Q tiles
# of at most 64 rows (decode, small trees) and more. Programs per SM sets the split count;
# tree split: the new tokens get their own split (see above). Chosen by
# benchmarks/sweep_kernels.py on an H200 (stream timings, prefix 2048 and 8192, 1 and 64 nodes;
# sweep_attention_h200.json).
LAUNCH_PLANS = {"few_rows": (64, 64, 4, 3, 2, True), "many_rows": (64, 64, 4, 3, 1, False)}
MAX_SPLITS = 63   # the reduce holds all partials of a row in registers (64 with the tree split)


@functools.cache
def _split_plan(rows: int, slots: int, groups: int, device: torch.device, n_splits=None, tree_split=None):
    """-> (BLOCK_M, BLOCK_N, n_splits, num_warps, num_stages, tree split), from shapes only
    (never cache_len); n_splits counts the prefix splits."""
    cap, block_n, warps, stages, per_sm, plan_tree_split = LAUNCH_PLANS["few_rows" if rows <= 64 else "many_rows"]
    tree_split = plan_tree_split if tree_split is None else tree_split
    block_m = min(cap, max(16, triton.next_power_of_2(rows)))
    if n_splits is None:
        # the interpreter wants few programs
        slots_per_wave = per_sm * torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 4
        n_splits = slots_per_wave // (groups * triton.cdiv(rows, block_m))
    n_splits = max(1, min(n_splits, MAX_SPLITS, triton.cdiv(slots, block_n)))
    assert block_m >= 16 and block_n >= 16, (block_m, block_n)
    return block_m, block_n, n_splits, warps, stages, tree_split


@registry.register("attention", "cuda", "triton", default=True)
@registry.register("attention", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def attention_triton(q, k, v, k_cache, v_cache, layer: int, cache_len, tree_bits, scale: float, n_splits=None,
                     tree_split=None):
    """``n_splits`` (how many programs share each prefix) and ``tree_split`` override the plan;
    tests use them."""
    validate(q, k, v, k_cache, v_cache, layer, cache_len, tree_bits)
    b, hq, t, d = q.shape
    hkv, slots = k_cache.shape[2], k_cache.shape[3]
    assert d >= 16 and d == triton.next_power_of_2(d), f"head dim {d} must be a power of two >= 16"
    rows = hq // hkv * t
    block_m, block_n, n_splits, warps, stages, tree_split = _split_plan(rows, slots, b * hkv, q.device, n_splits, tree_split)
    launch = pdl.launch_args(q.device)   # both kernels: the merge launches while the split ends
    parts = n_splits + tree_split
    o_part = torch.empty((b * hkv, parts, rows, d), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((b * hkv, parts, rows), device=q.device, dtype=torch.float32)
    _attn_split_kernel[(triton.cdiv(rows, block_m), parts, b * hkv)](
        q, k, v, k_cache[layer], v_cache[layer], cache_len, tree_bits, o_part, lse_part,
        scale * _LOG2E, hkv, t, slots, rows, n_splits, D=d, BLOCK_M=block_m, BLOCK_N=block_n,
        TREE_SPLIT=tree_split, num_warps=warps, num_stages=stages, **launch)
    out = torch.empty_like(q)
    splits = triton.next_power_of_2(parts)
    # GPU: about 64 partial rows of 32 columns per program (ncu, H100, decode at prefix 8192: whole
    # rows in 16 programs took 6.8 us, a third of the split kernel); interpreter: one program per KV head
    block_r = max(2, 64 // splits) if q.is_cuda else triton.next_power_of_2(rows)
    block_d = min(d, 32) if q.is_cuda else d
    _attn_reduce_kernel[(triton.cdiv(rows, block_r), b * hkv, d // block_d)](
        o_part, lse_part, cache_len, out, k, v, k_cache[layer], v_cache[layer], hkv, t, slots, rows, n_splits,
        D=d, SPLITS=splits, BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_T=triton.next_power_of_2(t),
        TREE_SPLIT=tree_split, num_warps=4, **launch)
    return out


# --- KV compaction after verification ---------------------------------------------------------

def validate_compact(k_cache, v_cache, cache_len, src):
    """Host-side checks of compact_kv; value bounds only when the inputs live on the CPU."""
    if k_cache.dim() != 5 or v_cache.shape != k_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"caches must be two [L, B, Hkv, S, D] tensors, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b = k_cache.shape[1]
    if src.dim() != 2 or src.shape[0] != b or not 1 <= src.shape[1] <= MAX_NEW_TOKENS or src.dtype != torch.int64:
        raise ValueError(f"src must be int64 [{b}, 1..{MAX_NEW_TOKENS}], got {src.dtype} {tuple(src.shape)}")
    if cache_len.shape != (b,) or cache_len.dtype != torch.int32:
        raise ValueError(f"cache_len must be int32 [{b}], got {cache_len.dtype} {tuple(cache_len.shape)}")
    if not all(x.is_contiguous() for x in (k_cache, v_cache, src)):
        raise ValueError("caches and src must be contiguous")
    if src.device.type == "cpu" and cache_len.device.type == "cpu":
        if (src < 0).any():
            raise ValueError("src offsets must be >= 0")
        check_bounds(cache_len, int(src.max()) + 1, k_cache.shape[3])


@registry.register("compact_kv", "cpu", "reference")
def compact_kv_reference(k_cache, v_cache, cache_len, src):
    """In every layer, copy slot cache_len[b] + src[b, j] to cache_len[b] + j (all read first)."""
    validate_compact(k_cache, v_cache, cache_len, src)
    n_layers, b, h, _, d = k_cache.shape
    a = src.shape[1]
    base = cache_len.long()[:, None]
    def index(offsets):
        return offsets[None, :, None, :, None].expand(n_layers, b, h, a, d)
    for cache in (k_cache, v_cache):
        cache.scatter_(3, index(base + torch.arange(a, device=src.device)), cache.gather(3, index(base + src)))


@triton.jit
def _compact_kernel(kc_ptr, vc_ptr, len_ptr, src_ptr, B, HKV, S, A,
                    D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (layer, b, head, column slice): slices never overlap, so the only
    # read-after-write hazard is inside a program (src[j'] may equal another row's target j)
    pid, pid_d = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b = (pid // HKV) % B
    cache_len = tl.load(len_ptr + b)
    j = tl.arange(0, BLOCK_A)
    src = tl.load(src_ptr + b * A + j, mask=j < A, other=0)
    from_slot, to_slot = cache_len + src, cache_len + j
    read_ok = ((j < A) & (from_slot < S))[:, None]
    write_ok = ((j < A) & (to_slot < S))[:, None]
    cols = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[None, :]
    base = pid * S * D
    k = tl.load(kc_ptr + base + from_slot[:, None] * D + cols, mask=read_ok, other=0.0)
    v = tl.load(vc_ptr + base + from_slot[:, None] * D + cols, mask=read_ok, other=0.0)
    tl.debug_barrier()                 # every thread has read its sources before any row is written
    tl.store(kc_ptr + base + to_slot[:, None] * D + cols, k, mask=write_ok & read_ok)
    tl.store(vc_ptr + base + to_slot[:, None] * D + cols, v, mask=write_ok & read_ok)


@registry.register("compact_kv", "cuda", "triton", default=True)
@registry.register("compact_kv", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def compact_kv_triton(k_cache, v_cache, cache_len, src):
    validate_compact(k_cache, v_cache, cache_len, src)
    n_layers, b, h, slots, d = k_cache.shape
    a = src.shape[1]
    assert d == triton.next_power_of_2(d), f"head dim {d} must be a power of two"
    block_d = min(d, 32)
    _compact_kernel[(n_layers * b * h, d // block_d)](
        k_cache, v_cache, cache_len, src, b, h, slots, a,
        D=d, BLOCK_A=triton.next_power_of_2(a), BLOCK_D=block_d, num_warps=4)
