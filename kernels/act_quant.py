"""Per-token dynamic activation quantization: x [..., K] -> (q, scale), x ~ q * scale[..., None].

Kinds (symmetric, one fp32 scale per token, scale = max|x| / top):
  "int8"  q int8 in -127..127
  "int4"  q int8 in -7..7: Hopper has no int4 MMA, so 4-bit activations travel in int8
          registers and run on the int8 MMA (their speed is W4A8's; their accuracy is 4-bit's)
  "fp8"   q float8_e4m3fn, |q| <= 448
The GEMMs of the W8A8 / W4A8 / W4A4 / FP8 schemes take (q, scale) and apply the scale in their
epilogue. This file holds the torch reference and a Triton kernel (one program per token).
``dot_order=True`` writes q's columns in the order the W4A8 kernel reads them
(``hsd.kernels.w4a8.dot_order``; set by hsd's lowering): a permuted store, free here, that
saves the GEMM splitting every tile in registers.
The kernel reproduces the reference bit for bit: IEEE division (``div_rn``, not the fast
approximate one) and round-half-to-even, as torch.round does. (The interpreter's fp32 -> e4m3
cast is wrong for some values, so the fp8 kind is checked against the reference on a GPU only.)
"""
import torch
import triton
import triton.language as tl

from hsd.kernels import registry, w4a8
from hsd.kernels.w4a16 import check_dot_order

KINDS = {"int8": (torch.int8, 127.0), "int4": (torch.int8, 7.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def check_kind(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown activation quantization {kind!r}; known: {', '.join(KINDS)}")
    return KINDS[kind]


@registry.register("quantize_per_token", "cpu", "reference")
def quantize_per_token_reference(x: torch.Tensor, kind: str, dot_order: bool = False):
    dtype, top = check_kind(kind)
    check_dot_order(x.shape[-1], dot_order, "quantize_per_token")
    amax = x.float().abs().amax(-1).clamp(min=1e-8)
    scale = amax / torch.full_like(amax, top)  # on CUDA, "/ top" would multiply by 1 / top
    q = x.float() / scale[..., None]
    if dtype == torch.int8:
        q = torch.round(q).clamp(-top, top)
    q = q.to(dtype)
    return w4a8.dot_order(q) if dot_order else q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[..., None]


@triton.jit
def quantize_block(v, scale, TOP: tl.constexpr, IS_INT: tl.constexpr):
    """v / scale rounded like the reference: to even integers in -TOP..TOP, or to e4m3 (whose
    cast rounds to nearest even). Shared with the fused RMSNorm kernel."""
    q = tl.math.div_rn(v, tl.zeros_like(v) + scale)
    if IS_INT:
        # adding and removing 1.5 * 2**23 rounds half to even (|q| <= TOP is far below 2**22);
        # libdevice's rint would too, but the interpreter lacks it
        q = tl.minimum(tl.maximum(q, -TOP), TOP)
        q = ((q + 12582912.0) - 12582912.0).to(tl.int8)
    else:
        q = q.to(tl.float8e4nv)
    return q


@triton.jit
def q_column(offs, DOT_ORDER: tl.constexpr):
    """Where column offs of a row of q is stored: in place, or in ``w4a8.dot_order`` (blocks of
    w4a8.DOT_BLOCK = 128 columns, the even ones first; a Triton kernel reads no Python global)."""
    if DOT_ORDER:
        offs = (offs // 128) * 128 + (offs % 2) * 64 + (offs % 128) // 2
    return offs


@triton.jit
def row_scale(amax, TOP: tl.constexpr):
    """The token's scale from a block of running |x| maxima, rounded like the reference."""
    return tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-8), TOP)


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, TOP: tl.constexpr,
                               IS_INT: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                               DOT_ORDER: tl.constexpr):
    """Row program_id(0). ONE_PASS (the row fits one BLOCK): one read, the row held in registers.
    Else absmax over K in BLOCK chunks, then quantize the chunks (the second read hits L1/L2)."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    q_row = q_ptr + row.to(tl.int64) * K
    if ONE_PASS:
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = row_scale(tl.abs(v), TOP)
        tl.store(q_row + q_column(offs, DOT_ORDER), quantize_block(v, scale, TOP, IS_INT), mask=offs < K)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)))
        scale = row_scale(amax, TOP)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            tl.store(q_row + q_column(offs, DOT_ORDER), quantize_block(v, scale, TOP, IS_INT), mask=offs < K)
    tl.store(s_ptr + row, scale)


# Rows up to this many elements are read once and held in registers (32 fp32 a thread at 16 warps).
ONE_PASS_MAX = 16384


def row_outputs(x: torch.Tensor, kind: str, block: int):
    """For a kernel with one program per token: (x as rows [R, K] with unit stride, q [R, K],
    scale [R], the launch's BLOCK / ONE_PASS / num_warps). Callers reshape q and scale back to
    x's leading shape."""
    dtype, _ = check_kind(kind)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape, device=x.device, dtype=dtype)
    scale = torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
    block = min(block, triton.next_power_of_2(k))
    # At decode one program (one SM) does the whole row, so its time is latency: more warps keep
    # more loads in flight, and 16-32 elements a thread keep a row held in registers unspilled
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return x2, q, scale, dict(BLOCK=block, ONE_PASS=block >= k, num_warps=warps)


@registry.register("quantize_per_token", "cuda", "triton")
@registry.register("quantize_per_token", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def quantize_per_token_triton(x: torch.Tensor, kind: str, dot_order: bool = False,
                              block: int = ONE_PASS_MAX):
    """``block`` caps the kernel's block: rows wider than it are walked in chunks, twice."""
    dtype, top = check_kind(kind)
    if not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"quantize_per_token: x must be a float tensor [..., K], got {x.dtype} {tuple(x.shape)}")
    check_dot_order(x.shape[-1], dot_order, "quantize_per_token")
    x2, q, scale, launch = row_outputs(x, kind, block)
    if x2.numel():
        _quantize_per_token_kernel[(x2.shape[0],)](x2, q, scale, x2.shape[1], x2.stride(0), TOP=top,
                                                   IS_INT=dtype == torch.int8, DOT_ORDER=dot_order,
                                                   **launch)
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])
