"""Scaled GEMM: y = (xq @ wq.T) * xscale[:, None] * wscale[None, :] (+ bias), 8-bit operands.

The GEMM of the W8A8 (int8) and FP8 (float8_e4m3fn) schemes: per-token quantized activations
(``hsd::quantize_per_token``) times per-output-channel quantized weights.

Format, for a Linear with N outputs and K inputs:
  xq      [..., K]  int8 (-127..127) or float8_e4m3fn     per-token quantized activations
  xscale  [...]     fp32                                  x ~ xq * xscale[..., None]
  wq      [N, K]    int8 (-127..127) or float8_e4m3fn     the nn.Linear layout, K contiguous
  wscale  [N]       float, the output dtype               w ~ wq * wscale[:, None]
  bias    [N] or None, any float dtype
  y       [..., N]  in wscale's dtype: the op learns the model dtype from the weight scales
                    (the quantizer stores them in the dtype of the weight it was given)
Accumulation is exact for int8 (int32) and fp32 for fp8; the scales apply in fp32 in the epilogue.

Why [N, K]: 8-bit tensor-core MMAs (mma.sync and Hopper's wgmma) want both operands K-major,
which [N, K] tiles are, whichever operand the weights become. The kernel streams the weights once
at memory bandwidth for small M, so as in ``w4a16``:
  * Small M splits K over SPLIT_K programs that add into the output atomically, so even N = 4096
    fills every SM with enough bytes in flight.
  * With WEIGHTS_AS_A the kernel computes y.T = W @ x.T: the weights fill the MMA's M side (64+
    rows, what wgmma needs) and the few tokens its N side (>= 16), instead of padding M to 64.
Configs come per (M bucket, N, K) from ``configs/scaled_mm_<gpu>.json`` or ``default_config``;
int8 and fp8 share them (the same bytes stream through MMAs of the same rate, IGMMA / QGMMA).
``bench_linear`` builds the whole quantized linear (activation quant + GEMM) for benchmarks.
"""
import math

import torch
import triton
import triton.language as tl

from hsd.kernels import registry, tuning
from hsd.kernels.act_quant import check_kind

WEIGHT_KINDS = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def quantize_weight(w: torch.Tensor, kind: str):
    """Per-output-channel symmetric round-to-nearest of a [N, K] weight -> (wq [N, K], wscale [N]).

    The scale is rounded to w's dtype first and the weight divided by that rounded scale, so
    wq * wscale is exactly what the kernel multiplies out."""
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"unknown weight kind {kind!r}; known: {', '.join(WEIGHT_KINDS)}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight needs a float [N, K] weight, got {w.dtype} {tuple(w.shape)}")
    dtype, top = check_kind(kind)
    scale = (w.detach().float().abs().amax(1) / top).to(w.dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero (or underflowing) rows
    # the rounded scale may be a hair under max|w| / top: clamp, as e4m3 has no values past 448
    q = (w.detach().float() / scale[:, None]).clamp(-top, top)
    if dtype == torch.int8:
        q = torch.round(q)
    return q.to(dtype), scale.to(w.dtype)


def dequantize_weight(wq: torch.Tensor, wscale: torch.Tensor) -> torch.Tensor:
    return (wq.float() * wscale.float()[:, None]).to(wscale.dtype)


@registry.register("scaled_mm", "cpu", "reference")
def scaled_mm_reference(xq, xscale, wq, wscale, bias):
    _check(xq, xscale, wq, wscale, bias)
    acc = xq.double() @ wq.double().t()  # exact for int8 sums below 2**53
    y = acc.float() * xscale.float()[..., None] * wscale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(wscale.dtype)


# --------------------------------------------------------------------------- kernel

# M and the split length only bound loops and masks: one compiled kernel serves every value
@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _scaled_mm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                      tiles_per_split, IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                      WEIGHTS_AS_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile over the K tiles of split program_id(2)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.program_id(2) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    acc_shape: tl.constexpr = (BLOCK_N, BLOCK_M) if WEIGHTS_AS_A else (BLOCK_M, BLOCK_N)
    if IS_INT:  # int8 sums are exact in int32
        acc = tl.zeros(acc_shape, dtype=tl.int32)
    else:
        acc = tl.zeros(acc_shape, dtype=tl.float32)
    mask_m, mask_n = (offs_m < M)[:, None], (offs_n < N)[:, None]
    for t in range(first, last):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = (offs_k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m & mask_k, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=mask_n & mask_k, other=0.0)
        if WEIGHTS_AS_A:  # out_dtype: Triton 3.6 defaults it to fp32 even for int8 operands
            acc = tl.dot(w, tl.trans(x), acc, out_dtype=acc.dtype)
        else:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=acc.dtype)
    if WEIGHTS_AS_A:
        acc = tl.trans(acc)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:  # with a split K only the first split adds the bias
        b = tl.load(b_ptr + offs_n, mask=offs_n < tl.where(tl.program_id(2) == 0, N, 0), other=0.0)
        y += b.to(tl.float32)[None, :]
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m & (offs_n < N)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- configs

