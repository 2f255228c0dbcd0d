"""Tree attention and KV compaction: the Triton kernels (interpreted on CPU, real on a GPU when
TRITON_INTERPRET is not 1) against the torch references, and the references against first principles."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hsd.kernels import ops, registry  # noqa: F401  (ops registers torch.ops.hsd.*)
from hsd.kernels.attention import (MAX_NEW_TOKENS, ancestor_mask, attention_reference, attention_triton,
                                   check_bounds, compact_kv_reference, compact_kv_triton, pack_tree_mask,
                                   unpack_tree_mask)

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# fp32 tl.dot is tf32 on the GPU
TOL = {torch.float32: 1e-4 if DEVICE == "cpu" else 1e-2, torch.float16: 2e-2}


@st.composite
def trees(draw, max_nodes=MAX_NEW_TOKENS):
    n = draw(st.integers(1, max_nodes))
    if draw(st.booleans()):
        return [-1] + list(range(n - 1))                                     # a chain
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


@st.composite
def attention_cases(draw):
    parent = draw(trees())
    b, hkv, groups = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 4]))
    prefixes = draw(st.lists(st.integers(0, 300), min_size=b, max_size=b))
    slots = max(prefixes) + len(parent) + draw(st.integers(0, 100))         # room past the block too
    return dict(parent=parent, b=b, hkv=hkv, groups=groups, prefixes=prefixes, slots=slots,
                d=draw(st.sampled_from([16, 32])), dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                layer=draw(st.integers(0, 1)), n_splits=draw(st.sampled_from([None, 1, 3, 8])),
                tree_split=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


def make_inputs(parent, b, hkv, groups, prefixes, slots, d, dtype, seed, layers=2):
    g = torch.Generator().manual_seed(seed)
    t = len(parent)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)
    q, k, v = rand(b, hkv * groups, t, d), rand(b, hkv, t, d), rand(b, hkv, t, d)
    k_cache, v_cache = rand(layers, b, hkv, slots, d), rand(layers, b, hkv, slots, d)
    cache_len = torch.tensor(prefixes, dtype=torch.int32, device=DEVICE)
    return q, k, v, k_cache, v_cache, cache_len, pack_tree_mask(ancestor_mask(torch.tensor(parent)).to(DEVICE))


@settings(max_examples=60, deadline=None)
@given(attention_cases())
def test_triton_matches_reference(case):
    q, k, v, k_cache, v_cache, cache_len, mask = make_inputs(
        case["parent"], case["b"], case["hkv"], case["groups"], case["prefixes"], case["slots"],
        case["d"], case["dtype"], case["seed"])
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    scale = case["d"] ** -0.5
    want = attention_reference(q, k, v, k_ref, v_ref, case["layer"], cache_len, mask, scale)
    got = attention_triton(q, k, v, k_cache, v_cache, case["layer"], cache_len, mask, scale, n_splits=case["n_splits"],
                           tree_split=case["tree_split"])
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[case["dtype"]], rtol=TOL[case["dtype"]])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)



@pytest.mark.gpu
@settings(max_examples=20, deadline=None)
@given(trees(), st.integers(1, 2), st.integers(0, 9000), st.sampled_from([torch.float16, torch.bfloat16]),
       st.integers(0, 2**16))
def test_triton_on_gpu_at_llama_shapes(parent, b, prefix, dtype, seed):
    """The compiled kernels with the shipped launch plans (the CPU test above interprets small
    heads): Llama-3-8B heads (32 query, 8 KV, dim 128), long prefixes, bf16 too."""
    q, k, v, k_cache, v_cache, cache_len, mask = make_inputs(
        parent, b, 8, 4, [prefix, prefix // 3][:b], prefix + len(parent) + 5, 128, dtype, seed)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = attention_reference(q, k, v, k_ref, v_ref, 1, cache_len, mask, 128 ** -0.5)
    got = attention_triton(q, k, v, k_cache, v_cache, 1, cache_len, mask, 128 ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)

@settings(max_examples=15, deadline=None)
@given(st.integers(1, 12), st.integers(0, 40), st.sampled_from([1, 2, 4]), st.integers(0, 2**16))
def test_reference_chain_is_per_token_causal(t, prefix, groups, seed):
    """A chain mask means plain causal attention over prefix + new tokens, one token at a time."""
    hkv, d = 2, 16
    q, k, v, k_cache, v_cache, cache_len, _ = make_inputs(
        [-1] + list(range(t - 1)), 1, hkv, groups, [prefix], prefix + t + 3, d, torch.float32, seed)
    keys = torch.cat([k_cache[1, 0, :, :prefix], k[0]], 1).cpu().double()   # [Hkv, prefix + t, D]
    values = torch.cat([v_cache[1, 0, :, :prefix], v[0]], 1).cpu().double()
    causal = pack_tree_mask(torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril())
    out = attention_reference(q, k, v, k_cache, v_cache, 1, cache_len, causal, d ** -0.5).cpu()
    for h in range(hkv * groups):
        for i in range(t):
            kh, vh = keys[h // groups, :prefix + i + 1], values[h // groups, :prefix + i + 1]
            p = torch.softmax(kh @ q[0, h, i].cpu().double() * d ** -0.5, 0)
            torch.testing.assert_close(out[0, h, i].double(), p @ vh, atol=1e-5, rtol=1e-5)


@st.composite
def compaction_cases(draw):
    n = draw(st.integers(1, MAX_NEW_TOKENS))
    a = draw(st.integers(1, min(n, 8)))
    b = draw(st.integers(1, 2))
    # a root-to-leaf path: the root, then nodes in increasing order (parents precede children)
    src = [[0] + sorted(draw(st.lists(st.integers(1, n - 1), min_size=a - 1, max_size=a - 1, unique=True)))
           if n > 1 else [0] for _ in range(b)]
    a = len(src[0])
    prefixes = draw(st.lists(st.integers(0, 100), min_size=b, max_size=b))
    return dict(src=src, prefixes=prefixes, slots=max(prefixes) + n + draw(st.integers(0, 20)),
                dtype=draw(st.sampled_from([torch.float32, torch.float16])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=25, deadline=None)
@given(compaction_cases())
def test_compact_kv(case):
    b = len(case["src"])
    *_, k_cache, v_cache, cache_len, _ = make_inputs([-1], b, 2, 1, case["prefixes"], case["slots"], 32,
                                                      case["dtype"], case["seed"], layers=3)
    src = torch.tensor(case["src"], device=DEVICE)
    before = k_cache.clone(), v_cache.clone()
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    compact_kv_reference(k_ref, v_ref, cache_len, src)
    compact_kv_triton(k_cache, v_cache, cache_len, src)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    for old, new in zip(before, (k_cache, v_cache)):
        for row, (start, path) in enumerate(zip(case["prefixes"], case["src"])):
            moved = old[:, row, :, [start + j for j in path]]
            assert torch.equal(new[:, row, :, start:start + len(path)], moved)      # the accepted path
            assert torch.equal(new[:, row, :, :start], old[:, row, :, :start])       # the prefix
            assert torch.equal(new[:, row, :, start + len(path):], old[:, row, :, start + len(path):])


def test_ops_under_compile_use_triton():
    """The custom ops dispatch through the registry and keep their cache mutations when compiled."""
    q, k, v, k_cache, v_cache, cache_len, mask = make_inputs([-1, 0, 0, 1], 1, 2, 2, [20], 40, 16, torch.float32, 0)
    src = torch.tensor([[0, 1, 3]], device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = attention_reference(q, k, v, k_ref, v_ref, 1, cache_len, mask, 0.25)
    compact_kv_reference(k_ref, v_ref, cache_len, src)

    def step(q, k, v, k_cache, v_cache, cache_len, mask, src):
        out = torch.ops.hsd.attention(q, k, v, k_cache, v_cache, 1, cache_len, mask, 0.25)
        torch.ops.hsd.compact_kv(k_cache, v_cache, cache_len, src)
        return out

    with registry.use("attention", "triton"), registry.use("compact_kv", "triton"):
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, k_cache, v_cache, cache_len, mask, src)
    torch.testing.assert_close(got, want, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, MAX_NEW_TOKENS), st.integers(0, 2**16))
def test_pack_tree_mask_round_trip(t, seed):
    mask = torch.rand(t, t, generator=torch.Generator().manual_seed(seed)) < 0.5
    bits = pack_tree_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (t, -(-t // 32))
    assert torch.equal(unpack_tree_mask(bits, t), mask)
    u = torch.arange(t)
    assert torch.equal(mask, (bits[:, u // 32].long() >> (u % 32) & 1).bool())   # bit u % 32 of word u // 32


def test_bad_tree_bits_are_refused():
    q, k, v, k_cache, v_cache, cache_len, bits = make_inputs([-1, 0, 1], 1, 1, 1, [5], 20, 16, torch.float32, 0)
    before = k_cache.clone()
    for bad in (torch.ones(3, 3, dtype=torch.bool, device=DEVICE), bits.long(), bits[:2]):
        with pytest.raises(ValueError, match="tree_bits"):
            attention_triton(q, k, v, k_cache, v_cache, 0, cache_len, bad, 0.25)
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("parent", [[-1, 1], [-1, 0, 3, 1], [0, 0], [-1, -1]])
def test_ancestor_mask_rejects_bad_parents(parent):
    with pytest.raises(ValueError, match="parent"):
        ancestor_mask(torch.tensor(parent))


@pytest.mark.parametrize("impl", [attention_reference, attention_triton])
@pytest.mark.parametrize("t, prefix, slots", [(MAX_NEW_TOKENS + 1, 0, 300), (8, 30, 37), (1, 40, 40)])
def test_bad_attention_input_raises_before_writing(impl, t, prefix, slots):
    q, k, v, k_cache, v_cache, cache_len, _ = make_inputs([-1] + list(range(t - 1)), 1, 1, 1, [prefix], slots,
                                                          16, torch.float32, 0)
    mask = pack_tree_mask(torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril())
    before = k_cache.clone(), v_cache.clone()
    if t <= MAX_NEW_TOKENS:
        with pytest.raises(ValueError, match="cache slots"):
            check_bounds(cache_len, t, slots)
    if t > MAX_NEW_TOKENS or DEVICE == "cpu":     # on a GPU the scheduler calls check_bounds (no sync here)
        with pytest.raises(ValueError):
            impl(q, k, v, k_cache, v_cache, 0, cache_len, mask, 0.25)
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


def test_check_bounds_accepts_a_full_cache():
    check_bounds(torch.tensor([0, 32], dtype=torch.int32, device=DEVICE), 8, 40)
