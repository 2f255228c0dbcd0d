"""Fused SwiGLU product + per-token quantization: (gate, up) [..., K] -> (q, scale) of silu(gate) * up.

Computes exactly what the captured Hugging Face LlamaMLP (Llama, Mistral, Qwen2) feeds
``hsd::quantize_per_token`` before down_proj, without writing the [..., intermediate] product
and reading it back:
  h = silu(gate) * up                              (silu, then the product, each in gate's dtype)
  q, scale = quantize_per_token(h, kind)           (see ``hsd.kernels.act_quant``)
The Triton kernel runs one program per token and reads the gate and up rows once: a row of up
to ``ONE_PASS_MAX`` elements is held in registers, a wider one is walked twice (absmax of h,
quantize; the second read hits L1/L2). gate and up may be views with any row stride, e.g. the
two halves of a fused gate_up Linear's output. The torch reference runs the very ops of the
unfused graph, so on the CPU the fusion is bit-exact.
"""
import torch
import triton
import triton.language as tl

from hsd.kernels import registry
from hsd.kernels.act_quant import (ONE_PASS_MAX, as_rows, check_kind, quantize_block, quantize_per_token_reference,
                                   row_outputs, row_scale)


def _check(gate, up, kind, dtypes=(torch.float16, torch.bfloat16, torch.float32)):
    check_kind(kind)
    if gate.dtype not in dtypes or up.dtype != gate.dtype:
        raise ValueError(f"silu_mul_quant: gate and up must share a float dtype, got {gate.dtype} and {up.dtype}")
    if gate.dim() == 0 or up.shape != gate.shape:
        raise ValueError(f"silu_mul_quant: gate and up must be one shape [..., K], "
                         f"got {tuple(gate.shape)} and {tuple(up.shape)}")
    if up.device != gate.device:
        raise ValueError(f"silu_mul_quant: gate on {gate.device} vs up on {up.device}")


@registry.register("silu_mul_quant", "cpu", "reference")
def silu_mul_quant_reference(gate, up, kind: str):
    _check(gate, up, kind, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    return quantize_per_token_reference(torch.nn.functional.silu(gate) * up, kind)


@triton.jit
def _silu_mul(g_row, u_row, offs, K):
    """silu(gate) * up rounded like the graph: silu (in fp32) to gate's dtype, then the product."""
    g = tl.load(g_row + offs, mask=offs < K, other=0.0)
    u = tl.load(u_row + offs, mask=offs < K, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    silu = tl.math.div_rn(gf, 1.0 + tl.exp(-gf)).to(g.dtype).to(tl.float32)  # torch: x / (1 + exp(-x))
    return (silu * u).to(g.dtype).to(tl.float32)


@triton.jit
def _silu_mul_quant_kernel(g_ptr, u_ptr, q_ptr, s_ptr, K, stride_g, stride_u, TOP: tl.constexpr,
                           IS_INT: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    row = tl.program_id(0)
    g_row = g_ptr + row.to(tl.int64) * stride_g
    u_row = u_ptr + row.to(tl.int64) * stride_u
    q_row = q_ptr + row.to(tl.int64) * K
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        h = _silu_mul(g_row, u_row, offs, K)
        scale = row_scale(tl.abs(h), TOP)
        tl.store(q_row + offs, quantize_block(h, scale, TOP, IS_INT), mask=offs < K)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            amax = tl.maximum(amax, tl.abs(_silu_mul(g_row, u_row, k0 + tl.arange(0, BLOCK), K)))
        scale = row_scale(amax, TOP)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            h = _silu_mul(g_row, u_row, offs, K)
            tl.store(q_row + offs, quantize_block(h, scale, TOP, IS_INT), mask=offs < K)
    tl.store(s_ptr + row, scale)


@registry.register("silu_mul_quant", "cuda", "triton")
@registry.register("silu_mul_quant", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def silu_mul_quant_triton(gate, up, kind: str, block: int = ONE_PASS_MAX):
    """``block`` caps the kernel's block: rows wider than it are walked in chunks, twice."""
    _check(gate, up, kind)
    dtype, top = check_kind(kind)
    g2, q, scale, launch = row_outputs(gate, kind, block)
    u2 = as_rows(up)
    if g2.numel():
        _silu_mul_quant_kernel[(g2.shape[0],)](g2, u2, q, scale, g2.shape[1], g2.stride(0), u2.stride(0),
                                               TOP=top, IS_INT=dtype == torch.int8, **launch)
    return q.reshape(gate.shape), scale.reshape(gate.shape[:-1])
