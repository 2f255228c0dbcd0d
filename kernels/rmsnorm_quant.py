"""Fused RMSNorm + per-token quantization: x [..., K] -> (q, scale) of RMSNorm(x) * weight.

Computes exactly what the captured Hugging Face RMSNorm (Llama, Mistral, Qwen2) followed by
``hsd::quantize_per_token`` computes, in one read of x instead of a normed hidden state written
and read back:
  h = x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)
  y = weight * h.to(x.dtype)                       (in x's dtype; weight has x's dtype)
  q, scale = quantize_per_token(y, kind)           (see ``hsd.kernels.act_quant``)
The Triton kernel runs one program per token. A row of up to ``ONE_PASS_MAX`` elements is read
once and held in registers; a wider one is walked in three passes (sum of squares, absmax of y,
quantize): after the first, the row is in L1/L2. The torch reference runs the very ops of the
unfused graph, so on the CPU the fusion is bit-exact.
"""
import torch
import triton
import triton.language as tl

from hsd.kernels import registry
from hsd.kernels.act_quant import (ONE_PASS_MAX, check_kind, q_column, quantize_block, quantize_per_token_reference,
                                   row_outputs, row_scale)
from hsd.kernels.w4a16 import check_dot_order


def _check(x, weight, eps, kind, dtypes=(torch.float16, torch.bfloat16, torch.float32)):
    check_kind(kind)
    if x.dtype not in dtypes or weight.dtype != x.dtype:
        raise ValueError(f"rmsnorm_quant: x and weight must share a float dtype, got {x.dtype} and {weight.dtype}")
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rmsnorm_quant: weight must be [{x.shape[-1] if x.dim() else '?'}], "
                         f"got {tuple(weight.shape)} for x {tuple(x.shape)}")
    if weight.device != x.device or eps < 0:
        raise ValueError(f"rmsnorm_quant: weight on {weight.device} vs x on {x.device}, eps {eps}")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Hugging Face RMSNorm, op for op."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@registry.register("rmsnorm_quant", "cpu", "reference")
def rmsnorm_quant_reference(x, weight, eps: float, kind: str, dot_order: bool = False):
    _check(x, weight, eps, kind, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    return quantize_per_token_reference(rmsnorm(x, weight, eps), kind, dot_order)


@triton.jit
def _normed(x, w_ptr, offs, K, rstd):
    """weight * (x * rstd) rounded like the graph: to x's dtype, then the product to x's dtype."""
    h = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    return (w * h).to(x.dtype).to(tl.float32)


@triton.jit
def _rmsnorm_quant_kernel(x_ptr, w_ptr, q_ptr, s_ptr, K, stride_x, eps, TOP: tl.constexpr,
                          IS_INT: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                          DOT_ORDER: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    q_row = q_ptr + row.to(tl.int64) * K
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, 0) / K + eps)
        y = _normed(x, w_ptr, offs, K, rstd)
        scale = row_scale(tl.abs(y), TOP)
        tl.store(q_row + q_column(offs, DOT_ORDER), quantize_block(y, scale, TOP, IS_INT), mask=offs < K)
    else:
        sq = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            sq += x * x
        rstd = 1.0 / tl.sqrt_rn(tl.sum(sq, 0) / K + eps)
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            y = _normed(tl.load(x_row + offs, mask=offs < K, other=0.0), w_ptr, offs, K, rstd)
            amax = tl.maximum(amax, tl.abs(y))
        scale = row_scale(amax, TOP)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            y = _normed(tl.load(x_row + offs, mask=offs < K, other=0.0), w_ptr, offs, K, rstd)
            tl.store(q_row + q_column(offs, DOT_ORDER), quantize_block(y, scale, TOP, IS_INT), mask=offs < K)
    tl.store(s_ptr + row, scale)


@registry.register("rmsnorm_quant", "cuda", "triton")
@registry.register("rmsnorm_quant", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def rmsnorm_quant_triton(x, weight, eps: float, kind: str, dot_order: bool = False,
                         block: int = ONE_PASS_MAX):
    """``block`` caps the kernel's block: rows wider than it are walked in chunks, three times.
    dot_order: q's columns in ``w4a8.dot_order`` (see ``hsd.kernels.act_quant``)."""
    _check(x, weight, eps, kind)
    check_dot_order(x.shape[-1], dot_order, "rmsnorm_quant")
    dtype, top = check_kind(kind)
    x2, q, scale, launch = row_outputs(x, kind, block)
    if x2.numel():
        _rmsnorm_quant_kernel[(x2.shape[0],)](x2, weight.contiguous(), q, scale, x2.shape[1], x2.stride(0), eps,
                                              TOP=top, IS_INT=dtype == torch.int8, DOT_ORDER=dot_order,
                                              **launch)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])