_TABLES = tuning.load("scaled_mm")


def default_config(m: int, n: int, k: int, sms: int = 132) -> dict:
    """The rule used without a table entry. Up to M = 64 the weights are the wgmma A operand
    (64-row tiles of N) and the tokens its N side; K is split until about 2 programs run per
    SM, each keeping >= 4 tiles of K so its loads pipeline. Larger M uses plain 64x128 tiles."""
    if m <= 64:
        block_m, block_n, block_k, swap = max(16, triton.next_power_of_2(m)), 64, 128, True
    else:
        block_m, block_n, block_k, swap = 64, 128, 128, False
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles, split = triton.cdiv(k, block_k), 1
    while tiles * split < 2 * sms and k_tiles // (2 * split) >= 4:
        split *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                WEIGHTS_AS_A=swap, num_warps=4, num_stages=4)


def get_config(m: int, n: int, k: int, device: torch.device) -> dict:
    name, sms = tuning.device_info(device)
    entry = tuning.for_device(_TABLES, name).get(f"{n},{k}", {})
    return entry.get(str(tuning.bucket(m))) or default_config(m, n, k, sms)


# --------------------------------------------------------------------------- launcher

def _check(xq, xscale, wq, wscale, bias):
    """Errors a caller can make (ValueError naming the tensor) before anything runs."""
    if xq.dtype not in (torch.int8, torch.float8_e4m3fn) or wq.dtype != xq.dtype:
        raise ValueError(f"scaled_mm: xq and wq must both be int8 or both float8_e4m3fn, "
                         f"got {xq.dtype} and {wq.dtype}")
    if wq.dim() != 2 or xq.shape[-1] != wq.shape[1]:
        raise ValueError(f"scaled_mm: wq must be [N, K] with K = xq's last dim; xq {tuple(xq.shape)}, "
                         f"wq {tuple(wq.shape)}")
    if xscale.dtype != torch.float32 or xscale.shape != xq.shape[:-1]:
        raise ValueError(f"scaled_mm: xscale must be fp32 {tuple(xq.shape[:-1])}, got {xscale.dtype} "
                         f"{tuple(xscale.shape)}")
    if not wscale.is_floating_point() or wscale.shape != (wq.shape[0],):
        raise ValueError(f"scaled_mm: wscale must be a float [{wq.shape[0]}] (its dtype is the output's), "
                         f"got {wscale.dtype} {tuple(wscale.shape)}")
    if bias is not None and (not bias.is_floating_point() or bias.shape != (wq.shape[0],)):
        raise ValueError(f"scaled_mm: bias must be a float [{wq.shape[0]}], got {bias.dtype} {tuple(bias.shape)}")
    if any(t is not None and t.device != xq.device for t in (xscale, wq, wscale, bias)):
        raise ValueError("scaled_mm: all tensors must be on one device")


