"""W4A16: quantizer, packing, both Triton kernels vs the torch reference, configs, bad inputs.

Runs the Triton kernels under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes and large
blocks; bf16 and the tuner need a GPU (the interpreter gets bf16 wrong) and are skipped here.
"""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hsd.kernels import registry, timing, tuning, w4a16
from hsd.kernels.w4a16 import (dequantize, dot_order, natural_order, pack, quantize_rtn, unpack,
                               w4a16_linear_reference, w4a16_linear_triton)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float16: 3e-3, torch.float32: 2e-5}


def mma(block_m, split=1, block_n=64, block_k=128, **kw):
    return dict(KERNEL="mma", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                num_warps=4, num_stages=2, **kw)


def gemv(split=1, block_k=64):
    return dict(KERNEL="gemv", BLOCK_M=1, BLOCK_N=64, BLOCK_K=block_k, SPLIT_K=split, num_warps=4,
                num_stages=2)


def make_case(m, n, k, group, symmetric, dtype, bias=False, seed=0, w_scale=1.0, x_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * w_scale
    x = (torch.randn(m, k, generator=g) * x_scale).to(dtype)
    qw, s, z = quantize_rtn(w, group, symmetric)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, qw, s.to(dtype), None if z is None else z.to(dtype), b


def check(x, qw, s, z, b, group, config, x_dot_order=False):
    """The kernel against the reference evaluated in fp32 from the same (rounded) inputs; with
    ``x_dot_order`` the kernel gets x in dot order (the reference still the natural x)."""
    up = lambda t: None if t is None else t.float()  # noqa: E731
    ref = w4a16_linear_reference(x.float(), qw, s.float(), up(z), up(b), group)
    y = w4a16_linear_triton(dot_order(x) if x_dot_order else x, qw, s, z, b, group, config, x_dot_order)
    assert y.dtype == x.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)
    assert err < TOL[x.dtype], (err.item(), config)


# --------------------------------------------------------------------------- quantizer, packing

@settings(deadline=None, max_examples=30)
@given(k8=st.integers(1, 8), n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(k8, n, seed):
    q = torch.randint(0, 16, (8 * k8, n), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    packed = pack(q)
    assert packed.dtype == torch.int32 and packed.shape == (k8, n)
    assert torch.equal(unpack(packed), q)


def test_pack_layout_is_gptq():
    """Nibble i of word r holds k = 8 r + i, lowest bits first."""
    q = torch.tensor([[7 - i for i in range(8)] + list(range(8))], dtype=torch.int32).t()  # [16, 1]
    words = pack(q)[:, 0].tolist()
    assert words == [0x01234567, 0x76543210]
    assert pack(torch.full((8, 1), 15))[0, 0].item() == -1  # all bits set, as int32


def test_dot_order():
    """Column 32 j + 2 r + a of a 128-block holds k = 8 r + 4 a + j; natural_order inverts it."""
    x = torch.arange(256.0).repeat(3, 1)
    d = dot_order(x)
    for j, r, a in ((0, 0, 0), (1, 0, 0), (0, 0, 1), (3, 15, 1), (2, 7, 0)):
        assert d[0, 32 * j + 2 * r + a] == 8 * r + 4 * a + j
        assert d[2, 128 + 32 * j + 2 * r + a] == 128 + 8 * r + 4 * a + j
    assert torch.equal(natural_order(d), x)
    weights = quantize_rtn(torch.randn(8, 256), 128)
    torch.testing.assert_close(w4a16_linear_reference(d, *weights, None, 128, x_dot_order=True),
                               w4a16_linear_reference(x, *weights, None, 128))
    with pytest.raises(ValueError, match="dot order"):
        w4a16_linear_triton(torch.randn(2, 64), *quantize_rtn(torch.randn(8, 64), 32), None, 32, x_dot_order=True)


@pytest.mark.parametrize("group, symmetric, lo, hi", [
    (128, True, 18.5, 20.0), (128, False, 19.3, 21.0), (4096, True, 16.0, 17.5), (32, False, 21.0, 22.5)])
def test_rtn_sqnr_on_gaussian_weights(group, symmetric, lo, hi):
    w = torch.randn(256, 4096, generator=torch.Generator().manual_seed(0))
    qw, s, z = quantize_rtn(w, group, symmetric)
    err = w - dequantize(qw, s, z, group)
    sqnr = 10 * torch.log10(w.pow(2).sum() / err.pow(2).sum()).item()
    assert lo < sqnr < hi, sqnr


def test_rtn_all_equal_and_zero_groups():
    w = torch.zeros(4, 256)
    # constant groups (rows 2 (half) and 3 are zero): exact except that symmetric RTN maps the
    # largest magnitude to 7.5 steps, which rounds to the 7 of the [-8, 7] range (6.7% off)
    w[0], w[1], w[2, :128] = 0.75, -3.0, 2.5
    for symmetric in (True, False):
        qw, s, z = quantize_rtn(w, 128, symmetric)
        d = dequantize(qw, s, z, 128)
        torch.testing.assert_close(d, w, rtol=0.07 if symmetric else 1e-6, atol=1e-6)


# --------------------------------------------------------------------------- kernels vs reference

@settings(deadline=None, max_examples=25)
@given(m=st.integers(1, 80), n_blocks=st.integers(1, 3), k_tiles=st.integers(1, 3),
       group=st.sampled_from([32, 64, 128, "K"]), symmetric=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.float32]), split=st.sampled_from([1, 2, 3]),
       block_k=st.sampled_from([64, 128]), weights_as_a=st.booleans(), x_dot_order=st.booleans(),
       seed=st.integers(0, 2**16))
