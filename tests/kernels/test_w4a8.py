"""W4A8 / W4A4: the Triton kernel vs the torch reference, the reference vs plain integer math,
accuracy (SQNR) vs round-to-nearest expectations, configs, bad inputs.

Runs the kernel under TRITON_INTERPRET=1 (tests/conftest.py) with small shapes; the inline-PTX
unpacking, bf16 and timing need a GPU (tests marked gpu).
"""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hsd.kernels import registry, timing, tuning, w4a8, w4a16
from hsd.kernels.act_quant import dequantize as dequantize_act
from hsd.kernels.act_quant import quantize_per_token_reference as quantize_act
from hsd.kernels.w4a8 import w4a8_linear_reference, w4a8_linear_triton
from hsd.testing import sqnr_db

TOL = {torch.float16: 3e-3, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def cfg(block_m=16, split=1, block_n=64, block_k=128, **kw):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4,
                num_stages=2, **kw)


def make_case(m, n, k, group, symmetric, dtype, bias=False, seed=0, kind="int8", w_scale=1.0,
              x_scale=1.0, device="cpu"):
    """(xq, xscale, qweight, scales, zeros, bias) from random float weights and activations."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * w_scale
    x = (torch.randn(m, k, generator=g) * x_scale).to(dtype)
    qw, s, z = w4a16.quantize_rtn(w, group, symmetric)
    xq, xs = quantize_act(x, kind)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (to(xq), to(xs), to(qw), to(s.to(dtype)), to(None if z is None else z.to(dtype)), to(b))


def check(case, group, config=None, x_dot_order=False):
    """The kernel against the reference evaluated in fp32 from the same (rounded) inputs; with
    ``x_dot_order`` the kernel gets xq in dot order (the reference still the natural xq)."""
    xq, xs, qw, s, z, b = case
    up = lambda t: None if t is None else t.float()  # noqa: E731
    ref = w4a8_linear_reference(xq, xs, qw, s.float(), up(z), up(b), group)
    y = w4a8_linear_triton(w4a8.dot_order(xq) if x_dot_order else xq, xs, qw, s, z, b, group, config,
                           x_dot_order)
    assert y.dtype == s.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)
    assert err < TOL[s.dtype], (err.item(), config)


# --------------------------------------------------------------------------- kernel vs reference

@settings(deadline=None, max_examples=25)
@given(m=st.integers(1, 70), n=st.sampled_from([32, 64, 96, 160]), k_groups=st.integers(1, 3),
       group=st.sampled_from([32, 64, 128, "K"]), symmetric=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.float32]), kind=st.sampled_from(["int8", "int4"]),
       split=st.sampled_from([1, 2, 3]), swap=st.booleans(), x_dot_order=st.booleans(),
       seed=st.integers(0, 2**16))
def test_kernel_matches_reference(m, n, k_groups, group, symmetric, bias, dtype, kind, split, swap,
                                  x_dot_order, seed):
    k = (128 if group == "K" else group) * k_groups
    group = k if group == "K" else group
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    case = make_case(m, n, k, group, symmetric, dtype, bias, seed, kind)
    # dot order: K a multiple of 128, tiles (the group, or 128 per channel) of 64 or 128
    x_dot_order &= k % 128 == 0 and (group == k or group >= 64)
    check(case, group, cfg(block_m, split, WEIGHTS_AS_A=swap and block_m >= 64), x_dot_order)


@pytest.mark.parametrize("group, block_k", [(64, 128), (128, 128), (512, 64), (512, 128)])
def test_dot_order_at_every_tile_start(group, block_k):
    """K = 512, one K tile per split: every tile of 64 or 128 columns, grouped or per channel
    (G = K, tiles of BLOCK_K), finds its even and odd slices (``_dot_order_base``)."""
    case = make_case(3, 32, 512, group, False, torch.float32, seed=1)
    tile = block_k if group == 512 else group
    check(case, group, cfg(16, split=512 // tile, block_n=32, block_k=block_k), x_dot_order=True)


def test_dot_order_roundtrip_and_bad_k():
    x = torch.arange(256).reshape(1, 256)
    d = w4a8.dot_order(x)
    assert d[0, :4].tolist() == [0, 2, 4, 6] and d[0, 64:66].tolist() == [1, 3] and d[0, 128].item() == 128
    assert torch.equal(w4a8.natural_order(d), x)
    with pytest.raises(ValueError, match="dot order"):
        w4a8_linear_triton(*make_case(2, 32, 96, 96, True, torch.float32), 96, cfg(16, block_k=32),
                           x_dot_order=True)


def test_per_channel_k_not_a_multiple_of_the_tile():
    """Per-channel (G = K) with K = 3 * 64 and 128-wide tiles: the last tile is masked."""
    check(make_case(5, 64, 192, 192, False, torch.float32), 192, cfg(16))
    check(make_case(5, 64, 192, 192, True, torch.float16, bias=True), 192, cfg(16, split=2))


def test_reference_is_the_integer_math():
    """sum_g s[g] * sum_{k in g} xq * (q - z), times xscale: the formula of the docstring in
    exact integer arithmetic, against the reference (dequantize and matmul in fp32)."""
    m, n, k, group = 3, 40, 256, 64
    xq, xs, qw, s, z, b = make_case(m, n, k, group, False, torch.float32, bias=True, seed=3)
    q = w4a16.unpack(qw).long() - z.long().repeat_interleave(group, 0)           # [K, N]
    parts = (xq.long()[:, :, None] * q[None]).reshape(m, k // group, group, n).sum(2)  # exact
    expected = (parts.double() * s.double()).sum(1) * xs.double()[:, None] + b.double()
    ref = w4a8_linear_reference(xq, xs, qw, s, z, b, group)
    torch.testing.assert_close(ref.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_extreme_values(symmetric):
    """Largest products: |xq| = 127 times every nibble 0 or 15 against zero 0 or 8, fp32 scales
    of 1e4 (|y| ~ 1e10), and an all-zero token (its scale is clamped, its row is the bias)."""
    m, n, k, group = 4, 64, 256, 128
    xq = torch.full((m, k), 127, dtype=torch.int8)
    xq[1] = -127
    xq[2, ::2] = -127
    xq[3] = 0
    xs = torch.tensor([1e4, 1e4, 1.0, 1e-8 / 127])
    qw = torch.full((k // 8, n), -1, dtype=torch.int32)  # every nibble 15
    qw[:, ::2] = 0
    s = torch.full((k // group, n), 1e4)
    z = None if symmetric else torch.zeros_like(s)
    b = torch.randn(n)
    for config in (cfg(16), cfg(16, split=2)):
        check((xq, xs, qw, s, z, b), group, config)
    y = w4a8_linear_triton(xq, xs, qw, s, z, b, group, cfg(16))
    torch.testing.assert_close(y[3], b)


def test_large_magnitudes_fp16():
    # fp16: activations ~30, weights ~30: |y| up to ~2e4, near the top of its range
    check(make_case(2, 64, 256, 128, True, torch.float16, w_scale=30, x_scale=30), 128, cfg(16))


def test_through_the_op_3d_and_strided():
    import hsd.kernels.ops  # noqa: F401  (registers torch.ops.hsd)
    xq, xs, qw, s, z, b = make_case(6, 128, 256, 128, False, torch.float16, bias=True)
    for xq_, xs_ in ((xq[:1], xs[:1]), (xq.reshape(2, 3, 256), xs.reshape(2, 3))):
        with registry.use("w4a8_linear", "triton"):
            y = torch.ops.hsd.w4a8_linear(xq_, xs_, qw, s, z, b, 128)
        ref = w4a8_linear_reference(xq_, xs_, qw, s.float(), z.float(), b.float(), 128)
        assert y.shape == (*xq_.shape[:-1], 128) and y.dtype == torch.float16
        assert ((y.float() - ref).abs().max() / ref.abs().max()) < TOL[torch.float16]
    wide = torch.zeros(6, 512, dtype=torch.int8)
    wide[:, ::2] = xq  # a view with stride 2 along K
    torch.testing.assert_close(w4a8_linear_triton(wide[:, ::2], xs, qw, s, z, b, 128, cfg(16)),
                               w4a8_linear_triton(xq, xs, qw, s, z, b, 128, cfg(16)))
    assert w4a8_linear_triton(xq[:0], xs[:0], qw, s, z, b, 128).shape == (0, 128)


# --------------------------------------------------------------------------- accuracy

def _predicted_sqnr(*sqnrs):
    """Independent noises add: 1 / SNR = sum of 1 / SNR_i."""
    return -10 * torch.log10(torch.tensor([10 ** (-v / 10) for v in sqnrs]).sum()).item()


@pytest.mark.parametrize("group, symmetric", [(128, True), (64, False), (-1, True)])
def test_sqnr_against_float(group, symmetric):
    """Gaussian data: W4A8 is as accurate as W4A16 (RTN weights, 17.5..21 dB) to within 0.1 dB;
    W4A4's error is the weights' plus the 4-bit activations' (predicted from each alone, within
    0.5 dB). Per-token int8 / int4 activations alone: about 42 / 17 dB."""
    m, n, k = 64, 256, 1024
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    group = k if group == -1 else group
    qw, s, z = w4a16.quantize_rtn(w, group, symmetric)
    exact = x @ w.t()
    w4a16_db = sqnr_db(exact, x @ w4a16.dequantize(qw, s, z, group).t())
    for kind, lo, hi in (("int8", 40, 44), ("int4", 16, 18)):
        xq, xs = quantize_act(x, kind)
        act_db = sqnr_db(exact, dequantize_act(xq, xs) @ w.t())
        got = sqnr_db(exact, w4a8_linear_reference(xq, xs, qw, s, z, None, group))
        assert lo < act_db < hi, (kind, act_db)
        assert abs(got - _predicted_sqnr(w4a16_db, act_db)) < 0.5, (kind, got, w4a16_db, act_db)
        if kind == "int8":
            assert w4a16_db - 0.1 < got <= w4a16_db, (got, w4a16_db)
    kernel = w4a8_linear_triton(*quantize_act(x[:16], "int8"), qw, s, z, None, group, cfg(16, block_n=128))
    assert abs(sqnr_db(exact[:16], kernel) - sqnr_db(exact[:16], w4a8_linear_reference(
        *quantize_act(x[:16], "int8"), qw, s, z, None, group))) < 0.01


# --------------------------------------------------------------------------- configs, helpers

def test_default_config_rule():
    for m in (1, 2, 16, 17, 64, 65, 128, 1000):
        for n, k in ((4096, 4096), (28672, 4096), (4096, 14336), (64, 128)):
            c = w4a8.default_config(m, n, k)
            assert 16 <= c["BLOCK_M"] <= 64 and c["BLOCK_M"] >= min(m, 64)
            assert 1 <= c["SPLIT_K"] <= max(1, k // c["BLOCK_K"])
            assert c["WEIGHTS_AS_A"]  # the H100 tuner picked weights-as-A for every shape and M


def test_candidates_are_valid_configs():
    case = make_case(3, 64, 256, 128, True, torch.float32)
    for m in (1, 16, 64):
        cands = list(w4a8.candidate_configs(m, 4096, 4096))
        assert cands and all(c["BLOCK_M"] >= min(m, 16) for c in cands)
    check(case, 128, next(w4a8.candidate_configs(1, 64, 256)))


def test_config_table_lookup(monkeypatch):
    c = cfg(32, split=4)
    monkeypatch.setattr(w4a8, "_TABLES", {"cpu": {"96,256": {"8": c}}})
    cpu = torch.device("cpu")
    assert w4a8.get_config(1, 96, 256, cpu) == w4a8.get_config(8, 96, 256, cpu) == c  # M <= 8
    assert w4a8.get_config(9, 96, 256, cpu) == w4a8.default_config(9, 96, 256)
    assert w4a8.get_config(1, 64, 256, cpu) == w4a8.default_config(1, 64, 256)


def test_shipped_h100_table():
    """The table measured on the lent H100 (kernels/configs/w4a8_h100.json) covers the Llama-3-8B
    linears at M buckets 1, 16, 64, and its configs run."""
    table = tuning.load("w4a8")["NVIDIA H100 80GB HBM3"]
    for shape in ("6144,4096", "4096,4096", "28672,4096", "4096,14336"):
        assert set(table[shape]) == {"1", "16", "64"}
    check(make_case(3, 128, 256, 128, True, torch.float16), 128, table["4096,14336"]["1"])


def test_tune_picks_the_fastest(tmp_path, monkeypatch):
    """tune() on the interpreter with a fake clock that favours BLOCK_N = 128."""
    launched = []

    def fake_bench(fns, reps):
        for fn in fns:
            fn()
        return 1.0 if launched[-1]["BLOCK_N"] == 128 else 2.0

    def launch(*args, **kwargs):
        launched.append(args[-1])
        return w4a8_linear_triton(*args, **kwargs)
    monkeypatch.setattr(timing, "bench_stream_us", fake_bench)
    monkeypatch.setattr(timing, "stream_copies", lambda nbytes: 2)
    monkeypatch.setattr(w4a8, "w4a8_linear_triton", launch)
    monkeypatch.setattr(w4a8, "candidate_configs", lambda m, n, k: [cfg(16), cfg(16, block_n=128)])
    monkeypatch.setattr(w4a8, "_TABLES", {})
    path = w4a8.tune([(128, 256)], m_buckets=(1,), path=tmp_path / "t.json", verbose=False, device="cpu")
    table = json.loads(path.read_text())
    assert table["configs"]["128,256"]["1"]["BLOCK_N"] == 128
    assert w4a8.get_config(1, 128, 256, torch.device("cpu"))["BLOCK_N"] == 128


def test_benchmark_helper_runs_quantize_and_gemm():
    fn = w4a8.benchmark(2, 64, 256, kind="int4", dtype=torch.float32, config=cfg(16), device="cpu")
    y = fn()
    assert y.shape == (2, 64) and y.dtype == torch.float32 and y.abs().sum() > 0


# --------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_before_launch():
    xq, xs, qw, s, z, b = make_case(2, 64, 256, 128, False, torch.float16)
    run = lambda **kw: w4a8_linear_triton(**{**dict(xq=xq, xscale=xs, qweight=qw, scales=s, zeros=z,  # noqa: E731
                                                    bias=b, group_size=128), **kw})
    with pytest.raises(TypeError, match="activations must be int8"):
        run(xq=xq.half())
    with pytest.raises(TypeError, match="xscale must be float32 of shape"):
        run(xscale=xs.half())
    with pytest.raises(TypeError, match="xscale must be float32 of shape"):
        run(xscale=xs[:1])
    with pytest.raises(TypeError, match="qweight must be int32"):
        run(qweight=qw.long())
    with pytest.raises(TypeError, match="scales must be a float"):
        run(scales=s.int())
    with pytest.raises(ValueError, match="multiple of 32"):
        run(group_size=16, scales=s.repeat_interleave(8, 0))
    with pytest.raises(ValueError, match="divides it"):
        run(group_size=96)
    with pytest.raises(ValueError, match=r"qweight \(32, 32\)"):
        run(qweight=qw[:, :32])
    with pytest.raises(ValueError, match="zeros"):
        run(zeros=z[:1])
    with pytest.raises(ValueError, match="bias"):
        run(bias=torch.zeros(3, dtype=torch.float16))
    with pytest.raises(AssertionError):  # the int8 MMA needs blocks of at least 16 x 16 x 32
        w4a8_linear_triton(xq, xs, qw, s, z, b, 128, cfg(8))


# --------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("group, symmetric, bias", [(128, True, False), (64, False, True), (32, True, True),
                                                    (4096, False, False)])
def test_gpu_kernel_matches_reference(dtype, group, symmetric, bias):
    """The inline-PTX unpacking on the GPU, default configs (the table's for fp16 G = 128)."""
    for m in (1, 16, 64, 100):
        check(make_case(m, 512, 4096, group, symmetric, dtype, bias, seed=m, device="cuda"), group)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_every_candidate_config(m):
    case = make_case(m, 512, 4096, 128, True, torch.float16, device="cuda")
    for config in w4a8.candidate_configs(m, 512, 4096):
        if config["SPLIT_K"] <= 2:
            check(case, 128, config)


@pytest.mark.gpu
def test_gpu_benchmark_helper():
    from hsd.kernels.timing import bench_us
    fn = w4a8.benchmark(16, 4096, 4096)
    assert fn().shape == (16, 4096) and bench_us(fn, rep=5) > 0
