"""Fused silu(gate) * up + per-token quantization: reference = unfused ops, Triton kernel vs
reference, row-strided inputs, bad inputs. (The interpreter's fp32 -> bf16 cast truncates, so
bf16 is compared on the GPU only, with fp8.)"""
import itertools

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from hsd.kernels import registry
from hsd.kernels.act_quant import ONE_PASS_MAX, as_rows, dequantize, quantize_per_token_reference
from hsd.kernels.silu_mul_quant import silu_mul_quant_reference, silu_mul_quant_triton


def case(m, k, seed, dtype=torch.float32, device="cpu", gap=0):
    """gate and up as the two halves of one fused gate_up output [m, 2k + gap] (row stride
    2k + gap, as FuseSiblingLinears leaves them); gap > 0 also leaves columns between them."""
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(m, 2 * k + gap, generator=g) * 4).to(device, dtype)
    gate_up[:, k + gap + k // 3] *= 30  # an outlier channel of up, as in real MLPs
    return gate_up[:, :k], gate_up[:, k + gap:]


def test_reference_is_the_hf_mlp_product_then_quantization():
    from transformers.activations import ACT2FN
    gate, up = case(5, 96, 0, torch.float16)
    expected = quantize_per_token_reference(ACT2FN["silu"](gate) * up, "int8")
    q, s = silu_mul_quant_reference(gate, up, "int8")
    assert torch.equal(q, expected[0]) and torch.equal(s, expected[1])


def test_slices_of_a_fused_output_stay_views():
    gate, up = case(3, 64, 0)
    for x in (gate, up.reshape(3, 1, 64)):
        rows = as_rows(x)
        assert rows.data_ptr() == x.data_ptr() and rows.stride() == (128, 1)


@settings(deadline=None, max_examples=20)
@given(m=st.integers(1, 6), k=st.integers(1, 300), kind=st.sampled_from(["int8", "int4"]),
       dtype=st.sampled_from([torch.float16, torch.float32]), block=st.sampled_from([32, 4096]),
       gap=st.sampled_from([0, 5]), seed=st.integers(0, 2**16))
@example(m=3, k=100, kind="int8", dtype=torch.float16, block=4096, gap=0, seed=1)  # one pass
@example(m=3, k=100, kind="int4", dtype=torch.float32, block=32, gap=5, seed=2)  # 2 passes of 4 chunks
def test_kernel_matches_reference(m, k, kind, dtype, block, gap, seed):
    """silu's exp may differ from torch's in the last bit, which can move the rounded silu, so a
    few elements may land one quantization step away; the scales agree to float rounding."""
    gate, up = case(m, k, seed, dtype, gap=gap)
    q, s = silu_mul_quant_triton(gate, up, kind, block=block)
    q_ref, s_ref = silu_mul_quant_reference(gate, up, kind)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.02


def test_the_op_3d_on_contiguous_and_sliced_inputs():
    gate, up = case(6, 64, 1)
    with registry.use("silu_mul_quant", "triton"):
        for g, u in ((gate, up), (gate.contiguous(), up.contiguous())):
            q, s = torch.ops.hsd.silu_mul_quant(g.reshape(2, 3, 64), u.reshape(2, 3, 64), "int8")
            assert q.shape == (2, 3, 64) and s.shape == (2, 3)
            ref = torch.nn.functional.silu(gate) * up
            assert 10 * torch.log10(ref.pow(2).sum() / (dequantize(q, s).reshape(6, 64) - ref).pow(2).sum()) > 35


@pytest.mark.parametrize("bad, match", [
    (lambda g, u: (g, u.half(), "int8"), "must share a float dtype"),
    (lambda g, u: (g.int(), u.int(), "int8"), "must share a float dtype"),
    (lambda g, u: (g, u[:, :5], "int8"), r"must be one shape \[\.\.\., K\], got \(2, 64\) and \(2, 5\)"),
    (lambda g, u: (g[0], u, "int8"), "must be one shape"),
    (lambda g, u: (g, u, "int3"), "unknown activation quantization"),
])
def test_bad_inputs(bad, match):
    gate, up = case(2, 64, 0)
    for impl in (silu_mul_quant_reference, silu_mul_quant_triton):
        with pytest.raises(ValueError, match=match):
            impl(*bad(gate, up))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_reference(kind, dtype):
    for (m, k), block, gap in itertools.product([(1, 14336), (16, 14336), (3, 5120)], [ONE_PASS_MAX, 1024], [0, 8]):
        gate, up = case(m, k, m, dtype, "cuda", gap)
        q, s = silu_mul_quant_triton(gate, up, kind, block=block)  # one pass, and chunks
        q_ref, s_ref = silu_mul_quant_reference(gate, up, kind)
        torch.testing.assert_close(s, s_ref, rtol=8e-3, atol=0)  # a flip of the 16-bit max
        y, y_ref = dequantize(q, s), dequantize(q_ref, s_ref)
        # Triton's exp is approximate on CUDA: a last-bit change of silu can move its 16-bit
        # rounding, so an element one quantization step (an int8 step, or e4m3's 1/8 spacing)
        off = y != y_ref
        assert off.float().mean() < 0.01
        assert ((y - y_ref).abs() <= s[:, None] * 1.01 + y_ref.abs() * 0.13).all()