def test_mma_matches_reference(m, n_blocks, k_tiles, group, symmetric, bias, dtype, split, block_k,
                               weights_as_a, x_dot_order, seed):
    n, k = 64 * n_blocks, 128 * k_tiles
    group = k if group == "K" else group
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    case = make_case(m, n, k, group, symmetric, dtype, bias, seed)
    check(*case, group, mma(block_m, split, block_k=block_k, WEIGHTS_AS_A=weights_as_a), x_dot_order)


@settings(deadline=None, max_examples=20)
@given(m=st.integers(1, 4), n_blocks=st.integers(1, 2), k_groups=st.integers(1, 2),
       group=st.sampled_from([32, 64, 128, "K"]), symmetric=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.float32]), split=st.sampled_from([1, 2, 3]),
       x_dot_order=st.booleans(), seed=st.integers(0, 2**16))
def test_gemv_matches_reference(m, n_blocks, k_groups, group, symmetric, bias, dtype, split, x_dot_order,
                                seed):
    n, k = 64 * n_blocks, 128 * k_groups  # 64-wide tiles: 2 per group of 128
    group = k if group == "K" else group
    case = make_case(m, n, k, group, symmetric, dtype, bias, seed)
    check(*case, group, gemv(split), x_dot_order)


@pytest.mark.parametrize("config", [mma(16, 2, block_k=64), mma(16, 2, block_k=128, WEIGHTS_AS_A=True),
                                    gemv(2, block_k=64), gemv(2, block_k=128)])
def test_dot_order_at_every_tile_start(config):
    """Both tile lengths and kernels, over K = 3 dot-order blocks split across programs: every
    tile finds its x slice (the start is computed from the tile index, ``_dot_order_base``)."""
    check(*make_case(3, 64, 384, 128, True, torch.float32, bias=True, seed=5), 128, config, True)


@pytest.mark.parametrize("config", [mma(64, WEIGHTS_AS_A=False), mma(64, WEIGHTS_AS_A=True),
                                    mma(16, split=2), gemv(split=2)], ids=str)
@pytest.mark.parametrize("group, symmetric", [(128, True), (64, False), (256, False)])
def test_variants_fixed_shape(config, group, symmetric):
    m = 3 if config["KERNEL"] == "gemv" else 70
    check(*make_case(m, 128, 256, group, symmetric, torch.float16, bias=True), group, config)


def test_k_not_a_multiple_of_the_tile():
    """Per-channel (G = K) with K = 3 * 64 and 128-wide tiles: the last tile is masked."""
    check(*make_case(5, 64, 192, 192, False, torch.float32), 192, mma(16))


