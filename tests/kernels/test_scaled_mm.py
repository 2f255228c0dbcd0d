"""Scaled GEMM (W8A8 / FP8): weight quantizer, Triton kernel vs the torch reference, bad inputs.

The kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) for int8 and fp8: the interpreter's
dots take fp8 operands (made by torch here; its own fp32 -> e4m3 cast is unreliable, see
test_act_quant.py). Timing-sensitive configs and bf16 run on the GPU only.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hsd.kernels import act_quant, registry, scaled_mm
from hsd.kernels.scaled_mm import (default_config, dequantize_weight, quantize_weight,
                                   scaled_mm_reference, scaled_mm_triton)
from hsd.testing import sqnr_db

gpu = pytest.mark.gpu


def cfg(block_m, split=1, swap=True, block_n=64, block_k=128):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, WEIGHTS_AS_A=swap,
                num_warps=4, num_stages=2)


def make_case(m, n, k, kind, dtype, bias=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    wq, ws = quantize_weight(w, kind)
    xq, xs = act_quant.quantize_per_token_reference(x, kind)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return xq, xs, wq, ws, b


def check(case, config, tol):
    """The kernel against the reference (fp64 products, the same scales)."""
    xq, xs, wq, ws, b = case
    ref = scaled_mm_reference(xq, xs, wq, ws.float(), None if b is None else b.float())
    y = scaled_mm_triton(xq, xs, wq, ws, b, config)
    assert y.dtype == ws.dtype and y.shape == ref.shape
    err = (y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-6)
    assert err < tol, (err.item(), config)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_weight_quantizer_sqnr_and_range(kind):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0  # an all-zero channel stays exact
    wq, ws = quantize_weight(w, kind)
    assert wq.dtype == scaled_mm.WEIGHT_KINDS[kind] and ws.dtype == w.dtype and ws.shape == (256,)
    assert wq.float().abs().max() <= (127 if kind == "int8" else 448)
    d = dequantize_weight(wq, ws)
    assert torch.equal(d[3], w[3])
    lo, hi = (41, 44) if kind == "int8" else (29, 33)  # 127 steps of max|w| vs 3 mantissa bits
    assert lo < sqnr_db(w, d) < hi


def test_weight_scale_is_rounded_to_the_weight_dtype():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)).half()
    wq, ws = quantize_weight(w, "int8")
    assert ws.dtype == torch.float16
    # the quantizer divided by the fp16 scale: dequantizing reproduces w within half a step
    err = (wq.float() * ws.float()[:, None] - w.float()).abs()
    assert (err <= ws.float()[:, None] / 2 + 1e-6).all()


@settings(deadline=None, max_examples=20)
@given(m=st.integers(1, 70), n_blocks=st.integers(1, 3), k_tiles=st.integers(1, 3),
       kind=st.sampled_from(["int8", "fp8"]), bias=st.booleans(),
       dtype=st.sampled_from([torch.float16, torch.float32]), split=st.sampled_from([1, 2, 3]),
       swap=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_matches_reference(m, n_blocks, k_tiles, kind, bias, dtype, split, swap, seed):
    n, k = 64 * n_blocks - 16 * (seed % 2), 128 * k_tiles - 32 * (seed % 3 == 0)  # ragged edges too
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    tol = 2e-3 if dtype == torch.float16 else 1e-5
    check(make_case(m, n, k, kind, dtype, bias, seed), cfg(block_m, split, swap), tol)


def test_int8_accumulation_is_exact():
    """All-127 operands over K = 512: int32 sums exactly, the fp32 epilogue rounds once."""
    xq = torch.full((3, 512), 127, dtype=torch.int8)
    wq = torch.full((64, 512), -127, dtype=torch.int8)
    xs, ws = torch.ones(3), torch.ones(64)
    y = scaled_mm_triton(xq, xs, wq, ws, None, cfg(16, split=2))
    assert torch.equal(y, torch.full((3, 64), -127.0 * 127 * 512))


def test_through_the_op_with_3d_input_and_default_config():
    xq, xs, wq, ws, b = make_case(6, 128, 256, "int8", torch.float32, bias=True)
    xq, xs = xq.reshape(2, 3, 256), xs.reshape(2, 3)
    ref = scaled_mm_reference(xq, xs, wq, ws, b)
    with registry.use("scaled_mm", "triton"):
        y = torch.ops.hsd.scaled_mm(xq, xs, wq, ws, b)
    assert y.shape == (2, 3, 128)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_default_config_fills_the_gpu_and_keeps_k_tiles():
    for m, n, k in [(1, 4096, 4096), (16, 6144, 4096), (64, 28672, 4096), (1, 4096, 14336)]:
        c = default_config(m, n, k)
        programs = -(-m // c["BLOCK_M"]) * (n // c["BLOCK_N"]) * c["SPLIT_K"]
        assert programs >= 132 and k // c["BLOCK_K"] // c["SPLIT_K"] >= 4, (m, n, k, c)
    assert default_config(128, 4096, 4096)["WEIGHTS_AS_A"] is False


@pytest.mark.parametrize("bad, match", [
    (lambda c: (c[0].float(), *c[1:]), "xq and wq must both be int8 or both float8"),
    (lambda c: (c[0], c[1], c[2].to(torch.float8_e4m3fn), *c[3:]), "must both be int8 or both float8"),
    (lambda c: (c[0], c[1], c[2][:, :64], *c[3:]), r"wq must be \[N, K\]"),
    (lambda c: (c[0], c[1].half(), *c[2:]), "xscale must be fp32"),
    (lambda c: (c[0], c[1][:2], *c[2:]), "xscale must be fp32"),
    (lambda c: (*c[:3], c[3].to(torch.int32), c[4]), "wscale must be a float"),
    (lambda c: (*c[:4], c[4][:3]), "bias must be a float"),
])
def test_bad_inputs_are_refused(bad, match):
    case = make_case(4, 64, 128, "int8", torch.float32, bias=True)
    for impl in (scaled_mm_reference, scaled_mm_triton):
        with pytest.raises(ValueError, match=match):
            impl(*bad(case))


def test_unknown_weight_kind():
    with pytest.raises(ValueError, match="unknown weight kind 'int4'"):
        quantize_weight(torch.randn(4, 8), "int4")


def test_bench_linear_runs_the_whole_linear():
    """The benchmark helper (activation quant + GEMM) computes the linear; here on the CPU."""
    y = scaled_mm.bench_linear(3, 64, 256, "int8", dtype=torch.float32, device="cpu")()
    assert y.shape == (3, 64) and y.dtype == torch.float32 and y.abs().min() > 0
    g = torch.Generator(device="cpu").manual_seed(0)
    w, x = torch.randn(64, 256, generator=g), torch.randn(3, 256, generator=g)
    assert sqnr_db(x @ w.t(), y) > 30


@gpu
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("m, dtype, bias", [(1, torch.float16, False), (16, torch.float16, False),
                                            (64, torch.float16, False), (128, torch.float16, False),
                                            (5, torch.bfloat16, True)])
def test_gpu_default_configs(kind, m, dtype, bias):
    """The default configs on the 8B layer's widest shapes, against the reference."""
    for n, k in [(6144, 4096), (4096, 14336)]:
        case = make_case(m, n, k, kind, dtype, bias=bias, device="cuda")
        check(case, default_config(m, n, k), 1e-2 if dtype == torch.bfloat16 else 2e-3)