@registry.register("scaled_mm", "cuda", "triton")
@registry.register("scaled_mm", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def scaled_mm_triton(xq, xscale, wq, wscale, bias, config=None):
    """config: dict(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, WEIGHTS_AS_A, num_warps, num_stages);
    default: the table for this GPU, else ``default_config``."""
    _check(xq, xscale, wq, wscale, bias)
    n, k = wq.shape
    x2, xs = xq.reshape(-1, k), xscale.reshape(-1).contiguous()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    wq = wq.contiguous()
    m = x2.shape[0]
    cfg = config or get_config(m, n, k, xq.device)
    block_m, block_n, block_k = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    assert all(b > 0 and b & (b - 1) == 0 for b in (block_m, block_n, block_k)), cfg
    assert min(block_m, block_n) >= 16 and block_k >= 32, cfg  # 8-bit MMAs: K steps of 32
    grid, tiles_per_split, y = tuning.split_k_launch(m, n, k, block_m, block_n, block_k, cfg["SPLIT_K"],
                                                     xq.device, wscale.dtype)
    if m == 0:
        return y.reshape(*xq.shape[:-1], n)
    _scaled_mm_kernel[grid](x2, xs, wq, wscale, bias, y, m, n, k, x2.stride(0), y.stride(0),
                            tiles_per_split, IS_INT=xq.dtype == torch.int8, HAS_BIAS=bias is not None,
                            ATOMIC=grid[2] > 1,
                            WEIGHTS_AS_A=cfg["WEIGHTS_AS_A"], BLOCK_M=block_m, BLOCK_N=block_n,
                            BLOCK_K=block_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y.reshape(*xq.shape[:-1], n)


# --------------------------------------------------------------------------- benchmarks, tuning

def bench_linear(m: int, n: int, k: int, kind: str, dtype=torch.float16, config=None, device="cuda"):
    """A zero-arg callable running one whole quantized linear: ``hsd::quantize_per_token`` of
    random non-zero [m, k] activations, then the scaled GEMM against random non-zero [n, k]
    weights (kind "int8" for W8A8, "fp8" for FP8), as the graph runs it; it returns y. Time it
    with ``hsd.kernels.timing.bench_us``."""
    from hsd.kernels import act_quant
    g = torch.Generator(device=device).manual_seed(0)
    wq, wscale = quantize_weight(torch.randn(n, k, device=device, dtype=dtype, generator=g), kind)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    return lambda: scaled_mm_triton(*act_quant.quantize_per_token_triton(x, kind), wq, wscale, None, config)


def _bench_inputs(m, n, k, kind, dtype=torch.float16, device="cuda"):
    """(xq, xscale, wq, wscale) of random non-zero data, for timing the GEMM alone."""
    from hsd.kernels import act_quant
    wq, wscale = quantize_weight(torch.randn(n, k, device=device, dtype=dtype), kind)
    xq, xscale = act_quant.quantize_per_token_reference(torch.randn(m, k, device=device, dtype=dtype), kind)
    return xq, xscale, wq, wscale


def bench_anchor(m: int, n: int, k: int, kind: str, dtype=torch.bfloat16):
    """torch's own 8-bit GEMMs on the same shape (no activation quant): ``torch._int_mm`` (int8,
    int32 out, no epilogue; needs M > 16, so M is padded to 32) or ``torch._scaled_mm`` (fp8,
    row-wise scales, bf16 out: what it supports with per-token / per-channel scales)."""
    w = torch.randn(n, k, device="cuda", dtype=dtype)
    if kind == "int8":
        x, wt = torch.ones(max(m, 32), k, device="cuda", dtype=torch.int8), quantize_weight(w, kind)[0].t()
        return lambda: torch._int_mm(x, wt)
    wq, ws = quantize_weight(w, kind)
    x = torch.randn(m, k, device="cuda", dtype=dtype).to(torch.float8_e4m3fn)
    xs, ws = torch.ones(m, 1, device="cuda"), ws.float()[None, :]
    return lambda: torch._scaled_mm(x, wq.t(), scale_a=xs, scale_b=ws, out_dtype=dtype)


def candidate_configs(m: int, n: int, k: int, sms: int = 132):
    """The configs ``tune`` tries: a few tiles times the K splits that give 1..8 programs per SM
    (fewer leave SMs idle, more only add atomics)."""
    block_m = max(16, triton.next_power_of_2(min(m, 64)))
    tiles = [(block_m, bn, bk, True, w, s) for bn, bk, w, s in
             ((64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 4, 4), (128, 256, 8, 3))]
    if m > 16:
        tiles += [(block_m, 128, 128, False, 4, 4)]
    for block_m, block_n, block_k, swap, warps, stages in tiles:
        programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        k_tiles = triton.cdiv(k, block_k)
        for split in (1, 2, 4, 8, 16):
            if (split == 1 or k_tiles // split >= 2) and (sms <= programs * split <= 8 * sms
                                                        or split == 1 and programs > 8 * sms):
                yield dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                           WEIGHTS_AS_A=swap, num_warps=warps, num_stages=stages)


def tune(shapes, m_buckets=tuning.M_BUCKETS, kind: str = "int8", path=None, reps: int = 10,
         budget_s: float = math.inf, verbose: bool = True):
    """``tuning.tune`` of ``candidate_configs`` (the GEMM alone, ``kind`` operands) per (N, K) in
    ``shapes`` and M bucket on this GPU, for at most ``budget_s`` seconds; writes
    ``configs/scaled_mm_<gpu>.json`` unless ``path`` is given, and updates the live table."""
    from hsd.kernels import act_quant
    sms = tuning.device_info(torch.device("cuda"))[1]
    return tuning.tune(
        "scaled_mm", _TABLES, shapes, m_buckets, lambda m, n, k: candidate_configs(m, n, k, sms),
        weights=lambda n, k: quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.float16), kind),
        inputs=lambda m, k: act_quant.quantize_per_token_reference(
            torch.randn(m, k, device="cuda", dtype=torch.float16), kind),
        launch=lambda x, w, cfg: scaled_mm_triton(*x, *w, None, cfg),
        out=path, reps=reps, budget_s=budget_s, verbose=verbose)