@pytest.mark.parametrize("config", [mma(16), gemv()], ids=["mma", "gemv"])
def test_large_magnitudes(config):
    m = 2
    # fp16: |y| up to ~2e4, near the top of its range; fp32: weights and activations ~1e4
    check(*make_case(m, 64, 256, 128, True, torch.float16, w_scale=30, x_scale=30), 128, config)
    check(*make_case(m, 64, 256, 64, False, torch.float32, w_scale=1e4, x_scale=1e4), 64, config)


@pytest.mark.parametrize("config", [mma(16), gemv()], ids=["mma", "gemv"])
def test_all_equal_groups(config):
    w = torch.full((64, 256), 0.5)
    w[:, 128:] = -2.0
    x = torch.randn(4, 256).half()
    for symmetric in (True, False):
        qw, s, z = quantize_rtn(w, 128, symmetric)
        s, z = s.half(), None if z is None else z.half()
        check(x, qw, s, z, None, 128, config)


def test_default_configs_through_the_op():
    """No config: the table or the default rule picks the kernel, through the custom op, with a
    3D input."""
    import hsd.kernels.ops  # noqa: F401  (registers torch.ops.hsd)
    x, qw, s, z, b = make_case(6, 128, 256, 128, False, torch.float16, bias=True)
    for xs in (x[:1], x[:2], x.reshape(2, 3, 256)):
        with registry.use("w4a16_linear", "triton"):
            y = torch.ops.hsd.w4a16_linear(xs, qw, s, z, b, 128)
        ref = w4a16_linear_reference(xs.float(), qw, s.float(), z.float(), b.float(), 128)
        assert y.shape == (*xs.shape[:-1], 128)
        assert ((y.float() - ref).abs().max() / ref.abs().max()) < TOL[torch.float16]


