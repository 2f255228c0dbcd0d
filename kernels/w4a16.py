"""W4A16 GEMM: y = x @ dequant(W).T + b with 4-bit weights and 16-bit (or fp32) activations.

Weight format (the GPTQ layout, so GPTQ checkpoints load without repacking), for a Linear with
N outputs and K inputs and group size G (G = K means one group per output channel):
  qweight  int32 [K // 8, N]   nibble i of word r holds k = 8 r + i, lowest bits first
  scales   [K // G, N]         float (usually the activation dtype)
  zeros    [K // G, N] or None float, same shape as scales; None means the symmetric zero point 8
  w[n, k] = (q[k, n] - zero[k // G, n]) * scales[k // G, n]

This file holds the quantizer (round-to-nearest), pack/unpack, the torch reference, two Triton
kernels with one launcher and a config table, and ``tune()``, which times candidate configs on
the current GPU and writes the table (``kernels/configs/w4a16_<gpu>.json``, loaded at import).

The kernels have to stay fast from M = 1 (decode) to M = 64+ (tree verification), i.e. stream
the 4-bit weights at memory bandwidth while unpacking them. On Hopper the unpacking, not the
MMA, is the cost to watch: integer ops run at half the fp32 rate. So:
  * Nibbles never go through an int->float conversion (see ``_nibbles``), and for 16-bit
    activations one shift and one mask unpack two of them (k = 8 r + i and 8 r + i + 4).
  * Those two become adjacent k rows of one dot operand, with the activations split to match
    (``_split4``): the order of k inside a dot is free, and this pairing is the one the MMA
    operand registers want, so the unpacked weights are neither reshaped nor repacked. On CUDA
    hsd's lowering hands the kernel x already in that order (``dot_order``, X_DOT_ORDER): each
    dot then loads one contiguous slice of x instead of splitting a tile in registers.
  * Small M splits K over several programs (SPLIT_K) that add into the output atomically, so
    even N = 4096 fills every SM; one [BLOCK_K, BLOCK_N] weight tile serves all BLOCK_M rows.
  * On the GPU, 16-bit activations unpack through inline PTX (``_halves_asm``) and tiles that
    divide N and K load unmasked (EVEN). Measured on an H100 (benchmarks/results/README.md),
    small M is bound by latency (few warps per SM, short K loops), not by these instructions.
Variants, picked per (M bucket, N, K) by the table or ``default_config``: "mma" (tensor cores,
BLOCK_M 16..64) and "gemv" (CUDA cores, one row per program, for M <= 4).
``benchmarks/sass_stats.py`` compiles every config for sm_90 without a GPU and counts the
instructions that matter.
"""
import pathlib

import torch
import triton
import triton.language as tl

from hsd.kernels import registry, tuning

SYMMETRIC_ZERO = 8


def group_length(k: int, group_size: int) -> int:
    """The group length G along K (``None`` / -1: one group per output channel), checked."""
    g = k if group_size in (None, -1) else group_size
    if g <= 0 or k % g or k % 8:
        raise ValueError(f"in_features {k} must be divisible by the group size {g} and by 8")
    return g


def grid(w: torch.Tensor, symmetric: bool = True):
    """The 4-bit grid of each group w [..., G] (groups along the last dim): fp32 (scale, zero)
    of shape [...]. Shared by every 4-bit quantizer (``quantize_rtn``, GPTQ in passes/gptq.py)."""
    w = w.detach().float()
    if symmetric:
        scale = w.abs().amax(-1).clamp(min=1e-8) * 2 / 15
        zero = torch.full_like(scale, SYMMETRIC_ZERO)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
    return scale, zero


def to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Nearest grid point of w (scale and zero broadcast against it): fp32 ints in 0..15."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 15)


def pack_quantized(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype, symmetric: bool):
    """q [N, K] ints in 0..15 and scale, zero [N, K // G] -> (qweight, scales, zeros) in the format."""
    qweight = pack(q.to(torch.int32).t().contiguous())
    scales = scale.t().contiguous().to(dtype)
    zeros = None if symmetric else zero.t().contiguous().to(dtype)
    return qweight, scales, zeros


