"""Fused RMSNorm + per-token quantization: reference = unfused ops, Triton kernel vs reference."""
import itertools

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from hsd.kernels import registry, w4a8
from hsd.kernels.act_quant import ONE_PASS_MAX, dequantize, quantize_per_token_reference
from hsd.kernels.rmsnorm_quant import rmsnorm, rmsnorm_quant_reference, rmsnorm_quant_triton


def case(m, k, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(device, dtype)
    w = (torch.rand(k, generator=g) + 0.5).to(device, dtype)
    w[:: max(1, k // 4)] *= 20  # outlier channels, as in real norms
    return x, w


def test_reference_is_the_hf_norm_then_quantization():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x, w = case(5, 96, 0)
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(w)
        expected = quantize_per_token_reference(norm(x), "int8")
    q, s = rmsnorm_quant_reference(x, w, 1e-5, "int8")
    assert torch.equal(q, expected[0]) and torch.equal(s, expected[1])


@settings(deadline=None, max_examples=20)
@given(m=st.integers(1, 6), k=st.integers(1, 300), kind=st.sampled_from(["int8", "int4"]),
       dtype=st.sampled_from([torch.float16, torch.float32]), block=st.sampled_from([32, 4096]),
       eps=st.sampled_from([1e-6, 1e-5]), seed=st.integers(0, 2**16))
@example(m=3, k=100, kind="int8", dtype=torch.float16, block=4096, eps=1e-6, seed=1)  # one pass
@example(m=3, k=100, kind="int4", dtype=torch.float32, block=32, eps=1e-5, seed=2)  # 3 passes of 4 chunks
def test_kernel_matches_reference(m, k, kind, dtype, block, eps, seed):
    """The row sum's order may differ (a last-bit change of rstd), so a few elements may land
    one quantization step away; the scales agree to float rounding."""
    x, w = case(m, k, seed, dtype)
    q, s = rmsnorm_quant_triton(x, w, eps, kind, block=block)
    q_ref, s_ref = rmsnorm_quant_reference(x, w, eps, kind)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.02


def test_dot_order_is_a_permuted_store():
    """dot_order=True: the natural q with its columns in w4a8.dot_order (one pass and 3 passes)."""
    x, w = case(3, 256, 4, torch.float16)
    for block in (64, 4096):
        q, s = rmsnorm_quant_triton(x, w, 1e-6, "int4", dot_order=True, block=block)
        q_nat, s_nat = rmsnorm_quant_triton(x, w, 1e-6, "int4", block=block)
        assert torch.equal(q, w4a8.dot_order(q_nat)) and torch.equal(s, s_nat)
    with pytest.raises(ValueError, match="dot order"):
        rmsnorm_quant_triton(*case(2, 64, 0), 1e-6, "int8", dot_order=True)


def test_the_op_3d():
    x, w = case(6, 64, 1)
    with registry.use("rmsnorm_quant", "triton"):
        q, s = torch.ops.hsd.rmsnorm_quant(x.reshape(2, 3, 64), w, 1e-6, "int8")
    assert q.shape == (2, 3, 64) and s.shape == (2, 3)
    ref = rmsnorm(x, w, 1e-6)
    assert 10 * torch.log10(ref.pow(2).sum() / (dequantize(q, s).reshape(6, 64) - ref).pow(2).sum()) > 35


@pytest.mark.parametrize("bad, match", [
    (lambda x, w: (x, w.half(), 1e-6, "int8"), "must share a float dtype"),
    (lambda x, w: (x.int(), w, 1e-6, "int8"), "must share a float dtype"),
    (lambda x, w: (x, w[:5], 1e-6, "int8"), r"weight must be \[64\]"),
    (lambda x, w: (x, w, 1e-6, "int3"), "unknown activation quantization"),
    (lambda x, w: (x, w, -1.0, "int8"), "eps -1.0"),
])
def test_bad_inputs(bad, match):
    x, w = case(2, 64, 0)
    for impl in (rmsnorm_quant_reference, rmsnorm_quant_triton):
        with pytest.raises(ValueError, match=match):
            impl(*bad(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_reference(kind, dtype):
    for (m, k), block in itertools.product([(1, 4096), (16, 4096), (3, 5120)], [ONE_PASS_MAX, 1024]):
        x, w = case(m, k, m, dtype, "cuda")
        q, s = rmsnorm_quant_triton(x, w, 1e-5, kind, block=block)  # one pass, and chunks
        q_ref, s_ref = rmsnorm_quant_reference(x, w, 1e-5, kind)
        torch.testing.assert_close(s, s_ref, rtol=8e-3, atol=0)  # a flip of the 16-bit max
        y, y_ref = dequantize(q, s), dequantize(q_ref, s_ref)
        # torch's rsqrt is approximate on CUDA: a last-bit change of the 16-bit normed value can
        # move an element one quantization step (an int8 step, or e4m3's 1/8 relative spacing)
        off = y != y_ref
        assert off.float().mean() < 0.01
        assert ((y - y_ref).abs() <= s[:, None] * 1.01 + y_ref.abs() * 0.13).all()