def test_empty_and_strided_inputs():
    x, qw, s, z, b = make_case(4, 64, 256, 128, True, torch.float32)
    assert w4a16_linear_triton(x[:0], qw, s, z, b, 128).shape == (0, 64)
    wide = torch.randn(4, 512)
    wide[:, ::2] = x  # a view with stride 2 along K
    torch.testing.assert_close(w4a16_linear_triton(wide[:, ::2], qw, s, z, b, 128, mma(16)),
                               w4a16_linear_reference(x, qw, s, z, b, 128), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- configs

def test_default_config_rule():
    for m in (1, 2, 3, 16, 17, 64, 65, 128, 1000):
        for n, k in ((4096, 4096), (28672, 4096), (4096, 14336), (64, 128)):
            cfg = w4a16.default_config(m, n, k)
            assert cfg["KERNEL"] == "mma" and 16 <= cfg["BLOCK_M"] <= 64 and cfg["WEIGHTS_AS_A"]
            assert cfg["BLOCK_M"] >= min(m, 64)
            assert 1 <= cfg["SPLIT_K"] <= max(1, k // cfg["BLOCK_K"])


def test_candidates_are_valid_configs():
    x, qw, s, z, b = make_case(1, 64, 256, 128, True, torch.float32)
    for m in tuning.M_BUCKETS:
        cands = list(w4a16.candidate_configs(m, 4096, 4096))
        assert cands and all(c["BLOCK_M"] <= 64 for c in cands)
        assert any(c["KERNEL"] == "gemv" for c in cands) == (m <= 4)


def test_config_table_lookup(tmp_path, monkeypatch):
    cfg = mma(32, split=4)
    path = tmp_path / "w4a16_test.json"
    path.write_text(json.dumps({"device": "cpu", "configs": {"96,256": {"8": cfg}}}))
    monkeypatch.setattr(w4a16, "_TABLES", tuning.load("w4a16", tmp_path))
    cpu = torch.device("cpu")
    assert w4a16.get_config(5, 96, 256, cpu) == cfg          # bucket 8 holds M = 5..8
    assert w4a16.get_config(9, 96, 256, cpu) == w4a16.default_config(9, 96, 256)
    assert w4a16.get_config(5, 64, 256, cpu) == w4a16.default_config(5, 64, 256)


def test_tune_picks_the_fastest_and_updates_the_table(tmp_path, monkeypatch):
    """tune() logic on the interpreter, with a fake clock that favours one config."""
    launched = []

    def launch(*args, **kwargs):
        launched.append(args[-1])
        return w4a16_linear_triton(*args, **kwargs)

    def fake_bench(fns, reps):
        for fn in fns:
            fn()
        cfg = launched[-1]
        return 1.0 if (cfg["KERNEL"], cfg["BLOCK_N"]) == ("mma", 128) else 2.0
    monkeypatch.setattr(w4a16, "w4a16_linear_triton", launch)
    monkeypatch.setattr(timing, "bench_stream_us", fake_bench)
    monkeypatch.setattr(timing, "stream_copies", lambda nbytes: 2)
    monkeypatch.setattr(w4a16, "_TABLES", {})
    path = w4a16.tune([(128, 256)], m_buckets=(1, 32), path=tmp_path / "t.json", verbose=False,
                      dtype=torch.float32, device="cpu")
    table = json.loads(path.read_text())
    assert table["device"] == "cpu" and set(table["configs"]["128,256"]) == {"1", "32"}
    for bucket, cfg in table["configs"]["128,256"].items():
        assert cfg["KERNEL"] == "mma" and cfg["BLOCK_N"] == 128
        assert w4a16.get_config(int(bucket), 128, 256, torch.device("cpu")) == cfg


# --------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_before_launch():
    x, qw, s, z, b = make_case(2, 64, 256, 128, False, torch.float16)
    with pytest.raises(ValueError, match="divisible by the group size"):
        w4a16_linear_triton(x, qw, s, z, b, 96)
    with pytest.raises(ValueError, match="multiple of 8"):
        w4a16_linear_triton(x, qw, s, z, b, 4)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        w4a16_linear_triton(x.double(), qw, s, z, b, 128)
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        w4a16_linear_triton(x.to(torch.int8), qw, s, z, b, 128)
    with pytest.raises(ValueError, match="int32"):
        w4a16_linear_triton(x, qw.to(torch.int64), s, z, b, 128)
    with pytest.raises(ValueError, match="scales must be a float"):
        w4a16_linear_triton(x, qw, s.to(torch.int32), z, b, 128)
    with pytest.raises(AssertionError, match="qweight"):
        w4a16_linear_triton(x, qw[:, :32], s, z, b, 128)
    with pytest.raises(AssertionError, match="bias"):
        w4a16_linear_triton(x, qw, s, z, torch.zeros(3, dtype=x.dtype), 128)
    with pytest.raises(AssertionError):  # tl.dot needs blocks of at least 16 on the GPU
        w4a16_linear_triton(x, qw, s, z, b, 128, mma(8))
    with pytest.raises(ValueError, match="divisible by the group size"):
        quantize_rtn(torch.randn(4, 100), 64)


# --------------------------------------------------------------------------- GPU only

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("x_dot_order", [False, True])
def test_gpu_default_configs(dtype, m, x_dot_order):
    x, qw, s, z, b = (None if t is None else t.cuda()
                      for t in make_case(m, 4096, 4096, 128, False, dtype, bias=True))
    up = lambda t: t.float()  # noqa: E731
    ref = w4a16_linear_reference(up(x), qw, up(s), up(z), up(b), 128)
    y = w4a16_linear_triton(dot_order(x) if x_dot_order else x, qw, s, z, b, 128, x_dot_order=x_dot_order)
    assert ((y.float() - ref).norm() / ref.norm()) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64])
def test_gpu_every_candidate_tile_in_dot_order(m):
    """Every tile the tuner may pick, compiled, with x in dot order (split 2, one per tile)."""
    x, qw, s, z, b = (None if t is None else t.cuda()
                      for t in make_case(m, 512, 1024, 128, False, torch.float16, bias=True))
    tiles = {tuple(sorted({**c, "SPLIT_K": 2}.items())) for c in w4a16.candidate_configs(m, 512, 1024)}
    for tile in sorted(tiles):
        check(x, qw, s, z, b, 128, dict(tile), x_dot_order=True)


@gpu
@pytest.mark.gpu
def test_gpu_tune_writes_a_table(tmp_path):
    path = w4a16.tune([(256, 512)], m_buckets=(1, 16), path=tmp_path / "t.json", reps=2, verbose=False)
    table = json.loads(path.read_text())
    assert set(table["configs"]["256,512"]) == {"1", "16"}