def quantize_rtn(w: torch.Tensor, group_size: int, symmetric: bool = True):
    """Round-to-nearest 4-bit quantization of a [N, K] weight. Returns (qweight, scales, zeros)."""
    n, k = w.shape
    g = group_length(k, group_size)
    wg = w.detach().float().reshape(n, k // g, g)
    scale, zero = grid(wg, symmetric)
    q = to_grid(wg, scale[..., None], zero[..., None])
    return pack_quantized(q.reshape(n, k), scale, zero, w.dtype, symmetric)


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


DOT_BLOCK = 128  # dot order permutes K within blocks of this many columns


def check_dot_order(k: int, dot_order: bool, what: str):
    """Activations (or a quantization's output) in a dot order need K divisible by DOT_BLOCK."""
    if dot_order and k % DOT_BLOCK:
        raise ValueError(f"{what}: activations in dot order need K % {DOT_BLOCK} == 0, got K = {k}")


def dot_order(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K a multiple of 128) with its columns in the order the kernels' 4 dots read
    them: within each block of 128, column 32 j + 2 r + a holds k = 8 r + 4 a + j (nibble
    j + 4 a of word r, see ``_nibbles``). Each dot's activations are then one contiguous slice,
    loaded straight into the tensor-core operand instead of split in registers and written back
    to shared memory (benchmarks/results/README.md). Plain torch ops: ``hsd.lowering`` puts this
    in front of the op, where inductor folds it into the kernel that produces x."""
    return x.unflatten(-1, (-1, 16, 2, 4)).movedim(-1, -3).flatten(-4)


def natural_order(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``dot_order``."""
    return x.unflatten(-1, (-1, 4, 16, 2)).movedim(-3, -1).flatten(-4)


@registry.register("w4a16_linear", "cpu", "reference")
def w4a16_linear_reference(x, qweight, scales, zeros, bias, group_size: int, x_dot_order: bool = False):
    if x_dot_order:
        x = natural_order(x)
    w = dequantize(qweight, scales, zeros, group_size).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


@triton.jit
def _load_tile(qw_ptr, s_ptr, z_ptr, k0, K, N, offs_n, mask_n, G: tl.constexpr,
               HAS_ZEROS: tl.constexpr, SCALE_PER_TILE: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN: tl.constexpr, dtype: tl.constexpr):
    """Packed words [BLOCK_K // 8, BLOCK_N] of rows k0 .. k0 + BLOCK_K, their zero points (in
    dtype) and scales: [1, BLOCK_N] fp32 when the tile lies in one group (the caller scales the
    [M, N] product once, instead of BLOCK_K times as many weights), else per word row in dtype.
    EVEN (the tiles divide N and K): no masks (their predicates were 15% of the small-M loop's
    instructions, benchmarks/sass_stats.py)."""
    rows = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    mask = (rows < K // 8)[:, None] & mask_n[None, :]
    if SCALE_PER_TILE:
        offs, s_mask = (k0 // G) * N + offs_n[None, :], mask_n[None, :]
    else:  # G is a multiple of 8, so the 8 nibbles of a word share a group
        offs, s_mask = ((8 * rows) // G)[:, None] * N + offs_n[None, :], mask
    if EVEN:  # all-true masks fold away
        mask, s_mask = tl.full(mask.shape, 1, tl.int1), tl.full(s_mask.shape, 1, tl.int1)
    q = tl.load(qw_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
    if HAS_ZEROS:
        zero = tl.load(z_ptr + offs, mask=s_mask, other=0.0).to(dtype)
    else:
        zero = tl.full((1, 1), 8.0, dtype)  # the symmetric zero point
    scale = tl.load(s_ptr + offs, mask=s_mask, other=0.0).to(tl.float32 if SCALE_PER_TILE else dtype)
    return q, zero, scale


@triton.jit
def _halves_asm(q, shift: tl.constexpr, mask: tl.constexpr, like):
    """GPU only: ((q >> shift) & mask) OR-ed into the exponent bits of two floats of like's
    16-bit dtype, in one lop3 (the same Triton expression compiles to an AND and an OR, with its
    constants rematerialised per use)."""
    magic: tl.constexpr = 0x64006400 if like.dtype == tl.float16 else 0x43004300
    return tl.inline_asm_elementwise(
        "{ .reg .b32 t; shr.b32 t, $2, $3; lop3.b32 t, t, $4, $5, 0xea; mov.b32 {$0, $1}, t; }",
        "=h,=h,r,r,r,r", [q, tl.full(q.shape, shift, tl.int32), tl.full(q.shape, mask, tl.int32),
                          tl.full(q.shape, magic, tl.int32)],
        dtype=(like.dtype, like.dtype), is_pure=True, pack=1)


@triton.jit
def _nibbles(q, i: tl.constexpr, zero, ASM: tl.constexpr):
    """Nibbles i and i + 4 of every word (k = 8 r + i and 8 r + i + 4) minus their zero point,
    exact, in zero's dtype.

    A nibble becomes a float by OR-ing it into the mantissa of 1024 (fp16), 128 (bf16) or 2**23
    (fp32): an int->float conversion runs at a quarter of the rate of plain arithmetic on NVIDIA
    GPUs and would cap the kernel below memory bandwidth. For 16-bit floats one shift and one
    mask place nibbles i and i + 4 in the two halves of a word. The GPU (ASM) path goes further:
    one lop3 per two nibbles, and for fp16 odd i reads bits 4..7 in place (1024 + 16 n, scaled
    back by an exact fma), so a word needs one shift instead of three (4.2 -> 2.9 instructions
    per weight in the BLOCK_M = 16 loop; on an H100 this did not change the small-M time, which
    latency bounds: benchmarks/results/README.md).
    """
    # one return at the end: compiled Triton rejects an early return inside an if
    if zero.dtype == tl.float32:
        lo = (((q >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
        hi = (((q >> (4 * i + 16)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
        offset = zero + 8388608.0
    elif ASM and zero.dtype == tl.float16 and i % 2 == 1:
        lo, hi = _halves_asm(q, 4 * (i - 1), 0x00F000F0, zero)
        lo, hi = lo * 0.0625, hi * 0.0625
        offset = zero + 64.0
    else:
        if ASM:
            lo, hi = _halves_asm(q, 4 * i, 0x000F000F, zero)
        else:
            magic: tl.constexpr = 0x64006400 if zero.dtype == tl.float16 else 0x43004300
            halves = ((q >> (4 * i)) & 0x000F000F) | magic
            lo = halves.to(tl.int16).to(zero.dtype, bitcast=True)
            hi = (halves >> 16).to(tl.int16).to(zero.dtype, bitcast=True)
        offset = zero + (1024.0 if zero.dtype == tl.float16 else 128.0)
    return lo - offset, hi - offset


@triton.jit
def _k_range(K, tiles_per_split, BLOCK_K: tl.constexpr):
    """The tiles of K this program sums: split pid_k of the SPLIT_K programs along axis 2."""
    first = tl.program_id(2) * tiles_per_split
    return first, tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))


@triton.jit
def _write(y_ptr, b_ptr, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr,
           ATOMIC: tl.constexpr):
    """Store (or with a split K, atomically add) the [BLOCK_M, BLOCK_N] fp32 tile plus bias."""
    if HAS_BIAS:  # with a split K only the first split adds the bias
        b = tl.load(b_ptr + offs_n, mask=offs_n < tl.where(tl.program_id(2) == 0, N, 0), other=0.0)
        acc += b.to(tl.float32)[None, :]
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split4(x):
    """[M, BLOCK_K] -> 4 tensors [M, BLOCK_K // 4]; tensor j holds, at 2 r + a, the column
    k = 8 r + 4 a + j. One vectorized load of x plus register-only splits."""
    x = tl.reshape(x, (x.shape[0], x.shape[1] // 8, 2, 2, 2))  # k = 8 r + 4 a + 2 b + c
    c0, c1 = tl.split(x)
    x0, x2 = tl.split(c0)
    x1, x3 = tl.split(c1)
    shape: tl.constexpr = (x.shape[0], x.shape[1] * 2)
    return (tl.reshape(x0, shape), tl.reshape(x1, shape), tl.reshape(x2, shape),
            tl.reshape(x3, shape))


@triton.jit
def _dot_order_base(t, BLOCK_K: tl.constexpr, DOTS: tl.constexpr = 4):
    """Where tile t's first column sits in a dot order of DOTS dots per 128-block (this file's
    ``dot_order``: 4, ``w4a8.dot_order``: 2): its block's start plus the block's columns of each
    dot that belong to earlier tiles (BLOCK_K 64 or 128: a tile never crosses a block). Written
    from t, not from k0 % 128: with the latter Triton 3.6 cannot tell that the slice is
    16-element aligned and loads x 4 bytes at a time, in 127 registers instead of 96
    (benchmarks/sass_stats.py; that form measured slower than _split4 on an H200)."""
    tiles: tl.constexpr = 128 // BLOCK_K
    if tiles == 1:
        base = t * 128
    else:
        base = (t // tiles) * 128 + (t % tiles) * (BLOCK_K // DOTS)
    return base


@triton.jit
def _interleave_rows(lo, hi):
    """[R, N], [R, N] -> [2 R, N] with row 2 r + a from lo (a = 0) or hi (a = 1)."""
    both = tl.permute(tl.join(lo, hi), (0, 2, 1))
    return tl.reshape(both, (lo.shape[0] * 2, lo.shape[1]))


@triton.jit
def _dot(x, w, acc, WEIGHTS_AS_A: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x @ w, or its transpose acc.T + w.T @ x.T when the weights are the A operand."""
    if WEIGHTS_AS_A:
        return tl.dot(tl.trans(w), tl.trans(x), acc, input_precision=PRECISION)
    else:
        return tl.dot(x, w, acc, input_precision=PRECISION)


# M and the split length only bound loops and masks: one compiled kernel serves every value
@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _w4a16_mma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                      tiles_per_split, G: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, SCALE_PER_TILE: tl.constexpr, ATOMIC: tl.constexpr,
                      EVEN: tl.constexpr, ASM: tl.constexpr,
                      PRECISION: tl.constexpr, WEIGHTS_AS_A: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_DOT_ORDER: tl.constexpr):
    """Tensor cores: per tile of [BLOCK_K // 8, BLOCK_N] words, 4 dots with K = BLOCK_K // 4,
    dot i over the k = 8 r + i and 8 r + i + 4. The unpacked weights stay in registers.

    With BLOCK_M >= 64 Triton uses Hopper's wgmma, which reads its B operand from shared memory
    but A from registers: there the weights become A (computing y.T = W @ x.T)."""
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    first, last = _k_range(K, tiles_per_split, BLOCK_K)
    acc_shape: tl.constexpr = (BLOCK_N, BLOCK_M) if WEIGHTS_AS_A else (BLOCK_M, BLOCK_N)
    acc = tl.zeros(acc_shape, dtype=tl.float32)
    for t in range(first, last):
        k0 = t * BLOCK_K
        q, zero, scale = _load_tile(qw_ptr, s_ptr, z_ptr, k0, K, N, offs_n, offs_n < N, G,
                                    HAS_ZEROS, SCALE_PER_TILE, BLOCK_K, EVEN, dtype)
        if X_DOT_ORDER:  # see dot_order: dot i reads one contiguous slice (K % 128 == 0)
            xs, base = (), _dot_order_base(t, BLOCK_K)
            for i in tl.static_range(4):
                offs_k = base + 32 * i + tl.arange(0, BLOCK_K // 4)
                # as x.T [BLOCK_K // 4, BLOCK_M] (K-major), the B operand's layout in memory
                xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                             mask=(offs_m < M)[None, :], other=0.0)
                xs += (tl.trans(xt),)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xs = _split4(tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                                 mask=(offs_m < M)[:, None] & (offs_k < K)[None, :], other=0.0))
        if SCALE_PER_TILE:
            part = tl.zeros(acc_shape, dtype=tl.float32)
            for i in tl.static_range(4):
                w_lo, w_hi = _nibbles(q, i, zero, ASM)
                part = _dot(xs[i], _interleave_rows(w_lo, w_hi), part, WEIGHTS_AS_A, PRECISION)
            acc += part * (tl.reshape(scale, (BLOCK_N, 1)) if WEIGHTS_AS_A else scale)
        else:
            for i in tl.static_range(4):
                w_lo, w_hi = _nibbles(q, i, zero, ASM)
                w = _interleave_rows(w_lo * scale, w_hi * scale)
                acc = _dot(xs[i], w, acc, WEIGHTS_AS_A, PRECISION)
    if WEIGHTS_AS_A:
        acc = tl.trans(acc)
    _write(y_ptr, b_ptr, acc, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, ATOMIC)


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _w4a16_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                       tiles_per_split, G: tl.constexpr, HAS_ZEROS: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SCALE_PER_TILE: tl.constexpr, ATOMIC: tl.constexpr,
                       EVEN: tl.constexpr, ASM: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X_DOT_ORDER: tl.constexpr):
    """CUDA cores, one row of x per program: one fp32 FMA per weight, no tensor-core operand
    layouts. Sums over k stay per thread ([BLOCK_K // 8, BLOCK_N]) until the end."""
    dtype = x_ptr.dtype.element_ty
    m = tl.program_id(0)
    offs_m = m + tl.arange(0, 1)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K // 8)
    first, last = _k_range(K, tiles_per_split, BLOCK_K)
    acc = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
    for t in range(first, last):
        k0 = t * BLOCK_K
        # (q - zero) in the 16-bit activation dtype is exact and takes half the integer ops
        q, zero, scale = _load_tile(qw_ptr, s_ptr, z_ptr, k0, K, N, offs_n, offs_n < N, G,
                                    HAS_ZEROS, SCALE_PER_TILE, BLOCK_K, EVEN, dtype)
        x_mask = k0 + 8 * offs_r < K
        if X_DOT_ORDER:  # nibble i of word r at 32 i + 2 r, nibble i + 4 right after it
            x_ptrs, x_step, x_next = x_ptr + m * stride_xm + _dot_order_base(t, BLOCK_K) + 2 * offs_r, 32, 1
        else:
            x_ptrs, x_step, x_next = x_ptr + m * stride_xm + k0 + 8 * offs_r, 1, 4
        part = tl.zeros((BLOCK_K // 8, BLOCK_N), dtype=tl.float32)
        for i in tl.static_range(4):
            w_lo, w_hi = _nibbles(q, i, zero, ASM)
            if not SCALE_PER_TILE:
                w_lo, w_hi = w_lo * scale, w_hi * scale
            x_lo = tl.load(x_ptrs + i * x_step, mask=x_mask, other=0.0).to(tl.float32)
            x_hi = tl.load(x_ptrs + i * x_step + x_next, mask=x_mask, other=0.0).to(tl.float32)
            part += w_lo.to(tl.float32) * x_lo[:, None] + w_hi.to(tl.float32) * x_hi[:, None]
        acc += part * scale if SCALE_PER_TILE else part
    _write(y_ptr, b_ptr, tl.sum(acc, axis=0)[None, :], offs_m, offs_n, M, N, stride_ym, HAS_BIAS,
           ATOMIC)


_KERNELS = {"mma": _w4a16_mma_kernel, "gemv": _w4a16_gemv_kernel}


# --------------------------------------------------------------------------- configs

_TABLES = tuning.load("w4a16")


def _split_k(m_tiles: int, n_tiles: int, k_tiles: int, sms: int) -> int:
    """Smallest split of K that gives about 2 programs per SM, each with >= 2 tiles of K."""
    split = 1
    while m_tiles * n_tiles * split < 2 * sms and k_tiles // (2 * split) >= 2:
        split *= 2
    return split


def default_config(m: int, n: int, k: int, sms: int = 132) -> dict:
    """The rule used when the table has no entry for (M bucket, N, K): tensor cores for every M
    (BLOCK_M = 16 costs nothing extra at M = 1 and unpacks with fewer integer ops than the gemv
    kernel, see benchmarks/sass_stats.py), the weights as the wgmma A operand (the H100 tuner
    picked that for every shape and M bucket), and a K split that fills the GPU."""
    block_m = min(max(16, triton.next_power_of_2(m)), 64)
    block_n, block_k = 128 if m <= 64 else 64, 128
    split = _split_k(triton.cdiv(m, block_m), triton.cdiv(n, block_n), triton.cdiv(k, block_k), sms)
    return dict(KERNEL="mma", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                num_warps=4, num_stages=3, WEIGHTS_AS_A=True)


def get_config(m: int, n: int, k: int, device: torch.device) -> dict:
    name, sms = tuning.device_info(device)
    entry = tuning.for_device(_TABLES, name).get(f"{n},{k}", {})
    return entry.get(str(tuning.bucket(m))) or default_config(m, n, k, sms)


# --------------------------------------------------------------------------- launcher

def _check(x, qweight, scales, zeros, bias, group_size):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w4a16: activations must be fp16, bf16 or fp32, got {x.dtype}")
    if qweight.dtype != torch.int32:
        raise ValueError(f"w4a16: qweight must be int32 (8 nibbles per word), got {qweight.dtype}")
    k = x.shape[-1]
    if group_size <= 0 or group_size % 8 or k % group_size:
        raise ValueError(f"w4a16: in_features {k} must be divisible by the group size {group_size}, "
                         "itself a positive multiple of 8 (use group_size = K for per-channel)")
    for name, t in (("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"w4a16: {name} must be a float tensor, got {t.dtype}")
    n = scales.shape[1]
    assert qweight.shape == (k // 8, n), f"qweight {tuple(qweight.shape)}, x {tuple(x.shape)}"
    assert scales.shape == (k // group_size, n), f"scales {tuple(scales.shape)}, group size {group_size}"
    assert zeros is None or zeros.shape == scales.shape, f"zeros {tuple(zeros.shape)}"
    assert bias is None or bias.shape == (n,), f"bias {tuple(bias.shape)}"
    assert all(t is None or t.device == x.device for t in (qweight, scales, zeros, bias))


@registry.register("w4a16_linear", "cuda", "triton")
@registry.register("w4a16_linear", "cpu", "triton")  # CPU only under TRITON_INTERPRET=1
def w4a16_linear_triton(x, qweight, scales, zeros, bias, group_size: int, config=None,
                        x_dot_order: bool = False):
    """config: dict(KERNEL ("mma" or "gemv"), BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps,
    num_stages, optional WEIGHTS_AS_A (mma only; default BLOCK_M >= 64)); default: the tuned
    table for this GPU, else ``default_config``. x_dot_order: x's columns are in ``dot_order``."""
    _check(x, qweight, scales, zeros, bias, group_size)
    k, n = x.shape[-1], scales.shape[1]
    check_dot_order(k, x_dot_order, "w4a16")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = config or get_config(m, n, k, x.device)
    kernel = _KERNELS[cfg["KERNEL"]]
    block_m, block_n, block_k, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    assert all(b > 0 and b & (b - 1) == 0 for b in (block_m, block_n, block_k)), cfg
    if kernel is _w4a16_gemv_kernel:
        assert block_m == 1 and block_k >= 8, cfg
    else:  # tl.dot needs every dim >= 16 on the GPU (the interpreter would accept less)
        assert min(block_m, block_n, block_k // 4) >= 16, cfg
    assert not x_dot_order or block_k in (64, 128), cfg  # a tile within one dot-order block
    grid, tiles_per_split, y = tuning.split_k_launch(m, n, k, block_m, block_n, block_k, split, x.device, x.dtype)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    consts = dict(G=group_size, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None,
                  SCALE_PER_TILE=group_size % block_k == 0 or group_size == k, ATOMIC=grid[2] > 1,
                  EVEN=n % block_n == 0 and k % block_k == 0,
                  ASM=x.is_cuda and x.dtype in (torch.float16, torch.bfloat16),
                  BLOCK_N=block_n, BLOCK_K=block_k, X_DOT_ORDER=x_dot_order)
    if kernel is _w4a16_mma_kernel:
        consts.update(PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 stays fp32
                      WEIGHTS_AS_A=cfg.get("WEIGHTS_AS_A", block_m >= 64), BLOCK_M=block_m)
    kernel[grid](x2, qweight, scales, zeros, bias, y, m, n, k, x2.stride(0), y.stride(0),
                 tiles_per_split, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **consts)
    return y.reshape(*x.shape[:-1], n)


# --------------------------------------------------------------------------- tuning

def candidate_configs(m: int, n: int, k: int):
    """The configs ``tune`` tries for one (M bucket, N, K): a few tiles times a few K splits."""
    tiles = []  # KERNEL, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, WEIGHTS_AS_A
    if m <= 4:  # 256 x 128 on 8 warps: 4x the bytes in flight per thread of 64 x 64 on 4
        tiles += [("gemv", 1, 64, 64, 4, 3, False), ("gemv", 1, 256, 128, 8, 3, False)]
    if m <= 32:  # 256 columns on 4 warps: fewer instructions per weight; more stages and warps
        block_m = max(16, triton.next_power_of_2(m))
        tiles += [("mma", block_m, bn, 128, w, st, False)
                  for bn, w, st in ((64, 4, 4), (128, 4, 3), (128, 4, 5), (128, 8, 4), (256, 4, 3),
                                    (256, 4, 4), (256, 8, 4))]
        # weights as the A operand: wgmma over BLOCK_N weight rows, from registers; BLOCK_K 64
        # halves the unpacked operands held at once (91 instead of 128 registers: 5 programs/SM)
        tiles += [("mma", block_m, bn, bk, w, st, True)
                  for bn, bk, w, st in ((64, 128, 4, 4), (128, 128, 4, 3), (128, 128, 4, 5), (256, 128, 8, 3),
                                        (128, 64, 4, 4), (128, 64, 4, 6), (256, 64, 8, 4))]
    else:  # BLOCK_M = 128 spills
        for block_m in (32, 64):
            for swap in (False, True) if block_m >= 64 else (False,):
                tiles += [("mma", block_m, bn, 128, w, st, swap)
                          for bn, w, st in ((64, 4, 4), (128, 4, 3), (256, 8, 3))]
    for kernel, block_m, block_n, block_k, num_warps, num_stages, swap in tiles:
        k_tiles = triton.cdiv(k, block_k)
        for split in (1, 2, 4, 8, 16, 32, 64) if m <= 64 else (1,):
            if split == 1 or k_tiles // split >= 2:
                yield dict(KERNEL=kernel, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                           SPLIT_K=split, num_warps=num_warps, num_stages=num_stages,
                           WEIGHTS_AS_A=swap)


def tune(shapes, m_buckets=tuning.M_BUCKETS, group_size: int = 128, dtype=torch.float16, path=None,
         reps: int = 10, budget_s: float = float("inf"), verbose: bool = True,
         device="cuda") -> pathlib.Path:
    """``tuning.tune`` of ``candidate_configs`` for each (N, K) in ``shapes`` and M bucket on this
    GPU (RTN weights of random [N, K] ``dtype`` matrices), x in dot order where hsd's lowering
    puts it there (K % 128 == 0); writes ``configs/w4a16_<gpu>.json`` unless ``path`` is given,
    and updates the live table."""
    return tuning.tune(
        "w4a16", _TABLES, shapes, m_buckets, candidate_configs,
        weights=lambda n, k: quantize_rtn(torch.randn(n, k, device=device, dtype=dtype), group_size),
        inputs=lambda m, k: torch.randn(m, k, device=device, dtype=dtype),
        launch=lambda x, w, cfg: w4a16_linear_triton(x, *w, None, group_size, cfg,
                                                     x_dot_order=x.shape[-1] % DOT_BLOCK == 0),
        out=path, reps=reps, budget_s=budget_s, verbose=verbose, device=device,
        meta=dict(group_size=group_size, dtype=str(dtype)))
