"""W4A16 GEMM: y = x @ dequant(W).T + b with 4-bit weights and 16-bit (or fp32) activations.

Weight format (the GPTQ layout, so GPTQ checkpoints load without repacking), for a Linear with
N outputs and K inputs and group size G (G = K means one group per output channel):
  qweight  int32 [K // 8, N]   nibble i of word r holds k = 8 r + i, lowest bits first
  scales   [K // G, N]         activation dtype
  zeros    [K // G, N] or None same dtype as scales; None means the symmetric zero point 8
  w[n, k] = (q[k, n] - zero[k // G, n]) * scales[k // G, n]

This file holds the quantizer (round-to-nearest), pack/unpack, the torch reference, the Triton
kernel with its launcher, and a benchmark against cuBLAS fp16 (``python -m hsd.kernels.w4a16``).
"""
import torch
import triton
import triton.language as tl

from hsd.kernels import registry

SYMMETRIC_ZERO = 8


def quantize_rtn(w: torch.Tensor, group_size: int, symmetric: bool = True):
    """Round-to-nearest 4-bit quantization of a [N, K] weight. Returns (qweight, scales, zeros)."""
    n, k = w.shape
    g = k if group_size in (None, -1) else group_size
    if k % g or k % 8:
        raise ValueError(f"in_features {k} must be divisible by the group size {g} and by 8")
    wg = w.detach().float().reshape(n, k // g, g)
    if symmetric:
        scale = wg.abs().amax(-1).clamp(min=1e-8) * 2 / 15
        zero = torch.full_like(scale, SYMMETRIC_ZERO)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, 15).to(torch.int32)
    qweight = pack(q.reshape(n, k).t().contiguous())
    scales = scale.t().contiguous().to(w.dtype)
    zeros = None if symmetric else zero.t().contiguous().to(w.dtype)
    return qweight, scales, zeros


def pack(q: torch.Tensor) -> torch.Tensor:
    """[K, N] ints in 0..15 -> int32 [K // 8, N], 8 nibbles along K, lowest bits first."""
    k, n = q.shape
    q = q.to(torch.int64).reshape(k // 8, 8, n)
    shifts = (torch.arange(8, device=q.device) * 4).view(1, 8, 1)
    word = (q << shifts).sum(1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [K // 8, N] -> int32 [K, N] in 0..15."""
    k8, n = qweight.shape
    shifts = (torch.arange(8, device=qweight.device, dtype=torch.int32) * 4).view(1, 8, 1)
    return ((qweight.unsqueeze(1) >> shifts) & 0xF).reshape(k8 * 8, n)


def dequantize(qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """-> [N, K] weight in the scales' dtype."""
    q = unpack(qweight).to(scales.dtype)
    z = SYMMETRIC_ZERO if zeros is None else zeros.repeat_interleave(group_size, 0)
    return ((q - z) * scales.repeat_interleave(group_size, 0)).t()


@registry.register("w4a16_linear", "cpu", "reference")
def w4a16_linear_reference(x, qweight, scales, zeros, bias, group_size: int):
    w = dequantize(qweight, scales, zeros, group_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K,
                  stride_xm, stride_ym, G: tl.constexpr, HAS_ZEROS: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None], other=0.0)
        # each int32 word is loaded for its 8 k rows; the repeats hit L1
        q = tl.load(qw_ptr + (kk[:, None] // 8) * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        q = (q >> ((kk[:, None] % 8) * 4)) & 0xF
        g = kk[:, None] // G
        s = tl.load(s_ptr + g * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        if HAS_ZEROS:
            z = tl.load(z_ptr + g * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
        else:
            z = 8.0
        w = ((q.to(tl.float32) - z) * s).to(x.dtype)
        acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _blocks(m: int, k: int, group_size: int):
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_k = min(128, group_size, k)
    return block_m, 64, block_k


@registry.register("w4a16_linear", "cuda", "triton")
@registry.register("w4a16_linear", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def w4a16_linear_triton(x, qweight, scales, zeros, bias, group_size: int, blocks=None):
    k, n = x.shape[-1], scales.shape[1]
    assert qweight.dtype == torch.int32 and qweight.shape == (k // 8, n), (qweight.shape, x.shape)
    assert scales.shape == (k // group_size, n) and k % group_size == 0, (scales.shape, group_size)
    assert zeros is None or zeros.shape == scales.shape
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    block_m, block_n, block_k = blocks or _blocks(m, k, group_size)
    assert block_m >= 16 and block_n >= 16 and block_k >= 16, "tl.dot needs blocks of at least 16"
    assert k % block_k == 0 and (block_k % group_size == 0 or group_size % block_k == 0)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a16_kernel[grid](x2, qweight, scales.to(x.dtype), zeros if zeros is None else zeros.to(x.dtype),
                        bias, y, m, n, k, x2.stride(0), y.stride(0), G=group_size,
                        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], n)


def benchmark():
    """Llama-3-8B layer shapes: Triton W4A16 vs cuBLAS fp16, microseconds and weight GB/s."""
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    print(f"{'M':>4} {'fp16 us':>9} {'w4a16 us':>9} {'w4a16 GB/s':>11}")
    for m in (1, 16, 64):
        t16 = tq = 0.0
        nbytes = 0
        for n, k in shapes:
            w = torch.randn(n, k, device="cuda", dtype=torch.float16)
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            qw, s, _ = quantize_rtn(w, 128)
            t16 += triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w)) * 1e3
            tq += triton.testing.do_bench(lambda: w4a16_linear_triton(x, qw, s, None, None, 128)) * 1e3
            nbytes += qw.numel() * 4 + s.numel() * 2
        print(f"{m:>4} {t16:>9.1f} {tq:>9.1f} {nbytes / tq / 1e3:>11.0f}")


if __name__ == "__main__":
    benchmark()
